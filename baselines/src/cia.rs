//! CIA / DEMA ("Continual Instruction Assistant", ICML 2025), without instruction grouping as
//! in Continual-NExT. After every optimizer step, per trainable tensor:
//! `a = ||theta - theta*||_1`, `b = ||g||_1`, `c = ||g - g_prev||_1`,
//! `beta = 2 (1 + b) / (a c)`, falling back to `fallback` (0.01) when beta is not in (0, 1) or
//! not finite; `theta* <- (1 - beta) theta* + beta theta`. theta* starts as the parameters at
//! the stage start; at the end of the stage the model takes theta*. g_prev starts at zero.

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor};
use cnext_backbones::Backbone;
use cnext_harness::data::Examples;
use cnext_harness::method::{
    prefixed, take_prefixed, typed, unexpected, Hooks, Method, MethodEntry, StageInfo, Step, Vars,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const ENTRY: MethodEntry = MethodEntry {
    id: "cia",
    about: "dynamic EMA of the weights (DEMA) with a gradient-derived rate",
    new: || Box::new(Cia::new(CiaConfig::default())),
    configure: |v| typed(v, |c: CiaConfig| Box::new(Cia::new(c)) as Box<dyn Method>),
};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CiaConfig {
    /// The rate used when the derived beta is outside (0, 1) or not finite.
    pub fallback: f64,
}

impl Default for CiaConfig {
    fn default() -> Self {
        CiaConfig { fallback: 0.01 }
    }
}

/// DEMA's rate from the three L1 norms.
pub fn dema_beta(a: f64, b: f64, c: f64, fallback: f64) -> f64 {
    let beta = 2.0 * (1.0 + b) / (a * c);
    if beta.is_finite() && beta > 0.0 && beta < 1.0 {
        beta
    } else {
        fallback
    }
}

fn l1(t: &Tensor) -> Result<f64> {
    Ok(f64::from(t.abs()?.sum_all()?.to_scalar::<f32>()?))
}

/// One DEMA update of `star` towards `theta` with gradient `g` (previous `g_prev`): the new
/// theta* and the beta used.
pub fn dema_update(
    star: &Tensor,
    theta: &Tensor,
    g: &Tensor,
    g_prev: &Tensor,
    fallback: f64,
) -> Result<(Tensor, f64)> {
    let a = l1(&(theta - star)?)?;
    let b = l1(g)?;
    let c = l1(&(g - g_prev)?)?;
    let beta = dema_beta(a, b, c, fallback);
    let next = ((star * (1.0 - beta))? + (theta * beta)?)?;
    Ok((next, beta))
}

/// DEMA's running state over a set of variables (CIA uses every trainable one, MAGE's
/// `mage_dema` the trained experts' LoRA matrices).
#[derive(Default)]
pub struct Dema {
    star: BTreeMap<String, Tensor>,
    g_prev: BTreeMap<String, Tensor>,
}

impl Dema {
    /// theta* = the current values of the `vars` that `keep` selects; g_prev = 0.
    pub fn start(&mut self, vars: &Vars, keep: impl Fn(&str) -> bool) -> Result<()> {
        self.star = vars
            .iter()
            .filter(|(k, _)| keep(k))
            .map(|(k, v)| Ok((k.clone(), v.as_tensor().detach().copy()?)))
            .collect::<Result<_>>()?;
        self.g_prev.clear();
        Ok(())
    }

    /// One DEMA update of every tracked variable that has a gradient.
    pub fn after_step(&mut self, grads: &GradStore, vars: &Vars, fallback: f64) -> Result<()> {
        for (name, v) in vars {
            let (Some(g), Some(star)) = (grads.get(v.as_tensor()), self.star.get(name)) else {
                continue;
            };
            let g = g.detach();
            let prev = match self.g_prev.get(name) {
                Some(p) => p.clone(),
                None => g.zeros_like()?,
            };
            let (next, _) = dema_update(star, &v.as_tensor().detach(), &g, &prev, fallback)?;
            self.star.insert(name.clone(), next);
            self.g_prev.insert(name.clone(), g);
        }
        Ok(())
    }

    /// theta* and the last gradients, for a mid-stage checkpoint.
    pub fn step_state(&self) -> BTreeMap<String, Tensor> {
        let mut out = prefixed("star.", &self.star);
        out.extend(prefixed("g_prev.", &self.g_prev));
        out
    }

    /// Back to a [`Dema::step_state`] (the entries it does not know are left in `state`).
    pub fn load_step_state(&mut self, state: &mut BTreeMap<String, Tensor>) {
        self.star = take_prefixed("star.", state);
        self.g_prev = take_prefixed("g_prev.", state);
    }

    /// theta* by variable name, ending the stage's state.
    pub fn finish(&mut self) -> BTreeMap<String, Tensor> {
        self.g_prev.clear();
        std::mem::take(&mut self.star)
    }
}

pub struct Cia {
    pub cfg: CiaConfig,
    dema: Dema,
}

impl Cia {
    pub fn new(cfg: CiaConfig) -> Self {
        Cia {
            cfg,
            dema: Dema::default(),
        }
    }
}

impl Hooks for Cia {
    fn after_step(&mut self, _step: Step, grads: &GradStore, vars: &Vars) -> Result<()> {
        self.dema.after_step(grads, vars, self.cfg.fallback)
    }
    fn step_state(&self) -> Result<BTreeMap<String, Tensor>> {
        Ok(self.dema.step_state())
    }
    fn load_step_state(&mut self, mut state: BTreeMap<String, Tensor>) -> Result<()> {
        self.dema.load_step_state(&mut state);
        unexpected(&state)
    }
}

impl Method for Cia {
    fn id(&self) -> &'static str {
        ENTRY.id
    }
    fn config(&self) -> std::result::Result<serde_json::Value, serde_json::Error> {
        serde_json::to_value(&self.cfg)
    }
    fn shares_first_stage(&self) -> bool {
        // The paper's protocol: stage 1 is plain training; DEMA starts with stage 2 (with no
        // theta* from stage 1, the replayed stage-1 `end_task` changes nothing).
        true
    }
    fn begin_task(&mut self, _stage: StageInfo, vars: &Vars) -> Result<()> {
        self.dema.start(vars, |_| true)
    }
    fn end_task(
        &mut self,
        _stage: StageInfo,
        _model: &dyn Backbone,
        vars: &Vars,
        _train: &dyn Examples,
    ) -> Result<()> {
        for (name, star) in self.dema.finish() {
            if let Some(v) = vars.get(&name) {
                v.set(&star)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn beta_by_hand_and_its_fallback() {
        // a = 40, b = 3, c = 2: beta = 2 * 4 / 80 = 0.1.
        assert!((dema_beta(40.0, 3.0, 2.0, 0.01) - 0.1).abs() < 1e-12);
        // beta >= 1, a = 0 (inf), c = 0 (inf) and NaN all fall back.
        assert_eq!(dema_beta(1.0, 3.0, 2.0, 0.01), 0.01);
        assert_eq!(dema_beta(0.0, 3.0, 2.0, 0.01), 0.01);
        assert_eq!(dema_beta(10.0, 3.0, 0.0, 0.01), 0.01);
        assert_eq!(dema_beta(f64::NAN, 3.0, 2.0, 0.01), 0.01);
    }

    #[test]
    fn update_matches_the_dense_rule() -> Result<()> {
        let dev = Device::Cpu;
        let star = Tensor::new(&[0.0f32, 0.0, 0.0, 0.0], &dev)?;
        let theta = Tensor::new(&[10.0f32, -10.0, 10.0, -10.0], &dev)?;
        let g = Tensor::new(&[0.5f32, 0.5, -0.5, 0.5], &dev)?;
        let g_prev = Tensor::new(&[0.0f32, 0.0, 0.0, 0.25], &dev)?;
        // a = 40, b = 2, c = 0.5 + 0.5 + 0.5 + 0.25 = 1.75: beta = 6 / 70.
        let (next, beta) = dema_update(&star, &theta, &g, &g_prev, 0.01)?;
        let want = 6.0 / 70.0;
        assert!((beta - want).abs() < 1e-6, "{beta}");
        let v = next.to_vec1::<f32>()?;
        assert!((f64::from(v[0]) - 10.0 * want).abs() < 1e-5);
        assert!((f64::from(v[1]) + 10.0 * want).abs() < 1e-5);
        Ok(())
    }

    #[test]
    fn the_model_takes_theta_star_at_the_end_of_the_stage() -> Result<()> {
        let dev = Device::Cpu;
        let w = Var::from_tensor(&Tensor::new(&[1.0f32, 2.0], &dev)?)?;
        let vars: Vars = [("w".to_string(), w.clone())].into_iter().collect();
        let mut cia = Cia::new(CiaConfig::default());
        let info = StageInfo {
            stage: 2,
            task: cnext_core::TaskId::Imagenet,
            order: &[],
            seed: 0,
        };
        cia.begin_task(info, &vars)?;
        // One "step": w moves, and the gradient store holds a gradient for w.
        w.set(&Tensor::new(&[3.0f32, 2.0], &dev)?)?;
        let grads = (w.as_tensor() * 1.0)?.sum_all()?.backward()?;
        cia.after_step(Step { index: 0, total: 1 }, &grads, &vars)?;
        // a = 2, b = 2, c = 2: beta = 6 / 4 >= 1, so the fallback 0.01 applies.
        let m = crate::testing::Linear2::new(&[0.0, 0.0])?;
        cia.end_task(info, &m, &vars, &Vec::new())?;
        let got = w.as_tensor().to_vec1::<f32>()?;
        assert!((got[0] - (0.99 + 0.03)).abs() < 1e-6, "{got:?}");
        assert!((got[1] - 2.0).abs() < 1e-6);
        Ok(())
    }
}
