//! MAGE (Continual-NExT, arXiv 2602.18055): four LoRA experts of rank r/4 summed with equal
//! weight (no router). Expert roles: 0 text input, 1 image input, 2 text output, 3 image output;
//! on each task only the experts matching the task's input and output modalities train (the
//! others get no gradient, so the optimizer leaves them and their state untouched). PEMA, a
//! parameter-wise EMA of every trainable LoRA matrix (`cnext_kernels::pema`), runs before each
//! optimizer step and the model takes theta* at the end of the stage.
//!
//! The same file builds the ablation variants (paper Table 4): `moe_ew` (equal weight, all
//! experts train), `moe_ew_ga` (+ modality gating), `mage` (+ PEMA), `mage_dema` (DEMA instead).

use crate::cia::Dema;
use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor};
use cnext_adapters::{AdapterPlan, LoraConfig};
use cnext_backbones::Backbone;
use cnext_core::{Modality, TaskId};
use cnext_harness::data::Examples;
use cnext_harness::method::{
    prefixed, take_prefixed, typed, unexpected, Hooks, Method, MethodEntry, StageInfo, Step, Vars,
};
use cnext_kernels::pema::{pema_update, AlphaPolicy, Mat};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const ENTRY: MethodEntry = MethodEntry {
    id: "mage",
    about: "modality-gated equal-weight LoRA experts with PEMA",
    new: || Box::new(Mage::new(ENTRY.id, MageConfig::default())),
    configure: |v| {
        typed(v, |c: MageConfig| {
            Box::new(Mage::new(ENTRY.id, c)) as Box<dyn Method>
        })
    },
};

/// Which Fisher estimate PEMA uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FisherEstimate {
    /// The official code: the squared mini-batch gradient.
    Batch,
    /// The paper's text: the mean of per-sample squared gradients (one backward per sample).
    PerSample,
}

/// The weight averaging applied to the trainable experts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Averaging {
    None,
    Pema {
        lambda: f64,
        alpha_policy: AlphaPolicy,
        fisher: FisherEstimate,
    },
    Dema {
        fallback: f64,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MageConfig {
    pub experts: usize,
    /// Train only the experts matching the task's modalities.
    pub modality_gating: bool,
    pub averaging: Averaging,
}

impl Default for MageConfig {
    fn default() -> Self {
        MageConfig {
            experts: 4,
            modality_gating: true,
            // Clip by default: with lambda = 1e-5, faithful alpha is of order 1e5 and theta*
            // diverges (METHODS.md); `faithful` reproduces the official behaviour.
            averaging: Averaging::Pema {
                lambda: 1e-5,
                alpha_policy: AlphaPolicy::Clip,
                fisher: FisherEstimate::Batch,
            },
        }
    }
}

/// The experts a task trains: 0 if it reads text, 1 if it reads an image, 2 if it writes text,
/// 3 if it writes an image.
pub fn trained_experts(task: TaskId) -> Vec<usize> {
    let mut e = vec![];
    if task.inputs().contains(&Modality::Text) {
        e.push(0);
    }
    if task.inputs().contains(&Modality::Image) {
        e.push(1);
    }
    e.push(match task.output() {
        Modality::Text => 2,
        Modality::Image => 3,
    });
    e
}

/// The expert a variable belongs to (`...lora_A.expert2.weight` -> 2).
fn expert_of(name: &str) -> Option<usize> {
    let rest = name.split(".expert").nth(1)?;
    rest.split('.').next()?.parse().ok()
}

/// Whether `name` is a LoRA matrix of one of the `active` experts.
fn averaged(name: &str, active: &[usize]) -> bool {
    name.contains(".lora_") && expert_of(name).is_some_and(|e| active.contains(&e))
}

fn to_mat(t: &Tensor) -> Result<Mat> {
    let (m, n) = t.dims2()?;
    let v = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    Ok(Mat::new(m, n, v))
}

fn from_mat(m: &Mat, like: &Tensor) -> Result<Tensor> {
    Tensor::from_vec(m.v.clone(), (m.m, m.n), like.device())?.to_dtype(like.dtype())
}

pub struct Mage {
    id: &'static str,
    pub cfg: MageConfig,
    /// Experts training in the current stage.
    active: Vec<usize>,
    /// PEMA's theta* per averaged variable, in f64.
    star: BTreeMap<String, Mat>,
    dema: Dema,
    fisher: Option<BTreeMap<String, Tensor>>,
    /// This stage's alpha elements and fallbacks (PEMA).
    alphas: usize,
    fell_back: usize,
    last: BTreeMap<String, f64>,
}

impl Mage {
    pub fn new(id: &'static str, cfg: MageConfig) -> Self {
        Mage {
            id,
            cfg,
            active: vec![],
            star: BTreeMap::new(),
            dema: Dema::default(),
            fisher: None,
            alphas: 0,
            fell_back: 0,
            last: BTreeMap::new(),
        }
    }

    /// Whether `name` is a LoRA matrix of an expert training now.
    fn averaged(&self, name: &str) -> bool {
        averaged(name, &self.active)
    }
}

impl Hooks for Mage {
    fn wants_per_sample_fisher(&self) -> bool {
        matches!(
            self.cfg.averaging,
            Averaging::Pema {
                fisher: FisherEstimate::PerSample,
                ..
            }
        )
    }

    fn per_sample_fisher(&mut self, fisher: BTreeMap<String, Tensor>) -> Result<()> {
        self.fisher = Some(fisher);
        Ok(())
    }

    fn adjust_grads(&mut self, _step: Step, grads: &mut GradStore, vars: &Vars) -> Result<()> {
        if self.cfg.modality_gating {
            for (name, v) in vars {
                if expert_of(name).is_some_and(|e| !self.active.contains(&e)) {
                    grads.remove(v.as_tensor());
                }
            }
        }
        let Averaging::Pema {
            lambda,
            alpha_policy,
            ..
        } = self.cfg.averaging
        else {
            return Ok(());
        };
        let fisher = self.fisher.take();
        for (name, v) in vars {
            let (Some(g), Some(star)) = (grads.get(v.as_tensor()), self.star.get(name)) else {
                continue;
            };
            let gm = to_mat(&g.detach())?;
            let h = match fisher.as_ref().and_then(|f| f.get(name)) {
                Some(f) => to_mat(f)?,
                None => Mat::new(gm.m, gm.n, gm.v.iter().map(|x| x * x).collect()),
            };
            let theta = to_mat(&v.as_tensor().detach())?;
            let (next, fell) = pema_update(&theta, star, &gm, &h, lambda, alpha_policy);
            self.alphas += next.v.len();
            self.fell_back += fell;
            self.star.insert(name.clone(), next);
        }
        Ok(())
    }

    fn step_state(&self) -> Result<BTreeMap<String, Tensor>> {
        let cpu = candle_core::Device::Cpu;
        let mut out = prefixed("dema.", &self.dema.step_state());
        for (name, m) in &self.star {
            let t = Tensor::from_vec(m.v.clone(), (m.m, m.n), &cpu)?;
            out.insert(format!("pema.{name}"), t);
        }
        let counts = [self.alphas as i64, self.fell_back as i64];
        out.insert("counts".into(), Tensor::new(&counts, &cpu)?);
        Ok(out)
    }

    fn load_step_state(&mut self, mut state: BTreeMap<String, Tensor>) -> Result<()> {
        let mut dema = take_prefixed("dema.", &mut state);
        self.dema.load_step_state(&mut dema);
        self.star = take_prefixed("pema.", &mut state)
            .iter()
            .map(|(k, t)| Ok((k.clone(), to_mat(t)?)))
            .collect::<Result<_>>()?;
        if let Some(c) = state.remove("counts") {
            let c = c.to_vec1::<i64>()?;
            if let [a, f] = c[..] {
                (self.alphas, self.fell_back) = (a as usize, f as usize);
            }
        }
        unexpected(&dema)?;
        unexpected(&state)
    }

    fn after_step(&mut self, _step: Step, grads: &GradStore, vars: &Vars) -> Result<()> {
        let Averaging::Dema { fallback } = self.cfg.averaging else {
            return Ok(());
        };
        self.dema.after_step(grads, vars, fallback)
    }
}

impl Method for Mage {
    fn id(&self) -> &'static str {
        self.id
    }
    fn config(&self) -> std::result::Result<serde_json::Value, serde_json::Error> {
        serde_json::to_value(&self.cfg)
    }
    fn adapters(&mut self, lora: &LoraConfig, seed: u64) -> AdapterPlan {
        AdapterPlan::experts(lora.clone(), self.cfg.experts, seed)
    }
    fn shares_first_stage(&self) -> bool {
        // Only the plain variant trains stage 1 without any mechanism.
        !self.cfg.modality_gating && self.cfg.averaging == Averaging::None
    }
    fn architecture(&self) -> String {
        format!("experts{}", self.cfg.experts)
    }
    fn begin_task(&mut self, stage: StageInfo, vars: &Vars) -> Result<()> {
        self.active = if self.cfg.modality_gating {
            trained_experts(stage.task)
        } else {
            (0..self.cfg.experts).collect()
        };
        self.star.clear();
        self.dema.finish();
        self.alphas = 0;
        self.fell_back = 0;
        match self.cfg.averaging {
            Averaging::None => {}
            Averaging::Pema { .. } => {
                for (name, v) in vars {
                    if self.averaged(name) {
                        self.star
                            .insert(name.clone(), to_mat(&v.as_tensor().detach())?);
                    }
                }
            }
            Averaging::Dema { .. } => {
                let active = self.active.clone();
                self.dema.start(vars, |n| averaged(n, &active))?;
            }
        }
        Ok(())
    }
    fn end_task(
        &mut self,
        _stage: StageInfo,
        _model: &dyn Backbone,
        vars: &Vars,
        _train: &dyn Examples,
    ) -> Result<()> {
        for (name, star) in self.dema.finish() {
            self.star.insert(name, to_mat(&star)?);
        }
        let (mut total, mut non_finite) = (0usize, 0usize);
        for (name, star) in std::mem::take(&mut self.star) {
            let Some(v) = vars.get(&name) else { continue };
            let now = to_mat(&v.as_tensor().detach())?;
            total += star.v.len();
            // The official save copies theta* only where it is finite.
            let merged: Vec<f64> = star
                .v
                .iter()
                .zip(&now.v)
                .map(|(s, t)| {
                    if s.is_finite() {
                        *s
                    } else {
                        non_finite += 1;
                        *t
                    }
                })
                .collect();
            v.set(&from_mat(&Mat::new(now.m, now.n, merged), v.as_tensor())?)?;
        }
        self.last.clear();
        if let Averaging::Pema { .. } = self.cfg.averaging {
            let frac = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
            self.last.insert(
                "pema_alpha_fallback".into(),
                frac(self.fell_back, self.alphas),
            );
            self.last
                .insert("pema_star_non_finite".into(), frac(non_finite, total));
        }
        Ok(())
    }
    fn diagnostics(&self) -> BTreeMap<String, f64> {
        self.last.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn experts_follow_the_task_modalities() {
        // METHODS.md's table.
        for t in [
            TaskId::Vqav2,
            TaskId::Imagenet,
            TaskId::Ocrvqa,
            TaskId::Refcoco,
        ] {
            assert_eq!(trained_experts(t), vec![0, 1, 2], "{t}");
        }
        assert_eq!(trained_experts(TaskId::Flickr30k), vec![0, 3]);
        assert_eq!(trained_experts(TaskId::Hqedit), vec![0, 1, 3]);
        assert_eq!(expert_of("l.q_proj.lora_B.expert3.weight"), Some(3));
        assert_eq!(expert_of("projector.weight"), None);
    }
}
