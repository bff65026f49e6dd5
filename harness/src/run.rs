//! One benchmark run: for each stage of an order, train (harness-owned loop) and evaluate every
//! task seen so far; fill the accuracy matrix; write matrix.csv, results.json, predictions in
//! the official merge.jsonl format, and generated images.

use crate::assets::Base;
use crate::eval::{evaluate, EvalError, TaskEval};
use crate::optim::AdamWConfig;
use crate::tasks::{eval_items, train_examples, EvalItem};
use crate::train::{train, StageStats, TrainConfig, TrainError};
use cnext_adapters::{AdapterPlan, LoraConfig};
use cnext_backbones::nano::backbone::NanoBackbone;
use cnext_backbones::Example;
use cnext_core::metrics::Metrics;
use cnext_core::scoring::clip::ClipModel;
use cnext_core::{AccuracyMatrix, MatrixError, Order, TaskId};
use cnext_datasets::loader::{load_task, DataError};
use cnext_datasets::TaskSpec;
use image::RgbImage;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The methods `cnext run` knows so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MethodId {
    ZeroShot,
    Lora,
    UpperBound,
}

impl MethodId {
    /// The id as the CLI, run folders and prediction records spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            MethodId::ZeroShot => "zero_shot",
            MethodId::Lora => "lora",
            MethodId::UpperBound => "upper_bound",
        }
    }
}

impl std::str::FromStr for MethodId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "zero_shot" => Ok(MethodId::ZeroShot),
            "lora" => Ok(MethodId::Lora),
            "upper_bound" => Ok(MethodId::UpperBound),
            _ => Err(format!(
                "unknown method `{s}` (expected zero_shot, lora, upper_bound)"
            )),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub method: MethodId,
    pub order: Order,
    pub seed: u64,
    pub lora: LoraConfig,
    /// Per-stage training (upper_bound trains `steps * tasks` steps on the union).
    pub stage: TrainConfig,
    pub eval_batch: usize,
}

impl RunConfig {
    pub fn new(method: MethodId, order: Order, seed: u64, steps: usize) -> Self {
        RunConfig {
            method,
            order,
            seed,
            lora: LoraConfig::default(),
            stage: TrainConfig {
                steps,
                batch_size: 32,
                optim: AdamWConfig {
                    lr: 2e-3,
                    ..Default::default()
                },
                seed,
            },
            eval_batch: 64,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error(transparent)]
    Eval(#[from] EvalError),
    #[error(transparent)]
    Matrix(#[from] MatrixError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunResult {
    pub config: RunConfig,
    pub matrix: AccuracyMatrix,
    pub metrics: Metrics,
    pub stages: Vec<StageStats>,
    /// Seconds spent evaluating after each stage.
    pub eval_seconds: Vec<f64>,
    pub base: String,
    /// Where it trained (`cpu`, `cuda:0`): matrices are deterministic per machine and device.
    pub device: String,
    pub versions: BTreeMap<String, String>,
}

fn device_name(d: &candle_core::Device) -> String {
    match d.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// Writes a file through a temp file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), RunError> {
    use std::io::Write;
    let io = |source| RunError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).map_err(io)?;
    }
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

fn save_eval(out: &Path, stage: usize, task: TaskId, ev: &TaskEval) -> Result<(), RunError> {
    let dir = out
        .join("predictions")
        .join(format!("stage{stage}"))
        .join(task.as_str());
    let mut body = String::new();
    for p in &ev.predictions {
        body.push_str(&serde_json::to_string(p).unwrap_or_default());
        body.push('\n');
    }
    write_atomic(&dir.join("merge.jsonl"), body.as_bytes())?;
    for (p, img) in ev.predictions.iter().zip(&ev.images) {
        let path = dir.join(&p.text);
        let mut buf = std::io::Cursor::new(Vec::new());
        img.write_to(&mut buf, image::ImageFormat::Png)
            .map_err(|e| RunError::Io {
                path: path.clone(),
                source: std::io::Error::other(e),
            })?;
        write_atomic(&path, buf.get_ref())?;
    }
    Ok(())
}

/// Runs `cfg` on the data under `data_root` with the base `base`, writing into `out`.
pub fn run<C: ClipModel<Image = RgbImage>>(
    cfg: &RunConfig,
    base: &Base,
    data_root: &Path,
    clip: &C,
    out: &Path,
    progress: bool,
) -> Result<RunResult, RunError> {
    let order = cfg.order.tasks();
    let mut train_sets: BTreeMap<TaskId, Vec<Example>> = BTreeMap::new();
    let mut eval_sets: BTreeMap<TaskId, Vec<EvalItem>> = BTreeMap::new();
    for t in order {
        let d = load_task(data_root, t)?;
        train_sets.insert(t, train_examples(&d)?);
        eval_sets.insert(t, eval_items(&d)?);
    }
    let plan = match cfg.method {
        MethodId::ZeroShot => AdapterPlan::none(),
        _ => AdapterPlan::lora(cfg.lora.clone(), cfg.seed),
    };
    let model = NanoBackbone::from_base(
        &base.cfg,
        &base.weights,
        base.tokenizer.clone(),
        base.codebook.clone(),
        plan,
        &base.device,
    )?;
    let vars = cnext_backbones::Backbone::trainable(&model);
    let model_id = cfg.method.as_str();
    let image_path = |qid: &str| format!("{qid}.png");
    let eval_task = |t: TaskId, stage: usize| -> Result<f64, RunError> {
        let ev = evaluate(
            &model,
            &TaskSpec::of(t),
            &eval_sets[&t],
            Some(clip),
            cfg.eval_batch,
            model_id,
            &image_path,
        )?;
        save_eval(out, stage, t, &ev)?;
        Ok(ev.accuracy)
    };
    let mut stages = vec![];
    let mut eval_seconds = vec![];
    let matrix = match cfg.method {
        MethodId::UpperBound => {
            let all: Vec<Example> = order.iter().flat_map(|t| train_sets[t].clone()).collect();
            let tc = TrainConfig {
                steps: cfg.stage.steps * order.len(),
                ..cfg.stage.clone()
            };
            stages.push(train(
                &model,
                &vars,
                &all,
                &tc,
                "upper_bound: joint",
                progress,
            )?);
            let t0 = std::time::Instant::now();
            let row = order
                .iter()
                .map(|&t| eval_task(t, 1).map(Some))
                .collect::<Result<Vec<_>, _>>()?;
            eval_seconds.push(t0.elapsed().as_secs_f64());
            AccuracyMatrix::joint(order.to_vec(), row)?
        }
        MethodId::ZeroShot => {
            let t0 = std::time::Instant::now();
            let row: Vec<f64> = order
                .iter()
                .map(|&t| eval_task(t, 1))
                .collect::<Result<_, _>>()?;
            eval_seconds.push(t0.elapsed().as_secs_f64());
            let mut m = AccuracyMatrix::sequential(order.to_vec())?;
            for j in 0..order.len() {
                m.push_row(
                    (0..order.len())
                        .map(|i| (i <= j).then_some(row[i]))
                        .collect(),
                )?;
            }
            m
        }
        MethodId::Lora => {
            let mut m = AccuracyMatrix::sequential(order.to_vec())?;
            for (j, &t) in order.iter().enumerate() {
                let label = format!("{model_id}: stage {} {t}", j + 1);
                stages.push(train(
                    &model,
                    &vars,
                    &train_sets[&t],
                    &cfg.stage,
                    &label,
                    progress,
                )?);
                let t0 = std::time::Instant::now();
                let mut row = vec![None; order.len()];
                for (i, &seen) in order.iter().enumerate().take(j + 1) {
                    row[i] = Some(eval_task(seen, j + 1)?);
                }
                eval_seconds.push(t0.elapsed().as_secs_f64());
                m.push_row(row)?;
                write_atomic(&out.join("matrix.csv"), m.to_csv_string().as_bytes())?;
            }
            m
        }
    };
    let mut versions = BTreeMap::new();
    versions.insert("cnext".into(), env!("CARGO_PKG_VERSION").into());
    for t in order {
        versions.insert(format!("task.{t}"), TaskSpec::of(t).version.to_string());
    }
    let result = RunResult {
        config: cfg.clone(),
        metrics: Metrics::of(&matrix).rounded(),
        matrix,
        stages,
        eval_seconds,
        base: base.dir.display().to_string(),
        device: device_name(&base.device),
        versions,
    };
    write_atomic(
        &out.join("matrix.csv"),
        result.matrix.to_csv_string().as_bytes(),
    )?;
    let json = serde_json::to_string_pretty(&result).unwrap_or_default();
    write_atomic(&out.join("results.json"), json.as_bytes())?;
    Ok(result)
}
