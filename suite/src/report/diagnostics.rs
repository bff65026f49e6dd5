//! The method diagnostics table (`diagnostics.csv|md`): what a method reports after each stage
//! (e.g. MAGE's `pema_alpha_fallback` and `pema_star_non_finite`), as mean ± std over the seeds
//! of a multi-seed input. Inputs without diagnostics are listed as such, not given zeros.

use super::tables::{csv_line, markdown_table};
use super::Input;
use cnext_core::metrics::mean_std;
use std::collections::BTreeSet;

/// Fractions near 1 matter (0.9999 vs 1): four decimals, not the tables' two.
fn fmt4(v: f64) -> String {
    format!("{v:.4}")
}

/// One row: stage (1-based), the task trained there, then per diagnostic key the values over the
/// input's runs (None where a run lacks the key at that stage).
struct Row {
    stage: usize,
    task: String,
    values: Vec<Option<Vec<f64>>>,
}

/// The diagnostic keys any run of `input` reports, in name order.
fn keys(input: &Input) -> Vec<String> {
    let keys: BTreeSet<&String> = input
        .runs
        .iter()
        .flat_map(|r| r.diagnostics.iter().flat_map(|d| d.keys()))
        .collect();
    keys.into_iter().cloned().collect()
}

fn rows(input: &Input, keys: &[String]) -> Vec<Row> {
    let stages = input.runs.iter().map(|r| r.diagnostics.len()).max();
    (0..stages.unwrap_or(0))
        .map(|k| Row {
            stage: k + 1,
            task: match input.matrix.is_joint() {
                true => "joint".to_string(),
                false => input
                    .matrix
                    .tasks()
                    .get(k)
                    .map_or("-".into(), |t| t.to_string()),
            },
            values: keys
                .iter()
                .map(|key| {
                    input
                        .runs
                        .iter()
                        .map(|r| r.diagnostics.get(k).and_then(|d| d.get(key)).copied())
                        .collect()
                })
                .collect(),
        })
        .collect()
}

/// Shown (`mean ± std` over seeds, or the one run's value), mean and std; `-` when a run lacks
/// the value or it is not finite.
fn fmt_values(values: Option<&[f64]>, multi: bool) -> (String, String, String) {
    match values.and_then(mean_std) {
        None => ("-".into(), "-".into(), "-".into()),
        Some((mean, std)) if multi => (
            format!("{} ± {}", fmt4(mean), fmt4(std)),
            fmt4(mean),
            fmt4(std),
        ),
        Some((mean, _)) => (fmt4(mean), fmt4(mean), "-".into()),
    }
}

/// `diagnostics.csv` (long form: one line per input, stage and key) and `diagnostics.md`
/// (a section per input, a column per key).
pub(crate) fn diagnostics(inputs: &[Input]) -> (String, String) {
    let mut csv = csv_line(&[
        "method",
        "order",
        "seeds",
        "stage",
        "task",
        "diagnostic",
        "mean",
        "std",
    ]);
    let mut md = String::from(
        "# Method diagnostics\n\nWhat each method reports after each stage (mean ± std over seeds for multi-seed inputs).\n",
    );
    for input in inputs {
        let keys = keys(input);
        let multi = input.summary.is_some();
        md.push_str(&format!("\n## {}\n\n", input.title()));
        if keys.is_empty() {
            md.push_str("No diagnostics: the method reports none.\n");
            continue;
        }
        let mut header = vec!["stage".to_string(), "task".to_string()];
        header.extend(keys.iter().cloned());
        let mut table = Vec::new();
        for row in rows(input, &keys) {
            let mut cells = vec![row.stage.to_string(), row.task.clone()];
            for (key, values) in keys.iter().zip(&row.values) {
                let (shown, mean, std) = fmt_values(values.as_deref(), multi);
                cells.push(shown);
                let mut line = input.id_cells();
                line.extend([
                    row.stage.to_string(),
                    row.task.clone(),
                    key.clone(),
                    mean,
                    std,
                ]);
                csv.push_str(&csv_line(&line));
            }
            table.push(cells);
        }
        md.push_str(&markdown_table(&header, &table));
    }
    (csv, md)
}
