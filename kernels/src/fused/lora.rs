//! A frozen linear with its LoRA path (Hu et al., "LoRA: Low-Rank Adaptation of Large
//! Language Models", 2021) as one op: `y = x W^T + s * (drop(x) A^T) B^T`. The backward
//! gives x, A and B their gradients and never W's (frozen: DESIGN.md), regenerates the
//! dropout mask from its counter-based hash instead of storing it, and recomputes the rank-r
//! activation `drop(x) A^T` (n x r: cheap).

use super::{cpu_f32, mm, slice, tensor, with_data, Mat};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use cnext_core::rng::{fnv1a, mix64, FNV_OFFSET, GAMMA};

/// Inverted dropout with a mask from a counter-based hash of (`seed`, `name`, element index):
/// identical on any thread count and regenerated, not stored, by the backward pass.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dropout {
    key: u64,
    threshold: u64,
    scale: f32,
}

impl Dropout {
    /// `None` when `p` is 0 (nothing to drop).
    pub fn new(p: f32, seed: u64, name: &str) -> Option<Self> {
        (p > 0.0).then(|| Dropout {
            key: fnv1a(FNV_OFFSET ^ seed, name.as_bytes()),
            threshold: (f64::from(p) * (1u64 << 32) as f64) as u64,
            scale: 1.0 / (1.0 - p),
        })
    }

    /// The multiplier of element `i`: 0 (dropped) or 1 / (1 - p).
    pub fn factor(&self, i: usize) -> f32 {
        let h = mix64(self.key.wrapping_add((i as u64).wrapping_mul(GAMMA)));
        if (h >> 32) < self.threshold {
            0.0
        } else {
            self.scale
        }
    }

    /// `x` with the mask applied (unfused: a mask tensor and a product).
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let keep: Vec<f32> = (0..x.elem_count()).map(|i| self.factor(i)).collect();
        x.mul(&Tensor::from_vec(keep, x.shape(), x.device())?)
    }

    /// The multipliers of elements `0..n`.
    fn factors(&self, n: usize) -> Vec<f32> {
        (0..n).map(|i| self.factor(i)).collect()
    }
}

/// The unfused form: `x W^T + s * (drop(x) A^T) B^T` with W frozen by `frozen_matmul`.
pub fn lora_linear_unfused(
    x: &Tensor,
    w: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    dropout: Option<Dropout>,
) -> Result<Tensor> {
    let y = crate::frozen_matmul(x, w)?;
    let xin = match dropout {
        Some(d) => d.apply(x)?,
        None => x.clone(),
    };
    let delta = (xin.broadcast_matmul(&a.t()?)?.broadcast_matmul(&b.t()?)? * scale)?;
    y + delta
}

/// The fused op, or `None` where it does not apply (another device or dtype than CPU f32, a
/// trainable `w`, or shapes that do not chain): the caller then runs its unfused form.
/// `x` [..., in], `w` [out, in] (frozen), `a` [r, in], `b` [out, r].
pub fn lora_linear(
    x: &Tensor,
    w: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    dropout: Option<Dropout>,
) -> Result<Option<Tensor>> {
    let (Ok((out, din)), Ok((r, ain)), Ok((bout, br))) = (w.dims2(), a.dims2(), b.dims2()) else {
        return Ok(None);
    };
    let last = x.dims().last().copied();
    if !cpu_f32(&[x, w, a, b]) || w.track_op() || ain != din || bout != out || br != r {
        return Ok(None);
    }
    if last != Some(din) {
        return Ok(None);
    }
    let mut dims = x.dims().to_vec();
    let n = x.elem_count() / din.max(1);
    let op = LoraLinear {
        w: w.contiguous()?,
        n,
        din,
        out,
        r,
        scale: scale as f32,
        dropout,
        factors: std::sync::OnceLock::new(),
        grads: [x.track_op(), a.track_op(), b.track_op()],
    };
    let y = x
        .contiguous()?
        .reshape((n, din))?
        .apply_op3(&a.contiguous()?, &b.contiguous()?, op)?;
    if let Some(l) = dims.last_mut() {
        *l = out;
    }
    Ok(Some(y.reshape(dims)?))
}

struct LoraLinear {
    w: Tensor,
    n: usize,
    din: usize,
    out: usize,
    r: usize,
    scale: f32,
    dropout: Option<Dropout>,
    /// The dropout multipliers, hashed once by the forward and reused by the backward.
    factors: std::sync::OnceLock<Vec<f32>>,
    grads: [bool; 3],
}

impl LoraLinear {
    fn factors(&self) -> Option<&[f32]> {
        let d = self.dropout?;
        Some(self.factors.get_or_init(|| d.factors(self.n * self.din)))
    }

    /// `drop(x) A^T` [n x r] and `drop(x)` when dropout applies.
    fn low_rank(&self, x: &[f32], a: &[f32]) -> (Vec<f32>, Option<Vec<f32>>) {
        let xin = self
            .factors()
            .map(|f| x.iter().zip(f).map(|(v, k)| v * k).collect::<Vec<f32>>());
        let src = xin.as_deref().unwrap_or(x);
        let mut h = vec![0f32; self.n * self.r];
        let (din, r) = (self.din, self.r);
        mm(
            self.n,
            r,
            din,
            &mut h,
            r,
            false,
            Mat::rows(src, din),
            Mat::rows(a, din).t(),
            1.0,
        );
        (h, xin)
    }
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "fused-lora-linear"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sa: &CpuStorage,
        la: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, a, b) = (slice(sx, lx)?, slice(sa, la)?, slice(sb, lb)?);
        let (n, din, out, r) = (self.n, self.din, self.out, self.r);
        let mut y = vec![0f32; n * out];
        with_data(&self.w, |w| {
            mm(
                n,
                out,
                din,
                &mut y,
                out,
                false,
                Mat::rows(x, din),
                Mat::rows(w, din).t(),
                1.0,
            );
            Ok(())
        })?;
        let (h, _) = self.low_rank(x, a);
        mm(
            n,
            out,
            r,
            &mut y,
            out,
            true,
            Mat::rows(&h, r),
            Mat::rows(b, r).t(),
            self.scale,
        );
        Ok((CpuStorage::F32(y), Shape::from((n, out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, din, out, r, s) = (self.n, self.din, self.out, self.r, self.scale);
        let [gx, ga, gb] = self.grads;
        let (dx, da, db) = with_data(x, |x| {
            with_data(a, |a| {
                with_data(b, |b| {
                    with_data(g, |g| {
                        let gm = Mat::rows(g, out);
                        let (h, xin) = self.low_rank(x, a);
                        let xin = xin.as_deref().unwrap_or(x);
                        // dB = s g^T h; dh = s g B; dA = dh^T drop(x).
                        let mut db = vec![0f32; out * r];
                        if gb {
                            mm(out, r, n, &mut db, r, false, gm.t(), Mat::rows(&h, r), s);
                        }
                        let mut dh = vec![0f32; n * r];
                        mm(n, r, out, &mut dh, r, false, gm, Mat::rows(b, r), s);
                        let mut da = vec![0f32; r * din];
                        if ga {
                            let (dhm, xm) = (Mat::rows(&dh, r), Mat::rows(xin, din));
                            mm(r, din, n, &mut da, din, false, dhm.t(), xm, 1.0);
                        }
                        // dx = g W + drop'(dh A).
                        let dx = if gx {
                            let mut dx = vec![0f32; n * din];
                            with_data(&self.w, |w| {
                                mm(n, din, out, &mut dx, din, false, gm, Mat::rows(w, din), 1.0);
                                Ok(())
                            })?;
                            let (dhm, am) = (Mat::rows(&dh, r), Mat::rows(a, din));
                            match self.factors() {
                                None => mm(n, din, r, &mut dx, din, true, dhm, am, 1.0),
                                Some(f) => {
                                    let mut t = vec![0f32; n * din];
                                    mm(n, din, r, &mut t, din, false, dhm, am, 1.0);
                                    for ((o, tv), k) in dx.iter_mut().zip(&t).zip(f) {
                                        *o += tv * k;
                                    }
                                }
                            }
                            Some(dx)
                        } else {
                            None
                        };
                        Ok((dx, da, db))
                    })
                })
            })
        })?;
        Ok((
            dx.map(|v| tensor(v, &[n, din])).transpose()?,
            ga.then(|| tensor(da, &[r, din])).transpose()?,
            gb.then(|| tensor(db, &[out, r])).transpose()?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::testing::{same, var};

    fn check(dropout: Option<Dropout>, what: &str) -> Result<()> {
        let x = var(&[2, 5, 12], 1)?;
        let w = var(&[9, 12], 2)?.as_tensor().detach();
        let a = var(&[4, 12], 3)?;
        let b = var(&[9, 4], 4)?;
        let (x_, a_, b_) = (x.as_tensor(), a.as_tensor(), b.as_tensor());
        let f = lora_linear(x_, &w, a_, b_, 2.0, dropout)?.expect("fused path applies");
        let p = lora_linear_unfused(x_, &w, a_, b_, 2.0, dropout)?;
        same(&f, &p, &[&x, &a, &b], what)
    }

    #[test]
    fn matches_the_unfused_ops_in_value_and_gradients() -> Result<()> {
        check(None, "lora")
    }

    #[test]
    fn with_dropout_too() -> Result<()> {
        let d = Dropout::new(0.3, 7, "layer.q_proj");
        assert!(d.is_some());
        check(d, "lora with dropout")
    }

    #[test]
    fn a_trainable_base_weight_is_left_to_the_caller() -> Result<()> {
        let x = var(&[3, 4], 1)?;
        let w = var(&[2, 4], 2)?;
        let (a, b) = (var(&[1, 4], 3)?, var(&[2, 1], 4)?);
        let y = lora_linear(
            x.as_tensor(),
            w.as_tensor(),
            a.as_tensor(),
            b.as_tensor(),
            1.0,
            None,
        )?;
        assert!(y.is_none());
        Ok(())
    }
}
