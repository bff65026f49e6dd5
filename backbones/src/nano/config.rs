//! The nano model's configuration (serde, Hugging Face-style names).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NanoConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// Side of an image patch in pixels (also the VQ patch).
    pub patch_size: usize,
    /// Largest image grid side in patches (48 px covers / 8 = 6).
    pub max_grid: usize,
    pub max_position_embeddings: usize,
}

impl NanoConfig {
    /// The mini-profile model: d = 128, 4 layers (about 1M parameters with the mini vocabulary).
    pub fn mini(vocab_size: usize) -> Self {
        NanoConfig {
            hidden_size: 128,
            intermediate_size: 352,
            num_hidden_layers: 4,
            num_attention_heads: 4,
            vocab_size,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            patch_size: 8,
            max_grid: 6,
            max_position_embeddings: 256,
        }
    }

    /// The smoke-profile model: the smallest that still has every part.
    pub fn smoke(vocab_size: usize) -> Self {
        NanoConfig {
            hidden_size: 32,
            intermediate_size: 64,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            ..Self::mini(vocab_size)
        }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}
