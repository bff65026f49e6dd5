//! The adapter-aware [`Linear`] and its builder [`linear`].

use crate::plan::{AdapterPlan, Recorder};
use crate::{normal_values, AdapterKind, Ctx};
use candle_core::{DType, Device, Module, Result, Tensor, Var, D};
use candle_nn::VarBuilder;
use cnext_kernels::fused::lora::{lora_linear, Dropout};
use std::sync::Arc;

/// The adapter of one linear: E >= 1 experts, each a separate (A, B) pair of variables so that
/// a method can freeze one by dropping its gradients.
#[derive(Debug, Clone)]
pub(crate) struct Adapter {
    kind: AdapterKind,
    /// Per expert, `[rank, d_in]`.
    a: Vec<Var>,
    /// Per expert, `[d_out, rank]`.
    b: Vec<Var>,
    /// MoELoRA's router `[E, d_in]`.
    router: Option<Var>,
    /// Rank of each expert.
    rank: usize,
    scale: f64,
    dropout: f32,
}

impl Adapter {
    /// All experts as ONE LoRA of the total rank: A's stacked by rows `[E*rank, d_in]`, B's by
    /// columns `[d_out, E*rank]`, so the forward is one pair of matmuls whatever E is.
    /// `Tensor::cat` has a backward that splits the gradient back to every expert's variable.
    fn stacked(&self) -> Result<(Tensor, Tensor)> {
        if let ([a], [b]) = (self.a.as_slice(), self.b.as_slice()) {
            return Ok((a.as_tensor().clone(), b.as_tensor().clone()));
        }
        let a: Vec<&Tensor> = self.a.iter().map(|v| v.as_tensor()).collect();
        let b: Vec<&Tensor> = self.b.iter().map(|v| v.as_tensor()).collect();
        Ok((Tensor::cat(&a, 0)?, Tensor::cat(&b, 1)?))
    }

    /// `s * sum_i B_i A_i`, which is `s * B_cat A_cat` for the stacked factors.
    pub(crate) fn delta(&self) -> Result<Tensor> {
        if let AdapterKind::MoeLora { .. } = self.kind {
            candle_core::bail!(
                "MoELoRA has no fixed weight delta: its gate depends on the input token"
            );
        }
        let (a, b) = self.stacked()?;
        b.matmul(&a)? * self.scale
    }

    /// The adapter's contribution for input `x` (router input) and `xin` (`x` after dropout),
    /// with the [`Adapter::stacked`] factors `a`, `b`.
    fn forward(&self, x: &Tensor, xin: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        // Adapters stay in their own dtype (f32) over a base of another one (bf16): the input
        // is cast in and the caller casts the delta back (no-ops when the dtypes agree).
        let (x, xin) = (&x.to_dtype(a.dtype())?, &xin.to_dtype(a.dtype())?);
        let mut h = xin.broadcast_matmul(&a.t()?)?;
        if let Some(r) = &self.router {
            // Token-level gate from the undropped input (CoIN's MoELoRA drops out only the
            // experts' input). The generic softmax: `softmax_last_dim` has no backward.
            let logits = x.broadcast_matmul(&r.as_tensor().t()?)?;
            let gate = candle_nn::ops::softmax(&logits, D::Minus1)?;
            // Expert i owns hidden columns [i*rank, (i+1)*rank): repeat its gate over them.
            let mut dims = gate.dims().to_vec();
            dims.push(self.rank);
            let gate = gate
                .unsqueeze(gate.rank())?
                .broadcast_as(dims)?
                .reshape(h.shape())?;
            h = h.mul(&gate)?;
        }
        h.broadcast_matmul(&b.t()?)? * self.scale
    }
}

/// A linear layer with an optional adapter. The base weight is a plain tensor (frozen by
/// construction) unless the backbone was built from trainable variables for pretraining, or
/// a detached view of a mergeable base variable.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    adapter: Option<Adapter>,
    recorder: Option<Arc<Recorder>>,
    path: String,
}

fn build_adapter(
    plan: &AdapterPlan,
    path: &str,
    in_dim: usize,
    out_dim: usize,
    dev: &Device,
) -> Result<Option<Adapter>> {
    let cfg = match &plan.lora {
        Some(cfg) if plan.targets(path) => cfg,
        _ => return Ok(None),
    };
    let kind = plan.kind();
    let rank = kind.expert_rank(cfg.r)?;
    let mut a = Vec::new();
    let mut b = Vec::new();
    for i in 0..kind.experts() {
        let adapter = kind.adapter_name(i, &plan.name);
        let a_name = format!("{path}.lora_A.{adapter}.weight");
        let b_name = format!("{path}.lora_B.{adapter}.weight");
        a.push(plan.get_or_init(&a_name, (rank, in_dim), || {
            let v = normal_values(plan.seed, &a_name, rank * in_dim, 0.01);
            Tensor::from_vec(v, (rank, in_dim), dev)
        })?);
        b.push(plan.get_or_init(&b_name, (out_dim, rank), || {
            Tensor::zeros((out_dim, rank), DType::F32, dev)
        })?);
    }
    let router = match kind {
        AdapterKind::MoeLora { experts } => {
            // N(0, 0.01^2), not zeros: the gate starts near uniform (1/E each) as with zeros,
            // but tokens already differ slightly, as with the default nn.Linear init of the
            // PyTorch implementation.
            let name = format!("{path}.lora_router.{}.weight", plan.name);
            Some(plan.get_or_init(&name, (experts, in_dim), || {
                let v = normal_values(plan.seed, &name, experts * in_dim, 0.01);
                Tensor::from_vec(v, (experts, in_dim), dev)
            })?)
        }
        _ => None,
    };
    Ok(Some(Adapter {
        kind,
        a,
        b,
        router,
        rank,
        // alpha over the TOTAL rank: E experts of rank r/E at init have the scale of one LoRA.
        scale: cfg.alpha / cfg.r as f64,
        dropout: cfg.dropout,
    }))
}

/// Builds a linear `in_dim -> out_dim` named by `vb`'s prefix, with an adapter if the plan
/// targets it.
pub fn linear(
    in_dim: usize,
    out_dim: usize,
    bias: bool,
    vb: VarBuilder,
    plan: &AdapterPlan,
) -> Result<Linear> {
    let path = vb.prefix();
    let std = (1.0 / in_dim as f64).sqrt();
    let mut weight = vb.get_with_hints(
        (out_dim, in_dim),
        "weight",
        candle_nn::Init::Randn {
            mean: 0.0,
            stdev: std,
        },
    )?;
    let bias = if bias {
        Some(vb.get_with_hints(out_dim, "bias", candle_nn::Init::Const(0.0))?)
    } else {
        None
    };
    let adapter = build_adapter(plan, &path, in_dim, out_dim, weight.device())?;
    if let Some(a) = &adapter {
        plan.register(&path, a)?;
        if plan.is_mergeable() {
            let name = format!("{path}.weight");
            let var = plan.base_or_init(&name, (out_dim, in_dim), || Ok(weight.clone()))?;
            // A detached view shares the variable's storage (`Var::set` changes the layer in
            // place) but is not a variable, so `frozen_matmul` keeps skipping its gradient.
            weight = var.as_tensor().detach();
        }
    }
    let recorder = adapter.as_ref().map(|_| plan.recorder());
    Ok(Linear {
        weight,
        bias,
        adapter,
        recorder,
        path,
    })
}

/// Inverted dropout with a mask from our own seeded generator (a counter-based hash per
/// element: cheap, and identical for a seed on any thread count).
pub(crate) fn dropout(x: &Tensor, p: f32, seed: u64, name: &str) -> Result<Tensor> {
    match Dropout::new(p, seed, name) {
        Some(d) => d.apply(x),
        None => Ok(x.clone()),
    }
}

impl Linear {
    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn has_adapter(&self) -> bool {
        self.adapter.is_some()
    }

    pub fn forward_ctx(&self, x: &Tensor, ctx: Ctx) -> Result<Tensor> {
        if let Some(rec) = &self.recorder {
            if rec.is_on() {
                rec.push(&self.path, x)?;
            }
        }
        // The adapter with its stacked factors, once per forward: the fused op and the
        // fallback both use them.
        let adapter = match &self.adapter {
            Some(a) => Some((a, a.stacked()?)),
            None => None,
        };
        if let Some((a, (fa, fb))) = &adapter {
            if a.router.is_none() {
                // One fused op for the base product and the low-rank path (CPU f32); the
                // graph of small ops below is the fallback and the reference.
                let drop = ctx
                    .train
                    .then(|| Dropout::new(a.dropout, ctx.step_seed, &self.path))
                    .flatten();
                if let Some(y) = lora_linear(x, &self.weight, fa, fb, a.scale, drop)? {
                    return match &self.bias {
                        Some(b) => y.broadcast_add(b),
                        None => Ok(y),
                    };
                }
            }
        }
        let mut y = cnext_kernels::frozen_matmul(x, &self.weight)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        if let Some((a, (fa, fb))) = &adapter {
            let xin = if ctx.train {
                dropout(x, a.dropout, ctx.step_seed, &self.path)?
            } else {
                x.clone()
            };
            y = (&y + a.forward(x, &xin, fa, fb)?.to_dtype(y.dtype())?)?;
        }
        Ok(y)
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_ctx(x, Ctx::default())
    }
}
