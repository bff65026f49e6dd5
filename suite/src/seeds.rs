//! Multi-seed runs: one run per seed (each in its own folder, stages shared through the cache),
//! summarised as mean and sample standard deviation per metric (the paper's Table 6) in
//! `summary.json` and `summary.md`.

use cnext_core::metrics::{fmt2, mean_std};
use cnext_core::{AccuracyMatrix, Order};
use cnext_harness::run::RunResult;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The metrics summarised, in report order.
pub const SUMMARY_METRICS: [&str; 8] = [
    "avg_acc",
    "forgetting",
    "new_acc",
    "maa",
    "bwt",
    "avg_iuf",
    "avg_hal",
    "avg_oth",
];

/// Mean and sample standard deviation of one metric over the seeds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeedStat {
    pub mean: f64,
    pub std: f64,
    /// One value per seed, in `Summary::seeds` order.
    pub values: Vec<f64>,
}

/// `summary.json` of a multi-seed run folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Summary {
    pub method: String,
    pub order: Order,
    pub profile: String,
    pub seeds: Vec<u64>,
    /// The per-seed run folders (each with its results.json), relative to the summary.
    pub runs: Vec<String>,
    /// By metric name ([`SUMMARY_METRICS`]); `None` where some seed has no value.
    pub metrics: BTreeMap<String, Option<SeedStat>>,
    /// Cell-wise mean over the seeds.
    pub mean_matrix: AccuracyMatrix,
}

/// Mean and std of a value over runs; `None` if any run lacks it.
pub fn stat_over(runs: &[RunResult], f: impl Fn(&RunResult) -> Option<f64>) -> Option<SeedStat> {
    let values: Vec<f64> = runs.iter().map(f).collect::<Option<_>>()?;
    let (mean, std) = mean_std(&values)?;
    Some(SeedStat { mean, std, values })
}

/// The value of a metric in one run, by name ([`SUMMARY_METRICS`], `text_avg`, `image_avg`).
pub fn metric_of(r: &RunResult, name: &str) -> Option<f64> {
    let m = &r.metrics;
    let e = r.errors.as_ref();
    match name {
        "avg_acc" => m.avg_acc,
        "forgetting" => m.forgetting,
        "new_acc" => m.new_acc,
        "maa" => m.maa,
        "bwt" => m.bwt,
        "avg_iuf" => e.and_then(|e| e.avg_iuf),
        "avg_hal" => e.and_then(|e| e.avg_hal),
        "avg_oth" => e.and_then(|e| e.avg_oth),
        "text_avg" => m.text_avg,
        "image_avg" => m.image_avg,
        _ => None,
    }
}

/// Summarises per-seed results (same method, order and tasks).
pub fn summarize(
    profile: &str,
    seeds: &[u64],
    runs: &[String],
    results: &[RunResult],
) -> Result<Summary, String> {
    let first = results.first().ok_or("no runs to summarise")?;
    if results.len() != seeds.len() || runs.len() != seeds.len() {
        return Err(format!(
            "{} seeds, {} run folders, {} results",
            seeds.len(),
            runs.len(),
            results.len()
        ));
    }
    for r in results {
        if r.method != first.method || r.matrix.tasks() != first.matrix.tasks() {
            return Err(format!(
                "cannot summarise {} with {}: different method or tasks",
                r.method, first.method
            ));
        }
    }
    let metrics = SUMMARY_METRICS
        .iter()
        .map(|&name| (name.to_string(), stat_over(results, |r| metric_of(r, name))))
        .collect();
    let rows = (0..first.matrix.num_stages())
        .map(|j| {
            (0..first.matrix.tasks().len())
                .map(|i| {
                    let v: Option<Vec<f64>> = results.iter().map(|r| r.matrix.get(j, i)).collect();
                    v.and_then(|v| mean_std(&v)).map(|(m, _)| m)
                })
                .collect()
        })
        .collect::<Vec<Vec<Option<f64>>>>();
    let mean_matrix = if first.matrix.is_joint() {
        let row = rows.into_iter().next().unwrap_or_default();
        AccuracyMatrix::joint(first.matrix.tasks().to_vec(), row)
    } else {
        let mut m = AccuracyMatrix::sequential(first.matrix.tasks().to_vec());
        if let Ok(m) = m.as_mut() {
            for r in rows {
                if let Err(e) = m.push_row(r) {
                    return Err(e.to_string());
                }
            }
        }
        m
    }
    .map_err(|e| e.to_string())?;
    Ok(Summary {
        method: first.method.clone(),
        order: first.config.order,
        profile: profile.to_string(),
        seeds: seeds.to_vec(),
        runs: runs.to_vec(),
        metrics,
        mean_matrix,
    })
}

/// Two decimals, or `-` when missing (never a silent 0).
pub fn opt2(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), fmt2)
}

/// `mean ± std` with two decimals, or `-`.
pub fn fmt_stat(s: Option<&SeedStat>) -> String {
    s.map_or("-".into(), |s| {
        format!("{} ± {}", fmt2(s.mean), fmt2(s.std))
    })
}

/// The Table 6 layout: the header (`method`, then each of [`SUMMARY_METRICS`]) and the one row
/// of `mean ± std` cells (Markdown here, the terminal table in `cnext run`).
pub fn summary_table(s: &Summary) -> (Vec<String>, Vec<String>) {
    let mut header = vec!["method".to_string()];
    header.extend(SUMMARY_METRICS.iter().map(|m| m.to_string()));
    let mut row = vec![s.method.clone()];
    row.extend(
        SUMMARY_METRICS
            .iter()
            .map(|m| fmt_stat(s.metrics.get(*m).and_then(|v| v.as_ref()))),
    );
    (header, row)
}

/// The Table 6 layout as Markdown: one row, a column per metric.
pub fn summary_markdown(s: &Summary) -> String {
    let (header, row) = summary_table(s);
    format!(
        "# {} / {} / {} / seeds {:?}\n\n{}",
        s.method,
        s.order,
        s.profile,
        s.seeds,
        crate::report::markdown_table(&header, &[row])
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use cnext_core::metrics::Metrics;
    use cnext_core::TaskId::*;
    use cnext_harness::run::RunConfig;

    /// A two-task run whose final row is `[a, b]` after a first row `[first]`.
    fn result(first: f64, a: f64, b: f64) -> RunResult {
        let mut m = AccuracyMatrix::sequential(vec![Vqav2, Imagenet]).unwrap();
        m.push_row(vec![Some(first), None]).unwrap();
        m.push_row(vec![Some(a), Some(b)]).unwrap();
        RunResult {
            method: "lora".into(),
            method_config: serde_json::json!({}),
            config: RunConfig::new(Order::DefaultOrder, 0, 1, Default::default()),
            metrics: Metrics::of(&m),
            matrix: m,
            stages: vec![],
            eval_seconds: vec![],
            stage_keys: vec![],
            diagnostics: vec![],
            trained_now: vec![],
            errors: None,
            transfer: vec![],
            base: String::new(),
            device: "cpu".into(),
            versions: BTreeMap::new(),
        }
    }

    #[test]
    fn mean_and_sample_std_on_known_numbers() {
        // Avg.ACC per seed: (10+10)/2, (20+20)/2, (30+30)/2 = 10, 20, 30: mean 20, std 10.
        // Forgetting per seed: 50-10, 60-20, 40-30 = 40, 40, 10: mean 30, std sqrt(300).
        let rs = [
            result(50.0, 10.0, 10.0),
            result(60.0, 20.0, 20.0),
            result(40.0, 30.0, 30.0),
        ];
        let runs: Vec<String> = ["seed0", "seed1", "seed2"].map(String::from).to_vec();
        let s = summarize("mini", &[0, 1, 2], &runs, &rs).unwrap();
        let avg = s.metrics["avg_acc"].as_ref().unwrap();
        assert_eq!((avg.mean, avg.std), (20.0, 10.0));
        assert_eq!(avg.values, vec![10.0, 20.0, 30.0]);
        let f = s.metrics["forgetting"].as_ref().unwrap();
        assert_eq!(f.mean, 30.0);
        assert!((f.std - 300f64.sqrt()).abs() < 1e-12);
        // No error report in these runs: None, not 0.
        assert_eq!(s.metrics["avg_iuf"], None);
        assert_eq!(s.mean_matrix.get(0, 0), Some(50.0));
        assert_eq!(s.mean_matrix.get(1, 1), Some(20.0));
        assert_eq!(s.mean_matrix.get(0, 1), None);
        let md = summary_markdown(&s);
        assert!(
            md.contains("| 20.00 ± 10.00 |") && md.contains("| 30.00 ± 17.32 |"),
            "{md}"
        );
        assert!(md.contains(" - |"), "{md}");
    }

    #[test]
    fn mismatched_inputs_are_errors() {
        let rs = [result(1.0, 1.0, 1.0)];
        assert!(summarize("mini", &[0, 1], &["a".into()], &rs).is_err());
        assert!(summarize("mini", &[], &[], &[]).is_err());
    }
}
