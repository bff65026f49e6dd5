//! The stage cache: every (method, order, stage) is trained once and stored on disk, keyed by
//! a hash of everything that shapes it (method id and config, adapters, training settings,
//! data, base, scorer, device, crate version, and the key of the stage before it). An entry
//! holds the trainable weights after the stage, the method's state, the stage's statistics,
//! and the evaluation of every task seen so far (scores and predictions).
//!
//! Safe under libtest threads (one in-process mutex: trainings never overlap) and under
//! nextest's process-per-test (an exclusive file lock per entry). Entries are written into a
//! temp folder and renamed, so a killed run never leaves an entry that looks complete.

use crate::checkpoint::Checkpointing;
use crate::data::{Examples, ImageCache, TrainSet, Union};
use crate::eval::{evaluate, Generation, TaskEval};
use crate::method::{Ensembled, Method, MethodFactory, Schedule, StageInfo};
use crate::run::{RunConfig, RunError};
use crate::tasks::{eval_items, EvalItem, Reference};
use crate::train::{train, StageStats};
use candle_core::Tensor;
use cnext_backbones::{Backbone, BaseModel};
use cnext_core::scoring::clip::ClipModel;
use cnext_core::{AccuracyMatrix, TaskId};
use cnext_datasets::formats::QuestionId;
use cnext_datasets::loader::load_test;
use cnext_datasets::TaskSpec;
use image::RgbImage;
use serde::{Deserialize, Serialize};
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

/// One method over one order, on one base, data set and scorer. Stages are walked forward:
/// every key is computed once, when the chain is made, and a walk that has to train keeps one
/// model and one method instance from the first missing stage to the last one asked for.
pub struct Chain<'a, C> {
    pub cache: &'a Path,
    pub base: &'a dyn BaseModel,
    pub data_root: &'a Path,
    /// Identifies the data (profile, seed, generator version).
    pub data_key: String,
    pub clip: &'a C,
    /// Identifies the scorer.
    pub clip_key: String,
    pub cfg: &'a RunConfig,
    pub new_method: MethodFactory,
    pub progress: bool,
    /// What the chain needs to know of its method without training it.
    meta: MethodMeta,
    /// Stage k's key inputs and entry name at index k - 1.
    keys: Vec<(serde_json::Value, String)>,
    data: Mutex<BTreeMap<TaskId, TaskSets>>,
    /// Decoded images of every task, bounded.
    images: Arc<ImageCache>,
    /// Steps between mid-stage checkpoints (`CNEXT_CHECKPOINT_EVERY`; 0: none).
    pub checkpoint_every: usize,
}

/// Steps between mid-stage checkpoints unless `CNEXT_CHECKPOINT_EVERY` says otherwise: a
/// nano checkpoint takes milliseconds, a Janus-Pro-1B LoRA one about a second.
pub const DEFAULT_CHECKPOINT_EVERY: usize = 500;

/// A method's identity, read once from one instance.
struct MethodMeta {
    id: &'static str,
    schedule: Schedule,
    shares_first_stage: bool,
    architecture: String,
    config: serde_json::Value,
}

/// A task's training examples and evaluation items, loaded once per chain.
type TaskSets = Arc<(TrainSet, Vec<EvalItem>)>;

impl<'a, C: ClipModel<Image = RgbImage> + Sync> Chain<'a, C> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cache: &'a Path,
        base: &'a dyn BaseModel,
        data_root: &'a Path,
        data_key: String,
        clip: &'a C,
        clip_key: String,
        cfg: &'a RunConfig,
        new_method: MethodFactory,
    ) -> Result<Self, RunError> {
        let m = new_method();
        let meta = MethodMeta {
            id: m.id(),
            schedule: m.schedule(),
            shares_first_stage: m.shares_first_stage(),
            architecture: m.architecture(),
            config: m
                .config()
                .map_err(|e| RunError::Key(format!("{}: method config: {e}", m.id())))?,
        };
        let mut chain = Chain {
            cache,
            base,
            data_root,
            data_key,
            clip,
            clip_key,
            cfg,
            new_method,
            progress: false,
            meta,
            keys: vec![],
            data: Mutex::default(),
            images: Arc::new(ImageCache::from_env()),
            checkpoint_every: std::env::var("CNEXT_CHECKPOINT_EVERY")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(DEFAULT_CHECKPOINT_EVERY),
        };
        let mut prev = String::new();
        for k in 1..=chain.stages() {
            let (inputs, name) = chain.key(k, &prev);
            prev = name.clone();
            chain.keys.push((inputs, name));
        }
        Ok(chain)
    }

    /// Every stage of the chain (trained if needed) and the accuracy matrix they make.
    pub fn matrix(&self) -> Result<(AccuracyMatrix, Vec<StageEntry>), RunError> {
        let order = self.cfg.order.tasks();
        let mut m = AccuracyMatrix::sequential(order.to_vec())?;
        let entries = self.walk(self.stages())?;
        for e in &entries {
            let row: Vec<Option<f64>> = order
                .iter()
                .map(|t| e.record.evals.get(t).map(|c| c.accuracy))
                .collect();
            if self.meta.schedule == Schedule::Joint {
                m = AccuracyMatrix::joint(order.to_vec(), row)?;
            } else {
                m.push_row(row)?;
            }
        }
        Ok((m, entries))
    }

    /// The method's registry id.
    pub fn method_id(&self) -> &'static str {
        self.meta.id
    }

    /// The method's knobs as JSON (as in the stage keys).
    pub fn method_config(&self) -> &serde_json::Value {
        &self.meta.config
    }

    /// How many stages the chain has (1 for a joint method).
    pub fn stages(&self) -> usize {
        match self.meta.schedule {
            Schedule::Joint => 1,
            _ => self.cfg.order.tasks().len(),
        }
    }

    /// The tasks evaluated after stage `k`.
    pub fn seen(&self, k: usize) -> Vec<TaskId> {
        let order = self.cfg.order.tasks();
        match self.meta.schedule {
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
        let dir = self.data_root.join(t.as_str());
        let v = Arc::new((
            TrainSet::open(&dir, t, self.images.clone())?,
            eval_items(&load_test(&dir, t)?),
        ));
        m.insert(t, v.clone());
        Ok(v)
    }

    /// Whether stage `k` shares the first-stage checkpoint of its adapter architecture.
    fn shared(&self, k: usize) -> bool {
        k == 1 && self.meta.schedule == Schedule::Sequential && self.meta.shares_first_stage
    }

    /// The progress label of sequential stage `k`, which also names its shuffle stream: a shared
    /// stage's is the architecture's, so it comes out the same whichever method builds it.
    fn stage_label(&self, k: usize) -> String {
        let t = self.cfg.order.tasks()[k - 1];
        if self.shared(k) {
            format!("{} (shared): stage {k} {t}", self.meta.architecture)
        } else {
            format!("{}: stage {k} {t}", self.meta.id)
        }
    }

    /// The key inputs of stage `k` (1-based), whose predecessor's entry is `prev`, and its
    /// entry folder name.
    fn key(&self, k: usize, prev: &str) -> (serde_json::Value, String) {
        let order = self.cfg.order.tasks();
        let shared = self.shared(k);
        let trained_by = if shared {
            format!("shared:{}", self.meta.architecture)
        } else {
            self.meta.id.to_string()
        };
        let mut inputs = serde_json::json!({
            "crate": env!("CARGO_PKG_VERSION"),
            "base": self.base.name(),
            "device": format!("{:?}", self.base.device().location()),
            "data": self.data_key,
            "clip": self.clip_key,
            "method": trained_by,
            "method_config": if shared { serde_json::Value::Null } else { self.meta.config.clone() },
            "schedule": format!("{:?}", self.meta.schedule),
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
        // Keys from before the fused kernels stay valid with them off (numerics 1).
        if cnext_kernels::numerics() != 1 {
            inputs["kernels"] = cnext_kernels::numerics().into();
        }
        if shared {
            // Before this input, the stream was named after whichever method built the
            // stage first; entries from then are not reused.
            inputs["stream"] = self.stage_label(k).into();
        }
        let task = match self.meta.schedule {
            Schedule::Joint => "joint".to_string(),
            _ => order[k - 1].to_string(),
        };
        let name = format!(
            "{}-stage{k}-{task}-{}",
            trained_by.replace(':', "-"),
            cnext_core::hash::key16(&inputs.to_string())
        );
        (inputs, name)
    }

    /// Stage `k`'s mid-stage checkpoints, in `stages/.checkpoints/<entry>.safetensors`.
    fn checkpointing(&self, k: usize, name: &str) -> Checkpointing {
        // Fault injection for the resume test (`suite/tests/resume.rs`): `k:steps` aborts
        // stage k once that many of its steps are done.
        let abort_after = std::env::var("CNEXT_ABORT_IN_STAGE").ok().and_then(|v| {
            let (stage, step) = v.split_once(':')?;
            (stage.parse::<usize>().ok()? == k).then(|| step.parse().ok())?
        });
        Checkpointing {
            path: self
                .cache
                .join("stages")
                .join(".checkpoints")
                .join(format!("{name}.safetensors")),
            every: self.checkpoint_every,
            abort_after,
        }
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
        let mut entries = self.walk(k)?;
        entries
            .pop()
            .ok_or_else(|| RunError::Stage(format!("stage {k}: no entry")))
    }

    fn load(&self, k: usize) -> Result<Option<StageEntry>, RunError> {
        let dir = self.dir(&self.keys[k - 1].1);
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

    /// Stages 1..=`upto` in order: each loaded from the cache, or trained. Training starts at
    /// the first missing stage from the entry before it and carries its model and method on
    /// to the next missing one.
    fn walk(&self, upto: usize) -> Result<Vec<StageEntry>, RunError> {
        let mut entries: Vec<StageEntry> = vec![];
        // The model and method in the state after the last entry, once one was trained here.
        let mut live: Option<Live> = None;
        let mut training = None;
        for k in 1..=upto {
            if let Some(e) = self.load(k)? {
                live = None;
                entries.push(e);
                continue;
            }
            // Trainings in this process never overlap; entries are locked across processes.
            if training.is_none() {
                training = Some(TRAINING.lock().unwrap_or_else(|p| p.into_inner()));
            }
            let name = &self.keys[k - 1].1;
            let locks = self.cache.join("stages").join(".locks");
            let _lock = lock_exclusive(&locks, name)
                .map_err(|(path, source)| RunError::Io { path, source })?;
            // Another process may have finished it while we waited for the lock.
            if let Some(e) = self.load(k)? {
                live = None;
                entries.push(e);
                continue;
            }
            let mut l = match live.take() {
                // Trained here just before: continue in memory.
                Some(mut l) => {
                    if self.shared(k - 1) {
                        self.end_shared_stage(&mut l)?;
                    }
                    l
                }
                None => self.restore(k, entries.last())?,
            };
            self.build_stage(k, &mut l)?;
            let e = self.load(k)?.ok_or_else(|| {
                RunError::Stage(format!("{name}: entry missing after writing it"))
            })?;
            entries.push(StageEntry {
                trained_now: true,
                ..e
            });
            live = Some(l);
        }
        Ok(entries)
    }

    /// A fresh model and method put in the state right after stage `k - 1`, whose entry is
    /// `prev` (none for k = 1): its weights, and the method's state from it.
    fn restore(&self, k: usize, prev: Option<&StageEntry>) -> Result<Live, RunError> {
        let mut method = (self.new_method)();
        let model = self
            .base
            .build(method.adapters(&self.cfg.lora, self.cfg.seed))?;
        let mut live = Live { model, method };
        let Some(prev) = prev.filter(|_| k > 1) else {
            return Ok(live);
        };
        let vars = live.model.trainable();
        let dev = self.base.device();
        let weights = load_tensors(&prev.dir.join("weights.safetensors"), dev)?;
        for (name, var) in &vars {
            let t = weights.get(name).ok_or_else(|| {
                RunError::Stage(format!("{}: no tensor `{name}`", prev.dir.display()))
            })?;
            var.set(t)?;
        }
        if self.shared(k - 1) {
            self.end_shared_stage(&mut live)?;
        } else {
            let state_path = prev.dir.join("method_state.safetensors");
            if state_path.exists() {
                live.method.load_state(load_tensors(&state_path, dev)?)?;
            }
        }
        Ok(live)
    }

    /// A shared first stage holds the architecture's weights but no method state: the method
    /// computes its own with its stage-1 `end_task`, whether the stage was trained now or
    /// loaded (`Method::shares_first_stage`: it must not change the model).
    fn end_shared_stage(&self, live: &mut Live) -> Result<(), RunError> {
        let order = self.cfg.order.tasks();
        let data = self.task_data(order[0])?;
        let vars = live.model.trainable();
        let info = StageInfo {
            stage: 1,
            task: order[0],
            order: &order,
            seed: self.cfg.seed,
        };
        live.method
            .end_task(info, live.model.as_ref(), &vars, &data.0)?;
        Ok(())
    }

    /// Trains stage `k` on `live` (in the state after stage `k - 1`), evaluates every task
    /// seen so far and writes the entry; `live` is left in the state after stage `k`.
    fn build_stage(&self, k: usize, live: &mut Live) -> Result<(), RunError> {
        let (inputs, name) = &self.keys[k - 1];
        let order = self.cfg.order.tasks();
        let vars = live.model.trainable();
        let id = self.meta.id;
        let shared = self.shared(k);
        let ck = self.checkpointing(k, name);
        let (task, stats) = match self.meta.schedule {
            Schedule::Frozen => (None, None),
            Schedule::Joint => {
                let sets = order
                    .iter()
                    .map(|&t| self.task_data(t))
                    .collect::<Result<Vec<_>, _>>()?;
                let all = Union(sets.iter().map(|s| &s.0 as &dyn Examples).collect());
                let tc = crate::train::TrainConfig {
                    steps: self.cfg.stage.steps * order.len(),
                    ..self.cfg.stage.clone()
                };
                let label = format!("{id}: joint");
                let s = train(
                    live.model.as_ref(),
                    &vars,
                    &all,
                    &tc,
                    &label,
                    self.progress,
                    Some(&ck),
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
                let label = self.stage_label(k);
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
                    live.model.as_ref(),
                    &vars,
                    &data.0,
                    &self.cfg.stage,
                    &label,
                    self.progress,
                    Some(&ck),
                    hooks,
                )?;
                if !shared {
                    live.method
                        .end_task(info, live.model.as_ref(), &vars, &data.0)?;
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
                inner: live.model.as_ref(),
                sets,
            });
        let scored: &dyn Backbone = match &ensembled {
            Some(e) => e,
            None => live.model.as_ref(),
        };
        let gen = Generation {
            batch: self.cfg.eval_batch,
            max_new_tokens: self.base.max_new_tokens(),
        };
        for t in self.seen(k) {
            let data = self.task_data(t)?;
            let ev = evaluate(
                scored,
                &TaskSpec::of(t),
                &data.1,
                &self.images,
                Some(self.clip),
                gen,
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
        let state = if shared {
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
            diagnostics: if shared {
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
        ck.remove()
            .map_err(|e| RunError::Stage(format!("{name}: {e}")))?;
        if !self.progress {
            // Test runs show which stages they trained (and that none trained twice).
            let secs = record.stats.as_ref().map_or(0.0, |s| s.seconds);
            eprintln!("stage cache: trained {name} ({secs:.1} s + eval {eval_seconds:.1} s)");
        }
        Ok(())
    }
}

/// A model and its method, in memory.
struct Live {
    model: Box<dyn Backbone>,
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
