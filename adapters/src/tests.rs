use super::*;
use crate::linear::dropout;
use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use std::collections::HashMap;

const P: &str = "llm.layers.3.self_attn.q_proj";
const DIN: usize = 6;
const DOUT: usize = 4;

fn build(plan: &AdapterPlan) -> (VarMap, Linear) {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let l = linear(DIN, DOUT, true, vb.pp(P), plan).unwrap();
    (vm, l)
}

fn tensor(seed: u64, name: &str, shape: &[usize], std: f64) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(normal_values(seed, name, n, std), shape, &Device::Cpu).unwrap()
}

/// Frozen base weights as a backbone gets them (plain tensors, not variables), seeded.
fn frozen_base() -> HashMap<String, Tensor> {
    HashMap::from([
        (format!("{P}.weight"), tensor(11, "w", &[DOUT, DIN], 0.5)),
        (format!("{P}.bias"), tensor(12, "b", &[DOUT], 0.5)),
    ])
}

fn build_frozen(plan: &AdapterPlan) -> Linear {
    let vb = VarBuilder::from_tensors(frozen_base(), DType::F32, &Device::Cpu);
    linear(DIN, DOUT, true, vb.pp(P), plan).unwrap()
}

fn vals(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(&(a - b).unwrap()).unwrap()
}

/// Gives every B (and where asked the router) non-zero values, so every path carries signal.
fn randomize(plan: &AdapterPlan, router_std: f64) {
    for (k, v) in plan.vars() {
        let std = if k.contains(".lora_B.") {
            0.5
        } else if k.contains(".lora_router.") {
            router_std
        } else {
            continue;
        };
        plan.set(&k, &tensor(5, &k, v.dims(), std)).unwrap();
    }
}

fn cfg() -> LoraConfig {
    LoraConfig {
        r: 8,
        alpha: 16.0,
        dropout: 0.1,
    }
}

fn all_kinds() -> Vec<AdapterPlan> {
    vec![
        AdapterPlan::lora(cfg(), 7),
        AdapterPlan::moelora(cfg(), 4, 7),
        AdapterPlan::experts(cfg(), 4, 7),
    ]
}

fn var(plan: &AdapterPlan, kind: &str, adapter: &str) -> Var {
    plan.vars()[&format!("{P}.{kind}.{adapter}.weight")].clone()
}

#[test]
fn names_are_peft_like_and_targets_go_by_suffix() {
    let plan = AdapterPlan::lora(LoraConfig::default(), 1);
    let (_vm, l) = build(&plan);
    assert!(l.has_adapter());
    let names: Vec<String> = plan.vars().into_keys().collect();
    assert_eq!(
        names,
        vec![
            "llm.layers.3.self_attn.q_proj.lora_A.default.weight",
            "llm.layers.3.self_attn.q_proj.lora_B.default.weight"
        ]
    );
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let p = linear(6, 4, false, vb.pp("vision.proj"), &plan).unwrap();
    assert!(!p.has_adapter());
    assert_eq!(plan.adapted_paths(), vec![P.to_string()]);
}

#[test]
fn expert_kinds_have_one_var_per_expert_factor_and_a_router_for_moelora() {
    let moe = AdapterPlan::moelora(cfg(), 4, 1);
    assert_eq!(moe.kind(), AdapterKind::MoeLora { experts: 4 });
    build_frozen(&moe);
    let vars = moe.vars();
    let mut want: Vec<String> = (0..4)
        .map(|i| format!("{P}.lora_A.expert{i}.weight"))
        .chain((0..4).map(|i| format!("{P}.lora_B.expert{i}.weight")))
        .collect();
    want.push(format!("{P}.lora_router.default.weight"));
    assert_eq!(vars.keys().cloned().collect::<Vec<_>>(), want);
    assert_eq!(vars[&want[0]].dims(), &[2, DIN]); // rank r/E = 2
    assert_eq!(vars[&want[4]].dims(), &[DOUT, 2]);
    assert_eq!(vars[&want[8]].dims(), &[4, DIN]);
    assert_eq!(moe.expert_vars(2).len(), 2);
    assert!(moe.expert_vars(2).keys().all(|k| k.contains(".expert2.")));
    assert!(moe.expert_vars(4).is_empty());
    assert!(!format!("{moe:?}").is_empty());

    let mage = AdapterPlan::experts(cfg(), 4, 1);
    build_frozen(&mage);
    let names: Vec<String> = mage.vars().into_keys().collect();
    assert_eq!(names, want[..8].to_vec());

    // Experts must share the total rank exactly.
    let bad = AdapterPlan::experts(cfg(), 3, 1);
    assert!(bad.validate().is_err());
    let vb = VarBuilder::from_tensors(frozen_base(), DType::F32, &Device::Cpu);
    let err = linear(DIN, DOUT, true, vb.pp(P), &bad).unwrap_err();
    assert!(err.to_string().contains("multiple"), "{err}");
}

#[test]
fn adapter_kind_config_round_trips_and_rejects_unknown_fields() {
    for k in [
        AdapterKind::Lora,
        AdapterKind::MoeLora { experts: 4 },
        AdapterKind::Experts { experts: 4 },
    ] {
        let s = serde_json::to_string(&k).unwrap();
        assert_eq!(serde_json::from_str::<AdapterKind>(&s).unwrap(), k, "{s}");
    }
    assert_eq!(
        serde_json::from_str::<AdapterKind>(r#"{"kind":"moe_lora","experts":4}"#).unwrap(),
        AdapterKind::MoeLora { experts: 4 }
    );
    assert!(
        serde_json::from_str::<AdapterKind>(r#"{"kind":"experts","experts":4,"x":1}"#).is_err()
    );
    assert!(serde_json::from_str::<AdapterKind>(r#"{"kind":"moelora","experts":4}"#).is_err());
    assert!(serde_json::from_str::<AdapterKind>(r#"{"kind":"lora","experts":4}"#).is_err());
    assert!(serde_json::from_str::<AdapterKind>(r#"{"kind":"lora","x":1}"#).is_err());
    assert!(serde_json::from_str::<AdapterKind>(r#"{"kind":"experts"}"#).is_err());
    assert_eq!(
        serde_json::from_str::<AdapterKind>(r#"{"kind":"lora"}"#).unwrap(),
        AdapterKind::Lora
    );
}

#[test]
fn zero_b_leaves_outputs_unchanged_and_init_is_deterministic() {
    let plan = AdapterPlan::lora(LoraConfig::default(), 7);
    let (vm, l) = build(&plan);
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let plain = linear(
        6,
        4,
        true,
        vb.pp("llm.layers.3.self_attn.q_proj"),
        &AdapterPlan::none(),
    )
    .unwrap();
    let x = Tensor::from_vec(normal_values(3, "x", 12, 1.0), (2, 6), &Device::Cpu).unwrap();
    let d = (l.forward(&x).unwrap() - plain.forward(&x).unwrap()).unwrap();
    assert_eq!(max_abs(&d).unwrap(), 0.0);
    let again = AdapterPlan::lora(LoraConfig::default(), 7);
    let _ = build(&again);
    let key = "llm.layers.3.self_attn.q_proj.lora_A.default.weight";
    let a1 = vals(plan.vars()[key].as_tensor());
    let a2 = vals(again.vars()[key].as_tensor());
    assert_eq!(a1, a2);
    let std = (a1.iter().map(|v| v * v).sum::<f32>() / a1.len() as f32).sqrt();
    assert!(std > 0.005 && std < 0.02, "{std}");
}

#[test]
fn zero_b_is_bit_identical_to_the_base_for_every_kind() {
    let base = build_frozen(&AdapterPlan::none());
    let x = tensor(3, "x", &[2, 3, DIN], 1.0);
    let want = vals(&base.forward(&x).unwrap());
    let mut plans = all_kinds();
    plans.extend(all_kinds().into_iter().map(|p| p.with_mergeable_base()));
    for plan in plans {
        let l = build_frozen(&plan);
        for train in [false, true] {
            let ctx = Ctx {
                train,
                step_seed: 9,
            };
            let got = vals(&l.forward_ctx(&x, ctx).unwrap());
            assert_eq!(got, want, "{:?} train={train}", plan.kind());
        }
        // Every A is N(0, 0.01^2) and seeded by its name: experts differ from each other.
        for (k, v) in plan.vars() {
            if k.contains(".lora_B.") {
                assert_eq!(max_abs(v.as_tensor()).unwrap(), 0.0, "{k}");
            }
        }
    }
    let moe = AdapterPlan::moelora(cfg(), 4, 7);
    build_frozen(&moe);
    assert_ne!(
        vals(var(&moe, "lora_A", "expert0").as_tensor()),
        vals(var(&moe, "lora_A", "expert1").as_tensor())
    );
}

#[test]
fn stacked_experts_equal_the_sum_of_separate_loras() {
    let plan = AdapterPlan::experts(cfg(), 4, 3);
    let l = build_frozen(&plan);
    randomize(&plan, 0.0);
    let base = build_frozen(&AdapterPlan::none());
    let x = tensor(4, "x", &[2, 3, DIN], 1.0);
    let s = 16.0 / 8.0;
    let mut want = base.forward(&x).unwrap();
    for i in 0..4 {
        let a = var(&plan, "lora_A", &format!("expert{i}"));
        let b = var(&plan, "lora_B", &format!("expert{i}"));
        let h = x.broadcast_matmul(&a.as_tensor().t().unwrap()).unwrap();
        let d = h.broadcast_matmul(&b.as_tensor().t().unwrap()).unwrap();
        want = (want + (d * s).unwrap()).unwrap();
    }
    let got = l.forward(&x).unwrap();
    assert!(diff(&got, &want) < 1e-5, "{}", diff(&got, &want));
    // The adapter does contribute (otherwise the check above is vacuous).
    assert!(diff(&got, &base.forward(&x).unwrap()) > 1e-3);
}

#[test]
fn moelora_equals_the_dense_formula_with_an_explicit_softmax() {
    let plan = AdapterPlan::moelora(cfg(), 4, 3);
    let l = build_frozen(&plan);
    // A large router so the gate is far from uniform and a wrong expert order would show.
    randomize(&plan, 1.0);
    let base = build_frozen(&AdapterPlan::none());
    let rows = 5;
    let x = tensor(4, "x", &[rows, DIN], 1.0);
    let s = 16.0 / 8.0;
    let r = var(&plan, "lora_router", "default");
    let logits = x.matmul(&r.as_tensor().t().unwrap()).unwrap();
    let logits = logits.to_vec2::<f32>().unwrap();
    let gate: Vec<Vec<f32>> = logits
        .iter()
        .map(|row| {
            let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = row.iter().map(|v| (v - m).exp()).collect();
            let z: f32 = e.iter().sum();
            e.iter().map(|v| v / z).collect()
        })
        .collect();
    let spread = gate
        .iter()
        .flatten()
        .fold(0f32, |m, g| m.max((g - 0.25).abs()));
    assert!(spread > 0.05, "gate too uniform for a meaningful check");
    let mut want = base.forward(&x).unwrap();
    for i in 0..4 {
        let a = var(&plan, "lora_A", &format!("expert{i}"));
        let b = var(&plan, "lora_B", &format!("expert{i}"));
        let d = x
            .matmul(&a.as_tensor().t().unwrap())
            .unwrap()
            .matmul(&b.as_tensor().t().unwrap())
            .unwrap();
        let g: Vec<f32> = gate.iter().map(|row| row[i]).collect();
        let g = Tensor::from_vec(g, (rows, 1), &Device::Cpu).unwrap();
        want = (want + (d.broadcast_mul(&g).unwrap() * s).unwrap()).unwrap();
    }
    let got = l.forward(&x).unwrap();
    assert!(diff(&got, &want) < 1e-5, "{}", diff(&got, &want));
    // MoELoRA cannot be merged: its delta depends on the token.
    assert!(plan.delta(P).is_err());
}

#[test]
fn every_adapter_variable_gets_a_gradient() {
    for plan in all_kinds() {
        let l = build_frozen(&plan);
        randomize(&plan, 0.5);
        let x = tensor(4, "x", &[2, 3, DIN], 1.0);
        let ctx = Ctx {
            train: true,
            step_seed: 1,
        };
        let y = l.forward_ctx(&x, ctx).unwrap();
        let loss = y.sqr().unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let vars = plan.vars();
        let router = matches!(plan.kind(), AdapterKind::MoeLora { .. });
        assert_eq!(vars.len(), 2 * plan.kind().experts() + usize::from(router));
        for (k, v) in vars {
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("no grad: {k}"));
            assert!(max_abs(g).unwrap() > 0.0, "zero grad: {k}");
        }
    }
}

#[test]
fn an_expert_without_gradients_stays_bit_identical_through_an_update() {
    let plan = AdapterPlan::experts(cfg(), 4, 2);
    let l = build_frozen(&plan);
    randomize(&plan, 0.0);
    let frozen = plan.expert_vars(1);
    assert_eq!(frozen.len(), 2);
    let before: Vec<Vec<f32>> = frozen.values().map(|v| vals(v.as_tensor())).collect();
    let a0 = var(&plan, "lora_A", "expert0");
    let a0_before = vals(a0.as_tensor());
    let mut opt = candle_nn::AdamW::new(
        plan.vars().into_values().collect(),
        candle_nn::ParamsAdamW {
            lr: 1e-2,
            weight_decay: 0.1,
            ..Default::default()
        },
    )
    .unwrap();
    let x = tensor(4, "x", &[2, 3, DIN], 1.0);
    let y = l
        .forward_ctx(
            &x,
            Ctx {
                train: true,
                step_seed: 3,
            },
        )
        .unwrap();
    let mut grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    for v in frozen.values() {
        assert!(grads.remove(v.as_tensor()).is_some());
    }
    opt.step(&grads).unwrap();
    let after: Vec<Vec<f32>> = frozen.values().map(|v| vals(v.as_tensor())).collect();
    assert_eq!(before, after);
    assert_ne!(a0_before, vals(a0.as_tensor()));
}

#[test]
fn recording_keeps_flattened_detached_inputs_only_while_on() {
    let plan = AdapterPlan::lora(cfg(), 1);
    let l = build_frozen(&plan);
    let x = tensor(4, "x", &[2, 3, DIN], 1.0);
    l.forward(&x).unwrap();
    assert!(plan.take_inputs().is_empty(), "recording is off by default");

    plan.set_recording(true);
    let xv = Var::from_tensor(&x).unwrap();
    l.forward(xv.as_tensor()).unwrap();
    l.forward(&tensor(5, "x2", &[4, DIN], 1.0)).unwrap();
    let got = plan.take_inputs();
    assert_eq!(got.keys().cloned().collect::<Vec<_>>(), vec![P.to_string()]);
    let xs = &got[P];
    assert_eq!(xs.len(), 2);
    assert_eq!(xs[0].dims(), &[6, DIN]);
    assert_eq!(xs[1].dims(), &[4, DIN]);
    assert!(!xs[0].track_op(), "recorded inputs must not carry a graph");
    assert_eq!(vals(&xs[0]), vals(&x));
    assert!(plan.take_inputs().is_empty(), "take_inputs clears");

    plan.set_recording(false);
    l.forward(&x).unwrap();
    assert!(plan.take_inputs().is_empty());
}

#[test]
fn a_linear_without_adapter_records_nothing() {
    let plan = AdapterPlan::lora(cfg(), 1);
    plan.set_recording(true);
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let p = linear(DIN, DOUT, false, vb.pp("vision.proj"), &plan).unwrap();
    p.forward(&tensor(4, "x", &[2, DIN], 1.0)).unwrap();
    assert!(plan.take_inputs().is_empty());
}

#[test]
fn merging_into_a_mergeable_base_preserves_the_function() {
    for plan in [
        AdapterPlan::lora(cfg(), 1).with_mergeable_base(),
        AdapterPlan::experts(cfg(), 4, 1).with_mergeable_base(),
    ] {
        let shared = frozen_base();
        let w_name = format!("{P}.weight");
        let w_orig = vals(&shared[&w_name]);
        let vb = VarBuilder::from_tensors(shared.clone(), DType::F32, &Device::Cpu);
        let l = linear(DIN, DOUT, true, vb.pp(P), &plan).unwrap();
        randomize(&plan, 0.0);
        let bases = plan.base_weights();
        assert_eq!(
            bases.keys().cloned().collect::<Vec<_>>(),
            vec![w_name.clone()]
        );
        assert!(
            !plan.vars().contains_key(&w_name),
            "base must never be trained"
        );
        assert_eq!(plan.adapted_paths(), vec![P.to_string()]);
        let base = &bases[&w_name];

        // The base weight gets no gradient, the adapter does.
        let x = tensor(4, "x", &[2, 3, DIN], 1.0);
        let xv = Var::from_tensor(&x).unwrap();
        let y = l.forward(xv.as_tensor()).unwrap();
        let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        assert!(grads.get(base.as_tensor()).is_none());
        assert!(grads.get(l.weight()).is_none());
        assert!(grads.get(xv.as_tensor()).is_some());
        for v in plan.vars().values() {
            assert!(grads.get(v.as_tensor()).is_some());
        }

        let before = l.forward(&x).unwrap();
        let delta = plan.delta(P).unwrap().detach();
        assert_eq!(delta.dims(), &[DOUT, DIN]);
        base.set(&(base.as_tensor() + &delta).unwrap()).unwrap();
        for (k, v) in plan.vars() {
            if k.contains(".lora_B.") {
                plan.set(&k, &v.zeros_like().unwrap()).unwrap();
            }
        }
        let after = l.forward(&x).unwrap();
        assert!(diff(&before, &after) < 1e-5, "{}", diff(&before, &after));
        assert!(max_abs(&delta).unwrap() > 1e-3, "merge moved nothing");
        // The merge changed this layer only: the backbone's shared base tensor is untouched.
        assert_eq!(vals(&shared[&w_name]), w_orig);
    }
    assert!(AdapterPlan::lora(cfg(), 1).base_weights().is_empty());
    let plain = AdapterPlan::lora(cfg(), 1);
    build_frozen(&plain);
    assert!(plain.base_weights().is_empty());
    assert!(plain.delta("nowhere").is_err());
}

#[test]
fn dropout_keeps_about_one_minus_p_and_rescales() {
    let x = Tensor::ones((100, 100), DType::F32, &Device::Cpu).unwrap();
    let y = vals(&dropout(&x, 0.05, 1, "n").unwrap());
    let kept = y.iter().filter(|v| **v > 0.0).count() as f64 / 1e4;
    assert!((kept - 0.95).abs() < 0.01, "{kept}");
    let mean = y.iter().sum::<f32>() / 1e4;
    assert!((mean - 1.0).abs() < 0.02);
}
