//! PEMA, MAGE's parameter-wise EMA (Continual-NExT, arXiv 2602.18055), for one LoRA matrix
//! `theta` (m x n) with anchor `theta*`, gradient `g` and Fisher estimate `H`:
//! `Delta = theta - theta*`, `C = (Delta^T H + lambda I_n)^-1`, `alpha = (g + 1) C`,
//! `theta* <- alpha * theta* + (1 - alpha) * theta` (elementwise).
//!
//! `Delta^T H` has rank <= m, so for a LoRA A matrix (m = rank, n = d_in) the Woodbury form
//! `alpha = (1/lambda) [G1 - (G1 Delta^T) (lambda I_m + H Delta^T)^-1 H]`, `G1 = g + 1`, needs
//! only m x m solves instead of an n x n inverse. Both forms are here, in f64 (alpha is of
//! order 1/lambda and the n x n system is badly conditioned in f32); [`pema_alpha`] picks the
//! cheaper one.

use crate::linalg::solve;
use serde::{Deserialize, Serialize};

/// What to do with alpha elements outside [0, 1].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlphaPolicy {
    /// The official code: alpha as computed; the EMA falls back to `0.99 theta* + 0.01 theta`
    /// only when the solve fails, and the model takes theta* only where it is finite.
    Faithful,
    /// Every alpha element outside [0, 1] or not finite becomes 0.99.
    Clip,
}

/// A row-major m x n matrix in f64.
#[derive(Debug, Clone, PartialEq)]
pub struct Mat {
    pub m: usize,
    pub n: usize,
    pub v: Vec<f64>,
}

impl Mat {
    pub fn new(m: usize, n: usize, v: Vec<f64>) -> Self {
        debug_assert_eq!(v.len(), m * n);
        Mat { m, n, v }
    }
}

/// `alpha` by the dense n x n system (the reference).
pub fn pema_alpha_dense(theta: &Mat, star: &Mat, g: &Mat, h: &Mat, lambda: f64) -> Option<Mat> {
    let (m, n) = (theta.m, theta.n);
    let delta: Vec<f64> = theta.v.iter().zip(&star.v).map(|(a, b)| a - b).collect();
    // M = Delta^T H + lambda I (n x n); alpha = G1 M^-1, i.e. M^T alpha^T = G1^T.
    let mut mt = vec![0.0; n * n];
    for i in 0..m {
        for a in 0..n {
            let d = delta[i * n + a];
            if d == 0.0 {
                continue;
            }
            for b in 0..n {
                // M[a][b] += d * H[i][b], stored transposed: MT[b][a].
                mt[b * n + a] += d * h.v[i * n + b];
            }
        }
    }
    for a in 0..n {
        mt[a * n + a] += lambda;
    }
    let mut g1t = vec![0.0; n * m];
    for i in 0..m {
        for k in 0..n {
            g1t[k * m + i] = g.v[i * n + k] + 1.0;
        }
    }
    let at = solve(&mt, &g1t, n, m)?;
    let mut alpha = vec![0.0; m * n];
    for k in 0..n {
        for i in 0..m {
            alpha[i * n + k] = at[k * m + i];
        }
    }
    Some(Mat::new(m, n, alpha))
}

/// `alpha` by the Woodbury identity (m x m solves).
pub fn pema_alpha_woodbury(theta: &Mat, star: &Mat, g: &Mat, h: &Mat, lambda: f64) -> Option<Mat> {
    let (m, n) = (theta.m, theta.n);
    let delta: Vec<f64> = theta.v.iter().zip(&star.v).map(|(a, b)| a - b).collect();
    let g1: Vec<f64> = g.v.iter().map(|x| x + 1.0).collect();
    let dot = |x: &[f64], i: usize, y: &[f64], j: usize| -> f64 {
        x[i * n..(i + 1) * n]
            .iter()
            .zip(&y[j * n..(j + 1) * n])
            .map(|(a, b)| a * b)
            .sum()
    };
    // K = lambda I + H Delta^T and P = G1 Delta^T (both m x m).
    let mut kt = vec![0.0; m * m];
    let mut pt = vec![0.0; m * m];
    for i in 0..m {
        for j in 0..m {
            kt[j * m + i] = dot(&h.v, i, &delta, j) + if i == j { lambda } else { 0.0 };
            pt[j * m + i] = dot(&g1, i, &delta, j);
        }
    }
    // Q = P K^-1, i.e. K^T Q^T = P^T.
    let qt = solve(&kt, &pt, m, m)?;
    let mut alpha = g1;
    for i in 0..m {
        for j in 0..m {
            let q = qt[j * m + i];
            if q == 0.0 {
                continue;
            }
            for k in 0..n {
                alpha[i * n + k] -= q * h.v[j * n + k];
            }
        }
    }
    alpha.iter_mut().for_each(|a| *a /= lambda);
    Some(Mat::new(m, n, alpha))
}

/// `alpha` by the cheaper form for the shape (Woodbury when m < n).
pub fn pema_alpha(theta: &Mat, star: &Mat, g: &Mat, h: &Mat, lambda: f64) -> Option<Mat> {
    if theta.m < theta.n {
        pema_alpha_woodbury(theta, star, g, h, lambda)
    } else {
        pema_alpha_dense(theta, star, g, h, lambda)
    }
}

/// One PEMA step: the new theta* and how many elements fell back to the 0.99 EMA.
pub fn pema_update(
    theta: &Mat,
    star: &Mat,
    g: &Mat,
    h: &Mat,
    lambda: f64,
    policy: AlphaPolicy,
) -> (Mat, usize) {
    let fallback = 0.99;
    let (alpha, mut fell) = match pema_alpha(theta, star, g, h, lambda) {
        Some(a) => (a.v, 0),
        // The official code's exception path: the whole matrix takes the plain EMA.
        None => (vec![fallback; theta.v.len()], theta.v.len()),
    };
    let mut out = Vec::with_capacity(theta.v.len());
    for ((a, s), t) in alpha.iter().zip(&star.v).zip(&theta.v) {
        let a = match policy {
            AlphaPolicy::Clip if !(a.is_finite() && (0.0..=1.0).contains(a)) => {
                fell += 1;
                fallback
            }
            _ => *a,
        };
        out.push(a * s + (1.0 - a) * t);
    }
    (Mat::new(theta.m, theta.n, out), fell)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand(m: usize, n: usize, seed: u64, scale: f64) -> Mat {
        let mut s = seed;
        let v = (0..m * n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0) * scale
            })
            .collect();
        Mat::new(m, n, v)
    }

    #[test]
    fn woodbury_equals_the_dense_formula() {
        for (m, n, seed) in [(2, 16, 1), (3, 7, 2), (4, 40, 3), (8, 24, 4)] {
            let theta = rand(m, n, seed, 0.5);
            let star = rand(m, n, seed + 10, 0.5);
            let g = rand(m, n, seed + 20, 0.1);
            let h = Mat::new(m, n, g.v.iter().map(|x| x * x).collect());
            for lambda in [1e-5, 1e-2, 1.0] {
                let d = pema_alpha_dense(&theta, &star, &g, &h, lambda).unwrap();
                let w = pema_alpha_woodbury(&theta, &star, &g, &h, lambda).unwrap();
                let scale = d.v.iter().fold(0f64, |a, x| a.max(x.abs()));
                let diff =
                    d.v.iter()
                        .zip(&w.v)
                        .fold(0f64, |a, (x, y)| a.max((x - y).abs()));
                assert!(
                    diff / scale < 1e-8,
                    "m={m} n={n} lambda={lambda}: rel {}",
                    diff / scale
                );
            }
        }
    }

    #[test]
    fn zero_delta_gives_g_plus_one_over_lambda_and_clip_falls_back() {
        // Delta = 0: C = I / lambda, alpha = (g + 1) / lambda, far outside [0, 1].
        let theta = rand(2, 5, 7, 1.0);
        let g = rand(2, 5, 8, 0.1);
        let h = Mat::new(2, 5, g.v.iter().map(|x| x * x).collect());
        let a = pema_alpha(&theta, &theta, &g, &h, 1e-5).unwrap();
        for (x, gi) in a.v.iter().zip(&g.v) {
            assert!((x - (gi + 1.0) / 1e-5).abs() < 1e-3 * x.abs());
        }
        let star = rand(2, 5, 9, 1.0);
        let alpha = pema_alpha(&theta, &star, &g, &h, 1e-5).unwrap();
        let (clipped, fell) = pema_update(&theta, &star, &g, &h, 1e-5, AlphaPolicy::Clip);
        let outside = alpha.v.iter().filter(|a| !(0.0..=1.0).contains(*a)).count();
        assert!(outside > 0 && fell == outside);
        for (((c, s), t), a) in clipped.v.iter().zip(&star.v).zip(&theta.v).zip(&alpha.v) {
            let want_a = if (0.0..=1.0).contains(a) { *a } else { 0.99 };
            assert!((c - (want_a * s + (1.0 - want_a) * t)).abs() < 1e-12);
        }
        // Large lambda: alpha = G1 / lambda is inside [0, 1] and nothing falls back.
        let (_, fell) = pema_update(&theta, &star, &g, &h, 10.0, AlphaPolicy::Clip);
        assert_eq!(fell, 0);
        let (faithful, fell) = pema_update(&theta, &star, &g, &h, 1e-5, AlphaPolicy::Faithful);
        assert_eq!(fell, 0);
        assert!(
            faithful.v.iter().any(|x| x.abs() > 10.0),
            "faithful theta* runs away"
        );
    }
}
