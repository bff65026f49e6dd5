//! Fused training ops with hand-written backward passes (CPU, f32).
//!
//! At the mini sizes (d = 128, 16 x 40 tokens) a LLaMA block written with candle's small ops
//! spends its time on graph nodes, fresh buffers and thread hand-offs, not arithmetic: one
//! RMSNorm is six ops forward and more backward, attention a dozen. Each op here is one node
//! whose forward and backward are plain loops and direct `gemm` calls on strided operands.
//! Every op falls back to its unfused candle form where it does not apply (another device or
//! dtype, or an operand that the fused backward would not differentiate), and its tests check
//! values and gradients against that form.

pub mod attention;
pub mod lora;
pub mod math;
pub mod norm;
pub mod rope;
pub mod swiglu;
pub mod xent;

use candle_core::{CpuStorage, DType, Layout, Result, Storage, Tensor};
use gemm::Parallelism;

/// Whether the fused ops are on: by default, off with `CNEXT_FUSED_KERNELS=0` (read once), and
/// off on a thread inside [`unfused`]. Off, every op runs its unfused form, bit-identical to
/// the graphs the first snapshots were made with. Unit tests always exercise the fused path.
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let on = cfg!(test)
        || *ON.get_or_init(|| std::env::var("CNEXT_FUSED_KERNELS").map_or(true, |v| v != "0"));
    on && !OFF_HERE.with(std::cell::Cell::get)
}

thread_local! {
    static OFF_HERE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with the fused ops off on this thread (the ops are built on the calling thread,
/// so this covers a whole forward and backward). The nano base is pretrained this way: it is
/// one artefact, the same whichever kernels later train on it.
pub fn unfused<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            OFF_HERE.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(OFF_HERE.with(|c| c.replace(true)));
    f()
}

/// Whether the fused CPU path can take these tensors.
pub(crate) fn cpu_f32(ts: &[&Tensor]) -> bool {
    enabled()
        && ts
            .iter()
            .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

/// The contiguous f32 data of a CPU storage under `l`.
pub(crate) fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        (CpuStorage::F32(_), None) => candle_core::bail!("fused op: non-contiguous operand"),
        _ => candle_core::bail!("fused op: expected f32"),
    }
}

/// Runs `f` on the contiguous f32 data of `t` (copied only if `t` is strided).
pub(crate) fn with_data<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cpu(c) => f(slice(c, l)?),
        _ => candle_core::bail!("fused op: expected a CPU tensor"),
    }
}

/// A CPU f32 tensor of `shape` from `v` (no gradient tracking: backward results).
pub(crate) fn tensor(v: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
    Tensor::from_vec(v, shape, &candle_core::Device::Cpu)
}

/// A strided matrix operand: element (i, j) is `p[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    pub p: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> Mat<'a> {
    /// A row-major `rows x cols` matrix.
    pub fn rows(p: &'a [f32], cols: usize) -> Self {
        Mat { p, rs: cols, cs: 1 }
    }
    /// The transpose (a view).
    pub fn t(self) -> Self {
        Mat {
            p: self.p,
            rs: self.cs,
            cs: self.rs,
        }
    }
    fn check(&self, rows: usize, cols: usize) {
        if rows > 0 && cols > 0 {
            let last = (rows - 1) * self.rs + (cols - 1) * self.cs;
            assert!(last < self.p.len(), "fused op: operand out of bounds");
        }
    }
}

/// The thread count, read once: candle's `get_num_threads` re-reads `/proc/cpuinfo` on every
/// call unless `RAYON_NUM_THREADS` is set (measured: a tenth of a mini step in kernel time).
pub fn threads() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(candle_core::utils::get_num_threads)
}

/// Below this many multiply-adds a product runs on one thread: handing a small matrix to the
/// pool costs more than it saves (measured on 2 cores, `cnext bench step`).
const PAR_MIN_MACS: usize = 1 << 21;

/// `dst (m x n, row stride dst_rs) = [dst +] alpha * a (m x k) . b (k x n)`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn mm(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    a: Mat,
    b: Mat,
    alpha: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                dst[i * dst_rs..i * dst_rs + n].fill(0.0);
            }
        }
        return;
    }
    a.check(m, k);
    b.check(k, n);
    assert!(
        (m - 1) * dst_rs + n <= dst.len(),
        "fused op: output out of bounds"
    );
    let threads = threads();
    let par = if threads > 1 && m * n * k >= PAR_MIN_MACS {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    // SAFETY: every index gemm reads or writes was bounds-checked above (the largest offset
    // of each operand lies inside its slice), and `dst` does not alias `a` or `b` (it is
    // borrowed mutably while they are borrowed shared).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            a.p.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.p.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            alpha,
            false,
            false,
            false,
            par,
        )
    }
}

/// Elementwise loops split across the pool only when they are long enough to pay for it.
pub(crate) fn par_rows<F>(out: &mut [f32], row: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Sync + Send,
{
    use rayon::prelude::*;
    if row == 0 {
        return;
    }
    let threads = threads();
    if threads > 1 && out.len() >= 1 << 16 {
        let per = (out.len() / row).div_ceil(threads * 4).max(1);
        out.par_chunks_mut(per * row)
            .enumerate()
            .for_each(|(c, chunk)| {
                for (i, r) in chunk.chunks_mut(row).enumerate() {
                    f(c * per + i, r);
                }
            });
    } else {
        for (i, r) in out.chunks_mut(row).enumerate() {
            f(i, r);
        }
    }
}

#[cfg(test)]
pub(crate) mod testing {
    use candle_core::{Device, Result, Tensor, Var};

    /// Deterministic values in [-1, 1).
    pub fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = cnext_core::rng::Rng::new(seed);
        (0..n).map(|_| (rng.unit() * 2.0 - 1.0) as f32).collect()
    }

    pub fn var(shape: &[usize], seed: u64) -> Result<Var> {
        Var::from_tensor(&Tensor::from_vec(
            values(shape.iter().product(), seed),
            shape,
            &Device::Cpu,
        )?)
    }

    /// Largest absolute difference, relative to the larger magnitude (at least 1).
    pub fn close(a: &Tensor, b: &Tensor, what: &str) -> Result<()> {
        assert_eq!(a.dims(), b.dims(), "{what}: shapes");
        let a = a.flatten_all()?.to_vec1::<f32>()?;
        let b = b.flatten_all()?.to_vec1::<f32>()?;
        let scale = a.iter().chain(&b).fold(1f32, |m, x| m.max(x.abs()));
        let worst = a
            .iter()
            .zip(&b)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            worst / scale <= 1e-5,
            "{what}: differs by {worst} (scale {scale})"
        );
        Ok(())
    }

    /// `sum(out * r)` for a fixed random `r`: a loss whose gradient is `r`.
    pub fn probe(out: &Tensor, seed: u64) -> Result<Tensor> {
        let r = Tensor::from_vec(values(out.elem_count(), seed), out.shape(), &Device::Cpu)?;
        (out * r)?.sum_all()
    }

    /// Checks the fused and unfused forms agree in value and in the gradient of every `var`.
    pub fn same(fused: &Tensor, plain: &Tensor, vars: &[&Var], what: &str) -> Result<()> {
        close(fused, plain, &format!("{what} forward"))?;
        let gf = probe(fused, 99)?.backward()?;
        let gp = probe(plain, 99)?.backward()?;
        for (i, v) in vars.iter().enumerate() {
            let (Some(a), Some(b)) = (gf.get(v), gp.get(v)) else {
                panic!("{what}: argument {i} has no gradient");
            };
            close(a, b, &format!("{what} gradient {i}"))?;
        }
        Ok(())
    }
}
