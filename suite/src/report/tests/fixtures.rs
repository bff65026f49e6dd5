//! Synthetic runs for the report tests (six tasks, numbers shaped like real ones; generated
//! here only, never in the library), and two ignored tests that write sample reports to look at:
//! `cargo test --release -p cnext-suite --lib report -- --ignored`.

use super::super::*;
use crate::seeds::summarize;
use cnext_core::metrics::{ErrorTypeRates, Metrics};
use cnext_core::transfer::all_transfers;
use cnext_harness::errors::{text_forgetting, Classifier, ErrorReport};
use cnext_harness::run::RunConfig;
use std::collections::BTreeMap;

pub(super) const LORA: [&[f64]; 6] = [
    &[46.5],
    &[13.5, 46.5],
    &[1.0, 0.0, 74.43],
    &[4.0, 3.0, 47.56, 40.0],
    &[17.5, 0.0, 36.18, 0.0, 11.5],
    &[0.5, 0.0, 27.22, 3.5, 0.0, 54.96],
];

pub(super) const MAGE: [&[f64]; 6] = [
    &[48.0],
    &[41.5, 47.0],
    &[38.0, 35.5, 73.1],
    &[36.5, 33.0, 70.2, 42.0],
    &[35.0, 31.5, 68.9, 39.0, 30.5],
    &[34.0, 30.0, 67.5, 37.5, 28.0, 55.2],
];

pub(super) const JOINT: [f64; 6] = [50.5, 45.0, 74.0, 44.5, 35.0, 56.0];

pub(super) fn sequential(rows: &[&[f64]], shift: f64) -> AccuracyMatrix {
    let tasks = Order::DefaultOrder.tasks().to_vec();
    let mut m = AccuracyMatrix::sequential(tasks.clone()).unwrap();
    for r in rows {
        let mut row: Vec<Option<f64>> = r.iter().map(|v| Some((v + shift).max(0.0))).collect();
        row.resize(tasks.len(), None);
        m.push_row(row).unwrap();
    }
    m
}

/// A run over `matrix`; with `errors`, the text forgetting split 45/54/1 into IUF/HAL/OTH.
pub(super) fn run_result(
    method: &str,
    seed: u64,
    matrix: AccuracyMatrix,
    errors: bool,
) -> RunResult {
    let n = matrix.num_stages();
    let errors = errors.then(|| {
        let tf = text_forgetting(&matrix);
        ErrorReport {
            rates: ErrorTypeRates {
                tasks: matrix.tasks().to_vec(),
                ..Default::default()
            },
            avg_iuf: tf.map(|f| 0.45 * f),
            avg_hal: tf.map(|f| 0.54 * f),
            avg_oth: tf.map(|f| 0.01 * f),
            text_forgetting: tf,
            reasons: vec![],
            classifier: Classifier::Rules,
        }
    });
    RunResult {
        method: method.into(),
        method_config: serde_json::json!({}),
        config: RunConfig::new(Order::DefaultOrder, seed, 300, Default::default()),
        metrics: Metrics::of(&matrix).rounded(),
        stages: vec![None; n],
        eval_seconds: vec![1.0; n],
        stage_keys: vec![],
        diagnostics: vec![BTreeMap::new(); n],
        trained_now: vec![true; n],
        errors,
        transfer: all_transfers(&matrix),
        matrix,
        base: "synthetic".into(),
        device: "cpu".into(),
        versions: BTreeMap::new(),
    }
}

pub(super) fn lora(seed: u64) -> RunResult {
    run_result("lora", seed, sequential(&LORA, 0.0), true)
}

pub(super) fn joint() -> RunResult {
    let tasks = Order::DefaultOrder.tasks().to_vec();
    let m = AccuracyMatrix::joint(tasks, JOINT.map(Some).to_vec()).unwrap();
    run_result("upper_bound", 0, m, false)
}

pub(super) fn write_run(dir: &Path, r: &RunResult) -> PathBuf {
    let bytes = serde_json::to_vec_pretty(r).unwrap();
    cnext_harness::run::write_atomic(&dir.join("results.json"), &bytes).unwrap();
    dir.to_path_buf()
}

/// A multi-seed folder of MAGE (seeds 0, 1, 2).
pub(super) fn write_seeds(dir: &Path) -> PathBuf {
    let seeds = [0u64, 1, 2];
    let runs: Vec<String> = seeds.iter().map(|s| format!("seed{s}")).collect();
    let results: Vec<RunResult> = seeds
        .iter()
        .map(|&s| {
            let mut r = run_result("mage", s, sequential(&MAGE, s as f64 * 0.75 - 0.5), true);
            // PEMA-like diagnostics: the fallback share falls by 0.001 per seed.
            for d in &mut r.diagnostics {
                d.insert("pema_alpha_fallback".into(), 1.0 - 0.001 * s as f64);
                d.insert("pema_star_non_finite".into(), 0.0);
            }
            r
        })
        .collect();
    for (sub, r) in runs.iter().zip(&results) {
        write_run(&dir.join(sub), r);
    }
    let summary = summarize("mini", &seeds, &runs, &results).unwrap();
    let bytes = serde_json::to_vec_pretty(&summary).unwrap();
    cnext_harness::run::write_atomic(&dir.join("summary.json"), &bytes).unwrap();
    dir.to_path_buf()
}

/// Writes a sample report of LoRA, a 3-seed MAGE and the joint upper bound to
/// `target/cnext/reports/sample` (or `$CNEXT_REPORT_SAMPLE`), to look at the figures.
#[test]
#[ignore]
fn sample_report() {
    let root = std::env::var_os("CNEXT_REPORT_SAMPLE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/cnext/reports/sample")
        });
    let runs = root.join("runs");
    let a = write_run(&runs.join("lora"), &lora(0));
    let b = write_seeds(&runs.join("mage"));
    let c = write_run(&runs.join("upper_bound"), &joint());
    let files = report(&[a, b, c], &root.join("report")).unwrap();
    println!("{}", files.comparison.table());
    for f in &files.files {
        println!("{}", f.display());
    }
}

/// Edge cases to look at: another order with a negative CLIP score and a negative error-type
/// average, a partial (3-stage) run, a run without error types.
#[test]
#[ignore]
fn sample_edge_report() {
    let root = std::env::var_os("CNEXT_REPORT_SAMPLE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/cnext/reports/sample-edge")
        });
    let runs = root.join("runs");
    let tasks = Order::ReverseOrder.tasks().to_vec();
    let mut m = AccuracyMatrix::sequential(tasks).unwrap();
    for (j, r) in LORA.iter().enumerate() {
        let mut row: Vec<Option<f64>> = r.iter().map(|&v| Some(v)).collect();
        if j == 5 {
            row[0] = Some(-5.3);
        }
        row.resize(6, None);
        m.push_row(row).unwrap();
    }
    let mut rev = run_result("lora", 0, m, true);
    rev.config.order = Order::ReverseOrder;
    if let Some(e) = rev.errors.as_mut() {
        e.avg_hal = Some(-3.25);
    }
    let partial = run_result("mage", 0, sequential(&MAGE[..3], 0.0), true);
    let mut plain = lora(0);
    plain.errors = None;
    let a = write_run(&runs.join("rev"), &rev);
    let b = write_run(&runs.join("partial"), &partial);
    let c = write_run(&runs.join("plain"), &plain);
    let files = report(&[a, b, c], &root.join("report")).unwrap();
    println!("{}", files.comparison.table());
}
