//! `cnext bench data`: peak memory of loading a task and reading every training example once,
//! at `--scale` times the mini size, streamed (the chain's path: an index of the train file and
//! a bounded cache of decoded images) against holding the task in memory (every image
//! decoded up front, as the chain did before). Each mode runs in a fresh process so that its
//! peak resident set (`VmHWM`) is its own.

use anyhow::{bail, Context, Result};
use cnext_core::TaskId;
use cnext_datasets::generate::{write_task, DataProfile, GenConfig};
use cnext_harness::data::{Examples, ImageCache, TrainSet, DEFAULT_IMAGE_CACHE_BYTES};
use comfy_table::Table;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// How a child process reads the task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Stream,
    Eager,
}

#[derive(Debug, Serialize, Deserialize)]
struct Figures {
    mode: Mode,
    examples: usize,
    load_s: f64,
    pass_s: f64,
    peak_rss_mb: f64,
}

/// The peak resident set of this process, in MB (Linux).
fn peak_rss_mb() -> Result<f64> {
    let status = std::fs::read_to_string("/proc/self/status").context("/proc/self/status")?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM in /proc/self/status")?;
    Ok(kb / 1024.0)
}

/// One mode's load and pass, in this process.
fn measure(root: &Path, task: TaskId, mode: Mode) -> Result<Figures> {
    let dir = root.join(task.as_str());
    let t0 = Instant::now();
    let mut checksum = 0u64;
    let (examples, load_s, pass_s) = match mode {
        Mode::Stream => {
            let images = Arc::new(ImageCache::from_env());
            let set = TrainSet::open(&dir, task, images)?;
            let load_s = t0.elapsed().as_secs_f64();
            let t1 = Instant::now();
            for i in 0..set.len() {
                let ex = set.get(i)?;
                checksum += ex.prompt.text.len() as u64;
            }
            (set.len(), load_s, t1.elapsed().as_secs_f64())
        }
        Mode::Eager => {
            let data = cnext_datasets::loader::load_task(root, task)?;
            let all = cnext_harness::tasks::train_examples(&data)?;
            let load_s = t0.elapsed().as_secs_f64();
            let t1 = Instant::now();
            for ex in &all {
                checksum += ex.prompt.text.len() as u64;
            }
            (all.len(), load_s, t1.elapsed().as_secs_f64())
        }
    };
    std::hint::black_box(checksum);
    Ok(Figures {
        mode,
        examples,
        load_s,
        pass_s,
        peak_rss_mb: peak_rss_mb()?,
    })
}

/// The generated root of `task` at `scale` times the mini size (made if missing).
fn ensure_root(task: TaskId, scale: usize, root: Option<PathBuf>) -> Result<PathBuf> {
    let root = root.unwrap_or_else(|| {
        cnext_suite::setup::cache_dir(None)
            .join("bench-data")
            .join(format!("{task}-x{scale}"))
    });
    let done = root.join(task.as_str()).join("train.jsonl");
    if done.exists() {
        return Ok(root);
    }
    let (train, _) = DataProfile::Mini.sizes();
    let cfg = GenConfig {
        profile: DataProfile::Mini,
        seed: 0,
        train: train * scale,
        test: 1,
    };
    let t0 = Instant::now();
    let tmp = root.with_extension("partial");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| tmp.display().to_string())?;
    }
    write_task(&tmp.join(task.as_str()), task, &cfg)?;
    std::fs::rename(&tmp, &root).with_context(|| root.display().to_string())?;
    eprintln!(
        "generated {} {task} train samples in {:.0} s at {}",
        cfg.train,
        t0.elapsed().as_secs_f64(),
        root.display()
    );
    Ok(root)
}

/// Runs both modes in child processes and prints their figures side by side; with `child`,
/// measures that mode here and prints its figures as JSON.
pub fn run(task: TaskId, scale: usize, root: Option<PathBuf>, child: Option<Mode>) -> Result<()> {
    if scale == 0 {
        bail!("--scale must be at least 1");
    }
    let root = ensure_root(task, scale, root)?;
    if let Some(mode) = child {
        println!("{}", serde_json::to_string(&measure(&root, task, mode)?)?);
        return Ok(());
    }
    let exe = std::env::current_exe()?;
    let mut figs = vec![];
    for mode in [Mode::Stream, Mode::Eager] {
        let name = serde_json::to_value(mode)?;
        let o = std::process::Command::new(&exe)
            .args(["bench", "data", "--task", task.as_str(), "--scale"])
            .arg(scale.to_string())
            .arg("--root")
            .arg(&root)
            .args(["--child", name.as_str().unwrap_or("stream")])
            .output()?;
        if !o.status.success() {
            bail!("{mode:?}: {}", String::from_utf8_lossy(&o.stderr));
        }
        let f: Figures = serde_json::from_slice(&o.stdout)
            .with_context(|| String::from_utf8_lossy(&o.stdout).to_string())?;
        figs.push(f);
    }
    let mut table = Table::new();
    table.set_header([
        "mode",
        "examples",
        "load (s)",
        "pass (s)",
        "examples / s",
        "peak RSS (MB)",
    ]);
    for f in &figs {
        table.add_row([
            format!("{:?}", f.mode).to_lowercase(),
            f.examples.to_string(),
            format!("{:.2}", f.load_s),
            format!("{:.2}", f.pass_s),
            format!("{:.0}", f.examples as f64 / (f.load_s + f.pass_s).max(1e-9)),
            format!("{:.1}", f.peak_rss_mb),
        ]);
    }
    let cache_mb = std::env::var("CNEXT_IMAGE_CACHE_MB")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(DEFAULT_IMAGE_CACHE_BYTES >> 20);
    println!(
        "{task} at {scale}x mini ({}), image cache bound {cache_mb} MB\n{table}\neager / stream peak RSS: {:.2}x",
        root.display(),
        figs[1].peak_rss_mb / figs[0].peak_rss_mb.max(1e-9)
    );
    Ok(())
}
