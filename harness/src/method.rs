//! The seam between the harness and a continual-learning method (Mammoth-style): the harness
//! owns the loop, the optimizer, the counters and the stage cache; a method supplies a few
//! hooks. Step-level hooks live in [`Hooks`] (pretraining uses `()`), task-level ones in
//! [`Method`].

use crate::data::Examples;
use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};
use cnext_adapters::{AdapterPlan, LoraConfig};
use cnext_backbones::{Backbone, Example, Output, OutputKind, Prompt};
use cnext_core::TaskId;
use std::collections::BTreeMap;
use std::sync::Arc;

/// The trainable variables of a model, by full weight name.
pub type Vars = BTreeMap<String, Var>;

/// How a method uses the stages of an order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// No training: every stage evaluates the base (zero-shot).
    Frozen,
    /// One stage per task, in order (the continual setting).
    Sequential,
    /// One joint stage on the union of all tasks (the multitask upper bound).
    Joint,
}

/// What a task-level hook knows about the stage.
#[derive(Debug, Clone, Copy)]
pub struct StageInfo<'a> {
    /// 1-based stage number.
    pub stage: usize,
    pub task: TaskId,
    /// The tasks of the order, all of them.
    pub order: &'a [TaskId],
    /// The run's seed (for a method's own sampling).
    pub seed: u64,
}

/// Where the loop is: `index` of `total` steps of the current stage (0-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    pub index: usize,
    pub total: usize,
}

/// Hooks called by the training loop at every step, in this order: `loss` (add a penalty),
/// backward, `adjust_grads` (edit gradients: projection, freezing), the optimizer step,
/// `after_step` (EMA-style updates). A variable without a gradient after `adjust_grads` is
/// not touched by the optimizer, state included.
pub trait Hooks {
    fn loss(&mut self, loss: Tensor, _vars: &Vars) -> Result<Tensor> {
        Ok(loss)
    }
    fn adjust_grads(&mut self, _step: Step, _grads: &mut GradStore, _vars: &Vars) -> Result<()> {
        Ok(())
    }
    fn after_step(&mut self, _step: Step, _grads: &GradStore, _vars: &Vars) -> Result<()> {
        Ok(())
    }
    /// True to receive, before `adjust_grads`, the mean over the batch of each example's
    /// squared gradient (one extra backward per example: batch-size times the step cost).
    fn wants_per_sample_fisher(&self) -> bool {
        false
    }
    fn per_sample_fisher(&mut self, _fisher: BTreeMap<String, Tensor>) -> Result<()> {
        Ok(())
    }
    /// What these hooks change from step to step within a stage (EMA copies, counters), for
    /// mid-stage checkpoints. `load_step_state` of it, after `begin_task`, must put the hooks
    /// exactly where they were: a resumed stage ends bit-identical to an uninterrupted one.
    fn step_state(&self) -> Result<BTreeMap<String, Tensor>> {
        Ok(BTreeMap::new())
    }
    fn load_step_state(&mut self, _state: BTreeMap<String, Tensor>) -> Result<()> {
        Ok(())
    }
}

/// `state` with every name prefixed by `prefix` (to keep several maps in one step state).
pub fn prefixed(prefix: &str, state: &BTreeMap<String, Tensor>) -> BTreeMap<String, Tensor> {
    state
        .iter()
        .map(|(k, v)| (format!("{prefix}{k}"), v.clone()))
        .collect()
}

/// The entries of `state` named `prefix...`, removed and with the prefix stripped.
pub fn take_prefixed(
    prefix: &str,
    state: &mut BTreeMap<String, Tensor>,
) -> BTreeMap<String, Tensor> {
    let keys: Vec<String> = state
        .keys()
        .filter(|k| k.starts_with(prefix))
        .cloned()
        .collect();
    keys.into_iter()
        .filter_map(|k| state.remove(&k).map(|v| (k[prefix.len()..].to_string(), v)))
        .collect()
}

/// An error naming the first entry of `state` that a `load_step_state` left over (a step
/// state of another method or version).
pub fn unexpected(state: &BTreeMap<String, Tensor>) -> Result<()> {
    match state.keys().next() {
        Some(k) => candle_core::bail!("step state: unexpected `{k}`"),
        None => Ok(()),
    }
}

/// No hooks (pretraining, and methods that only train).
impl Hooks for () {}

/// A continual-learning method. `config` must capture every knob: it is part of the stage
/// cache key.
pub trait Method: Hooks + Send {
    /// Lowercase registry id (`lora`, `ewc`, ...).
    fn id(&self) -> &'static str;
    /// The method's knobs as JSON (cache key, results.json).
    fn config(&self) -> std::result::Result<serde_json::Value, serde_json::Error>;
    fn schedule(&self) -> Schedule {
        Schedule::Sequential
    }
    /// The adapters this method trains (called once per model built; a method may keep a
    /// clone of the plan to reach its adapters). Every method keeps the same total rank.
    fn adapters(&mut self, lora: &LoraConfig, seed: u64) -> AdapterPlan {
        AdapterPlan::lora(lora.clone(), seed)
    }
    /// True when stage 1 is plain training of this method's adapters (the paper's shared
    /// first stage): the harness then trains stage 1 once per adapter architecture, without
    /// this method's hooks, and calls `end_task` for stage 1 when the method continues from
    /// it. Such a method's stage-1 `end_task` must not change the model.
    fn shares_first_stage(&self) -> bool {
        false
    }
    /// Adapter architecture id for the shared first stage (same id, same stage-1 checkpoint).
    fn architecture(&self) -> String {
        "lora".into()
    }
    fn begin_task(&mut self, _stage: StageInfo, _vars: &Vars) -> Result<()> {
        Ok(())
    }
    /// After training a stage, before it is evaluated and cached.
    fn end_task(
        &mut self,
        _stage: StageInfo,
        _model: &dyn Backbone,
        _vars: &Vars,
        _train: &dyn Examples,
    ) -> Result<()> {
        Ok(())
    }
    /// Weight sets to decode with as an ensemble (LAE: online and offline adapters), or None
    /// to generate from the current weights.
    fn ensemble(&self, _vars: &Vars) -> Result<Option<Vec<BTreeMap<String, Tensor>>>> {
        Ok(None)
    }
    /// Numbers about the stage just ended (printed in the run report, stored in the stage
    /// cache and results.json), e.g. PEMA's fallback fractions.
    fn diagnostics(&self) -> BTreeMap<String, f64> {
        BTreeMap::new()
    }
    /// Method state carried to the next stage (Fisher, anchors, bases ...), by name.
    fn state(&self) -> BTreeMap<String, Tensor> {
        BTreeMap::new()
    }
    fn load_state(&mut self, _state: BTreeMap<String, Tensor>) -> Result<()> {
        Ok(())
    }
}

/// Builds fresh instances of one configured method (a chain makes one per stage).
pub type MethodFactory = Arc<dyn Fn() -> Box<dyn Method> + Send + Sync>;

/// A registry entry: one line per method in `baselines::ALL`.
#[derive(Clone, Copy)]
pub struct MethodEntry {
    pub id: &'static str,
    /// One line for `--help` and listings.
    pub about: &'static str,
    /// The method with its default config.
    pub new: fn() -> Box<dyn Method>,
    /// The method with a config given as JSON (the typed config's serde form; unknown fields
    /// are errors). Use [`typed`] or [`no_config`].
    pub configure: fn(serde_json::Value) -> std::result::Result<MethodFactory, String>,
}

impl MethodEntry {
    /// The factory of the default config.
    pub fn factory(&self) -> MethodFactory {
        Arc::new(self.new)
    }

    /// The default config with `overrides` applied: dotted paths into its JSON form
    /// (`averaging.pema.alpha_policy`) to JSON values. A path the config does not have is an
    /// error naming the keys it does have.
    pub fn with_overrides(
        &self,
        overrides: &BTreeMap<String, serde_json::Value>,
    ) -> std::result::Result<MethodFactory, String> {
        if overrides.is_empty() {
            return Ok(self.factory());
        }
        let mut cfg = (self.new)()
            .config()
            .map_err(|e| format!("{}: default config: {e}", self.id))?;
        for (path, value) in overrides {
            let mut at = &mut cfg;
            for key in path.split('.') {
                let obj = at.as_object_mut().ok_or_else(|| {
                    format!(
                        "{}: `{path}`: `{key}` is inside a value, not a table",
                        self.id
                    )
                })?;
                let known: Vec<String> = obj.keys().cloned().collect();
                at = obj.get_mut(key).ok_or_else(|| {
                    format!(
                        "{}: unknown config key `{key}` in `{path}` (known: {})",
                        self.id,
                        if known.is_empty() {
                            "none".to_string()
                        } else {
                            known.join(", ")
                        }
                    )
                })?;
            }
            *at = value.clone();
        }
        (self.configure)(cfg).map_err(|e| format!("{}: {e}", self.id))
    }

    /// The overrides that turn the default config into `cfg`, the inverse of
    /// [`MethodEntry::with_overrides`]: the dotted path of every leaf of `cfg` that differs from
    /// (or is absent in) the default. Empty for the default config (reports name runs by it).
    pub fn overrides_of(
        &self,
        cfg: &serde_json::Value,
    ) -> std::result::Result<BTreeMap<String, serde_json::Value>, serde_json::Error> {
        let mut out = BTreeMap::new();
        config_diff(&(self.new)().config()?, cfg, "", &mut out);
        Ok(out)
    }
}

/// Collects into `out` the leaves of `actual` that `default` does not have at the same path.
fn config_diff(
    default: &serde_json::Value,
    actual: &serde_json::Value,
    prefix: &str,
    out: &mut BTreeMap<String, serde_json::Value>,
) {
    match (default.as_object(), actual.as_object()) {
        (Some(d), Some(a)) => {
            for (key, value) in a {
                let path = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                match d.get(key) {
                    Some(dv) => config_diff(dv, value, &path, out),
                    None => {
                        out.insert(path, value.clone());
                    }
                }
            }
        }
        _ if default != actual => {
            out.insert(prefix.to_string(), actual.clone());
        }
        _ => {}
    }
}

/// `configure` for a method with a typed config.
pub fn typed<T>(
    v: serde_json::Value,
    build: fn(T) -> Box<dyn Method>,
) -> std::result::Result<MethodFactory, String>
where
    T: serde::de::DeserializeOwned + Clone + Send + Sync + 'static,
{
    let cfg: T = serde_json::from_value(v).map_err(|e| e.to_string())?;
    Ok(Arc::new(move || build(cfg.clone())))
}

/// `configure` for a method without knobs: only `{}` is accepted.
pub fn no_config(
    v: serde_json::Value,
    build: fn() -> Box<dyn Method>,
) -> std::result::Result<MethodFactory, String> {
    match v.as_object() {
        Some(o) if o.is_empty() => Ok(Arc::new(build)),
        _ => Err(format!("takes no config, got {v}")),
    }
}

impl std::fmt::Debug for MethodEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.id)
    }
}

/// A backbone that generates from an ensemble of weight sets (see [`Method::ensemble`]).
pub struct Ensembled<'a> {
    pub inner: &'a dyn Backbone,
    pub sets: Vec<BTreeMap<String, Tensor>>,
}

impl Backbone for Ensembled<'_> {
    fn loss(&self, batch: &[Example], ctx: cnext_adapters::Ctx) -> Result<Tensor> {
        self.inner.loss(batch, ctx)
    }
    fn generate(
        &self,
        prompts: &[Prompt],
        kind: OutputKind,
        max_new_tokens: usize,
    ) -> Result<Vec<Output>> {
        self.inner
            .generate_ensemble(prompts, kind, max_new_tokens, &self.sets)
    }
    fn trainable(&self) -> Vars {
        self.inner.trainable()
    }
}
