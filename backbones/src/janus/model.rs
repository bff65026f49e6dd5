//! [`JanusModel`]: Janus / Janus-Pro (Wu et al. 2024, "Janus: Decoupling Visual Encoding for
//! Unified Multimodal Understanding and Generation"; Chen et al. 2025, "Janus-Pro: Unified
//! Multimodal Understanding and Generation with Data and Model Scaling") as HF's
//! `JanusForConditionalGeneration`, loaded from its directory with its weight names: the vision
//! tower and aligner fill the `<image_placeholder>` positions of the LLM's input, the lm head
//! reads text, the generation head reads VQ codes, and the VQ model maps codes and pixels.
//!
//! Trainable by default: the adapters of the plan (inside the LLM) and the connectors
//! `model.aligner.*` and `model.generation_aligner.*`, as variables in f32 (the paper tunes the
//! LLM's LoRA plus the connection layers, vision encoder frozen). The generation head can be
//! made trainable too ([`TrainableParts::generation_head`]); everything else is frozen tensors.

use super::aligner::Aligner;
use super::config::JanusConfig;
use super::gen::{CodeEmbedder, GenerationHead};
use super::llama::{KvCache, LlamaModel};
use super::vision::VisionModel;
use super::vq::VqModel;
use super::{compute_dtype, load_weights, weights_error, JanusError};
use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::VarBuilder;
use cnext_adapters::{linear, AdapterPlan, Ctx, Linear};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

type Result<T, E = candle_core::Error> = std::result::Result<T, E>;

/// Weight-name prefixes of the connection layers, trainable by default (the harness may give
/// them their own learning rate).
pub const CONNECTOR_PREFIXES: [&str; 2] = ["model.aligner.", "model.generation_aligner."];
/// Weight-name prefix of the generation head (frozen unless asked for).
pub const GENERATION_HEAD_PREFIX: &str = "model.generation_head.";

/// Which non-adapter parts become trainable variables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrainableParts {
    /// `model.aligner.*` and `model.generation_aligner.*` (default true).
    pub connectors: bool,
    /// `model.generation_head.*` (default false).
    pub generation_head: bool,
}

impl Default for TrainableParts {
    fn default() -> Self {
        TrainableParts {
            connectors: true,
            generation_head: false,
        }
    }
}

impl TrainableParts {
    /// The weight-name prefixes that become variables.
    pub fn prefixes(&self) -> Vec<&'static str> {
        let mut p = vec![];
        if self.connectors {
            p.extend(CONNECTOR_PREFIXES);
        }
        if self.generation_head {
            p.push(GENERATION_HEAD_PREFIX);
        }
        p
    }
}

/// One element of an input row: a text token, the `index`-th embedding of image `image` of the
/// batch, or a VQ code fed back through the generation aligner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    Token(u32),
    Image { image: usize, index: usize },
    Code(u32),
}

/// A prompt ready for the model: token ids (image placeholders expanded) and the
/// `pixel_values` `[3, S, S]` of its images, in placeholder order.
#[derive(Debug, Clone)]
pub struct PreparedPrompt {
    pub ids: Vec<u32>,
    pub images: Vec<Tensor>,
}

#[derive(Debug, Clone)]
pub struct JanusModel {
    cfg: JanusConfig,
    pub llm: LlamaModel,
    lm_head: Linear,
    vision: VisionModel,
    aligner: Aligner,
    codes: CodeEmbedder,
    head: GenerationHead,
    vq: VqModel,
    trainable: BTreeMap<String, Var>,
    device: Device,
}

impl JanusModel {
    /// Loads `dir` (`config.json` with model_type `janus`, `model.safetensors` or shards):
    /// frozen weights in `dtype` (f32 on the CPU), adapters from `plan` in the LLM, and the
    /// `parts` as f32 variables.
    pub fn load(
        dir: &Path,
        plan: &AdapterPlan,
        device: &Device,
        dtype: DType,
        parts: TrainableParts,
    ) -> std::result::Result<Self, JanusError> {
        let cfg_path = dir.join("config.json");
        let cfg = JanusConfig::from_file(&cfg_path)?;
        let n_img = cfg.num_image_tokens();
        let vq_codes = cfg.vq_config.num_patches * cfg.vq_config.num_patches;
        if n_img != cfg.vision_config.num_patches() || n_img != vq_codes {
            return Err(JanusError::Invalid {
                path: cfg_path,
                msg: format!(
                    "num_image_tokens {n_img} must equal the vision patches ({}) and the VQ latent grid ({vq_codes})",
                    cfg.vision_config.num_patches()
                ),
            });
        }
        let mut frozen = load_weights(dir)?;
        let prefixes = parts.prefixes();
        let mut trainable = BTreeMap::new();
        let mut train_tensors = HashMap::new();
        let names: Vec<String> = frozen.keys().cloned().collect();
        for name in names {
            if prefixes.iter().any(|p| name.starts_with(p)) {
                if let Some(t) = frozen.remove(&name) {
                    let v = Var::from_tensor(&t.to_dtype(DType::F32)?.to_device(device)?)?;
                    train_tensors.insert(name.clone(), v.as_tensor().clone());
                    trainable.insert(name, v);
                }
            }
        }
        let cdt = compute_dtype(dtype, device);
        let vb = VarBuilder::from_tensors(frozen, cdt, device);
        let vb_train = VarBuilder::from_tensors(train_tensors, DType::F32, device);
        // A part is read from the trainable builder when it was made trainable.
        let pick = |prefix: &str| {
            if prefixes.iter().any(|p| p.trim_end_matches('.') == prefix) {
                vb_train.pp(prefix)
            } else {
                vb.pp(prefix)
            }
        };
        let build = || -> Result<JanusModel> {
            let t = &cfg.text_config;
            let v = &cfg.vision_config;
            let q = &cfg.vq_config;
            let llm = LlamaModel::new(t, vb.pp("model.language_model"), plan)?;
            let head_vb = if t.tie_word_embeddings {
                vb.pp("model.language_model.embed_tokens")
            } else {
                vb.pp("lm_head")
            };
            let lm_head = linear(
                t.hidden_size,
                t.vocab_size,
                false,
                head_vb,
                &AdapterPlan::none(),
            )?;
            let aligner = Aligner::new(
                v.hidden_size,
                v.projection_dim,
                v.depth,
                &v.hidden_act,
                pick("model.aligner"),
            )?;
            if v.projection_dim != t.hidden_size {
                candle_core::bail!("vision projection_dim must equal the text hidden_size");
            }
            Ok(JanusModel {
                llm,
                lm_head,
                vision: VisionModel::new(v, vb.pp("model.vision_model"))?,
                aligner,
                codes: CodeEmbedder::new(
                    q,
                    vb.pp("model.generation_embeddings"),
                    pick("model.generation_aligner"),
                )?,
                head: GenerationHead::new(q, pick("model.generation_head"))?,
                vq: VqModel::new(q, vb.pp("model.vqmodel"))?,
                trainable: BTreeMap::new(),
                cfg: cfg.clone(),
                device: device.clone(),
            })
        };
        let mut model = build().map_err(weights_error(dir))?;
        model.trainable = trainable;
        Ok(model)
    }

    pub fn config(&self) -> &JanusConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The compute dtype of the frozen parts.
    pub fn dtype(&self) -> DType {
        self.llm.dtype()
    }

    pub fn vq(&self) -> &VqModel {
        &self.vq
    }

    /// Image tokens per image (vision patches = VQ codes per image).
    pub fn num_image_tokens(&self) -> usize {
        self.cfg.num_image_tokens()
    }

    /// The non-adapter trainable variables (connectors, optionally the generation head).
    pub fn trainable(&self) -> &BTreeMap<String, Var> {
        &self.trainable
    }

    /// The vision tower's `last_hidden_state` `[B, N, hidden]` of `pixel_values` `[B, 3, S, S]`.
    pub fn vision_hidden(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.vision.forward(&pixel_values.to_device(&self.device)?)
    }

    /// `get_image_features`: vision tower then aligner, `[B, N, d]` in the compute dtype.
    pub fn image_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.aligner
            .forward(&self.vision_hidden(pixel_values)?, self.dtype())
    }

    /// The slots of a row of ids whose images are `first_image, first_image + 1, ...` of the
    /// batch: the k-th placeholder is embedding k % N of image k / N. Errors unless the
    /// placeholders fill exactly `n_images` images.
    pub fn slots(&self, ids: &[u32], first_image: usize, n_images: usize) -> Result<Vec<Slot>> {
        let n = self.num_image_tokens();
        let ph = self.cfg.image_token_id;
        let mut k = 0usize;
        let slots: Vec<Slot> = ids
            .iter()
            .map(|&id| {
                if id == ph {
                    let s = Slot::Image {
                        image: first_image + k / n,
                        index: k % n,
                    };
                    k += 1;
                    s
                } else {
                    Slot::Token(id)
                }
            })
            .collect();
        if k != n_images * n {
            candle_core::bail!(
                "prompt has {k} image placeholders for {n_images} image(s) of {n} tokens each"
            );
        }
        Ok(slots)
    }

    /// Embeds rows of slots (all the same length) into `[B, T, d]`: one gather over the token
    /// embeddings, image features of `images` (`[3, S, S]` each) and code embeddings, so the
    /// result stays differentiable with respect to the connectors.
    pub fn embed(&self, rows: &[Vec<Slot>], images: &[Tensor]) -> Result<Tensor> {
        let b = rows.len();
        let t = rows.first().map_or(0, Vec::len);
        if rows.iter().any(|r| r.len() != t) {
            candle_core::bail!("embed: rows of different lengths (pad them)");
        }
        let d = self.cfg.text_config.hidden_size;
        let n = self.num_image_tokens();
        let mut tokens = vec![];
        let mut codes = vec![];
        for r in rows {
            for s in r {
                match s {
                    Slot::Token(id) => tokens.push(*id),
                    Slot::Code(c) => codes.push(*c),
                    Slot::Image { image, .. } => {
                        if *image >= images.len() {
                            candle_core::bail!("embed: image {image} of {} given", images.len());
                        }
                    }
                }
            }
        }
        let mut parts = vec![];
        let mut offset_img = 0;
        if !tokens.is_empty() {
            offset_img = tokens.len();
            parts.push(self.llm.embed(&tokens)?);
        }
        let offset_code = offset_img + images.len() * n;
        if !images.is_empty() {
            let px = Tensor::stack(images, 0)?;
            parts.push(self.image_features(&px)?.reshape((images.len() * n, d))?);
        }
        if !codes.is_empty() {
            parts.push(self.codes.forward(&codes, self.dtype(), &self.device)?);
        }
        let (mut ti, mut ci) = (0u32, 0u32);
        let idx: Vec<u32> = rows
            .iter()
            .flatten()
            .map(|s| match s {
                Slot::Token(_) => {
                    ti += 1;
                    ti - 1
                }
                Slot::Image { image, index } => (offset_img + image * n + index) as u32,
                Slot::Code(_) => {
                    ci += 1;
                    offset_code as u32 + ci - 1
                }
            })
            .collect();
        let table = if parts.len() == 1 {
            parts.remove(0)
        } else {
            Tensor::cat(&parts, 0)?
        };
        table
            .index_select(&Tensor::new(idx, &self.device)?, 0)?
            .reshape((b, t, d))
    }

    /// The language model over embeddings (see [`LlamaModel::forward`]).
    pub fn forward(
        &self,
        x: &Tensor,
        positions: &[u32],
        mask: &Tensor,
        cache: &mut KvCache,
        ctx: Ctx,
    ) -> Result<Tensor> {
        self.llm.forward(x, positions, mask, cache, ctx)
    }

    /// lm-head logits (f32) of hidden states.
    pub fn lm_logits(&self, h: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(h)?.to_dtype(DType::F32)
    }

    /// Generation-head code logits (f32, raw) of hidden states.
    pub fn gen_logits(&self, h: &Tensor) -> Result<Tensor> {
        self.head.forward(h)
    }

    /// Embeddings of codes fed back (`generation_aligner(generation_embeddings(c))`), `[N, d]`.
    pub fn code_embeddings(&self, codes: &[u32]) -> Result<Tensor> {
        self.codes.forward(codes, self.dtype(), &self.device)
    }

    /// Full-sequence lm logits `[1, T, vocab]` of one prompt (no cache), as HF's forward.
    pub fn prompt_logits(&self, p: &PreparedPrompt) -> Result<Tensor> {
        let slots = self.slots(&p.ids, 0, p.images.len())?;
        let t = slots.len();
        let x = self.embed(&[slots], &p.images)?;
        let valid = vec![vec![true; t]];
        let mask = super::llama::attention_mask(&valid, t, &self.device)?;
        let pos: Vec<u32> = (0..t as u32).collect();
        let h = self.forward(&x, &pos, &mask, &mut KvCache::new(), Ctx::default())?;
        self.lm_logits(&h)
    }
}
