//! RegLoRA (from SEFE, Chen et al., "SEFE: Superficial and Essential Forgetting Eliminator for
//! Multimodal Continual Instruction Tuning", ICML 2025). After each task the LoRA is merged
//! into the base (`W <- W + s B A`), the top `top_fraction` (2%) entries of `|s B A|` of each
//! adapted linear become key elements (union across tasks), and a fresh LoRA starts. While
//! training later tasks the loss gains
//! `lambda * mean_layers mean_{(i,j) in keys} |(s B A)_{ij}|` (lambda = 2.5e3), so the new
//! adapter leaves the weights that mattered to earlier tasks alone. The merged base is part of
//! the method state (cached with each stage).

use candle_core::{DType, Result, Tensor};
use cnext_adapters::{normal_values, AdapterPlan, LoraConfig};
use cnext_backbones::Backbone;
use cnext_harness::data::Examples;
use cnext_harness::method::{typed, Hooks, Method, MethodEntry, StageInfo, Vars};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const ENTRY: MethodEntry = MethodEntry {
    id: "reglora",
    about: "merge each task's LoRA; penalise the new LoRA on earlier tasks' key elements",
    new: || Box::new(RegLora::new(RegLoraConfig::default())),
    configure: |v| {
        typed(v, |c: RegLoraConfig| {
            Box::new(RegLora::new(c)) as Box<dyn Method>
        })
    },
};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegLoraConfig {
    pub lambda: f64,
    /// Share of each linear's entries kept as key elements per task.
    pub top_fraction: f64,
}

impl Default for RegLoraConfig {
    fn default() -> Self {
        RegLoraConfig {
            lambda: 2.5e3,
            top_fraction: 0.02,
        }
    }
}

/// A 0/1 mask of the `ceil(fraction * n)` largest entries of `|delta|` (ties by position).
pub fn top_mask(delta: &Tensor, fraction: f64) -> Result<Tensor> {
    let v = delta
        .abs()?
        .flatten_all()?
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?;
    let k = ((fraction * v.len() as f64).ceil() as usize).min(v.len());
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[b].total_cmp(&v[a]).then(a.cmp(&b)));
    let mut m = vec![0f32; v.len()];
    for &i in &idx[..k] {
        m[i] = 1.0;
    }
    Tensor::from_vec(m, delta.shape(), delta.device())
}

pub struct RegLora {
    pub cfg: RegLoraConfig,
    plan: Option<AdapterPlan>,
    lora: Option<LoraConfig>,
    seed: u64,
    /// Per adapted linear path: the union of key elements so far (0/1, d_out x d_in).
    keys: BTreeMap<String, Tensor>,
}

impl RegLora {
    pub fn new(cfg: RegLoraConfig) -> Self {
        RegLora {
            cfg,
            plan: None,
            lora: None,
            seed: 0,
            keys: BTreeMap::new(),
        }
    }

    fn plan(&self) -> Result<&AdapterPlan> {
        self.plan
            .as_ref()
            .ok_or_else(|| candle_core::Error::Msg("reglora: used before adapters()".into()))
    }

    /// `lambda * mean over linears of mean_{keys} |s B A|`.
    pub fn penalty(&self) -> Result<Option<Tensor>> {
        let plan = self.plan()?;
        let mut terms = vec![];
        for (path, mask) in &self.keys {
            let n = mask.sum_all()?.to_scalar::<f32>()?;
            if n <= 0.0 {
                continue;
            }
            let d = plan.delta(path)?;
            terms.push(((d.abs()? * mask)?.sum_all()? / f64::from(n))?);
        }
        if terms.is_empty() {
            return Ok(None);
        }
        let n = terms.len() as f64;
        Ok(Some(
            ((Tensor::stack(&terms, 0)?.sum_all()? / n)? * self.cfg.lambda)?,
        ))
    }
}

impl Hooks for RegLora {
    fn loss(&mut self, loss: Tensor, _vars: &Vars) -> Result<Tensor> {
        match self.penalty()? {
            Some(p) => loss + p,
            None => Ok(loss),
        }
    }
}

impl Method for RegLora {
    fn id(&self) -> &'static str {
        ENTRY.id
    }
    fn config(&self) -> std::result::Result<serde_json::Value, serde_json::Error> {
        serde_json::to_value(&self.cfg)
    }
    fn adapters(&mut self, lora: &LoraConfig, seed: u64) -> AdapterPlan {
        let plan = AdapterPlan::lora(lora.clone(), seed).with_mergeable_base();
        self.plan = Some(plan.clone());
        self.lora = Some(lora.clone());
        self.seed = seed;
        plan
    }
    fn shares_first_stage(&self) -> bool {
        // Stage 1 is plain LoRA; its end merges it, which does not change the function.
        true
    }
    fn end_task(
        &mut self,
        stage: StageInfo,
        _model: &dyn Backbone,
        vars: &Vars,
        _train: &dyn Examples,
    ) -> Result<()> {
        let plan = self.plan()?.clone();
        let bases = plan.base_weights();
        for path in plan.adapted_paths() {
            let delta = plan.delta(&path)?.detach();
            let mask = top_mask(&delta, self.cfg.top_fraction)?;
            let union = match self.keys.remove(&path) {
                Some(old) => old.maximum(&mask)?,
                None => mask,
            };
            self.keys.insert(path.clone(), union);
            let w = bases.get(&format!("{path}.weight")).ok_or_else(|| {
                candle_core::Error::Msg(format!("reglora: no mergeable base for {path}"))
            })?;
            w.set(&(w.as_tensor() + delta)?)?;
        }
        // A fresh LoRA: new A ~ N(0, 0.01^2) (seeded per stage), B = 0.
        for (name, v) in vars.iter().filter(|(n, _)| n.contains(".lora_")) {
            let fresh = if name.contains(".lora_B.") {
                v.as_tensor().zeros_like()?
            } else {
                let salt = format!("{name}@reglora-stage{}", stage.stage + 1);
                let vals = normal_values(self.seed, &salt, v.elem_count(), 0.01);
                Tensor::from_vec(vals, v.shape(), v.device())?
            };
            v.set(&fresh)?;
        }
        Ok(())
    }
    fn state(&self) -> BTreeMap<String, Tensor> {
        let mut s: BTreeMap<String, Tensor> = self
            .keys
            .iter()
            .map(|(k, v)| (format!("keys.{k}"), v.clone()))
            .collect();
        if let Some(p) = &self.plan {
            for (k, v) in p.base_weights() {
                s.insert(format!("base.{k}"), v.as_tensor().clone());
            }
        }
        s
    }
    fn load_state(&mut self, state: BTreeMap<String, Tensor>) -> Result<()> {
        let bases = self.plan()?.base_weights();
        for (k, v) in state {
            if let Some(p) = k.strip_prefix("keys.") {
                self.keys.insert(p.to_string(), v);
            } else if let Some(w) = k.strip_prefix("base.").and_then(|n| bases.get(n)) {
                w.set(&v)?;
            } else {
                candle_core::bail!("reglora: unknown state tensor `{k}`");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn mask_size_and_union() -> Result<()> {
        let dev = Device::Cpu;
        // 100 entries, 2% -> the 2 largest |values|.
        let mut v: Vec<f32> = (0..100).map(|i| i as f32 * 0.01).collect();
        v[7] = -5.0;
        let d = Tensor::from_vec(v, (10, 10), &dev)?;
        let m = top_mask(&d, 0.02)?;
        let flat = m.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(flat.iter().sum::<f32>(), 2.0);
        assert_eq!((flat[7], flat[99]), (1.0, 1.0));
        // 3 entries of 10 with 2% -> ceil(0.2) = 1 element.
        let small = top_mask(&Tensor::new(&[0.1f32, -0.3, 0.2], &dev)?, 0.02)?;
        assert_eq!(small.to_vec1::<f32>()?, vec![0.0, 1.0, 0.0]);
        // The union of two task masks keeps both.
        let m2 = top_mask(&Tensor::new(&[0.9f32, 0.0, 0.2], &dev)?, 0.02)?;
        assert_eq!(small.maximum(&m2)?.to_vec1::<f32>()?, vec![1.0, 1.0, 0.0]);
        Ok(())
    }
}
