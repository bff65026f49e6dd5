//! The one training loop of the project ([`fit`]): AdamW with clipping and a warmup-cosine
//! schedule, a method's step hooks, a NaN/Inf check that stops naming the step, and a progress
//! bar. [`train`] feeds it seeded, bucketed batches of examples; pretraining phases and the
//! scorer feed it losses of their own ([`LossFn`]).

use crate::checkpoint::{CheckpointError, Checkpointing};
use crate::data::Examples;
use crate::method::{Hooks, Step, Vars};
use crate::optim::{lr_at, AdamW, AdamWConfig};
use candle_core::Tensor;
use cnext_adapters::Ctx;
use cnext_backbones::{Backbone, BatchShape, Example};
use cnext_datasets::rng::Rng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Instant;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub steps: usize,
    pub batch_size: usize,
    pub optim: AdamWConfig,
    pub seed: u64,
    /// Train this many passes over the examples instead of `steps` (the paper profile's
    /// recipe: each task gets its own number of steps). Absent from keys when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epochs: Option<usize>,
}

impl TrainConfig {
    /// The optimizer steps for `examples` examples: `epochs` passes of `batch_size`, else
    /// `steps`.
    pub fn steps_for(&self, examples: usize) -> usize {
        match self.epochs {
            Some(e) => e * examples.div_ceil(self.batch_size.max(1)),
            None => self.steps,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageStats {
    pub steps: usize,
    /// Mean loss over the first and last (up to) 10 steps.
    pub first_loss: f64,
    pub last_loss: f64,
    pub seconds: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{label}: step {step}: loss is {loss} (not finite); stopping the stage")]
    NonFinite {
        label: String,
        step: usize,
        loss: f32,
    },
    #[error("{label}: no training examples")]
    Empty { label: String },
    #[error("{label}: {source}")]
    Checkpoint {
        label: String,
        source: CheckpointError,
    },
    #[error("{label}: step {step}: {source}")]
    Candle {
        label: String,
        step: usize,
        source: candle_core::Error,
    },
}

/// The mean over `batch` of each example's squared gradient, per variable (the diagonal
/// empirical Fisher; one backward per example).
pub fn per_sample_fisher(
    backbone: &dyn Backbone,
    vars: &Vars,
    batch: &[Example],
    ctx: Ctx,
) -> candle_core::Result<BTreeMap<String, candle_core::Tensor>> {
    let mut sums: BTreeMap<String, candle_core::Tensor> = BTreeMap::new();
    for ex in batch {
        let g = backbone.loss(std::slice::from_ref(ex), ctx)?.backward()?;
        for (name, v) in vars {
            if let Some(gi) = g.get(v.as_tensor()) {
                let sq = gi.detach().sqr()?;
                let s = match sums.remove(name) {
                    Some(s) => (s + sq)?,
                    None => sq,
                };
                sums.insert(name.clone(), s);
            }
        }
    }
    let n = batch.len().max(1) as f64;
    sums.into_iter().map(|(k, s)| Ok((k, (s / n)?))).collect()
}

/// What [`fit`] trains on, one batch per step.
pub trait Objective {
    /// The loss of step `step`'s batch.
    fn loss(&mut self, step: usize, ctx: Ctx) -> candle_core::Result<Tensor>;
    /// The diagonal empirical Fisher of the batch `loss` last drew (asked for only when a
    /// hook wants it).
    fn per_sample_fisher(
        &mut self,
        _vars: &Vars,
        _ctx: Ctx,
    ) -> candle_core::Result<BTreeMap<String, Tensor>> {
        candle_core::bail!("this objective has no per-sample gradients")
    }
    /// Where the objective's stream of batches is (for checkpoints); `seek` returns to it.
    fn position(&self) -> candle_core::Result<BTreeMap<String, Tensor>> {
        Ok(BTreeMap::new())
    }
    fn seek(&mut self, _position: BTreeMap<String, Tensor>) -> candle_core::Result<()> {
        Ok(())
    }
}

/// An objective from a closure over the step index.
pub struct LossFn<F>(pub F);

impl<F: FnMut(usize) -> candle_core::Result<Tensor>> Objective for LossFn<F> {
    fn loss(&mut self, step: usize, _ctx: Ctx) -> candle_core::Result<Tensor> {
        (self.0)(step)
    }
}

/// How long and how [`fit`] optimises; `label` names the run in errors and the progress bar.
#[derive(Debug, Clone, Copy)]
pub struct FitConfig<'a> {
    pub label: &'a str,
    pub steps: usize,
    pub optim: &'a AdamWConfig,
    /// Seeds each step's [`Ctx`] (dropout-like noise of adapters).
    pub seed: u64,
    pub progress: bool,
    /// Mid-stage checkpoints (resumed from when the file exists).
    pub checkpoint: Option<&'a Checkpointing>,
}

/// Optimises `vars` on `objective` for `cfg.steps` steps, calling `hooks` (`&mut ()` for
/// none); returns every step's loss.
pub fn fit(
    cfg: &FitConfig,
    vars: &Vars,
    objective: &mut dyn Objective,
    hooks: &mut dyn Hooks,
) -> Result<Vec<f64>, TrainError> {
    let label = cfg.label;
    let mut opt = AdamW::new(cfg.optim.clone());
    let bar = if cfg.progress {
        let b = indicatif::ProgressBar::new(cfg.steps as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix} [{bar:30}] {pos}/{len} {msg} ({elapsed}<{eta})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b.set_prefix(label.to_string());
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    // Without a terminal (CI logs, `2> file`) the bar draws nothing: a plain line every
    // tenth of the run (at least every 50 steps apart) and at the end shows progress instead.
    let plain = cfg.progress && !std::io::IsTerminal::is_terminal(&std::io::stderr());
    let every = (cfg.steps / 10).max(50);
    let ck_err = |source| TrainError::Checkpoint {
        label: label.into(),
        source,
    };
    let mut start = 0;
    let mut losses = Vec::with_capacity(cfg.steps);
    if let Some(c) = cfg.checkpoint {
        if let Some(r) = c
            .resume(cfg.steps, vars, &mut opt, objective, hooks)
            .map_err(ck_err)?
        {
            eprintln!(
                "{label}: resumed at step {}/{} from {}",
                r.step,
                cfg.steps,
                c.path.display()
            );
            start = r.step;
            losses = r.losses;
            bar.set_position(start as u64);
        }
    }
    let t0 = Instant::now();
    for step in start..cfg.steps {
        let err = |source| TrainError::Candle {
            label: label.into(),
            step,
            source,
        };
        let ctx = Ctx {
            train: true,
            step_seed: cfg.seed.wrapping_mul(1_000_003).wrapping_add(step as u64),
        };
        let loss = objective.loss(step, ctx).map_err(err)?;
        let loss = hooks.loss(loss, vars).map_err(err)?;
        let lv = loss.to_scalar::<f32>().map_err(err)?;
        if !lv.is_finite() {
            return Err(TrainError::NonFinite {
                label: label.into(),
                step,
                loss: lv,
            });
        }
        let mut grads = loss.backward().map_err(err)?;
        if hooks.wants_per_sample_fisher() {
            let f = objective.per_sample_fisher(vars, ctx).map_err(err)?;
            hooks.per_sample_fisher(f).map_err(err)?;
        }
        let at = Step {
            index: step,
            total: cfg.steps,
        };
        hooks.adjust_grads(at, &mut grads, vars).map_err(err)?;
        let norm = AdamW::grad_norm(vars, &grads).map_err(err)?;
        let scale = if norm > cfg.optim.grad_clip {
            cfg.optim.grad_clip / norm
        } else {
            1.0
        };
        let lr = lr_at(cfg.optim, step, cfg.steps);
        opt.step(vars, &grads, lr, scale).map_err(err)?;
        hooks.after_step(at, &grads, vars).map_err(err)?;
        losses.push(f64::from(lv));
        bar.inc(1);
        if step % 10 == 0 {
            bar.set_message(format!("loss {lv:.4}"));
        }
        let done = step + 1;
        if let Some(c) = cfg.checkpoint {
            if c.every > 0 && done % c.every == 0 && done < cfg.steps {
                c.save(done, cfg.steps, &losses, vars, &opt, objective, hooks)
                    .map_err(ck_err)?;
            }
            if c.abort_after == Some(done) {
                std::process::abort();
            }
        }
        if plain && (done % every == 0 || done == cfg.steps) {
            let secs = t0.elapsed().as_secs_f64();
            let rate = (done - start) as f64 / secs.max(1e-9);
            eprintln!(
                "{label}: step {done}/{} loss {lv:.4}, {rate:.2} steps/s, eta {:.0} s",
                cfg.steps,
                (cfg.steps - done) as f64 / rate
            );
        }
    }
    bar.finish_and_clear();
    Ok(losses)
}

/// Mean loss over the first and the last (up to) 10 steps.
pub fn head_tail(losses: &[f64]) -> (f64, f64) {
    let k = losses.len().min(10);
    let mean = |s: &[f64]| {
        if s.is_empty() {
            f64::NAN
        } else {
            s.iter().sum::<f64>() / s.len() as f64
        }
    };
    (mean(&losses[..k]), mean(&losses[losses.len() - k..]))
}

/// Seeded batches of examples, each from one bucket of examples of one processed shape (image
/// size, answer kind): padding to the longest sequence of a mixed batch more than doubled the
/// cost of a step. Buckets are picked in proportion to their size. Examples are read from
/// `examples` as batches need them.
struct Batches<'a> {
    backbone: &'a dyn Backbone,
    examples: &'a dyn Examples,
    batch_size: usize,
    rng: Rng,
    buckets: Vec<(Vec<u32>, usize)>,
    last: Vec<Example>,
}

impl<'a> Batches<'a> {
    fn new(
        backbone: &'a dyn Backbone,
        examples: &'a dyn Examples,
        cfg: &TrainConfig,
        label: &str,
    ) -> Self {
        let mut rng = Rng::derive(cfg.seed, label);
        let mut buckets: BTreeMap<BatchShape, Vec<u32>> = BTreeMap::new();
        for i in 0..examples.len() {
            let shape = backbone.batch_shape(examples.shape(i));
            buckets.entry(shape).or_default().push(i as u32);
        }
        let mut buckets: Vec<(Vec<u32>, usize)> = buckets.into_values().map(|v| (v, 0)).collect();
        for (b, _) in buckets.iter_mut() {
            rng.shuffle(b);
        }
        Batches {
            backbone,
            examples,
            batch_size: cfg.batch_size,
            rng,
            buckets,
            last: vec![],
        }
    }
}

fn data_err(e: cnext_datasets::loader::DataError) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

impl Objective for Batches<'_> {
    fn loss(&mut self, _step: usize, ctx: Ctx) -> candle_core::Result<Tensor> {
        let mut pick = self.rng.below(self.examples.len());
        let mut which = 0;
        for (k, (b, _)) in self.buckets.iter().enumerate() {
            if pick < b.len() {
                which = k;
                break;
            }
            pick -= b.len();
        }
        let (order, cursor) = &mut self.buckets[which];
        self.last.clear();
        for _ in 0..self.batch_size.min(order.len()) {
            if *cursor == order.len() {
                self.rng.shuffle(order);
                *cursor = 0;
            }
            let ex = self
                .examples
                .get(order[*cursor] as usize)
                .map_err(data_err)?;
            self.last.push(ex);
            *cursor += 1;
        }
        self.backbone.loss(&self.last, ctx)
    }

    fn per_sample_fisher(
        &mut self,
        vars: &Vars,
        ctx: Ctx,
    ) -> candle_core::Result<BTreeMap<String, Tensor>> {
        per_sample_fisher(self.backbone, vars, &self.last, ctx)
    }

    fn position(&self) -> candle_core::Result<BTreeMap<String, Tensor>> {
        let cpu = candle_core::Device::Cpu;
        let mut out = BTreeMap::new();
        out.insert(
            "rng".to_string(),
            Tensor::new(&[self.rng.state() as i64], &cpu)?,
        );
        for (k, (order, cursor)) in self.buckets.iter().enumerate() {
            out.insert(
                format!("bucket{k}.order"),
                Tensor::from_slice(order, order.len(), &cpu)?,
            );
            out.insert(
                format!("bucket{k}.cursor"),
                Tensor::new(&[*cursor as i64], &cpu)?,
            );
        }
        Ok(out)
    }

    fn seek(&mut self, mut position: BTreeMap<String, Tensor>) -> candle_core::Result<()> {
        let mut take = |k: &str| {
            position
                .remove(k)
                .ok_or_else(|| candle_core::Error::Msg(format!("data position: no `{k}`")))
        };
        let one = |t: Tensor| -> candle_core::Result<i64> {
            t.to_vec1::<i64>()?
                .first()
                .copied()
                .ok_or_else(|| candle_core::Error::Msg("data position: empty counter".into()))
        };
        self.rng = Rng::new(one(take("rng")?)? as u64);
        for k in 0..self.buckets.len() {
            let order = take(&format!("bucket{k}.order"))?.to_vec1::<u32>()?;
            let cursor = one(take(&format!("bucket{k}.cursor"))?)? as usize;
            let (o, c) = &mut self.buckets[k];
            let mut a = order.clone();
            let mut b = o.clone();
            a.sort_unstable();
            b.sort_unstable();
            if a != b || cursor > order.len() {
                candle_core::bail!("data position: bucket {k} is not this data's");
            }
            *o = order;
            *c = cursor;
        }
        if let Some(k) = position.keys().next() {
            candle_core::bail!("data position: unexpected `{k}` (other data)");
        }
        Ok(())
    }
}

/// Trains `vars` (the backbone's trainable variables) on `examples`, calling a method's step
/// hooks (`&mut ()` for none). `label` names the stage in errors and the progress bar, and
/// the shuffle stream; with `checkpoint`, the stage resumes from and writes checkpoints.
#[allow(clippy::too_many_arguments)]
pub fn train(
    backbone: &dyn Backbone,
    vars: &Vars,
    examples: &dyn Examples,
    cfg: &TrainConfig,
    label: &str,
    progress: bool,
    checkpoint: Option<&Checkpointing>,
    hooks: &mut dyn Hooks,
) -> Result<StageStats, TrainError> {
    if examples.is_empty() {
        return Err(TrainError::Empty {
            label: label.into(),
        });
    }
    let start = Instant::now();
    let mut batches = Batches::new(backbone, examples, cfg, label);
    let steps = cfg.steps_for(examples.len());
    let fc = FitConfig {
        label,
        steps,
        optim: &cfg.optim,
        seed: cfg.seed,
        progress,
        checkpoint,
    };
    let losses = fit(&fc, vars, &mut batches, hooks)?;
    let (first_loss, last_loss) = head_tail(&losses);
    Ok(StageStats {
        steps,
        first_loss,
        last_loss,
        seconds: start.elapsed().as_secs_f64(),
    })
}
