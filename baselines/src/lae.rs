//! LAE (Gao et al., "A Unified Continual Learning Framework with General Parameter-Efficient
//! Tuning", ICCV 2023). The online adapter trains as usual; the offline adapter is an EMA of
//! it (`decay`, 0.99), initialised as a copy at the end of stage 1 and updated after every
//! optimizer step from stage 2 on. For the first `calibration` fraction of each later stage the
//! online adapter is frozen while the rest (the projector) trains. Inference ensembles the two:
//! at every decoding step, the argmax of the elementwise max of their next-token distributions.

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor};
use cnext_backbones::Backbone;
use cnext_harness::data::Examples;
use cnext_harness::method::{typed, Hooks, Method, MethodEntry, StageInfo, Step, Vars};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const ENTRY: MethodEntry = MethodEntry {
    id: "lae",
    about: "online + EMA offline adapter, max-probability ensemble at inference",
    new: || Box::new(Lae::new(LaeConfig::default())),
    configure: |v| typed(v, |c: LaeConfig| Box::new(Lae::new(c)) as Box<dyn Method>),
};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LaeConfig {
    pub decay: f64,
    /// Fraction of each stage (from stage 2) during which the online adapter is frozen.
    pub calibration: f64,
}

impl Default for LaeConfig {
    fn default() -> Self {
        LaeConfig {
            decay: 0.99,
            calibration: 0.1,
        }
    }
}

/// Adapter weights (the online adapter), as opposed to the projector.
fn is_adapter(name: &str) -> bool {
    name.contains(".lora_")
}

pub struct Lae {
    pub cfg: LaeConfig,
    /// The offline adapter; empty until the end of stage 1.
    offline: BTreeMap<String, Tensor>,
}

impl Lae {
    pub fn new(cfg: LaeConfig) -> Self {
        Lae {
            cfg,
            offline: BTreeMap::new(),
        }
    }
}

impl Hooks for Lae {
    fn adjust_grads(&mut self, step: Step, grads: &mut GradStore, vars: &Vars) -> Result<()> {
        let calibrating = (step.index as f64) < self.cfg.calibration * step.total as f64;
        if !self.offline.is_empty() && calibrating {
            for (name, v) in vars {
                if is_adapter(name) {
                    grads.remove(v.as_tensor());
                }
            }
        }
        Ok(())
    }

    fn step_state(&self) -> Result<BTreeMap<String, Tensor>> {
        Ok(self.offline.clone())
    }
    fn load_step_state(&mut self, state: BTreeMap<String, Tensor>) -> Result<()> {
        self.offline = state;
        Ok(())
    }

    fn after_step(&mut self, _step: Step, _grads: &GradStore, vars: &Vars) -> Result<()> {
        let d = self.cfg.decay;
        for (name, off) in self.offline.iter_mut() {
            if let Some(v) = vars.get(name) {
                *off = ((&*off * d)? + (v.as_tensor().detach() * (1.0 - d))?)?;
            }
        }
        Ok(())
    }
}

impl Method for Lae {
    fn id(&self) -> &'static str {
        ENTRY.id
    }
    fn config(&self) -> std::result::Result<serde_json::Value, serde_json::Error> {
        serde_json::to_value(&self.cfg)
    }
    fn shares_first_stage(&self) -> bool {
        // Stage 1 is plain training; its end only copies the adapter.
        true
    }
    fn end_task(
        &mut self,
        _stage: StageInfo,
        _model: &dyn Backbone,
        vars: &Vars,
        _train: &dyn Examples,
    ) -> Result<()> {
        if self.offline.is_empty() {
            for (name, v) in vars.iter().filter(|(n, _)| is_adapter(n)) {
                self.offline
                    .insert(name.clone(), v.as_tensor().detach().copy()?);
            }
        }
        Ok(())
    }
    fn ensemble(&self, vars: &Vars) -> Result<Option<Vec<BTreeMap<String, Tensor>>>> {
        if self.offline.is_empty() {
            return Ok(None);
        }
        let online: BTreeMap<String, Tensor> = vars
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.as_tensor().copy()?)))
            .collect::<Result<_>>()?;
        let mut offline = online.clone();
        offline.extend(self.offline.iter().map(|(k, v)| (k.clone(), v.clone())));
        Ok(Some(vec![online, offline]))
    }
    fn state(&self) -> BTreeMap<String, Tensor> {
        self.offline.clone()
    }
    fn load_state(&mut self, state: BTreeMap<String, Tensor>) -> Result<()> {
        self.offline = state;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};
    use cnext_backbones::max_of_distributions;

    #[test]
    fn ensemble_takes_the_elementwise_max_of_distributions() -> Result<()> {
        let dev = Device::Cpu;
        let logits = |p: [f64; 3]| Tensor::new(&[p.map(|x| x.max(1e-12).ln() as f32)], &dev);
        // Member 1 is sure of class 0; member 2 splits between 1 and 2. The mean would pick
        // class 1 (0.45), the max picks class 0 (0.7).
        let m1 = logits([0.7, 0.3, 0.0])?;
        let m2 = logits([0.0, 0.6, 0.4])?;
        let mx = max_of_distributions(&[m1, m2])?;
        let v = mx.to_vec2::<f32>()?[0].clone();
        for (got, want) in v.iter().zip([0.7f32, 0.6, 0.4]) {
            assert!((got - want).abs() < 1e-5, "{v:?}");
        }
        assert_eq!(mx.argmax(D::Minus1)?.to_vec1::<u32>()?, vec![0]);
        Ok(())
    }

    #[test]
    fn offline_is_a_copy_then_an_ema_and_calibration_freezes_the_adapter() -> Result<()> {
        let dev = Device::Cpu;
        let a = Var::from_tensor(&Tensor::new(&[1.0f32, 2.0], &dev)?)?;
        let p = Var::from_tensor(&Tensor::new(&[5.0f32], &dev)?)?;
        let vars: Vars = [
            ("l.q_proj.lora_A.default.weight".to_string(), a.clone()),
            ("projector.weight".to_string(), p.clone()),
        ]
        .into_iter()
        .collect();
        let mut lae = Lae::new(LaeConfig::default());
        let m = crate::testing::Linear2::new(&[0.0, 0.0])?;
        let info = StageInfo {
            stage: 1,
            task: cnext_core::TaskId::Vqav2,
            order: &[],
            seed: 0,
        };
        assert!(lae.ensemble(&vars)?.is_none());
        lae.end_task(info, &m, &vars, &Vec::new())?;
        assert_eq!(
            lae.offline.len(),
            1,
            "the projector is not part of the adapter"
        );
        // Stage 2, step 0 of 100: calibrating, so the adapter's gradient is dropped.
        let mut grads =
            ((a.as_tensor() * 1.0)?.sum_all()? + p.as_tensor().sum_all()?)?.backward()?;
        lae.adjust_grads(
            Step {
                index: 0,
                total: 100,
            },
            &mut grads,
            &vars,
        )?;
        assert!(grads.get(a.as_tensor()).is_none() && grads.get(p.as_tensor()).is_some());
        let mut later = ((a.as_tensor() * 1.0)?.sum_all()?).backward()?;
        lae.adjust_grads(
            Step {
                index: 10,
                total: 100,
            },
            &mut later,
            &vars,
        )?;
        assert!(later.get(a.as_tensor()).is_some());
        // The online adapter moves to (3, 2): offline = 0.99 (1, 2) + 0.01 (3, 2).
        a.set(&Tensor::new(&[3.0f32, 2.0], &dev)?)?;
        lae.after_step(
            Step {
                index: 10,
                total: 100,
            },
            &later,
            &vars,
        )?;
        let off = lae.offline["l.q_proj.lora_A.default.weight"].to_vec1::<f32>()?;
        assert!(
            (off[0] - 1.02).abs() < 1e-6 && (off[1] - 2.0).abs() < 1e-6,
            "{off:?}"
        );
        let sets = lae.ensemble(&vars)?.unwrap();
        assert_eq!(sets.len(), 2);
        assert_eq!(sets[1]["projector.weight"].to_vec1::<f32>()?, vec![5.0]);
        Ok(())
    }
}
