//! A two-parameter model behind the `Backbone` trait, for the methods' unit tests:
//! `loss = mean_n (w . x_n - y_n)^2`, with `x_n` and `y_n` read from the prompt text.

use candle_core::{Device, Result, Tensor, Var};
use cnext_adapters::Ctx;
use cnext_backbones::{Backbone, Example, Output, OutputKind, Prompt, Target};
use std::collections::BTreeMap;

pub struct Linear2 {
    pub w: Var,
}

impl Linear2 {
    pub fn new(w: &[f32; 2]) -> Result<Self> {
        Ok(Linear2 {
            w: Var::from_tensor(&Tensor::new(w, &Device::Cpu)?)?,
        })
    }

    pub fn vars(&self) -> BTreeMap<String, Var> {
        [("w".to_string(), self.w.clone())].into_iter().collect()
    }

    pub fn examples(data: &[([f64; 2], f64)]) -> Vec<Example> {
        data.iter()
            .map(|(x, y)| Example {
                prompt: Prompt {
                    image: None,
                    text: format!("{} {}", x[0], x[1]),
                },
                target: Target::Text(y.to_string()),
            })
            .collect()
    }
}

impl Backbone for Linear2 {
    fn loss(&self, batch: &[Example], _ctx: Ctx) -> Result<Tensor> {
        let mut total: Option<Tensor> = None;
        for e in batch {
            let x: Vec<f32> = e
                .prompt
                .text
                .split(' ')
                .map(|v| v.parse().unwrap_or(0.0))
                .collect();
            let y: f32 = match &e.target {
                Target::Text(t) => t.parse().unwrap_or(0.0),
                Target::Image(_) => 0.0,
            };
            let x = Tensor::new(x.as_slice(), &Device::Cpu)?;
            let r = ((self.w.as_tensor() * x)?.sum_all()? - f64::from(y))?;
            let l = r.sqr()?;
            total = Some(match total {
                Some(t) => (t + l)?,
                None => l,
            });
        }
        match total {
            Some(t) => t / batch.len() as f64,
            None => candle_core::bail!("empty batch"),
        }
    }

    fn generate(&self, _p: &[Prompt], _k: OutputKind, _n: usize) -> Result<Vec<Output>> {
        candle_core::bail!("Linear2 does not generate")
    }

    fn trainable(&self) -> BTreeMap<String, Var> {
        self.vars()
    }
}
