//! The files of a Hugging Face `CLIPModel` folder, read the way transformers reads them.
//!
//! HF configs carry dozens of keys that do not matter here (and gain new ones every release),
//! so only the keys the model needs are read and the rest is ignored. Keys that fix tensor
//! shapes are required (a missing one is an error naming the file and the key); keys that
//! transformers fills with a class default when absent (activation, norm epsilon, token ids,
//! the processor's flags) take that same default. What candle's CLIP cannot run (another
//! `model_type`, another activation or norm epsilon) is refused at load, not mis-scored.

use super::hf::HfClipError;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The architecture of the two towers (`config.json`).
#[derive(Debug, Clone, PartialEq)]
pub struct HfClipConfig {
    /// Width of the shared embedding space (`projection_dim`).
    pub projection_dim: usize,
    pub text: TextTowerConfig,
    pub vision: VisionTowerConfig,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TextTowerConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    /// The token whose final hidden state is pooled. The original OpenAI configs say 2 (a
    /// legacy value): transformers then pools at the argmax of the ids instead, which is the
    /// first `<|endoftext|>`, the largest id.
    pub eos_token_id: u32,
    /// The config's pad id; the tokenizer's pad token wins when the folder names one (the
    /// OpenAI configs say 1, while `CLIPProcessor` pads with `<|endoftext|>`).
    pub pad_token_id: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct VisionTowerConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub num_channels: usize,
}

/// How `CLIPImageProcessor` resizes (`size`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeRule {
    /// `{"shortest_edge": n}` (or a bare `n`, the old feature-extractor form): the short side
    /// to `n`, the long side to `int(n * long / short)`.
    ShortestEdge(u32),
    /// `{"height": h, "width": w}`: exactly that size.
    Exact { width: u32, height: u32 },
}

/// `preprocessor_config.json` of a `CLIPImageProcessor` (or the older `CLIPFeatureExtractor`).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessorConfig {
    pub resize: Option<ResizeRule>,
    /// `(width, height)` of the centre crop.
    pub crop: Option<(u32, u32)>,
    pub rescale: Option<f64>,
    /// Per-channel `(mean, std)`.
    pub normalize: Option<([f64; 3], [f64; 3])>,
}

/// A JSON object and where it came from, so every error names the file and the key.
struct Obj<'a> {
    path: &'a Path,
    /// Dotted prefix of this object inside the file (`"text_config."`), for messages.
    prefix: String,
    v: &'a Value,
}

impl<'a> Obj<'a> {
    fn err(&self, key: &str, msg: impl Into<String>) -> HfClipError {
        HfClipError::ConfigKey {
            path: self.path.to_path_buf(),
            key: format!("{}{key}", self.prefix),
            msg: msg.into(),
        }
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.v.get(key).filter(|v| !v.is_null())
    }

    fn section(&self, key: &str) -> Result<Obj<'a>, HfClipError> {
        match self.get(key) {
            Some(v) if v.is_object() => Ok(Obj {
                path: self.path,
                prefix: format!("{}{key}.", self.prefix),
                v,
            }),
            Some(_) => Err(self.err(key, "is not an object")),
            None => Err(self.err(key, "is missing")),
        }
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>, HfClipError> {
        self.get(key)
            .map(|v| {
                v.as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| self.err(key, format!("is not a non-negative integer: {v}")))
            })
            .transpose()
    }

    fn usize(&self, key: &str) -> Result<usize, HfClipError> {
        self.opt_usize(key)?
            .ok_or_else(|| self.err(key, "is missing"))
    }

    fn u32_or(&self, key: &str, default: u32) -> Result<u32, HfClipError> {
        match self.opt_usize(key)? {
            None => Ok(default),
            Some(n) => u32::try_from(n).map_err(|_| self.err(key, format!("{n} is too large"))),
        }
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>, HfClipError> {
        self.get(key)
            .map(|v| {
                v.as_f64()
                    .ok_or_else(|| self.err(key, format!("is not a number: {v}")))
            })
            .transpose()
    }

    fn opt_str(&self, key: &str) -> Result<Option<&'a str>, HfClipError> {
        self.get(key)
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| self.err(key, format!("is not a string: {v}")))
            })
            .transpose()
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool, HfClipError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.err(key, format!("is not a boolean: {v}"))),
        }
    }

    fn three(&self, key: &str) -> Result<Option<[f64; 3]>, HfClipError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let nums: Option<Vec<f64>> = v
            .as_array()
            .map(|a| a.iter().map(Value::as_f64).collect::<Option<Vec<_>>>())
            .unwrap_or_else(|| v.as_f64().map(|x| vec![x; 3]));
        match nums.as_deref() {
            Some(&[a, b, c]) => Ok(Some([a, b, c])),
            _ => Err(self.err(key, format!("is not three numbers: {v}"))),
        }
    }
}

pub(crate) fn read_json(path: &Path) -> Result<Value, HfClipError> {
    let text = std::fs::read_to_string(path).map_err(|source| HfClipError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| HfClipError::Json {
        path: path.to_path_buf(),
        source,
    })
}

fn root<'a>(path: &'a Path, v: &'a Value) -> Result<Obj<'a>, HfClipError> {
    if !v.is_object() {
        return Err(HfClipError::Config {
            path: path.to_path_buf(),
            msg: "is not a JSON object".into(),
        });
    }
    Ok(Obj {
        path,
        prefix: String::new(),
        v,
    })
}

/// The `hidden_act` candle's CLIP implements; anything else would silently compute another
/// function.
fn check_act(o: &Obj, key: &str) -> Result<(), HfClipError> {
    match o.opt_str(key)?.unwrap_or("quick_gelu") {
        "quick_gelu" => Ok(()),
        other => Err(o.err(
            key,
            format!("`{other}` is not supported (candle's CLIP implements quick_gelu only)"),
        )),
    }
}

/// candle's CLIP layer norms use epsilon 1e-5, the value of every OpenAI CLIP.
fn check_eps(o: &Obj, key: &str) -> Result<(), HfClipError> {
    match o.opt_f64(key)? {
        None => Ok(()),
        Some(e) if (e - 1e-5).abs() <= 1e-12 => Ok(()),
        Some(e) => Err(o.err(
            key,
            format!("{e} is not supported (candle's CLIP layer norms use 1e-5)"),
        )),
    }
}

impl HfClipConfig {
    /// Reads `config.json` of a `CLIPModel` (`model_type` "clip").
    pub fn from_file(path: &Path) -> Result<Self, HfClipError> {
        let v = read_json(path)?;
        let o = root(path, &v)?;
        match o.opt_str("model_type")? {
            Some("clip") => {}
            other => {
                return Err(o.err(
                    "model_type",
                    format!(
                        "is {}, expected \"clip\" (a CLIPModel folder)",
                        other.map_or("missing".to_string(), |s| format!("\"{s}\""))
                    ),
                ))
            }
        }
        let t = o.section("text_config")?;
        let vi = o.section("vision_config")?;
        for sec in [&t, &vi] {
            check_act(sec, "hidden_act")?;
            check_eps(sec, "layer_norm_eps")?;
        }
        let text = TextTowerConfig {
            vocab_size: t.usize("vocab_size")?,
            hidden_size: t.usize("hidden_size")?,
            intermediate_size: t.usize("intermediate_size")?,
            num_hidden_layers: t.usize("num_hidden_layers")?,
            num_attention_heads: t.usize("num_attention_heads")?,
            max_position_embeddings: t.usize("max_position_embeddings")?,
            // CLIPTextConfig's defaults.
            eos_token_id: t.u32_or("eos_token_id", 49407)?,
            pad_token_id: t.u32_or("pad_token_id", 1)?,
        };
        let vision = VisionTowerConfig {
            hidden_size: vi.usize("hidden_size")?,
            intermediate_size: vi.usize("intermediate_size")?,
            num_hidden_layers: vi.usize("num_hidden_layers")?,
            num_attention_heads: vi.usize("num_attention_heads")?,
            image_size: vi.usize("image_size")?,
            patch_size: vi.usize("patch_size")?,
            num_channels: vi.opt_usize("num_channels")?.unwrap_or(3),
        };
        for (sec, hidden, heads) in [
            (&t, text.hidden_size, text.num_attention_heads),
            (&vi, vision.hidden_size, vision.num_attention_heads),
        ] {
            if heads == 0 || !hidden.is_multiple_of(heads) {
                return Err(sec.err(
                    "num_attention_heads",
                    format!("{heads} does not divide hidden_size {hidden}"),
                ));
            }
        }
        if vision.patch_size == 0 || !vision.image_size.is_multiple_of(vision.patch_size) {
            return Err(vi.err(
                "patch_size",
                format!(
                    "{} does not divide image_size {}",
                    vision.patch_size, vision.image_size
                ),
            ));
        }
        if vision.num_channels != 3 {
            return Err(vi.err(
                "num_channels",
                format!("{} is not supported (RGB only)", vision.num_channels),
            ));
        }
        Ok(Self {
            projection_dim: o.usize("projection_dim")?,
            text,
            vision,
        })
    }
}

/// `{"height", "width"}`, `{"shortest_edge"}` or a bare integer.
fn size_value(o: &Obj, key: &str) -> Result<Option<ResizeRule>, HfClipError> {
    let Some(v) = o.get(key) else {
        return Ok(None);
    };
    let px = |x: &Value, what: &str| -> Result<u32, HfClipError> {
        x.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .filter(|&n| n > 0)
            .ok_or_else(|| o.err(key, format!("{what} is not a positive integer: {x}")))
    };
    if v.is_u64() {
        return Ok(Some(ResizeRule::ShortestEdge(px(v, "size")?)));
    }
    if let Some(s) = v.get("shortest_edge").filter(|x| !x.is_null()) {
        if v.get("longest_edge").is_some_and(|x| !x.is_null()) {
            return Err(o.err(key, "shortest_edge with longest_edge is not supported"));
        }
        return Ok(Some(ResizeRule::ShortestEdge(px(s, "shortest_edge")?)));
    }
    match (v.get("height"), v.get("width")) {
        (Some(h), Some(w)) => Ok(Some(ResizeRule::Exact {
            width: px(w, "width")?,
            height: px(h, "height")?,
        })),
        _ => Err(o.err(
            key,
            format!("expected shortest_edge or height and width: {v}"),
        )),
    }
}

impl ImageProcessorConfig {
    /// Reads `preprocessor_config.json`, with `CLIPImageProcessor`'s defaults for absent keys.
    pub fn from_file(path: &Path) -> Result<Self, HfClipError> {
        let v = read_json(path)?;
        let o = root(path, &v)?;
        // PIL's BICUBIC (3) is the only filter ported (and what every CLIP uses).
        if let Some(r) = o.opt_usize("resample")? {
            if r != 3 {
                return Err(o.err(
                    "resample",
                    format!("{r} is not supported (only 3, bicubic)"),
                ));
            }
        }
        let resize = if o.bool_or("do_resize", true)? {
            Some(size_value(&o, "size")?.unwrap_or(ResizeRule::ShortestEdge(224)))
        } else {
            None
        };
        let crop = if o.bool_or("do_center_crop", true)? {
            Some(match size_value(&o, "crop_size")? {
                None => (224, 224),
                Some(ResizeRule::ShortestEdge(n)) => (n, n),
                Some(ResizeRule::Exact { width, height }) => (width, height),
            })
        } else {
            None
        };
        let rescale = if o.bool_or("do_rescale", true)? {
            Some(o.opt_f64("rescale_factor")?.unwrap_or(1.0 / 255.0))
        } else {
            None
        };
        let normalize = if o.bool_or("do_normalize", true)? {
            // OPENAI_CLIP_MEAN / OPENAI_CLIP_STD.
            let mean = o
                .three("image_mean")?
                .unwrap_or([0.48145466, 0.4578275, 0.40821073]);
            let std = o
                .three("image_std")?
                .unwrap_or([0.26862954, 0.26130258, 0.27577711]);
            if std.contains(&0.0) {
                return Err(o.err("image_std", "has a zero"));
            }
            Some((mean, std))
        } else {
            None
        };
        Ok(Self {
            resize,
            crop,
            rescale,
            normalize,
        })
    }
}

/// The pad token `tokenizer_config.json` names (`"pad_token": "<|endoftext|>"`, or an object
/// with `content`), if the file exists and names one.
pub(crate) fn tokenizer_pad_token(dir: &Path) -> Result<Option<(PathBuf, String)>, HfClipError> {
    let path = dir.join("tokenizer_config.json");
    if !path.is_file() {
        return Ok(None);
    }
    let v = read_json(&path)?;
    let pad = v.get("pad_token").and_then(|p| {
        p.as_str()
            .or_else(|| p.get("content").and_then(Value::as_str))
            .map(str::to_string)
    });
    Ok(pad.map(|p| (path, p)))
}

/// The safetensors files of the folder: `model.safetensors`, else every shard named by
/// `model.safetensors.index.json`. Returns the file to name in errors and the files.
pub(crate) fn weight_files(dir: &Path) -> Result<(PathBuf, Vec<PathBuf>), HfClipError> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok((single.clone(), vec![single]));
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.is_file() {
        return Err(HfClipError::Io {
            path: single,
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        });
    }
    let v = read_json(&index)?;
    let shards: Option<BTreeSet<&str>> = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .map(|m| m.values().filter_map(|f| f.as_str()).collect());
    match shards {
        Some(s) if !s.is_empty() => Ok((index.clone(), s.iter().map(|f| dir.join(f)).collect())),
        _ => Err(HfClipError::Config {
            path: index,
            msg: "no weight_map".into(),
        }),
    }
}

/// A missing tensor becomes [`HfClipError::MissingTensor`]; anything else (shape, dtype) a
/// weights error; both name `path`.
pub(crate) fn weight_err(path: &Path, e: candle_core::Error) -> HfClipError {
    let mut inner = &e;
    while let candle_core::Error::WithBacktrace { inner: i, .. } = inner {
        inner = i;
    }
    match inner {
        candle_core::Error::CannotFindTensor { path: name } => HfClipError::MissingTensor {
            path: path.to_path_buf(),
            name: name.clone(),
        },
        _ => HfClipError::Weights {
            path: path.to_path_buf(),
            source: e,
        },
    }
}
