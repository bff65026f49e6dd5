//! A branch-free `exp` for the fused loops: glibc's `expf` is a call per element, which
//! keeps a loop from vectorising (it was 6% of a mini step); this form (Cephes' `expf`
//! polynomial after a Cody-Waite range reduction) compiles to SIMD and stays within about
//! 2 ulp over the clamped range.

/// `e^x` for x in [-87.3, 88.7]; inputs outside are clamped (so a masked logit of -1e9 gives
/// about 1e-38, not 0, which no sum of probabilities can tell apart).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.336_54, 88.722_83);
    let t = x * LOG2E;
    // Round to nearest through a truncating conversion (SSE2 has no vector round).
    let n = (t + 0.5f32.copysign(t)) as i32;
    let nf = n as f32;
    let r = x - nf * LN2_HI - nf * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.000_000_1e-1_f64 as f32;
    let y = p * r * r + r + 1.0;
    // 2^n by the exponent bits; n is in [-126, 128] after the clamp, so split it in two
    // factors to keep both normal.
    let h = n >> 1;
    let two = |k: i32| f32::from_bits(((k + 127) as u32) << 23);
    y * two(h) * two(n - h)
}

/// `1 / (1 + e^-x)`.
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_a_few_ulp_of_the_library_exp() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, b) = (exp(x), x.exp());
            worst = worst.max(((a - b) / b).abs());
            x += 0.0137;
        }
        assert!(worst < 5e-7, "relative error {worst}");
        assert!(exp(-1e9) < 1e-37 && exp(-1e9) >= 0.0);
        assert!(exp(1e9).is_finite());
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn sigmoid_saturates_without_overflow() {
        assert!((sigmoid(0.0) - 0.5).abs() < 1e-7);
        assert!(sigmoid(-1e4) >= 0.0 && sigmoid(-1e4) < 1e-30);
        assert!((sigmoid(1e4) - 1.0).abs() < 1e-7);
    }
}

/// Eight independent accumulators: a strict-order f32 reduction does not vectorise, eight
/// lanes summed at the end do (and round no worse).
const LANES: usize = 8;

/// `sum(a * b)`.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; LANES];
    let split = n - n % LANES;
    for (ca, cb) in a[..split]
        .chunks_exact(LANES)
        .zip(b[..split].chunks_exact(LANES))
    {
        for l in 0..LANES {
            acc[l] += ca[l] * cb[l];
        }
    }
    let tail: f32 = a[split..].iter().zip(&b[split..]).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// `sum(a)`.
#[inline]
pub fn sum(a: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let split = a.len() - a.len() % LANES;
    for c in a[..split].chunks_exact(LANES) {
        for l in 0..LANES {
            acc[l] += c[l];
        }
    }
    acc.iter().sum::<f32>() + a[split..].iter().sum::<f32>()
}

/// `max(a)` (-inf for an empty slice).
#[inline]
pub fn max(a: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let split = a.len() - a.len() % LANES;
    for c in a[..split].chunks_exact(LANES) {
        for l in 0..LANES {
            acc[l] = acc[l].max(c[l]);
        }
    }
    let m = acc.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    a[split..].iter().fold(m, |m, &x| m.max(x))
}

/// `y += alpha * x`.
#[inline]
pub fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
    for (o, v) in y.iter_mut().zip(x) {
        *o += alpha * v;
    }
}

/// Softmax of one row in place.
#[inline]
pub fn softmax_row(row: &mut [f32]) {
    let mx = max(row);
    for x in row.iter_mut() {
        *x = exp(*x - mx);
    }
    let inv = 1.0 / sum(row);
    for x in row.iter_mut() {
        *x *= inv;
    }
}

#[cfg(test)]
mod reduction_tests {
    use super::*;

    #[test]
    fn reductions_match_the_plain_loops() {
        let a: Vec<f32> = (0..37)
            .map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0)
            .collect();
        let b: Vec<f32> = (0..37)
            .map(|i| ((i * 104729) % 97) as f32 / 48.0 - 1.0)
            .collect();
        let plain: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - plain).abs() < 1e-5);
        assert!((sum(&a) - a.iter().sum::<f32>()).abs() < 1e-5);
        assert_eq!(max(&a), a.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)));
        let mut r = a.clone();
        softmax_row(&mut r);
        assert!((r.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }
}
