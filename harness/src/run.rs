//! One benchmark run: a method over an order. Each stage comes from the stage cache (trained
//! on first use, with every seen task evaluated); the run fills the accuracy matrix and writes
//! matrix.csv, results.json, predictions in the official merge.jsonl format, and generated
//! images.

use crate::errors::{error_report, Cell, ErrorReport};
use crate::eval::EvalError;
use crate::optim::AdamWConfig;
use crate::stages::{Chain, StageRecord};
use crate::train::{StageStats, TrainConfig, TrainError};
use cnext_adapters::LoraConfig;
use cnext_core::metrics::Metrics;
use cnext_core::scoring::clip::ClipModel;
use cnext_core::transfer::{all_transfers, Transfer};
use cnext_core::{AccuracyMatrix, MatrixError, Order};
use cnext_datasets::errors::Judge;
use cnext_datasets::loader::DataError;
use cnext_datasets::TaskSpec;
use image::RgbImage;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Everything about a run that is not the method: the order, adapters, training and
/// evaluation settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub order: Order,
    pub seed: u64,
    pub lora: LoraConfig,
    /// Per-stage training (a joint method trains `steps * tasks` steps on the union).
    pub stage: TrainConfig,
    pub eval_batch: usize,
}

impl RunConfig {
    /// `lr_scale`: the base's parameter groups ([`cnext_backbones::BaseModel::lr_scale`]).
    pub fn new(order: Order, seed: u64, steps: usize, lr_scale: BTreeMap<String, f64>) -> Self {
        RunConfig {
            order,
            seed,
            lora: LoraConfig::default(),
            stage: TrainConfig {
                steps,
                batch_size: 32,
                optim: AdamWConfig {
                    lr: 2e-3,
                    lr_scale,
                    ..Default::default()
                },
                seed,
                epochs: None,
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
    #[error("stage cache: {0}")]
    Stage(String),
    /// A cache key input that cannot be computed (never replaced by a default).
    #[error("stage cache key: {0}")]
    Key(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunResult {
    pub method: String,
    pub method_config: serde_json::Value,
    pub config: RunConfig,
    pub matrix: AccuracyMatrix,
    pub metrics: Metrics,
    /// Training statistics per stage (None: the stage trains nothing).
    pub stages: Vec<Option<StageStats>>,
    /// Seconds spent evaluating after each stage (when it was trained).
    pub eval_seconds: Vec<f64>,
    /// The stage cache entries the run used, and whether this run trained them.
    pub stage_keys: Vec<String>,
    /// The method's diagnostics after each stage (empty for most methods).
    pub diagnostics: Vec<BTreeMap<String, f64>>,
    pub trained_now: Vec<bool>,
    /// Error types of the wrong text answers (absent in runs written before they existed).
    #[serde(default)]
    pub errors: Option<ErrorReport>,
    /// How learning each task moved every earlier task (the paper's Table 3).
    #[serde(default)]
    pub transfer: Vec<Transfer>,
    pub base: String,
    /// Where it trained (`cpu`, `cuda:0`): matrices are deterministic per machine and device.
    pub device: String,
    pub versions: BTreeMap<String, String>,
}

pub fn device_name(d: &candle_core::Device) -> String {
    match d.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// [`cnext_core::fsx::write_atomic`] with the path in the error.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), RunError> {
    cnext_core::fsx::write_atomic(path, bytes).map_err(|source| RunError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Copies the files of `from` into `to` (each written atomically).
fn copy_dir(from: &Path, to: &Path) -> Result<(), RunError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| RunError::Io { path, source }
    };
    let mut names: Vec<_> = std::fs::read_dir(from)
        .map_err(io(from))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(io(from))?;
    names.sort_by_key(|e| e.file_name());
    for e in names {
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()))?;
        } else {
            let bytes = std::fs::read(&p).map_err(io(&p))?;
            write_atomic(&to.join(e.file_name()), &bytes)?;
        }
    }
    Ok(())
}

/// Runs the chain stage by stage (cached stages are loaded, not retrained), writing the run
/// folder `out`. Wrong text answers are typed by the rules, or by `judge` when given.
pub fn run<C: ClipModel<Image = RgbImage> + Sync>(
    chain: &Chain<C>,
    out: &Path,
    judge: Option<&dyn Judge>,
) -> Result<RunResult, RunError> {
    let cfg = chain.cfg;
    let order = cfg.order.tasks();
    let (matrix, entries) = chain.matrix()?;
    for (j, e) in entries.iter().enumerate() {
        for t in chain.seen(j + 1) {
            copy_dir(
                &e.predictions(t),
                &out.join("predictions")
                    .join(format!("stage{}", j + 1))
                    .join(t.as_str()),
            )?;
        }
    }
    let cells: Vec<Cell> = entries
        .iter()
        .enumerate()
        .flat_map(|(j, e)| {
            chain.seen(j + 1).into_iter().map(move |task| Cell {
                stage: j + 1,
                task,
                predictions: e.predictions(task),
            })
        })
        .collect();
    let errors = error_report(&matrix, &cells, &|t| chain.references(t), judge)?;
    let trained_now = entries.iter().map(|e| e.trained_now).collect();
    let records: Vec<StageRecord> = entries.into_iter().map(|e| e.record).collect();
    let mut versions = BTreeMap::new();
    versions.insert("cnext".into(), env!("CARGO_PKG_VERSION").into());
    for t in order {
        versions.insert(format!("task.{t}"), TaskSpec::of(t).version.to_string());
    }
    let result = RunResult {
        method: chain.method_id().to_string(),
        method_config: chain.method_config().clone(),
        config: cfg.clone(),
        metrics: Metrics::of(&matrix).rounded(),
        stages: records.iter().map(|r| r.stats.clone()).collect(),
        eval_seconds: records.iter().map(|r| r.eval_seconds).collect(),
        stage_keys: records.iter().map(|r| r.key.clone()).collect(),
        diagnostics: records.iter().map(|r| r.diagnostics.clone()).collect(),
        trained_now,
        errors: Some(errors),
        transfer: all_transfers(&matrix),
        matrix,
        base: chain.base.name(),
        device: device_name(chain.base.device()),
        versions,
    };
    write_atomic(
        &out.join("matrix.csv"),
        result.matrix.to_csv_string().as_bytes(),
    )?;
    let json = serde_json::to_string_pretty(&result)
        .map_err(|e| RunError::Stage(format!("results.json: {e}")))?;
    write_atomic(&out.join("results.json"), json.as_bytes())?;
    Ok(result)
}
