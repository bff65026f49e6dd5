//! `cnext bench step`: one training step of the profile's base (forward with the loss,
//! backward, clipping + AdamW), timed phase by phase on one fixed batch of each kind: a text
//! batch (vqav2: image in, text out) and an image batch (flickr30k: text in, VQ codes out).
//! LoRA and MAGE's stacked experts run interleaved step by step so every row sees the same
//! machine state; each figure is the median over `steps` steps after three warm-up steps.
//!
//! `--dump DIR` also writes each batch as the model sees it (`<task>.safetensors`: token ids,
//! patch pixels, gather indices, labels) and `weights.safetensors` (the base and the LoRA
//! initialisation), which `bench/step_replica.py` runs through the same computation in
//! PyTorch, printing the same table.

use anyhow::{Context, Result};
use cnext_adapters::{AdapterPlan, Ctx, LoraConfig};
use cnext_backbones::{BatchShape, Example};
use cnext_core::TaskId;
use cnext_harness::optim::{lr_at, AdamW};
use comfy_table::Table;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

/// Milliseconds of each phase of one step.
#[derive(Default, Clone, Copy)]
struct Phases {
    forward: f64,
    backward: f64,
    optim: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The first `batch` examples of the task that share one batch shape (as training draws them).
fn fixed_batch(
    bench: &cnext_suite::setup::Bench,
    task: TaskId,
    batch: usize,
) -> Result<Vec<Example>> {
    let data = cnext_datasets::loader::load_task(&bench.data_root, task)?;
    let examples = cnext_harness::tasks::train_examples(&data)?;
    let probe = bench.base.build(AdapterPlan::none())?;
    let mut groups: BTreeMap<String, Vec<Example>> = BTreeMap::new();
    for e in examples {
        let key = format!("{:?}", probe.batch_shape(BatchShape::of(&e)));
        groups.entry(key).or_default().push(e);
    }
    let mut best = groups
        .into_values()
        .max_by_key(Vec::len)
        .with_context(|| format!("{task}: no training examples"))?;
    best.truncate(batch);
    Ok(best)
}

/// One model under test: its backbone, variables and optimizer.
struct Runner {
    name: String,
    task: TaskId,
    backbone: Box<dyn cnext_backbones::Backbone>,
    vars: BTreeMap<String, candle_core::Var>,
    opt: AdamW,
    batch: std::sync::Arc<Vec<Example>>,
    times: Vec<Phases>,
    tokens: Option<usize>,
}

impl Runner {
    fn step(&mut self, i: usize, total: usize) -> Result<Phases> {
        let ctx = Ctx {
            train: true,
            step_seed: i as u64,
        };
        let t0 = Instant::now();
        let loss = self.backbone.loss(&self.batch, ctx)?;
        let lv = loss.to_scalar::<f32>()?;
        let t1 = Instant::now();
        let grads = loss.backward()?;
        let t2 = Instant::now();
        let norm = AdamW::grad_norm(&self.vars, &grads)?;
        let clip = self.opt.cfg.grad_clip;
        let scale = if norm > clip { clip / norm } else { 1.0 };
        let lr = lr_at(&self.opt.cfg, i, total);
        self.opt.step(&self.vars, &grads, lr, scale)?;
        let t3 = Instant::now();
        anyhow::ensure!(lv.is_finite(), "{}: loss {lv} at step {i}", self.name);
        let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
        Ok(Phases {
            forward: ms(t0, t1),
            backward: ms(t1, t2),
            optim: ms(t2, t3),
        })
    }
}

/// Runs the benchmark (see the module doc).
pub fn run(
    profile: cnext_suite::profile::Profile,
    steps: usize,
    dump: Option<&Path>,
) -> Result<()> {
    let cache = crate::cache_dir(None);
    let bench =
        cnext_suite::setup::Bench::open(profile, 0, cache, cnext_harness::device::DeviceSpec::Cpu)?;
    let cfg = bench.run_config(cnext_core::Order::DefaultOrder, 0, None, None);
    let lora = LoraConfig::default();
    let plans = [
        ("lora r=8", AdapterPlan::lora(lora.clone(), 0)),
        ("mage 4 x r=2", AdapterPlan::experts(lora.clone(), 4, 0)),
    ];
    let nano = crate::bench_dump::nano_base(&bench)?;
    let mut runners = vec![];
    for task in [TaskId::Vqav2, TaskId::Flickr30k] {
        let batch = std::sync::Arc::new(fixed_batch(&bench, task, cfg.stage.batch_size)?);
        let tokens = match &nano {
            Some(b) => Some(crate::bench_dump::sequence_len(b, &batch)?),
            None => None,
        };
        if let (Some(dir), Some(b)) = (dump, &nano) {
            crate::bench_dump::batch(b, &plans[0].1, task, &batch, dir)?;
        }
        for (name, plan) in &plans {
            let backbone = bench.base.build(plan.clone())?;
            let vars = backbone.trainable();
            runners.push(Runner {
                name: name.to_string(),
                task,
                backbone,
                vars,
                opt: AdamW::new(cfg.stage.optim.clone()),
                batch: batch.clone(),
                times: vec![],
                tokens,
            });
        }
    }
    if let Some(dir) = dump {
        let b = nano
            .as_ref()
            .context("--dump: the PyTorch replica covers the nano model only")?;
        crate::bench_dump::weights(b, &plans[0].1, &cfg.stage.optim, dir)?;
        eprintln!("wrote the replica's inputs to {}", dir.display());
    }
    let total = steps + 3;
    for i in 0..total {
        for r in runners.iter_mut() {
            let p = r.step(i, total)?;
            if i >= 3 {
                r.times.push(p);
            }
        }
    }
    let mut table = Table::new();
    table.set_header([
        "batch",
        "adapter",
        "batch x tokens",
        "forward ms",
        "backward ms",
        "optimizer ms",
        "step ms",
    ]);
    for r in &runners {
        let m = |f: fn(&Phases) -> f64| median(r.times.iter().map(f).collect());
        table.add_row([
            r.task.to_string(),
            r.name.clone(),
            match r.tokens {
                Some(t) => format!("{} x {t}", r.batch.len()),
                None => r.batch.len().to_string(),
            },
            format!("{:.1}", m(|p| p.forward)),
            format!("{:.1}", m(|p| p.backward)),
            format!("{:.1}", m(|p| p.optim)),
            format!("{:.1}", m(|p| p.forward + p.backward + p.optim)),
        ]);
    }
    println!(
        "{profile} base, {} threads, median of {steps} steps after 3 warm-up steps, interleaved\n{table}",
        candle_core::utils::get_num_threads()
    );
    Ok(())
}
