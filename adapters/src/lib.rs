//! Adapter-aware linear layers. Backbones build every linear through [`linear`]; the
//! [`AdapterPlan`] decides by path suffix which ones carry an adapter (PEFT's `target_modules`)
//! and which kind ([`AdapterKind`]), and adapter weights get PEFT-like, path-derived names.
//!
//! Kinds, all with total rank `r` and scale `s = alpha / r`, every A ~ N(0, 0.01^2), every B = 0:
//! - [`AdapterKind::Lora`]: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models"
//!   (ICLR 2022): `y = W x + s B A x`, dropout on the adapter input. Names:
//!   `llm.layers.3.self_attn.q_proj.lora_A.default.weight`, `...lora_B.default.weight`.
//! - [`AdapterKind::MoeLora`]: MoELoRA as used in CoIN (Chen et al., "CoIN: A Benchmark of
//!   Continual Instruction tuNing for Multimodel Large Language Model", NeurIPS 2024 D&B):
//!   E experts of rank r/E and a router R (E x d_in, no bias) per adapted linear, token-level
//!   softmax gate, dense sum `y = W x + s * sum_i softmax(R x)_i * B_i A_i x`. Names:
//!   `...q_proj.lora_A.expert0.weight`, `...q_proj.lora_router.default.weight`.
//! - [`AdapterKind::Experts`]: MAGE's equal-weight experts (Continual-NExT, arXiv 2602.18055):
//!   `y = W x + s * sum_i B_i A_i x`, no router, same expert names.
//!
//! Each expert's A and B are separate variables, so a method can freeze one expert by dropping
//! its gradients; the forward still costs one LoRA of rank r (the experts are stacked with a
//! differentiable `Tensor::cat` into one pair of matmuls). A plan can also record the inputs of
//! every adapted linear (PGP's memory of layer inputs) and keep the base weights of adapted
//! linears in mutable, untrained variables (RegLoRA merges each task's LoRA into the base).
//! All initialisation comes from our own seeded generator ([`normal_values`]) because candle's
//! CPU generator cannot be seeded.

mod linear;
mod plan;
#[cfg(test)]
mod tests;

pub use linear::{linear, Linear};
pub use plan::AdapterPlan;

use candle_core::{Result, Tensor};
use cnext_core::rng::{fnv1a, Rng, FNV_OFFSET};
use serde::{Deserialize, Serialize};

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

/// LoRA hyper-parameters. `r` is the TOTAL rank of a layer's adapter: with E experts each
/// expert has rank `r / E`, and the scale is `alpha / r` for every kind.
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

/// Which adapter an adapted linear carries. In config files: `{"kind": "lora"}`,
/// `{"kind": "moe_lora", "experts": 4}`, `{"kind": "experts", "experts": 4}`.
///
/// Deserialised through [`KindConfig`]: serde's internally tagged unit variants ignore unknown
/// fields even under `deny_unknown_fields`, and `{"kind": "lora", "experts": 4}` must not
/// silently mean one plain LoRA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", try_from = "KindConfig")]
pub enum AdapterKind {
    /// One LoRA of rank r.
    #[default]
    Lora,
    /// MoELoRA (CoIN): `experts` experts of rank r/experts with a token-level softmax router.
    MoeLora { experts: usize },
    /// MAGE's experts: `experts` experts of rank r/experts, summed with equal weights.
    Experts { experts: usize },
}

/// The config form of [`AdapterKind`], strict about fields.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KindConfig {
    kind: KindName,
    experts: Option<usize>,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum KindName {
    Lora,
    MoeLora,
    Experts,
}

impl TryFrom<KindConfig> for AdapterKind {
    type Error = String;

    fn try_from(c: KindConfig) -> std::result::Result<Self, String> {
        match (c.kind, c.experts) {
            (KindName::Lora, None) => Ok(AdapterKind::Lora),
            (KindName::Lora, Some(_)) => Err("adapter kind \"lora\" takes no `experts`".into()),
            (KindName::MoeLora, Some(experts)) => Ok(AdapterKind::MoeLora { experts }),
            (KindName::Experts, Some(experts)) => Ok(AdapterKind::Experts { experts }),
            (_, None) => Err("adapter kinds \"moe_lora\" and \"experts\" need `experts`".into()),
        }
    }
}

impl AdapterKind {
    /// Number of experts (1 for plain LoRA).
    pub fn experts(&self) -> usize {
        match *self {
            AdapterKind::Lora => 1,
            AdapterKind::MoeLora { experts } | AdapterKind::Experts { experts } => experts,
        }
    }

    /// Rank of each expert for a total rank `r`; errors where `r` is not a positive multiple of
    /// the number of experts (a silently rounded rank would change the method).
    pub fn expert_rank(&self, r: usize) -> Result<usize> {
        let e = self.experts();
        if e == 0 || r == 0 || !r.is_multiple_of(e) {
            candle_core::bail!(
                "adapter {self:?}: total rank r = {r} must be a positive multiple of the {e} experts"
            );
        }
        Ok(r / e)
    }

    /// PEFT adapter name of expert `i` in weight names (`plan_name` for plain LoRA, so its
    /// names stay `...lora_A.default.weight`).
    pub fn adapter_name(&self, i: usize, plan_name: &str) -> String {
        match self {
            AdapterKind::Lora => plan_name.to_string(),
            _ => format!("expert{i}"),
        }
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

/// A device-agnostic zero check used by tests and diagnostics.
pub fn max_abs(t: &Tensor) -> Result<f32> {
    t.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
}
