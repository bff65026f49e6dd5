//! `cnext`: generate Continual-NExT-mini, score prediction files written by any framework, and
//! compute the protocol's metrics from an accuracy matrix.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use cnext_core::metrics::{fmt2, Metrics};
use cnext_core::scoring::clip::ClipModel;
use cnext_core::scoring::Compat;
use cnext_core::{AccuracyMatrix, TaskId};
use cnext_datasets::evaluate::{read_predictions, score_task};
use cnext_datasets::loader::{load_test_file, ImageCheck};
use cnext_datasets::{DataProfile, GenConfig, TaskSpec};
use cnext_harness::device::DeviceSpec;
use cnext_suite::profile::Profile;
use cnext_suite::seeds::opt2;
use cnext_suite::setup::{cache_dir, ensure_base, ensure_clip};
use comfy_table::Table;
use std::path::{Path, PathBuf};
use std::time::Instant;

// Fresh tensor buffers every step: mimalloc cut step time by 25-30% (DESIGN.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "cnext", version, about = "Continual-NExT benchmark harness")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate or check Continual-NExT-mini data.
    Data {
        #[command(subcommand)]
        cmd: DataCmd,
    },
    /// Metrics of an accuracy matrix CSV (header: task ids; row j: after stage j).
    Metrics {
        #[arg(long)]
        matrix: PathBuf,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Train and evaluate one method over one task order (generates data, base and scorer on
    /// first use), print the accuracy matrix and metrics, and write the run folder.
    Run {
        /// A registered method (`cnext_baselines::ALL`).
        #[arg(long, default_value = "mage", value_parser = parse_method)]
        method: &'static cnext_harness::method::MethodEntry,
        #[arg(long, default_value = "default_order")]
        order: cnext_core::Order,
        /// smoke, mini, janus_smoke (smoke data on the tiny Janus fixture) or paper (the
        /// paper's recipe on --model, --clip-model and --data-root, by default the fixtures
        /// and generated smoke data).
        #[arg(long, default_value = "mini")]
        profile: Profile,
        /// A Janus / Janus-Pro Hugging Face model directory to run on instead of the profile's
        /// base (the profile still gives the run settings).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Score image tasks with this Hugging Face `CLIPModel` directory.
        #[arg(long)]
        clip_model: Option<PathBuf>,
        /// The six tasks from this root in the official layout (checked whole first) instead
        /// of generated data.
        #[arg(long)]
        data_root: Option<PathBuf>,
        /// Training seed (adapter init, shuffling, dropout).
        #[arg(long, default_value_t = 0, conflicts_with = "seeds")]
        seed: u64,
        /// Several training seeds, e.g. `0,1,2`: one run each (in `seed<N>/` under the run
        /// folder) and `summary.json` / `summary.md` with mean and std per metric.
        #[arg(long, value_delimiter = ',', num_args = 1..)]
        seeds: Vec<u64>,
        /// The benchmark's seed: generated data, built-in base and scorer (the same for every
        /// training seed, so all seeds are scored alike).
        #[arg(long, default_value_t = 0)]
        data_seed: u64,
        /// Training steps per stage (default: 600 mini, 20 smoke).
        #[arg(long)]
        steps: Option<usize>,
        /// Peak learning rate of each stage (default: the profile's).
        #[arg(long)]
        lr: Option<f64>,
        /// Run folder (default target/cnext/runs/<method>-<order>-<profile>-seed<seed>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Cache folder: data, base, scorer and trained stages (default `CNEXT_CACHE_DIR`, else
        /// target/cnext).
        #[arg(long)]
        cache: Option<PathBuf>,
        /// Where the backbone trains: cpu, cuda or cuda:N (CUDA needs `--features cuda`).
        #[arg(long, default_value = "cpu")]
        device: DeviceSpec,
        /// Type wrong answers with an LLM judge at this OpenAI-compatible endpoint (API key from
        /// the environment variable CNEXT_JUDGE_API_KEY, if set); failures fall back to the rules.
        #[arg(long)]
        judge: Option<String>,
        /// The judge's model name.
        #[arg(long, default_value = "gpt-4o-mini", requires = "judge")]
        judge_model: String,
        /// Change the method's config: a dotted path into its JSON form and a JSON value (a bare
        /// word is a string), e.g. `--set lambda=500` or
        /// `--set averaging.pema.alpha_policy=faithful`. Repeatable.
        #[arg(long = "set", value_name = "PATH=VALUE", value_parser = parse_override)]
        set: Vec<(String, serde_json::Value)>,
    },
    /// Build (or load) the cached pretrained built-in base of a profile.
    Base {
        #[arg(long, default_value = "mini", value_parser = parse_profile)]
        profile: DataProfile,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Cache folder (default target/cnext).
        #[arg(long)]
        cache: Option<PathBuf>,
        /// Where the backbone trains: cpu, cuda or cuda:N (CUDA needs `--features cuda`).
        #[arg(long, default_value = "cpu")]
        device: DeviceSpec,
    },
    /// Stage-cache entries as archives, for runners without a shared file system.
    Cache {
        #[command(subcommand)]
        cmd: CacheCmd,
    },
    /// Micro-benchmarks that print ratios.
    Bench {
        #[command(subcommand)]
        cmd: BenchCmd,
    },
    /// Score official-format predictions (merge.jsonl) against a task's test annotations.
    Score {
        #[arg(long)]
        task: TaskId,
        #[arg(long)]
        annotations: PathBuf,
        #[arg(long)]
        predictions: PathBuf,
        /// `official` reproduces the official scripts' quirks.
        #[arg(long, default_value = "correct")]
        compat: Compat,
        #[arg(long)]
        json: bool,
        /// Write one JSON line per sample (prediction, answer, score).
        #[arg(long)]
        per_sample: Option<PathBuf>,
        /// Image tasks: the profile whose CLIP-like scorer scores them (trained on first use).
        #[arg(long, default_value = "mini", value_parser = parse_profile)]
        profile: DataProfile,
        /// Image tasks: the seed of that scorer.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Image tasks: cache folder holding the scorer (default target/cnext).
        #[arg(long)]
        cache: Option<PathBuf>,
        /// Image tasks: score with this Hugging Face `CLIPModel` folder (the paper's
        /// openai/clip-vit-base-patch32) instead of the profile's tiny scorer.
        #[arg(long, conflicts_with = "cache")]
        clip_model: Option<PathBuf>,
        /// Where `--clip-model` runs: cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu", requires = "clip_model")]
        clip_device: DeviceSpec,
    },
    /// CLIP-T (image vs caption) or CLIP-I (image vs target image) of one pair, 100 x cosine,
    /// with a Hugging Face `CLIPModel` folder.
    ClipScore(crate::clip_cli::ClipScoreArgs),
    /// Generate text or an image from a Hugging Face Janus or LlamaForCausalLM directory.
    Infer(crate::infer::InferArgs),
    /// Write one stage of a method's chain as a PEFT LoRA adapter directory (trains the
    /// chain up to it first when it is not cached).
    ExportAdapter(crate::export::ExportArgs),
    /// Figures and tables comparing finished runs: run folders (results.json) or multi-seed
    /// folders (summary.json).
    Report {
        /// Run folders (results.json) or multi-seed folders (summary.json).
        #[arg(required = true, num_args = 1..)]
        dirs: Vec<PathBuf>,
        /// Output folder (default target/cnext/reports/<method ids joined by +>).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum CacheCmd {
    /// Write every complete stage entry as `<out>/<entry>.tar` (files plus a SHA256SUMS).
    Export {
        #[arg(long)]
        out: PathBuf,
        /// Cache folder (default target/cnext, or CNEXT_CACHE_DIR).
        #[arg(long)]
        cache: Option<PathBuf>,
    },
    /// Verify and add entry archives; a complete entry already in the cache is kept.
    Import {
        #[arg(required = true)]
        archives: Vec<PathBuf>,
        #[arg(long)]
        cache: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum DataCmd {
    /// Write the six tasks (train JSONL, test JSON, PNG images) into a new folder.
    Generate {
        #[arg(long, default_value = "mini", value_parser = parse_profile)]
        profile: DataProfile,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Default: target/cnext/data/<profile>-seed<seed>
        #[arg(long)]
        out: Option<PathBuf>,
        /// Replace an existing folder.
        #[arg(long)]
        force: bool,
    },
    /// Load and validate every task of a data folder (real downloads or generated).
    Check {
        #[arg(long)]
        root: PathBuf,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// One PEMA update at the paper's LoRA shapes: dense n x n inverse vs Woodbury.
    Pema {
        /// Largest n solved densely (the dense solve costs n^3; 13824 takes hours).
        #[arg(long, default_value_t = 5120)]
        max_dense: usize,
    },
    /// Peak memory of loading one task at N x the mini size and reading each example once:
    /// streamed (the chain's path) against every image decoded up front.
    Data {
        #[arg(long, default_value = "vqav2")]
        task: TaskId,
        #[arg(long, default_value_t = 10)]
        scale: usize,
        /// Default: <cache>/bench-data/<task>-x<scale> (generated when missing).
        #[arg(long)]
        root: Option<PathBuf>,
        /// Measure one mode in this process (the parent runs one child per mode).
        #[arg(long, value_enum, hide = true)]
        child: Option<crate::bench_data::Mode>,
    },
    /// One training step (forward + loss, backward, clipping + AdamW) phase by phase, for a
    /// text batch and an image batch, LoRA and MAGE's stacked experts interleaved.
    Step {
        #[arg(long, default_value = "mini")]
        profile: Profile,
        /// Timed steps per row (the median is printed).
        #[arg(long, default_value_t = 40)]
        steps: usize,
        /// Also write the batches and weights for `bench/step_replica.py` into this folder.
        #[arg(long)]
        dump: Option<PathBuf>,
    },
}

fn parse_method(s: &str) -> Result<&'static cnext_harness::method::MethodEntry, String> {
    cnext_baselines::find(s).ok_or_else(|| {
        format!(
            "unknown method `{s}` (expected one of: {})",
            cnext_baselines::ids().join(", ")
        )
    })
}

fn parse_override(s: &str) -> Result<(String, serde_json::Value), String> {
    let (path, value) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}`: expected PATH=VALUE"))?;
    if path.is_empty() || path.split('.').any(str::is_empty) {
        return Err(format!("`{s}`: empty key in `{path}`"));
    }
    let v = serde_json::from_str(value).unwrap_or_else(|_| serde_json::Value::String(value.into()));
    Ok((path.to_string(), v))
}

fn parse_profile(s: &str) -> Result<DataProfile, String> {
    match s {
        "mini" => Ok(DataProfile::Mini),
        "smoke" => Ok(DataProfile::Smoke),
        _ => Err(format!(
            "unknown data profile `{s}` (expected mini or smoke)"
        )),
    }
}

fn main() {
    cnext_suite::runtime::init_threads();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {}", error_text(&e));
        std::process::exit(1);
    }
}

/// The error and its causes, each cause once: many of our errors already print their source
/// (`file: cannot read: <io error>`), and `{:#}` would repeat it.
fn error_text(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let c = cause.to_string();
        if !msg.contains(&c) {
            if !msg.is_empty() {
                msg.push_str(": ");
            }
            msg.push_str(&c);
        }
    }
    msg
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Cache {
            cmd: CacheCmd::Export { out, cache },
        } => {
            let written = cnext_harness::cache_io::export(&cache_dir(cache), &out)?;
            println!("exported {} entries to {}", written.len(), out.display());
            Ok(())
        }
        Cmd::Cache {
            cmd: CacheCmd::Import { archives, cache },
        } => {
            let r = cnext_harness::cache_io::import(&cache_dir(cache), &archives)?;
            println!(
                "imported {} entries, kept {} already complete",
                r.imported.len(),
                r.skipped.len()
            );
            Ok(())
        }
        Cmd::Data { cmd } => match cmd {
            DataCmd::Generate {
                profile,
                seed,
                out,
                force,
            } => generate(profile, seed, out, force),
            DataCmd::Check { root } => check(&root),
        },
        Cmd::Metrics { matrix, json } => metrics(&matrix, json),
        Cmd::Bench {
            cmd: BenchCmd::Pema { max_dense },
        } => crate::bench::pema(max_dense),
        Cmd::Bench {
            cmd:
                BenchCmd::Data {
                    task,
                    scale,
                    root,
                    child,
                },
        } => crate::bench_data::run(task, scale, root, child),
        Cmd::Bench {
            cmd:
                BenchCmd::Step {
                    profile,
                    steps,
                    dump,
                },
        } => crate::bench_step::run(profile, steps, dump.as_deref()),
        Cmd::Base {
            profile,
            seed,
            cache,
            device,
        } => ensure_base(
            &cache_dir(cache),
            profile,
            seed,
            &cnext_bases::BaseSpec::builtin(profile, seed),
            device,
        )
        .map(|_| ()),
        Cmd::Run {
            method,
            order,
            profile,
            model,
            clip_model,
            data_root,
            seed,
            seeds,
            data_seed,
            steps,
            lr,
            out,
            cache,
            device,
            judge,
            judge_model,
            set,
        } => crate::run::run_cmd(crate::run::RunArgs {
            method,
            order,
            profile,
            model,
            clip_model,
            data_root,
            seeds: if seeds.is_empty() { vec![seed] } else { seeds },
            data_seed,
            steps,
            lr,
            out,
            cache,
            device,
            judge: judge.map(|url| (url, judge_model)),
            overrides: set.into_iter().collect(),
        }),
        Cmd::Score {
            task,
            annotations,
            predictions,
            compat,
            json,
            per_sample,
            profile,
            seed,
            cache,
            clip_model,
            clip_device,
        } => match clip_model {
            Some(dir) => score(
                task,
                &annotations,
                &predictions,
                compat,
                json,
                per_sample,
                || crate::clip_cli::load_hf_clip(&dir, clip_device),
            ),
            None => score(
                task,
                &annotations,
                &predictions,
                compat,
                json,
                per_sample,
                || ensure_clip(&cache_dir(cache), profile, seed),
            ),
        },
        Cmd::ClipScore(args) => crate::clip_cli::clip_score_cmd(args),
        Cmd::Report { dirs, out } => cnext_suite::report::report_cmd(&dirs, out),
        Cmd::Infer(args) => crate::infer::run(args),
        Cmd::ExportAdapter(args) => crate::export::export_cmd(args),
    }
}

fn generate(profile: DataProfile, seed: u64, out: Option<PathBuf>, force: bool) -> Result<()> {
    let out = out.unwrap_or_else(|| {
        PathBuf::from(format!("target/cnext/data/{}-seed{seed}", profile.as_str()))
    });
    let cfg = GenConfig::new(profile, seed);
    let t = Instant::now();
    let m = cnext_datasets::generate(&out, &cfg, force)?;
    let mut table = Table::new();
    table.set_header(["task", "version", "train", "test", "images"]);
    for (task, tm) in &m.tasks {
        table.add_row([
            task.to_string(),
            tm.version.to_string(),
            tm.train.to_string(),
            tm.test.to_string(),
            tm.images.to_string(),
        ]);
    }
    println!("{table}");
    println!(
        "wrote {} in {:.1} s (profile {}, seed {seed})",
        out.display(),
        t.elapsed().as_secs_f64(),
        profile.as_str()
    );
    Ok(())
}

/// Problems printed per file; the rest are counted (a systematic error repeats on every line).
const PROBLEMS_PER_FILE: usize = 20;

fn check(root: &Path) -> Result<()> {
    let report = cnext_datasets::check::check_root(root);
    let mut table = Table::new();
    table.set_header(["task", "train", "test", "scorer"]);
    for c in &report.tasks {
        table.add_row([
            c.task.to_string(),
            c.train.to_string(),
            c.test.to_string(),
            TaskSpec::of(c.task).scorer.to_string(),
        ]);
    }
    println!("{table}");
    match report.describe(root, PROBLEMS_PER_FILE) {
        None => Ok(()),
        Some(text) => {
            // The problems on stderr, the count as the error (the last line).
            let (lines, last) = text.rsplit_once('\n').unwrap_or(("", &text));
            if !lines.is_empty() {
                eprintln!("{lines}");
            }
            anyhow::bail!("{last}")
        }
    }
}

fn metrics(path: &Path, json: bool) -> Result<()> {
    let f =
        std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let m = AccuracyMatrix::from_csv_reader(f, &path.display().to_string())?;
    let met = Metrics::of(&m);
    if json {
        let obj = serde_json::json!({
            "avg_acc": met.avg_acc.map(cnext_core::metrics::round2),
            "forgetting": met.forgetting.map(cnext_core::metrics::round2),
            "new_acc": met.new_acc.map(cnext_core::metrics::round2),
            "max_forgetting": met.max_forgetting.map(cnext_core::metrics::round2),
            "bwt": met.bwt.map(cnext_core::metrics::round2),
            "mft": met.mft.map(cnext_core::metrics::round2),
            "mfn": met.mfn.map(cnext_core::metrics::round2),
            "maa": met.maa.map(cnext_core::metrics::round2),
        });
        println!("{obj}");
        return Ok(());
    }
    let mut table = Table::new();
    let mut header = vec!["stage".to_string()];
    header.extend(m.tasks().iter().map(|t| t.to_string()));
    header.push("Avg.ACC".into());
    table.set_header(header);
    let curve = cnext_core::metrics::stage_avg_acc(&m);
    for (j, row) in m.rows().iter().enumerate() {
        let mut cells = vec![(j + 1).to_string()];
        cells.extend(row.iter().map(|c| opt2(*c)));
        cells.push(opt2(curve.get(j).copied().flatten()));
        table.add_row(cells);
    }
    println!("{table}");
    let mut t2 = Table::new();
    t2.set_header([
        "Avg.ACC",
        "Forgetting",
        "New.ACC",
        "max_forgetting",
        "BWT",
        "MAA",
    ]);
    t2.add_row([
        opt2(met.avg_acc),
        opt2(met.forgetting),
        opt2(met.new_acc),
        opt2(met.max_forgetting),
        opt2(met.bwt),
        opt2(met.maa),
    ]);
    println!("{t2}");
    Ok(())
}

/// Scores a prediction file; `clip` loads the CLIP-like scorer (the tiny one or a Hugging
/// Face CLIP), called for image tasks only.
fn score<C: ClipModel<Image = image::RgbImage>>(
    task: TaskId,
    annotations: &Path,
    predictions: &Path,
    compat: Compat,
    json: bool,
    per_sample: Option<PathBuf>,
    clip: impl FnOnce() -> Result<C>,
) -> Result<()> {
    let spec = TaskSpec::of(task);
    let tests = load_test_file(annotations, task, ImageCheck::PathsOnly)?;
    let preds = read_predictions(predictions)?;
    let clip = match spec.output() {
        cnext_core::Modality::Image => Some(clip()?),
        cnext_core::Modality::Text => None,
    };
    let s = score_task(&spec, &tests, &preds, predictions, compat, clip.as_ref())?;
    if let Some(out) = per_sample {
        let mut body = String::new();
        for p in &s.per_sample {
            body.push_str(&serde_json::to_string(p)?);
            body.push('\n');
        }
        cnext_harness::run::write_atomic(&out, body.as_bytes())?;
    }
    if json {
        let obj = serde_json::json!({
            "task": task,
            "scorer": spec.scorer,
            "compat": compat,
            "accuracy": cnext_core::metrics::round2(s.accuracy),
            "samples": s.samples,
            "missing": s.missing.len(),
            "format_errors": s.per_sample.iter().filter(|p| p.format_error).count(),
        });
        println!("{obj}");
    } else {
        println!(
            "{task} ({}, compat {compat}): accuracy {} over {} samples",
            spec.scorer,
            fmt2(s.accuracy),
            s.samples
        );
        let fe = s.per_sample.iter().filter(|p| p.format_error).count();
        if fe > 0 {
            println!("{fe} predictions could not be parsed (scored 0)");
        }
    }
    if !s.missing.is_empty() {
        let shown: Vec<String> = s.missing.iter().take(10).map(|q| q.to_string()).collect();
        eprintln!(
            "warning: {} test samples have no prediction (scored 0): {}{}",
            s.missing.len(),
            shown.join(", "),
            if s.missing.len() > 10 { ", ..." } else { "" }
        );
    }
    Ok(())
}

mod bench;
mod bench_data;
mod bench_dump;
mod bench_step;
mod clip_cli;
mod export;
mod infer;
mod run;
