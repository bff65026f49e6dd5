//! The comparison table (one row of metrics per input) and the knowledge-transfer table, as
//! CSV, Markdown and a terminal table. Values have two decimals; a missing one is `-`.

use super::Input;
use crate::seeds::{fmt_stat, metric_of, opt2, stat_over};
use cnext_core::metrics::fmt2;
use cnext_core::transfer::{all_transfers, Transfer};
use cnext_harness::run::RunResult;

/// One comparison column: its header and its metric name ([`metric_of`]; also the key in
/// `Summary::metrics` where it is summarised there).
struct Column {
    header: &'static str,
    key: &'static str,
}

const COLUMNS: [Column; 9] = [
    Column {
        header: "Avg.ACC",
        key: "avg_acc",
    },
    Column {
        header: "Forgetting",
        key: "forgetting",
    },
    Column {
        header: "New.ACC",
        key: "new_acc",
    },
    Column {
        header: "MAA",
        key: "maa",
    },
    Column {
        header: "text avg",
        key: "text_avg",
    },
    Column {
        header: "image avg",
        key: "image_avg",
    },
    Column {
        header: "Avg.IUF",
        key: "avg_iuf",
    },
    Column {
        header: "Avg.HAL",
        key: "avg_hal",
    },
    Column {
        header: "Avg.OTH",
        key: "avg_oth",
    },
];

/// The comparison table: a header and one row of formatted cells per input.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Comparison {
    pub fn of(inputs: &[Input]) -> Comparison {
        let mut header: Vec<String> = ["method", "order", "seeds"].map(String::from).to_vec();
        header.extend(COLUMNS.iter().map(|c| c.header.to_string()));
        let rows = inputs
            .iter()
            .map(|input| {
                let mut row = input.id_cells();
                row.extend(COLUMNS.iter().map(|c| cell(input, c)));
                row
            })
            .collect();
        Comparison { header, rows }
    }

    pub fn csv(&self) -> String {
        let mut out = csv_line(&self.header);
        for r in &self.rows {
            out.push_str(&csv_line(r));
        }
        out
    }

    pub fn markdown(&self) -> String {
        markdown_table(&self.header, &self.rows)
    }

    /// The terminal table.
    pub fn table(&self) -> comfy_table::Table {
        let mut t = comfy_table::Table::new();
        t.set_header(self.header.clone());
        for r in &self.rows {
            t.add_row(r.clone());
        }
        t
    }
}

fn cell(input: &Input, c: &Column) -> String {
    let get = |r: &RunResult| metric_of(r, c.key);
    match &input.summary {
        None => opt2(input.runs.first().and_then(get)),
        Some(s) => match s.metrics.get(c.key) {
            Some(stat) => fmt_stat(stat.as_ref()),
            None => fmt_stat(stat_over(&input.runs, get).as_ref()),
        },
    }
}

/// One CSV record (RFC 4180 quoting where needed).
pub(crate) fn csv_line<S: AsRef<str>>(cells: &[S]) -> String {
    let quoted: Vec<String> = cells
        .iter()
        .map(|c| {
            let c = c.as_ref();
            if c.contains([',', '"', '\n', '\r']) {
                format!("\"{}\"", c.replace('"', "\"\""))
            } else {
                c.to_string()
            }
        })
        .collect();
    quoted.join(",") + "\n"
}

/// A Markdown table.
pub(crate) fn markdown_table<S: AsRef<str>>(header: &[S], rows: &[Vec<String>]) -> String {
    let line = |cells: Vec<&str>| format!("| {} |\n", cells.join(" | ").replace('\n', " "));
    let mut out = line(header.iter().map(|h| h.as_ref()).collect());
    out.push_str(&format!("|{}\n", "---|".repeat(header.len())));
    for r in rows {
        out.push_str(&line(r.iter().map(|c| c.as_str()).collect()));
    }
    out
}

/// The transfer rows of an input: stored in a run's results (recomputed from the matrix when
/// absent), computed from the mean matrix for a multi-seed folder.
fn transfers(input: &Input) -> Vec<Transfer> {
    match (&input.summary, input.runs.first()) {
        (None, Some(r)) if !r.transfer.is_empty() => r.transfer.clone(),
        _ => all_transfers(&input.matrix),
    }
}

const TRANSFER_HEADER: [&str; 7] = ["train", "eval", "stage", "kind", "before", "after", "delta"];

fn transfer_row(t: &Transfer) -> Vec<String> {
    vec![
        t.train.to_string(),
        t.eval.to_string(),
        t.stage.to_string(),
        t.kind.to_string(),
        fmt2(t.before),
        fmt2(t.after),
        fmt2(t.delta()),
    ]
}

/// `transfer.csv` (every input, with method/order/seeds columns) and `transfer.md` (a section
/// per input).
pub(crate) fn transfer(inputs: &[Input]) -> (String, String) {
    let mut header = vec!["method", "order", "seeds"];
    header.extend(TRANSFER_HEADER);
    let mut csv = csv_line(&header);
    let mut md = String::from("# Knowledge transfer\n\nHow learning the `train` task at `stage` moved the score of an earlier `eval` task: `before` = after stage - 1, `after` = after `stage` (mean matrix for multi-seed inputs).\n");
    for input in inputs {
        let rows: Vec<Vec<String>> = transfers(input).iter().map(transfer_row).collect();
        for r in &rows {
            let mut line = input.id_cells();
            line.extend(r.iter().cloned());
            csv.push_str(&csv_line(&line));
        }
        md.push_str(&format!("\n## {}\n\n", input.title()));
        if rows.is_empty() {
            md.push_str(if input.matrix.is_joint() {
                "No transfer: a joint run has no stages.\n"
            } else {
                "No transfer: fewer than two stages.\n"
            });
        } else {
            md.push_str(&markdown_table(&TRANSFER_HEADER, &rows));
        }
    }
    (csv, md)
}
