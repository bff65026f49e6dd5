//! Configuration of Janus / Janus-Pro (Wu et al. 2024, "Janus: Decoupling Visual Encoding for
//! Unified Multimodal Understanding and Generation"; Chen et al. 2025, "Janus-Pro: Unified
//! Multimodal Understanding and Generation with Data and Model Scaling"): serde structs of a
//! Hugging Face `config.json` with its names (`text_config`, `vision_config`, `vq_config`),
//! and of `generation_config.json`. Unknown HF keys are ignored (HF writes many bookkeeping
//! keys); a wrong `model_type` or a setting this port does not implement is an error naming
//! the file, never a silent default.

use super::{read_json, JanusError, Result};
use serde::Deserialize;
use std::path::Path;

/// `rope_parameters` (transformers 5) or the older top-level `rope_theta` / `rope_scaling`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct RopeParameters {
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_rope_type", alias = "type")]
    pub rope_type: String,
}

fn default_rope_theta() -> f64 {
    10000.0
}
fn default_rope_type() -> String {
    "default".into()
}
fn default_eps() -> f64 {
    1e-6
}
fn default_silu() -> String {
    "silu".into()
}
fn default_gelu() -> String {
    "gelu".into()
}
fn default_true() -> bool {
    true
}
fn default_three() -> usize {
    3
}
fn default_two() -> usize {
    2
}
fn default_max_pos() -> usize {
    2048
}

/// One id or a list of ids (HF allows both for `eos_token_id`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn ids(&self) -> Vec<u32> {
        match self {
            TokenIds::One(i) => vec![*i],
            TokenIds::Many(v) => v.clone(),
        }
    }
}

/// A `LlamaConfig` (Janus's `text_config`, or a `LlamaForCausalLM`'s `config.json`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct LlamaConfig {
    #[serde(default)]
    pub model_type: Option<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Defaults to `num_attention_heads` (no grouped-query attention).
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Defaults to `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_scaling: Option<RopeParameters>,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default = "default_silu")]
    pub hidden_act: String,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default = "default_one")]
    pub pretraining_tp: usize,
}

fn default_one() -> usize {
    1
}

impl LlamaConfig {
    /// Reads a `LlamaForCausalLM` `config.json` (model_type must be `llama`).
    pub fn from_file(path: &Path) -> Result<Self> {
        let cfg: LlamaConfig = read_json(path)?;
        if cfg.model_type.as_deref() != Some("llama") {
            return Err(invalid(
                path,
                format!(
                    "model_type is {:?}, expected \"llama\" (a LlamaForCausalLM config)",
                    cfg.model_type
                ),
            ));
        }
        cfg.validate(path)?;
        Ok(cfg)
    }

    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    pub fn rope_theta(&self) -> f64 {
        match (&self.rope_parameters, self.rope_theta) {
            (Some(p), _) => p.rope_theta,
            (None, Some(t)) => t,
            (None, None) => default_rope_theta(),
        }
    }

    pub fn eos_ids(&self) -> Vec<u32> {
        self.eos_token_id
            .as_ref()
            .map(TokenIds::ids)
            .unwrap_or_default()
    }

    /// Checks what the forward pass relies on; `path` names the file in errors.
    pub fn validate(&self, path: &Path) -> Result<()> {
        if let Some(mt) = &self.model_type {
            if mt != "llama" {
                return Err(invalid(
                    path,
                    format!("text model_type {mt:?} is not supported (only \"llama\")"),
                ));
            }
        }
        let rope_type = self
            .rope_parameters
            .as_ref()
            .or(self.rope_scaling.as_ref())
            .map(|p| p.rope_type.as_str())
            .unwrap_or("default");
        if rope_type != "default" {
            return Err(invalid(
                path,
                format!("rope_type {rope_type:?} is not implemented (only \"default\" RoPE)"),
            ));
        }
        if self.hidden_act != "silu" {
            return Err(invalid(
                path,
                format!(
                    "hidden_act {:?}: the LLaMA MLP here is SwiGLU (silu)",
                    self.hidden_act
                ),
            ));
        }
        if self.pretraining_tp != 1 {
            return Err(invalid(path, "pretraining_tp != 1 is not supported".into()));
        }
        let (h, kv) = (self.num_attention_heads, self.kv_heads());
        if h == 0 || kv == 0 || !h.is_multiple_of(kv) {
            return Err(invalid(
                path,
                format!("num_attention_heads {h} is not a multiple of num_key_value_heads {kv}"),
            ));
        }
        if !self.head_dim().is_multiple_of(2) || self.head_dim() == 0 {
            return Err(invalid(
                path,
                format!("head_dim {} must be even for RoPE", self.head_dim()),
            ));
        }
        Ok(())
    }
}

/// `vision_config` (`janus_vision_model`): the SigLIP-like understanding tower and its aligner.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct VisionConfig {
    #[serde(default)]
    pub model_type: Option<String>,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "default_three")]
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
    #[serde(default = "default_true")]
    pub attention_bias: bool,
    #[serde(default = "default_gelu")]
    pub hidden_act: String,
    pub projection_dim: usize,
    /// Layers of the aligner MLP (fc1 + depth-1 hidden layers).
    #[serde(default = "default_two")]
    pub depth: usize,
    #[serde(default)]
    pub num_image_tokens: Option<usize>,
    #[serde(default)]
    pub use_qk_norm: bool,
}

fn default_mlp_ratio() -> f64 {
    4.0
}

impl VisionConfig {
    pub fn num_patches(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }
    /// `int(hidden_size * mlp_ratio)` as HF computes the MLP width.
    pub fn intermediate_size(&self) -> usize {
        (self.hidden_size as f64 * self.mlp_ratio) as usize
    }
}

/// `vq_config` (`janus_vqgan`): the VQ image tokenizer and the generation connectors.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct VqConfig {
    #[serde(default)]
    pub model_type: Option<String>,
    pub embed_dim: usize,
    pub num_embeddings: usize,
    #[serde(default)]
    pub double_latent: bool,
    pub latent_channels: usize,
    /// Side of the latent grid; HF overwrites it with `image_size / patch_size` of the vision
    /// config, and so does [`JanusConfig::from_file`].
    #[serde(default)]
    pub num_patches: usize,
    #[serde(default = "default_three")]
    pub in_channels: usize,
    #[serde(default = "default_three")]
    pub out_channels: usize,
    pub base_channels: usize,
    pub channel_multiplier: Vec<usize>,
    pub num_res_blocks: usize,
    pub projection_dim: usize,
    /// Layers of the generation aligner MLP (fc1 + n-1 hidden layers).
    #[serde(default = "default_two")]
    pub num_hidden_layers: usize,
    #[serde(default = "default_gelu")]
    pub hidden_act: String,
    pub image_token_embed_dim: usize,
}

impl VqConfig {
    /// Pixel side of the images the VQ model encodes and decodes: the latent side times the
    /// encoder's downsampling (one factor 2 per resolution level but the last).
    pub fn image_size(&self) -> usize {
        self.num_patches << self.channel_multiplier.len().saturating_sub(1)
    }
}

/// A Janus `config.json` (`model_type` `janus`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct JanusConfig {
    pub model_type: String,
    pub text_config: LlamaConfig,
    pub vision_config: VisionConfig,
    pub vq_config: VqConfig,
    #[serde(default = "default_image_token_id")]
    pub image_token_id: u32,
}

fn default_image_token_id() -> u32 {
    // HF's default (the 1B model's id).
    100581
}

pub(crate) fn invalid(path: &Path, msg: String) -> JanusError {
    JanusError::Invalid {
        path: path.to_path_buf(),
        msg,
    }
}

/// The activations this port implements, by their HF names.
pub(crate) fn check_act(path: &Path, what: &str, act: &str) -> Result<()> {
    match act {
        "gelu" | "gelu_pytorch_tanh" | "gelu_new" | "silu" => Ok(()),
        _ => Err(invalid(
            path,
            format!("{what} hidden_act {act:?} is not implemented (gelu, gelu_pytorch_tanh, silu)"),
        )),
    }
}

impl JanusConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let mut cfg: JanusConfig = read_json(path)?;
        if cfg.model_type != "janus" {
            return Err(invalid(
                path,
                format!("model_type is {:?}, expected \"janus\"", cfg.model_type),
            ));
        }
        cfg.text_config.validate(path)?;
        let v = &cfg.vision_config;
        if let Some(mt) = &v.model_type {
            if mt != "janus_vision_model" {
                return Err(invalid(
                    path,
                    format!("vision_config.model_type {mt:?}, expected \"janus_vision_model\""),
                ));
            }
        }
        if v.use_qk_norm {
            return Err(invalid(
                path,
                "vision use_qk_norm = true is not implemented".into(),
            ));
        }
        if v.patch_size == 0 || !v.image_size.is_multiple_of(v.patch_size) {
            return Err(invalid(
                path,
                format!(
                    "image_size {} is not a multiple of patch_size {}",
                    v.image_size, v.patch_size
                ),
            ));
        }
        if v.num_attention_heads == 0 || !v.hidden_size.is_multiple_of(v.num_attention_heads) {
            return Err(invalid(
                path,
                "vision hidden_size is not a multiple of its heads".into(),
            ));
        }
        check_act(path, "vision_config", &v.hidden_act)?;
        let q = &cfg.vq_config;
        if let Some(mt) = &q.model_type {
            if mt != "janus_vqgan" {
                return Err(invalid(
                    path,
                    format!("vq_config.model_type {mt:?}, expected \"janus_vqgan\""),
                ));
            }
        }
        check_act(path, "vq_config", &q.hidden_act)?;
        if q.channel_multiplier.is_empty() || q.base_channels == 0 {
            return Err(invalid(
                path,
                "vq channel_multiplier must not be empty".into(),
            ));
        }
        if q.channel_multiplier
            .iter()
            .any(|m| !(m * q.base_channels).is_multiple_of(32))
        {
            return Err(invalid(
                path,
                "vq channels must be multiples of 32 (GroupNorm with 32 groups)".into(),
            ));
        }
        if q.image_token_embed_dim != cfg.text_config.hidden_size {
            return Err(invalid(
                path,
                "vq image_token_embed_dim must equal the text hidden_size".into(),
            ));
        }
        // As JanusConfig.__init__ does: the latent grid side follows the vision tower.
        cfg.vq_config.num_patches = v.image_size / v.patch_size;
        Ok(cfg)
    }

    /// Image tokens per image: `vision_config.num_image_tokens`, else the patch count.
    pub fn num_image_tokens(&self) -> usize {
        self.vision_config
            .num_image_tokens
            .unwrap_or_else(|| self.vision_config.num_patches())
    }
}

/// `generation_kwargs` of `generation_config.json`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct GenerationKwargs {
    #[serde(default)]
    pub boi_token_id: Option<u32>,
}

/// `generation_config.json` (only what decoding needs).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct GenerationConfig {
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default)]
    pub guidance_scale: Option<f64>,
    #[serde(default)]
    pub generation_kwargs: GenerationKwargs,
}

impl GenerationConfig {
    /// The file if present, else all defaults (a missing file is not an error: HF falls back
    /// to the model config; a present but unparsable one is).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("generation_config.json");
        if path.is_file() {
            read_json(&path)
        } else {
            Ok(GenerationConfig::default())
        }
    }
}
