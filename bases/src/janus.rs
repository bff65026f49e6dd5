//! A Janus / Janus-Pro base (Wu et al. 2024, "Janus: Decoupling Visual Encoding for Unified
//! Multimodal Understanding and Generation"; Chen et al. 2025, "Janus-Pro"): a Hugging Face
//! `JanusForConditionalGeneration` directory, loaded unchanged. As in the paper, LoRA trains
//! the language model and the connectors (aligner and generation aligner, at a tenth of the
//! adapters' rate) with the vision encoder, VQ model and heads frozen.

use candle_core::{DType, Device};
use cnext_backbones::janus::{JanusBackbone, JanusSettings};
use cnext_backbones::{Backbone, BaseModel};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Which Janus directory, and how a run uses it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JanusSpec {
    pub dir: PathBuf,
    /// Longest text answer evaluation generates.
    pub max_new_tokens: usize,
}

impl JanusSpec {
    pub fn new(dir: PathBuf) -> Self {
        JanusSpec {
            dir,
            max_new_tokens: 32,
        }
    }
}

/// A Janus directory checked and hashed once; each [`BaseModel::build`] loads a backbone.
pub struct JanusBase {
    spec: JanusSpec,
    device: Device,
    dtype: DType,
    name: String,
}

impl JanusBase {
    /// Opens `spec.dir` on `device`: bf16 where the device supports it, f32 on the CPU. The
    /// model is loaded once here to check the directory; its name hashes every config,
    /// tokenizer and weight file (SHA-256 over their bytes), so a changed checkpoint never
    /// reuses a cached stage.
    pub fn open(spec: &JanusSpec, device: &Device) -> Result<Self, crate::BaseError> {
        let dtype = if device.is_cpu() {
            DType::F32
        } else {
            DType::BF16
        };
        let digest = cnext_core::hash::model_dir_digest(&spec.dir)
            .map_err(|(path, source)| crate::BaseError::Io { path, source })?;
        // The folder's path is not part of the key: the same files elsewhere (another clone,
        // another runner) are the same base.
        let shaping = JanusSpec {
            dir: PathBuf::new(),
            ..spec.clone()
        };
        let settings =
            serde_json::to_string(&shaping).map_err(|e| crate::BaseError::Key(e.to_string()))?;
        let key = cnext_core::hash::key16(&format!("{digest}|{settings}|{dtype:?}"));
        let name = format!("janus-{key}");
        // Load once now, so a bad directory fails before any stage starts.
        JanusBackbone::load_with(
            &spec.dir,
            cnext_adapters::AdapterPlan::none(),
            device,
            dtype,
            JanusSettings::default(),
        )
        .map_err(|e| crate::BaseError::Model(e.to_string()))?;
        Ok(JanusBase {
            spec: spec.clone(),
            device: device.clone(),
            dtype,
            name,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.spec.dir
    }
}

impl BaseModel for JanusBase {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn build(&self, plan: cnext_adapters::AdapterPlan) -> candle_core::Result<Box<dyn Backbone>> {
        let b = JanusBackbone::load_with(
            &self.spec.dir,
            plan,
            &self.device,
            self.dtype,
            JanusSettings::default(),
        )?;
        Ok(Box::new(b))
    }

    /// The connectors (aligner, generation aligner) at a tenth of the adapters' rate.
    fn lr_scale(&self) -> BTreeMap<String, f64> {
        JanusSettings::default()
            .trainable
            .prefixes()
            .into_iter()
            .map(|p| (p.to_string(), 0.1))
            .collect()
    }

    fn max_new_tokens(&self) -> usize {
        self.spec.max_new_tokens
    }
}
