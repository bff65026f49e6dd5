//! Scaled dot-product attention (Vaswani et al., "Attention Is All You Need", 2017) as one
//! op: `softmax(q k^T * scale + mask) v`, heads merged into `[B, Tq, H * hd]`. The backward
//! recomputes the probabilities instead of keeping them (as FlashAttention does, Dao et al.
//! 2022): at these sizes one more `q k^T` is cheaper than a stored `[B, H, Tq, Tk]` tensor.

use super::math::{dot, softmax_row};
use super::{cpu_f32, mm, slice, tensor, with_data, Mat};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

/// The unfused form: q, k, v [B, H, T, hd], mask additive [B, 1, Tq, Tk].
pub fn attention_unfused(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let (b, h, tq, hd) = q.dims4()?;
    let att = (q.matmul(&k.t()?)? * scale)?.broadcast_add(mask)?;
    let p = softmax(&att)?;
    p.matmul(v)?.transpose(1, 2)?.reshape((b, tq, h * hd))
}

/// Softmax over the last dimension through differentiable ops (candle's fused
/// `softmax_last_dim` has no backward).
fn softmax(x: &Tensor) -> Result<Tensor> {
    let e = x.broadcast_sub(&x.max_keepdim(D::Minus1)?)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Attention of `q` [B, H, Tq, hd] over `k`, `v` [B, H, Tk, hd] with the additive `mask`
/// [B, 1, Tq, Tk] (no gradient), into [B, Tq, H * hd].
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, h, tq, hd) = q.dims4()?;
    let tk = k.dim(2)?;
    if !cpu_f32(&[q, k, v, mask])
        || mask.track_op()
        || k.dims() != [b, h, tk, hd]
        || v.dims() != [b, h, tk, hd]
        || mask.dims() != [b, 1, tq, tk]
    {
        return attention_unfused(q, k, v, mask, scale);
    }
    let op = Attention {
        b,
        h,
        tq,
        tk,
        hd,
        scale: scale as f32,
        mask: mask.contiguous()?,
        grads: [q.track_op(), k.track_op(), v.track_op()],
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

struct Attention {
    b: usize,
    h: usize,
    tq: usize,
    tk: usize,
    hd: usize,
    scale: f32,
    mask: Tensor,
    grads: [bool; 3],
}

impl Attention {
    /// The probabilities of head (bi, hi): `p` [Tq x Tk].
    fn probs(&self, q: &[f32], k: &[f32], mask: &[f32], bi: usize, hi: usize, p: &mut [f32]) {
        let (tq, tk, hd) = (self.tq, self.tk, self.hd);
        let qh = &q[(bi * self.h + hi) * tq * hd..][..tq * hd];
        let kh = &k[(bi * self.h + hi) * tk * hd..][..tk * hd];
        let (qm, km) = (Mat::rows(qh, hd), Mat::rows(kh, hd).t());
        mm(tq, tk, hd, p, tk, false, qm, km, self.scale);
        let m = &mask[bi * tq * tk..][..tq * tk];
        for (row, mrow) in p.chunks_mut(tk).zip(m.chunks(tk)) {
            for (x, mv) in row.iter_mut().zip(mrow) {
                *x += mv;
            }
            softmax_row(row);
        }
    }

    fn mask_data<R>(&self, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
        with_data(&self.mask, f)
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (q, k, v) = (slice(sq, lq)?, slice(sk, lk)?, slice(sv, lv)?);
        let (h, tq, tk, hd) = (self.h, self.tq, self.tk, self.hd);
        let mut out = vec![0f32; self.b * tq * h * hd];
        self.mask_data(|mask| {
            // One batch row per task: its output rows [Tq, H * hd] are contiguous.
            out.par_chunks_mut(tq * h * hd)
                .enumerate()
                .for_each(|(bi, ob)| {
                    let mut p = vec![0f32; tq * tk];
                    for hi in 0..h {
                        self.probs(q, k, mask, bi, hi, &mut p);
                        let vh = &v[(bi * h + hi) * tk * hd..][..tk * hd];
                        let (pm, vm) = (Mat::rows(&p, tk), Mat::rows(vh, hd));
                        mm(tq, hd, tk, &mut ob[hi * hd..], h * hd, false, pm, vm, 1.0);
                    }
                });
            Ok(())
        })?;
        Ok((CpuStorage::F32(out), Shape::from((self.b, tq, h * hd))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (h, tq, tk, hd) = (self.h, self.tq, self.tk, self.hd);
        let (sq, skv) = (tq * hd, tk * hd);
        let mut dq = vec![0f32; self.b * h * sq];
        let mut dk = vec![0f32; self.b * h * skv];
        let mut dv = vec![0f32; self.b * h * skv];
        with_data(q, |q| {
            with_data(k, |k| {
                with_data(v, |v| {
                    with_data(g, |g| {
                        self.mask_data(|mask| {
                            dq.par_chunks_mut(h * sq)
                                .zip(dk.par_chunks_mut(h * skv))
                                .zip(dv.par_chunks_mut(h * skv))
                                .enumerate()
                                .for_each(|(bi, ((dqb, dkb), dvb))| {
                                    let mut p = vec![0f32; tq * tk];
                                    let mut dp = vec![0f32; tq * tk];
                                    let gb = Mat {
                                        p: &g[bi * tq * h * hd..][..tq * h * hd],
                                        rs: h * hd,
                                        cs: 1,
                                    };
                                    for hi in 0..h {
                                        let base = (bi * h + hi) * hd;
                                        let go = Mat {
                                            p: &gb.p[hi * hd..],
                                            ..gb
                                        };
                                        let qh = Mat::rows(&q[base * tq..][..sq], hd);
                                        let kh = Mat::rows(&k[base * tk..][..skv], hd);
                                        let vh = Mat::rows(&v[base * tk..][..skv], hd);
                                        self.probs(q, k, mask, bi, hi, &mut p);
                                        let pm = Mat::rows(&p, tk);
                                        // dV = P^T dO; dP = dO V^T.
                                        let dvh = &mut dvb[hi * skv..][..skv];
                                        mm(tk, hd, tq, dvh, hd, false, pm.t(), go, 1.0);
                                        mm(tq, tk, hd, &mut dp, tk, false, go, vh.t(), 1.0);
                                        // dS = P * (dP - rowsum(dP * P)).
                                        for (pr, dr) in p.chunks(tk).zip(dp.chunks_mut(tk)) {
                                            let delta = dot(pr, dr);
                                            for (d, pv) in dr.iter_mut().zip(pr) {
                                                *d = pv * (*d - delta);
                                            }
                                        }
                                        let ds = Mat::rows(&dp, tk);
                                        let dqh = &mut dqb[hi * sq..][..sq];
                                        mm(tq, hd, tk, dqh, hd, false, ds, kh, self.scale);
                                        let dkh = &mut dkb[hi * skv..][..skv];
                                        mm(tk, hd, tq, dkh, hd, false, ds.t(), qh, self.scale);
                                    }
                                });
                            Ok(())
                        })
                    })
                })
            })
        })?;
        let [gq, gk, gv] = self.grads;
        let keep = |on: bool, d: Vec<f32>, t: &Tensor| on.then(|| tensor(d, t.dims())).transpose();
        Ok((keep(gq, dq, q)?, keep(gk, dk, k)?, keep(gv, dv, v)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::testing::{same, var};
    use candle_core::Device;

    fn causal(b: usize, tq: usize, tk: usize) -> Result<Tensor> {
        let past = tk - tq;
        let mut m = vec![0f32; b * tq * tk];
        for bi in 0..b {
            for i in 0..tq {
                for j in 0..tk {
                    // Row 1 of batch 1 also masks key 0, as key padding does.
                    if j > past + i || (bi == 1 && j == 0) {
                        m[(bi * tq + i) * tk + j] = -1e9;
                    }
                }
            }
        }
        Tensor::from_vec(m, (b, 1, tq, tk), &Device::Cpu)
    }

    #[test]
    fn matches_the_unfused_ops_in_value_and_gradients() -> Result<()> {
        let (b, h, t, hd) = (2, 3, 7, 8);
        let q = var(&[b, h, t, hd], 1)?;
        let k = var(&[b, h, t, hd], 2)?;
        let v = var(&[b, h, t, hd], 3)?;
        let mask = causal(b, t, t)?;
        let s = 1.0 / (hd as f64).sqrt();
        let (q_, k_, v_) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
        let f = attention(q_, k_, v_, &mask, s)?;
        let p = attention_unfused(q_, k_, v_, &mask, s)?;
        same(&f, &p, &[&q, &k, &v], "attention")
    }

    #[test]
    fn new_queries_over_a_longer_cache() -> Result<()> {
        let (b, h, hd) = (2, 2, 4);
        let q = var(&[b, h, 2, hd], 4)?;
        let k = var(&[b, h, 5, hd], 5)?;
        let v = var(&[b, h, 5, hd], 6)?;
        let mask = causal(b, 2, 5)?;
        let (q_, k_, v_) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
        let f = attention(q_, k_, v_, &mask, 0.5)?;
        let p = attention_unfused(q_, k_, v_, &mask, 0.5)?;
        same(&f, &p, &[&q, &k, &v], "cached attention")
    }
}
