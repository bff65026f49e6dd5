//! The VQ image tokenizer of Janus / Janus-Pro (Wu et al. 2024, "Janus: Decoupling Visual
//! Encoding for Unified Multimodal Understanding and Generation"; Chen et al. 2025, "Janus-Pro:
//! Unified Multimodal Understanding and Generation with Data and Model Scaling"), as
//! transformers' `JanusVQVAE`: a convolutional encoder (ResNet blocks, attention blocks at the
//! lowest resolution, stride-2 downsampling with asymmetric zero padding), `quant_conv`, the
//! nearest codebook entry (argmin of squared L2 distance), `post_quant_conv` and a decoder
//! (nearest-neighbour 2x upsampling). GroupNorm has 32 groups and eps 1e-6 everywhere.
//!
//! Frozen: it turns target images into codes for training and codes into pixels, with no
//! gradient, so any candle op is fine here.

use super::config::VqConfig;
use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{GroupNorm, VarBuilder};

#[derive(Debug, Clone)]
struct Conv {
    weight: Tensor,
    bias: Tensor,
    stride: usize,
    padding: usize,
}

impl Conv {
    fn new(
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        padding: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Conv {
            weight: vb.get((cout, cin, k, k), "weight")?,
            bias: vb.get(cout, "bias")?,
            stride,
            padding,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let c = self.bias.dim(0)?;
        x.conv2d(&self.weight, self.padding, self.stride, 1, 1)?
            .broadcast_add(&self.bias.reshape((1, c, 1, 1))?)
    }
}

fn group_norm(c: usize, vb: VarBuilder) -> Result<GroupNorm> {
    GroupNorm::new(vb.get(c, "weight")?, vb.get(c, "bias")?, c, 32, 1e-6)
}

/// `x * sigmoid(x)`.
fn swish(x: &Tensor) -> Result<Tensor> {
    x.silu()
}

#[derive(Debug, Clone)]
struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv,
    norm2: GroupNorm,
    conv2: Conv,
    nin_shortcut: Option<Conv>,
}

impl ResnetBlock {
    fn new(cin: usize, cout: usize, vb: VarBuilder) -> Result<Self> {
        Ok(ResnetBlock {
            norm1: group_norm(cin, vb.pp("norm1"))?,
            conv1: Conv::new(cin, cout, 3, 1, 1, vb.pp("conv1"))?,
            norm2: group_norm(cout, vb.pp("norm2"))?,
            conv2: Conv::new(cout, cout, 3, 1, 1, vb.pp("conv2"))?,
            nin_shortcut: if cin != cout {
                Some(Conv::new(cin, cout, 1, 1, 0, vb.pp("nin_shortcut"))?)
            } else {
                None
            },
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&swish(&self.norm1.forward(x)?)?)?;
        let h = self.conv2.forward(&swish(&self.norm2.forward(&h)?)?)?;
        let res = match &self.nin_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        res + h
    }
}

#[derive(Debug, Clone)]
struct AttnBlock {
    norm: GroupNorm,
    q: Conv,
    k: Conv,
    v: Conv,
    proj_out: Conv,
}

impl AttnBlock {
    fn new(c: usize, vb: VarBuilder) -> Result<Self> {
        Ok(AttnBlock {
            norm: group_norm(c, vb.pp("norm"))?,
            q: Conv::new(c, c, 1, 1, 0, vb.pp("q"))?,
            k: Conv::new(c, c, 1, 1, 0, vb.pp("k"))?,
            v: Conv::new(c, c, 1, 1, 0, vb.pp("v"))?,
            proj_out: Conv::new(c, c, 1, 1, 0, vb.pp("proj_out"))?,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.norm.forward(x)?;
        let (b, c, hh, ww) = h.dims4()?;
        let n = hh * ww;
        let q = self.q.forward(&h)?.reshape((b, c, n))?.transpose(1, 2)?; // [b, n, c]
        let k = self.k.forward(&h)?.reshape((b, c, n))?; // [b, c, n]
        let v = self.v.forward(&h)?.reshape((b, c, n))?;
        let att = (q.contiguous()?.matmul(&k.contiguous()?)? * (c as f64).powf(-0.5))?;
        let att = candle_nn::ops::softmax_last_dim(&att)?; // over keys
                                                           // out[c, i] = sum_j v[c, j] att[i, j]
        let out = v
            .contiguous()?
            .matmul(&att.transpose(1, 2)?.contiguous()?)?;
        x + self.proj_out.forward(&out.reshape((b, c, hh, ww))?)?
    }
}

#[derive(Debug, Clone)]
struct Level {
    blocks: Vec<ResnetBlock>,
    attns: Vec<AttnBlock>,
    /// Down- or upsampling conv (absent on the last encoder / last decoder level).
    resample: Option<Conv>,
}

#[derive(Debug, Clone)]
struct Mid {
    block_1: ResnetBlock,
    attn_1: AttnBlock,
    block_2: ResnetBlock,
}

impl Mid {
    fn new(c: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Mid {
            block_1: ResnetBlock::new(c, c, vb.pp("block_1"))?,
            attn_1: AttnBlock::new(c, vb.pp("attn_1"))?,
            block_2: ResnetBlock::new(c, c, vb.pp("block_2"))?,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.block_2
            .forward(&self.attn_1.forward(&self.block_1.forward(x)?)?)
    }
}

/// HF `JanusVQVAE`: encoder, quantizer, decoder.
#[derive(Debug, Clone)]
pub struct VqModel {
    enc_conv_in: Conv,
    down: Vec<Level>,
    enc_mid: Mid,
    enc_norm_out: GroupNorm,
    enc_conv_out: Conv,
    quant_conv: Conv,
    codebook: Tensor,
    post_quant_conv: Conv,
    dec_conv_in: Conv,
    dec_mid: Mid,
    up: Vec<Level>,
    dec_norm_out: GroupNorm,
    dec_conv_out: Conv,
    cfg: VqConfig,
}

impl VqModel {
    /// `vb` at `model.vqmodel`.
    pub fn new(cfg: &VqConfig, vb: VarBuilder) -> Result<Self> {
        if cfg.double_latent {
            candle_core::bail!("vq double_latent = true is not implemented");
        }
        let base = cfg.base_channels;
        let mult = &cfg.channel_multiplier;
        let levels = mult.len();
        let e = vb.pp("encoder");
        let mut down = vec![];
        let mut block_in = base;
        for (i, m) in mult.iter().enumerate() {
            let lb = e.pp(format!("down.{i}"));
            let block_out = base * m;
            let mut blocks = vec![];
            let mut attns = vec![];
            for j in 0..cfg.num_res_blocks {
                blocks.push(ResnetBlock::new(
                    block_in,
                    block_out,
                    lb.pp(format!("block.{j}")),
                )?);
                block_in = block_out;
                if i == levels - 1 {
                    attns.push(AttnBlock::new(block_in, lb.pp(format!("attn.{j}")))?);
                }
            }
            let resample = if i != levels - 1 {
                Some(Conv::new(
                    block_in,
                    block_in,
                    3,
                    2,
                    0,
                    lb.pp("downsample.conv"),
                )?)
            } else {
                None
            };
            down.push(Level {
                blocks,
                attns,
                resample,
            });
        }
        let enc_mid = Mid::new(block_in, e.pp("mid"))?;
        let enc_norm_out = group_norm(block_in, e.pp("norm_out"))?;
        let enc_conv_out = Conv::new(block_in, cfg.latent_channels, 3, 1, 1, e.pp("conv_out"))?;

        let d = vb.pp("decoder");
        let mut block_in = base * mult[levels - 1];
        let dec_conv_in = Conv::new(cfg.latent_channels, block_in, 3, 1, 1, d.pp("conv_in"))?;
        let dec_mid = Mid::new(block_in, d.pp("mid"))?;
        let mut up = vec![];
        // HF builds `up` from the lowest resolution (reversed levels): up[0] is level L-1.
        for (idx, i) in (0..levels).rev().enumerate() {
            let lb = d.pp(format!("up.{idx}"));
            let block_out = base * mult[i];
            let mut blocks = vec![];
            let mut attns = vec![];
            for j in 0..=cfg.num_res_blocks {
                blocks.push(ResnetBlock::new(
                    block_in,
                    block_out,
                    lb.pp(format!("block.{j}")),
                )?);
                block_in = block_out;
                if i == levels - 1 {
                    attns.push(AttnBlock::new(block_in, lb.pp(format!("attn.{j}")))?);
                }
            }
            let resample = if i != 0 {
                Some(Conv::new(
                    block_in,
                    block_in,
                    3,
                    1,
                    1,
                    lb.pp("upsample.conv"),
                )?)
            } else {
                None
            };
            up.push(Level {
                blocks,
                attns,
                resample,
            });
        }
        Ok(VqModel {
            enc_conv_in: Conv::new(cfg.in_channels, base, 3, 1, 1, e.pp("conv_in"))?,
            down,
            enc_mid,
            enc_norm_out,
            enc_conv_out,
            quant_conv: Conv::new(
                cfg.latent_channels,
                cfg.embed_dim,
                1,
                1,
                0,
                vb.pp("quant_conv"),
            )?,
            codebook: vb.get(
                (cfg.num_embeddings, cfg.embed_dim),
                "quantize.embedding.weight",
            )?,
            post_quant_conv: Conv::new(
                cfg.embed_dim,
                cfg.latent_channels,
                1,
                1,
                0,
                vb.pp("post_quant_conv"),
            )?,
            dec_conv_in,
            dec_mid,
            up,
            dec_norm_out: group_norm(block_in, d.pp("norm_out"))?,
            dec_conv_out: Conv::new(block_in, cfg.out_channels, 3, 1, 1, d.pp("conv_out"))?,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &VqConfig {
        &self.cfg
    }

    /// Pixel side of the images this model encodes and decodes.
    pub fn image_size(&self) -> usize {
        self.cfg.image_size()
    }

    /// Codes per image (the latent grid).
    pub fn codes_per_image(&self) -> usize {
        self.cfg.num_patches * self.cfg.num_patches
    }

    /// Encoder + `quant_conv`: the continuous latent `[B, embed_dim, h, w]` of `pixels`
    /// `[B, C, S, S]` in [-1, 1].
    pub fn encode_latent(&self, pixels: &Tensor) -> Result<Tensor> {
        let mut h = self
            .enc_conv_in
            .forward(&pixels.to_dtype(self.codebook.dtype())?)?;
        for level in &self.down {
            for (j, b) in level.blocks.iter().enumerate() {
                h = b.forward(&h)?;
                if let Some(a) = level.attns.get(j) {
                    h = a.forward(&h)?;
                }
            }
            if let Some(c) = &level.resample {
                // torch has no asymmetric conv padding: pad right and bottom by one first.
                h = c.forward(&h.pad_with_zeros(D::Minus1, 0, 1)?.pad_with_zeros(2, 0, 1)?)?;
            }
        }
        h = self.enc_mid.forward(&h)?;
        h = self
            .enc_conv_out
            .forward(&swish(&self.enc_norm_out.forward(&h)?)?)?;
        self.quant_conv.forward(&h)
    }

    /// Codes (row-major over the latent grid, per image) and the quantized latent
    /// `[B, embed_dim, h, w]` (the nearest codebook rows), as `JanusVQVAE.encode`.
    pub fn encode(&self, pixels: &Tensor) -> Result<(Vec<Vec<u32>>, Tensor)> {
        let z = self.encode_latent(pixels)?.to_dtype(DType::F32)?;
        let (b, e, h, w) = z.dims4()?;
        let flat = z.permute((0, 2, 3, 1))?.reshape((b * h * w, e))?;
        let cb = self.codebook.to_dtype(DType::F32)?;
        // |z|^2 + |e|^2 - 2 z.e, the expression HF takes the argmin of.
        let dist = flat
            .sqr()?
            .sum_keepdim(1)?
            .broadcast_add(&cb.sqr()?.sum(1)?.unsqueeze(0)?)?
            .broadcast_sub(&(flat.matmul(&cb.t()?)? * 2.0)?)?;
        let rows = dist.to_vec2::<f32>()?;
        let idx: Vec<u32> = rows
            .iter()
            .map(|r| {
                let mut best = 0usize;
                for (i, x) in r.iter().enumerate() {
                    if *x < r[best] {
                        best = i;
                    }
                }
                best as u32
            })
            .collect();
        let quant = cb
            .index_select(&Tensor::new(idx.as_slice(), cb.device())?, 0)?
            .reshape((b, h, w, e))?
            .permute((0, 3, 1, 2))?
            .contiguous()?;
        let codes = idx.chunks(h * w).map(|c| c.to_vec()).collect();
        Ok((codes, quant))
    }

    /// Pixels `[B, C, S, S]` (about [-1, 1], f32) of `codes` (each the full latent grid):
    /// codebook rows, L2-normalised as HF's `get_codebook_entry` does, then `post_quant_conv`
    /// and the decoder.
    pub fn decode(&self, codes: &[Vec<u32>]) -> Result<Tensor> {
        let n = self.codes_per_image();
        let k = self.cfg.num_embeddings;
        for c in codes {
            if c.len() != n {
                candle_core::bail!("vq decode: {} codes, the latent grid takes {n}", c.len());
            }
            if let Some(bad) = c.iter().find(|&&x| x as usize >= k) {
                candle_core::bail!("vq decode: code {bad} is outside the codebook of {k}");
            }
        }
        let b = codes.len();
        let side = self.cfg.num_patches;
        let flat: Vec<u32> = codes.concat();
        let rows = self
            .codebook
            .index_select(&Tensor::new(flat.as_slice(), self.codebook.device())?, 0)?;
        // F.normalize(p=2, eps=1e-12): x / max(|x|, eps).
        let norm = rows.sqr()?.sum_keepdim(1)?.sqrt()?.maximum(1e-12)?;
        let rows = rows.broadcast_div(&norm)?;
        let z = rows
            .reshape((b, side, side, self.cfg.embed_dim))?
            .permute((0, 3, 1, 2))?
            .contiguous()?;
        let mut h = self
            .dec_conv_in
            .forward(&self.post_quant_conv.forward(&z)?)?;
        h = self.dec_mid.forward(&h)?;
        for level in &self.up {
            for (j, blk) in level.blocks.iter().enumerate() {
                h = blk.forward(&h)?;
                if let Some(a) = level.attns.get(j) {
                    h = a.forward(&h)?;
                }
            }
            if let Some(c) = &level.resample {
                let (_, _, hh, ww) = h.dims4()?;
                h = c.forward(&h.upsample_nearest2d(hh * 2, ww * 2)?)?;
            }
        }
        let h = self
            .dec_conv_out
            .forward(&swish(&self.dec_norm_out.forward(&h)?)?)?;
        h.to_dtype(DType::F32)
    }
}

/// `JanusImageProcessor.postprocess`: `((x + 1) * 127.5).clip(0, 255)` truncated to u8, per
/// image an RGB image from `[B, 3, S, S]`.
pub fn postprocess(pixels: &Tensor) -> Result<Vec<image::RgbImage>> {
    let (b, c, h, w) = pixels.dims4()?;
    if c != 3 {
        candle_core::bail!("postprocess: {c} channels, expected 3");
    }
    let v = pixels
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let mut out = Vec::with_capacity(b);
    for i in 0..b {
        let mut img = image::RgbImage::new(w as u32, h as u32);
        for y in 0..h {
            for x in 0..w {
                let mut px = [0u8; 3];
                for (ch, p) in px.iter_mut().enumerate() {
                    let val = v[((i * c + ch) * h + y) * w + x];
                    *p = ((val + 1.0) * 127.5).clamp(0.0, 255.0) as u8;
                }
                img.put_pixel(x as u32, y as u32, image::Rgb(px));
            }
        }
        out.push(img);
    }
    Ok(out)
}

impl Module for VqModel {
    /// Encode then decode (a reconstruction), as `JanusVQVAE.forward` without its loss.
    fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let (codes, _) = self.encode(pixels)?;
        self.decode(&codes)
    }
}
