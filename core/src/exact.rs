//! Exact decimal sums for the metric means. Cells are decimals (two in the paper's tables);
//! summing their binary floats drifts (45.42 + ... + 91.19 over 6 gives 49.574999..., which
//! prints 49.57 where the paper prints 49.58), so sums are kept as scaled integers and only the
//! final mean becomes the `f64` nearest to the exact value, whose shortest representation then
//! rounds half away from zero as SCORING.md asks.

/// Digits kept after the decimal point of a mean that does not terminate.
const MEAN_DIGITS: usize = 24;

/// `x` as the decimal its shortest representation prints: `(mantissa, scale)` with
/// `x = mantissa * 10^-scale`. `None` for non-finite values or ones far outside cell ranges.
fn decimal(x: f64) -> Option<(i128, u32)> {
    if !x.is_finite() {
        return None;
    }
    let sci = format!("{x:e}");
    let (mantissa, exp) = sci.split_once('e')?;
    let exp: i64 = exp.parse().ok()?;
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let mut m: i128 = digits.parse().ok()?;
    if x < 0.0 {
        m = -m;
    }
    let pow = exp - (digits.len() as i64 - 1);
    if pow >= 0 {
        let p = u32::try_from(pow).ok().filter(|p| *p <= 20)?;
        Some((m.checked_mul(10i128.checked_pow(p)?)?, 0))
    } else {
        let s = u32::try_from(-pow).ok().filter(|s| *s <= 30)?;
        Some((m, s))
    }
}

/// A running sum, exact while every term is a modest decimal, plain `f64` otherwise.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DecimalSum {
    exact: Option<(i128, u32)>,
    float: f64,
}

impl Default for DecimalSum {
    fn default() -> Self {
        DecimalSum {
            exact: Some((0, 0)),
            float: 0.0,
        }
    }
}

impl DecimalSum {
    pub(crate) fn add(&mut self, x: f64) {
        self.float += x;
        self.exact = self.exact.zip(decimal(x)).and_then(|(a, b)| add(a, b));
    }

    pub(crate) fn sub(&mut self, x: f64) {
        self.add(-x);
    }

    /// The sum over `n`, as the `f64` nearest the exact quotient.
    pub(crate) fn mean(&self, n: usize) -> f64 {
        let exact = self.exact.and_then(|(m, s)| {
            let den = i128::try_from(n)
                .ok()?
                .checked_mul(10i128.checked_pow(s)?)?;
            quotient(m, den)
        });
        exact.unwrap_or(self.float / n as f64)
    }
}

fn add((ma, sa): (i128, u32), (mb, sb): (i128, u32)) -> Option<(i128, u32)> {
    let s = sa.max(sb);
    let a = ma.checked_mul(10i128.checked_pow(s - sa)?)?;
    let b = mb.checked_mul(10i128.checked_pow(s - sb)?)?;
    Some((a.checked_add(b)?, s))
}

/// `num / den` (`den > 0`) by long division to [`MEAN_DIGITS`] decimals, parsed into the
/// correctly rounded `f64`.
fn quotient(num: i128, den: i128) -> Option<f64> {
    if den <= 0 {
        return None;
    }
    let neg = num < 0;
    let num = num.checked_abs()?;
    let mut text = format!("{}{}.", if neg { "-" } else { "" }, num / den);
    let mut rem = num % den;
    for _ in 0..MEAN_DIGITS {
        rem = rem.checked_mul(10)?;
        text.push(char::from(b'0' + u8::try_from(rem / den).ok()?));
        rem %= den;
    }
    text.parse().ok()
}

/// Mean of the values with an exact decimal sum.
pub(crate) fn mean(values: &[f64]) -> Option<f64> {
    let mut s = DecimalSum::default();
    values.iter().for_each(|v| s.add(*v));
    (!values.is_empty()).then(|| s.mean(values.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_published_mage_row_averages_to_its_exact_decimal() {
        let row = [45.42, 68.02, 31.44, 27.28, 34.10, 91.19];
        let float = row.iter().sum::<f64>() / 6.0;
        assert_ne!(float, 49.575, "the float sum drifts; this test needs it to");
        assert_eq!(mean(&row), Some(49.575));
    }

    #[test]
    fn decimals_come_from_the_shortest_representation() {
        assert_eq!(decimal(2.675), Some((2675, 3)));
        assert_eq!(decimal(-0.1), Some((-1, 1)));
        assert_eq!(decimal(100.0), Some((100, 0)));
        assert_eq!(decimal(f64::NAN), None);
    }

    #[test]
    fn non_terminating_and_huge_means_stay_close() {
        assert_eq!(mean(&[1.0, 0.0, 0.0]), Some(1.0 / 3.0));
        let huge = [1e300, 1e300];
        assert_eq!(mean(&huge), Some(1e300));
        assert_eq!(mean(&[]), None);
    }
}
