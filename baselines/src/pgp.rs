//! PGP (Qiao et al., "Prompt Gradient Projection for Continual Learning", ICLR 2024), applied to
//! LoRA's A matrices as in Continual-NExT. After each task, the inputs `x` of every adapted
//! linear over `memory` training samples span a subspace; an orthonormal basis U of it is kept
//! and grown GPM-style (Saha et al., ICLR 2021): the first task keeps the top eigenvectors of
//! `R R^T` up to a cumulative energy `threshold`; later tasks add eigenvectors of the residual
//! `R - U U^T R` until the captured share of `||R||_F^2` reaches the threshold. While training
//! later tasks, `grad_A <- grad_A - grad_A U U^T` before every optimizer step, so updates stay
//! orthogonal to the inputs earlier tasks produced.

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor};
use cnext_adapters::{AdapterPlan, Ctx, LoraConfig};
use cnext_backbones::{Backbone, Example};
use cnext_core::rng::Rng;
use cnext_harness::data::Examples;
use cnext_harness::method::{typed, Hooks, Method, MethodEntry, StageInfo, Step, Vars};
use cnext_kernels::linalg::sym_eigen;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const ENTRY: MethodEntry = MethodEntry {
    id: "pgp",
    about: "gradient projection of LoRA-A orthogonal to earlier tasks' input subspace",
    new: || Box::new(Pgp::new(PgpConfig::default())),
    configure: |v| typed(v, |c: PgpConfig| Box::new(Pgp::new(c)) as Box<dyn Method>),
};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PgpConfig {
    /// Cumulative energy the basis must capture.
    pub threshold: f64,
    /// Training samples whose layer inputs are collected after each task.
    pub memory: usize,
}

impl Default for PgpConfig {
    fn default() -> Self {
        PgpConfig {
            threshold: 0.97,
            memory: 64,
        }
    }
}

/// Grows the orthonormal basis `u` (unit vectors of length d) with directions of the rows of
/// `x` (`n x d`, one input per row) until the basis captures `threshold` of `||x||_F^2`.
pub fn grow_basis(u: &[Vec<f64>], x: &[f64], n: usize, d: usize, threshold: f64) -> Vec<Vec<f64>> {
    let total: f64 = x.iter().map(|v| v * v).sum();
    let mut basis = u.to_vec();
    if total <= 0.0 || n == 0 {
        return basis;
    }
    // Residual rows: x - (x U) U^T; captured energy = ||x U||_F^2.
    let mut res = x.to_vec();
    let mut captured = 0.0;
    for b in u {
        for r in 0..n {
            let row = &mut res[r * d..(r + 1) * d];
            let p: f64 = (0..d).map(|k| x[r * d + k] * b[k]).sum();
            captured += p * p;
            for k in 0..d {
                row[k] -= p * b[k];
            }
        }
    }
    if captured / total >= threshold {
        return basis;
    }
    // Eigenvectors of res^T res (d x d) = the left singular vectors of R = res^T.
    let mut c = vec![0.0; d * d];
    for r in 0..n {
        let row = &res[r * d..(r + 1) * d];
        for i in 0..d {
            if row[i] == 0.0 {
                continue;
            }
            for j in 0..d {
                c[i * d + j] += row[i] * row[j];
            }
        }
    }
    let Some((vals, vecs)) = sym_eigen(&c, d) else {
        return basis;
    };
    let mut acc = captured;
    for (k, &lam) in vals.iter().enumerate() {
        if acc / total >= threshold || lam <= 0.0 || basis.len() >= d {
            break;
        }
        let mut v: Vec<f64> = (0..d).map(|i| vecs[i * d + k]).collect();
        // Re-orthogonalise against the basis (the residual is orthogonal only up to rounding).
        for b in &basis {
            let p: f64 = v.iter().zip(b).map(|(a, b)| a * b).sum();
            v.iter_mut().zip(b).for_each(|(a, b)| *a -= p * b);
        }
        let norm = v.iter().map(|a| a * a).sum::<f64>().sqrt();
        if norm < 1e-6 {
            continue;
        }
        v.iter_mut().for_each(|a| *a /= norm);
        basis.push(v);
        acc += lam;
    }
    basis
}

/// `g - (g U) U^T` for `g` (`r x d`) and the basis as the columns of `u` (`d x k`).
pub fn project_out(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    g - g.matmul(u)?.matmul(&u.t()?)?
}

pub struct Pgp {
    pub cfg: PgpConfig,
    plan: Option<AdapterPlan>,
    /// Per adapted linear path: the basis as a `d_in x k` tensor.
    bases: BTreeMap<String, Tensor>,
}

impl Pgp {
    pub fn new(cfg: PgpConfig) -> Self {
        Pgp {
            cfg,
            plan: None,
            bases: BTreeMap::new(),
        }
    }
}

fn lora_a_path(name: &str) -> Option<&str> {
    name.strip_suffix(".lora_A.default.weight")
}

impl Hooks for Pgp {
    fn adjust_grads(&mut self, _step: Step, grads: &mut GradStore, vars: &Vars) -> Result<()> {
        for (name, v) in vars {
            let Some(u) = lora_a_path(name).and_then(|p| self.bases.get(p)) else {
                continue;
            };
            if let Some(g) = grads.get(v.as_tensor()) {
                let projected = project_out(&g.detach(), u)?;
                grads.insert(v.as_tensor(), projected);
            }
        }
        Ok(())
    }
}

impl Method for Pgp {
    fn id(&self) -> &'static str {
        ENTRY.id
    }
    fn config(&self) -> std::result::Result<serde_json::Value, serde_json::Error> {
        serde_json::to_value(&self.cfg)
    }
    fn adapters(&mut self, lora: &LoraConfig, seed: u64) -> AdapterPlan {
        let plan = AdapterPlan::lora(lora.clone(), seed);
        self.plan = Some(plan.clone());
        plan
    }
    fn shares_first_stage(&self) -> bool {
        // Stage 1 trains unprojected; the first basis comes from its end.
        true
    }
    fn end_task(
        &mut self,
        stage: StageInfo,
        model: &dyn Backbone,
        _vars: &Vars,
        train: &dyn Examples,
    ) -> Result<()> {
        let Some(plan) = &self.plan else {
            candle_core::bail!("pgp: end_task before adapters()");
        };
        let mut idx: Vec<usize> = (0..train.len()).collect();
        Rng::derive(stage.seed, &format!("pgp-memory-{}", stage.task)).shuffle(&mut idx);
        let memory: Vec<Example> = idx
            .iter()
            .take(self.cfg.memory)
            .map(|&i| {
                train
                    .get(i)
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))
            })
            .collect::<Result<_>>()?;
        plan.set_recording(true);
        let ran = memory
            .chunks(16)
            .try_for_each(|c| model.loss(c, Ctx::default()).map(|_| ()));
        plan.set_recording(false);
        ran?;
        for (path, xs) in plan.take_inputs() {
            let x = Tensor::cat(&xs, 0)?.to_dtype(DType::F64)?;
            let (n, d) = x.dims2()?;
            let flat = x.flatten_all()?.to_vec1::<f64>()?;
            let old: Vec<Vec<f64>> = match self.bases.get(&path) {
                Some(u) => u.t()?.to_dtype(DType::F64)?.to_vec2::<f64>()?,
                None => vec![],
            };
            let grown = grow_basis(&old, &flat, n, d, self.cfg.threshold);
            if grown.is_empty() {
                continue;
            }
            let k = grown.len();
            let cols: Vec<f32> = (0..d)
                .flat_map(|i| grown.iter().map(move |b| b[i] as f32))
                .collect();
            let dev = xs[0].device();
            self.bases
                .insert(path, Tensor::from_vec(cols, (d, k), dev)?);
        }
        Ok(())
    }
    fn state(&self) -> BTreeMap<String, Tensor> {
        self.bases.clone()
    }
    fn load_state(&mut self, state: BTreeMap<String, Tensor>) -> Result<()> {
        self.bases = state;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn basis_grows_only_up_to_the_threshold_and_projections_are_orthogonal() -> Result<()> {
        // Inputs in 4-D with energy 9 along e0, 1 along e1 (and nothing else).
        let d = 4;
        let x = vec![3.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0];
        // 0.8 of the energy: e0 alone (0.9) suffices.
        let b = grow_basis(&[], &x, 2, d, 0.8);
        assert_eq!(b.len(), 1);
        assert!((b[0][0].abs() - 1.0).abs() < 1e-9);
        // 0.95: needs e1 too.
        let b2 = grow_basis(&[], &x, 2, d, 0.95);
        assert_eq!(b2.len(), 2);
        // A later task whose inputs lie in span(e0) adds nothing; one along e2 adds e2.
        assert_eq!(grow_basis(&b, &[2.0, 0.0, 0.0, 0.0], 1, d, 0.97).len(), 1);
        let b3 = grow_basis(&b, &[0.0, 0.0, 5.0, 0.0], 1, d, 0.97);
        assert_eq!(b3.len(), 2);
        assert!((b3[1][2].abs() - 1.0).abs() < 1e-9);
        // Projected gradients have no component in the kept span.
        let cols: Vec<f32> = (0..d)
            .flat_map(|i| b3.iter().map(move |v| v[i] as f32))
            .collect();
        let u = Tensor::from_vec(cols, (d, 2), &Device::Cpu)?;
        let g = Tensor::new(
            &[[1.0f32, 2.0, 3.0, 4.0], [-1.0, 0.5, 2.0, 0.0]],
            &Device::Cpu,
        )?;
        let p = project_out(&g, &u)?;
        let inside = p.matmul(&u)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(inside < 1e-6, "{inside}");
        assert_eq!(p.to_vec2::<f32>()?[0][1], 2.0);
        assert_eq!(p.to_vec2::<f32>()?[0][3], 4.0);
        Ok(())
    }
}
