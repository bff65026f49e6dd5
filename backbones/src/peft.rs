//! PEFT LoRA adapters (Hugging Face `peft`, `PeftModel.save_pretrained` layout) read into and
//! written from the harness's adapter variables. LoRA: Hu et al., "LoRA: Low-Rank Adaptation
//! of Large Language Models" (ICLR 2022).
//!
//! A PEFT directory holds `adapter_config.json` (`peft_type` LORA, `r`, `lora_alpha`,
//! `target_modules`, ...) and `adapter_model.safetensors` with keys
//! `base_model.model.<module path>.lora_A.weight` / `.lora_B.weight` (the adapter name is not
//! in the file). Our variables are `<module path>.lora_A.<adapter>.weight`
//! ([`cnext_adapters`]). PEFT's scale is `lora_alpha / r`, ours `alpha / r_total`: equal for
//! one LoRA, and MAGE's equal-weight experts are exactly one LoRA of the total rank (A's rows
//! and B's columns stacked), so they export as such. A MoELoRA router has no PEFT LoRA form:
//! exporting one is an error that says so.

use candle_core::{DType, Device, Tensor};
use cnext_adapters::{AdapterKind, AdapterPlan, LoraConfig};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// The prefix PEFT puts before module paths (`PeftModel.base_model.model`).
pub const PEFT_PREFIX: &str = "base_model.model.";
pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

#[derive(Debug, thiserror::Error)]
pub enum PeftError {
    #[error("{}: cannot read or write: {src}", path.display())]
    Io { path: PathBuf, src: std::io::Error },
    #[error("{}: invalid JSON: {src}", path.display())]
    Json {
        path: PathBuf,
        src: serde_json::Error,
    },
    /// The file parses but does not fit (wrong type, rank, alpha, targets or keys).
    #[error("{}: {msg}", path.display())]
    Mismatch { path: PathBuf, msg: String },
    #[error("{}: {src}", path.display())]
    Tensor {
        path: PathBuf,
        src: candle_core::Error,
    },
    /// An adapter that PEFT's LoRA cannot represent.
    #[error("cannot export as a PEFT LoRA: {0}")]
    Unrepresentable(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl From<PeftError> for candle_core::Error {
    fn from(e: PeftError) -> Self {
        candle_core::Error::Msg(e.to_string())
    }
}

type Result<T, E = PeftError> = std::result::Result<T, E>;

fn suffix_match(path: &str, target: &str) -> bool {
    path == target
        || path
            .strip_suffix(target)
            .is_some_and(|head| head.ends_with('.'))
}

/// `target_modules`: PEFT accepts a list of names or a regex string.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
enum Targets {
    List(Vec<String>),
    Regex(String),
}

/// The fields of `adapter_config.json` this reader checks (the others are ignored).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PeftConfig {
    pub peft_type: String,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    target_modules: Option<Targets>,
    #[serde(default)]
    pub lora_dropout: f32,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub bias: Option<String>,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    pub layers_to_transform: Option<serde_json::Value>,
}

impl PeftConfig {
    /// The target module names, sorted.
    pub fn targets(&self) -> BTreeSet<String> {
        match &self.target_modules {
            Some(Targets::List(v)) => v.iter().cloned().collect(),
            _ => BTreeSet::new(),
        }
    }

    /// Whether PEFT adapts the module at `path`: a target is a full path or its suffix at a
    /// `.` boundary (PEFT's rule for a list, and ours: `AdapterPlan::targets`).
    pub fn targets_module(&self, path: &str) -> bool {
        self.targets().iter().any(|t| suffix_match(path, t))
    }

    /// The module of a full-weight key under `modules_to_save`, if any.
    fn saved_module(&self, key: &str) -> Option<&str> {
        let mods = self.modules_to_save.as_deref().unwrap_or_default();
        let module = key.rsplit_once('.').map_or(key, |(m, _)| m);
        // A saved module may hold submodules (an aligner's fc1): match any ancestor.
        let mut m = module;
        loop {
            if let Some(hit) = mods.iter().find(|s| suffix_match(m, s)) {
                return Some(hit);
            }
            m = m.rsplit_once('.')?.0;
        }
    }

    /// Errors for every PEFT setting that our LoRA would silently compute differently.
    fn check(&self, path: &Path) -> Result<()> {
        let bad = |msg: String| PeftError::Mismatch {
            path: path.to_path_buf(),
            msg,
        };
        if self.peft_type != "LORA" {
            return Err(bad(format!(
                "peft_type {:?}: only LORA is supported",
                self.peft_type
            )));
        }
        match &self.target_modules {
            Some(Targets::List(v)) if !v.is_empty() => {}
            Some(Targets::Regex(r)) => {
                return Err(bad(format!(
                    "target_modules is the regex {r:?}: only a list of module names is supported"
                )))
            }
            _ => return Err(bad("target_modules is missing or empty".into())),
        }
        if self.r == 0 {
            return Err(bad("r = 0".into()));
        }
        let unsupported = [
            (self.use_dora, "use_dora = true (DoRA)"),
            (self.use_rslora, "use_rslora = true (scale alpha/sqrt(r))"),
            (self.fan_in_fan_out, "fan_in_fan_out = true"),
            (!self.rank_pattern.is_empty(), "a rank_pattern"),
            (!self.alpha_pattern.is_empty(), "an alpha_pattern"),
            (
                self.layers_to_transform
                    .as_ref()
                    .is_some_and(|v| !v.is_null()),
                "layers_to_transform",
            ),
            (
                self.bias.as_deref().is_some_and(|b| b != "none"),
                "a trained bias (bias != \"none\")",
            ),
        ];
        for (on, what) in unsupported {
            if on {
                return Err(bad(format!("{what} is not supported")));
            }
        }
        Ok(())
    }
}

/// A PEFT LoRA adapter read from a directory, its weights under our variable names.
#[derive(Debug, Clone)]
pub struct PeftAdapter {
    pub dir: PathBuf,
    pub config: PeftConfig,
    /// `<module path>.lora_{A,B}.<adapter>.weight` -> f32 tensor on the CPU.
    pub weights: BTreeMap<String, Tensor>,
    /// Full weights of `modules_to_save` (e.g. a trained connector), by parameter path.
    pub saved: BTreeMap<String, Tensor>,
}

fn read_config(path: &Path) -> Result<PeftConfig> {
    let body = std::fs::read_to_string(path).map_err(|src| PeftError::Io {
        path: path.to_path_buf(),
        src,
    })?;
    let cfg: PeftConfig = serde_json::from_str(&body).map_err(|src| PeftError::Json {
        path: path.to_path_buf(),
        src,
    })?;
    cfg.check(path)?;
    Ok(cfg)
}

impl PeftAdapter {
    /// Reads `dir`; `adapter` is our adapter name for the variables (`"default"`, PEFT's).
    pub fn read(dir: &Path, adapter: &str) -> Result<Self> {
        let cfg_path = dir.join(CONFIG_FILE);
        let config = read_config(&cfg_path)?;
        let w_path = dir.join(WEIGHTS_FILE);
        if !w_path.is_file() {
            return Err(PeftError::Io {
                path: w_path,
                src: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
            });
        }
        let raw = candle_core::safetensors::load(&w_path, &Device::Cpu).map_err(|src| {
            PeftError::Tensor {
                path: w_path.clone(),
                src,
            }
        })?;
        let targets = config.targets();
        let mismatch = |msg: String| PeftError::Mismatch {
            path: w_path.clone(),
            msg,
        };
        let mut weights = BTreeMap::new();
        let mut saved = BTreeMap::new();
        for (key, t) in raw {
            let rest = key.strip_prefix(PEFT_PREFIX).ok_or_else(|| {
                mismatch(format!("key {key:?} does not start with {PEFT_PREFIX:?}"))
            })?;
            let (module, ab) = if let Some(m) = rest.strip_suffix(".lora_A.weight") {
                (m, "lora_A")
            } else if let Some(m) = rest.strip_suffix(".lora_B.weight") {
                (m, "lora_B")
            } else if config.saved_module(rest).is_some() {
                saved.insert(rest.to_string(), t.to_dtype(DType::F32)?);
                continue;
            } else {
                return Err(mismatch(format!(
                    "key {key:?} is neither a LoRA A/B weight (`...lora_A.weight` / \
                     `...lora_B.weight`) nor in modules_to_save {:?}",
                    config.modules_to_save.as_deref().unwrap_or_default()
                )));
            };
            if !config.targets_module(module) {
                return Err(mismatch(format!(
                    "key {key:?}: module {module:?} is not in target_modules {targets:?}"
                )));
            }
            let (rows, cols) = t.dims2().map_err(|src| PeftError::Tensor {
                path: w_path.clone(),
                src,
            })?;
            let rank = if ab == "lora_A" { rows } else { cols };
            if rank != config.r {
                return Err(mismatch(format!(
                    "key {key:?} has shape [{rows}, {cols}]: rank {rank}, but r = {} in {CONFIG_FILE}",
                    config.r
                )));
            }
            weights.insert(
                format!("{module}.{ab}.{adapter}.weight"),
                t.to_dtype(DType::F32)?,
            );
        }
        // Every module needs both halves.
        for name in weights.keys() {
            let other = if name.contains(".lora_A.") {
                name.replace(".lora_A.", ".lora_B.")
            } else {
                name.replace(".lora_B.", ".lora_A.")
            };
            if !weights.contains_key(&other) {
                return Err(mismatch(format!("{name} has no matching {other}")));
            }
        }
        Ok(PeftAdapter {
            dir: dir.to_path_buf(),
            config,
            weights,
            saved,
        })
    }

    /// A plain-LoRA plan matching this adapter (rank, alpha, dropout, targets), to build a
    /// model the adapter then loads into with [`PeftAdapter::apply`].
    pub fn plan(&self, seed: u64) -> AdapterPlan {
        let mut plan = AdapterPlan::lora(
            LoraConfig {
                r: self.config.r,
                alpha: self.config.lora_alpha,
                dropout: self.config.lora_dropout,
            },
            seed,
        );
        plan.targets = self.config.targets().into_iter().collect();
        plan
    }

    /// Checks that `plan` computes what this adapter was trained with: plain LoRA, same r,
    /// alpha and target set. Names `adapter_config.json` on a mismatch.
    pub fn check_plan(&self, plan: &AdapterPlan) -> Result<()> {
        let path = self.dir.join(CONFIG_FILE);
        let bad = |msg: String| PeftError::Mismatch {
            path: path.clone(),
            msg,
        };
        let Some(cfg) = &plan.lora else {
            return Err(bad("the model was built without adapters".into()));
        };
        if plan.kind() != AdapterKind::Lora {
            return Err(bad(format!(
                "a PEFT LoRA loads into plain LoRA only, the plan is {:?}",
                plan.kind()
            )));
        }
        if cfg.r != self.config.r {
            return Err(bad(format!(
                "r = {}, the plan has r = {}",
                self.config.r, cfg.r
            )));
        }
        if cfg.alpha != self.config.lora_alpha {
            return Err(bad(format!(
                "lora_alpha = {}, the plan has alpha = {}",
                self.config.lora_alpha, cfg.alpha
            )));
        }
        let ours: BTreeSet<String> = plan.targets.iter().cloned().collect();
        if ours != self.config.targets() {
            return Err(bad(format!(
                "target_modules {:?}, the plan targets {ours:?}",
                self.config.targets()
            )));
        }
        Ok(())
    }

    /// Loads the weights into the adapter variables of a model already built from `plan`:
    /// checks the plan, then that the file's modules are exactly the model's adapted linears
    /// with the same shapes (naming the file otherwise), then sets every variable.
    pub fn apply(&self, plan: &AdapterPlan) -> Result<()> {
        self.check_plan(plan)?;
        let path = self.dir.join(WEIGHTS_FILE);
        let bad = |msg: String| PeftError::Mismatch {
            path: path.clone(),
            msg,
        };
        let vars = plan.vars();
        for (name, t) in &self.weights {
            let Some(v) = vars.get(name) else {
                return Err(bad(format!("{name}: the model has no such adapted linear")));
            };
            if v.dims() != t.dims() {
                return Err(bad(format!(
                    "{name}: shape {:?} in the file, {:?} in the model",
                    t.dims(),
                    v.dims()
                )));
            }
        }
        if let Some(missing) = vars.keys().find(|k| !self.weights.contains_key(*k)) {
            return Err(bad(format!(
                "no weight for the model's adapter variable {missing}"
            )));
        }
        for (name, t) in &self.weights {
            plan.set(name, &t.to_device(vars[name].device())?)?;
        }
        Ok(())
    }

    /// Loads the `modules_to_save` weights into the model's trainable variables of the same
    /// names (e.g. Janus's connectors), checking names and shapes first.
    pub fn apply_saved(&self, vars: &BTreeMap<String, candle_core::Var>) -> Result<()> {
        let path = self.dir.join(WEIGHTS_FILE);
        let bad = |msg: String| PeftError::Mismatch {
            path: path.clone(),
            msg,
        };
        for (name, t) in &self.saved {
            let Some(v) = vars.get(name) else {
                return Err(bad(format!(
                    "{name} (modules_to_save): the model has no such trainable weight"
                )));
            };
            if v.dims() != t.dims() {
                return Err(bad(format!(
                    "{name}: shape {:?} in the file, {:?} in the model",
                    t.dims(),
                    v.dims()
                )));
            }
        }
        for (name, t) in &self.saved {
            let v = &vars[name];
            v.set(&t.to_device(v.device())?.to_dtype(v.dtype())?)?;
        }
        Ok(())
    }
}

/// What [`export`] writes besides the adapters.
#[derive(Debug, Clone, Default)]
pub struct ExportOptions {
    pub base_model_name_or_path: Option<String>,
    /// Modules trained in full (PEFT `modules_to_save`, e.g. `model.aligner`) and their
    /// weights by parameter path (`model.aligner.fc1.weight`).
    pub modules_to_save: Vec<String>,
    pub saved: BTreeMap<String, Tensor>,
}

/// The PEFT tensors of a plan's adapters, by PEFT key: one LoRA per adapted linear; equal-weight
/// experts stacked into one LoRA of the total rank. Errors for MoELoRA (its router has no PEFT
/// LoRA form), for a plan that merges adapters into its base weights, and for a plan without
/// adapters.
pub fn peft_tensors(plan: &AdapterPlan) -> Result<BTreeMap<String, Tensor>> {
    let Some(_) = &plan.lora else {
        return Err(PeftError::Unrepresentable(
            "the plan has no adapters".into(),
        ));
    };
    let kind = plan.kind();
    if let AdapterKind::MoeLora { .. } = kind {
        return Err(PeftError::Unrepresentable(
            "MoELoRA's token-level router (lora_router) cannot be represented in a PEFT LoRA; \
             only plain LoRA and equal-weight experts (one LoRA of the total rank) export"
                .into(),
        ));
    }
    if plan.is_mergeable() {
        return Err(PeftError::Unrepresentable(
            "the plan merges each task's LoRA into the base weights (RegLoRA): the merged \
             weights differ from the base by more than one LoRA"
                .into(),
        ));
    }
    let vars = plan.vars();
    let mut out = BTreeMap::new();
    for path in plan.adapted_paths() {
        for ab in ["lora_A", "lora_B"] {
            let mut parts = vec![];
            for i in 0..kind.experts() {
                let name = format!("{path}.{ab}.{}.weight", kind.adapter_name(i, &plan.name));
                let v = vars.get(&name).ok_or_else(|| {
                    PeftError::Unrepresentable(format!("adapter variable {name} is missing"))
                })?;
                parts.push(v.as_tensor().detach());
            }
            // A's rows and B's columns: expert i owns rank block i in both, so B_cat A_cat is
            // the sum of the experts' B_i A_i.
            let t = Tensor::cat(&parts, if ab == "lora_A" { 0 } else { 1 })?;
            out.insert(
                format!("{PEFT_PREFIX}{path}.{ab}.weight"),
                t.to_device(&Device::Cpu)?
                    .to_dtype(DType::F32)?
                    .contiguous()?,
            );
        }
    }
    Ok(out)
}

/// Writes `plan`'s adapters as a PEFT LoRA directory (`adapter_config.json` and
/// `adapter_model.safetensors`, each written atomically), creating `dir`. `r` is the total
/// rank and `lora_alpha` the plan's alpha, so PEFT's scale `lora_alpha / r` equals ours.
/// `target_modules` lists the full path of every adapted linear: PEFT then adapts exactly
/// those, not also same-named linears elsewhere (a vision tower's `q_proj`).
pub fn export(plan: &AdapterPlan, dir: &Path, opts: &ExportOptions) -> Result<()> {
    let mut tensors = peft_tensors(plan)?;
    let Some(cfg) = &plan.lora else {
        return Err(PeftError::Unrepresentable(
            "the plan has no adapters".into(),
        ));
    };
    for (name, t) in &opts.saved {
        if !opts.modules_to_save.iter().any(|m| {
            name.strip_prefix(m.as_str())
                .is_some_and(|r| r.starts_with('.'))
        }) {
            return Err(PeftError::Unrepresentable(format!(
                "{name} is trained but not under modules_to_save {:?}",
                opts.modules_to_save
            )));
        }
        tensors.insert(
            format!("{PEFT_PREFIX}{name}"),
            t.to_device(&Device::Cpu)?
                .to_dtype(DType::F32)?
                .contiguous()?,
        );
    }
    let targets: BTreeSet<String> = plan.adapted_paths().into_iter().collect();
    let modules_to_save = (!opts.modules_to_save.is_empty()).then(|| opts.modules_to_save.clone());
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": null,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        // f32 -> its shortest decimal, as PEFT wrote it (0.05, not 0.0500000007).
        "lora_dropout": cfg.dropout.to_string().parse::<f64>().unwrap_or(cfg.dropout as f64),
        "target_modules": targets,
        "base_model_name_or_path": opts.base_model_name_or_path,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "use_dora": false,
        "use_rslora": false,
        "modules_to_save": modules_to_save,
        "layers_to_transform": null,
        "rank_pattern": {},
        "alpha_pattern": {},
    });
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |src| PeftError::Io { path, src }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let w_path = dir.join(WEIGHTS_FILE);
    let map: HashMap<String, Tensor> = tensors.into_iter().collect();
    cnext_core::fsx::write_atomic_with(&w_path, |tmp| {
        candle_core::safetensors::save(&map, tmp).map_err(std::io::Error::other)
    })
    .map_err(io(&w_path))?;
    let cfg_path = dir.join(CONFIG_FILE);
    let body = serde_json::to_string_pretty(&config).map_err(|src| PeftError::Json {
        path: cfg_path.clone(),
        src,
    })?;
    cnext_core::fsx::write_atomic(&cfg_path, body.as_bytes()).map_err(io(&cfg_path))?;
    Ok(())
}
