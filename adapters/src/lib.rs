//! Adapter-aware linear layers. Backbones build every linear through [`linear`]; the
//! [`AdapterPlan`] decides by path suffix which ones carry an adapter (PEFT's `target_modules`),
//! and adapter weights get PEFT-like, path-derived names:
//! `llm.layers.3.self_attn.q_proj.lora_A.default.weight`. LoRA follows Hu et al., "LoRA:
//! Low-Rank Adaptation of Large Language Models" (ICLR 2022): `y = W x + s B A x`, `s = alpha/r`,
//! A ~ N(0, 0.01^2), B = 0, dropout on the adapter input.

use candle_core::{DType, Module, Result, Tensor, Var};
use candle_nn::VarBuilder;
use cnext_core::rng::{fnv1a, mix64, Rng, FNV_OFFSET, GAMMA};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// The projections a plan may target (LLaMA names).
pub const ALL_TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// LoRA hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f32,
}

impl Default for LoraConfig {
    fn default() -> Self {
        // Paper: r = alpha = 32 (s = 1) on a 7B model; the nano model uses r = 8, s = 1.
        LoraConfig {
            r: 8,
            alpha: 8.0,
            dropout: 0.05,
        }
    }
}

/// Which linears get which adapter. `None` builds plain frozen linears.
#[derive(Debug, Clone)]
pub struct AdapterPlan {
    pub lora: Option<LoraConfig>,
    /// Path suffixes that get an adapter.
    pub targets: Vec<String>,
    /// Adapter name in weight paths (PEFT's adapter name).
    pub name: String,
    /// Seed of the adapter initialisation (candle's CPU RNG cannot be seeded).
    pub seed: u64,
    store: Arc<Mutex<BTreeMap<String, Var>>>,
}

impl AdapterPlan {
    pub fn none() -> Self {
        AdapterPlan {
            lora: None,
            targets: vec![],
            name: "default".into(),
            seed: 0,
            store: Arc::default(),
        }
    }

    pub fn lora(cfg: LoraConfig, seed: u64) -> Self {
        AdapterPlan {
            lora: Some(cfg),
            targets: ALL_TARGETS.iter().map(|s| s.to_string()).collect(),
            name: "default".into(),
            seed,
            store: Arc::default(),
        }
    }

    fn targets(&self, path: &str) -> bool {
        self.lora.is_some()
            && self
                .targets
                .iter()
                .any(|t| path == t || path.ends_with(&format!(".{t}")))
    }

    /// Every adapter variable by its full name (BTreeMap: stable order for files and optimizers).
    pub fn vars(&self) -> BTreeMap<String, Var> {
        self.store.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// Pre-loads adapter weights (e.g. from a cached stage) before the model is built, or
    /// overwrites them after. Names must be full weight names.
    pub fn set(&self, name: &str, value: &Tensor) -> Result<()> {
        let mut m = self
            .store
            .lock()
            .map_err(|_| candle_core::Error::Msg("adapter store poisoned".into()))?;
        match m.get(name) {
            Some(v) => v.set(value),
            None => {
                m.insert(name.to_string(), Var::from_tensor(value)?);
                Ok(())
            }
        }
    }

    fn get_or_init(&self, name: &str, init: impl FnOnce() -> Result<Tensor>) -> Result<Var> {
        let mut m = self
            .store
            .lock()
            .map_err(|_| candle_core::Error::Msg("adapter store poisoned".into()))?;
        if let Some(v) = m.get(name) {
            return Ok(v.clone());
        }
        let v = Var::from_tensor(&init()?)?;
        m.insert(name.to_string(), v.clone());
        Ok(v)
    }
}

/// Deterministic N(0, std^2) values from a seed and a name (Box-Muller over SplitMix64).
pub fn normal_values(seed: u64, name: &str, n: usize, std: f64) -> Vec<f32> {
    let mut rng = Rng::new(fnv1a(FNV_OFFSET ^ seed, name.as_bytes()));
    (0..n)
        .map(|_| {
            let u1 = rng.unit().max(1e-300);
            let u2 = rng.unit();
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * std) as f32
        })
        .collect()
}

/// Per-forward settings that layers need: training mode and the dropout seed of this step.
#[derive(Debug, Clone, Copy, Default)]
pub struct Ctx {
    pub train: bool,
    pub step_seed: u64,
}

#[derive(Debug, Clone)]
struct Lora {
    a: Var,
    b: Var,
    scale: f64,
    dropout: f32,
}

/// A linear layer with an optional LoRA adapter. The base weight is a plain tensor (frozen by
/// construction) unless the backbone was built from trainable variables for pretraining.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    lora: Option<Lora>,
    path: String,
}

/// Builds a linear `in_dim -> out_dim` named by `vb`'s prefix, with an adapter if the plan
/// targets it.
pub fn linear(
    in_dim: usize,
    out_dim: usize,
    bias: bool,
    vb: VarBuilder,
    plan: &AdapterPlan,
) -> Result<Linear> {
    let path = vb.prefix();
    let std = (1.0 / in_dim as f64).sqrt();
    let weight = vb.get_with_hints(
        (out_dim, in_dim),
        "weight",
        candle_nn::Init::Randn {
            mean: 0.0,
            stdev: std,
        },
    )?;
    let bias = if bias {
        Some(vb.get_with_hints(out_dim, "bias", candle_nn::Init::Const(0.0))?)
    } else {
        None
    };
    let lora = match &plan.lora {
        Some(cfg) if plan.targets(&path) => {
            let dev = weight.device().clone();
            let a_name = format!("{path}.lora_A.{}.weight", plan.name);
            let b_name = format!("{path}.lora_B.{}.weight", plan.name);
            let a = plan.get_or_init(&a_name, || {
                let v = normal_values(plan.seed, &a_name, cfg.r * in_dim, 0.01);
                Tensor::from_vec(v, (cfg.r, in_dim), &dev)
            })?;
            let b = plan.get_or_init(&b_name, || {
                Tensor::zeros((out_dim, cfg.r), DType::F32, &dev)
            })?;
            Some(Lora {
                a,
                b,
                scale: cfg.alpha / cfg.r as f64,
                dropout: cfg.dropout,
            })
        }
        _ => None,
    };
    Ok(Linear {
        weight,
        bias,
        lora,
        path,
    })
}

/// Inverted dropout with a mask from our own seeded generator (a counter-based hash per
/// element: cheap, and identical for a seed on any thread count).
fn dropout(x: &Tensor, p: f32, seed: u64, name: &str) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    let h = fnv1a(FNV_OFFSET ^ seed, name.as_bytes());
    let threshold = (f64::from(p) * (1u64 << 32) as f64) as u64;
    let scale = 1.0 / (1.0 - p);
    let keep: Vec<f32> = (0..x.elem_count() as u64)
        .map(|i| {
            if (mix64(h.wrapping_add(i.wrapping_mul(GAMMA))) >> 32) < threshold {
                0.0
            } else {
                scale
            }
        })
        .collect();
    let mask = Tensor::from_vec(keep, x.shape(), x.device())?;
    x.mul(&mask)
}

impl Linear {
    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn has_adapter(&self) -> bool {
        self.lora.is_some()
    }

    pub fn forward_ctx(&self, x: &Tensor, ctx: Ctx) -> Result<Tensor> {
        let mut y = cnext_kernels::frozen_matmul(x, &self.weight)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        if let Some(l) = &self.lora {
            let xin = if ctx.train {
                dropout(x, l.dropout, ctx.step_seed, &self.path)?
            } else {
                x.clone()
            };
            let h = xin.broadcast_matmul(&l.a.as_tensor().t()?)?;
            let d = h.broadcast_matmul(&l.b.as_tensor().t()?)?;
            y = (y + (d * l.scale)?)?;
        }
        Ok(y)
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_ctx(x, Ctx::default())
    }
}

/// A device-agnostic zero check used by tests and diagnostics.
pub fn max_abs(t: &Tensor) -> Result<f32> {
    t.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::VarMap;

    fn build(plan: &AdapterPlan) -> (VarMap, Linear) {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let l = linear(6, 4, true, vb.pp("llm.layers.3.self_attn.q_proj"), plan).unwrap();
        (vm, l)
    }

    #[test]
    fn names_are_peft_like_and_targets_go_by_suffix() {
        let plan = AdapterPlan::lora(LoraConfig::default(), 1);
        let (_vm, l) = build(&plan);
        assert!(l.has_adapter());
        let names: Vec<String> = plan.vars().into_keys().collect();
        assert_eq!(
            names,
            vec![
                "llm.layers.3.self_attn.q_proj.lora_A.default.weight",
                "llm.layers.3.self_attn.q_proj.lora_B.default.weight"
            ]
        );
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let p = linear(6, 4, false, vb.pp("vision.proj"), &plan).unwrap();
        assert!(!p.has_adapter());
    }

    #[test]
    fn zero_b_leaves_outputs_unchanged_and_init_is_deterministic() {
        let plan = AdapterPlan::lora(LoraConfig::default(), 7);
        let (vm, l) = build(&plan);
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let plain = linear(
            6,
            4,
            true,
            vb.pp("llm.layers.3.self_attn.q_proj"),
            &AdapterPlan::none(),
        )
        .unwrap();
        let x = Tensor::from_vec(normal_values(3, "x", 12, 1.0), (2, 6), &Device::Cpu).unwrap();
        let d = (l.forward(&x).unwrap() - plain.forward(&x).unwrap()).unwrap();
        assert_eq!(max_abs(&d).unwrap(), 0.0);
        let again = AdapterPlan::lora(LoraConfig::default(), 7);
        let _ = build(&again);
        let key = "llm.layers.3.self_attn.q_proj.lora_A.default.weight";
        let a1 = plan.vars()[key]
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let a2 = again.vars()[key]
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(a1, a2);
        let std = (a1.iter().map(|v| v * v).sum::<f32>() / a1.len() as f32).sqrt();
        assert!(std > 0.005 && std < 0.02, "{std}");
    }

    #[test]
    fn dropout_keeps_about_one_minus_p_and_rescales() {
        let x = Tensor::ones((100, 100), DType::F32, &Device::Cpu).unwrap();
        let y = dropout(&x, 0.05, 1, "n")
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let kept = y.iter().filter(|v| **v > 0.0).count() as f64 / 1e4;
        assert!((kept - 0.95).abs() < 0.01, "{kept}");
        let mean = y.iter().sum::<f32>() / 1e4;
        assert!((mean - 1.0).abs() < 0.02);
    }
}
