//! One test per method mechanism, on a smoke-sized model through the harness's own training
//! loop: each fails when its mechanism is switched off (the snapshot suite checks results,
//! these check that every method does what METHODS.md says).
//!
//! A `Spy` wraps a method's hooks and records, at every step, the trainable values before the
//! optimizer step, the gradients it applied and the values after, so expectations are computed
//! by hand from what really happened.

use candle_core::backprop::GradStore;
use candle_core::{Device, Result, Tensor};
use cnext_adapters::{AdapterPlan, Ctx, LoraConfig};
use cnext_backbones::nano::backbone::NanoBackbone;
use cnext_backbones::nano::config::NanoConfig;
use cnext_backbones::nano::tokenizer::Tokenizer;
use cnext_backbones::nano::vq::Codebook;
use cnext_backbones::{Backbone, Example, Prompt, Target};
use cnext_core::TaskId;
use cnext_datasets::rng::Rng;
use cnext_datasets::scene::Scene;
use cnext_datasets::tasks::scene_question;
use cnext_harness::method::{Hooks, Method, StageInfo, Step, Vars};
use cnext_harness::optim::AdamWConfig;
use cnext_harness::train::{train, TrainConfig};
use std::collections::BTreeMap;

type Values = BTreeMap<String, Vec<f32>>;

/// A random smoke-sized model and two small tasks (VQA-like text answers, drawings).
struct Rig {
    cfg: NanoConfig,
    weights: BTreeMap<String, Tensor>,
    tokenizer: Tokenizer,
    codebook: Codebook,
    questions: Vec<Example>,
    drawings: Vec<Example>,
}

impl Rig {
    fn new() -> Self {
        let mut rng = Rng::new(11);
        let questions: Vec<Example> = (0..48)
            .map(|_| {
                let s = Scene::random(&mut rng, 1, 3);
                let (q, a) = scene_question(&s, &mut rng);
                Example {
                    prompt: Prompt {
                        image: Some(s.render()),
                        text: q,
                    },
                    target: Target::Text(a),
                }
            })
            .collect();
        let drawings: Vec<Example> = (0..48)
            .map(|_| {
                let s = Scene::random(&mut rng, 1, 2);
                Example {
                    prompt: Prompt {
                        image: None,
                        text: format!("Please generate the image: {}", s.caption()),
                    },
                    target: Target::Image(s.render()),
                }
            })
            .collect();
        let imgs: Vec<_> = drawings
            .iter()
            .filter_map(|e| match &e.target {
                Target::Image(i) => Some(i.clone()),
                Target::Text(_) => None,
            })
            .collect();
        let codebook = Codebook::learn(&imgs, 32, 4, 0);
        let texts = questions.iter().chain(&drawings).flat_map(|e| {
            let mut v = vec![e.prompt.text.clone()];
            if let Target::Text(t) = &e.target {
                v.push(t.clone());
            }
            v
        });
        let texts: Vec<String> = texts.collect();
        let tokenizer =
            Tokenizer::build(texts.iter().map(String::as_str), 1, codebook.len() as u32);
        let cfg = NanoConfig::smoke(tokenizer.vocab_size());
        let base =
            NanoBackbone::init_pretrain(&cfg, tokenizer.clone(), codebook.clone(), 0, &Device::Cpu)
                .unwrap();
        Rig {
            weights: base.trainable_tensors(),
            cfg,
            tokenizer,
            codebook,
            questions,
            drawings,
        }
    }

    fn model(&self, plan: AdapterPlan) -> NanoBackbone {
        NanoBackbone::from_base(
            &self.cfg,
            &self.weights,
            self.tokenizer.clone(),
            self.codebook.clone(),
            plan,
            &Device::Cpu,
        )
        .unwrap()
    }
}

fn values(vars: &Vars) -> Values {
    vars.iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.as_tensor().flatten_all().unwrap().to_vec1().unwrap(),
            )
        })
        .collect()
}

fn grad_values(grads: &GradStore, vars: &Vars) -> Values {
    vars.iter()
        .filter_map(|(k, v)| {
            let g = grads.get(v.as_tensor())?;
            Some((k.clone(), g.flatten_all().unwrap().to_vec1().unwrap()))
        })
        .collect()
}

/// A method's hooks with a record of every step.
struct Spy<'a> {
    inner: &'a mut dyn Method,
    before: Vec<Values>,
    applied: Vec<Values>,
    after: Vec<Values>,
}

impl<'a> Spy<'a> {
    fn new(inner: &'a mut dyn Method) -> Self {
        Spy {
            inner,
            before: vec![],
            applied: vec![],
            after: vec![],
        }
    }
}

impl Hooks for Spy<'_> {
    fn loss(&mut self, loss: Tensor, vars: &Vars) -> Result<Tensor> {
        self.inner.loss(loss, vars)
    }
    fn adjust_grads(&mut self, step: Step, grads: &mut GradStore, vars: &Vars) -> Result<()> {
        self.before.push(values(vars));
        self.inner.adjust_grads(step, grads, vars)
    }
    fn after_step(&mut self, step: Step, grads: &GradStore, vars: &Vars) -> Result<()> {
        self.applied.push(grad_values(grads, vars));
        self.inner.after_step(step, grads, vars)?;
        self.after.push(values(vars));
        Ok(())
    }
    fn wants_per_sample_fisher(&self) -> bool {
        self.inner.wants_per_sample_fisher()
    }
    fn per_sample_fisher(&mut self, f: BTreeMap<String, Tensor>) -> Result<()> {
        self.inner.per_sample_fisher(f)
    }
}

const ORDER: [TaskId; 6] = TaskId::ALL;

fn info(stage: usize, task: TaskId) -> StageInfo<'static> {
    StageInfo {
        stage,
        task,
        order: &ORDER,
        seed: 0,
    }
}

fn tc(steps: usize) -> TrainConfig {
    TrainConfig {
        steps,
        batch_size: 8,
        optim: AdamWConfig {
            lr: 1e-2,
            ..Default::default()
        },
        seed: 0,
        epochs: None,
    }
}

/// Gives every LoRA B a non-zero value, so every adapter matrix gets a gradient.
fn wake_adapters(vars: &Vars) {
    for (k, v) in vars {
        if k.contains(".lora_B.") {
            let vals = cnext_adapters::normal_values(5, k, v.elem_count(), 0.05);
            v.set(&Tensor::from_vec(vals, v.shape(), v.device()).unwrap())
                .unwrap();
        }
    }
}

/// `method` (with its config overrides) trains stage 1 on the questions without its hooks and
/// ends it, as the harness's shared first stage does; returns the model, ready for stage 2.
fn after_stage_one(
    rig: &Rig,
    id: &str,
    overrides: &[(&str, serde_json::Value)],
) -> (NanoBackbone, Box<dyn Method>) {
    let entry = cnext_baselines::find(id).unwrap();
    let o: BTreeMap<String, serde_json::Value> = overrides
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    let mut m = (entry.with_overrides(&o).unwrap())();
    let model = rig.model(m.adapters(&LoraConfig::default(), 1));
    let vars = model.trainable();
    let first = info(1, TaskId::Vqav2);
    m.begin_task(first, &vars).unwrap();
    train(
        &model,
        &vars,
        &rig.questions,
        &tc(6),
        "s1",
        false,
        None,
        &mut (),
    )
    .unwrap();
    m.end_task(first, &model, &vars, &rig.questions).unwrap();
    (model, m)
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn ewc_penalty_is_positive_at_stage_two_and_moves_the_gradient() {
    let rig = Rig::new();
    for (lambda, expect) in [(15.0, true), (0.0, false)] {
        let (model, mut m) = after_stage_one(&rig, "ewc", &[("lambda", lambda.into())]);
        let vars = model.trainable();
        m.begin_task(info(2, TaskId::Flickr30k), &vars).unwrap();
        // One plain step away from the anchor, then compare the hooked loss and gradient.
        train(
            &model,
            &vars,
            &rig.drawings,
            &tc(2),
            "s2",
            false,
            None,
            &mut (),
        )
        .unwrap();
        let batch = &rig.drawings[..8];
        let plain = model.loss(batch, Ctx::default()).unwrap();
        let hooked = m.loss(plain.clone(), &vars).unwrap();
        let penalty =
            (hooked.to_scalar::<f32>().unwrap() - plain.to_scalar::<f32>().unwrap()) as f64;
        let (g0, g1) = (
            grad_values(&plain.backward().unwrap(), &vars),
            grad_values(&hooked.backward().unwrap(), &vars),
        );
        let moved = g0
            .iter()
            .map(|(k, g)| max_abs_diff(g, &g1[k]))
            .fold(0.0, f32::max);
        assert_eq!(penalty > 0.0, expect, "lambda {lambda}: penalty {penalty}");
        assert_eq!(
            moved > 0.0,
            expect,
            "lambda {lambda}: gradient moved by {moved}"
        );
    }
}

#[test]
fn pgp_projected_gradients_are_orthogonal_to_the_stored_bases() {
    let rig = Rig::new();
    let (model, mut m) = after_stage_one(&rig, "pgp", &[]);
    let vars = model.trainable();
    m.begin_task(info(2, TaskId::Vqav2), &vars).unwrap();
    let bases = m.state();
    assert!(!bases.is_empty(), "pgp stored no basis after stage 1");
    let loss = model.loss(&rig.questions[8..24], Ctx::default()).unwrap();
    let mut grads = loss.backward().unwrap();
    let raw = grad_values(&grads, &vars);
    m.adjust_grads(Step { index: 0, total: 1 }, &mut grads, &vars)
        .unwrap();
    let (mut checked, mut raw_overlap) = (0, 0.0f32);
    for (path, u) in &bases {
        let name = format!("{path}.lora_A.default.weight");
        let (Some(v), Some(r)) = (vars.get(&name), raw.get(&name)) else {
            panic!("no adapter for basis {path}")
        };
        let g = grads.get(v.as_tensor()).unwrap();
        let overlap = |g: &Tensor| -> f32 {
            let p = g.matmul(u).unwrap().abs().unwrap().max_keepdim(1).unwrap();
            p.flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        let rg = Tensor::from_vec(r.clone(), g.shape(), g.device()).unwrap();
        let scale = rg.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        let scale = scale.to_scalar::<f32>().unwrap().max(1e-12);
        assert!(overlap(g) <= 1e-4 * scale, "{name}: |g U| = {}", overlap(g));
        raw_overlap = raw_overlap.max(overlap(&rg) / scale);
        checked += 1;
    }
    assert!(checked > 0);
    // Not trivially orthogonal: before the projection the gradient did lie in the bases.
    assert!(raw_overlap > 1e-2, "raw gradients were already orthogonal");
}

#[test]
fn mage_pema_theta_star_follows_the_update_and_the_model_takes_it() {
    use cnext_kernels::pema::{pema_update, AlphaPolicy, Mat};
    let rig = Rig::new();
    let entry = cnext_baselines::find("mage").unwrap();
    let mut m = (entry.new)();
    let model = rig.model(m.adapters(&LoraConfig::default(), 1));
    let vars = model.trainable();
    wake_adapters(&vars);
    let stage = info(2, TaskId::Vqav2);
    m.begin_task(stage, &vars).unwrap();
    let start = values(&vars);
    let mut spy = Spy::new(m.as_mut());
    train(
        &model,
        &vars,
        &rig.questions,
        &tc(5),
        "mage",
        false,
        None,
        &mut spy,
    )
    .unwrap();
    let (before, applied, trained) = (spy.before, spy.applied, spy.after);
    m.end_task(stage, &model, &vars, &rig.questions).unwrap();
    let end = values(&vars);
    let (mut averaged, mut toward, mut frozen) = (0, 0, 0);
    for (name, s0) in &start {
        // VQA reads text and an image and answers in text: the image-output expert (3) is
        // not gated, so neither training nor PEMA may touch it, to the bit.
        if name.contains(".lora_") && name.contains("expert3") {
            assert_eq!(&end[name], s0, "{name}: an ungated expert moved");
            frozen += 1;
            continue;
        }
        let expert = ["expert0", "expert1", "expert2"]
            .iter()
            .any(|e| name.contains(e));
        if !name.contains(".lora_") || !expert {
            continue;
        }
        let (r, c) = {
            let d = vars[name].dims();
            (d[0], d[1])
        };
        let mat = |v: &[f32]| Mat::new(r, c, v.iter().map(|&x| f64::from(x)).collect());
        // The PEMA rule over the recorded trajectory (grads as the optimizer saw them).
        let mut star = mat(s0);
        for t in 0..before.len() {
            let g = mat(&applied[t][name]);
            let h = Mat::new(r, c, g.v.iter().map(|x| x * x).collect());
            star = pema_update(
                &mat(&before[t][name]),
                &star,
                &g,
                &h,
                1e-5,
                AlphaPolicy::Clip,
            )
            .0;
        }
        let want: Vec<f32> = star.v.iter().map(|&x| x as f32).collect();
        assert!(
            max_abs_diff(&want, &end[name]) <= 1e-6,
            "{name}: theta* not taken"
        );
        let last = &trained.last().unwrap()[name];
        // theta* lags the trained weights (an EMA), so the stage end moved them back.
        let dist =
            |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f32>();
        toward += usize::from(dist(&end[name], s0) < dist(last, s0));
        averaged += 1;
    }
    assert!(
        averaged > 0 && frozen > 0,
        "{averaged} averaged, {frozen} frozen"
    );
    assert_eq!(
        toward, averaged,
        "theta* did not lag the trained weights everywhere"
    );
}

#[test]
fn lae_offline_adapter_is_the_ema_of_the_online_one() {
    let rig = Rig::new();
    let (model, mut m) = after_stage_one(&rig, "lae", &[]);
    let vars = model.trainable();
    let copy = m.state();
    let after_one = values(&vars);
    for (k, t) in &copy {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(
            &v, &after_one[k],
            "{k}: offline is not a copy at the end of stage 1"
        );
    }
    let stage = info(2, TaskId::Flickr30k);
    m.begin_task(stage, &vars).unwrap();
    let mut spy = Spy::new(m.as_mut());
    train(
        &model,
        &vars,
        &rig.drawings,
        &tc(10),
        "lae",
        false,
        None,
        &mut spy,
    )
    .unwrap();
    let after = spy.after;
    let offline = m.state();
    let mut moved = false;
    for (k, t) in &offline {
        let mut ema: Vec<f64> = after_one[k].iter().map(|&x| f64::from(x)).collect();
        for step in &after {
            for (e, &x) in ema.iter_mut().zip(&step[k]) {
                *e = 0.99 * *e + 0.01 * f64::from(x);
            }
        }
        let got: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let want: Vec<f32> = ema.iter().map(|&x| x as f32).collect();
        assert!(
            max_abs_diff(&got, &want) <= 1e-6,
            "{k}: offline is not the EMA"
        );
        moved |= max_abs_diff(&got, &after_one[k]) > 0.0;
    }
    assert!(
        moved,
        "the online adapter never moved, so the EMA was not tested"
    );
}

/// DEMA by hand: `beta = 2 (1 + |g|_1) / (|theta - theta*|_1 |g - g_prev|_1)`, 0.01 where it
/// is not in (0, 1) or not finite; `theta* <- (1 - beta) theta* + beta theta` per tensor, after
/// every optimizer step (`thetas` are the values after each step).
fn dema_by_hand(start: &[f32], thetas: &[&[f32]], grads: &[&[f32]]) -> Vec<f64> {
    let mut star: Vec<f64> = start.iter().map(|&x| f64::from(x)).collect();
    let mut prev = vec![0.0f64; star.len()];
    for (theta, g) in thetas.iter().zip(grads) {
        let a: f64 = theta
            .iter()
            .zip(&star)
            .map(|(&t, s)| (f64::from(t) - s).abs())
            .sum();
        let b: f64 = g.iter().map(|&x| f64::from(x).abs()).sum();
        let c: f64 = g
            .iter()
            .zip(&prev)
            .map(|(&x, p)| (f64::from(x) - p).abs())
            .sum();
        let mut beta = 2.0 * (1.0 + b) / (a * c);
        if !(beta.is_finite() && beta > 0.0 && beta < 1.0) {
            beta = 0.01;
        }
        for (s, &t) in star.iter_mut().zip(theta.iter()) {
            *s = (1.0 - beta) * *s + beta * f64::from(t);
        }
        prev = g.iter().map(|&x| f64::from(x)).collect();
    }
    star
}

#[test]
fn cia_and_mage_dema_follow_the_dema_formula() {
    let rig = Rig::new();
    for id in ["cia", "mage_dema"] {
        let entry = cnext_baselines::find(id).unwrap();
        let mut m = (entry.new)();
        let model = rig.model(m.adapters(&LoraConfig::default(), 1));
        let vars = model.trainable();
        wake_adapters(&vars);
        let stage = info(2, TaskId::Vqav2);
        m.begin_task(stage, &vars).unwrap();
        let start = values(&vars);
        let mut spy = Spy::new(m.as_mut());
        train(
            &model,
            &vars,
            &rig.questions,
            &tc(6),
            id,
            false,
            None,
            &mut spy,
        )
        .unwrap();
        let (applied, trained) = (spy.applied, spy.after);
        m.end_task(stage, &model, &vars, &rig.questions).unwrap();
        let end = values(&vars);
        let mut checked = 0;
        for (name, s0) in &start {
            // mage_dema averages the trained experts' LoRA matrices only (vqav2: 0, 1, 2).
            let averaged = name.contains(".lora_") && !name.contains("expert3");
            if id == "mage_dema" && !averaged {
                continue;
            }
            if !applied[0].contains_key(name) {
                continue;
            }
            let b: Vec<&[f32]> = trained.iter().map(|v| v[name].as_slice()).collect();
            let g: Vec<&[f32]> = applied.iter().map(|v| v[name].as_slice()).collect();
            let want: Vec<f32> = dema_by_hand(s0, &b, &g).iter().map(|&x| x as f32).collect();
            let d = max_abs_diff(&want, &end[name]);
            let scale = s0.iter().fold(0.0f32, |a, x| a.max(x.abs())).max(1e-3);
            assert!(d <= 1e-5 * scale, "{id} {name}: theta* off by {d}");
            assert_ne!(
                &end[name],
                &trained.last().unwrap()[name],
                "{id} {name}: theta* not taken"
            );
            checked += 1;
        }
        assert!(checked > 0, "{id}: nothing averaged");
    }
}

#[test]
fn reglora_holds_the_key_elements_of_earlier_tasks() {
    let rig = Rig::new();
    // Mean |s B A| on the stage-1 key elements after stage 2, relative to the other elements.
    let key_share = |lambda: f64| -> f64 {
        let (model, mut m) = after_stage_one(&rig, "reglora", &[("lambda", lambda.into())]);
        let vars = model.trainable();
        let stage = info(2, TaskId::Flickr30k);
        m.begin_task(stage, &vars).unwrap();
        train(
            &model,
            &vars,
            &rig.drawings,
            &tc(12),
            "s2",
            false,
            None,
            m.as_mut(),
        )
        .unwrap();
        let state = m.state();
        let bases: BTreeMap<&str, &Tensor> = state
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix("keys.")?, v)))
            .collect();
        assert!(!bases.is_empty(), "reglora recorded no key elements");
        let (mut on, mut off) = (0.0, 0.0);
        for (path, mask) in bases {
            let a = &vars[&format!("{path}.lora_A.default.weight")];
            let b = &vars[&format!("{path}.lora_B.default.weight")];
            let delta = b.as_tensor().matmul(a.as_tensor()).unwrap().abs().unwrap();
            let n = mask.sum_all().unwrap().to_scalar::<f32>().unwrap() as f64;
            let total = delta.sum_all().unwrap().to_scalar::<f32>().unwrap() as f64;
            let kept = (&delta * mask)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64;
            on += kept / n;
            off += (total - kept) / (mask.elem_count() as f64 - n);
        }
        on / off
    };
    let (held, free) = (key_share(2.5e3), key_share(0.0));
    assert!(
        held < 0.5 * free,
        "key elements not held: {held} vs {free} without the penalty"
    );
}

#[test]
fn moelora_router_gets_gradients_and_learns() {
    let rig = Rig::new();
    let entry = cnext_baselines::find("moelora").unwrap();
    let mut m = (entry.new)();
    let model = rig.model(m.adapters(&LoraConfig::default(), 1));
    let vars = model.trainable();
    wake_adapters(&vars);
    let routers: Vec<&String> = vars.keys().filter(|k| k.contains("lora_router")).collect();
    assert!(!routers.is_empty());
    let loss = model.loss(&rig.questions[..8], Ctx::default()).unwrap();
    let g = grad_values(&loss.backward().unwrap(), &vars);
    for r in &routers {
        let n = g
            .get(*r)
            .map_or(0.0, |v| v.iter().fold(0.0f32, |a, x| a.max(x.abs())));
        assert!(n > 0.0, "{r} got no gradient");
    }
    let before = values(&vars);
    let stage = info(2, TaskId::Vqav2);
    m.begin_task(stage, &vars).unwrap();
    train(
        &model,
        &vars,
        &rig.questions,
        &tc(4),
        "moe",
        false,
        None,
        m.as_mut(),
    )
    .unwrap();
    let after = values(&vars);
    for r in routers {
        assert_ne!(before[r], after[r], "{r} did not train");
    }
}
