//! `cnext report`: figures and tables comparing finished runs. Each input is a run folder
//! (`results.json`) or a multi-seed folder (`summary.json`, with its per-seed run folders); the
//! report writes, all atomically:
//!
//! - `heatmap-<method>.png|svg`: the accuracy matrix of each input;
//! - `curves.png|svg`: Avg.ACC and Forgetting after each stage, all inputs together;
//! - `comparison.csv|md`: one row of metrics per input (also printed as a terminal table);
//! - `decomposition.png|svg|csv`: Avg.IUF / Avg.HAL / Avg.OTH next to the text forgetting;
//! - `transfer.csv|md`: the knowledge-transfer table (the paper's Table 3);
//! - `diagnostics.csv|md`: what each method reports after each stage (e.g. PEMA's fallbacks).
//!
//! A multi-seed input shows its cell-wise mean matrix, `mean ± std` metrics, and the mean of the
//! per-seed error-type averages.

mod bars;
mod curves;
mod diagnostics;
mod draw;
mod heatmap;
mod tables;
#[cfg(test)]
mod tests;
mod text;

use crate::seeds::Summary;
use anyhow::{bail, Context, Result};
use cnext_core::{AccuracyMatrix, Order};
use cnext_harness::run::RunResult;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub(crate) use tables::markdown_table;
pub use tables::Comparison;

/// One input of a report: a single run, or the runs of a multi-seed folder.
#[derive(Debug, Clone)]
pub struct Input {
    /// The folder given on the command line.
    pub dir: PathBuf,
    pub method: String,
    pub order: Order,
    pub seeds: Vec<u64>,
    /// The run's matrix, or the cell-wise mean over the seeds.
    pub matrix: AccuracyMatrix,
    /// The loaded runs: one, or one per seed in `seeds` order.
    pub runs: Vec<RunResult>,
    /// Present for a multi-seed folder.
    pub summary: Option<Summary>,
    /// How the run's method config differs from the registered default (`--set` overrides),
    /// as dotted paths; empty for the default or an unregistered method.
    pub overrides: BTreeMap<String, serde_json::Value>,
    /// A name unique within the report (file names, legends): the method id with its overrides,
    /// extended by the order and seeds when two inputs share it. Set by [`load_inputs`].
    pub label: String,
}

impl Input {
    /// Reads a run folder (`results.json`) or a multi-seed folder (`summary.json`); the path
    /// may also name either file itself.
    pub fn load(path: &Path) -> Result<Input> {
        let (dir, file) = match path.file_name().and_then(|n| n.to_str()) {
            Some("results.json" | "summary.json") if path.is_file() => (
                path.parent().unwrap_or(Path::new(".")).to_path_buf(),
                Some(path.to_path_buf()),
            ),
            _ => (path.to_path_buf(), None),
        };
        let summary = dir.join("summary.json");
        let results = dir.join("results.json");
        let file = match file {
            Some(f) => f,
            None if summary.is_file() => summary,
            None if results.is_file() => results,
            None if !dir.is_dir() => bail!("{}: no such run folder", dir.display()),
            None => bail!(
                "{}: not a run folder (neither {} nor {} exists)",
                dir.display(),
                results.display(),
                summary.display()
            ),
        };
        if file.file_name().is_some_and(|n| n == "summary.json") {
            Self::from_summary(dir, &file)
        } else {
            let r: RunResult = read_json(&file)?;
            Ok(Input {
                dir,
                method: r.method.clone(),
                order: r.config.order,
                seeds: vec![r.config.seed],
                matrix: r.matrix.clone(),
                overrides: overrides_of(&r)?,
                runs: vec![r],
                summary: None,
                label: String::new(),
            })
        }
    }

    fn from_summary(dir: PathBuf, file: &Path) -> Result<Input> {
        let s: Summary = read_json(file)?;
        if s.runs.is_empty() || s.runs.len() != s.seeds.len() {
            bail!(
                "{}: {} run folders for {} seeds",
                file.display(),
                s.runs.len(),
                s.seeds.len()
            );
        }
        let mut runs = Vec::with_capacity(s.runs.len());
        for sub in &s.runs {
            let path = dir.join(sub).join("results.json");
            let r: RunResult = read_json(&path)
                .with_context(|| format!("run {sub} listed in {}", file.display()))?;
            if r.method != s.method || r.matrix.tasks() != s.mean_matrix.tasks() {
                bail!(
                    "{}: method {} over {:?} does not match {} ({} over {:?})",
                    path.display(),
                    r.method,
                    r.matrix.tasks(),
                    file.display(),
                    s.method,
                    s.mean_matrix.tasks()
                );
            }
            runs.push(r);
        }
        Ok(Input {
            dir,
            method: s.method.clone(),
            order: s.order,
            seeds: s.seeds.clone(),
            matrix: s.mean_matrix.clone(),
            overrides: overrides_of(&runs[0])?,
            runs,
            summary: Some(s),
            label: String::new(),
        })
    }

    /// `seed 0`, or `mean of seeds 0,1,2`.
    pub fn seeds_text(&self) -> String {
        if self.summary.is_some() {
            format!("mean of seeds {}", self.seeds_list())
        } else {
            format!("seed {}", self.seeds_list())
        }
    }

    /// The label, noting a multi-seed mean (legends).
    pub fn legend(&self) -> String {
        match self.summary {
            Some(_) => format!("{} (mean of {} seeds)", self.label, self.seeds.len()),
            None => self.label.clone(),
        }
    }

    /// The method id, followed by the leaf key and value of each override:
    /// `mage[alpha_policy=faithful]` (tables, labels).
    pub fn method_name(&self) -> String {
        if self.overrides.is_empty() {
            return self.method.clone();
        }
        let set: Vec<String> = self
            .overrides
            .iter()
            .map(|(path, v)| {
                let key = path.rsplit('.').next().unwrap_or(path);
                match v.as_str() {
                    Some(s) => format!("{key}={s}"),
                    None => format!("{key}={v}"),
                }
            })
            .collect();
        format!("{}[{}]", self.method, set.join(","))
    }

    /// `mage / default_order / mean of seeds 0,1,2` (titles, section headings).
    pub fn title(&self) -> String {
        format!(
            "{} / {} / {}",
            self.method_name(),
            self.order,
            self.seeds_text()
        )
    }

    /// The method, order and seeds cells that start each CSV row.
    pub fn id_cells(&self) -> Vec<String> {
        vec![
            self.method_name(),
            self.order.to_string(),
            self.seeds_list(),
        ]
    }

    /// `0` or `0,1,2`.
    pub fn seeds_list(&self) -> String {
        let s: Vec<String> = self.seeds.iter().map(u64::to_string).collect();
        s.join(",")
    }
}

/// The run's `--set` overrides, recovered from its stored method config; none for a method
/// this build does not know (its label is then the bare id).
fn overrides_of(r: &RunResult) -> Result<BTreeMap<String, serde_json::Value>> {
    match cnext_baselines::find(&r.method) {
        Some(e) => e
            .overrides_of(&r.method_config)
            .with_context(|| format!("{}: default config", r.method)),
        None => Ok(BTreeMap::new()),
    }
}

/// Reads and parses a JSON file; errors name the file.
fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: malformed JSON", path.display()))
}

/// Loads every input and gives each a label unique within the report.
pub fn load_inputs(dirs: &[PathBuf]) -> Result<Vec<Input>> {
    if dirs.is_empty() {
        bail!("no run folders to report on");
    }
    let mut inputs = dirs
        .iter()
        .map(|d| Input::load(d))
        .collect::<Result<Vec<_>>>()?;
    let names: [fn(&Input) -> String; 3] = [
        |i| i.method_name(),
        |i| format!("{}-{}", i.method_name(), i.order),
        |i| {
            format!(
                "{}-{}-seed{}",
                i.method_name(),
                i.order,
                i.seeds_list().replace(',', "_")
            )
        },
    ];
    let mut labels: Vec<String> = inputs.iter().map(names[0]).collect();
    let clashes =
        |labels: &[String], k: usize| labels.iter().filter(|l| **l == labels[k]).count() > 1;
    for name in &names[1..] {
        let clash: Vec<bool> = (0..inputs.len()).map(|k| clashes(&labels, k)).collect();
        for (k, c) in clash.into_iter().enumerate() {
            if c {
                labels[k] = name(&inputs[k]);
            }
        }
    }
    for (k, input) in inputs.iter_mut().enumerate() {
        let mut label = labels[k].clone();
        if clashes(&labels, k) {
            label = format!("{label}-{}", k + 1);
        }
        input.label = label;
    }
    Ok(inputs)
}

/// The default report name: the method ids joined by `+` (each once), e.g. `lora+mage`.
pub fn default_name(inputs: &[Input]) -> String {
    let mut seen: Vec<&str> = vec![];
    for i in inputs {
        if !seen.contains(&i.method.as_str()) {
            seen.push(&i.method);
        }
    }
    file_safe(&seen.join("+"))
}

/// Keeps a name usable as a file name.
pub(crate) fn file_safe(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "+-_.,".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// What a report wrote.
#[derive(Debug, Clone)]
pub struct ReportFiles {
    pub out: PathBuf,
    /// Every file written, in writing order.
    pub files: Vec<PathBuf>,
    /// The comparison table (also in `comparison.csv` / `comparison.md`).
    pub comparison: Comparison,
}

/// `cnext report`: writes the report (default folder `target/cnext/reports/<name>`, see
/// [`default_name`]) and prints the comparison table and the files written.
pub fn report_cmd(dirs: &[PathBuf], out: Option<PathBuf>) -> Result<()> {
    let inputs = load_inputs(dirs)?;
    let out = out.unwrap_or_else(|| Path::new("target/cnext/reports").join(default_name(&inputs)));
    let files = write_report(&inputs, &out)?;
    println!("{}", files.comparison.table());
    println!("wrote {} files to {}:", files.files.len(), out.display());
    for f in &files.files {
        println!("  {}", f.display());
    }
    Ok(())
}

/// Loads the inputs and writes the report into `out`.
pub fn report(dirs: &[PathBuf], out: &Path) -> Result<ReportFiles> {
    write_report(&load_inputs(dirs)?, out)
}

/// Writes the report of loaded inputs into `out` (created if needed).
pub fn write_report(inputs: &[Input], out: &Path) -> Result<ReportFiles> {
    if inputs.is_empty() {
        bail!("no inputs to report on");
    }
    let mut files = Vec::new();
    let mut put = |name: String, bytes: &[u8]| -> Result<()> {
        let path = out.join(name);
        cnext_harness::run::write_atomic(&path, bytes)?;
        files.push(path);
        Ok(())
    };
    for input in inputs {
        let name = format!("heatmap-{}", file_safe(&input.label));
        let (png, svg) = heatmap::render(input)?;
        put(format!("{name}.png"), &png)?;
        put(format!("{name}.svg"), svg.as_bytes())?;
    }
    let (png, svg) = curves::render(inputs)?;
    put("curves.png".into(), &png)?;
    put("curves.svg".into(), svg.as_bytes())?;
    let comparison = Comparison::of(inputs);
    put("comparison.csv".into(), comparison.csv().as_bytes())?;
    put("comparison.md".into(), comparison.markdown().as_bytes())?;
    let decomposition: Vec<bars::Decomposition> =
        inputs.iter().map(bars::Decomposition::of).collect();
    let (png, svg) = bars::render(inputs, &decomposition)?;
    put("decomposition.png".into(), &png)?;
    put("decomposition.svg".into(), svg.as_bytes())?;
    put(
        "decomposition.csv".into(),
        bars::csv(inputs, &decomposition).as_bytes(),
    )?;
    let (csv, md) = tables::transfer(inputs);
    put("transfer.csv".into(), csv.as_bytes())?;
    put("transfer.md".into(), md.as_bytes())?;
    let (csv, md) = diagnostics::diagnostics(inputs);
    put("diagnostics.csv".into(), csv.as_bytes())?;
    put("diagnostics.md".into(), md.as_bytes())?;
    Ok(ReportFiles {
        out: out.to_path_buf(),
        files,
        comparison,
    })
}
