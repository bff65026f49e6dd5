//! The understanding vision tower of Janus / Janus-Pro (Wu et al. 2024, "Janus: Decoupling
//! Visual Encoding for Unified Multimodal Understanding and Generation"; Chen et al. 2025,
//! "Janus-Pro: Unified Multimodal Understanding and Generation with Data and Model Scaling"):
//! a SigLIP-like ViT with HF `JanusVisionModel` weight names (`embeddings.patch_embedding`, a
//! learned `position_embedding`, pre-norm encoder layers with `self_attn.{q,k,v}_proj` and
//! `projection_layer`, a GELU MLP, `post_layernorm`). Its output is `last_hidden_state` after
//! `post_layernorm`, which the aligner maps into the language model.
//!
//! The tower is frozen and no gradient flows through it (the trainable aligner sits after it),
//! so it may use candle's fused layer norm and softmax, which have no backward pass. Its
//! linears are built with no adapter plan: its `q_proj`/`k_proj`/`v_proj` share the LLM's
//! projection names and must not get LoRA.

use super::config::VisionConfig;
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use cnext_adapters::{linear, AdapterPlan, Linear};

/// `nn.LayerNorm` with weight and bias.
#[derive(Debug, Clone)]
pub(crate) struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    pub(crate) fn new(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(LayerNorm {
            weight: vb.get(size, "weight")?,
            bias: vb.get(size, "bias")?,
            eps: eps as f32,
        })
    }
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

#[derive(Debug, Clone)]
struct Layer {
    layer_norm1: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    projection_layer: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

/// HF `JanusVisionModel`.
#[derive(Debug, Clone)]
pub struct VisionModel {
    patch_weight: Tensor,
    patch_bias: Tensor,
    position_embedding: Tensor,
    layers: Vec<Layer>,
    post_layernorm: LayerNorm,
    cfg: VisionConfig,
}

impl VisionModel {
    /// `vb` at `model.vision_model`.
    pub fn new(cfg: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        let (d, c, p) = (cfg.hidden_size, cfg.num_channels, cfg.patch_size);
        let none = AdapterPlan::none();
        let emb = vb.pp("embeddings");
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let lb = vb.pp(format!("encoder.layers.{i}"));
            let at = lb.pp("self_attn");
            let bias = cfg.attention_bias;
            let mlp = cfg.intermediate_size();
            layers.push(Layer {
                layer_norm1: LayerNorm::new(d, cfg.layer_norm_eps, lb.pp("layer_norm1"))?,
                q_proj: linear(d, d, bias, at.pp("q_proj"), &none)?,
                k_proj: linear(d, d, bias, at.pp("k_proj"), &none)?,
                v_proj: linear(d, d, bias, at.pp("v_proj"), &none)?,
                projection_layer: linear(d, d, true, at.pp("projection_layer"), &none)?,
                layer_norm2: LayerNorm::new(d, cfg.layer_norm_eps, lb.pp("layer_norm2"))?,
                fc1: linear(d, mlp, true, lb.pp("mlp.fc1"), &none)?,
                fc2: linear(mlp, d, true, lb.pp("mlp.fc2"), &none)?,
            });
        }
        Ok(VisionModel {
            patch_weight: emb.get((d, c, p, p), "patch_embedding.weight")?,
            patch_bias: emb.get(d, "patch_embedding.bias")?,
            position_embedding: emb.get((cfg.num_patches(), d), "position_embedding.weight")?,
            layers,
            post_layernorm: LayerNorm::new(d, cfg.layer_norm_eps, vb.pp("post_layernorm"))?,
            cfg: cfg.clone(),
        })
    }

    /// `last_hidden_state` `[B, num_patches, hidden]` of `pixel_values` `[B, C, H, W]` at the
    /// configured size (HF interpolates position embeddings only on request; so do not we).
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (_, c, h, w) = pixel_values.dims4()?;
        let s = self.cfg.image_size;
        if c != self.cfg.num_channels || h != s || w != s {
            candle_core::bail!(
                "vision tower: pixel_values are {c}x{h}x{w}, the model takes {}x{s}x{s}",
                self.cfg.num_channels
            );
        }
        let x = pixel_values.to_dtype(self.patch_weight.dtype())?;
        let p = self.cfg.patch_size;
        let d = self.cfg.hidden_size;
        let x = x
            .conv2d(&self.patch_weight, 0, p, 1, 1)?
            .broadcast_add(&self.patch_bias.reshape((1, d, 1, 1))?)?;
        let mut x = x
            .flatten_from(2)?
            .transpose(1, 2)?
            .broadcast_add(&self.position_embedding)?;
        for l in &self.layers {
            let a = self.attention(l, &l.layer_norm1.forward(&x)?)?;
            x = (x + a)?;
            let m = l.fc2.forward(&super::act(
                &self.cfg.hidden_act,
                &l.fc1.forward(&l.layer_norm2.forward(&x)?)?,
            )?)?;
            x = (x + m)?;
        }
        self.post_layernorm.forward(&x)
    }

    fn attention(&self, l: &Layer, x: &Tensor) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let heads = self.cfg.num_attention_heads;
        let hd = d / heads;
        let split = |y: Tensor| -> Result<Tensor> {
            y.reshape((b, t, heads, hd))?.transpose(1, 2)?.contiguous()
        };
        let q = split(l.q_proj.forward(x)?)?;
        let k = split(l.k_proj.forward(x)?)?;
        let v = split(l.v_proj.forward(x)?)?;
        let att = (q.matmul(&k.t()?)? * (hd as f64).powf(-0.5))?;
        let att = candle_nn::ops::softmax_last_dim(&att.to_dtype(candle_core::DType::F32)?)?
            .to_dtype(q.dtype())?;
        let y = att.matmul(&v)?.transpose(1, 2)?.reshape((b, t, d))?;
        l.projection_layer.forward(&y)
    }
}
