//! Properties of the nano backbone and the training loop on the smoke model: weight naming, a
//! frozen base, LoRA with B = 0 as a no-op, a loss that decreases, deterministic generation,
//! and KV-cache generation equal to full recompute.

use candle_core::{Device, Tensor, D};
use cnext_adapters::{AdapterPlan, Ctx, LoraConfig};
use cnext_backbones::nano::backbone::NanoBackbone;
use cnext_backbones::nano::config::NanoConfig;
use cnext_backbones::nano::model::{KvCache, Slot};
use cnext_backbones::nano::tokenizer::{Tokenizer, BOS, EOS, SEP};
use cnext_backbones::nano::vq::Codebook;
use cnext_backbones::{Backbone, Example, Output, OutputKind, Prompt, Target};
use cnext_datasets::rng::Rng;
use cnext_datasets::scene::Scene;
use cnext_harness::optim::AdamWConfig;
use cnext_harness::train::{train, TrainConfig};
use std::collections::BTreeMap;

fn examples(n: usize, seed: u64) -> Vec<Example> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|i| {
            let s = Scene::random(&mut rng, 1, 2);
            let o = s.objects[0];
            if i % 3 == 2 {
                Example {
                    prompt: Prompt {
                        image: None,
                        text: format!("Draw: {}", s.caption()),
                    },
                    target: Target::Image(s.render()),
                }
            } else {
                Example {
                    prompt: Prompt {
                        image: Some(s.render()),
                        text: format!("What color is the {}?", o.shape.name()),
                    },
                    target: Target::Text(o.color.name().to_string()),
                }
            }
        })
        .collect()
}

type Parts = (NanoConfig, BTreeMap<String, Tensor>, Tokenizer, Codebook);

/// A smoke base, briefly pretrained (full parameters) so that its frozen head is meaningful;
/// built once per test binary.
fn parts() -> Parts {
    static BASE: std::sync::OnceLock<(Parts, f64, f64)> = std::sync::OnceLock::new();
    BASE.get_or_init(build_base).0.clone()
}

fn build_base() -> (Parts, f64, f64) {
    let ex = examples(64, 1);
    let texts: Vec<String> = ex
        .iter()
        .flat_map(|e| {
            let mut v = vec![e.prompt.text.clone()];
            if let Target::Text(t) = &e.target {
                v.push(t.clone());
            }
            v
        })
        .collect();
    let imgs: Vec<_> = ex
        .iter()
        .filter_map(|e| match &e.target {
            Target::Image(i) => Some(i.clone()),
            _ => None,
        })
        .collect();
    let cb = Codebook::learn(&imgs, 64, 5, 0);
    let tok = Tokenizer::build(texts.iter().map(String::as_str), 2, cb.len() as u32);
    let cfg = NanoConfig::smoke(tok.vocab_size());
    let base = NanoBackbone::init_pretrain(&cfg, tok.clone(), cb.clone(), 0, &Device::Cpu).unwrap();
    let vars = base.trainable();
    let stats = train(
        &base,
        &vars,
        &ex,
        &quick_cfg(80),
        "pretrain",
        false,
        None,
        &mut (),
    )
    .unwrap();
    let w = base
        .trainable_tensors()
        .into_iter()
        .map(|(k, v)| (k, v.copy().unwrap()))
        .collect();
    ((cfg, w, tok, cb), stats.first_loss, stats.last_loss)
}

fn lora_model(seed: u64) -> (NanoBackbone, BTreeMap<String, Tensor>) {
    let (cfg, w, tok, cb) = parts();
    let plan = AdapterPlan::lora(LoraConfig::default(), seed);
    (
        NanoBackbone::from_base(&cfg, &w, tok, cb, plan, &Device::Cpu).unwrap(),
        w,
    )
}

fn quick_cfg(steps: usize) -> TrainConfig {
    TrainConfig {
        steps,
        batch_size: 8,
        optim: AdamWConfig {
            lr: 2e-2,
            ..Default::default()
        },
        seed: 0,
        epochs: None,
    }
}

#[test]
fn only_adapters_and_projector_train_and_names_are_peft_like() {
    let (m, _) = lora_model(1);
    let names: Vec<String> = m.trainable().into_keys().collect();
    assert!(names.contains(&"llm.layers.0.self_attn.q_proj.lora_A.default.weight".to_string()));
    assert!(names.contains(&"llm.layers.1.mlp.down_proj.lora_B.default.weight".to_string()));
    assert!(names.contains(&"projector.weight".to_string()));
    // 2 layers x 7 targets x (A, B) + projector weight and bias.
    assert_eq!(names.len(), 2 * 7 * 2 + 2, "{names:?}");
    assert!(names
        .iter()
        .all(|n| n.contains(".lora_") || n.starts_with("projector.")));
}

#[test]
fn base_stays_bit_identical_and_loss_decreases() {
    let (m, w) = lora_model(2);
    let base_weights = |m: &NanoBackbone| -> Vec<Vec<f32>> {
        m.model
            .linears()
            .iter()
            .map(|l| l.weight().flatten_all().unwrap().to_vec1().unwrap())
            .collect()
    };
    let before = base_weights(&m);
    let vars = m.trainable();
    // A new answer format (upper case) that only the adapter can learn; the loss is measured
    // on the same fixed batch before and after training.
    let ex: Vec<Example> = examples(32, 70)
        .into_iter()
        .map(|mut e| {
            if let Target::Text(t) = &e.target {
                e.target = Target::Text(t.to_uppercase());
            }
            e
        })
        .collect();
    let fixed = |m: &NanoBackbone| {
        m.loss(&ex, Ctx::default())
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let (_, pre_first, pre_last) = build_base();
    assert!(
        pre_last < 0.5 * pre_first,
        "pretraining {pre_first} -> {pre_last}"
    );
    let l0 = fixed(&m);
    train(&m, &vars, &ex, &quick_cfg(80), "test", false, None, &mut ()).unwrap();
    let l1 = fixed(&m);
    assert!(l1 < 0.5 * l0, "LoRA loss on a fixed batch {l0} -> {l1}");
    let after = base_weights(&m);
    assert_eq!(before, after);
    // The base map itself was never touched either.
    let q = &w["llm.layers.0.self_attn.q_proj.weight"];
    assert_eq!(
        q.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        before[0]
    );
    // ... while the adapter did move.
    let b = &vars["llm.layers.0.self_attn.q_proj.lora_B.default.weight"];
    assert!(
        b.as_tensor()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0
    );
}

#[test]
fn lora_with_zero_b_leaves_outputs_unchanged() {
    let (cfg, w, tok, cb) = parts();
    let plain = NanoBackbone::from_base(
        &cfg,
        &w,
        tok.clone(),
        cb.clone(),
        AdapterPlan::none(),
        &Device::Cpu,
    )
    .unwrap();
    let lora = NanoBackbone::from_base(
        &cfg,
        &w,
        tok,
        cb,
        AdapterPlan::lora(LoraConfig::default(), 3),
        &Device::Cpu,
    )
    .unwrap();
    let ex = examples(6, 3);
    let a = plain
        .loss(&ex, Ctx::default())
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let b = lora
        .loss(&ex, Ctx::default())
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(a, b);
}

#[test]
fn generation_is_deterministic_and_kv_cache_equals_full_recompute() {
    let (m, _) = lora_model(4);
    let vars = m.trainable();
    train(
        &m,
        &vars,
        &examples(32, 7),
        &quick_cfg(30),
        "gen",
        false,
        None,
        &mut (),
    )
    .unwrap();
    let prompts: Vec<Prompt> = examples(6, 9).into_iter().map(|e| e.prompt).collect();
    let a = m.generate(&prompts, OutputKind::Text, 6).unwrap();
    let b = m.generate(&prompts, OutputKind::Text, 6).unwrap();
    assert_eq!(a, b);
    let imgs = m.generate(&prompts[..2], OutputKind::Image, 0).unwrap();
    assert!(matches!(&imgs[0], Output::Image(i) if i.width() == 24));

    // Full recompute, one prompt at a time, no cache and no padding.
    for (p, got) in prompts.iter().zip(&a) {
        let mut slots = vec![Slot::Token(BOS)];
        if let Some(img) = &p.image {
            slots.extend((0..((img.width() / 8) * (img.height() / 8)) as usize).map(Slot::Patch));
        }
        slots.extend(m.tokenizer.encode(&p.text).into_iter().map(Slot::Token));
        slots.push(Slot::Token(SEP));
        let mut out = vec![];
        for _ in 0..6 {
            let t = slots.len();
            let x = m
                .model
                .embed(std::slice::from_ref(&slots), &[p.image.as_ref()])
                .unwrap();
            let pos: Vec<u32> = (0..t as u32).collect();
            let mask = m.model.mask(&[vec![true; t]], t).unwrap();
            let h = m
                .model
                .decode(&x, &pos, &mask, &mut KvCache::new(), Ctx::default())
                .unwrap();
            let logits = m
                .model
                .logits(&h.narrow(1, t - 1, 1).unwrap().squeeze(1).unwrap())
                .unwrap();
            let id = logits.argmax(D::Minus1).unwrap().to_vec1::<u32>().unwrap()[0];
            if id == EOS {
                break;
            }
            out.push(id);
            slots.push(Slot::Token(id));
        }
        assert_eq!(*got, Output::Text(m.tokenizer.decode(&out)));
    }
}

#[test]
fn every_parameter_gets_a_gradient_when_pretraining() {
    // Guards against ops without a backward pass (fused rms_norm, softmax, rope), which train
    // without error and never learn.
    let (cfg, _, tok, cb) = parts();
    let m = NanoBackbone::init_pretrain(&cfg, tok, cb, 5, &Device::Cpu).unwrap();
    let loss = m.loss(&examples(12, 4), Ctx::default()).unwrap();
    let grads = loss.backward().unwrap();
    for (name, v) in m.trainable() {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let n = g
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(n > 0.0, "{name}: zero gradient");
    }
}

#[test]
fn a_diverging_stage_stops_with_an_error_naming_the_step() {
    let (m, _) = lora_model(6);
    let vars = m.trainable();
    let mut cfg = quick_cfg(20);
    cfg.optim.lr = 1e30;
    cfg.optim.warmup_ratio = 0.0;
    let err = train(
        &m,
        &vars,
        &examples(16, 2),
        &cfg,
        "vqav2",
        false,
        None,
        &mut (),
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.starts_with("vqav2: step ") && msg.contains("not finite"),
        "{msg}"
    );
}

#[test]
fn ensemble_decoding_of_identical_members_equals_greedy_and_restores_the_weights() {
    let (m, _) = lora_model(4);
    let vars = m.trainable();
    train(
        &m,
        &vars,
        &examples(32, 7),
        &quick_cfg(30),
        "ens",
        false,
        None,
        &mut (),
    )
    .unwrap();
    let prompts: Vec<Prompt> = examples(6, 9).into_iter().map(|e| e.prompt).collect();
    let plain = m.generate(&prompts, OutputKind::Text, 6).unwrap();
    let now = m.trainable_tensors();
    let copy: std::collections::BTreeMap<String, candle_core::Tensor> = now
        .iter()
        .map(|(k, v)| (k.clone(), v.copy().unwrap()))
        .collect();
    // Two identical members: max of equal distributions is that distribution.
    let same = m
        .generate_ensemble(&prompts, OutputKind::Text, 6, &[copy.clone(), copy.clone()])
        .unwrap();
    assert_eq!(same, plain);
    // A member with zeroed adapters changes the weights during decoding, not after it.
    let mut zeroed = copy.clone();
    for (k, v) in zeroed.iter_mut() {
        if k.contains(".lora_B.") {
            *v = v.zeros_like().unwrap();
        }
    }
    m.generate_ensemble(&prompts, OutputKind::Image, 0, &[copy.clone(), zeroed])
        .unwrap();
    for (k, v) in m.trainable_tensors() {
        let d = (v - &copy[&k]).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0, "{k} changed");
    }
}

#[test]
fn vision_pretraining_learns_and_leaves_its_parts_out_of_the_mix() {
    // Both supervised phases must learn (their losses fall) and the parts they train must not
    // reach the mix's optimizer, or the mix would undo them.
    let (cfg, _, tok, cb) = parts();
    let m = NanoBackbone::init_pretrain(&cfg, tok.clone(), cb, 6, &Device::Cpu).unwrap();
    let mut vars = m.trainable();
    let words: Vec<String> = (0..tok.vocab_size() as u32)
        .map(|i| tok.decode(&[i]))
        .filter(|w| w.len() > 1)
        .collect();
    let encoder: BTreeMap<_, _> = vars
        .iter()
        .filter(|(k, _)| k.starts_with("vision."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let (first, last) =
        cnext_bases::nano::vision::pretrain_encoder(&m, &encoder, 40, 0, &Device::Cpu).unwrap();
    assert!(last < 0.8 * first, "encoder loss {first} -> {last}");
    let gate: BTreeMap<_, _> = vars
        .iter()
        .filter(|(k, _)| k.starts_with("relevance.") && *k != "relevance.flag")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let (first, last) =
        cnext_bases::nano::vision::pretrain_relevance(&m, &gate, &words, 60, 0, &Device::Cpu)
            .unwrap();
    assert!(last < 0.8 * first, "relevance loss {first} -> {last}");
    let mut base = cnext_bases::nano::BaseConfig::smoke(0);
    base.vision_steps = 2;
    cnext_bases::nano::vision::pretrain(&m, &mut vars, &words, &base, &Device::Cpu, false).unwrap();
    assert!(vars.contains_key("relevance.flag") && vars.contains_key("projector.weight"));
    assert!(!vars.keys().any(
        |k| k.starts_with("vision.") || (k.starts_with("relevance.") && k != "relevance.flag")
    ));
}
