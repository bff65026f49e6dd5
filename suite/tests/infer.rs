//! `cnext infer` end to end on the reference fixtures (`shared/fixtures`): the tiny Janus's
//! greedy text and CFG image codes as transformers produced them, the PEFT fixture through
//! `--adapter` against greedy tokens computed in-process from merged weights, and bad input.

use cnext_adapters::AdapterPlan;
use cnext_backbones::janus::{CausalLm, DType, Device};
use cnext_backbones::peft::PeftAdapter;
use serde_json::Value;
use std::path::PathBuf;
use std::process::{Command, Output};

/// `<workspace root>/../shared/fixtures`, or `CNEXT_FIXTURES`; a clear failure when missing.
fn fixture(name: &str) -> PathBuf {
    // The suite's own lookup: CNEXT_FIXTURES, else <workspace>/../shared/fixtures.
    cnext_suite::profile::fixture(name).unwrap_or_else(|e| panic!("{e}"))
}

fn reference(name: &str) -> Value {
    let p = fixture(name).join("reference.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    let a = if v.is_array() { v } else { &v["data"] };
    a.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn cnext(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cnext"))
        .env("RAYON_NUM_THREADS", "1")
        .args(args)
        .output()
        .expect("run cnext")
}

fn json_of(o: &Output) -> Value {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "cnext failed: {err}");
    serde_json::from_str(&String::from_utf8_lossy(&o.stdout)).expect("one JSON object")
}

#[test]
fn janus_greedy_text_reproduces_the_fixture() {
    let dir = fixture("tiny_janus");
    let r = reference("tiny_janus");
    let want = ids(&r["greedy_text_new_tokens"]);
    let img = dir.join("inputs/janus_input_36x24.png");
    let o = cnext(&[
        "infer",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "what color is the square?",
        "--image",
        img.to_str().unwrap(),
        "--max-new-tokens",
        &want.len().to_string(),
        "--json",
    ]);
    let v = json_of(&o);
    assert_eq!(ids(&v["token_ids"]), want);
    assert_eq!(v["text"], r["greedy_text_decoded"]);
}

#[test]
fn janus_cfg_image_reproduces_the_fixture() {
    let dir = fixture("tiny_janus");
    let r = reference("tiny_janus");
    let tmp = tempfile::tempdir().unwrap();
    let png = tmp.path().join("out.png");
    let o = cnext(&[
        "infer",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        r["image_prompt"].as_str().unwrap(),
        "--output",
        "image",
        "--out",
        png.to_str().unwrap(),
        "--json",
    ]);
    let v = json_of(&o);
    assert_eq!(ids(&v["token_ids"]), ids(&r["cfg_image_tokens_api"]));
    assert_eq!(v["image"].as_str().unwrap(), png.to_str().unwrap());
    let img = image::open(&png).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (8, 8));
}

#[test]
fn peft_adapter_greedy_tokens_equal_the_merged_model() {
    let dir = fixture("peft_lora");
    let r = reference("peft_lora");
    let all = ids(&r["input_ids"]);
    let prompt: Vec<u32> = all[..9].to_vec();
    let n = 6;

    // In-process: base weights with W + (alpha/r) B A merged in, adapters then zeroed.
    let adapter = PeftAdapter::read(&dir.join("adapter"), "default").unwrap();
    let plan = adapter.plan(0).with_mergeable_base();
    let lm = CausalLm::load(&dir.join("base"), &plan, &Device::Cpu, DType::F32).unwrap();
    adapter.apply(&plan).unwrap();
    let bases = plan.base_weights();
    for path in plan.adapted_paths() {
        let w = &bases[&format!("{path}.weight")];
        let merged = (w.as_tensor() + plan.delta(&path).unwrap()).unwrap();
        w.set(&merged).unwrap();
    }
    for (name, v) in plan.vars() {
        if name.contains(".lora_B.") {
            v.set(&v.as_tensor().zeros_like().unwrap()).unwrap();
        }
    }
    let eos = lm.config().eos_ids();
    let (merged, _) = lm
        .generate_greedy(std::slice::from_ref(&prompt), n, &eos)
        .unwrap();

    let base_only = CausalLm::load(
        &dir.join("base"),
        &AdapterPlan::none(),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap()
    .generate_greedy(std::slice::from_ref(&prompt), n, &eos)
    .unwrap()
    .0;

    let ids_arg = prompt
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let base = dir.join("base");
    let adapter_dir = dir.join("adapter");
    let run = |with_adapter: bool| {
        let mut args = vec![
            "infer",
            "--model",
            base.to_str().unwrap(),
            "--prompt-ids",
            &ids_arg,
            "--max-new-tokens",
            "6",
            "--json",
        ];
        if with_adapter {
            args.extend(["--adapter", adapter_dir.to_str().unwrap()]);
        }
        let v = json_of(&cnext(&args));
        assert!(v["text"].is_null(), "the fixture has no tokenizer: no text");
        ids(&v["token_ids"])
    };
    assert_eq!(run(true), merged[0], "adapted greedy tokens");
    assert_eq!(run(false), base_only[0], "base greedy tokens");
    assert_ne!(
        merged[0], base_only[0],
        "the adapter must change the tokens here"
    );
}

#[test]
fn bad_input_is_a_named_error_not_a_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope");
    let o = cnext(&[
        "infer",
        "--model",
        missing.to_str().unwrap(),
        "--prompt",
        "x",
    ]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success());
    assert!(err.contains("nope") && !err.contains("panicked"), "{err}");

    let dir = tmp.path().join("model");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("config.json"), "{\"model_type\": \"janus\", ").unwrap();
    let o = cnext(&["infer", "--model", dir.to_str().unwrap(), "--prompt", "x"]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success());
    assert!(
        err.contains("config.json") && !err.contains("panicked"),
        "{err}"
    );

    // A config that parses but lacks the weights and required fields: still named.
    std::fs::write(dir.join("config.json"), "{\"model_type\": \"janus\"}").unwrap();
    let o = cnext(&["infer", "--model", dir.to_str().unwrap(), "--prompt", "x"]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success());
    assert!(
        err.contains("config.json") && !err.contains("panicked"),
        "{err}"
    );

    // Two placeholders for one image, and an image that is not one: named, no weights needed.
    let janus = fixture("tiny_janus");
    let img = janus.join("inputs/janus_input_36x24.png");
    let o = cnext(&[
        "infer",
        "--model",
        janus.to_str().unwrap(),
        "--prompt",
        "<image_placeholder><image_placeholder> x",
        "--image",
        img.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success());
    assert!(
        err.contains("has 2 <image_placeholder> but 1 image"),
        "{err}"
    );
    let not_png = tmp.path().join("broken.png");
    std::fs::write(&not_png, b"not a png").unwrap();
    let o = cnext(&[
        "infer",
        "--model",
        janus.to_str().unwrap(),
        "--prompt",
        "x",
        "--image",
        not_png.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success());
    assert!(
        err.contains("broken.png") && !err.contains("panicked"),
        "{err}"
    );

    // A LLaMA directory cannot draw; a corrupt adapter config is named.
    let base = fixture("peft_lora").join("base");
    let o = cnext(&[
        "infer",
        "--model",
        base.to_str().unwrap(),
        "--prompt-ids",
        "1,2",
        "--output",
        "image",
        "--out",
        "x.png",
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("text only"));
    let bad = tmp.path().join("adapter");
    std::fs::create_dir(&bad).unwrap();
    std::fs::write(bad.join("adapter_config.json"), "[").unwrap();
    let o = cnext(&[
        "infer",
        "--model",
        base.to_str().unwrap(),
        "--adapter",
        bad.to_str().unwrap(),
        "--prompt-ids",
        "1,2",
    ]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success());
    assert!(
        err.contains("adapter_config.json") && !err.contains("panicked"),
        "{err}"
    );
}
