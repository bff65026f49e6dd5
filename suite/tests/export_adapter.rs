//! `cnext export-adapter` end to end on the tiny Janus fixture: a MAGE smoke chain (a few
//! steps) exported as a PEFT LoRA holds exactly what its stage entry holds (the four experts
//! as one LoRA of the total rank, the connectors in full under `modules_to_save`), loads
//! back through `cnext infer --adapter`, and what PEFT cannot represent is refused before
//! anything is written. Python PEFT loading such a directory was checked by hand (issue 20).

use candle_core::{Device, Tensor};
use cnext_backbones::peft::PeftAdapter;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixture(name: &str) -> PathBuf {
    // The suite's own lookup: CNEXT_FIXTURES, else <workspace>/../shared/fixtures.
    cnext_suite::profile::fixture(name).unwrap_or_else(|e| panic!("{e}"))
}

fn cnext(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cnext"))
        .args(args)
        .output()
        .expect("run cnext")
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "cnext failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The one stage entry of `method` at `stage` in a fresh cache.
fn entry(cache: &Path, method: &str, stage: usize) -> PathBuf {
    let prefix = format!("{method}-stage{stage}-");
    let hits: Vec<PathBuf> = std::fs::read_dir(cache.join("stages"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(&prefix)
        })
        .collect();
    assert_eq!(hits.len(), 1, "{hits:?}");
    hits[0].clone()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

#[test]
fn a_janus_mage_stage_exports_as_one_peft_lora_and_loads_back() {
    let janus = fixture("tiny_janus");
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let out = tmp.path().join("mage-adapter");
    let (c, o) = (cache.to_str().unwrap(), out.to_str().unwrap());
    let msg = ok(&cnext(&[
        "export-adapter",
        "--method",
        "mage",
        "--profile",
        "janus_smoke",
        "--steps",
        "3",
        "--cache",
        c,
        "--out",
        o,
    ]));
    assert!(msg.contains("mage stage 6"), "{msg}");

    let a = PeftAdapter::read(&out, "default").unwrap();
    assert_eq!(a.config.peft_type, "LORA");
    assert_eq!(a.config.r, 8);
    let targets = a.config.targets();
    assert_eq!(targets.len(), 14, "{targets:?}");
    assert!(targets
        .iter()
        .all(|t| t.starts_with("model.language_model.layers.")));
    assert_eq!(
        a.config.modules_to_save.clone().unwrap(),
        ["model.aligner", "model.generation_aligner"]
    );
    assert_eq!(
        a.config.base_model_name_or_path.as_deref(),
        Some(std::fs::canonicalize(&janus).unwrap().to_str().unwrap())
    );

    // Same numbers as the stage entry: connectors bit for bit, and each module's B A equal
    // to the sum of the four experts' B_i A_i.
    let stage = candle_core::safetensors::load(
        entry(&cache, "mage", 6).join("weights.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert!(!a.saved.is_empty());
    for (name, t) in &a.saved {
        assert_eq!(max_diff(t, &stage[name]), 0.0, "{name}");
    }
    for module in &targets {
        let w = |ab: &str| &a.weights[&format!("{module}.{ab}.default.weight")];
        let ours = w("lora_B").matmul(w("lora_A")).unwrap();
        let mut sum: Option<Tensor> = None;
        for i in 0..4 {
            let e = |ab: &str| &stage[&format!("{module}.{ab}.expert{i}.weight")];
            let d = e("lora_B").matmul(e("lora_A")).unwrap();
            sum = Some(match sum {
                Some(s) => (s + d).unwrap(),
                None => d,
            });
        }
        let d = max_diff(&ours, &sum.unwrap());
        assert!(d <= 1e-6, "{module}: stacked experts differ by {d}");
    }
    assert!(
        a.weights
            .iter()
            .filter(|(k, _)| k.contains(".lora_B."))
            .any(|(_, t)| max_diff(t, &t.zeros_like().unwrap()) > 0.0),
        "training left every lora_B at zero: the check above would be vacuous"
    );

    // The directory loads back as `cnext infer --adapter` reads it.
    let body = ok(&cnext(&[
        "infer",
        "--model",
        janus.to_str().unwrap(),
        "--adapter",
        o,
        "--prompt",
        "what color is the square?",
        "--max-new-tokens",
        "4",
        "--json",
    ]));
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(v["token_ids"].as_array().is_some_and(|t| !t.is_empty()));

    // Refusals: a router has no PEFT form; the built-in base has no Hugging Face model. Nothing written.
    for (args, why) in [
        (vec!["--method", "moelora"], "router"),
        (vec!["--profile", "smoke"], "built-in base"),
    ] {
        let bad = tmp.path().join("refused");
        let mut all = vec!["export-adapter", "--steps", "3", "--cache", c];
        all.extend(args);
        all.extend(["--out", bad.to_str().unwrap()]);
        let r = cnext(&all);
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(!r.status.success() && err.contains(why), "{err}");
        assert!(!bad.exists());
    }
}
