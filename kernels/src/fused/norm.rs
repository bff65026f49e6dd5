//! RMSNorm (Zhang & Sennrich, "Root Mean Square Layer Normalization", 2019) as one op:
//! `y = x / sqrt(mean(x^2) + eps) * w` over the last dimension. candle's own fused
//! `rms_norm` has no backward (DESIGN.md); this one does.

use super::{cpu_f32, par_rows, slice, tensor, with_data};
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, D};

/// The unfused form (the fallback and the tests' reference), as `candle_nn::ops::rms_norm_slow`.
pub fn rms_norm_unfused(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let ms = (x.sqr()?.sum_keepdim(D::Minus1)? / d as f64)?;
    x.broadcast_div(&(ms + f64::from(eps))?.sqrt()?)?
        .broadcast_mul(w)
}

/// RMSNorm of `x` [..., d] with weight `w` [d].
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    if !cpu_f32(&[x, w]) || w.rank() != 1 {
        return rms_norm_unfused(x, w, eps);
    }
    let x = x.contiguous()?;
    x.apply_op2(
        w,
        RmsNorm {
            eps,
            grad_w: w.track_op(),
        },
    )
}

struct RmsNorm {
    eps: f32,
    grad_w: bool,
}

fn inv_rms(row: &[f32], eps: f32) -> f32 {
    1.0 / (super::math::dot(row, row) / row.len() as f32 + eps).sqrt()
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (slice(sx, lx)?, slice(sw, lw)?);
        let d = w.len();
        if lx.dims().last() != Some(&d) {
            candle_core::bail!("fused-rms-norm: weight of {d} for input {:?}", lx.dims());
        }
        let mut y = vec![0f32; x.len()];
        par_rows(&mut y, d, |r, out| {
            let xr = &x[r * d..(r + 1) * d];
            let inv = inv_rms(xr, self.eps);
            for ((o, xv), wv) in out.iter_mut().zip(xr).zip(w) {
                *o = xv * inv * wv;
            }
        });
        Ok((CpuStorage::F32(y), lx.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let d = w.dim(0)?;
        let (dx, dw) = with_data(x, |x| {
            with_data(w, |w| {
                with_data(g, |g| {
                    // Each row's 1 / rms once, for dx and dw.
                    let invs: Vec<f32> = x.chunks(d).map(|r| inv_rms(r, self.eps)).collect();
                    let mut dx = vec![0f32; x.len()];
                    par_rows(&mut dx, d, |r, out| {
                        let (xr, gr) = (&x[r * d..(r + 1) * d], &g[r * d..(r + 1) * d]);
                        let inv = invs[r];
                        // dx = inv * (w g - xh * mean(w g xh)), xh = x * inv.
                        for ((o, gv), wv) in out.iter_mut().zip(gr).zip(w) {
                            *o = wv * gv;
                        }
                        let c = super::math::dot(out, xr) * inv / d as f32;
                        for (o, xv) in out.iter_mut().zip(xr) {
                            *o = inv * (*o - xv * inv * c);
                        }
                    });
                    let dw = self.grad_w.then(|| {
                        let mut dw = vec![0f32; d];
                        for ((xr, gr), &inv) in x.chunks(d).zip(g.chunks(d)).zip(&invs) {
                            for ((o, xv), gv) in dw.iter_mut().zip(xr).zip(gr) {
                                *o += gv * xv * inv;
                            }
                        }
                        dw
                    });
                    Ok((dx, dw))
                })
            })
        })?;
        let dw = dw.map(|v| tensor(v, &[d])).transpose()?;
        Ok((Some(tensor(dx, x.dims())?), dw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::testing::{same, var};

    #[test]
    fn matches_the_unfused_ops_in_value_and_gradients() -> Result<()> {
        let x = var(&[3, 5, 16], 1)?;
        let w = var(&[16], 2)?;
        let f = rms_norm(x.as_tensor(), w.as_tensor(), 1e-5)?;
        let p = rms_norm_unfused(x.as_tensor(), w.as_tensor(), 1e-5)?;
        same(&f, &p, &[&x, &w], "rms_norm")
    }

    #[test]
    fn a_frozen_weight_gets_no_gradient() -> Result<()> {
        let x = var(&[4, 8], 3)?;
        let w = var(&[8], 4)?.as_tensor().detach();
        let g = rms_norm(x.as_tensor(), &w, 1e-5)?.sum_all()?.backward()?;
        assert!(g.get(&x).is_some() && g.get(&w).is_none());
        Ok(())
    }
}
