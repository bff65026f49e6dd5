//! Pure metrics over an [`AccuracyMatrix`] (formulas: `shared/SCORING.md`, "Matrix metrics").
//!
//! `T` is the number of stage rows present, and only the first `T` columns are read, so a partial
//! matrix after stage `k` gives the metrics "so far" (cells of tasks not yet trained, e.g.
//! zero-shot evaluations, are ignored). Every metric is `Option<f64>`: `None` when it cannot be
//! computed (a needed cell is missing, too few stages, or a diagonal-based metric of a joint
//! matrix), never 0 for "not applicable".

use crate::exact::DecimalSum;
use crate::matrix::AccuracyMatrix;
use crate::task::{Modality, TaskId};
use serde::{Deserialize, Serialize};

/// Mean of the values (summed exactly as decimals, `crate::exact`), `None` if any is missing
/// or there are none.
fn mean_of<I: IntoIterator<Item = Option<f64>>>(cells: I) -> Option<f64> {
    mean_of_diffs(cells.into_iter().map(|c| c.map(|v| (v, 0.0))))
}

/// Mean of `a - b` over the pairs, the differences taken exactly too.
fn mean_of_diffs<I: IntoIterator<Item = Option<(f64, f64)>>>(pairs: I) -> Option<f64> {
    let mut sum = DecimalSum::default();
    let mut n = 0usize;
    for p in pairs {
        let (a, b) = p?;
        sum.add(a);
        sum.sub(b);
        n += 1;
    }
    (n > 0).then(|| sum.mean(n))
}

/// Mean of `a[j][0..=j]`: the Avg.ACC of the matrix as it stood after stage `j`.
fn seen_mean(m: &AccuracyMatrix, j: usize) -> Option<f64> {
    mean_of((0..=j).map(|i| m.get(j, i)))
}

/// Avg.ACC (= MCITlib's MFN): mean of the last row over the first `T` columns; for a joint
/// matrix, mean of its one row over all tasks.
pub fn avg_acc(m: &AccuracyMatrix) -> Option<f64> {
    if m.is_joint() {
        return mean_of((0..m.tasks().len()).map(|i| m.get(0, i)));
    }
    let t = m.num_stages();
    t.checked_sub(1).and_then(|last| seen_mean(m, last))
}

/// New.ACC (= MFT): mean of the diagonal `a[i][i]`, `i < T`. `None` for joint matrices.
pub fn new_acc(m: &AccuracyMatrix) -> Option<f64> {
    if m.is_joint() {
        return None;
    }
    mean_of((0..m.num_stages()).map(|i| m.get(i, i)))
}

/// The stages `T` for forgetting-type metrics: at least 2, not joint.
fn forgetting_stages(m: &AccuracyMatrix) -> Option<usize> {
    let t = m.num_stages();
    (!m.is_joint() && t >= 2).then_some(t)
}

/// Forgetting, the paper's definition: `(1/(T-1)) * sum_{i<T-1} (a[i][i] - a[T-1][i])`, the drop
/// from the accuracy right after learning each earlier task.
pub fn forgetting(m: &AccuracyMatrix) -> Option<f64> {
    let t = forgetting_stages(m)?;
    mean_of_diffs((0..t - 1).map(|i| Some((m.get(i, i)?, m.get(t - 1, i)?))))
}

/// Chaudhry et al.'s forgetting: for each `i < T-1`, the best accuracy over stages `i..T-1`
/// (learned, not yet final) minus the final accuracy, averaged. Every cell in the range is needed.
pub fn max_forgetting(m: &AccuracyMatrix) -> Option<f64> {
    let t = forgetting_stages(m)?;
    mean_of_diffs((0..t - 1).map(|i| {
        let best = (i..t - 1)
            .map(|j| m.get(j, i))
            .try_fold(f64::NEG_INFINITY, |acc, c| c.map(|v| acc.max(v)))?;
        Some((best, m.get(t - 1, i)?))
    }))
}

/// Backward transfer, `-forgetting` (positive when later training helped earlier tasks).
pub fn bwt(m: &AccuracyMatrix) -> Option<f64> {
    forgetting(m).map(|f| -f)
}

/// MCITlib's MFT (mean final-tuning accuracy), which is New.ACC.
pub fn mft(m: &AccuracyMatrix) -> Option<f64> {
    new_acc(m)
}

/// MCITlib's MFN (mean final accuracy), which is Avg.ACC.
pub fn mfn(m: &AccuracyMatrix) -> Option<f64> {
    avg_acc(m)
}

/// MAA: mean over stages `j < T` of `mean(a[j][0..=j])`. `None` for joint matrices.
pub fn maa(m: &AccuracyMatrix) -> Option<f64> {
    if m.is_joint() {
        return None;
    }
    mean_of(stage_avg_acc(m))
}

/// The Avg.ACC curve: entry `j` is `mean(a[j][0..=j])`. A joint matrix has one stage, whose
/// entry is its [`avg_acc`] over all tasks.
pub fn stage_avg_acc(m: &AccuracyMatrix) -> Vec<Option<f64>> {
    if m.is_joint() {
        return vec![avg_acc(m)];
    }
    (0..m.num_stages()).map(|j| seen_mean(m, j)).collect()
}

/// Mean of the final row over the tasks (among the first `T`; all for joint) whose output is
/// `modality` (the paper's Table 5 text/image split). `None` if there is no such task yet.
pub fn modality_avg(m: &AccuracyMatrix, modality: Modality) -> Option<f64> {
    let (row, cols) = if m.is_joint() {
        (0, m.tasks().len())
    } else {
        let t = m.num_stages();
        (t.checked_sub(1)?, t)
    };
    mean_of(
        m.tasks()
            .iter()
            .take(cols)
            .enumerate()
            .filter(|(_, task)| task.output() == modality)
            .map(|(i, _)| m.get(row, i)),
    )
}

/// Every matrix metric of one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    pub avg_acc: Option<f64>,
    pub forgetting: Option<f64>,
    pub new_acc: Option<f64>,
    pub max_forgetting: Option<f64>,
    pub bwt: Option<f64>,
    pub mft: Option<f64>,
    pub mfn: Option<f64>,
    pub maa: Option<f64>,
    pub stage_avg_acc: Vec<Option<f64>>,
    pub text_avg: Option<f64>,
    pub image_avg: Option<f64>,
}

impl Metrics {
    /// Computes every metric of `m`.
    pub fn of(m: &AccuracyMatrix) -> Self {
        Metrics {
            avg_acc: avg_acc(m),
            forgetting: forgetting(m),
            new_acc: new_acc(m),
            max_forgetting: max_forgetting(m),
            bwt: bwt(m),
            mft: mft(m),
            mfn: mfn(m),
            maa: maa(m),
            stage_avg_acc: stage_avg_acc(m),
            text_avg: modality_avg(m, Modality::Text),
            image_avg: modality_avg(m, Modality::Image),
        }
    }

    /// The same metrics with [`round2`] applied to every value, for reports.
    pub fn rounded(&self) -> Self {
        let r = |v: Option<f64>| v.map(round2);
        Metrics {
            avg_acc: r(self.avg_acc),
            forgetting: r(self.forgetting),
            new_acc: r(self.new_acc),
            max_forgetting: r(self.max_forgetting),
            bwt: r(self.bwt),
            mft: r(self.mft),
            mfn: r(self.mfn),
            maa: r(self.maa),
            stage_avg_acc: self.stage_avg_acc.iter().map(|&v| r(v)).collect(),
            text_avg: r(self.text_avg),
            image_avg: r(self.image_avg),
        }
    }
}

/// The kind of a wrong answer on a text task (`shared/SCORING.md`, error-type diagnostics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ErrorType {
    /// Instruction unfollowing: the output is not of the form asked for.
    Iuf,
    /// Hallucination: well formed but wrong.
    Hal,
    /// Anything else.
    Oth,
}

/// Per-cell error-type rates, in percent of the cell's samples, shaped like the accuracy matrix
/// (`tasks` are the columns, one row per stage). Image-output tasks have no rates: `None`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ErrorTypeRates {
    pub tasks: Vec<TaskId>,
    pub iuf: Vec<Vec<Option<f64>>>,
    pub hal: Vec<Vec<Option<f64>>>,
    pub oth: Vec<Vec<Option<f64>>>,
}

impl ErrorTypeRates {
    /// The rate matrix of one error type.
    pub fn of(&self, kind: ErrorType) -> &[Vec<Option<f64>>] {
        match kind {
            ErrorType::Iuf => &self.iuf,
            ErrorType::Hal => &self.hal,
            ErrorType::Oth => &self.oth,
        }
    }
}

/// `Avg.X = (1/(T-1)) * sum_{i<T-1} (X[T-1][i] - X[i][i])`, `T` = stage rows of `X`.
///
/// Missing cells, decided: the divisor is always `T-1` (the paper's formula, over all earlier
/// tasks). A column whose task outputs images and whose two cells are both `None` adds 0: there
/// is no text answer to classify. Any other missing cell (a text task not evaluated, or only one
/// of the two cells of an image task) makes the result `None`. Hence, for binary-scored tasks
/// where every wrong answer has one type, `Avg.IUF + Avg.HAL + Avg.OTH` equals the paper's
/// Forgetting sum over the columns that have rates, divided by `T-1`: the full Forgetting when
/// every column has rates, and Forgetting minus the image tasks' share otherwise.
pub fn avg_error_type(rates: &ErrorTypeRates, kind: ErrorType) -> Option<f64> {
    let x = rates.of(kind);
    let t = x.len();
    if t < 2 || t > rates.tasks.len() {
        return None;
    }
    let cell = |j: usize, i: usize| x.get(j).and_then(|r| r.get(i)).copied().flatten();
    let mut sum = DecimalSum::default();
    for (i, task) in rates.tasks.iter().enumerate().take(t - 1) {
        match (cell(t - 1, i), cell(i, i)) {
            (Some(last), Some(learned)) => {
                sum.add(last);
                sum.sub(learned);
            }
            (None, None) if task.output() == Modality::Image => {}
            _ => return None,
        }
    }
    Some(sum.mean(t - 1))
}

/// Rounds to two decimals, half away from zero on the decimal value `x` prints as (its shortest
/// round-trip representation), so 2.675 (stored as 2.67499999...) gives 2.68. Non-finite
/// values are returned unchanged.
pub fn round2(x: f64) -> f64 {
    if !x.is_finite() {
        return x;
    }
    fmt2(x).parse().unwrap_or(x)
}

/// Formats with exactly two decimals, rounding like [`round2`]; never prints `-0.00`.
pub fn fmt2(x: f64) -> String {
    if !x.is_finite() {
        return x.to_string();
    }
    let hundredths = hundredths_of(x.abs());
    let padded = format!("{hundredths:0>3}");
    let (int, frac) = padded.split_at(padded.len() - 2);
    let zero = hundredths.bytes().all(|b| b == b'0');
    let sign = if x < 0.0 && !zero { "-" } else { "" };
    format!("{sign}{int}.{frac}")
}

/// `round(|x| * 100)` as a decimal digit string, half away from zero, from the shortest
/// representation of `x` (`{:e}` prints it as `d.ddd…e±N`).
fn hundredths_of(x: f64) -> String {
    let sci = format!("{x:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i64 = exp.parse().unwrap_or(0);
    let digits: Vec<u8> = mantissa.bytes().filter(u8::is_ascii_digit).collect();
    let len = digits.len() as i64;
    // x * 100 = D * 10^shift, D = the digit string as an integer.
    let shift = exp - (len - 1) + 2;
    if shift >= 0 {
        let s: String = digits.iter().map(|&d| d as char).collect();
        let s = s + &"0".repeat(shift as usize);
        let t = s.trim_start_matches('0');
        return if t.is_empty() { "0".into() } else { t.into() };
    }
    // Some digits fall below the hundredths; then |x| < 1e14 (at most 17 significant digits),
    // so the kept part fits a u64 easily.
    let Ok(kept) = usize::try_from(len + shift) else {
        return "0".into();
    };
    let head = digits.get(..kept).unwrap_or(&[]);
    let h = head
        .iter()
        .fold(0u64, |acc, &d| acc * 10 + u64::from(d - b'0'));
    let up = digits.get(kept).is_some_and(|&d| d >= b'5');
    (h + u64::from(up)).to_string()
}

/// Mean and sample standard deviation (divisor `n-1`) across seeds; the std of a single value
/// is 0 (nothing to spread). `None` for no values or a non-finite one.
pub fn mean_std(values: &[f64]) -> Option<(f64, f64)> {
    if values.is_empty() || values.iter().any(|v| !v.is_finite()) {
        return None;
    }
    let n = values.len() as f64;
    let mean = crate::exact::mean(values)?;
    if values.len() == 1 {
        return Some((mean, 0.0));
    }
    let ss: f64 = values.iter().map(|v| (v - mean) * (v - mean)).sum();
    Some((mean, (ss / (n - 1.0)).sqrt()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use TaskId::*;

    const N: Option<f64> = None;

    #[track_caller]
    fn assert_close(got: Option<f64>, want: f64) {
        assert!(
            got.is_some_and(|g| (g - want).abs() < 1e-9),
            "got {got:?}, want {want}"
        );
    }

    fn matrix(tasks: &[TaskId], rows: &[&[Option<f64>]]) -> AccuracyMatrix {
        let mut m = AccuracyMatrix::sequential(tasks.to_vec()).unwrap();
        for r in rows {
            m.push_row(r.to_vec()).unwrap();
        }
        m
    }

    /// vqav2, imagenet (text) and flickr30k (image):
    /// ```text
    ///        vqav2 imagenet flickr30k
    /// after0    80        -         -
    /// after1    85       90         -
    /// after2    60       85        50
    /// ```
    fn m3() -> AccuracyMatrix {
        let rows: [&[Option<f64>]; 3] = [
            &[Some(80.0), N, N],
            &[Some(85.0), Some(90.0), N],
            &[Some(60.0), Some(85.0), Some(50.0)],
        ];
        matrix(&[Vqav2, Imagenet, Flickr30k], &rows)
    }

    /// Default order (vqav2 imagenet flickr30k* ocrvqa refcoco hqedit*, * = image output).
    /// a[0][1] = 10 is a zero-shot cell of a task not yet trained: never read.
    /// a[3][0] = 65 rises above a[0][0] = 60, so max_forgetting differs from forgetting.
    fn m6() -> AccuracyMatrix {
        let s = Some;
        let rows: [&[Option<f64>]; 6] = [
            &[s(60.0), s(10.0), N, N, N, N],
            &[s(55.0), s(70.0), N, N, N, N],
            &[s(50.0), s(65.0), s(40.0), N, N, N],
            &[s(65.0), s(60.0), s(35.0), s(80.0), N, N],
            &[s(45.0), s(58.0), s(30.0), s(70.0), s(90.0), N],
            &[s(40.0), s(50.0), s(25.0), s(60.0), s(85.0), s(30.0)],
        ];
        matrix(&TaskId::ALL, &rows)
    }

    #[test]
    fn three_by_three_by_hand() {
        let m = Metrics::of(&m3());
        assert_close(m.avg_acc, 65.0); // (60 + 85 + 50) / 3
        assert_close(m.new_acc, 220.0 / 3.0); // (80 + 90 + 50) / 3 = 73.33..
        assert_close(m.forgetting, 12.5); // ((80 - 60) + (90 - 85)) / 2
        assert_close(m.max_forgetting, 15.0); // ((max(80,85) - 60) + (90 - 85)) / 2
        assert_close(m.bwt, -12.5);
        assert_close(m.mft, 220.0 / 3.0);
        assert_close(m.mfn, 65.0);
        // Stage curve: 80, (85 + 90) / 2 = 87.5, 65; MAA = 232.5 / 3 = 77.5.
        assert_eq!(m.stage_avg_acc, vec![Some(80.0), Some(87.5), Some(65.0)]);
        assert_close(m.maa, 77.5);
        assert_close(m.text_avg, 72.5); // (60 + 85) / 2
        assert_close(m.image_avg, 50.0); // flickr30k
        assert_eq!(m.rounded().new_acc, Some(73.33));
    }

    /// MAGE's final row in the paper (default order): Avg.ACC 49.575 is printed 49.58.
    #[test]
    fn published_means_round_half_away_on_the_decimal_value() {
        let s = Some;
        let mut rows: Vec<Vec<Option<f64>>> = (0..5)
            .map(|j| (0..6).map(|i| (i <= j).then_some(50.0)).collect())
            .collect();
        rows.push(vec![
            s(45.42),
            s(68.02),
            s(31.44),
            s(27.28),
            s(34.10),
            s(91.19),
        ]);
        let refs: Vec<&[Option<f64>]> = rows.iter().map(Vec::as_slice).collect();
        let m = Metrics::of(&matrix(&TaskId::ALL, &refs));
        assert_eq!(m.avg_acc, Some(49.575));
        assert_eq!(m.rounded().avg_acc, Some(49.58));
        assert_eq!(fmt2(m.avg_acc.unwrap()), "49.58");
        // Forgetting over the same cells: (5*50 - (45.42+68.02+31.44+27.28+34.10)) / 5 = 8.748.
        assert_eq!(m.forgetting, Some(8.748));
        assert_eq!(
            mean_std(&[45.42, 68.02, 31.44, 27.28, 34.10, 91.19])
                .unwrap()
                .0,
            49.575
        );
    }

    #[test]
    fn six_by_six_by_hand() {
        let m = Metrics::of(&m6());
        assert_close(m.avg_acc, 290.0 / 6.0); // 40+50+25+60+85+30 = 290 -> 48.33
        assert_close(m.new_acc, 370.0 / 6.0); // 60+70+40+80+90+30 = 370 -> 61.67
        assert_close(m.forgetting, 16.0); // (20 + 20 + 15 + 20 + 5) / 5
        assert_close(m.max_forgetting, 17.0); // (65-40=25, 20, 15, 20, 5) / 5 = 85 / 5
        assert_close(m.bwt, -16.0);
        // Stage curve: 60; 125/2 = 62.5; 155/3; 240/4 = 60; 293/5 = 58.6; 290/6.
        let curve = [60.0, 62.5, 155.0 / 3.0, 60.0, 58.6, 290.0 / 6.0];
        assert_eq!(m.stage_avg_acc.len(), 6);
        for (got, want) in m.stage_avg_acc.iter().zip(curve) {
            assert_close(*got, want);
        }
        // 155/3 + 290/6 = 100, so MAA = (60 + 62.5 + 100 + 60 + 58.6) / 6 = 341.1 / 6 = 56.85.
        assert_close(m.maa, 56.85);
        assert_close(m.text_avg, 58.75); // (40 + 50 + 60 + 85) / 4
        assert_close(m.image_avg, 27.5); // (25 + 30) / 2
        let r = m.rounded();
        assert_eq!(
            (r.avg_acc, r.new_acc, r.maa),
            (Some(48.33), Some(61.67), Some(56.85))
        );
        assert_eq!(r.stage_avg_acc[2], Some(51.67));
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<Metrics>(&json).unwrap(), r);
    }

    #[test]
    fn partial_matrix_gives_metrics_so_far() {
        let full = m3();
        let m = matrix(full.tasks(), &[&full.rows()[0], &full.rows()[1]]);
        let got = Metrics::of(&m);
        assert_close(got.avg_acc, 87.5); // (85 + 90) / 2
        assert_close(got.new_acc, 85.0); // (80 + 90) / 2
        assert_close(got.forgetting, -5.0); // (80 - 85) / 1: the task improved
        assert_close(got.max_forgetting, -5.0); // max(a[0][0]) - a[1][0]
        assert_close(got.bwt, 5.0);
        assert_close(got.maa, 83.75); // (80 + 87.5) / 2
        assert_close(got.text_avg, 87.5);
        assert_eq!(got.image_avg, None); // flickr30k not trained yet

        let one = matrix(full.tasks(), &[&full.rows()[0]]);
        assert_close(avg_acc(&one), 80.0);
        assert_eq!(
            (forgetting(&one), max_forgetting(&one), bwt(&one)),
            (None, None, None)
        );
        let none = AccuracyMatrix::sequential(vec![Vqav2]).unwrap();
        let empty = Metrics::of(&none);
        assert_eq!(
            (empty.avg_acc, empty.new_acc, empty.maa),
            (None, None, None)
        );
        assert!(empty.stage_avg_acc.is_empty());
    }

    #[test]
    fn joint_matrix_has_only_final_row_metrics() {
        let row = [70.0, 80.0, 60.0, 75.0, 85.0, 50.0].map(Some).to_vec();
        let j = AccuracyMatrix::joint(TaskId::ALL.to_vec(), row).unwrap();
        let m = Metrics::of(&j);
        assert_close(m.avg_acc, 70.0); // 420 / 6
        assert_close(m.mfn, 70.0);
        assert_close(m.text_avg, 77.5); // (70 + 80 + 75 + 85) / 4
        assert_close(m.image_avg, 55.0); // (60 + 50) / 2
        assert_eq!(m.stage_avg_acc, vec![Some(70.0)]);
        let diag = [m.new_acc, m.mft, m.forgetting, m.max_forgetting];
        assert_eq!((diag, m.bwt, m.maa), ([None; 4], None, None));
    }

    #[test]
    fn missing_cells_give_none_not_zero() {
        let s = Some;
        let rows: [&[Option<f64>]; 3] =
            [&[s(80.0), N, N], &[N, s(90.0), N], &[s(60.0), N, s(50.0)]];
        let m = Metrics::of(&matrix(&[Vqav2, Imagenet, Flickr30k], &rows));
        assert_eq!(m.avg_acc, None); // a[2][1] missing
        assert_close(m.new_acc, 220.0 / 3.0); // diagonal complete
        assert_eq!(m.forgetting, None);
        assert_eq!(m.max_forgetting, None); // a[1][0] missing too
        assert_eq!(m.maa, None);
        assert_eq!(m.stage_avg_acc, vec![Some(80.0), None, None]);
        assert_eq!(m.text_avg, None);
        assert_close(m.image_avg, 50.0);
        assert_eq!(m.rounded().avg_acc, None);
    }

    /// Rates with only the cells `avg_error_type` reads: the diagonal and the last row.
    fn rates(diag: [Option<f64>; 6], last: [Option<f64>; 6]) -> Vec<Vec<Option<f64>>> {
        let mut x = vec![vec![None; 6]; 6];
        for i in 0..6 {
            x[i][i] = diag[i];
            x[5][i] = last[i];
        }
        x
    }

    /// Error types for `m6()`, binary scoring: IUF + HAL + OTH = 100 - accuracy in every cell.
    /// Diagonal wrong = 40 30 60 20 10 70; last row wrong = 60 50 75 40 15 70.
    fn m6_rates(with_image_rates: bool) -> ErrorTypeRates {
        let m = m6();
        let keep = |i: usize| with_image_rates || TaskId::ALL[i].output() == Modality::Text;
        let pick = |v: [f64; 6]| std::array::from_fn(|i| keep(i).then_some(v[i]));
        let (iuf_d, iuf_l) = (
            [10.0, 5.0, 20.0, 2.0, 1.0, 30.0],
            [25.0, 15.0, 30.0, 12.0, 3.0, 30.0],
        );
        let (hal_d, hal_l) = (
            [28.0, 25.0, 40.0, 17.0, 9.0, 38.0],
            [33.0, 34.0, 45.0, 26.0, 12.0, 38.0],
        );
        // OTH takes the rest of the wrong answers: diag 2 0 0 1 0 2, last 2 1 0 2 0 2.
        let oth = |j: usize, i: usize, iuf: f64, hal: f64| 100.0 - m.get(j, i).unwrap() - iuf - hal;
        let oth_d = std::array::from_fn(|i| oth(i, i, iuf_d[i], hal_d[i]));
        let oth_l = std::array::from_fn(|i| oth(5, i, iuf_l[i], hal_l[i]));
        ErrorTypeRates {
            tasks: TaskId::ALL.to_vec(),
            iuf: rates(pick(iuf_d), pick(iuf_l)),
            hal: rates(pick(hal_d), pick(hal_l)),
            oth: rates(pick(oth_d), pick(oth_l)),
        }
    }

    #[test]
    fn error_types_decompose_forgetting_when_every_task_has_rates() {
        // Every column treated as a binary text task (all cells have rates).
        let r = m6_rates(true);
        let iuf = avg_error_type(&r, ErrorType::Iuf); // (15 + 10 + 10 + 10 + 2) / 5 = 9.4
        let hal = avg_error_type(&r, ErrorType::Hal); // (5 + 9 + 5 + 9 + 3) / 5 = 6.2
        let oth = avg_error_type(&r, ErrorType::Oth); // (0 + 1 + 0 + 1 + 0) / 5 = 0.4
        assert_close(iuf, 9.4);
        assert_close(hal, 6.2);
        assert_close(oth, 0.4);
        let sum = iuf.unwrap() + hal.unwrap() + oth.unwrap();
        assert_close(Some(sum), 16.0);
        assert_close(forgetting(&m6()), sum);
    }

    #[test]
    fn image_tasks_add_zero_but_keep_the_divisor() {
        // flickr30k (col 2) and hqedit (col 5) output images: no rates.
        let r = m6_rates(false);
        let iuf = avg_error_type(&r, ErrorType::Iuf); // (15 + 10 + 10 + 2) / 5 = 7.4
        let hal = avg_error_type(&r, ErrorType::Hal); // (5 + 9 + 9 + 3) / 5 = 5.2
        let oth = avg_error_type(&r, ErrorType::Oth); // (0 + 1 + 1 + 0) / 5 = 0.4
        assert_close(iuf, 7.4);
        assert_close(hal, 5.2);
        assert_close(oth, 0.4);
        // Sum = text tasks' forgetting drops (20 + 20 + 20 + 5) over T-1 = 5: 13, which is the
        // full Forgetting 16 minus flickr30k's share 15 / 5 (not the text-only mean 65 / 4).
        let sum = iuf.unwrap() + hal.unwrap() + oth.unwrap();
        assert_close(Some(sum), 13.0);
        assert_close(Some(forgetting(&m6()).unwrap() - 15.0 / 5.0), sum);

        // A text task with a missing cell cannot be skipped silently.
        let mut missing = m6_rates(false);
        missing.hal[5][0] = None;
        assert_eq!(avg_error_type(&missing, ErrorType::Hal), None);
        // Neither can half of an image task's pair.
        let mut half = m6_rates(false);
        half.iuf[2][2] = Some(3.0);
        assert_eq!(avg_error_type(&half, ErrorType::Iuf), None);
        // Fewer than two stages: nothing to compare.
        let mut short = m6_rates(true);
        short.oth.truncate(1);
        assert_eq!(avg_error_type(&short, ErrorType::Oth), None);
        assert_eq!(serde_json::to_string(&ErrorType::Iuf).unwrap(), "\"iuf\"");
    }

    #[test]
    fn rounding_is_half_away_from_zero_on_the_decimal_value() {
        // Naive ways get these wrong: 2.675 and 1.005 are stored just below the tie, `{:.2}`
        // rounds exact ties to even, and `(x * 100).round()` sees 100.49999999999999.
        assert!(format!("{:.20}", 2.675).starts_with("2.67499"));
        assert_eq!(
            format!("{:.2} {:.2} {:.2}", 2.675, 1.005, -0.125),
            "2.67 1.00 -0.12"
        );
        assert_eq!((1.005_f64 * 100.0).round() / 100.0, 1.0);
        let cases = "49.575:49.58 -0.125:-0.13 2.675:2.68 1.005:1.01 0.125:0.13 -2.675:-2.68 \
                     49.574:49.57 99.995:100.00 9.999:10.00 0:0.00 -0:0.00 -0.004:0.00 \
                     0.005:0.01 0.0049:0.00 1e-9:0.00 100:100.00 12.3:12.30 \
                     1e20:100000000000000000000.00";
        let cases: Vec<_> = cases
            .split_whitespace()
            .filter_map(|c| c.split_once(':'))
            .collect();
        assert_eq!(cases.len(), 18);
        for (x, want) in cases {
            let x: f64 = x.parse().unwrap();
            assert_eq!(fmt2(x), want, "fmt2({x})");
            assert_eq!(round2(x), want.parse::<f64>().unwrap(), "round2({x})");
        }
        assert!(round2(f64::NAN).is_nan());
        assert_eq!(fmt2(f64::INFINITY), "inf");
        // A mean whose decimal value is 49.575 rounds up.
        let m =
            AccuracyMatrix::joint(vec![Vqav2, Imagenet], vec![Some(49.57), Some(49.58)]).unwrap();
        assert_eq!(fmt2(avg_acc(&m).unwrap()), "49.58");
    }

    #[test]
    fn mean_std_uses_sample_std() {
        // mean 4; squares of deviations 4+1+1+4 = 10 over n-1 = 3 -> sqrt(10/3).
        let (mean, std) = mean_std(&[2.0, 3.0, 5.0, 6.0]).unwrap();
        assert_close(Some(mean), 4.0);
        assert_close(Some(std), (10.0_f64 / 3.0).sqrt());
        assert_eq!(mean_std(&[42.5]), Some((42.5, 0.0)));
        assert_eq!(mean_std(&[]), None);
        assert_eq!(mean_std(&[1.0, f64::NAN]), None);
    }
}
