//! The nano Dual-to-Dual model, shaped like SEED-X / Janus (Ge et al., "SEED-X: Multimodal
//! Models with Unified Multi-granularity Comprehension and Generation", 2024; Wu et al., "Janus:
//! Decoupling Visual Encoding for Unified Multimodal Understanding and Generation", 2024):
//! images are read as continuous patch embeddings (frozen patch encoder + trainable projector,
//! Fuyu/Janus-style, each patch flagged by how well it matches the prompt's words: [`Relevance`])
//! and written as VQ codes predicted by a LLaMA-style decoder (RMSNorm, RoPE,
//! SwiGLU). RMSNorm, RoPE, attention and SwiGLU are the fused ops of `cnext_kernels::fused`
//! (one graph node each, with a hand-written backward; candle's own fused forms have none).

use super::config::NanoConfig;
use candle_core::{DType, Device, IndexOp, Module, Result, Tensor};
use candle_nn::VarBuilder;
use cnext_adapters::{linear, AdapterPlan, Ctx, Linear};
use cnext_kernels::fused;
use image::RgbImage;

/// RMSNorm through differentiable ops.
#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn new(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(size, "weight", candle_nn::Init::Const(1.0))?;
        Ok(RmsNorm {
            weight,
            eps: eps as f32,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        fused::norm::rms_norm(x, &self.weight, self.eps)
    }
}

/// Per-layer key/value cache, created per generate call and passed in (layers hold no state).
pub type KvCache = Vec<Option<(Tensor, Tensor)>>;

#[derive(Debug, Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(cfg: &NanoConfig, vb: VarBuilder, plan: &AdapterPlan) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(Attention {
            q_proj: linear(d, d, false, vb.pp("q_proj"), plan)?,
            k_proj: linear(d, d, false, vb.pp("k_proj"), plan)?,
            v_proj: linear(d, d, false, vb.pp("v_proj"), plan)?,
            o_proj: linear(d, d, false, vb.pp("o_proj"), plan)?,
            heads: cfg.num_attention_heads,
            head_dim: cfg.head_dim(),
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        rot: &Rot,
        mask: &Tensor,
        cache: &mut Option<(Tensor, Tensor)>,
        ctx: Ctx,
    ) -> Result<Tensor> {
        let rot_qk = Some((&rot.cos, &rot.sin));
        let q = fused::rope::heads(&self.q_proj.forward_ctx(x, ctx)?, self.heads, rot_qk)?;
        let mut k = fused::rope::heads(&self.k_proj.forward_ctx(x, ctx)?, self.heads, rot_qk)?;
        let mut v = fused::rope::heads(&self.v_proj.forward_ctx(x, ctx)?, self.heads, None)?;
        if let Some((pk, pv)) = cache.as_ref() {
            k = Tensor::cat(&[pk, &k], 2)?;
            v = Tensor::cat(&[pv, &v], 2)?;
        }
        *cache = Some((k.clone(), v.clone()));
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let y = fused::attention::attention(&q, &k, &v, mask, scale)?;
        self.o_proj.forward_ctx(&y, ctx)
    }
}

#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn new(cfg: &NanoConfig, vb: VarBuilder, plan: &AdapterPlan) -> Result<Self> {
        let (d, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Mlp {
            gate_proj: linear(d, i, false, vb.pp("gate_proj"), plan)?,
            up_proj: linear(d, i, false, vb.pp("up_proj"), plan)?,
            down_proj: linear(i, d, false, vb.pp("down_proj"), plan)?,
        })
    }
    fn forward(&self, x: &Tensor, ctx: Ctx) -> Result<Tensor> {
        let g = self.gate_proj.forward_ctx(x, ctx)?;
        let u = self.up_proj.forward_ctx(x, ctx)?;
        self.down_proj
            .forward_ctx(&fused::swiglu::swiglu(&g, &u)?, ctx)
    }
}

#[derive(Debug, Clone)]
struct Layer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

/// Rotation tables gathered for the positions of one forward.
struct Rot {
    cos: Tensor,
    sin: Tensor,
}

/// Image patches -> embeddings in the LLM's space: a frozen patch encoder (linear + 2-D
/// position embedding + SiLU + linear) and the trainable projector.
#[derive(Debug, Clone)]
struct Vision {
    patch_embed: Linear,
    row_embed: Tensor,
    col_embed: Tensor,
    fc: Linear,
    projector: Linear,
    patch: usize,
}

impl Vision {
    fn new(cfg: &NanoConfig, vb: VarBuilder, vb_train: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        let p = cfg.patch_size;
        let none = AdapterPlan::none();
        let init = candle_nn::Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        Ok(Vision {
            patch_embed: linear(p * p * 3, d, true, vb.pp("vision.patch_embed"), &none)?,
            row_embed: vb.get_with_hints((cfg.max_grid, d), "vision.row_embed", init)?,
            col_embed: vb.get_with_hints((cfg.max_grid, d), "vision.col_embed", init)?,
            fc: linear(d, d, true, vb.pp("vision.fc"), &none)?,
            projector: linear(d, d, true, vb_train.pp("projector"), &none)?,
            patch: p,
        })
    }

    /// The pixels of every patch of `images` (in [-1, 1], [sum of patches, p * p * 3]
    /// row-major) and each patch's grid row and column.
    fn pixels(&self, images: &[&RgbImage]) -> (Vec<f32>, Vec<u32>, Vec<u32>) {
        let p = self.patch as u32;
        let (mut pix, mut rows, mut cols) = (vec![], vec![], vec![]);
        for img in images {
            for gy in 0..img.height() / p {
                for gx in 0..img.width() / p {
                    for y in 0..p {
                        for x in 0..p {
                            let px = img.get_pixel(gx * p + x, gy * p + y);
                            pix.extend(px.0.iter().map(|&c| f32::from(c) / 127.5 - 1.0));
                        }
                    }
                    rows.push(gy);
                    cols.push(gx);
                }
            }
        }
        (pix, rows, cols)
    }

    /// The patch encoder's output before the projector: [sum of patches, d].
    fn features(&self, images: &[&RgbImage], dev: &Device) -> Result<Tensor> {
        let (pix, rows, cols) = self.pixels(images);
        self.features_of(
            &Tensor::new(pix, dev)?,
            &Tensor::new(rows, dev)?,
            &Tensor::new(cols, dev)?,
        )
    }

    fn features_of(&self, pix: &Tensor, rows: &Tensor, cols: &Tensor) -> Result<Tensor> {
        let x = pix.reshape((rows.dim(0)?, self.patch * self.patch * 3))?;
        let r = self.row_embed.index_select(rows, 0)?;
        let c = self.col_embed.index_select(cols, 0)?;
        let h = ((self.patch_embed.forward(&x)? + r)? + c)?.silu()?;
        self.fc.forward(&h)
    }
}

/// Text-queried patch relevance (after OWL-ViT, Minderer et al. 2022, which scores image
/// patches against a text query, and InstructBLIP, Dai et al. 2023, whose visual tokens depend
/// on the instruction). Each patch's encoder features are scored against the mean of the
/// prompt's words in a table of its own, and the patch gets a learned flag in proportion. It is
/// pretrained on which objects a phrase names (`cnext_harness::vision`), then frozen: without
/// it the decoder never learned to pick out the patch a question names ("the red circle") and
/// answered about the same object whatever the noun.
#[derive(Debug, Clone)]
struct Relevance {
    embed: Tensor,
    key: Linear,
    query: Linear,
    flag: Tensor,
}

impl Relevance {
    fn new(cfg: &NanoConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        let none = AdapterPlan::none();
        let init = candle_nn::Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        Ok(Relevance {
            embed: vb.get_with_hints((cfg.vocab_size, d), "embed", init)?,
            key: linear(d, d, false, vb.pp("key"), &none)?,
            query: linear(d, d, false, vb.pp("query"), &none)?,
            flag: vb.get_with_hints(d, "flag", init)?,
        })
    }

    /// The word ids and weights (each a prompt word's share of its mean, [B * T]) and each
    /// patch's sequence, for [`Relevance::logits`]. A sequence's prompt text is its tokens
    /// after its last patch, up to `<sep>`.
    fn inputs(
        seqs: &[Vec<Slot>],
        images: &[Option<&RgbImage>],
        cfg: &NanoConfig,
    ) -> (Vec<u32>, Vec<f32>, Vec<u32>) {
        let (b, t) = (seqs.len(), seqs.first().map_or(0, Vec::len));
        let (mut weights, mut ids) = (vec![0f32; b * t], vec![0u32; b * t]);
        let mut owner = vec![];
        let ps = cfg.patch_size as u32;
        for (bi, (s, img)) in seqs.iter().zip(images).enumerate() {
            let Some(i) = img else { continue };
            let start = s
                .iter()
                .rposition(|x| matches!(x, Slot::Patch(_)))
                .map_or(0, |p| p + 1);
            let end = s[start..]
                .iter()
                .position(|x| *x == Slot::Token(super::tokenizer::SEP))
                .map_or(s.len(), |p| start + p);
            for (j, slot) in s.iter().enumerate().take(end).skip(start) {
                if let Slot::Token(id) = slot {
                    ids[bi * t + j] = *id;
                    weights[bi * t + j] = 1.0 / (end - start) as f32;
                }
            }
            let n = ((i.width() / ps) * (i.height() / ps)) as usize;
            owner.extend(std::iter::repeat_n(bi as u32, n));
        }
        (ids, weights, owner)
    }

    /// Logits [P] for the patches `feats` [P, d] (see [`Relevance::inputs`]).
    fn logits(
        &self,
        feats: &Tensor,
        ids: &Tensor,
        weights: &Tensor,
        owner: &Tensor,
    ) -> Result<Tensor> {
        let d = feats.dim(1)?;
        let (b, t) = weights.dims2()?;
        let words = self.embed.index_select(ids, 0)?;
        let mean = weights
            .reshape((b, 1, t))?
            .matmul(&words.reshape((b, t, d))?)?
            .squeeze(1)?;
        let unit = Tensor::ones(d, mean.dtype(), mean.device())?;
        // Unit RMS on both sides and a 1/d scale: logits start near 0, the gate near 1/2.
        let q = self
            .query
            .forward(&fused::norm::rms_norm(&mean, &unit, 1e-5)?)?
            .index_select(owner, 0)?;
        let k = self
            .key
            .forward(&fused::norm::rms_norm(feats, &unit, 1e-5)?)?;
        (k * q)?.sum(1)? / d as f64
    }
}

/// Everything an embedding is computed from, made on the host before the first tensor op;
/// [`NanoModel::embed_inputs`] hands it out by name for replicas of the computation.
struct EmbedInputs {
    /// Token ids [B * T] (0 at patch slots).
    ids: Tensor,
    /// Patches: pixels, grid rows and columns, relevance word ids, weights [B, T] and owners,
    /// and the row of each slot in `cat(tokens, patches)` [B * T].
    patches: Option<[Tensor; 7]>,
    b: usize,
    t: usize,
}

/// The names of [`EmbedInputs::patches`], in order.
const PATCH_INPUTS: [&str; 7] = [
    "pixels",
    "patch_rows",
    "patch_cols",
    "relevance_ids",
    "relevance_weights",
    "patch_owner",
    "gather",
];

/// One element of an input sequence: a token or the i-th patch of the sequence's image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    Token(u32),
    Patch(usize),
}

/// The nano model. `&self` only: caches are created per call.
#[derive(Debug, Clone)]
pub struct NanoModel {
    cfg: NanoConfig,
    embed_tokens: Tensor,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: Tensor,
    vision: Vision,
    relevance: Relevance,
    cos: Tensor,
    sin: Tensor,
    device: Device,
}

impl NanoModel {
    /// `vb` holds the base weights (plain tensors when fine-tuning: frozen by construction;
    /// variables when pretraining), `vb_train` the projector (always variables).
    pub fn new(
        cfg: &NanoConfig,
        vb: VarBuilder,
        vb_train: VarBuilder,
        plan: &AdapterPlan,
    ) -> Result<Self> {
        let d = cfg.hidden_size;
        let device = vb.device().clone();
        let init = candle_nn::Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        let embed_tokens =
            vb.get_with_hints((cfg.vocab_size, d), "llm.embed_tokens.weight", init)?;
        let mut layers = vec![];
        for i in 0..cfg.num_hidden_layers {
            let lb = vb.pp(format!("llm.layers.{i}"));
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
        let norm = RmsNorm::new(d, cfg.rms_norm_eps, vb.pp("llm.norm"))?;
        let lm_head = vb.get_with_hints((cfg.vocab_size, d), "lm_head.weight", init)?;
        let vision = Vision::new(cfg, vb.clone(), vb_train)?;
        let relevance = Relevance::new(cfg, vb.pp("relevance"))?;
        let half = cfg.head_dim() / 2;
        let mut cos = Vec::with_capacity(cfg.max_position_embeddings * half);
        let mut sin = Vec::with_capacity(cos.capacity());
        for pos in 0..cfg.max_position_embeddings {
            for i in 0..half {
                let f = pos as f64 / cfg.rope_theta.powf(2.0 * i as f64 / cfg.head_dim() as f64);
                cos.push(f.cos() as f32);
                sin.push(f.sin() as f32);
            }
        }
        let shape = (cfg.max_position_embeddings, half);
        Ok(NanoModel {
            cfg: cfg.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            vision,
            relevance,
            cos: Tensor::from_vec(cos, shape, &device)?,
            sin: Tensor::from_vec(sin, shape, &device)?,
            device,
        })
    }

    pub fn config(&self) -> &NanoConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Every adapted linear, for methods that inspect layer inputs or weights.
    pub fn linears(&self) -> Vec<&Linear> {
        self.layers
            .iter()
            .flat_map(|l| {
                let a = &l.self_attn;
                let m = &l.mlp;
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

    fn embed_inputs_of(
        &self,
        seqs: &[Vec<Slot>],
        images: &[Option<&RgbImage>],
    ) -> Result<EmbedInputs> {
        let (b, t) = (seqs.len(), seqs.first().map_or(0, Vec::len));
        let dev = &self.device;
        let present: Vec<&RgbImage> = images.iter().flatten().copied().collect();
        let mut offsets = Vec::with_capacity(b);
        let mut acc = 0usize;
        for img in images {
            offsets.push(acc);
            if let Some(i) = img {
                acc += ((i.width() / self.cfg.patch_size as u32)
                    * (i.height() / self.cfg.patch_size as u32)) as usize;
            }
        }
        let ids: Vec<u32> = seqs
            .iter()
            .flat_map(|s| {
                s.iter()
                    .map(|slot| if let Slot::Token(id) = slot { *id } else { 0 })
            })
            .collect();
        let patches = if acc == 0 {
            None
        } else {
            let (pix, rows, cols) = self.vision.pixels(&present);
            let (rids, rweights, owner) = Relevance::inputs(seqs, images, &self.cfg);
            let mut idx = Vec::with_capacity(b * t);
            for (bi, s) in seqs.iter().enumerate() {
                for (ti, slot) in s.iter().enumerate() {
                    idx.push(match slot {
                        Slot::Token(_) => (bi * t + ti) as u32,
                        Slot::Patch(p) => (b * t + offsets[bi] + p) as u32,
                    });
                }
            }
            Some([
                Tensor::new(pix, dev)?,
                Tensor::new(rows, dev)?,
                Tensor::new(cols, dev)?,
                Tensor::new(rids, dev)?,
                Tensor::from_vec(rweights, (b, t), dev)?,
                Tensor::new(owner, dev)?,
                Tensor::new(idx, dev)?,
            ])
        };
        Ok(EmbedInputs {
            ids: Tensor::new(ids, dev)?,
            patches,
            b,
            t,
        })
    }

    /// The host-side inputs of [`NanoModel::embed`] by name (`ids`, and for images
    /// `pixels`, `patch_rows`, `patch_cols`, `relevance_ids`, `relevance_weights`,
    /// `patch_owner`, `gather`): what a replica of the computation needs
    /// (`cnext bench step --dump`).
    pub fn embed_inputs(
        &self,
        seqs: &[Vec<Slot>],
        images: &[Option<&RgbImage>],
    ) -> Result<std::collections::BTreeMap<String, Tensor>> {
        let inp = self.embed_inputs_of(seqs, images)?;
        let mut out = std::collections::BTreeMap::from([("ids".to_string(), inp.ids)]);
        for (name, t) in PATCH_INPUTS.iter().zip(inp.patches.into_iter().flatten()) {
            out.insert(name.to_string(), t);
        }
        Ok(out)
    }

    /// Embeds `seqs` (each a list of slots, all the same length) with `images[b]` feeding the
    /// patch slots of sequence b. One gather keeps it differentiable and cheap.
    pub fn embed(&self, seqs: &[Vec<Slot>], images: &[Option<&RgbImage>]) -> Result<Tensor> {
        let EmbedInputs { ids, patches, b, t } = self.embed_inputs_of(seqs, images)?;
        let text = self.embed_tokens.index_select(&ids, 0)?;
        let Some([pix, rows, cols, rids, rweights, owner, gather]) = patches else {
            return text.reshape((b, t, self.cfg.hidden_size));
        };
        let feats = self.vision.features_of(&pix, &rows, &cols)?;
        let gate = self.relevance.logits(&feats, &rids, &rweights, &owner)?;
        // sigmoid(x) = (1 + tanh(x / 2)) / 2: differentiable ops that cannot overflow.
        let gate = (((gate * 0.5)?.tanh()? + 1.0)? * 0.5)?;
        let patches = (self.vision.projector.forward(&feats)?
            + gate
                .unsqueeze(1)?
                .broadcast_mul(&self.relevance.flag.unsqueeze(0)?)?)?;
        let all = Tensor::cat(&[text, patches], 0)?;
        all.index_select(&gather, 0)?
            .reshape((b, t, self.cfg.hidden_size))
    }

    /// Decoder forward: `x` [B, T, d], `positions` [B*T], `mask` additive [B, 1, T, T_past+T].
    pub fn decode(
        &self,
        x: &Tensor,
        positions: &[u32],
        mask: &Tensor,
        cache: &mut KvCache,
        ctx: Ctx,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let pos = Tensor::new(positions, &self.device)?;
        let half = self.cfg.head_dim() / 2;
        let rot = Rot {
            cos: self.cos.index_select(&pos, 0)?.reshape((b, 1, t, half))?,
            sin: self.sin.index_select(&pos, 0)?.reshape((b, 1, t, half))?,
        };
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

    /// The patch encoder's features of every patch of `images` (row-major per image, images in
    /// order), before the projector: what supervised vision pretraining trains.
    pub fn patch_features(&self, images: &[&RgbImage]) -> Result<Tensor> {
        self.vision.features(images, &self.device)
    }

    /// The relevance logit of every patch of `images` to its sequence's prompt text (see
    /// [`Relevance`]): [sum of patches].
    pub fn patch_relevance(
        &self,
        seqs: &[Vec<Slot>],
        images: &[Option<&RgbImage>],
    ) -> Result<Tensor> {
        let present: Vec<&RgbImage> = images.iter().flatten().copied().collect();
        let feats = self.vision.features(&present, &self.device)?;
        let (ids, weights, owner) = Relevance::inputs(seqs, images, &self.cfg);
        let (b, t) = (seqs.len(), seqs.first().map_or(0, Vec::len));
        let dev = &self.device;
        self.relevance.logits(
            &feats,
            &Tensor::new(ids, dev)?,
            &Tensor::from_vec(weights, (b, t), dev)?,
            &Tensor::new(owner, dev)?,
        )
    }

    /// Logits of hidden states [N, d] -> [N, vocab].
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        hidden.matmul(&self.lm_head.t()?)
    }

    /// Additive causal mask with key padding: `valid[b][j]` says whether key j is real.
    pub fn mask(&self, valid: &[Vec<bool>], t_new: usize) -> Result<Tensor> {
        let b = valid.len();
        let tk = valid.first().map_or(0, Vec::len);
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
        Tensor::from_vec(m, (b, 1, t_new, tk), &self.device)
    }

    /// Row `i` of the lm-head weights (for tests).
    pub fn lm_head_row(&self, i: usize) -> Result<Tensor> {
        self.lm_head.i(i)
    }

    pub fn dtype(&self) -> DType {
        self.embed_tokens.dtype()
    }
}
