//! The PEFT LoRA fixture (`shared/fixtures/peft_lora`): a tiny `LlamaForCausalLM` loaded by our
//! LLaMA, with and without the imported adapter, against transformers + peft logits; export
//! and re-import round-trips; the exported keys have the fixture's format.

mod common;

use candle_core::{DType, Device, Tensor};
use cnext_adapters::{AdapterPlan, Ctx, LoraConfig};
use cnext_backbones::janus::CausalLm;
use cnext_backbones::peft::{self, ExportOptions, PeftAdapter, PeftError};
use common::{fixture, flat, ids, max_diff, reference, tensor};

fn input_rows(r: &serde_json::Value) -> Vec<Vec<u32>> {
    let (shape, _) = tensor(r, "input_ids");
    let all = ids(r, "input_ids");
    all.chunks(shape[1]).map(|c| c.to_vec()).collect()
}

#[test]
fn base_logits_match_transformers() {
    let dir = fixture("peft_lora");
    let r = reference("peft_lora");
    let lm = CausalLm::load(
        &dir.join("base"),
        &AdapterPlan::none(),
        &Device::Cpu,
        DType::F32,
    )
    .expect("load base");
    let logits = lm.forward_ids(&input_rows(&r), Ctx::default()).unwrap();
    let (shape, want) = tensor(&r, "base_logits");
    assert_eq!(logits.dims(), shape.as_slice());
    let d = max_diff(&flat(&logits), &want);
    println!("peft base logits max abs diff {d:e}");
    assert!(d <= 1e-4, "base logits differ by {d}");
}

#[test]
fn adapted_logits_match_peft() {
    let dir = fixture("peft_lora");
    let r = reference("peft_lora");
    let adapter = PeftAdapter::read(&dir.join("adapter"), "default").expect("read adapter");
    let plan = adapter.plan(0);
    let lm = CausalLm::load(&dir.join("base"), &plan, &Device::Cpu, DType::F32).unwrap();
    adapter.apply(&plan).expect("apply adapter");
    let logits = lm.forward_ids(&input_rows(&r), Ctx::default()).unwrap();
    let (_, want) = tensor(&r, "adapted_logits");
    let d = max_diff(&flat(&logits), &want);
    println!("peft adapted logits max abs diff {d:e}");
    assert!(d <= 1e-4, "adapted logits differ by {d}");
    let last = logits.narrow(1, 8, 1).unwrap();
    let (_, want_last) = tensor(&r, "adapted_logits_last_position");
    assert!(max_diff(&flat(&last), &want_last) <= 1e-4);
    // The adapter matters: the base logits are far from the adapted ones.
    let (_, base) = tensor(&r, "base_logits");
    assert!(max_diff(&flat(&logits), &base) > 0.5);
}

#[test]
fn export_round_trips_bit_exactly_with_the_fixture_key_format() {
    let dir = fixture("peft_lora");
    let r = reference("peft_lora");
    let adapter = PeftAdapter::read(&dir.join("adapter"), "default").unwrap();
    let plan = adapter.plan(0);
    let _lm = CausalLm::load(&dir.join("base"), &plan, &Device::Cpu, DType::F32).unwrap();
    adapter.apply(&plan).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("exported");
    peft::export(&plan, &out, &ExportOptions::default()).unwrap();

    // Key set, shapes and dtype equal the fixture's list.
    let written =
        candle_core::safetensors::load(out.join(peft::WEIGHTS_FILE), &Device::Cpu).unwrap();
    let mut got: Vec<(String, Vec<usize>)> = written
        .iter()
        .map(|(k, t)| (k.clone(), t.dims().to_vec()))
        .collect();
    got.sort();
    let mut want: Vec<(String, Vec<usize>)> = r["adapter_safetensors_keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            assert_eq!(e[2], "F32");
            let shape = e[1]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as usize);
            (e[0].as_str().unwrap().to_string(), shape.collect())
        })
        .collect();
    want.sort();
    assert_eq!(got, want);
    assert!(written.values().all(|t| t.dtype() == DType::F32));

    // Re-import into a fresh plan: every variable bit-identical to the original file's.
    let again = PeftAdapter::read(&out, "default").unwrap();
    assert_eq!(again.config.r, 4);
    assert_eq!(again.config.lora_alpha, 8.0);
    // target_modules now names each adapted linear by its full path (PEFT adapts exactly
    // those); every one ends with a target of the original file.
    let paths: std::collections::BTreeSet<String> = plan.adapted_paths().into_iter().collect();
    assert_eq!(again.config.targets(), paths);
    assert!(paths.iter().all(|p| adapter.config.targets_module(p)));
    assert_eq!(again.weights.len(), adapter.weights.len());
    for (k, t) in &adapter.weights {
        let u = &again.weights[k];
        assert_eq!(flat(t), flat(u), "{k} changed in the round trip");
    }
    let plan2 = again.plan(7);
    let _lm2 = CausalLm::load(&dir.join("base"), &plan2, &Device::Cpu, DType::F32).unwrap();
    again.apply(&plan2).unwrap();
    for (k, v) in plan.vars() {
        assert_eq!(
            flat(v.as_tensor()),
            flat(plan2.vars()[&k].as_tensor()),
            "{k}"
        );
    }
}

#[test]
fn mismatching_plans_and_files_are_named_errors() {
    let dir = fixture("peft_lora");
    let adapter = PeftAdapter::read(&dir.join("adapter"), "default").unwrap();
    let cfg = LoraConfig {
        r: 8,
        alpha: 8.0,
        dropout: 0.0,
    };
    let e = adapter
        .check_plan(&AdapterPlan::lora(cfg.clone(), 0))
        .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("adapter_config.json") && msg.contains("r = 4"),
        "{msg}"
    );
    let mut fewer = adapter.plan(0);
    fewer.targets = vec!["q_proj".into()];
    let msg = adapter.check_plan(&fewer).unwrap_err().to_string();
    assert!(msg.contains("target_modules"), "{msg}");
    let moe = AdapterPlan::moelora(LoraConfig { r: 4, ..cfg }, 2, 0);
    assert!(adapter.check_plan(&moe).is_err());

    // A corrupt config names the file.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join(peft::CONFIG_FILE), "{not json").unwrap();
    let e = PeftAdapter::read(tmp.path(), "default").unwrap_err();
    assert!(matches!(e, PeftError::Json { .. }));
    assert!(e.to_string().contains("adapter_config.json"), "{e}");
    // A DoRA adapter is refused, not silently read as LoRA.
    let body = std::fs::read_to_string(dir.join("adapter").join(peft::CONFIG_FILE)).unwrap();
    std::fs::write(
        tmp.path().join(peft::CONFIG_FILE),
        body.replace("\"use_dora\": false", "\"use_dora\": true"),
    )
    .unwrap();
    let msg = PeftAdapter::read(tmp.path(), "default")
        .unwrap_err()
        .to_string();
    assert!(msg.contains("DoRA"), "{msg}");
}

#[test]
fn experts_export_as_one_lora_of_the_total_rank_and_routers_refuse() {
    let dir = fixture("peft_lora");
    let cfg = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
    };
    let plan = AdapterPlan::experts(cfg.clone(), 2, 3);
    let lm = CausalLm::load(&dir.join("base"), &plan, &Device::Cpu, DType::F32).unwrap();
    // Give every B a value so the delta is not zero.
    for (k, v) in plan.vars() {
        if k.contains(".lora_B.") {
            let n = v.elem_count();
            let vals: Vec<f32> = (0..n).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.01).collect();
            v.set(&Tensor::from_vec(vals, v.dims(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    let r = reference("peft_lora");
    let rows = input_rows(&r);
    let ours = lm.forward_ids(&rows, Ctx::default()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    peft::export(&plan, tmp.path(), &ExportOptions::default()).unwrap();
    let adapter = PeftAdapter::read(tmp.path(), "default").unwrap();
    assert_eq!(adapter.config.r, 4);
    let lora = adapter.plan(0);
    let lm2 = CausalLm::load(&dir.join("base"), &lora, &Device::Cpu, DType::F32).unwrap();
    adapter.apply(&lora).unwrap();
    let theirs = lm2.forward_ids(&rows, Ctx::default()).unwrap();
    let d = max_diff(&flat(&ours), &flat(&theirs));
    assert!(d <= 1e-5, "stacked experts differ from the experts by {d}");
    let base = CausalLm::load(
        &dir.join("base"),
        &AdapterPlan::none(),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap()
    .forward_ids(&rows, Ctx::default())
    .unwrap();
    assert!(
        max_diff(&flat(&ours), &flat(&base)) > 1e-3,
        "the experts changed nothing"
    );

    let moe = AdapterPlan::moelora(cfg, 2, 0);
    let _lm3 = CausalLm::load(&dir.join("base"), &moe, &Device::Cpu, DType::F32).unwrap();
    let e = peft::export(&moe, tmp.path(), &ExportOptions::default()).unwrap_err();
    assert!(matches!(e, PeftError::Unrepresentable(_)));
    assert!(e.to_string().contains("router"), "{e}");
}
