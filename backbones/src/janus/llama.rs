//! The LLaMA language model of Janus / Janus-Pro (Wu et al. 2024, "Janus: Decoupling Visual
//! Encoding for Unified Multimodal Understanding and Generation"; Chen et al. 2025, "Janus-Pro:
//! Unified Multimodal Understanding and Generation with Data and Model Scaling"), also usable
//! alone for a `LlamaForCausalLM` directory ([`CausalLm`]: weights `model.*` and `lm_head`).
//!
//! RMSNorm, rotate-half RoPE (`rope_theta` from `rope_parameters`), grouped-query attention
//! (`num_key_value_heads`, `head_dim` from the config) and a SwiGLU MLP. Every projection
//! (q, k, v, o, gate, up, down) is built through [`cnext_adapters::linear`], so LoRA, MoELoRA,
//! MAGE experts, PGP input recording and RegLoRA's mergeable bases all apply. Only ops with a
//! backward pass are used (`rms_norm_slow`, the generic softmax, a hand-written RoPE): the
//! fused candle ops have none. The KV cache is created per call and passed in.

use super::config::LlamaConfig;
use super::{load_weights, weights_error, JanusError};
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::VarBuilder;
use cnext_adapters::{linear, AdapterPlan, Ctx, Linear};
use std::path::Path;

type Result<T, E = candle_core::Error> = std::result::Result<T, E>;

/// RMSNorm through differentiable ops (`candle_nn::RmsNorm` has no backward).
#[derive(Debug, Clone)]
pub(crate) struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub(crate) fn new(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(RmsNorm {
            weight: vb.get(size, "weight")?,
            eps: eps as f32,
        })
    }
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // Normalised in f32 and cast back before the weight, as HF's LlamaRMSNorm does.
        candle_nn::ops::rms_norm_slow(x, &self.weight, self.eps)
    }
}

/// Default RoPE: `inv_freq[i] = 1 / theta^(2i / head_dim)` in f32, angles `pos * inv_freq` in
/// f32, as HF computes them.
#[derive(Debug, Clone)]
pub(crate) struct Rope {
    inv_freq: Vec<f32>,
}

impl Rope {
    fn new(theta: f64, head_dim: usize) -> Self {
        let inv_freq = (0..head_dim / 2)
            .map(|i| 1.0f32 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
            .collect();
        Rope { inv_freq }
    }

    /// cos and sin `[B, 1, T, head_dim/2]` for `positions` (`B*T`, row-major).
    fn tables(
        &self,
        positions: &[u32],
        b: usize,
        t: usize,
        dtype: DType,
        dev: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for f in &self.inv_freq {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let shape = (b, 1, t, half);
        Ok((
            Tensor::from_vec(cos, shape, dev)?.to_dtype(dtype)?,
            Tensor::from_vec(sin, shape, dev)?.to_dtype(dtype)?,
        ))
    }
}

/// Rotate-half RoPE: `x * cos + rotate_half(x) * sin` written on the two halves.
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let a = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
    let b = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
    Tensor::cat(&[a, b], D::Minus1)
}

/// Per-layer keys and values of one generate call (layers hold no state).
pub type KvCache = Vec<Option<(Tensor, Tensor)>>;

#[derive(Debug, Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(cfg: &LlamaConfig, vb: VarBuilder, plan: &AdapterPlan) -> Result<Self> {
        let (d, hd) = (cfg.hidden_size, cfg.head_dim());
        let (h, kv) = (cfg.num_attention_heads, cfg.kv_heads());
        let bias = cfg.attention_bias;
        Ok(Attention {
            q_proj: linear(d, h * hd, bias, vb.pp("q_proj"), plan)?,
            k_proj: linear(d, kv * hd, bias, vb.pp("k_proj"), plan)?,
            v_proj: linear(d, kv * hd, bias, vb.pp("v_proj"), plan)?,
            o_proj: linear(h * hd, d, bias, vb.pp("o_proj"), plan)?,
            heads: h,
            kv_heads: kv,
            head_dim: hd,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        rot: &(Tensor, Tensor),
        mask: &Tensor,
        cache: &mut Option<(Tensor, Tensor)>,
        ctx: Ctx,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let split = |y: Tensor, heads: usize| -> Result<Tensor> {
            y.reshape((b, t, heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(self.q_proj.forward_ctx(x, ctx)?, self.heads)?;
        let q = apply_rope(&q, &rot.0, &rot.1)?;
        let k = split(self.k_proj.forward_ctx(x, ctx)?, self.kv_heads)?;
        let mut k = apply_rope(&k, &rot.0, &rot.1)?;
        let mut v = split(self.v_proj.forward_ctx(x, ctx)?, self.kv_heads)?;
        if let Some((pk, pv)) = cache.as_ref() {
            k = Tensor::cat(&[pk, &k], 2)?;
            v = Tensor::cat(&[pv, &v], 2)?;
        }
        *cache = Some((k.clone(), v.clone()));
        let rep = self.heads / self.kv_heads;
        let (k, v) = (repeat_kv(&k, rep)?, repeat_kv(&v, rep)?);
        let scale = (self.head_dim as f64).powf(-0.5);
        let att = (q.matmul(&k.t()?)? * scale)?;
        // Softmax in f32 as HF's eager attention does, then back to the compute dtype.
        let att = att.to_dtype(DType::F32)?.broadcast_add(mask)?;
        let att = candle_nn::ops::softmax(&att, D::Minus1)?.to_dtype(q.dtype())?;
        let y = att
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, t, self.heads * self.head_dim))?;
        self.o_proj.forward_ctx(&y, ctx)
    }
}

/// `[B, kv, S, hd] -> [B, kv * rep, S, hd]`, each kv head repeated `rep` times in a row.
fn repeat_kv(x: &Tensor, rep: usize) -> Result<Tensor> {
    if rep == 1 {
        return Ok(x.clone());
    }
    let (b, kv, s, hd) = x.dims4()?;
    x.unsqueeze(2)?
        .broadcast_as((b, kv, rep, s, hd))?
        .reshape((b, kv * rep, s, hd))
}

#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn new(cfg: &LlamaConfig, vb: VarBuilder, plan: &AdapterPlan) -> Result<Self> {
        let (d, i, bias) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        Ok(Mlp {
            gate_proj: linear(d, i, bias, vb.pp("gate_proj"), plan)?,
            up_proj: linear(d, i, bias, vb.pp("up_proj"), plan)?,
            down_proj: linear(i, d, bias, vb.pp("down_proj"), plan)?,
        })
    }
    fn forward(&self, x: &Tensor, ctx: Ctx) -> Result<Tensor> {
        let g = self.gate_proj.forward_ctx(x, ctx)?.silu()?;
        self.down_proj
            .forward_ctx(&(g * self.up_proj.forward_ctx(x, ctx)?)?, ctx)
    }
}

#[derive(Debug, Clone)]
struct Layer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

/// The decoder (HF `LlamaModel`): token embeddings, layers, final norm. `&self` only.
#[derive(Debug, Clone)]
pub struct LlamaModel {
    cfg: LlamaConfig,
    embed_tokens: Tensor,
    layers: Vec<Layer>,
    norm: RmsNorm,
    rope: Rope,
    device: Device,
}

impl LlamaModel {
    /// `vb` is at the model's prefix (`model.` or `model.language_model.`).
    pub fn new(cfg: &LlamaConfig, vb: VarBuilder, plan: &AdapterPlan) -> Result<Self> {
        let d = cfg.hidden_size;
        let embed_tokens = vb.get((cfg.vocab_size, d), "embed_tokens.weight")?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let lb = vb.pp(format!("layers.{i}"));
            layers.push(Layer {
                input_layernorm: RmsNorm::new(d, cfg.rms_norm_eps, lb.pp("input_layernorm"))?,
                self_attn: Attention::new(cfg, lb.pp("self_attn"), plan)?,
                post_attention_layernorm: RmsNorm::new(
                    d,
                    cfg.rms_norm_eps,
                    lb.pp("post_attention_layernorm"),
                )?,
                mlp: Mlp::new(cfg, lb.pp("mlp"), plan)?,
            });
        }
        Ok(LlamaModel {
            cfg: cfg.clone(),
            embed_tokens,
            layers,
            norm: RmsNorm::new(d, cfg.rms_norm_eps, vb.pp("norm"))?,
            rope: Rope::new(cfg.rope_theta(), cfg.head_dim()),
            device: vb.device().clone(),
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The compute dtype (that of the embeddings).
    pub fn dtype(&self) -> DType {
        self.embed_tokens.dtype()
    }

    /// Token embeddings `[N, d]` of `ids`.
    pub fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        self.embed_tokens
            .index_select(&Tensor::new(ids, &self.device)?, 0)
    }

    /// Every adapted or adaptable projection, layer by layer (q, k, v, o, gate, up, down).
    pub fn linears(&self) -> Vec<&Linear> {
        self.layers
            .iter()
            .flat_map(|l| {
                let (a, m) = (&l.self_attn, &l.mlp);
                [
                    &a.q_proj,
                    &a.k_proj,
                    &a.v_proj,
                    &a.o_proj,
                    &m.gate_proj,
                    &m.up_proj,
                    &m.down_proj,
                ]
            })
            .collect()
    }

    /// Decoder forward: `x` `[B, T, d]`, `positions` `B*T` (row-major), `mask` additive f32
    /// `[B, 1, T, T_past + T]` (see [`attention_mask`]). Returns the normed hidden states.
    pub fn forward(
        &self,
        x: &Tensor,
        positions: &[u32],
        mask: &Tensor,
        cache: &mut KvCache,
        ctx: Ctx,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        if positions.len() != b * t {
            candle_core::bail!(
                "llama forward: {} positions for {b} x {t} inputs",
                positions.len()
            );
        }
        let rot = self.rope.tables(positions, b, t, x.dtype(), &self.device)?;
        if cache.len() != self.layers.len() {
            *cache = vec![None; self.layers.len()];
        }
        let mut h = x.clone();
        for (layer, c) in self.layers.iter().zip(cache.iter_mut()) {
            let a =
                layer
                    .self_attn
                    .forward(&layer.input_layernorm.forward(&h)?, &rot, mask, c, ctx)?;
            h = (h + a)?;
            let m = layer
                .mlp
                .forward(&layer.post_attention_layernorm.forward(&h)?, ctx)?;
            h = (h + m)?;
        }
        self.norm.forward(&h)
    }
}

/// Additive causal mask with key padding, f32 `[B, 1, t_new, T]`: `valid[b][j]` says whether
/// key j of row b is real; the last `t_new` keys are the new queries. Masked entries get a large
/// finite negative (not -inf: a fully masked pad row must not turn into NaN and spread).
pub fn attention_mask(valid: &[Vec<bool>], t_new: usize, dev: &Device) -> Result<Tensor> {
    let b = valid.len();
    let tk = valid.first().map_or(0, Vec::len);
    if tk < t_new || valid.iter().any(|v| v.len() != tk) {
        candle_core::bail!("attention mask: ragged key rows or fewer keys than queries");
    }
    let past = tk - t_new;
    let mut m = vec![0f32; b * t_new * tk];
    for (bi, v) in valid.iter().enumerate() {
        for i in 0..t_new {
            for (j, ok) in v.iter().enumerate() {
                if !ok || j > past + i {
                    m[(bi * t_new + i) * tk + j] = -1e9;
                }
            }
        }
    }
    Tensor::from_vec(m, (b, 1, t_new, tk), dev)
}

/// A left-padded batch being decoded: which keys are real and where each row's next token
/// sits (positions count real tokens only, as HF derives them from the attention mask).
#[derive(Debug, Clone)]
pub struct LeftPadded {
    pub valid: Vec<Vec<bool>>,
    lens: Vec<u32>,
    steps: u32,
}

impl LeftPadded {
    /// Rows of lengths `lens`, padded on the left to the longest.
    pub fn new(lens: &[usize]) -> Self {
        let t0 = lens.iter().copied().max().unwrap_or(0);
        LeftPadded {
            valid: lens
                .iter()
                .map(|&l| (0..t0).map(|j| j >= t0 - l).collect())
                .collect(),
            lens: lens.iter().map(|&l| l as u32).collect(),
            steps: 0,
        }
    }

    pub fn width(&self) -> usize {
        self.valid.first().map_or(0, Vec::len)
    }

    /// Left pad of row `i`.
    pub fn pad(&self, i: usize) -> usize {
        self.width() - self.lens[i] as usize - self.steps as usize
    }

    /// Positions of the prefill, `B*T` (pads get 0: they are masked anyway).
    pub fn prefill_positions(&self) -> Vec<u32> {
        let t0 = self.width();
        self.lens
            .iter()
            .flat_map(|&l| (0..t0).map(move |j| (j + l as usize).saturating_sub(t0) as u32))
            .collect()
    }

    /// Appends one real token to every row; returns the new tokens' positions.
    pub fn push(&mut self) -> Vec<u32> {
        for v in self.valid.iter_mut() {
            v.push(true);
        }
        let pos = self.lens.iter().map(|l| l + self.steps).collect();
        self.steps += 1;
        pos
    }

    pub fn mask(&self, t_new: usize, dev: &Device) -> Result<Tensor> {
        attention_mask(&self.valid, t_new, dev)
    }
}

/// A `LlamaForCausalLM`: the decoder and its head.
#[derive(Debug, Clone)]
pub struct CausalLm {
    pub model: LlamaModel,
    lm_head: Linear,
}

impl CausalLm {
    /// From a VarBuilder at the checkpoint root (`model.*`, `lm_head.weight`). A tied head
    /// reads the embedding matrix (the linear is named by the embedding's path, no adapter).
    pub fn new(cfg: &LlamaConfig, vb: VarBuilder, plan: &AdapterPlan) -> Result<Self> {
        let model = LlamaModel::new(cfg, vb.pp("model"), plan)?;
        let head_vb = if cfg.tie_word_embeddings {
            vb.pp("model.embed_tokens")
        } else {
            vb.pp("lm_head")
        };
        let lm_head = linear(
            cfg.hidden_size,
            cfg.vocab_size,
            false,
            head_vb,
            &AdapterPlan::none(),
        )?;
        Ok(CausalLm { model, lm_head })
    }

    /// Loads a `LlamaForCausalLM` directory (`config.json` with model_type `llama`,
    /// `model.safetensors` or an index of shards), frozen weights in `dtype` (f32 on the CPU).
    pub fn load(
        dir: &Path,
        plan: &AdapterPlan,
        device: &Device,
        dtype: DType,
    ) -> std::result::Result<Self, JanusError> {
        let cfg = LlamaConfig::from_file(&dir.join("config.json"))?;
        let weights = load_weights(dir)?;
        let vb = VarBuilder::from_tensors(weights, super::compute_dtype(dtype, device), device);
        CausalLm::new(&cfg, vb, plan).map_err(weights_error(dir))
    }

    pub fn config(&self) -> &LlamaConfig {
        self.model.config()
    }

    /// Logits (f32) of hidden states `[.., d]`.
    pub fn logits(&self, h: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(h)?.to_dtype(DType::F32)
    }

    /// Full-sequence logits `[B, T, vocab]` of unpadded rows of equal length.
    pub fn forward_ids(&self, ids: &[Vec<u32>], ctx: Ctx) -> Result<Tensor> {
        let b = ids.len();
        let t = ids.first().map_or(0, Vec::len);
        if ids.iter().any(|r| r.len() != t) {
            candle_core::bail!("forward_ids: rows of different lengths (pad them)");
        }
        let flat: Vec<u32> = ids.concat();
        let x = self
            .model
            .embed(&flat)?
            .reshape((b, t, self.config().hidden_size))?;
        let lp = LeftPadded::new(&vec![t; b]);
        let h = self.model.forward(
            &x,
            &lp.prefill_positions(),
            &lp.mask(t, self.model.device())?,
            &mut KvCache::new(),
            ctx,
        )?;
        self.logits(&h)
    }

    /// Greedy decoding of a left-padded batch with a KV cache: per row, up to `max_new` ids,
    /// stopping at (and dropping) any of `eos`; also each step's logits `[B, vocab]`.
    pub fn generate_greedy(
        &self,
        prompts: &[Vec<u32>],
        max_new: usize,
        eos: &[u32],
    ) -> Result<(Vec<Vec<u32>>, Vec<Tensor>)> {
        let b = prompts.len();
        let mut out = vec![vec![]; b];
        let mut steps = vec![];
        if b == 0 || max_new == 0 {
            return Ok((out, steps));
        }
        let dev = self.model.device().clone();
        let lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
        if lens.contains(&0) {
            candle_core::bail!("generate: an empty prompt");
        }
        let mut lp = LeftPadded::new(&lens);
        let t0 = lp.width();
        let mut ids = Vec::with_capacity(b * t0);
        for p in prompts {
            ids.extend(std::iter::repeat_n(p[0], t0 - p.len()));
            ids.extend(p);
        }
        let d = self.config().hidden_size;
        let x = self.model.embed(&ids)?.reshape((b, t0, d))?;
        let mut cache = KvCache::new();
        let ctx = Ctx::default();
        let h = self.model.forward(
            &x,
            &lp.prefill_positions(),
            &lp.mask(t0, &dev)?,
            &mut cache,
            ctx,
        )?;
        let mut last = self.logits(&h.narrow(1, t0 - 1, 1)?.squeeze(1)?)?;
        let mut done = vec![false; b];
        for step in 0..max_new {
            let rows = last.to_vec2::<f32>()?;
            steps.push(last.clone());
            let next: Vec<u32> = rows.iter().map(|r| super::argmax_first(r)).collect();
            for (i, &id) in next.iter().enumerate() {
                if done[i] {
                    continue;
                }
                if eos.contains(&id) {
                    done[i] = true;
                } else {
                    out[i].push(id);
                }
            }
            if done.iter().all(|d| *d) || step + 1 == max_new {
                break;
            }
            let pos = lp.push();
            let x = self.model.embed(&next)?.reshape((b, 1, d))?;
            let h = self
                .model
                .forward(&x, &pos, &lp.mask(1, &dev)?, &mut cache, ctx)?;
            last = self.logits(&h.squeeze(1)?)?;
        }
        Ok((out, steps))
    }
}
