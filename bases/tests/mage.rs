//! MAGE on a real (smoke-sized) nano model: the experts a task does not train stay
//! bit-identical through a stage (no gradient, no optimizer state, no PEMA), while the others
//! learn; PEMA's diagnostics are reported.

use candle_core::{Device, Tensor};
use cnext_adapters::{AdapterPlan, LoraConfig};
use cnext_backbones::nano::backbone::NanoBackbone;
use cnext_backbones::nano::config::NanoConfig;
use cnext_backbones::nano::tokenizer::Tokenizer;
use cnext_backbones::nano::vq::Codebook;
use cnext_backbones::{Backbone, Example, Prompt, Target};
use cnext_core::TaskId;
use cnext_datasets::rng::Rng;
use cnext_datasets::scene::Scene;
use cnext_harness::method::StageInfo;
use cnext_harness::optim::AdamWConfig;
use cnext_harness::train::{train, TrainConfig};
use std::collections::BTreeMap;

/// Text-to-image examples (the shape of flickr30k: text in, image out).
fn drawings(n: usize) -> Vec<Example> {
    let mut rng = Rng::new(3);
    (0..n)
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
        .collect()
}

fn snapshot(m: &NanoBackbone) -> BTreeMap<String, Vec<f32>> {
    m.trainable()
        .into_iter()
        .map(|(k, v)| (k, v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()))
        .collect()
}

#[test]
fn frozen_experts_stay_bit_identical_through_a_stage() {
    let ex = drawings(32);
    let imgs: Vec<_> = ex
        .iter()
        .filter_map(|e| match &e.target {
            Target::Image(i) => Some(i.clone()),
            Target::Text(_) => None,
        })
        .collect();
    let cb = Codebook::learn(&imgs, 32, 4, 0);
    let tok = Tokenizer::build(
        ex.iter().map(|e| e.prompt.text.as_str()),
        1,
        cb.len() as u32,
    );
    let cfg = NanoConfig::smoke(tok.vocab_size());
    let base = NanoBackbone::init_pretrain(&cfg, tok.clone(), cb.clone(), 0, &Device::Cpu).unwrap();
    let weights: BTreeMap<String, Tensor> = base.trainable_tensors();

    let entry = cnext_baselines::find("mage").unwrap();
    let mut mage = (entry.new)();
    let plan: AdapterPlan = mage.adapters(&LoraConfig::default(), 1);
    let model = NanoBackbone::from_base(&cfg, &weights, tok, cb, plan, &Device::Cpu).unwrap();
    let vars = model.trainable();
    // Give every B a non-zero value so that every expert would get a gradient.
    for (k, v) in &vars {
        if k.contains(".lora_B.") {
            let vals = cnext_adapters::normal_values(5, k, v.elem_count(), 0.05);
            v.set(&Tensor::from_vec(vals, v.shape(), v.device()).unwrap())
                .unwrap();
        }
    }
    let before = snapshot(&model);
    let order = TaskId::ALL;
    let info = StageInfo {
        stage: 3,
        task: TaskId::Flickr30k,
        order: &order,
        seed: 0,
    };
    mage.begin_task(info, &vars).unwrap();
    let tc = TrainConfig {
        steps: 12,
        batch_size: 8,
        optim: AdamWConfig {
            lr: 1e-2,
            ..Default::default()
        },
        seed: 0,
        epochs: None,
    };
    train(&model, &vars, &ex, &tc, "mage", false, None, mage.as_mut()).unwrap();
    mage.end_task(info, &model, &vars, &ex).unwrap();
    let after = snapshot(&model);
    let (mut frozen, mut moved) = (0, 0);
    for (k, b) in &before {
        let changed = b != &after[k];
        // flickr30k reads text and writes an image: experts 0 and 3 train, 1 and 2 do not.
        if k.contains(".expert1.") || k.contains(".expert2.") {
            assert!(!changed, "{k} changed although its expert is frozen");
            frozen += 1;
        } else if k.contains(".expert0.") || k.contains(".expert3.") {
            moved += usize::from(changed);
        }
    }
    assert!(frozen > 0 && moved > 0, "frozen {frozen}, moved {moved}");
    let d = mage.diagnostics();
    assert!(d.contains_key("pema_alpha_fallback") && d.contains_key("pema_star_non_finite"));
}
