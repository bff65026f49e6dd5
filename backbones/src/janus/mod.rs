//! Janus / Janus-Pro (Wu et al. 2024, "Janus: Decoupling Visual Encoding for Unified Multimodal
//! Understanding and Generation"; Chen et al. 2025, "Janus-Pro: Unified Multimodal Understanding
//! and Generation with Data and Model Scaling") loaded from a Hugging Face
//! `JanusForConditionalGeneration` directory, with HF weight names.
//!
//! Understanding: a SigLIP-like vision tower ([`vision`]) and an MLP aligner ([`aligner`]) turn
//! an image into continuous embeddings that replace the `<image_placeholder>` tokens of a LLaMA
//! language model ([`llama`]). Generation: the same language model predicts VQ codes through a
//! separate head ([`gen`]); codes are fed back through their own embedding and aligner, and the
//! VQ model ([`vq`]) decodes them to pixels (and encodes target images into codes for
//! training). [`model`] ties it together, [`decode`] runs greedy text and CFG image decoding, and
//! [`backbone`] puts it behind the harness's [`crate::Backbone`] trait.
//!
//! The language model's every linear is built through [`cnext_adapters::linear`], so every
//! adapter kind of the harness applies to it; every op on the trainable path has a backward.

pub mod aligner;
pub mod backbone;
pub mod config;
pub mod decode;
pub mod gen;
pub mod llama;
pub mod model;
pub mod processor;
pub mod tokenizer;
pub mod vision;
pub mod vq;

pub use backbone::{Guidance, JanusBackbone, JanusSettings, PromptLayout};
/// The candle types the constructors take, for callers without a candle dependency.
pub use candle_core::{DType, Device};
pub use config::{GenerationConfig, JanusConfig, LlamaConfig, VisionConfig, VqConfig};
pub use decode::{CfgIds, ImageGeneration, Members, TextGeneration};
pub use llama::{CausalLm, KvCache, LlamaModel};
pub use model::{
    JanusModel, PreparedPrompt, Slot, TrainableParts, CONNECTOR_PREFIXES, GENERATION_HEAD_PREFIX,
};
pub use processor::{JanusImageProcessor, JanusProcessor};
pub use tokenizer::{JanusTokenizer, TextTokenizer};

use candle_core::Tensor;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Errors of loading and running a Janus or LLaMA directory; file errors name the file.
#[derive(Debug, thiserror::Error)]
pub enum JanusError {
    /// A file that cannot be read (`src`, not `source`: thiserror treats `source` specially and
    /// the message already carries it).
    #[error("{}: cannot read: {src}", path.display())]
    Io { path: PathBuf, src: std::io::Error },
    #[error("{}: invalid JSON: {src}", path.display())]
    Json {
        path: PathBuf,
        src: serde_json::Error,
    },
    /// A file that parses but does not describe what it should (wrong `model_type`, a
    /// mismatching adapter, an unsupported setting).
    #[error("{}: {msg}", path.display())]
    Invalid { path: PathBuf, msg: String },
    /// Weights that cannot be loaded (missing tensor, wrong shape), with the directory.
    #[error("{}: {src}", path.display())]
    Weights {
        path: PathBuf,
        src: candle_core::Error,
    },
    #[error("tokenizer {}: {msg}", path.display())]
    Tokenizer { path: PathBuf, msg: String },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{0}")]
    Msg(String),
}

impl From<JanusError> for candle_core::Error {
    fn from(e: JanusError) -> Self {
        match e {
            JanusError::Candle(c) => c,
            other => candle_core::Error::Msg(other.to_string()),
        }
    }
}

pub type Result<T, E = JanusError> = std::result::Result<T, E>;

/// Reads and parses a JSON file, naming it on any error.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let body = std::fs::read_to_string(path).map_err(|src| JanusError::Io {
        path: path.to_path_buf(),
        src,
    })?;
    serde_json::from_str(&body).map_err(|src| JanusError::Json {
        path: path.to_path_buf(),
        src,
    })
}

/// The weights of a model directory: `model.safetensors`, or the shards listed by
/// `model.safetensors.index.json`. Loaded on the CPU in the file's dtype; the `VarBuilder`
/// built over them moves each tensor to the device and dtype it is asked for.
pub(crate) fn load_weights(dir: &Path) -> Result<HashMap<String, Tensor>> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<PathBuf> = if single.is_file() {
        vec![single]
    } else if index.is_file() {
        #[derive(serde::Deserialize)]
        struct Index {
            weight_map: std::collections::BTreeMap<String, String>,
        }
        let idx: Index = read_json(&index)?;
        let shards: std::collections::BTreeSet<&String> = idx.weight_map.values().collect();
        shards.into_iter().map(|s| dir.join(s)).collect()
    } else {
        return Err(JanusError::Io {
            path: single,
            src: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        });
    };
    let mut all = HashMap::new();
    for f in files {
        let t = candle_core::safetensors::load(&f, &Device::Cpu).map_err(|src| {
            JanusError::Weights {
                path: f.clone(),
                src,
            }
        })?;
        all.extend(t);
    }
    Ok(all)
}

/// A `VarBuilder` over loaded weights whose errors still name the directory.
pub(crate) fn weights_error(dir: &Path) -> impl Fn(candle_core::Error) -> JanusError + '_ {
    move |src| JanusError::Weights {
        path: dir.to_path_buf(),
        src,
    }
}

/// The compute dtype for a requested weight dtype on a device: bf16/f16 only where the device
/// runs them (CUDA/Metal); the CPU computes in f32 whatever was asked.
pub fn compute_dtype(dtype: DType, device: &Device) -> DType {
    match dtype {
        DType::BF16 | DType::F16 if device.is_cpu() => DType::F32,
        DType::BF16 | DType::F16 | DType::F32 => dtype,
        _ => DType::F32,
    }
}

/// An HF activation by name (checked at config load: [`config::check_act`]).
pub(crate) fn act(name: &str, x: &Tensor) -> candle_core::Result<Tensor> {
    match name {
        // ACT2FN["gelu"] is the exact (erf) GELU; gelu_erf has a backward.
        "gelu" => x.gelu_erf(),
        "gelu_pytorch_tanh" | "gelu_new" => x.gelu(),
        "silu" => x.silu(),
        other => candle_core::bail!("activation {other:?} is not implemented"),
    }
}

/// Index of the first maximum (PyTorch's `argmax` on CPU returns the first of equal maxima).
pub(crate) fn argmax_first(v: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}
