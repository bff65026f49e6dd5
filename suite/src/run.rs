//! `cnext run`: the main job, for one training seed or several (`--seeds 0,1,2`).

use anyhow::{Context, Result};
use cnext_core::metrics::ErrorType;
use cnext_core::Order;
use cnext_datasets::errors::Judge;
use cnext_harness::device::DeviceSpec;
use cnext_harness::method::{MethodEntry, MethodFactory};
use cnext_harness::run::{run, write_atomic, RunResult};
use cnext_suite::judge::{ChatJudge, JudgeConfig};
use cnext_suite::profile::{Overrides, Profile};
use cnext_suite::seeds::{opt2, summarize, summary_markdown, summary_table};
use cnext_suite::setup::{cache_dir, Bench};
use comfy_table::Table;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// What `cnext run` was asked for.
pub(crate) struct RunArgs {
    pub method: &'static MethodEntry,
    pub order: Order,
    pub profile: Profile,
    /// A Janus directory, a CLIP directory and a data root instead of the profile's own.
    pub model: Option<PathBuf>,
    pub clip_model: Option<PathBuf>,
    pub data_root: Option<PathBuf>,
    /// Training seeds; one run each.
    pub seeds: Vec<u64>,
    /// The benchmark's seed: data, base and scorer (fixed across training seeds, so every seed
    /// is scored by the same scorer on the same data).
    pub data_seed: u64,
    pub steps: Option<usize>,
    pub lr: Option<f64>,
    pub out: Option<PathBuf>,
    pub cache: Option<PathBuf>,
    pub device: DeviceSpec,
    pub judge: Option<(String, String)>,
    /// Method config overrides (`--set path=value`).
    pub overrides: BTreeMap<String, serde_json::Value>,
}

/// Fails before any training when the output folder cannot be written (read-only, full, or
/// under a file), instead of after the chain has trained.
fn check_writable(out: &std::path::Path) -> Result<()> {
    let probe = out.join(format!(".cnext-write-probe-{}", std::process::id()));
    std::fs::create_dir_all(out)
        .and_then(|()| std::fs::write(&probe, b"probe"))
        .and_then(|()| std::fs::remove_file(&probe))
        .with_context(|| format!("output folder {} is not writable", out.display()))
}

pub(crate) fn run_cmd(a: RunArgs) -> Result<()> {
    let t0 = std::time::Instant::now();
    let mut sorted = a.seeds.clone();
    sorted.sort_unstable();
    sorted.dedup();
    if sorted.len() != a.seeds.len() || a.seeds.is_empty() {
        anyhow::bail!("--seeds must list distinct seeds, got {:?}", a.seeds);
    }
    if let Some(lr) = a.lr {
        if !(lr.is_finite() && lr > 0.0) {
            anyhow::bail!("--lr must be a positive number, got {lr}");
        }
    }
    let factory = a
        .method
        .with_overrides(&a.overrides)
        .map_err(|e| anyhow::anyhow!("--set: {e}"))?;
    let cache = cache_dir(a.cache.clone());
    let overrides = Overrides {
        model: a.model.clone(),
        clip: a.clip_model.clone(),
        data_root: a.data_root.clone(),
    };
    let overridden = overrides.any();
    let sources = a
        .profile
        .sources_with(a.data_seed, overrides)
        .map_err(|e| anyhow::anyhow!(e))?;
    let bench = Bench::open_with(a.profile, a.data_seed, cache.clone(), &sources, a.device)?;
    let judge = match &a.judge {
        Some((url, model)) => Some(ChatJudge::new(JudgeConfig::new(url, model))?),
        None => None,
    };
    let judge = judge.as_ref().map(|j| j as &dyn Judge);
    // A changed config or training setting gets its own run folder, named by what changed.
    let suffix = if a.overrides.is_empty() {
        String::new()
    } else {
        format!("-cfg{}", short_hash(&serde_json::to_string(&a.overrides)?))
    } + &a.steps.map_or(String::new(), |s| format!("-steps{s}"))
        + &a.lr.map_or(String::new(), |lr| format!("-lr{lr}"))
        + &if a.data_seed == 0 {
            String::new()
        } else {
            format!("-data{}", a.data_seed)
        };
    let seeds_name = a
        .seeds
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(",");
    // Other sources than the profile's get their own folder, named by their content keys.
    let base = if overridden {
        let keys = format!(
            "{}|{}|{}",
            bench.base.name(),
            bench.clip_key,
            bench.data_key
        );
        format!("-src{}", short_hash(&keys))
    } else {
        String::new()
    };
    let name = |s: &str| {
        format!(
            "{}-{}-{}{base}{suffix}-seed{s}",
            a.method.id,
            a.order,
            a.profile.as_str()
        )
    };
    let setup = t0.elapsed().as_secs_f64();
    if let [seed] = a.seeds[..] {
        let out = a
            .out
            .clone()
            .unwrap_or_else(|| cache.join("runs").join(name(&seed.to_string())));
        check_writable(&out)?;
        let r = one_seed(&a, &factory, &bench, seed, &out, judge)?;
        print_run(&r);
        print_footer(&r, &out, setup, t0);
        return Ok(());
    }
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| cache.join("runs").join(name(&format!("s{seeds_name}"))));
    check_writable(&out)?;
    let mut results = vec![];
    let mut runs = vec![];
    for &seed in &a.seeds {
        let dir = format!("seed{seed}");
        println!("== seed {seed}");
        let r = one_seed(&a, &factory, &bench, seed, &out.join(&dir), judge)?;
        print_run(&r);
        results.push(r);
        runs.push(dir);
    }
    let s = summarize(a.profile.as_str(), &a.seeds, &runs, &results)
        .map_err(|e| anyhow::anyhow!("{}: {e}", out.display()))?;
    write_atomic(
        &out.join("summary.json"),
        serde_json::to_string_pretty(&s)?.as_bytes(),
    )?;
    write_atomic(&out.join("summary.md"), summary_markdown(&s).as_bytes())?;
    let (header, row) = summary_table(&s);
    let mut t = Table::new();
    t.set_header(header);
    t.add_row(row);
    println!("mean ± std over seeds {seeds_name}\n{t}");
    println!(
        "wrote {} (summary.json, summary.md, one folder per seed; total {:.1} s)",
        out.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

fn one_seed(
    a: &RunArgs,
    factory: &MethodFactory,
    bench: &Bench,
    seed: u64,
    out: &std::path::Path,
    judge: Option<&dyn Judge>,
) -> Result<RunResult> {
    let cfg = bench.run_config(a.order, seed, a.steps, a.lr);
    let mut chain = bench.chain(&cfg, factory.clone())?;
    chain.progress = true;
    run(&chain, out, judge).with_context(|| format!("{} seed {seed}", a.method.id))
}

fn print_run(r: &RunResult) {
    let mut table = Table::new();
    let mut header = vec!["stage".to_string()];
    header.extend(r.matrix.tasks().iter().map(|t| t.to_string()));
    table.set_header(header);
    for (j, row) in r.matrix.rows().iter().enumerate() {
        let mut cells = vec![if r.matrix.is_joint() {
            "joint".into()
        } else {
            (j + 1).to_string()
        }];
        cells.extend(row.iter().map(|c| opt2(*c)));
        table.add_row(cells);
    }
    println!("{table}");
    let m = &r.metrics;
    let e = r.errors.as_ref();
    let mut t2 = Table::new();
    t2.set_header([
        "Avg.ACC",
        "Forgetting",
        "New.ACC",
        "BWT",
        "MAA",
        "text avg",
        "image avg",
        "Avg.IUF",
        "Avg.HAL",
        "Avg.OTH",
    ]);
    t2.add_row([
        opt2(m.avg_acc),
        opt2(m.forgetting),
        opt2(m.new_acc),
        opt2(m.bwt),
        opt2(m.maa),
        opt2(m.text_avg),
        opt2(m.image_avg),
        opt2(e.and_then(|e| e.avg_iuf)),
        opt2(e.and_then(|e| e.avg_hal)),
        opt2(e.and_then(|e| e.avg_oth)),
    ]);
    println!("{t2}");
    if let Some(e) = e {
        let last = r.matrix.num_stages().saturating_sub(1);
        let mut t = Table::new();
        let mut header = vec!["final row".to_string()];
        header.extend(r.matrix.tasks().iter().map(|t| t.to_string()));
        t.set_header(header);
        for (label, kind) in [
            ("IUF %", ErrorType::Iuf),
            ("HAL %", ErrorType::Hal),
            ("OTH %", ErrorType::Oth),
        ] {
            let mut row = vec![label.to_string()];
            row.extend(
                (0..r.matrix.tasks().len())
                    .map(|i| opt2(e.rates.of(kind).get(last).and_then(|r| r[i]))),
            );
            t.add_row(row);
        }
        println!(
            "error types of wrong text answers ({:?})\n{t}",
            e.classifier
        );
    }
    let keys: std::collections::BTreeSet<&String> =
        r.diagnostics.iter().flat_map(|d| d.keys()).collect();
    if !keys.is_empty() {
        let mut t3 = Table::new();
        let mut header = vec!["stage".to_string()];
        header.extend(keys.iter().map(|k| k.to_string()));
        t3.set_header(header);
        for (j, d) in r.diagnostics.iter().enumerate() {
            let mut row = vec![(j + 1).to_string()];
            row.extend(
                keys.iter()
                    .map(|k| d.get(*k).map_or("-".into(), |v| format!("{v:.4}"))),
            );
            t3.add_row(row);
        }
        println!("{} diagnostics\n{t3}", r.method);
    }
}

fn print_footer(r: &RunResult, out: &std::path::Path, setup: f64, t0: std::time::Instant) {
    // `+ 0.0`: an empty float sum is -0.0, which would print as "-0.0 s".
    let train_s: f64 = r.stages.iter().flatten().map(|s| s.seconds).sum::<f64>() + 0.0;
    let cached = r.trained_now.iter().filter(|t| !**t).count();
    let eval_s: f64 = r.eval_seconds.iter().sum::<f64>() + 0.0;
    println!(
        "wrote {} ({cached} of {} stages from the cache; setup {setup:.1} s; the stages took {train_s:.1} s to train and {eval_s:.1} s to evaluate when built; total {:.1} s)",
        out.display(),
        r.trained_now.len(),
        t0.elapsed().as_secs_f64()
    );
}

/// Eight hex digits of FNV-1a: a stable short name, not a security hash.
fn short_hash(s: &str) -> String {
    let h = s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{:08x}", h >> 32)
}
