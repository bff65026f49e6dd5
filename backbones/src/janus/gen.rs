//! The image-generation path of Janus / Janus-Pro (Wu et al. 2024, "Janus: Decoupling Visual
//! Encoding for Unified Multimodal Understanding and Generation"; Chen et al. 2025, "Janus-Pro:
//! Unified Multimodal Understanding and Generation with Data and Model Scaling"): VQ codes enter
//! the LLM as `generation_aligner(generation_embeddings(code))` and leave it through
//! `generation_head = vision_head(act(proj_out(h)))`, which replaces the lm head.
//!
//! The embedding table and head are frozen by default but gradients flow through them (plain
//! matmuls and GELU, all with a backward); the aligner is a trainable connector.

use super::aligner::Aligner;
use super::config::VqConfig;
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;
use cnext_adapters::{linear, AdapterPlan, Linear};

/// HF `JanusVQVAEHead`.
#[derive(Debug, Clone)]
pub struct GenerationHead {
    proj_out: Linear,
    vision_head: Linear,
    act: String,
}

impl GenerationHead {
    /// `vb` at `model.generation_head`.
    pub fn new(cfg: &VqConfig, vb: VarBuilder) -> Result<Self> {
        let none = AdapterPlan::none();
        Ok(GenerationHead {
            proj_out: linear(
                cfg.image_token_embed_dim,
                cfg.projection_dim,
                true,
                vb.pp("proj_out"),
                &none,
            )?,
            vision_head: linear(
                cfg.projection_dim,
                cfg.num_embeddings,
                true,
                vb.pp("vision_head"),
                &none,
            )?,
            act: cfg.hidden_act.clone(),
        })
    }

    /// Raw code logits (f32) of hidden states `[.., d]`.
    pub fn forward(&self, h: &Tensor) -> Result<Tensor> {
        let h = h.to_dtype(self.proj_out.weight().dtype())?;
        let h = super::act(&self.act, &self.proj_out.forward(&h)?)?;
        self.vision_head.forward(&h)?.to_dtype(DType::F32)
    }
}

/// Code embeddings into the LLM: `generation_embeddings` then `generation_aligner`.
#[derive(Debug, Clone)]
pub struct CodeEmbedder {
    embeddings: Tensor,
    aligner: Aligner,
}

impl CodeEmbedder {
    /// `vb` holds `generation_embeddings`, `vb_aligner` is at `model.generation_aligner`
    /// (trainable variables by default).
    pub fn new(cfg: &VqConfig, vb: VarBuilder, vb_aligner: VarBuilder) -> Result<Self> {
        Ok(CodeEmbedder {
            embeddings: vb.get((cfg.num_embeddings, cfg.embed_dim), "weight")?,
            aligner: Aligner::new(
                cfg.embed_dim,
                cfg.projection_dim,
                cfg.num_hidden_layers,
                &cfg.hidden_act,
                vb_aligner,
            )?,
        })
    }

    pub fn num_codes(&self) -> usize {
        self.embeddings.dim(0).unwrap_or(0)
    }

    /// `[N, d]` embeddings in `dtype` of `codes` (each checked against the codebook size).
    pub fn forward(&self, codes: &[u32], dtype: DType, dev: &Device) -> Result<Tensor> {
        let k = self.num_codes();
        if let Some(c) = codes.iter().find(|&&c| c as usize >= k) {
            candle_core::bail!("image code {c} is outside the codebook of {k}");
        }
        let e = self.embeddings.index_select(&Tensor::new(codes, dev)?, 0)?;
        self.aligner.forward(&e, dtype)
    }
}
