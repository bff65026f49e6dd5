//! OpenAI CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural
//! Language Supervision") loaded from a Hugging Face `CLIPModel` folder: the scorer the paper
//! uses for `clip_t` / `clip_i` (`openai/clip-vit-base-patch32`; `-large-patch14` has the same
//! layout).
//!
//! The towers are candle-transformers' CLIP, fed through `VarBuilder` prefixes that match the
//! HF names (`text_model.*`, `vision_model.*`, `text_projection`, `visual_projection`). Around
//! them this file reproduces what transformers does outside the model, since a score is only
//! comparable if the inputs are the same:
//! - text: the CLIP BPE from `tokenizer.json`, truncated to `max_position_embeddings`, padded
//!   to the longest text as `CLIPProcessor(padding=True)` pads, and pooled at the first
//!   end-of-text token (candle's own pooling takes the last maximal id, which is a pad);
//! - images: `CLIPImageProcessor` on the torchvision backend (shortest side resize with the
//!   uint8 bicubic antialias kernel, centre crop, fused rescale-normalise), see
//!   [`cnext_backbones::imageproc`].
//!
//! Embeddings always come back as f32, whatever dtype the weights run in.

use super::hf_config::{
    tokenizer_pad_token, weight_err, weight_files, HfClipConfig, ImageProcessorConfig, ResizeRule,
};
use candle_core::{DType, Device, Tensor};
use candle_nn::{Linear, Module, VarBuilder};
use candle_transformers::models::clip::text_model::{
    Activation, ClipTextConfig, ClipTextTransformer,
};
use candle_transformers::models::clip::vision_model::{ClipVisionConfig, ClipVisionTransformer};
use cnext_backbones::imageproc::{center_crop, resize_bicubic_antialias, to_chw_normalized};
use cnext_core::scoring::clip::{cosine, ClipModel, CosineError};
use image::RgbImage;
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tokenizers::{Tokenizer, TruncationParams};

/// Images per forward pass (bounds memory on large prediction sets).
const IMAGE_BATCH: usize = 16;
/// Texts per forward pass.
const TEXT_BATCH: usize = 64;

/// Why a Hugging Face CLIP could not be loaded or run. Every file problem names the file.
#[derive(Debug, thiserror::Error)]
pub enum HfClipError {
    #[error("{path}: CLIP model folder not found (expected a Hugging Face CLIPModel folder with config.json, model.safetensors, tokenizer.json, preprocessor_config.json)")]
    NoModelDir { path: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: bad JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: config key `{key}` {msg}")]
    ConfigKey {
        path: PathBuf,
        key: String,
        msg: String,
    },
    #[error("{path}: {msg}")]
    Config { path: PathBuf, msg: String },
    #[error("{path}: bad tokenizer: {msg}")]
    Tokenizer { path: PathBuf, msg: String },
    #[error("{path}: cannot load weights: {source}")]
    Weights {
        path: PathBuf,
        source: candle_core::Error,
    },
    #[error("{path}: missing tensor `{name}`")]
    MissingTensor { path: PathBuf, name: String },
    #[error("text {index}: tokenizer failed: {msg}")]
    Encode { index: usize, msg: String },
    #[error("cannot embed an empty ({width}x{height}) image")]
    EmptyImage { width: u32, height: u32 },
    #[error(
        "preprocessing gives a {width}x{height} image but the vision tower takes {size}x{size}"
    )]
    ImageSize {
        width: u32,
        height: u32,
        size: usize,
    },
    #[error(
        "CLIPScore needs one text per image and at least one pair ({images} images, {texts} texts)"
    )]
    ScoreInputs { images: usize, texts: usize },
    #[error(transparent)]
    Cosine(#[from] CosineError),
    #[error("CLIP tensor op failed: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Token ids of a batch of texts, right-padded to the longest (`CLIPProcessor(padding=True)`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextBatch {
    pub input_ids: Vec<Vec<u32>>,
    /// 1 on tokens, 0 on padding.
    pub attention_mask: Vec<Vec<u32>>,
}

/// torchmetrics' `CLIPScore`: `max(mean_i 100 * cos(image_i, text_i), 0)`. The per-sample
/// scores are not clamped; only the mean is.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipScore {
    pub score: f64,
    pub per_sample: Vec<f64>,
}

/// A CLIP from a Hugging Face folder, ready to embed images and texts.
pub struct HfClip {
    dir: PathBuf,
    config: HfClipConfig,
    image: ImageProcessorConfig,
    tokenizer: Tokenizer,
    pad_id: u32,
    text: ClipTextTransformer,
    vision: ClipVisionTransformer,
    text_projection: Linear,
    visual_projection: Linear,
    logit_scale: f32,
    device: Device,
    dtype: DType,
}

impl std::fmt::Debug for HfClip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfClip")
            .field("dir", &self.dir)
            .field("config", &self.config)
            .field("device", &self.device)
            .field("dtype", &self.dtype)
            .finish_non_exhaustive()
    }
}

/// `(width, height)` after `CLIPImageProcessor`'s resize: transformers'
/// `get_resize_output_image_size` with `default_to_square=False`, i.e. the short side to `n`
/// and the long side to `int(n * long / short)`. Integer division is that floor exactly: the
/// float quotient of two integers is never rounded up to the next integer at these sizes.
pub fn resize_output_size(w: u32, h: u32, rule: ResizeRule) -> (u32, u32) {
    match rule {
        ResizeRule::Exact { width, height } => (width, height),
        ResizeRule::ShortestEdge(n) => {
            let scaled =
                |long: u32, short: u32| (u64::from(n) * u64::from(long) / u64::from(short)) as u32;
            if w <= h {
                (n, scaled(h, w))
            } else {
                (scaled(w, h), n)
            }
        }
    }
}

impl HfClip {
    /// Loads on the CPU in f32 (the reference setting).
    pub fn load_cpu(dir: &Path) -> Result<Self, HfClipError> {
        Self::load(dir, &Device::Cpu, DType::F32)
    }

    /// Loads the folder onto `device`, the weights cast to `dtype` (bf16 or f16 make sense on
    /// CUDA; candle's attention runs in f32 either way).
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self, HfClipError> {
        if !dir.is_dir() {
            return Err(HfClipError::NoModelDir {
                path: dir.to_path_buf(),
            });
        }
        let config = HfClipConfig::from_file(&dir.join("config.json"))?;
        let pre_path = dir.join("preprocessor_config.json");
        let image = ImageProcessorConfig::from_file(&pre_path)?;
        let size = config.vision.image_size;
        let out = match (image.crop, image.resize) {
            (Some(c), _) => Some(c),
            (None, Some(ResizeRule::Exact { width, height })) => Some((width, height)),
            _ => None,
        };
        if let Some((w, h)) = out {
            if (w as usize, h as usize) != (size, size) {
                return Err(HfClipError::Config {
                    path: pre_path,
                    msg: format!(
                        "images come out {w}x{h} but the vision tower (config.json image_size) takes {size}x{size}"
                    ),
                });
            }
        }

        let tok_path = dir.join("tokenizer.json");
        if !tok_path.is_file() {
            return Err(HfClipError::Io {
                path: tok_path,
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
            });
        }
        let tok_err = |msg: String| HfClipError::Tokenizer {
            path: tok_path.clone(),
            msg,
        };
        let mut tokenizer = Tokenizer::from_file(&tok_path).map_err(|e| tok_err(e.to_string()))?;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: config.text.max_position_embeddings,
                ..Default::default()
            }))
            .map_err(|e| tok_err(e.to_string()))?;
        let pad_id = match tokenizer_pad_token(dir)? {
            Some((path, token)) => {
                tokenizer
                    .token_to_id(&token)
                    .ok_or_else(|| HfClipError::Tokenizer {
                        path,
                        msg: format!("pad_token `{token}` is not in tokenizer.json"),
                    })?
            }
            None => config.text.pad_token_id,
        };

        let (wpath, files) = weight_files(dir)?;
        let mut tensors = HashMap::new();
        for f in &files {
            let t = candle_core::safetensors::load(f, device).map_err(|source| {
                HfClipError::Weights {
                    path: f.clone(),
                    source,
                }
            })?;
            tensors.extend(t);
        }
        let vb = VarBuilder::from_tensors(tensors, dtype, device);
        // candle would silently invent these two (random / the init value) if absent.
        for name in ["vision_model.embeddings.class_embedding", "logit_scale"] {
            if !vb.contains_tensor(name) {
                return Err(HfClipError::MissingTensor {
                    path: wpath,
                    name: name.into(),
                });
            }
        }
        let t = &config.text;
        let text_cfg = ClipTextConfig {
            vocab_size: t.vocab_size,
            embed_dim: t.hidden_size,
            activation: Activation::QuickGelu,
            intermediate_size: t.intermediate_size,
            max_position_embeddings: t.max_position_embeddings,
            pad_with: None,
            num_hidden_layers: t.num_hidden_layers,
            num_attention_heads: t.num_attention_heads,
            projection_dim: config.projection_dim,
        };
        let v = &config.vision;
        let vision_cfg = ClipVisionConfig {
            embed_dim: v.hidden_size,
            activation: Activation::QuickGelu,
            intermediate_size: v.intermediate_size,
            num_hidden_layers: v.num_hidden_layers,
            num_attention_heads: v.num_attention_heads,
            projection_dim: config.projection_dim,
            num_channels: v.num_channels,
            image_size: v.image_size,
            patch_size: v.patch_size,
        };
        let we = |e| weight_err(&wpath, e);
        let text = ClipTextTransformer::new(vb.pp("text_model"), &text_cfg).map_err(we)?;
        let vision = ClipVisionTransformer::new(vb.pp("vision_model"), &vision_cfg).map_err(we)?;
        let text_projection = candle_nn::linear_no_bias(
            t.hidden_size,
            config.projection_dim,
            vb.pp("text_projection"),
        )
        .map_err(we)?;
        let visual_projection = candle_nn::linear_no_bias(
            v.hidden_size,
            config.projection_dim,
            vb.pp("visual_projection"),
        )
        .map_err(we)?;
        let logit_scale = vb
            .get(&[] as &[usize], "logit_scale")
            .and_then(|s| s.to_dtype(DType::F32)?.to_scalar::<f32>())
            .map_err(we)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            image,
            tokenizer,
            pad_id,
            text,
            vision,
            text_projection,
            visual_projection,
            logit_scale,
            device: device.clone(),
            dtype,
        })
    }

    pub fn config(&self) -> &HfClipConfig {
        &self.config
    }

    pub fn image_config(&self) -> &ImageProcessorConfig {
        &self.image
    }

    /// The id padding is filled with.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The learned log temperature (`logits = exp(logit_scale) * cos`).
    pub fn logit_scale(&self) -> f32 {
        self.logit_scale
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Tokenizes and pads a batch as `CLIPProcessor(text=texts, padding=True)` does
    /// (`<|startoftext|>` ... `<|endoftext|>`, truncated to `max_position_embeddings`).
    pub fn tokenize(&self, texts: &[&str]) -> Result<TextBatch, HfClipError> {
        let mut ids = Vec::with_capacity(texts.len());
        for (index, text) in texts.iter().enumerate() {
            let enc = self
                .tokenizer
                .encode(*text, true)
                .map_err(|e| HfClipError::Encode {
                    index,
                    msg: e.to_string(),
                })?;
            let row = enc.get_ids().to_vec();
            if let Some(bad) = row
                .iter()
                .find(|&&i| i as usize >= self.config.text.vocab_size)
            {
                return Err(HfClipError::Encode {
                    index,
                    msg: format!(
                        "token id {bad} is outside the model's vocabulary ({})",
                        self.config.text.vocab_size
                    ),
                });
            }
            ids.push(row);
        }
        let len = ids.iter().map(Vec::len).max().unwrap_or(0);
        let mut attention_mask = Vec::with_capacity(ids.len());
        for row in &mut ids {
            let n = row.len();
            let mut mask = vec![1u32; n];
            mask.resize(len, 0);
            row.resize(len, self.pad_id);
            attention_mask.push(mask);
        }
        Ok(TextBatch {
            input_ids: ids,
            attention_mask,
        })
    }

    /// The position each text is pooled at, as transformers' `CLIPTextTransformer` picks it:
    /// the first `eos_token_id`, or with the legacy id 2 the first maximal id.
    fn pool_positions(&self, batch: &TextBatch) -> Vec<usize> {
        let eos = self.config.text.eos_token_id;
        batch
            .input_ids
            .iter()
            .map(|row| {
                if eos == 2 {
                    // torch.argmax returns the first maximum.
                    let max = row.iter().copied().max().unwrap_or(0);
                    row.iter().position(|&i| i == max).unwrap_or(0)
                } else {
                    // `(ids == eos).int().argmax()`: 0 when there is none.
                    row.iter().position(|&i| i == eos).unwrap_or(0)
                }
            })
            .collect()
    }

    /// Projected text embeddings `(batch, projection_dim)` in f32, before normalisation.
    pub fn text_features(&self, batch: &TextBatch) -> Result<Tensor, HfClipError> {
        let b = batch.input_ids.len();
        let t = batch.input_ids.first().map_or(0, Vec::len);
        if b == 0 || t == 0 {
            return Ok(Tensor::zeros(
                (b, self.config.projection_dim),
                DType::F32,
                &self.device,
            )?);
        }
        let flat: Vec<u32> = batch.input_ids.iter().flatten().copied().collect();
        let ids = Tensor::from_vec(flat, (b, t), &self.device)?;
        // Causal attention only: right padding never reaches the pooled position, so the
        // attention mask is not needed (transformers' result is the same to ~1e-7).
        let hidden = self.text.forward_with_mask(&ids, usize::MAX)?;
        let d = hidden.dim(2)?;
        let rows: Vec<u32> = self
            .pool_positions(batch)
            .into_iter()
            .enumerate()
            .map(|(i, p)| (i * t + p) as u32)
            .collect();
        let rows = Tensor::from_vec(rows, b, &self.device)?;
        let pooled = hidden.reshape((b * t, d))?.index_select(&rows, 0)?;
        Ok(self
            .text_projection
            .forward(&pooled)?
            .to_dtype(DType::F32)?)
    }

    /// `CLIPImageProcessor`'s `pixel_values` of one image, CHW, f32.
    pub fn preprocess(&self, img: &RgbImage) -> Result<Vec<f32>, HfClipError> {
        let (w, h) = img.dimensions();
        if w == 0 || h == 0 {
            return Err(HfClipError::EmptyImage {
                width: w,
                height: h,
            });
        }
        let mut cur = Cow::Borrowed(img);
        if let Some(rule) = self.image.resize {
            let (nw, nh) = resize_output_size(w, h, rule);
            cur = Cow::Owned(resize_bicubic_antialias(&cur, nw, nh));
        }
        if let Some((cw, ch)) = self.image.crop {
            cur = Cow::Owned(center_crop(&cur, cw, ch));
        }
        let size = self.config.vision.image_size;
        if (cur.width() as usize, cur.height() as usize) != (size, size) {
            return Err(HfClipError::ImageSize {
                width: cur.width(),
                height: cur.height(),
                size,
            });
        }
        Ok(match (self.image.rescale, self.image.normalize) {
            (Some(r), Some((mean, std))) => to_chw_normalized(&cur, r, mean, std),
            // Normalise only: the fused form with a unit rescale is exactly (x - mean) / std.
            (None, Some((mean, std))) => to_chw_normalized(&cur, 1.0, mean, std),
            (r, None) => {
                let r = r.map(|r| r as f32);
                let plane = (cur.width() * cur.height()) as usize;
                let mut out = vec![0.0f32; 3 * plane];
                for (i, px) in cur.pixels().enumerate() {
                    for c in 0..3 {
                        let x = f32::from(px.0[c]);
                        out[c * plane + i] = r.map_or(x, |r| x * r);
                    }
                }
                out
            }
        })
    }

    /// The `(n, 3, size, size)` f32 `pixel_values` of a batch, on the model's device.
    pub fn pixel_values(&self, images: &[RgbImage]) -> Result<Tensor, HfClipError> {
        let size = self.config.vision.image_size;
        let mut flat = Vec::with_capacity(images.len() * 3 * size * size);
        for img in images {
            flat.extend(self.preprocess(img)?);
        }
        Ok(Tensor::from_vec(
            flat,
            (images.len(), 3, size, size),
            &self.device,
        )?)
    }

    /// Projected image embeddings `(batch, projection_dim)` in f32, before normalisation,
    /// from `pixel_values` as the processor makes them (any float dtype, any device).
    pub fn image_features(&self, pixel_values: &Tensor) -> Result<Tensor, HfClipError> {
        let x = pixel_values.to_device(&self.device)?.to_dtype(self.dtype)?;
        let pooled = self.vision.forward(&x)?;
        Ok(self
            .visual_projection
            .forward(&pooled)?
            .to_dtype(DType::F32)?)
    }

    /// Projected embeddings of images (before normalisation), batched.
    pub fn embed_images(&self, images: &[RgbImage]) -> Result<Vec<Vec<f32>>, HfClipError> {
        let mut out = Vec::with_capacity(images.len());
        for chunk in images.chunks(IMAGE_BATCH) {
            let pv = self.pixel_values(chunk)?;
            out.extend(self.image_features(&pv)?.to_vec2::<f32>()?);
        }
        Ok(out)
    }

    /// Projected embeddings of texts (before normalisation), batched.
    pub fn embed_texts(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, HfClipError> {
        let mut out = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(TEXT_BATCH) {
            let batch = self.tokenize(chunk)?;
            out.extend(self.text_features(&batch)?.to_vec2::<f32>()?);
        }
        Ok(out)
    }
}

fn no_embedding() -> HfClipError {
    HfClipError::Candle(candle_core::Error::Msg(
        "the model returned no embedding".into(),
    ))
}

impl ClipModel for HfClip {
    type Image = RgbImage;
    type Error = HfClipError;

    fn embed_image(&self, img: &RgbImage) -> Result<Vec<f32>, HfClipError> {
        let mut rows = self.embed_images(std::slice::from_ref(img))?;
        rows.pop().ok_or_else(no_embedding)
    }

    fn embed_text(&self, text: &str) -> Result<Vec<f32>, HfClipError> {
        let mut rows = self.embed_texts(&[text])?;
        rows.pop().ok_or_else(no_embedding)
    }
}

/// torchmetrics' `CLIPScore` from paired embeddings: per sample `100 * cos(image_i, text_i)`,
/// then `max(mean, 0)`.
pub fn clip_score_of_embeddings(
    images: &[Vec<f32>],
    texts: &[Vec<f32>],
) -> Result<ClipScore, HfClipError> {
    if images.len() != texts.len() || images.is_empty() {
        return Err(HfClipError::ScoreInputs {
            images: images.len(),
            texts: texts.len(),
        });
    }
    let per_sample = images
        .iter()
        .zip(texts)
        .map(|(i, t)| Ok(100.0 * cosine(i, t)?))
        .collect::<Result<Vec<f64>, HfClipError>>()?;
    let mean = per_sample.iter().sum::<f64>() / per_sample.len() as f64;
    Ok(ClipScore {
        score: mean.max(0.0),
        per_sample,
    })
}

/// torchmetrics' `CLIPScore` of image/caption pairs under `model`.
pub fn clip_score(
    model: &HfClip,
    images: &[RgbImage],
    texts: &[&str],
) -> Result<ClipScore, HfClipError> {
    if images.len() != texts.len() || images.is_empty() {
        return Err(HfClipError::ScoreInputs {
            images: images.len(),
            texts: texts.len(),
        });
    }
    clip_score_of_embeddings(&model.embed_images(images)?, &model.embed_texts(texts)?)
}
