//! The connectors of Janus / Janus-Pro (Wu et al. 2024, "Janus: Decoupling Visual Encoding for
//! Unified Multimodal Understanding and Generation"; Chen et al. 2025, "Janus-Pro: Unified
//! Multimodal Understanding and Generation with Data and Model Scaling"): `aligner` (vision
//! tower -> LLM) and `generation_aligner` (VQ code embeddings -> LLM), both HF's
//! `fc1 -> act -> hidden_layers.0 [-> act -> hidden_layers.1 ...]`.
//!
//! They are trainable connection layers (the paper tunes them with the LLM's LoRA), so every op
//! has a backward; their variables are kept in f32 and the input is cast to their dtype, the
//! output back to the caller's compute dtype.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;
use cnext_adapters::{linear, AdapterPlan, Linear};

/// HF `JanusVisionAlignerMLP` / `JanusVQVAEAlignerMLP`.
#[derive(Debug, Clone)]
pub struct Aligner {
    fc1: Linear,
    hidden_layers: Vec<Linear>,
    act: String,
}

impl Aligner {
    /// `depth` linears in all (fc1 then depth-1 hidden layers); `vb` at the aligner's prefix.
    pub fn new(
        in_dim: usize,
        out_dim: usize,
        depth: usize,
        act: &str,
        vb: VarBuilder,
    ) -> Result<Self> {
        let none = AdapterPlan::none();
        let fc1 = linear(in_dim, out_dim, true, vb.pp("fc1"), &none)?;
        let hidden_layers = (1..depth.max(1))
            .map(|i| {
                linear(
                    out_dim,
                    out_dim,
                    true,
                    vb.pp(format!("hidden_layers.{}", i - 1)),
                    &none,
                )
            })
            .collect::<Result<_>>()?;
        Ok(Aligner {
            fc1,
            hidden_layers,
            act: act.to_string(),
        })
    }

    /// Maps `x` `[.., in]` to `[.., out]` in `out_dtype`.
    pub fn forward(&self, x: &Tensor, out_dtype: DType) -> Result<Tensor> {
        let mut h = self.fc1.forward(&x.to_dtype(self.fc1.weight().dtype())?)?;
        for l in &self.hidden_layers {
            h = l.forward(&super::act(&self.act, &h)?)?;
        }
        h.to_dtype(out_dtype)
    }
}
