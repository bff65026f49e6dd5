//! Rotary position embedding (Su et al., "RoFormer: Enhanced Transformer with Rotary Position
//! Embedding", 2021), rotate-half form as in LLaMA, fused with the split into heads: a
//! projection `[B, T, H * hd]` becomes `[B, H, T, hd]`, rotated, in one pass (candle's own
//! `rope` has no backward, DESIGN.md). Without a rotation it is the plain split.

use super::{cpu_f32, slice, tensor, with_data};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, D};

/// The unfused form: reshape + transpose, then rotate-half with `cos`, `sin` [B, 1, T, hd/2].
pub fn heads_unfused(y: &Tensor, heads: usize, rot: Option<(&Tensor, &Tensor)>) -> Result<Tensor> {
    let (b, t, d) = y.dims3()?;
    let x = y
        .reshape((b, t, heads, d / heads))?
        .transpose(1, 2)?
        .contiguous()?;
    let Some((cos, sin)) = rot else {
        return Ok(x);
    };
    let half = d / heads / 2;
    let (cos, sin) = (cos.reshape((b, 1, t, half))?, sin.reshape((b, 1, t, half))?);
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let a = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
    let c = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
    Tensor::cat(&[a, c], D::Minus1)
}

/// `y` [B, T, H * hd] -> [B, H, T, hd], rotated by `rot` = (`cos`, `sin`), each holding
/// B * T rows of hd / 2 (any shape of that size, e.g. [B, 1, T, hd/2]).
pub fn heads(y: &Tensor, heads: usize, rot: Option<(&Tensor, &Tensor)>) -> Result<Tensor> {
    let rot_ok = rot.is_none_or(|(c, s)| cpu_f32(&[c, s]) && !c.track_op() && !s.track_op());
    let (b, t, d) = y.dims3()?;
    if !cpu_f32(&[y])
        || !rot_ok
        || !d.is_multiple_of(heads)
        || (rot.is_some() && !(d / heads).is_multiple_of(2))
    {
        return heads_unfused(y, heads, rot);
    }
    let table = rot
        .map(|(c, s)| -> Result<(Vec<f32>, Vec<f32>)> {
            let v = |x: &Tensor| x.flatten_all()?.to_vec1::<f32>();
            Ok((v(c)?, v(s)?))
        })
        .transpose()?;
    if let Some((c, _)) = &table {
        if c.len() != b * t * (d / heads / 2) {
            candle_core::bail!("fused rope: table of {} for {b} x {t} rows", c.len());
        }
    }
    y.contiguous()?.apply_op1(Heads {
        b,
        t,
        heads,
        hd: d / heads,
        table,
    })
}

struct Heads {
    b: usize,
    t: usize,
    heads: usize,
    hd: usize,
    table: Option<(Vec<f32>, Vec<f32>)>,
}

impl Heads {
    /// Moves every (b, t, h) row between the two layouts, rotating by `sign` (+1 forward, -1
    /// for the inverse rotation of the backward pass).
    fn run(&self, src: &[f32], to_heads: bool, sign: f32) -> Vec<f32> {
        let (b, t, h, hd) = (self.b, self.t, self.heads, self.hd);
        let half = hd / 2;
        let mut out = vec![0f32; src.len()];
        for bi in 0..b {
            for ti in 0..t {
                for hi in 0..h {
                    let flat = ((bi * t + ti) * h + hi) * hd; // [B, T, H, hd]
                    let split = ((bi * h + hi) * t + ti) * hd; // [B, H, T, hd]
                    let (from, to) = if to_heads {
                        (flat, split)
                    } else {
                        (split, flat)
                    };
                    let s = &src[from..from + hd];
                    let o = &mut out[to..to + hd];
                    match &self.table {
                        None => o.copy_from_slice(s),
                        Some((cos, sin)) => {
                            let r = (bi * t + ti) * half;
                            for i in 0..half {
                                let (c, sn) = (cos[r + i], sign * sin[r + i]);
                                let (x1, x2) = (s[i], s[i + half]);
                                o[i] = x1 * c - x2 * sn;
                                o[i + half] = x2 * c + x1 * sn;
                            }
                        }
                    }
                }
            }
        }
        out
    }
}

impl CustomOp1 for Heads {
    fn name(&self) -> &'static str {
        "fused-rope-heads"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = slice(s, l)?;
        let out = self.run(y, true, 1.0);
        Ok((
            CpuStorage::F32(out),
            Shape::from((self.b, self.heads, self.t, self.hd)),
        ))
    }

    fn bwd(&self, y: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let dy = with_data(g, |g| Ok(self.run(g, false, -1.0)))?;
        Ok(Some(tensor(dy, y.dims())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::testing::{same, values, var};
    use candle_core::Device;

    #[test]
    fn rotated_split_matches_the_unfused_ops() -> Result<()> {
        let (b, t, h, hd) = (2, 5, 3, 8);
        let y = var(&[b, t, h * hd], 1)?;
        let angles = values(b * t * hd / 2, 2);
        let cos: Vec<f32> = angles.iter().map(|a| (a * 3.0).cos()).collect();
        let sin: Vec<f32> = angles.iter().map(|a| (a * 3.0).sin()).collect();
        let cos = Tensor::from_vec(cos, (b, 1, t, hd / 2), &Device::Cpu)?;
        let sin = Tensor::from_vec(sin, (b, 1, t, hd / 2), &Device::Cpu)?;
        let f = heads(y.as_tensor(), h, Some((&cos, &sin)))?;
        let p = heads_unfused(y.as_tensor(), h, Some((&cos, &sin)))?;
        same(&f, &p, &[&y], "rope")
    }

    #[test]
    fn plain_split_matches_the_unfused_ops() -> Result<()> {
        let y = var(&[2, 4, 12], 3)?;
        let f = heads(y.as_tensor(), 3, None)?;
        let p = heads_unfused(y.as_tensor(), 3, None)?;
        same(&f, &p, &[&y], "split")
    }
}
