//! A tiny CLIP-like scorer for the mini profile's image tasks (`clip_t`, `clip_i`).
//!
//! The paper scores generated images with OpenAI CLIP ViT-B/32, which knows nothing about our
//! 24x24 shape scenes and cannot be downloaded here. So we train a small two-tower model once,
//! on generated scene/caption pairs (plus edit targets, so `clip_i` has seen edited scenes),
//! and then freeze it: every method is scored by the same fixed embedding.
//!
//! Image tower: the 3x3 grid of 8x8 cells as 9 patches, a linear patch embedding plus learned
//! position embeddings, small pre-norm transformer layers, then the patches are flattened (so
//! "where" survives pooling) and projected. Text tower: word ids from a vocabulary built from
//! the caption grammar, token plus position embeddings, transformer layers (captions must bind
//! colour, shape and position, which a bag of words cannot), masked mean pool, projection.
//! Training is symmetric InfoNCE at a fixed temperature. Only ops with a backward pass are
//! used (`ops::softmax`, `log_softmax`, `rms_norm_slow`; see DESIGN.md), weights are
//! initialised from our seeded generator, so a seed gives bit-identical models.

use crate::optim::AdamWConfig;
use crate::train::{fit, FitConfig, LossFn, TrainError};
use candle_core::{Device, Tensor, Var, D};
use candle_nn::ops::{log_softmax, rms_norm_slow, softmax};
use cnext_core::scoring::clip::ClipModel;
use cnext_datasets::rng::Rng;
use cnext_datasets::scene::{cell_name, Color, Scene, Shape, CELL_PX, SCENE_PX};
use cnext_datasets::tasks::random_edit;
use image::RgbImage;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

pub mod hf;
pub mod hf_config;
mod train;
pub use hf::{clip_score, clip_score_of_embeddings, ClipScore, HfClip, HfClipError, TextBatch};
pub use train::{heldout_pairs, retrieval_r1, train_tiny_clip, ClipReport, ClipTrainConfig};

/// Patches per image side (3x3 grid of cells).
const GRID: usize = (SCENE_PX / CELL_PX) as usize;
const PATCHES: usize = GRID * GRID;
const PATCH_VALUES: usize = (CELL_PX * CELL_PX * 3) as usize;
/// Token id of padding (masked out of attention and pooling).
const PAD: u32 = 0;
/// Token id of any word outside the vocabulary.
const UNK: u32 = 1;
/// Hidden width of the transformer MLPs, in multiples of `dim` (2, not 4: speed matters more
/// than capacity for this tiny task).
const MLP: usize = 2;
const NORM_EPS: f32 = 1e-5;
const WEIGHTS_FILE: &str = "tiny_clip.safetensors";
const CONFIG_FILE: &str = "tiny_clip.json";

/// Why the tiny CLIP could not be trained, loaded, saved or run.
#[derive(Debug, thiserror::Error)]
pub enum ClipError {
    #[error("tiny CLIP tensor op failed: {0}")]
    Candle(#[from] candle_core::Error),
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
    #[error("{path}: cannot read or write weights: {source}")]
    Weights {
        path: PathBuf,
        source: candle_core::Error,
    },
    #[error("{path}: {msg}")]
    Invalid { path: PathBuf, msg: String },
    #[error("bad tiny CLIP config: {0}")]
    Config(String),
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error("retrieval needs at least one image/caption pair")]
    Empty,
    #[error("cannot embed an empty ({width}x{height}) image")]
    EmptyImage { width: u32, height: u32 },
}

/// The architecture and vocabulary: everything besides the weights needed to run the model,
/// saved as JSON next to them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TinyClipConfig {
    pub dim: usize,
    pub embed_dim: usize,
    pub heads: usize,
    pub layers: usize,
    pub max_len: usize,
    /// Words with ids 2.. (0 is padding, 1 unknown).
    pub vocab: Vec<String>,
}

/// The trained, frozen scorer. Its tensors are detached: nothing can train them further.
#[derive(Debug, Clone)]
pub struct TinyClip {
    cfg: TinyClipConfig,
    params: BTreeMap<String, Tensor>,
    index: HashMap<String, u32>,
}

type Params = BTreeMap<String, Tensor>;

enum Init {
    Normal(f64),
    Ones,
}

/// Every parameter's name, shape and initialisation: one list drives init and load checks.
fn param_specs(c: &TinyClipConfig) -> Vec<(String, Vec<usize>, Init)> {
    let (d, v) = (c.dim, c.vocab.len() + 2);
    let std = |fan_in: usize| Init::Normal(1.0 / (fan_in as f64).sqrt());
    let mut s = vec![
        (
            "img.patch.w".into(),
            vec![PATCH_VALUES, d],
            std(PATCH_VALUES),
        ),
        ("img.pos".into(), vec![PATCHES, d], Init::Normal(0.02)),
        ("img.ln_f".into(), vec![d], Init::Ones),
        (
            "img.proj.w".into(),
            vec![PATCHES * d, c.embed_dim],
            std(PATCHES * d),
        ),
        ("txt.tok".into(), vec![v, d], Init::Normal(0.02)),
        ("txt.pos".into(), vec![c.max_len, d], Init::Normal(0.02)),
        ("txt.ln_f".into(), vec![d], Init::Ones),
        ("txt.proj.w".into(), vec![d, c.embed_dim], std(d)),
    ];
    for tower in ["img", "txt"] {
        for l in 0..c.layers {
            let p = |n: &str| format!("{tower}.l{l}.{n}");
            s.push((p("ln1"), vec![d], Init::Ones));
            s.push((p("qkv.w"), vec![d, 3 * d], std(d)));
            s.push((p("o.w"), vec![d, d], std(d)));
            s.push((p("ln2"), vec![d], Init::Ones));
            s.push((p("fc1.w"), vec![d, MLP * d], std(d)));
            s.push((p("fc2.w"), vec![MLP * d, d], std(MLP * d)));
        }
    }
    s
}

fn get<'a>(p: &'a Params, name: &str) -> candle_core::Result<&'a Tensor> {
    p.get(name)
        .ok_or_else(|| candle_core::Error::Msg(format!("tiny CLIP has no tensor {name}")))
}

/// `x @ w` over the last dimension of `x`. No biases anywhere: after a norm they add little,
/// and their gradients (sums over every token) cost more than the matmuls here.
fn linear(p: &Params, name: &str, x: &Tensor) -> candle_core::Result<Tensor> {
    let dims = x.dims().to_vec();
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let last = dims[dims.len() - 1];
    let w = get(p, &format!("{name}.w"))?;
    let y = x.reshape((rows, last))?.matmul(w)?;
    let mut out = dims;
    if let Some(l) = out.last_mut() {
        *l = w.dim(1)?;
    }
    y.reshape(out)
}

/// A pre-norm transformer layer; `mask` is additive `(b, 1, 1, t)` (padding keys at -1e9).
fn block(
    p: &Params,
    pre: &str,
    heads: usize,
    x: &Tensor,
    mask: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let (b, t, d) = x.dims3()?;
    let dh = d / heads;
    let h = rms_norm_slow(x, get(p, &format!("{pre}.ln1"))?, NORM_EPS)?;
    let qkv = linear(p, &format!("{pre}.qkv"), &h)?;
    let split = |i: usize| {
        qkv.narrow(2, i * d, d)?
            .reshape((b, t, heads, dh))?
            .transpose(1, 2)?
            .contiguous()
    };
    let (q, k, v) = (split(0)?, split(1)?, split(2)?);
    let mut att = (q.matmul(&k.t()?.contiguous()?)? / (dh as f64).sqrt())?;
    if let Some(m) = mask {
        att = att.broadcast_add(m)?;
    }
    let o = softmax(&att, D::Minus1)?
        .matmul(&v)?
        .transpose(1, 2)?
        .reshape((b, t, d))?;
    let x = (x + linear(p, &format!("{pre}.o"), &o)?)?;
    let h = rms_norm_slow(&x, get(p, &format!("{pre}.ln2"))?, NORM_EPS)?;
    let h = linear(p, &format!("{pre}.fc1"), &h)?.relu()?;
    x + linear(p, &format!("{pre}.fc2"), &h)?
}

/// Rows scaled to unit length (differentiable, so the loss sees cosines).
fn l2_normalize(x: &Tensor) -> candle_core::Result<Tensor> {
    x.broadcast_div(&(x.sqr()?.sum_keepdim(D::Minus1)? + 1e-12)?.sqrt()?)
}

/// Image tower on `(b, 9, 192)` patches; unit-length `(b, embed_dim)` rows.
fn encode_images(p: &Params, c: &TinyClipConfig, x: &Tensor) -> candle_core::Result<Tensor> {
    let b = x.dim(0)?;
    let mut h = linear(p, "img.patch", x)?.broadcast_add(get(p, "img.pos")?)?;
    for l in 0..c.layers {
        h = block(p, &format!("img.l{l}"), c.heads, &h, None)?;
    }
    let h = rms_norm_slow(&h, get(p, "img.ln_f")?, NORM_EPS)?;
    l2_normalize(&linear(p, "img.proj", &h.reshape((b, PATCHES * c.dim))?)?)
}

/// Text tower on padded ids `(b, t)`; unit-length `(b, embed_dim)` rows.
fn encode_texts(p: &Params, c: &TinyClipConfig, ids: &[Vec<u32>]) -> candle_core::Result<Tensor> {
    let (b, t) = (ids.len(), ids.iter().map(Vec::len).max().unwrap_or(1));
    let mut flat = Vec::with_capacity(b * t);
    let mut keep = Vec::with_capacity(b * t);
    for row in ids {
        for i in 0..t {
            let id = row.get(i).copied().unwrap_or(PAD);
            flat.push(id);
            keep.push(if id == PAD { 0f32 } else { 1.0 });
        }
    }
    let dev = Device::Cpu;
    let keep = Tensor::from_vec(keep, (b, t), &dev)?;
    let mask = ((keep.reshape((b, 1, 1, t))? - 1.0)? * 1e9)?;
    let tok = get(p, "txt.tok")?.index_select(&Tensor::from_vec(flat, b * t, &dev)?, 0)?;
    let pos = get(p, "txt.pos")?.narrow(0, 0, t)?;
    let mut h = tok.reshape((b, t, c.dim))?.broadcast_add(&pos)?;
    for l in 0..c.layers {
        h = block(p, &format!("txt.l{l}"), c.heads, &h, Some(&mask))?;
    }
    let h = rms_norm_slow(&h, get(p, "txt.ln_f")?, NORM_EPS)?;
    let keep = keep.unsqueeze(2)?;
    let pooled = h
        .broadcast_mul(&keep)?
        .sum(1)?
        .broadcast_div(&keep.sum(1)?)?;
    l2_normalize(&linear(p, "txt.proj", &pooled)?)
}

/// Symmetric InfoNCE: the mean of the image->text and text->image cross-entropies of the
/// cosine logits divided by `temperature`, pair `i` being the positive of row/column `i`.
pub fn info_nce(img: &Tensor, txt: &Tensor, temperature: f64) -> candle_core::Result<Tensor> {
    let n = img.dim(0)?;
    let logits = (img.matmul(&txt.t()?)? / temperature)?;
    let eye = Tensor::eye(n, logits.dtype(), logits.device())?;
    let rows = (log_softmax(&logits, 1)? * &eye)?.sum_all()?;
    let cols = (log_softmax(&logits, 0)? * &eye)?.sum_all()?;
    (rows + cols)? / (-2.0 * n as f64)
}

/// Function words of the caption grammar: they carry no information there (every object is
/// "a SIZE COLOUR SHAPE at the POSITION") but would double the text length, and the text
/// tower's cost is most of a training step.
const STOPWORDS: [&str; 5] = ["a", "an", "and", "at", "the"];

/// Lower-case words: runs of letters and digits (punctuation separates and is dropped), less
/// [`STOPWORDS`].
fn words(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|ch: char| !ch.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .filter(|w| !STOPWORDS.contains(&w.as_str()))
}

/// Every word the caption grammar can produce, sorted, so the vocabulary is fixed by code
/// rather than by which scenes a seed happened to draw.
fn caption_vocab() -> Vec<String> {
    let mut v: BTreeSet<String> = ["empty", "white", "canvas"]
        .iter()
        .chain(&["small", "large", "top", "bottom", "left", "right"])
        .map(|w| w.to_string())
        .collect();
    v.extend(Color::ALL.iter().map(|c| c.name().to_string()));
    v.extend(Shape::ALL.iter().map(|s| s.name().to_string()));
    for r in 0..3 {
        for c in 0..3 {
            v.extend(words(&cell_name(r, c)));
        }
    }
    v.into_iter().collect()
}

/// Pixels in [-1, 1] as 9 patches of 8x8x3 in reading order, resized to 24x24 first if
/// needed (a generator may emit another size; the scorer must still compare like with like).
fn patches(img: &RgbImage, out: &mut Vec<f32>) {
    let resized;
    let img = if img.dimensions() == (SCENE_PX, SCENE_PX) {
        img
    } else {
        resized = image::imageops::resize(
            img,
            SCENE_PX,
            SCENE_PX,
            image::imageops::FilterType::Triangle,
        );
        &resized
    };
    for pr in 0..GRID as u32 {
        for pc in 0..GRID as u32 {
            for y in 0..CELL_PX {
                for x in 0..CELL_PX {
                    let px = img.get_pixel(pc * CELL_PX + x, pr * CELL_PX + y);
                    out.extend(px.0.iter().map(|&v| f32::from(v) / 127.5 - 1.0));
                }
            }
        }
    }
}

fn image_tensor(imgs: &[RgbImage]) -> Result<Tensor, ClipError> {
    let mut data = Vec::with_capacity(imgs.len() * PATCHES * PATCH_VALUES);
    for img in imgs {
        let (width, height) = img.dimensions();
        if width == 0 || height == 0 {
            return Err(ClipError::EmptyImage { width, height });
        }
        patches(img, &mut data);
    }
    let shape = (imgs.len(), PATCHES, PATCH_VALUES);
    Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
}

fn validate(c: &TinyClipConfig) -> Result<(), String> {
    if c.dim == 0 || c.embed_dim == 0 || c.heads == 0 || c.max_len == 0 {
        return Err("dim, embed_dim, heads and max_len must be positive".into());
    }
    if c.dim.checked_rem(c.heads) != Some(0) {
        return Err(format!(
            "dim {} is not divisible by heads {}",
            c.dim, c.heads
        ));
    }
    Ok(())
}

/// Error mappers naming the file, so every failure says which file it was.
fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ClipError + '_ {
    move |source| ClipError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn weights_err(path: &Path) -> impl FnOnce(candle_core::Error) -> ClipError + '_ {
    move |source| ClipError::Weights {
        path: path.to_path_buf(),
        source,
    }
}

fn json_err(path: &Path) -> impl FnOnce(serde_json::Error) -> ClipError + '_ {
    move |source| ClipError::Json {
        path: path.to_path_buf(),
        source,
    }
}

/// [`cnext_core::fsx::write_atomic_with`], the error naming `path`.
fn write_atomic(
    path: &Path,
    write: impl FnOnce(&Path) -> Result<(), ClipError>,
) -> Result<(), ClipError> {
    cnext_core::fsx::write_atomic_with(path, |tmp| {
        write(tmp).map_err(|e| Wrapped::Clip(Box::new(e)))
    })
    .map_err(|e| match e {
        Wrapped::Clip(e) => *e,
        Wrapped::Io(source) => ClipError::Io {
            path: path.to_path_buf(),
            source,
        },
    })
}

/// A writer error, or the temp file's own I/O (sync, rename).
enum Wrapped {
    Clip(Box<ClipError>),
    Io(std::io::Error),
}

impl From<std::io::Error> for Wrapped {
    fn from(e: std::io::Error) -> Self {
        Wrapped::Io(e)
    }
}

impl TinyClip {
    fn new(cfg: TinyClipConfig, params: Params) -> Self {
        let index = (cfg.vocab.iter().enumerate())
            .map(|(i, w)| (w.clone(), i as u32 + 2))
            .collect();
        TinyClip { cfg, params, index }
    }

    pub fn config(&self) -> &TinyClipConfig {
        &self.cfg
    }

    /// Word ids of `text`, truncated to `max_len`; an empty text becomes one unknown word so
    /// it still has an embedding.
    pub fn tokenize(&self, text: &str) -> Vec<u32> {
        let mut ids: Vec<u32> = words(text)
            .map(|w| self.index.get(&w).copied().unwrap_or(UNK))
            .take(self.cfg.max_len)
            .collect();
        if ids.is_empty() {
            ids.push(UNK);
        }
        ids
    }

    /// Unit-length image embeddings, one row per image.
    pub fn embed_images(&self, imgs: &[RgbImage]) -> Result<Vec<Vec<f32>>, ClipError> {
        Ok(encode_images(&self.params, &self.cfg, &image_tensor(imgs)?)?.to_vec2()?)
    }

    /// Unit-length text embeddings, one row per text.
    pub fn embed_texts(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, ClipError> {
        let ids: Vec<Vec<u32>> = texts.iter().map(|t| self.tokenize(t)).collect();
        Ok(encode_texts(&self.params, &self.cfg, &ids)?.to_vec2()?)
    }

    /// Saves `tiny_clip.safetensors` and `tiny_clip.json` into `dir` (created if missing).
    pub fn save(&self, dir: &Path) -> Result<(), ClipError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let weights = dir.join(WEIGHTS_FILE);
        let tensors: HashMap<&str, Tensor> = (self.params.iter())
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        write_atomic(&weights, |tmp| {
            candle_core::safetensors::save(&tensors, tmp).map_err(weights_err(&weights))
        })?;
        let config = dir.join(CONFIG_FILE);
        let json = serde_json::to_string_pretty(&self.cfg).map_err(json_err(&config))?;
        write_atomic(&config, |tmp| {
            std::fs::write(tmp, json).map_err(io_err(&config))
        })
    }

    /// Loads what [`TinyClip::save`] wrote, checking every tensor's name and shape.
    pub fn load(dir: &Path) -> Result<Self, ClipError> {
        let config = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&config).map_err(io_err(&config))?;
        let cfg: TinyClipConfig = serde_json::from_str(&text).map_err(json_err(&config))?;
        validate(&cfg).map_err(|msg| ClipError::Invalid { path: config, msg })?;
        let path = dir.join(WEIGHTS_FILE);
        let mut loaded =
            candle_core::safetensors::load(&path, &Device::Cpu).map_err(weights_err(&path))?;
        let invalid = |msg: String| ClipError::Invalid {
            path: path.clone(),
            msg,
        };
        let mut params = Params::new();
        for (name, shape, _) in param_specs(&cfg) {
            let t = loaded
                .remove(&name)
                .ok_or_else(|| invalid(format!("missing tensor {name}")))?;
            if t.dims() != shape.as_slice() || t.dtype() != candle_core::DType::F32 {
                return Err(invalid(format!(
                    "tensor {name} is {:?} {:?}, expected F32 {shape:?}",
                    t.dtype(),
                    t.dims()
                )));
            }
            params.insert(name, t);
        }
        if let Some(extra) = loaded.keys().next() {
            return Err(invalid(format!("unexpected tensor {extra}")));
        }
        Ok(TinyClip::new(cfg, params))
    }
}

impl ClipModel for TinyClip {
    type Image = RgbImage;
    type Error = ClipError;

    fn embed_image(&self, img: &RgbImage) -> Result<Vec<f32>, ClipError> {
        let mut rows = self.embed_images(std::slice::from_ref(img))?;
        rows.pop().ok_or(ClipError::Empty)
    }

    fn embed_text(&self, text: &str) -> Result<Vec<f32>, ClipError> {
        let mut rows = self.embed_texts(&[text])?;
        rows.pop().ok_or(ClipError::Empty)
    }
}

#[cfg(test)]
mod tests {
    //! Tests of private pieces; the public API is tested in `harness/tests/clip.rs`.
    use super::*;

    #[test]
    fn vocabulary_covers_every_caption_word() {
        let v: BTreeSet<String> = caption_vocab().into_iter().collect();
        let mut rng = Rng::new(5);
        for _ in 0..300 {
            let s = Scene::random(&mut rng, 1, 3);
            let t = random_edit(&s, &mut rng).1;
            for w in words(&s.caption()).chain(words(&t.caption())) {
                assert!(v.contains(&w), "{w}");
            }
        }
        let got: Vec<String> = words("A Red, circle at the CENTER.").collect();
        assert_eq!(got, ["red", "circle", "center"]);
    }

    /// Fused candle ops silently have no backward (DESIGN.md): every parameter must learn.
    #[test]
    fn every_parameter_gets_a_gradient() {
        let arch = TinyClipConfig {
            dim: 8,
            embed_dim: 4,
            heads: 2,
            layers: 1,
            max_len: 48,
            vocab: caption_vocab(),
        };
        let mut vars = BTreeMap::new();
        let mut p = Params::new();
        for (name, shape, _) in param_specs(&arch) {
            let n: usize = shape.iter().product();
            let values = cnext_adapters::normal_values(3, &name, n, 0.5);
            let v = Var::from_tensor(&Tensor::from_vec(values, shape, &Device::Cpu).unwrap());
            let v = v.unwrap();
            p.insert(name.clone(), v.as_tensor().clone());
            vars.insert(name, v);
        }
        let cfg = ClipTrainConfig {
            batch_size: 8,
            ..ClipTrainConfig::default()
        };
        let (imgs, caps) = train::training_batch(&cfg, &mut Rng::new(1));
        let tok = TinyClip::new(arch.clone(), Params::new());
        let ids: Vec<Vec<u32>> = caps.iter().map(|c| tok.tokenize(c)).collect();
        let img = encode_images(&p, &arch, &image_tensor(&imgs).unwrap()).unwrap();
        let txt = encode_texts(&p, &arch, &ids).unwrap();
        let grads = info_nce(&img, &txt, 0.07).unwrap().backward().unwrap();
        for (name, v) in &vars {
            let g = grads.get(v.as_tensor()).map(|g| {
                let s = g.abs().and_then(|a| a.sum_all()).unwrap();
                s.to_scalar::<f32>().unwrap()
            });
            assert!(g.is_some_and(|g| g > 0.0), "{name}: {g:?}");
        }
    }
}
