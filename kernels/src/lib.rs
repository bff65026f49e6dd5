//! Custom candle ops for training. candle's matmul backward always computes the gradient of
//! both operands, so a frozen base weight costs as much as full fine-tuning (DESIGN.md).
//! [`frozen_matmul`] computes the same product but its backward returns only the input's
//! gradient: one matmul of three per frozen linear is skipped.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

/// The version of the numerics in use, part of every stage-cache key (left out of the key
/// when 1): the fused ops sum in another order than the graphs they replace, so results
/// trained with one are not results of the other (1: candle's ops only; 2: `fused`, the
/// default). The nano base is always built with candle's ops ([`fused::unfused`]).
pub fn numerics() -> u32 {
    if fused::enabled() {
        2
    } else {
        1
    }
}

pub mod fused;
pub mod linalg;
pub mod pema;

/// `x @ w^T` (w: `[out, in]`, frozen) with a backward for `x` only.
///
/// The product is computed by candle's own matmul on a detached `x`, so the forward is
/// bit-identical to `x.broadcast_matmul(&w.t())`; a custom op then re-attaches the result to
/// `x` with a backward of `grad @ w`. The re-attach copies the output (`rows x out`), which is
/// small next to the skipped `in x out x rows` weight-gradient product.
pub fn frozen_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    // The plain op when there is nothing to skip (no gradient flows to `x`), when `w` is
    // trainable after all (its gradient must not be dropped), or on a device without the
    // re-attach kernel.
    if !x.track_op() || w.track_op() || !x.device().is_cpu() {
        return x.broadcast_matmul(&w.t()?);
    }
    let y = x.detach().broadcast_matmul(&w.t()?)?;
    x.apply_op2(&y, Reattach { w: w.clone() })
}

/// Forward: a copy of its second argument. Backward: `grad @ w` for the first, none for the
/// second (it is detached).
struct Reattach {
    w: Tensor,
}

impl CustomOp2 for Reattach {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        _s1: &CpuStorage,
        _l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn take<T: Copy>(v: &[T], l: &Layout) -> Result<Vec<T>> {
            match l.contiguous_offsets() {
                Some((a, b)) => Ok(v[a..b].to_vec()),
                None => candle_core::bail!("frozen-matmul: non-contiguous product"),
            }
        }
        let out = match s2 {
            CpuStorage::F32(v) => CpuStorage::F32(take(v, l2)?),
            CpuStorage::F64(v) => CpuStorage::F64(take(v, l2)?),
            CpuStorage::BF16(v) => CpuStorage::BF16(take(v, l2)?),
            CpuStorage::F16(v) => CpuStorage::F16(take(v, l2)?),
            _ => candle_core::bail!("frozen-matmul: unsupported dtype"),
        };
        Ok((out, l2.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _y: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.broadcast_matmul(&self.w)?), None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 1000) as f32 / 500.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn same_forward_and_input_gradient_no_weight_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::from_vec(data(6 * 5, 1), (6, 5), &dev)?;
        let x = Var::from_tensor(&Tensor::from_vec(data(2 * 3 * 5, 2), (2, 3, 5), &dev)?)?;
        let g = Tensor::from_vec(data(2 * 3 * 6, 3), (2, 3, 6), &dev)?;

        let plain = x.broadcast_matmul(&w.t()?)?;
        let fast = frozen_matmul(x.as_tensor(), &w)?;
        assert_eq!(plain.to_vec3::<f32>()?, fast.to_vec3::<f32>()?);

        let gp = (plain * &g)?.sum_all()?.backward()?;
        let gf = (fast * &g)?.sum_all()?.backward()?;
        let (a, b) = (gp.get(&x).unwrap(), gf.get(&x).unwrap());
        let diff = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "input gradients differ by {diff}");
        // The plain op also differentiates the frozen weight (candle stores that gradient
        // under the id of the transposed, broadcast operand); ours computes no such gradient.
        let weight_grads = |gs: &candle_core::backprop::GradStore| {
            gs.get_ids()
                .filter_map(|id| gs.get_id(*id))
                .filter(|g| g.dims().ends_with(&[5, 6]))
                .count()
        };
        assert_eq!(weight_grads(&gp), 1);
        assert_eq!(weight_grads(&gf), 0);
        Ok(())
    }

    #[test]
    fn a_trainable_weight_still_gets_its_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let w = Var::from_tensor(&Tensor::from_vec(data(4 * 3, 7), (4, 3), &dev)?)?;
        let x = Var::from_tensor(&Tensor::from_vec(data(2 * 3, 8), (2, 3), &dev)?)?;
        let g = frozen_matmul(x.as_tensor(), w.as_tensor())?
            .sum_all()?
            .backward()?;
        assert!(g.get(&w).is_some() && g.get(&x).is_some());
        Ok(())
    }

    #[test]
    fn untracked_input_is_the_plain_product() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::from_vec(data(4 * 3, 5), (4, 3), &dev)?;
        let x = Tensor::from_vec(data(2 * 3, 6), (2, 3), &dev)?;
        assert_eq!(
            frozen_matmul(&x, &w)?.to_vec2::<f32>()?,
            x.matmul(&w.t()?)?.to_vec2::<f32>()?
        );
        Ok(())
    }
}
