//! [`AdapterPlan`]: which linears get which adapter, and the shared stores behind them
//! (adapter variables, optional mergeable base weights, recorded inputs).

use crate::linear::Adapter;
use crate::{AdapterKind, LoraConfig, ALL_TARGETS};
use candle_core::{Result, Shape, Tensor, Var};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

fn lock<T>(m: &Mutex<T>) -> Result<MutexGuard<'_, T>> {
    m.lock()
        .map_err(|_| candle_core::Error::Msg("adapter store poisoned".into()))
}

/// Inputs of adapted linears, appended while recording is on. Shared (Arc) between the plan
/// and every linear built from it, so recording can be toggled after the model is built.
#[derive(Default)]
pub(crate) struct Recorder {
    on: AtomicBool,
    inputs: Mutex<BTreeMap<String, Vec<Tensor>>>,
}

/// Counts only: a derived Debug would print every recorded activation of every layer.
impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.inputs.lock().map(|m| m.len()).unwrap_or(0);
        f.debug_struct("Recorder")
            .field("on", &self.is_on())
            .field("layers_recorded", &n)
            .finish()
    }
}

impl Recorder {
    /// One relaxed atomic load: the whole cost of recording while it is off.
    pub(crate) fn is_on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    /// Appends `x` detached (memories never carry a graph) and flattened to `[rows, d_in]`.
    pub(crate) fn push(&self, path: &str, x: &Tensor) -> Result<()> {
        let d_in = x.dim(candle_core::D::Minus1)?;
        let x2 = x.detach().reshape(((), d_in))?;
        lock(&self.inputs)?
            .entry(path.to_string())
            .or_default()
            .push(x2);
        Ok(())
    }
}

/// Which linears get which adapter. `None` builds plain frozen linears. Clones share their
/// stores (variables, base weights, recorder), so a plan can be handed to a backbone and still
/// be queried after.
#[derive(Debug, Clone)]
pub struct AdapterPlan {
    pub lora: Option<LoraConfig>,
    /// Path suffixes that get an adapter.
    pub targets: Vec<String>,
    /// Adapter name in weight paths (PEFT's adapter name) for plain LoRA and the router.
    pub name: String,
    /// Seed of the adapter initialisation (candle's CPU RNG cannot be seeded).
    pub seed: u64,
    kind: AdapterKind,
    mergeable: bool,
    store: Arc<Mutex<BTreeMap<String, Var>>>,
    base: Arc<Mutex<BTreeMap<String, Var>>>,
    layers: Arc<Mutex<BTreeMap<String, Adapter>>>,
    recorder: Arc<Recorder>,
}

impl AdapterPlan {
    pub fn none() -> Self {
        AdapterPlan {
            lora: None,
            targets: vec![],
            name: "default".into(),
            seed: 0,
            kind: AdapterKind::Lora,
            mergeable: false,
            store: Arc::default(),
            base: Arc::default(),
            layers: Arc::default(),
            recorder: Arc::default(),
        }
    }

    /// Plain LoRA of rank `cfg.r` on every [`ALL_TARGETS`] projection.
    pub fn lora(cfg: LoraConfig, seed: u64) -> Self {
        Self::with_kind(cfg, AdapterKind::Lora, seed)
    }

    /// MoELoRA (CoIN): `experts` experts of rank `cfg.r / experts` and a softmax router.
    /// The rank is checked when the first linear is built ([`AdapterPlan::validate`] checks
    /// it up front).
    pub fn moelora(cfg: LoraConfig, experts: usize, seed: u64) -> Self {
        Self::with_kind(cfg, AdapterKind::MoeLora { experts }, seed)
    }

    /// MAGE's equal-weight experts: `experts` experts of rank `cfg.r / experts`, no router.
    pub fn experts(cfg: LoraConfig, experts: usize, seed: u64) -> Self {
        Self::with_kind(cfg, AdapterKind::Experts { experts }, seed)
    }

    /// Any kind (e.g. from a config file) on every [`ALL_TARGETS`] projection.
    pub fn with_kind(cfg: LoraConfig, kind: AdapterKind, seed: u64) -> Self {
        AdapterPlan {
            lora: Some(cfg),
            targets: ALL_TARGETS.iter().map(|s| s.to_string()).collect(),
            kind,
            seed,
            ..Self::none()
        }
    }

    /// Keeps the base weight of every ADAPTED linear in a variable of its own (see
    /// [`AdapterPlan::base_weights`]), so a method can merge an adapter into it in place.
    /// Linears without an adapter are unaffected.
    pub fn with_mergeable_base(mut self) -> Self {
        self.mergeable = true;
        self
    }

    pub fn kind(&self) -> AdapterKind {
        self.kind
    }

    pub fn is_mergeable(&self) -> bool {
        self.mergeable
    }

    /// Errors where the kind does not fit the rank (e.g. r = 8 with 3 experts).
    pub fn validate(&self) -> Result<()> {
        match &self.lora {
            Some(cfg) => self.kind.expert_rank(cfg.r).map(|_| ()),
            None => Ok(()),
        }
    }

    pub(crate) fn targets(&self, path: &str) -> bool {
        self.lora.is_some()
            && self
                .targets
                .iter()
                .any(|t| path == t || path.ends_with(&format!(".{t}")))
    }

    /// Every adapter variable by its full name (BTreeMap: stable order for files and
    /// optimizers). Never includes the mergeable base weights.
    pub fn vars(&self) -> BTreeMap<String, Var> {
        self.store.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// The variables of expert `i` (its A and B in every adapted linear), e.g. for MAGE to drop
    /// their gradients on a task where that expert is frozen.
    /// Empty for `i` past the last expert (plain LoRA has one expert, 0).
    pub fn expert_vars(&self, i: usize) -> BTreeMap<String, Var> {
        if i >= self.kind.experts() {
            return BTreeMap::new();
        }
        let name = self.kind.adapter_name(i, &self.name);
        let (a, b) = (format!(".lora_A.{name}."), format!(".lora_B.{name}."));
        self.vars()
            .into_iter()
            .filter(|(k, _)| k.contains(&a) || k.contains(&b))
            .collect()
    }

    /// Pre-loads adapter weights (e.g. from a cached stage) before the model is built, or
    /// overwrites them after. Names must be full weight names.
    pub fn set(&self, name: &str, value: &Tensor) -> Result<()> {
        let mut m = lock(&self.store)?;
        match m.get(name) {
            Some(v) => v.set(value),
            None => {
                m.insert(name.to_string(), Var::from_tensor(value)?);
                Ok(())
            }
        }
    }

    /// Turns input recording on or off for every linear built from this plan (also those
    /// built before the call).
    pub fn set_recording(&self, on: bool) {
        self.recorder.on.store(on, Ordering::Relaxed);
    }

    /// The inputs recorded so far, by linear path, each `[rows, d_in]` and detached, in forward
    /// order; clears the memory.
    pub fn take_inputs(&self) -> BTreeMap<String, Vec<Tensor>> {
        self.recorder
            .inputs
            .lock()
            .map(|mut m| std::mem::take(&mut *m))
            .unwrap_or_default()
    }

    /// The base weight variables of adapted linears, named `<path>.weight` (only with
    /// [`AdapterPlan::with_mergeable_base`]; empty otherwise). `Var::set` on one changes the
    /// layer in place. They are not in [`AdapterPlan::vars`], so they are never trained.
    pub fn base_weights(&self) -> BTreeMap<String, Var> {
        self.base.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// Paths of the adapted linears built so far, in BTreeMap order.
    pub fn adapted_paths(&self) -> Vec<String> {
        self.layers
            .lock()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// The adapter's weight delta `s * sum_i B_i A_i` (d_out x d_in) of the linear at `path`.
    /// Differentiable (RegLoRA's regulariser needs its gradient); `.detach()` it to merge.
    /// Errors for MoELoRA, whose delta depends on the token through the router.
    pub fn delta(&self, path: &str) -> Result<Tensor> {
        let layer = lock(&self.layers)?.get(path).cloned();
        match layer {
            Some(a) => a.delta(),
            None => candle_core::bail!("no adapted linear at path {path:?}"),
        }
    }

    pub(crate) fn recorder(&self) -> Arc<Recorder> {
        self.recorder.clone()
    }

    pub(crate) fn register(&self, path: &str, adapter: &Adapter) -> Result<()> {
        lock(&self.layers)?.insert(path.to_string(), adapter.clone());
        Ok(())
    }

    /// An adapter variable by name, created by `init` unless preloaded or built before (a
    /// rebuilt model shares its adapters). A preloaded variable of the wrong shape is an error.
    pub(crate) fn get_or_init(
        &self,
        name: &str,
        shape: impl Into<Shape>,
        init: impl FnOnce() -> Result<Tensor>,
    ) -> Result<Var> {
        get_or_init(&self.store, name, shape.into(), init)
    }

    /// A base weight variable (mergeable base). [`get_or_init`] always copies `init`'s tensor
    /// into fresh storage, so merging never writes into a base tensor shared with other models.
    pub(crate) fn base_or_init(
        &self,
        name: &str,
        shape: impl Into<Shape>,
        init: impl FnOnce() -> Result<Tensor>,
    ) -> Result<Var> {
        get_or_init(&self.base, name, shape.into(), init)
    }
}

fn get_or_init(
    store: &Mutex<BTreeMap<String, Var>>,
    name: &str,
    shape: Shape,
    init: impl FnOnce() -> Result<Tensor>,
) -> Result<Var> {
    let mut m = lock(store)?;
    if let Some(v) = m.get(name) {
        if v.shape() != &shape {
            candle_core::bail!(
                "adapter variable {name}: stored shape {:?}, layer needs {shape:?}",
                v.shape()
            );
        }
        return Ok(v.clone());
    }
    // `Var::from_tensor` on a tensor that is already a variable would alias it, so detach
    // first: `make_var` then copies, and a new variable always owns fresh storage.
    let v = Var::from_tensor(&init()?.detach())?;
    m.insert(name.to_string(), v.clone());
    Ok(v)
}
