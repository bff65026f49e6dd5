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
