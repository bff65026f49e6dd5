//! SwiGLU (Shazeer, "GLU Variants Improve Transformer", 2020): `silu(gate) * up`, the MLP
//! activation of LLaMA-style decoders, as one op.

use super::{cpu_f32, slice, tensor, with_data};
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// The unfused form.
pub fn swiglu_unfused(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.silu()? * up
}

/// `silu(gate) * up` for two tensors of one shape.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if !cpu_f32(&[gate, up]) || gate.dims() != up.dims() {
        return swiglu_unfused(gate, up);
    }
    gate.contiguous()?.apply_op2(
        &up.contiguous()?,
        SwiGlu {
            grads: [gate.track_op(), up.track_op()],
        },
    )
}

struct SwiGlu {
    grads: [bool; 2],
}

use super::math::sigmoid;

/// Splits long elementwise loops over the pool (chunks of 16k elements).
const CHUNK: usize = 1 << 14;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(
        &self,
        sg: &CpuStorage,
        lg: &Layout,
        su: &CpuStorage,
        lu: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (g, u) = (slice(sg, lg)?, slice(su, lu)?);
        let mut out = vec![0f32; g.len()];
        out.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
            .for_each(|(o, (g, u))| {
                for ((o, g), u) in o.iter_mut().zip(g).zip(u) {
                    *o = g * sigmoid(*g) * u;
                }
            });
        Ok((CpuStorage::F32(out), lg.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let n = gate.elem_count();
        let (mut dg, mut du) = (vec![0f32; n], vec![0f32; n]);
        with_data(gate, |g| {
            with_data(up, |u| {
                with_data(grad, |d| {
                    dg.par_chunks_mut(CHUNK)
                        .zip(du.par_chunks_mut(CHUNK))
                        .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
                        .zip(d.par_chunks(CHUNK))
                        .for_each(|(((dg, du), (g, u)), d)| {
                            for i in 0..g.len() {
                                let s = sigmoid(g[i]);
                                // silu'(x) = s (1 + x (1 - s)).
                                dg[i] = d[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
                                du[i] = d[i] * g[i] * s;
                            }
                        });
                    Ok(())
                })
            })
        })?;
        let [a, b] = self.grads;
        Ok((
            a.then(|| tensor(dg, gate.dims())).transpose()?,
            b.then(|| tensor(du, up.dims())).transpose()?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::testing::{same, var};

    #[test]
    fn matches_the_unfused_ops_in_value_and_gradients() -> Result<()> {
        // Larger than one chunk, so the split path runs too.
        let g = var(&[3, 7000], 1)?;
        let u = var(&[3, 7000], 2)?;
        let f = swiglu(g.as_tensor(), u.as_tensor())?;
        let p = swiglu_unfused(g.as_tensor(), u.as_tensor())?;
        same(&f, &p, &[&g, &u], "swiglu")
    }
}
