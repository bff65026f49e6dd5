//! The processors of Janus / Janus-Pro (Wu et al. 2024, "Janus: Decoupling Visual Encoding for
//! Unified Multimodal Understanding and Generation"; Chen et al. 2025, "Janus-Pro: Unified
//! Multimodal Understanding and Generation with Data and Model Scaling") as transformers 5.x
//! runs them (torchvision backend):
//!
//! - [`JanusImageProcessor`]: resize so the longest side is `size` and the other
//!   `max(round_half_even(side * size / longest), min_size)` with torchvision's bicubic
//!   antialiased uint8 kernel ([`crate::imageproc::resize_bicubic_antialias`]), pad to a square
//!   of `background_color` with the image centred at `(size - short) // 2`, then the fused
//!   rescale-and-normalise in f32;
//! - [`JanusProcessor`]: each `<image_placeholder>` of a prompt becomes `<begin_of_image>` +
//!   `num_image_tokens` placeholders + `<end_of_image>`; image generation appends
//!   `<begin_of_image>`; the tokenizer's post-processor prepends BOS.

use super::tokenizer::JanusTokenizer;
use super::{read_json, JanusError, Result};
use crate::imageproc::{resize_bicubic_antialias, to_chw_normalized};
use candle_core::{Device, Tensor};
use image::{Rgb, RgbImage};
use serde::Deserialize;
use std::path::Path;

#[derive(Debug, Clone, Deserialize)]
struct Size {
    height: u32,
    width: u32,
}

fn default_true() -> bool {
    true
}
fn default_min_size() -> u32 {
    14
}
fn default_resample() -> u32 {
    3
}
fn default_rescale() -> f64 {
    1.0 / 255.0
}
fn default_background() -> [u8; 3] {
    [127, 127, 127]
}

/// `preprocessor_config.json` of a `JanusImageProcessor`.
#[derive(Debug, Clone, Deserialize)]
pub struct ImageProcessorConfig {
    #[serde(default)]
    image_processor_type: Option<String>,
    size: Size,
    #[serde(default = "default_min_size")]
    pub min_size: u32,
    #[serde(default = "default_resample")]
    resample: u32,
    #[serde(default = "default_true")]
    pub do_resize: bool,
    #[serde(default = "default_true")]
    pub do_pad: bool,
    #[serde(default = "default_true")]
    pub do_rescale: bool,
    #[serde(default = "default_rescale")]
    pub rescale_factor: f64,
    #[serde(default = "default_true")]
    pub do_normalize: bool,
    pub image_mean: [f64; 3],
    pub image_std: [f64; 3],
    #[serde(default = "default_background")]
    pub background_color: [u8; 3],
}

/// `processor_config.json`.
#[derive(Debug, Clone, Deserialize)]
struct ProcessorConfig {
    #[serde(default)]
    image_processor: Option<ImageProcessorConfig>,
    #[serde(default)]
    num_image_tokens: Option<usize>,
    #[serde(default)]
    use_default_system_prompt: bool,
}

/// HF `JanusImageProcessor` (torchvision backend).
#[derive(Debug, Clone)]
pub struct JanusImageProcessor {
    pub cfg: ImageProcessorConfig,
}

impl JanusImageProcessor {
    /// From a parsed config; `path` names the file in errors.
    pub fn new(cfg: ImageProcessorConfig, path: &Path) -> Result<Self> {
        let bad = |msg: String| JanusError::Invalid {
            path: path.to_path_buf(),
            msg,
        };
        if let Some(t) = &cfg.image_processor_type {
            if !t.starts_with("JanusImageProcessor") {
                return Err(bad(format!(
                    "image_processor_type {t:?}, expected JanusImageProcessor"
                )));
            }
        }
        if cfg.size.height != cfg.size.width || cfg.size.height == 0 {
            return Err(bad(format!(
                "size {}x{}: Janus resizes to a square",
                cfg.size.height, cfg.size.width
            )));
        }
        if cfg.resample != 3 {
            return Err(bad(format!(
                "resample {} is not implemented (3 = bicubic)",
                cfg.resample
            )));
        }
        Ok(JanusImageProcessor { cfg })
    }

    /// `preprocessor_config.json`, else `processor_config.json`'s `image_processor`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let pre = dir.join("preprocessor_config.json");
        if pre.is_file() {
            return Self::new(read_json(&pre)?, &pre);
        }
        let proc = dir.join("processor_config.json");
        let p: ProcessorConfig = read_json(&proc)?;
        match p.image_processor {
            Some(c) => Self::new(c, &proc),
            None => Err(JanusError::Invalid {
                path: proc,
                msg: "no image_processor settings (and no preprocessor_config.json)".into(),
            }),
        }
    }

    pub fn size(&self) -> u32 {
        self.cfg.size.height
    }

    /// The resized (not yet padded) size `(width, height)` of a `w x h` image for side `size`.
    pub fn resized_size(&self, w: u32, h: u32, size: u32) -> (u32, u32) {
        let longest = w.max(h);
        let delta = f64::from(size) / f64::from(longest);
        let side =
            |s: u32| ((f64::from(s) * delta).round_ties_even() as u32).max(self.cfg.min_size);
        (side(w), side(h))
    }

    /// Resize (longest side = `size`) and pad to a `size x size` square, uint8.
    pub fn resize_and_pad(&self, img: &RgbImage, size: u32) -> RgbImage {
        let img = if self.cfg.do_resize {
            let (w, h) = self.resized_size(img.width(), img.height(), size);
            resize_bicubic_antialias(img, w, h)
        } else {
            img.clone()
        };
        if !self.cfg.do_pad || img.width() == img.height() {
            return img;
        }
        let side = img.width().max(img.height());
        let (ox, oy) = ((side - img.width()) / 2, (side - img.height()) / 2);
        let mut out = RgbImage::from_pixel(side, side, Rgb(self.cfg.background_color));
        for (x, y, px) in img.enumerate_pixels() {
            out.put_pixel(x + ox, y + oy, *px);
        }
        out
    }

    /// `pixel_values` `[3, S, S]` of `img` at the configured size.
    pub fn preprocess(&self, img: &RgbImage, dev: &Device) -> Result<Tensor> {
        self.preprocess_at(img, self.size(), dev)
    }

    /// `pixel_values` `[3, size, size]` of `img` at another side (the VQ model's, for targets).
    pub fn preprocess_at(&self, img: &RgbImage, size: u32, dev: &Device) -> Result<Tensor> {
        let sq = self.resize_and_pad(img, size);
        let (w, h) = sq.dimensions();
        let c = &self.cfg;
        let data = if c.do_rescale && c.do_normalize {
            to_chw_normalized(&sq, c.rescale_factor, c.image_mean, c.image_std)
        } else {
            let plane = (w * h) as usize;
            let mut out = vec![0f32; 3 * plane];
            for (x, y, px) in sq.enumerate_pixels() {
                for ch in 0..3 {
                    let mut v = f32::from(px.0[ch]);
                    if c.do_rescale {
                        v *= c.rescale_factor as f32;
                    }
                    if c.do_normalize {
                        v = (v - c.image_mean[ch] as f32) / c.image_std[ch] as f32;
                    }
                    out[ch * plane + (y * w + x) as usize] = v;
                }
            }
            out
        };
        Ok(Tensor::from_vec(data, (3, h as usize, w as usize), dev)?)
    }
}

/// HF `JanusProcessor`: prompt expansion and tokenisation, plus the image processor.
#[derive(Debug, Clone)]
pub struct JanusProcessor {
    pub image: JanusImageProcessor,
    pub num_image_tokens: usize,
    pub use_default_system_prompt: bool,
}

/// transformers' `DEFAULT_SYSTEM_PROMPT` of the Janus processor (text generation only).
pub const DEFAULT_SYSTEM_PROMPT: &str = "You are a helpful language and vision assistant. \
You are able to understand the visual content that the user provides, \
and assist the user with a variety of tasks using natural language.\n\n";

impl JanusProcessor {
    /// `processor_config.json` (optional) for `num_image_tokens` and the system prompt; its
    /// absence falls back to `default_image_tokens` (the model config's).
    pub fn from_dir(dir: &Path, default_image_tokens: usize) -> Result<Self> {
        let image = JanusImageProcessor::from_dir(dir)?;
        let path = dir.join("processor_config.json");
        let (n, sys) = if path.is_file() {
            let p: ProcessorConfig = read_json(&path)?;
            (
                p.num_image_tokens.unwrap_or(default_image_tokens),
                p.use_default_system_prompt,
            )
        } else {
            (default_image_tokens, false)
        };
        if n != default_image_tokens {
            return Err(JanusError::Invalid {
                path,
                msg: format!(
                    "num_image_tokens {n}, but the model produces {default_image_tokens} per image"
                ),
            });
        }
        Ok(JanusProcessor {
            image,
            num_image_tokens: n,
            use_default_system_prompt: sys,
        })
    }

    /// The prompt string as the processor builds it before tokenising.
    pub fn expand(&self, text: &str, tok: &JanusTokenizer, image_mode: bool) -> String {
        let one = format!(
            "{}{}{}",
            tok.boi.text,
            tok.image.text.repeat(self.num_image_tokens),
            tok.eoi.text
        );
        let mut s = text.replace(&tok.image.text, &one);
        if self.use_default_system_prompt && !image_mode {
            s = format!("{DEFAULT_SYSTEM_PROMPT}{s}");
        }
        if image_mode {
            s.push_str(&tok.boi.text);
        }
        s
    }

    /// Ids of a prompt string (BOS from the tokenizer's post-processor).
    pub fn encode(&self, text: &str, tok: &JanusTokenizer, image_mode: bool) -> Result<Vec<u32>> {
        tok.encode(&self.expand(text, tok, image_mode), true)
    }
}
