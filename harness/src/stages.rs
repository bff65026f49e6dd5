//! The stage cache: every (method, order, stage) is trained once and stored on disk, keyed by
//! a hash of everything that shapes it (method id and config, adapters, training settings,
//! data, base, scorer, device, crate version, and the key of the stage before it). An entry
//! holds the trainable weights after the stage, the method's state, the stage's statistics,
//! and the evaluation of every task seen so far (scores and predictions).
//!
//! Safe under libtest threads (one in-process mutex: trainings never overlap) and under
//! nextest's process-per-test (an exclusive file lock per entry). Entries are written into a
//! temp folder and renamed, so a killed run never leaves an entry that looks complete.

use crate::assets::Base;
use crate::eval::{evaluate, TaskEval};
use crate::method::{Ensembled, Method, MethodFactory, Schedule, StageInfo};
use crate::run::{RunConfig, RunError};
use crate::tasks::{eval_items, train_examples, EvalItem, Reference};
use crate::train::{train, StageStats};
use candle_core::Tensor;
use cnext_backbones::nano::backbone::NanoBackbone;
use cnext_backbones::{Backbone, Example};
use cnext_core::scoring::clip::ClipModel;
use cnext_core::{AccuracyMatrix, TaskId};
use cnext_datasets::formats::QuestionId;
use cnext_datasets::loader::load_task;
use cnext_datasets::TaskSpec;
use image::RgbImage;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Trainings in one process never overlap (they would oversubscribe the cores).
static TRAINING: Mutex<()> = Mutex::new(());

/// The evaluation of one task after a stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CellEval {
    /// Percent (text tasks) or mean CLIP score (image tasks).
    pub accuracy: f64,
    pub samples: usize,
}

/// What an entry records besides its tensors (`entry.json`, written last).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageRecord {
    pub key: String,
    /// 1-based; a joint stage is stage 1.
    pub stage: usize,
    /// The task trained (None: zero-shot, or the joint union).
    pub task: Option<TaskId>,
    /// The method that trained it (`shared:<architecture>` for a shared first stage).
    pub trained_by: String,
    pub stats: Option<StageStats>,
    pub evals: BTreeMap<TaskId, CellEval>,
    pub eval_seconds: f64,
    /// The method's diagnostics after the stage (`Method::diagnostics`).
    #[serde(default)]
    pub diagnostics: BTreeMap<String, f64>,
    /// The inputs of the key, for provenance.
    pub key_inputs: serde_json::Value,
}

/// A complete entry on disk.
#[derive(Debug, Clone)]
pub struct StageEntry {
    pub dir: PathBuf,
    pub record: StageRecord,
    /// True when this call trained it (false: loaded from the cache).
    pub trained_now: bool,
}

impl StageEntry {
    /// The folder of a task's predictions (merge.jsonl and generated images).
    pub fn predictions(&self, task: TaskId) -> PathBuf {
        self.dir.join("predictions").join(task.as_str())
    }
}

/// One method over one order, on one base, data set and scorer.
pub struct Chain<'a, C> {
    pub cache: &'a Path,
    pub base: &'a Base,
    pub data_root: &'a Path,
    /// Identifies the data (profile, seed, generator version).
    pub data_key: String,
    pub clip: &'a C,
    /// Identifies the scorer.
    pub clip_key: String,
    pub cfg: &'a RunConfig,
    pub new_method: MethodFactory,
    pub progress: bool,
    data: Mutex<BTreeMap<TaskId, TaskSets>>,
}

/// A task's training examples and evaluation items, loaded once per chain.
type TaskSets = Arc<(Vec<Example>, Vec<EvalItem>)>;

pub(crate) fn sha16(v: &serde_json::Value) -> String {
    let d = Sha256::digest(v.to_string().as_bytes());
    d.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

impl<'a, C: ClipModel<Image = RgbImage> + Sync> Chain<'a, C> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cache: &'a Path,
        base: &'a Base,
        data_root: &'a Path,
        data_key: String,
        clip: &'a C,
        clip_key: String,
        cfg: &'a RunConfig,
        new_method: MethodFactory,
    ) -> Self {
        Chain {
            cache,
            base,
            data_root,
            data_key,
            clip,
            clip_key,
            cfg,
            new_method,
            progress: false,
            data: Mutex::default(),
        }
    }

    /// Every stage of the chain (trained if needed) and the accuracy matrix they make.
    pub fn matrix(&self) -> Result<(AccuracyMatrix, Vec<StageEntry>), RunError> {
        let order = self.cfg.order.tasks();
        let mut m = AccuracyMatrix::sequential(order.to_vec())?;
        let mut entries = vec![];
        for k in 1..=self.stages() {
            let e = self.ensure(k)?;
            let row: Vec<Option<f64>> = order
                .iter()
                .map(|t| e.record.evals.get(t).map(|c| c.accuracy))
                .collect();
            if self.method().schedule() == Schedule::Joint {
                m = AccuracyMatrix::joint(order.to_vec(), row)?;
            } else {
                m.push_row(row)?;
            }
            entries.push(e);
        }
        Ok((m, entries))
    }

    fn method(&self) -> Box<dyn Method> {
        (self.new_method)()
    }

    /// How many stages the chain has (1 for a joint method).
    pub fn stages(&self) -> usize {
        match self.method().schedule() {
            Schedule::Joint => 1,
            _ => self.cfg.order.tasks().len(),
        }
    }

    /// The tasks evaluated after stage `k`.
    pub fn seen(&self, k: usize) -> Vec<TaskId> {
        let order = self.cfg.order.tasks();
        match self.method().schedule() {
            Schedule::Joint => order.to_vec(),
            _ => order[..k.min(order.len())].to_vec(),
        }
    }

    /// The text references of task `t`'s test questions, by question id (image tasks: none).
    pub fn references(&self, t: TaskId) -> Result<BTreeMap<QuestionId, Vec<String>>, RunError> {
        let sets = self.task_data(t)?;
        Ok(sets
            .1
            .iter()
            .filter_map(|i| match &i.reference {
                Reference::Text(r) => Some((i.question_id.clone(), r.clone())),
                _ => None,
            })
            .collect())
    }

    fn task_data(&self, t: TaskId) -> Result<TaskSets, RunError> {
        let mut m = self.data.lock().map_err(|_| poisoned())?;
        if let Some(d) = m.get(&t) {
            return Ok(d.clone());
        }
        let d = load_task(self.data_root, t)?;
        let v = Arc::new((train_examples(&d)?, eval_items(&d)?));
        m.insert(t, v.clone());
        Ok(v)
    }

    /// Whether stage `k` shares the first-stage checkpoint of its adapter architecture.
    fn shared(&self, k: usize) -> bool {
        let m = self.method();
        k == 1 && m.schedule() == Schedule::Sequential && m.shares_first_stage()
    }

    /// The progress label of sequential stage `k`, which also names its shuffle stream: a shared
    /// stage's is the architecture's, so it comes out the same whichever method builds it.
    fn stage_label(&self, m: &dyn Method, k: usize) -> String {
        let t = self.cfg.order.tasks()[k - 1];
        if self.shared(k) {
            format!("{} (shared): stage {k} {t}", m.architecture())
        } else {
            format!("{}: stage {k} {t}", m.id())
        }
    }

    /// The key inputs of stage `k` (1-based) and its entry folder name.
    fn key(&self, k: usize) -> Result<(serde_json::Value, String), RunError> {
        let m = self.method();
        let order = self.cfg.order.tasks();
        let trained_by = if self.shared(k) {
            format!("shared:{}", m.architecture())
        } else {
            m.id().to_string()
        };
        let prev = if k > 1 {
            self.key(k - 1)?.1
        } else {
            String::new()
        };
        let mut inputs = serde_json::json!({
            "crate": env!("CARGO_PKG_VERSION"),
            "base": self.base.dir.file_name().map(|s| s.to_string_lossy().to_string()),
            "device": format!("{:?}", self.base.device.location()),
            "data": self.data_key,
            "clip": self.clip_key,
            "method": trained_by,
            "method_config": if self.shared(k) {
                serde_json::Value::Null
            } else {
                m.config().map_err(|e| RunError::Key(format!("{}: method config: {e}", m.id())))?
            },
            "schedule": format!("{:?}", m.schedule()),
            "lora": self.cfg.lora,
            "train": self.cfg.stage,
            "eval_batch": self.cfg.eval_batch,
            "seed": self.cfg.seed,
            "tasks": self.seen(k).iter()
                .map(|t| format!("{t}@v{}", TaskSpec::of(*t).version))
                .collect::<Vec<_>>(),
            "order_prefix": order[..k.min(order.len())].iter().map(|t| t.as_str()).collect::<Vec<_>>(),
            "prev": prev,
        });
        if self.shared(k) {
            // Before this input, the stream was named after whichever method built the
            // stage first; entries from then are not reused.
            inputs["stream"] = self.stage_label(m.as_ref(), k).into();
        }
        let task = match m.schedule() {
            Schedule::Joint => "joint".to_string(),
            _ => order[k - 1].to_string(),
        };
        let name = format!(
            "{}-stage{k}-{task}-{}",
            trained_by.replace(':', "-"),
            sha16(&inputs)
        );
        Ok((inputs, name))
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.cache.join("stages").join(name)
    }

    /// The entry of stage `k` (1-based), training it and the stages before it if needed.
    pub fn ensure(&self, k: usize) -> Result<StageEntry, RunError> {
        if k == 0 || k > self.stages() {
            return Err(RunError::Stage(format!(
                "stage {k} out of range 1..={}",
                self.stages()
            )));
        }
        if let Some(e) = self.load(k)? {
            return Ok(e);
        }
        let _g = TRAINING.lock().unwrap_or_else(|p| p.into_inner());
        self.ensure_locked(k).map(|(e, _)| e)
    }

    fn load(&self, k: usize) -> Result<Option<StageEntry>, RunError> {
        let (_, name) = self.key(k)?;
        let dir = self.dir(&name);
        let path = dir.join("entry.json");
        if !path.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).map_err(|source| RunError::Io {
            path: path.clone(),
            source,
        })?;
        let record = serde_json::from_str(&text)
            .map_err(|e| RunError::Stage(format!("{}: {e}", path.display())))?;
        Ok(Some(StageEntry {
            dir,
            record,
            trained_now: false,
        }))
    }

    /// With the in-process lock held: the entry of stage `k`, and the method and model state
    /// after it when this call had to build them (so the next stage continues in memory).
    fn ensure_locked(&self, k: usize) -> Result<(StageEntry, Option<Live>), RunError> {
        if let Some(e) = self.load(k)? {
            return Ok((e, None));
        }
        let (inputs, name) = self.key(k)?;
        let locks = self.cache.join("stages").join(".locks");
        let _lock = lock_exclusive(&locks, &name)
            .map_err(|(path, source)| RunError::Io { path, source })?;
        // Another process may have finished it while we waited for the lock.
        if let Some(e) = self.load(k)? {
            return Ok((e, None));
        }
        let live = self.build_stage(k, &inputs, &name)?;
        let e = self
            .load(k)?
            .ok_or_else(|| RunError::Stage(format!("{name}: entry missing after writing it")))?;
        Ok((
            StageEntry {
                trained_now: true,
                ..e
            },
            Some(live),
        ))
    }

    /// A model and a method in the state right after stage `k - 1` (a fresh one for k = 1).
    fn resume(&self, k: usize) -> Result<Live, RunError> {
        let mut method = self.method();
        let model = self
            .base
            .model(method.adapters(&self.cfg.lora, self.cfg.seed))?;
        if k == 1 {
            return Ok(Live { model, method });
        }
        let (prev, live) = self.ensure_locked(k - 1)?;
        if let Some(l) = live {
            // The previous stage was built by this call: its model and method are current.
            // A shared first stage was trained without this method's hooks.
            return self.after_shared(k - 1, l);
        }
        let vars = model.trainable();
        let weights = load_tensors(&prev.dir.join("weights.safetensors"), &self.base.device)?;
        for (name, var) in &vars {
            let t = weights.get(name).ok_or_else(|| {
                RunError::Stage(format!("{}: no tensor `{name}`", prev.dir.display()))
            })?;
            var.set(t)?;
        }
        let state_path = prev.dir.join("method_state.safetensors");
        if state_path.exists() {
            method.load_state(load_tensors(&state_path, &self.base.device)?)?;
        }
        self.after_shared(k - 1, Live { model, method })
    }

    /// A method continuing from a shared first stage computes its stage-1 state now.
    fn after_shared(&self, prev: usize, mut live: Live) -> Result<Live, RunError> {
        if self.shared(prev) {
            let order = self.cfg.order.tasks();
            let data = self.task_data(order[0])?;
            let vars = live.model.trainable();
            live.method.end_task(
                StageInfo {
                    stage: 1,
                    task: order[0],
                    order: &order,
                    seed: self.cfg.seed,
                },
                &live.model,
                &vars,
                &data.0,
            )?;
        }
        Ok(live)
    }

    fn build_stage(
        &self,
        k: usize,
        inputs: &serde_json::Value,
        name: &str,
    ) -> Result<Live, RunError> {
        let mut live = self.resume(k)?;
        let order = self.cfg.order.tasks();
        let schedule = live.method.schedule();
        let vars = live.model.trainable();
        let id = live.method.id();
        let (task, stats) = match schedule {
            Schedule::Frozen => (None, None),
            Schedule::Joint => {
                let mut all = vec![];
                for &t in &order {
                    all.extend(self.task_data(t)?.0.iter().cloned());
                }
                let tc = crate::train::TrainConfig {
                    steps: self.cfg.stage.steps * order.len(),
                    ..self.cfg.stage.clone()
                };
                let label = format!("{id}: joint");
                let s = train(
                    &live.model,
                    &vars,
                    &all,
                    &tc,
                    &label,
                    self.progress,
                    live.method.as_mut(),
                )?;
                (None, Some(s))
            }
            Schedule::Sequential => {
                let t = order[k - 1];
                let data = self.task_data(t)?;
                let info = StageInfo {
                    stage: k,
                    task: t,
                    order: &order,
                    seed: self.cfg.seed,
                };
                let shared = self.shared(k);
                let label = self.stage_label(live.method.as_ref(), k);
                // A shared first stage trains without the method's hooks.
                if !shared {
                    live.method.begin_task(info, &vars)?;
                }
                let mut no_hooks = ();
                let hooks: &mut dyn crate::method::Hooks = if shared {
                    &mut no_hooks
                } else {
                    live.method.as_mut()
                };
                let s = train(
                    &live.model,
                    &vars,
                    &data.0,
                    &self.cfg.stage,
                    &label,
                    self.progress,
                    hooks,
                )?;
                if !shared {
                    live.method.end_task(info, &live.model, &vars, &data.0)?;
                }
                (Some(t), Some(s))
            }
        };
        // Write into a temp folder; a stale one is from a killed run (we hold the lock).
        let stages = self.cache.join("stages");
        let tmp = stages.join(format!(".tmp-{name}"));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|source| RunError::Io {
                path: tmp.clone(),
                source,
            })?;
        }
        let t0 = std::time::Instant::now();
        let mut evals = BTreeMap::new();
        let ensembled = live
            .method
            .ensemble(&live.model.trainable())?
            .map(|sets| Ensembled {
                inner: &live.model,
                sets,
            });
        let scored: &dyn Backbone = match &ensembled {
            Some(e) => e,
            None => &live.model,
        };
        for t in self.seen(k) {
            let data = self.task_data(t)?;
            let ev = evaluate(
                scored,
                &TaskSpec::of(t),
                &data.1,
                Some(self.clip),
                self.cfg.eval_batch,
                id,
                &|qid: &str| format!("{qid}.png"),
            )?;
            save_eval(&tmp.join("predictions").join(t.as_str()), &ev)?;
            evals.insert(
                t,
                CellEval {
                    accuracy: ev.accuracy,
                    samples: ev.scores.len(),
                },
            );
        }
        let eval_seconds = t0.elapsed().as_secs_f64();
        save_tensors(
            &tmp.join("weights.safetensors"),
            &live.model.trainable_tensors(),
        )?;
        // Fault injection for the kill tests (`suite/tests/resilience.rs`): die without cleanup,
        // as SIGKILL would, with half of stage k's entry written.
        if std::env::var("CNEXT_ABORT_IN_ENTRY_WRITE").is_ok_and(|v| v == k.to_string()) {
            std::process::abort();
        }
        let state = if self.shared(k) {
            BTreeMap::new()
        } else {
            live.method.state()
        };
        if !state.is_empty() {
            save_tensors(&tmp.join("method_state.safetensors"), &state)?;
        }
        let record = StageRecord {
            key: name.to_string(),
            stage: k,
            task,
            trained_by: inputs["method"].as_str().unwrap_or(id).to_string(),
            stats,
            evals,
            eval_seconds,
            diagnostics: if self.shared(k) {
                BTreeMap::new()
            } else {
                live.method.diagnostics()
            },
            key_inputs: inputs.clone(),
        };
        let json = serde_json::to_string_pretty(&record)
            .map_err(|e| RunError::Stage(format!("{name}: {e}")))?;
        crate::run::write_atomic(&tmp.join("entry.json"), json.as_bytes())?;
        let dir = self.dir(name);
        // A folder without entry.json is not an entry (it was tampered with): replace it.
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|source| RunError::Io {
                path: dir.clone(),
                source,
            })?;
        }
        std::fs::rename(&tmp, &dir).map_err(|source| RunError::Io { path: dir, source })?;
        if !self.progress {
            // Test runs show which stages they trained (and that none trained twice).
            let secs = record.stats.as_ref().map_or(0.0, |s| s.seconds);
            eprintln!("stage cache: trained {name} ({secs:.1} s + eval {eval_seconds:.1} s)");
        }
        Ok(live)
    }
}

/// A model and its method, in memory.
struct Live {
    model: NanoBackbone,
    method: Box<dyn Method>,
}

/// Blocks until this process holds the exclusive lock `<dir>/<name>.lock` (released when the
/// returned file is dropped); the error names the path.
pub fn lock_exclusive(dir: &Path, name: &str) -> Result<std::fs::File, (PathBuf, std::io::Error)> {
    std::fs::create_dir_all(dir).map_err(|e| (dir.to_path_buf(), e))?;
    let path = dir.join(format!("{name}.lock"));
    let f = std::fs::File::create(&path).map_err(|e| (path.clone(), e))?;
    f.lock().map_err(|e| (path, e))?;
    Ok(f)
}

fn poisoned() -> RunError {
    RunError::Stage("stage cache state poisoned by a panic".into())
}

fn save_tensors(path: &Path, t: &BTreeMap<String, Tensor>) -> Result<(), RunError> {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).map_err(|source| RunError::Io {
            path: p.to_path_buf(),
            source,
        })?;
    }
    let map: std::collections::HashMap<String, Tensor> =
        t.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    candle_core::safetensors::save(&map, path)
        .map_err(|e| RunError::Stage(format!("{}: {e}", path.display())))
}

fn load_tensors(
    path: &Path,
    dev: &candle_core::Device,
) -> Result<BTreeMap<String, Tensor>, RunError> {
    candle_core::safetensors::load(path, dev)
        .map(|m| m.into_iter().collect())
        .map_err(|e| RunError::Stage(format!("{}: {e}", path.display())))
}

/// Writes a task's predictions (merge.jsonl) and generated images into `dir`.
pub fn save_eval(dir: &Path, ev: &TaskEval) -> Result<(), RunError> {
    let mut body = String::new();
    for p in &ev.predictions {
        let line = serde_json::to_string(p)
            .map_err(|e| RunError::Stage(format!("{}: {e}", dir.display())))?;
        body.push_str(&line);
        body.push('\n');
    }
    crate::run::write_atomic(&dir.join("merge.jsonl"), body.as_bytes())?;
    for (p, img) in ev.predictions.iter().zip(&ev.images) {
        let path = dir.join(&p.text);
        let mut buf = std::io::Cursor::new(Vec::new());
        img.write_to(&mut buf, image::ImageFormat::Png)
            .map_err(|e| RunError::Io {
                path: path.clone(),
                source: std::io::Error::other(e),
            })?;
        crate::run::write_atomic(&path, buf.get_ref())?;
    }
    Ok(())
}
