//! The tiny Janus fixture (`shared/fixtures/tiny_janus`, made by transformers 5.23): our port
//! against its understanding logits, hidden states, greedy text, CFG and no-CFG image codes,
//! VQ decode and encode, tokenizer ids and processor `pixel_values`; and training signals.

mod common;

use candle_core::{DType, Device, Tensor};
use cnext_adapters::AdapterPlan;
use cnext_backbones::janus::{
    CfgIds, GenerationConfig, JanusModel, JanusTokenizer, Members, PreparedPrompt, TrainableParts,
};
use common::{fixture, flat, ids, max_diff, reference, tensor};

fn model() -> JanusModel {
    JanusModel::load(
        &fixture("tiny_janus"),
        &AdapterPlan::none(),
        &Device::Cpu,
        DType::F32,
        TrainableParts::default(),
    )
    .expect("load tiny_janus")
}

fn ref_tensor(r: &serde_json::Value, key: &str) -> Tensor {
    let (shape, data) = tensor(r, key);
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

/// The understanding prompt with the reference pixel_values.
fn understanding_prompt(r: &serde_json::Value) -> PreparedPrompt {
    let px = ref_tensor(r, "pixel_values").squeeze(0).unwrap();
    PreparedPrompt {
        ids: ids(r, "input_ids"),
        images: vec![px],
    }
}

fn check(what: &str, got: &Tensor, r: &serde_json::Value, key: &str, tol: f32) -> f32 {
    let (shape, want) = tensor(r, key);
    assert_eq!(
        got.elem_count(),
        shape.iter().product::<usize>(),
        "{what}: size"
    );
    let d = max_diff(&flat(got), &want);
    println!("{what}: max abs diff {d:e}");
    assert!(d <= tol, "{what}: max abs diff {d} > {tol}");
    d
}

#[test]
fn vision_and_aligner_hidden_states_match() {
    let r = reference("tiny_janus");
    let m = model();
    let px = ref_tensor(&r, "pixel_values");
    let h = m.vision_hidden(&px).unwrap();
    check(
        "vision last_hidden_state",
        &h,
        &r,
        "debug_vision_last_hidden_state",
        1e-4,
    );
    let f = m.image_features(&px).unwrap();
    check(
        "image features after aligner",
        &f,
        &r,
        "debug_image_features_after_aligner",
        1e-4,
    );
}

#[test]
fn understanding_logits_match() {
    let r = reference("tiny_janus");
    let m = model();
    let logits = m.prompt_logits(&understanding_prompt(&r)).unwrap();
    let t = logits.dim(1).unwrap();
    let pos = ids(&r, "logits_last3_positions");
    assert_eq!(pos, vec![t as u32 - 3, t as u32 - 2, t as u32 - 1]);
    let last3 = logits.narrow(1, t - 3, 3).unwrap();
    check(
        "understanding logits (last 3 positions)",
        &last3,
        &r,
        "logits_last3",
        1e-4,
    );
}

#[test]
fn greedy_text_matches() {
    let r = reference("tiny_janus");
    let m = model();
    let want = ids(&r, "greedy_text_new_tokens");
    let g = m
        .generate_text(
            &[understanding_prompt(&r)],
            want.len(),
            &[1],
            2,
            &Members::current(),
        )
        .unwrap();
    assert_eq!(g.ids[0], want, "greedy text tokens");
    let steps = Tensor::cat(&g.step_logits, 0).unwrap();
    check(
        "greedy text step logits",
        &steps,
        &r,
        "greedy_text_step_logits",
        1e-4,
    );
}

#[test]
fn batched_left_padded_text_equals_single_rows() {
    let r = reference("tiny_janus");
    let m = model();
    let long = understanding_prompt(&r);
    let short = PreparedPrompt {
        ids: vec![0, 20, 30, 40],
        images: vec![],
    };
    let both = m
        .generate_text(
            &[short.clone(), long.clone()],
            6,
            &[1],
            2,
            &Members::current(),
        )
        .unwrap();
    for (i, p) in [short, long].into_iter().enumerate() {
        let one = m
            .generate_text(&[p], 6, &[1], 2, &Members::current())
            .unwrap();
        assert_eq!(both.ids[i], one.ids[0], "row {i}");
        let a = both.step_logits[0].narrow(0, i, 1).unwrap();
        assert!(max_diff(&flat(&a), &flat(&one.step_logits[0])) <= 1e-5);
    }
}

fn image_prompt(r: &serde_json::Value) -> PreparedPrompt {
    PreparedPrompt {
        ids: ids(r, "image_prompt_ids"),
        images: vec![],
    }
}

fn cfg_ids() -> CfgIds {
    let g = GenerationConfig::from_dir(&fixture("tiny_janus")).unwrap();
    CfgIds {
        bos: g.bos_token_id,
        boi: g.generation_kwargs.boi_token_id.unwrap(),
        pad: g.pad_token_id.unwrap(),
    }
}

#[test]
fn cfg_image_tokens_match() {
    let r = reference("tiny_janus");
    let m = model();
    let g = GenerationConfig::from_dir(&fixture("tiny_janus")).unwrap();
    let scale = g.guidance_scale.unwrap();
    assert_eq!(
        scale,
        r["image_generation"]["guidance_scale"].as_f64().unwrap()
    );
    let out = m
        .generate_image(
            &[image_prompt(&r)],
            Some(scale),
            cfg_ids(),
            &Members::current(),
        )
        .unwrap();
    assert_eq!(
        out.codes[0],
        ids(&r, "cfg_image_tokens_api"),
        "CFG image tokens"
    );
    check(
        "CFG first-step cond logits",
        out.first_cond.as_ref().unwrap(),
        &r,
        "cfg_first_step_logits_cond",
        1e-4,
    );
    check(
        "CFG first-step uncond logits",
        out.first_uncond.as_ref().unwrap(),
        &r,
        "cfg_first_step_logits_uncond",
        1e-4,
    );
    check(
        "CFG first-step guided logits",
        &out.step_logits[0],
        &r,
        "cfg_first_step_logits_guided",
        1e-4,
    );
    let all = Tensor::cat(&out.step_logits, 0).unwrap();
    check(
        "CFG guided logits, all steps",
        &all,
        &r,
        "cfg_step_logits_guided_api",
        1e-4,
    );
}

#[test]
fn nocfg_image_tokens_match() {
    let r = reference("tiny_janus");
    let m = model();
    let out = m
        .generate_image(&[image_prompt(&r)], None, cfg_ids(), &Members::current())
        .unwrap();
    assert_eq!(
        out.codes[0],
        ids(&r, "nocfg_image_tokens"),
        "no-CFG image tokens"
    );
    check(
        "no-CFG first-step logits",
        &out.step_logits[0],
        &r,
        "nocfg_first_step_logits",
        1e-4,
    );
    let all = Tensor::cat(&out.step_logits, 0).unwrap();
    check(
        "no-CFG logits, all steps",
        &all,
        &r,
        "nocfg_step_logits",
        1e-4,
    );
}

#[test]
fn vq_decode_matches() {
    let r = reference("tiny_janus");
    let m = model();
    let px = m
        .vq()
        .decode(&[ids(&r, "decode_fixed_image_tokens")])
        .unwrap();
    check(
        "VQ decode (fixed codes)",
        &px,
        &r,
        "decode_fixed_nchw",
        1e-4,
    );
    let img = &cnext_backbones::janus::vq::postprocess(&px).unwrap()[0];
    let (_, want) = tensor(&r, "decode_fixed_postprocessed_uint8_chw");
    let mut worst = 0f32;
    for c in 0..3 {
        for y in 0..8 {
            for x in 0..8 {
                let got = img.get_pixel(x, y).0[c] as f32;
                worst = worst.max((got - want[(c * 8 + y as usize) * 8 + x as usize]).abs());
            }
        }
    }
    println!("VQ decode uint8: max abs diff {worst}");
    assert!(worst <= 1.0, "uint8 pixels differ by {worst}");
    let px = m.vq().decode(&[ids(&r, "cfg_image_tokens_api")]).unwrap();
    check(
        "VQ decode (CFG codes)",
        &px,
        &r,
        "decode_cfg_tokens_nchw",
        1e-4,
    );
}

#[test]
fn vq_encode_matches() {
    let r = reference("tiny_janus");
    let m = model();
    let x = ref_tensor(&r, "vq_encode_input_nchw");
    let (codes, quant) = m.vq().encode(&x).unwrap();
    assert_eq!(
        codes[0],
        ids(&r, "vq_encode_image_tokens"),
        "VQ encode codes"
    );
    check(
        "VQ quantized latent",
        &quant,
        &r,
        "vq_encode_quantized_latent",
        1e-4,
    );
}

#[test]
fn tokenizer_ids_match() {
    let r = reference("tiny_janus");
    let dir = fixture("tiny_janus");
    let g = GenerationConfig::from_dir(&dir).unwrap();
    let tok = JanusTokenizer::load(&dir, &g).unwrap();
    assert_eq!(tok.bos, Some(0));
    let n = 16;
    let text = r["text_prompt"].as_str().unwrap();
    let one = format!(
        "{}{}{}",
        tok.boi.text,
        tok.image.text.repeat(n),
        tok.eoi.text
    );
    let expanded = text.replace(&tok.image.text, &one);
    assert_eq!(tok.encode(&expanded, true).unwrap(), ids(&r, "input_ids"));
    let img = format!("{}{}", r["image_prompt"].as_str().unwrap(), tok.boi.text);
    assert_eq!(tok.encode(&img, true).unwrap(), ids(&r, "image_prompt_ids"));
    let decoded = tok.decode(&ids(&r, "greedy_text_new_tokens")).unwrap();
    assert_eq!(decoded, r["greedy_text_decoded"].as_str().unwrap());
}

// ---------------------------------------------------------------------------------------------
// Processor, the Backbone seam, and training signals.

use cnext_adapters::{Ctx, LoraConfig};
use cnext_backbones::janus::{Guidance, JanusBackbone, JanusProcessor, JanusSettings};
use cnext_backbones::{Backbone, Example, Output, OutputKind, Prompt, Target};
use image::RgbImage;

fn input_png() -> RgbImage {
    let p = fixture("tiny_janus").join("inputs/janus_input_36x24.png");
    image::open(&p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .to_rgb8()
}

#[test]
fn processor_pixel_values_match() {
    let r = reference("tiny_janus");
    let proc = JanusProcessor::from_dir(&fixture("tiny_janus"), 16).unwrap();
    let img = input_png();
    assert_eq!(
        proc.image.resized_size(img.width(), img.height(), 20),
        (20, 14)
    );
    let px = proc.image.preprocess(&img, &Device::Cpu).unwrap();
    check("processor pixel_values", &px, &r, "pixel_values", 1e-6);
}

fn backbone(plan: AdapterPlan) -> JanusBackbone {
    JanusBackbone::load(&fixture("tiny_janus"), plan, &Device::Cpu, DType::F32).expect("load")
}

fn question() -> Prompt {
    Prompt {
        image: Some(input_png()),
        text: "what color is the square?".into(),
    }
}

#[test]
fn backbone_lays_out_prompts_as_the_processor_and_generates_the_reference() {
    let r = reference("tiny_janus");
    let bb = backbone(AdapterPlan::none());
    assert!(
        !bb.uses_chat_format(),
        "the fixture has no chat template: plain layout"
    );
    assert_eq!(
        bb.prompt_text(&question()),
        r["text_prompt"].as_str().unwrap()
    );
    let p = bb.prepare(&question(), false).unwrap();
    assert_eq!(p.ids, ids(&r, "input_ids"));
    let want = ids(&r, "greedy_text_new_tokens");
    let got = bb
        .text_ids(&[question()], want.len(), &Members::current())
        .unwrap();
    assert_eq!(got[0], want);
    let out = bb
        .generate(&[question()], OutputKind::Text, want.len())
        .unwrap();
    assert_eq!(
        out[0],
        Output::Text(r["greedy_text_decoded"].as_str().unwrap().into())
    );

    let draw = Prompt {
        image: None,
        text: r["image_prompt"].as_str().unwrap().into(),
    };
    assert_eq!(
        bb.prepare(&draw, true).unwrap().ids,
        ids(&r, "image_prompt_ids")
    );
    assert_eq!(bb.guidance_scale(), Some(2.0));
    let codes = bb
        .image_code_ids(std::slice::from_ref(&draw), &Members::current())
        .unwrap();
    assert_eq!(codes[0], ids(&r, "cfg_image_tokens_api"));
    let Output::Image(img) = &bb
        .generate(std::slice::from_ref(&draw), OutputKind::Image, 0)
        .unwrap()[0]
    else {
        panic!("an image task must give an image");
    };
    let (_, nchw) = tensor(&r, "decode_cfg_tokens_nchw");
    assert_eq!(img.dimensions(), (8, 8));
    for c in 0..3 {
        for y in 0..8u32 {
            for x in 0..8u32 {
                let v = nchw[(c * 8 + y as usize) * 8 + x as usize];
                let want = ((v + 1.0) * 127.5).clamp(0.0, 255.0) as u8;
                let got = img.get_pixel(x, y).0[c];
                assert!(
                    got.abs_diff(want) <= 1,
                    "pixel ({x},{y},{c}): {got} vs {want}"
                );
            }
        }
    }
    let nocfg = JanusBackbone::load_with(
        &fixture("tiny_janus"),
        AdapterPlan::none(),
        &Device::Cpu,
        DType::F32,
        JanusSettings {
            guidance: Guidance::Off,
            ..Default::default()
        },
    )
    .unwrap();
    let codes = nocfg.image_code_ids(&[draw], &Members::current()).unwrap();
    assert_eq!(codes[0], ids(&r, "nocfg_image_tokens"));
}

fn lora_plan() -> AdapterPlan {
    AdapterPlan::lora(
        LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
        },
        11,
    )
}

/// A target image for the image-output examples: a red square on grey.
fn square(red: bool) -> RgbImage {
    RgbImage::from_fn(8, 8, |x, y| {
        let inside = (2..6).contains(&x) && (2..6).contains(&y);
        match (inside, red) {
            (true, true) => image::Rgb([220, 30, 30]),
            (true, false) => image::Rgb([30, 30, 220]),
            _ => image::Rgb([128, 128, 128]),
        }
    })
}

fn text_batch() -> Vec<Example> {
    vec![
        Example {
            prompt: question(),
            target: Target::Text("red square".into()),
        },
        Example {
            prompt: Prompt {
                image: None,
                text: "what is grey?".into(),
            },
            target: Target::Text("the background".into()),
        },
    ]
}

fn image_batch() -> Vec<Example> {
    vec![
        Example {
            prompt: Prompt {
                image: None,
                text: "draw a red square on a grey background.".into(),
            },
            target: Target::Image(square(true)),
        },
        Example {
            prompt: Prompt {
                image: None,
                text: "draw a square".into(),
            },
            target: Target::Image(square(false)),
        },
    ]
}

/// A few AdamW steps on a fixed batch, updating the adapters only (`lora_only`) or every
/// trainable variable: (first loss, last loss).
fn train(bb: &JanusBackbone, batch: &[Example], steps: usize, lora_only: bool) -> (f32, f32) {
    use candle_nn::Optimizer;
    let vars: Vec<_> = if lora_only {
        bb.plan.vars().into_values().collect()
    } else {
        bb.trainable().into_values().collect()
    };
    let mut opt = candle_nn::AdamW::new(
        vars,
        candle_nn::ParamsAdamW {
            lr: 2e-2,
            weight_decay: 0.0,
            ..Default::default()
        },
    )
    .unwrap();
    let mut first = None;
    let mut last = 0.0;
    for step in 0..steps {
        let loss = bb
            .loss(
                batch,
                Ctx {
                    train: true,
                    step_seed: step as u64,
                },
            )
            .unwrap();
        last = loss.to_scalar::<f32>().unwrap();
        assert!(last.is_finite(), "loss {last} at step {step}");
        first.get_or_insert(last);
        opt.backward_step(&loss).unwrap();
    }
    (first.unwrap(), last)
}

#[test]
fn text_target_loss_falls_with_lora() {
    let bb = backbone(lora_plan());
    let (first, last) = train(&bb, &text_batch(), 12, true);
    println!("text-target loss {first} -> {last}");
    assert!(last < 0.7 * first, "text loss {first} -> {last}");
}

#[test]
fn image_target_loss_falls_with_lora() {
    let bb = backbone(lora_plan());
    let (first, last) = train(&bb, &image_batch(), 25, true);
    println!("image-target loss {first} -> {last}");
    assert!(last < 0.7 * first, "image loss {first} -> {last}");
}

#[test]
fn every_trainable_variable_gets_a_gradient_on_a_mixed_batch() {
    let bb = backbone(lora_plan());
    let mut batch = text_batch();
    batch.extend(image_batch());
    // One step first: with B = 0 at init, every A's gradient is exactly zero.
    train(&bb, &batch, 1, false);
    let loss = bb.loss(&batch, Ctx::default()).unwrap();
    let grads = loss.backward().unwrap();
    let vars = bb.trainable();
    let adapters = bb.plan.vars();
    assert_eq!(
        adapters.len(),
        2 * 7 * 2,
        "A and B of 7 projections in 2 layers"
    );
    assert!(vars.keys().any(|k| k.starts_with("model.aligner.")));
    assert!(vars
        .keys()
        .any(|k| k.starts_with("model.generation_aligner.")));
    assert!(adapters
        .keys()
        .all(|k| k.starts_with("model.language_model.layers.")));
    for (name, v) in &vars {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{name} has no gradient"));
        let m = cnext_adapters::max_abs(g).unwrap();
        assert!(m > 0.0, "{name} has an all-zero gradient");
    }
    // The mixed loss is the token-weighted mean of its parts: between them.
    let lt = bb
        .loss(&text_batch(), Ctx::default())
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let li = bb
        .loss(&image_batch(), Ctx::default())
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let lm = loss.to_scalar::<f32>().unwrap();
    assert!(
        lm >= lt.min(li) - 1e-5 && lm <= lt.max(li) + 1e-5,
        "{lt} {li} {lm}"
    );
}

#[test]
fn ensemble_of_identical_members_equals_plain_decoding_and_restores_weights() {
    let bb = backbone(lora_plan());
    train(&bb, &text_batch(), 2, false);
    let current: std::collections::BTreeMap<String, Tensor> = bb
        .trainable()
        .into_iter()
        .map(|(k, v)| (k, v.as_tensor().copy().unwrap()))
        .collect();
    let zeros: std::collections::BTreeMap<String, Tensor> = current
        .iter()
        .map(|(k, t)| (k.clone(), t.zeros_like().unwrap()))
        .collect();
    let prompts = [question()];
    let plain = bb.generate(&prompts, OutputKind::Text, 5).unwrap();
    let ens = bb
        .generate_ensemble(
            &prompts,
            OutputKind::Text,
            5,
            &[current.clone(), current.clone()],
        )
        .unwrap();
    assert_eq!(plain, ens);
    let draw = [Prompt {
        image: None,
        text: "draw a square".into(),
    }];
    let plain = bb.generate(&draw, OutputKind::Image, 0).unwrap();
    let ens = bb
        .generate_ensemble(
            &draw,
            OutputKind::Image,
            0,
            &[current.clone(), current.clone()],
        )
        .unwrap();
    assert_eq!(plain, ens);
    // A member with other weights was swapped in and the current weights came back.
    bb.generate_ensemble(&prompts, OutputKind::Text, 3, &[zeros, current.clone()])
        .unwrap();
    for (k, v) in bb.trainable() {
        assert_eq!(flat(v.as_tensor()), flat(&current[&k]), "{k} not restored");
    }
}

#[test]
fn bad_directories_are_named_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let e = JanusBackbone::load(tmp.path(), AdapterPlan::none(), &Device::Cpu, DType::F32)
        .err()
        .expect("an empty directory must not load");
    assert!(e.to_string().contains("config.json"), "{e}");
    let src = fixture("tiny_janus");
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "generation_config.json",
        "preprocessor_config.json",
        "processor_config.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(src.join(f), tmp.path().join(f)).unwrap();
    }
    let body = std::fs::read_to_string(src.join("config.json")).unwrap();
    std::fs::write(
        tmp.path().join("config.json"),
        body.replace("\"model_type\": \"janus\"", "\"model_type\": \"llava\""),
    )
    .unwrap();
    let e = JanusBackbone::load(tmp.path(), AdapterPlan::none(), &Device::Cpu, DType::F32)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("config.json") && e.contains("janus"), "{e}");
    std::fs::write(tmp.path().join("config.json"), "{\"model_type\": ").unwrap();
    let e = JanusBackbone::load(tmp.path(), AdapterPlan::none(), &Device::Cpu, DType::F32)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("config.json") && e.contains("invalid JSON"),
        "{e}"
    );
    std::fs::write(tmp.path().join("config.json"), &body).unwrap();
    std::fs::write(tmp.path().join("tokenizer.json"), "not a tokenizer").unwrap();
    let e = JanusBackbone::load(tmp.path(), AdapterPlan::none(), &Device::Cpu, DType::F32)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("tokenizer.json"), "{e}");
}

#[test]
fn every_adapter_kind_and_plan_feature_works_on_the_janus_llm() {
    let r = reference("tiny_janus");
    let cfg = LoraConfig {
        r: 4,
        alpha: 4.0,
        dropout: 0.05,
    };
    let base = model().prompt_logits(&understanding_prompt(&r)).unwrap();
    for plan in [
        AdapterPlan::moelora(cfg.clone(), 2, 1),
        AdapterPlan::experts(cfg.clone(), 4, 1),
        AdapterPlan::lora(cfg.clone(), 1).with_mergeable_base(),
    ] {
        let kind = plan.kind();
        let bb = backbone(plan.clone());
        // B = 0 at init: the adapted model computes the base model's logits.
        let logits = bb.model.prompt_logits(&understanding_prompt(&r)).unwrap();
        assert!(max_diff(&flat(&logits), &flat(&base)) <= 1e-5, "{kind:?}");
        plan.set_recording(true);
        let loss = bb
            .loss(
                &text_batch(),
                Ctx {
                    train: true,
                    step_seed: 3,
                },
            )
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        plan.set_recording(false);
        assert!(loss.is_finite(), "{kind:?}");
        let inputs = plan.take_inputs();
        assert_eq!(
            inputs.len(),
            14,
            "{kind:?}: every adapted linear records its input"
        );
        assert_eq!(plan.adapted_paths().len(), 14);
        if plan.is_mergeable() {
            assert_eq!(plan.base_weights().len(), 14);
        }
    }
}
