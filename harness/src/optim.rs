//! AdamW (Loshchilov & Hutter, decoupled weight decay) with the paper's betas/eps/weight decay,
//! global-norm gradient clipping, and a cosine schedule with linear warmup and a floor. The
//! harness owns it; methods never step parameters themselves. State is kept per variable name
//! (BTreeMap) so it can be cached with a stage and so frozen variables keep untouched state.

use candle_core::{backprop::GradStore, Result, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub grad_clip: f64,
    pub warmup_ratio: f64,
    pub min_lr_ratio: f64,
    /// Learning-rate multipliers by variable-name prefix (the longest matching prefix wins;
    /// others get 1). LLaVA-1.5's LoRA recipe trains its projector at 1/10 of the adapter
    /// rate (`mm_projector_lr`); left out of the file (and of cache keys) when empty.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub lr_scale: BTreeMap<String, f64>,
}

impl Default for AdamWConfig {
    /// The paper's optimizer (lr is the profile's choice).
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-6,
            weight_decay: 0.05,
            grad_clip: 1.0,
            warmup_ratio: 0.03,
            min_lr_ratio: 0.05,
            lr_scale: BTreeMap::new(),
        }
    }
}

impl AdamWConfig {
    /// The multiplier of the variable `name` (see `lr_scale`).
    pub fn scale_of(&self, name: &str) -> f64 {
        self.lr_scale
            .iter()
            .filter(|(p, _)| name.starts_with(p.as_str()))
            .max_by_key(|(p, _)| p.len())
            .map_or(1.0, |(_, s)| *s)
    }
}

/// Learning rate at `step` (0-based) of `total`: linear warmup, then cosine down to
/// `min_lr_ratio * lr`.
pub fn lr_at(cfg: &AdamWConfig, step: usize, total: usize) -> f64 {
    let warm = ((total as f64) * cfg.warmup_ratio).ceil().max(1.0) as usize;
    if step < warm {
        return cfg.lr * (step + 1) as f64 / warm as f64;
    }
    let span = (total.saturating_sub(warm)).max(1) as f64;
    let p = ((step - warm) as f64 / span).min(1.0);
    let min = cfg.lr * cfg.min_lr_ratio;
    min + (cfg.lr - min) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos())
}

struct Moments {
    m: Tensor,
    v: Tensor,
    t: u64,
}

pub struct AdamW {
    pub cfg: AdamWConfig,
    state: BTreeMap<String, Moments>,
}

impl AdamW {
    pub fn new(cfg: AdamWConfig) -> Self {
        AdamW {
            cfg,
            state: BTreeMap::new(),
        }
    }

    /// The moments of every variable stepped so far (`m.<name>`, `v.<name>`, and the step
    /// count `t.<name>`), for checkpoints.
    pub fn state(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        for (name, s) in &self.state {
            out.insert(format!("m.{name}"), s.m.clone());
            out.insert(format!("v.{name}"), s.v.clone());
            out.insert(
                format!("t.{name}"),
                Tensor::new(&[s.t as i64], &candle_core::Device::Cpu)?,
            );
        }
        Ok(out)
    }

    /// Replaces the moments with a [`AdamW::state`].
    pub fn load_state(&mut self, mut state: BTreeMap<String, Tensor>) -> Result<()> {
        self.state.clear();
        let names: Vec<String> = state
            .keys()
            .filter_map(|k| k.strip_prefix("t.").map(str::to_string))
            .collect();
        for name in names {
            let mut take = |p: &str| {
                state.remove(&format!("{p}.{name}")).ok_or_else(|| {
                    candle_core::Error::msg(format!("optimizer state: no {p}.{name}"))
                })
            };
            let t = take("t")?.to_vec1::<i64>()?;
            let (m, v) = (take("m")?, take("v")?);
            let t = t.first().copied().unwrap_or(0) as u64;
            self.state.insert(name, Moments { m, v, t });
        }
        if let Some(k) = state.keys().next() {
            candle_core::bail!("optimizer state: unexpected `{k}`");
        }
        Ok(())
    }

    /// Global L2 norm of the gradients of `vars`.
    pub fn grad_norm(vars: &BTreeMap<String, Var>, grads: &GradStore) -> Result<f64> {
        let mut sq = 0f64;
        for v in vars.values() {
            if let Some(g) = grads.get(v.as_tensor()) {
                sq += f64::from(g.sqr()?.sum_all()?.to_scalar::<f32>()?);
            }
        }
        Ok(sq.sqrt())
    }

    /// One step over `vars` with learning rate `lr`. A variable without a gradient (frozen by
    /// a method) is skipped entirely: no parameter change and no moment update.
    pub fn step(
        &mut self,
        vars: &BTreeMap<String, Var>,
        grads: &GradStore,
        lr: f64,
        clip_scale: f64,
    ) -> Result<()> {
        let c = &self.cfg;
        for (name, var) in vars {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            // A gradient still references the step's forward graph; folded into the moments
            // undetached, it would keep every step's graph alive (memory grows without bound).
            let g = g.detach();
            let g = if clip_scale < 1.0 {
                (g * clip_scale)?
            } else {
                g
            };
            let st = match self.state.get_mut(name) {
                Some(s) => s,
                None => {
                    let z = var.as_tensor().zeros_like()?;
                    self.state.entry(name.clone()).or_insert(Moments {
                        m: z.clone(),
                        v: z,
                        t: 0,
                    })
                }
            };
            st.t += 1;
            st.m = ((&st.m * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            st.v = ((&st.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let mh = (&st.m / (1.0 - c.beta1.powi(st.t as i32)))?;
            let vh = (&st.v / (1.0 - c.beta2.powi(st.t as i32)))?;
            let upd = (mh / (vh.sqrt()? + c.eps)?)?;
            let theta = var.as_tensor();
            let lr = lr * c.scale_of(name);
            let new = ((theta * (1.0 - lr * c.weight_decay))? - (upd * lr)?)?;
            var.set(&new)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedule_warms_up_then_decays_to_the_floor() {
        let c = AdamWConfig {
            lr: 1.0,
            warmup_ratio: 0.1,
            ..Default::default()
        };
        assert!((lr_at(&c, 0, 100) - 0.1).abs() < 1e-12);
        assert!((lr_at(&c, 9, 100) - 1.0).abs() < 1e-12);
        assert!((lr_at(&c, 10, 100) - 1.0).abs() < 1e-12);
        assert!((lr_at(&c, 99, 100) - 0.05).abs() < 0.01);
        assert!(lr_at(&c, 50, 100) < 1.0 && lr_at(&c, 50, 100) > 0.05);
    }

    #[test]
    fn first_step_matches_the_closed_form() {
        // After one step, m_hat = g and v_hat = g^2, so theta' = theta (1 - lr wd) - lr g/(|g|+eps).
        let v = Var::from_tensor(&Tensor::new(&[1.0f32, -2.0], &Device::Cpu).unwrap()).unwrap();
        let loss = (v.as_tensor() * 3.0).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let mut vars = BTreeMap::new();
        vars.insert("w".to_string(), v.clone());
        let mut opt = AdamW::new(AdamWConfig::default());
        opt.step(&vars, &grads, 0.1, 1.0).unwrap();
        let got = v.as_tensor().to_vec1::<f32>().unwrap();
        let want = |t: f64| t * (1.0 - 0.1 * 0.05) - 0.1 * 3.0 / (3.0 + 1e-6);
        assert!((f64::from(got[0]) - want(1.0)).abs() < 1e-6);
        assert!((f64::from(got[1]) - want(-2.0)).abs() < 1e-6);
    }

    #[test]
    fn lr_scale_takes_the_longest_prefix_and_scales_the_step() {
        let c = AdamWConfig {
            lr_scale: BTreeMap::from([("proj".to_string(), 0.5), ("projector.".to_string(), 0.1)]),
            ..Default::default()
        };
        assert_eq!(c.scale_of("projector.weight"), 0.1);
        assert_eq!(c.scale_of("proj_x"), 0.5);
        assert_eq!(c.scale_of("layers.0.q_proj.lora_A.default.weight"), 1.0);
        // The same gradient moves a scaled variable by exactly its share (weight decay off).
        let mk = || Var::from_tensor(&Tensor::new(&[1.0f32], &Device::Cpu).unwrap()).unwrap();
        let (a, p) = (mk(), mk());
        let loss = (a.as_tensor() + p.as_tensor()).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let vars = BTreeMap::from([
            ("a".to_string(), a.clone()),
            ("projector.w".to_string(), p.clone()),
        ]);
        let mut opt = AdamW::new(AdamWConfig {
            weight_decay: 0.0,
            ..c
        });
        opt.step(&vars, &grads, 0.1, 1.0).unwrap();
        let moved = |v: &Var| 1.0 - f64::from(v.as_tensor().to_vec1::<f32>().unwrap()[0]);
        assert!((moved(&a) - 0.1).abs() < 1e-6, "{}", moved(&a));
        assert!((moved(&p) - 0.01).abs() < 1e-6, "{}", moved(&p));
    }

    #[test]
    fn an_empty_lr_scale_stays_out_of_the_file() {
        // Cache keys hash the config: configs without multipliers keep their old keys.
        let json = serde_json::to_string(&AdamWConfig::default()).unwrap();
        assert!(!json.contains("lr_scale"), "{json}");
        let back: AdamWConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, AdamWConfig::default());
    }
}
