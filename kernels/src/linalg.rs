//! Small dense linear algebra in f64 that candle lacks: a symmetric eigendecomposition (cyclic
//! Jacobi) for GPM bases (PGP) and a linear solve with partial pivoting (Woodbury's r x r
//! systems). Sizes here are at most a layer width, so O(n^3) plain loops are fine.

/// Eigenvalues (descending) and unit eigenvectors (columns of the row-major `n x n` result)
/// of the symmetric row-major `n x n` matrix `a`; None when `a` is not `n x n`.
pub fn sym_eigen(a: &[f64], n: usize) -> Option<(Vec<f64>, Vec<f64>)> {
    if a.len() != n * n {
        return None;
    }
    let mut m = a.to_vec();
    let mut v = vec![0.0; n * n];
    for i in 0..n {
        v[i * n + i] = 1.0;
    }
    let off = |m: &[f64]| -> f64 {
        let mut s = 0.0;
        for i in 0..n {
            for j in 0..n {
                if i != j {
                    s += m[i * n + j] * m[i * n + j];
                }
            }
        }
        s
    };
    let scale: f64 = m.iter().map(|x| x * x).sum::<f64>().max(f64::MIN_POSITIVE);
    for _sweep in 0..60 {
        if off(&m) <= 1e-22 * scale {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = m[p * n + q];
                if apq.abs() <= f64::MIN_POSITIVE {
                    continue;
                }
                let (app, aqq) = (m[p * n + p], m[q * n + q]);
                let theta = (aqq - app) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let (mkp, mkq) = (m[k * n + p], m[k * n + q]);
                    m[k * n + p] = c * mkp - s * mkq;
                    m[k * n + q] = s * mkp + c * mkq;
                }
                for k in 0..n {
                    let (mpk, mqk) = (m[p * n + k], m[q * n + k]);
                    m[p * n + k] = c * mpk - s * mqk;
                    m[q * n + k] = s * mpk + c * mqk;
                }
                for k in 0..n {
                    let (vkp, vkq) = (v[k * n + p], v[k * n + q]);
                    v[k * n + p] = c * vkp - s * vkq;
                    v[k * n + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    let mut idx: Vec<usize> = (0..n).collect();
    idx.sort_by(|&i, &j| m[j * n + j].total_cmp(&m[i * n + i]));
    let vals = idx.iter().map(|&i| m[i * n + i]).collect();
    let mut vecs = vec![0.0; n * n];
    for (col, &i) in idx.iter().enumerate() {
        for k in 0..n {
            vecs[k * n + col] = v[k * n + i];
        }
    }
    Some((vals, vecs))
}

/// Solves `a x = b` for row-major `a` (`n x n`) and `b` (`n x m`), by Gaussian elimination
/// with partial pivoting. None when `a` is singular to working precision.
pub fn solve(a: &[f64], b: &[f64], n: usize, m: usize) -> Option<Vec<f64>> {
    let mut a = a.to_vec();
    let mut b = b.to_vec();
    for col in 0..n {
        let piv =
            (col..n).max_by(|&i, &j| a[i * n + col].abs().total_cmp(&a[j * n + col].abs()))?;
        if a[piv * n + col].abs() < 1e-300 {
            return None;
        }
        if piv != col {
            for k in 0..n {
                a.swap(col * n + k, piv * n + k);
            }
            for k in 0..m {
                b.swap(col * m + k, piv * m + k);
            }
        }
        let d = a[col * n + col];
        for r in col + 1..n {
            let f = a[r * n + col] / d;
            if f == 0.0 {
                continue;
            }
            for k in col..n {
                a[r * n + k] -= f * a[col * n + k];
            }
            for k in 0..m {
                b[r * m + k] -= f * b[col * m + k];
            }
        }
    }
    let mut x = vec![0.0; n * m];
    for r in (0..n).rev() {
        for k in 0..m {
            let mut s = b[r * m + k];
            for c in r + 1..n {
                s -= a[r * n + c] * x[c * m + k];
            }
            x[r * m + k] = s / a[r * n + r];
        }
    }
    Some(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(n: usize, seed: u64) -> Vec<f64> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn eigen_reconstructs_a_symmetric_matrix() {
        let n = 12;
        let r = lcg(n * 5, 3);
        // a = r r^T: symmetric PSD with rank 5.
        let mut a = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                a[i * n + j] = (0..5).map(|k| r[i * 5 + k] * r[j * 5 + k]).sum();
            }
        }
        let (vals, vecs) = sym_eigen(&a, n).unwrap();
        assert!(sym_eigen(&a, n + 1).is_none());
        assert!(vals.windows(2).all(|w| w[0] >= w[1]), "{vals:?}");
        assert!(vals[5..].iter().all(|v| v.abs() < 1e-9), "{vals:?}");
        for i in 0..n {
            for j in 0..n {
                let rec: f64 = (0..n)
                    .map(|k| vecs[i * n + k] * vals[k] * vecs[j * n + k])
                    .sum();
                assert!((rec - a[i * n + j]).abs() < 1e-9);
                let dot: f64 = (0..n).map(|k| vecs[k * n + i] * vecs[k * n + j]).sum();
                assert!((dot - if i == j { 1.0 } else { 0.0 }).abs() < 1e-9);
            }
        }
    }

    #[test]
    fn solve_matches_the_product() {
        let n = 6;
        let mut a = lcg(n * n, 5);
        for i in 0..n {
            a[i * n + i] += 3.0;
        }
        let x = lcg(n * 2, 9);
        let mut b = vec![0.0; n * 2];
        for i in 0..n {
            for k in 0..2 {
                b[i * 2 + k] = (0..n).map(|j| a[i * n + j] * x[j * 2 + k]).sum();
            }
        }
        let got = solve(&a, &b, n, 2).unwrap();
        for (g, w) in got.iter().zip(&x) {
            assert!((g - w).abs() < 1e-10);
        }
        assert!(solve(&[1.0, 2.0, 2.0, 4.0], &[1.0, 1.0], 2, 1).is_none());
    }
}
