//! Mean cross-entropy of logits against class ids as one op (log-softmax and the gather
//! fused; the backward is `(softmax - onehot) / N`).

use super::math::exp;
use super::{cpu_f32, slice, tensor, with_data};
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, D};

/// The unfused form, as `candle_nn::loss::cross_entropy`.
pub fn cross_entropy_unfused(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let mx = logits.max_keepdim(D::Minus1)?;
    let shifted = logits.broadcast_sub(&mx)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let logp = shifted.broadcast_sub(&lse)?;
    let n = targets.dim(0)?;
    logp.gather(&targets.unsqueeze(1)?, 1)?.sum_all()? * (-1.0 / n as f64)
}

/// Mean over rows of `-log softmax(logits)[target]`: `logits` [N, V], `targets` [N] (u32).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if !cpu_f32(&[logits]) || targets.dtype() != DType::U32 || logits.rank() != 2 {
        return cross_entropy_unfused(logits, targets);
    }
    if targets.dims() != [logits.dim(0)?] {
        candle_core::bail!(
            "cross-entropy: {:?} targets for {:?} logits",
            targets.dims(),
            logits.dims()
        );
    }
    logits
        .contiguous()?
        .apply_op2(&targets.contiguous()?, CrossEntropy)
}

struct CrossEntropy;

fn ids(s: &CpuStorage, l: &Layout) -> Result<Vec<u32>> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::U32(v), Some((a, b))) => Ok(v[a..b].to_vec()),
        _ => candle_core::bail!("cross-entropy: targets must be contiguous u32"),
    }
}

/// Each row's log-sum-exp and its target, checked against the vocabulary.
fn rows<'a>(
    logits: &'a [f32],
    targets: &'a [u32],
    v: usize,
) -> Result<impl Iterator<Item = (&'a [f32], usize, f32)> + 'a> {
    if let Some(t) = targets.iter().find(|&&t| t as usize >= v) {
        candle_core::bail!("cross-entropy: target {t} outside a vocabulary of {v}");
    }
    Ok(logits.chunks(v).zip(targets).map(|(row, &t)| {
        let mx = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let lse = mx + row.iter().map(|x| exp(x - mx)).sum::<f32>().ln();
        (row, t as usize, lse)
    }))
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "fused-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        sl: &CpuStorage,
        ll: &Layout,
        st: &CpuStorage,
        lt: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (logits, targets) = (slice(sl, ll)?, ids(st, lt)?);
        let v = ll.dims()[1];
        let n = targets.len().max(1);
        let total: f32 = rows(logits, &targets, v)?
            .map(|(row, t, lse)| lse - row[t])
            .sum();
        Ok((CpuStorage::F32(vec![total / n as f32]), Shape::from(())))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let v = logits.dim(1)?;
        let targets = targets.to_vec1::<u32>()?;
        let scale = g / targets.len().max(1) as f32;
        let d = with_data(logits, |l| {
            let mut d = Vec::with_capacity(l.len());
            for (row, t, lse) in rows(l, &targets, v)? {
                d.extend(row.iter().map(|x| exp(x - lse) * scale));
                let at = d.len() - v + t;
                d[at] -= scale;
            }
            Ok(d)
        })?;
        Ok((Some(tensor(d, logits.dims())?), None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::testing::{close, var};
    use candle_core::Device;

    #[test]
    fn matches_the_unfused_ops_in_value_and_gradient() -> Result<()> {
        let l = var(&[6, 11], 1)?;
        let l3 = (l.as_tensor() * 3.0)?;
        let t = Tensor::new(&[0u32, 10, 3, 3, 7, 1], &Device::Cpu)?;
        let f = cross_entropy(&l3, &t)?;
        let p = cross_entropy_unfused(&l3, &t)?;
        close(&f, &p, "cross-entropy")?;
        let (gf, gp) = (f.backward()?, p.backward()?);
        close(
            gf.get(&l).unwrap(),
            gp.get(&l).unwrap(),
            "cross-entropy gradient",
        )
    }

    #[test]
    fn a_target_outside_the_vocabulary_is_an_error() -> Result<()> {
        let l = var(&[2, 4], 2)?;
        let t = Tensor::new(&[1u32, 4], &Device::Cpu)?;
        let e = cross_entropy(l.as_tensor(), &t).unwrap_err().to_string();
        assert!(e.contains("target 4 outside a vocabulary of 4"), "{e}");
        Ok(())
    }
}
