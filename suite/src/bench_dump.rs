//! What `bench/step_replica.py` needs to run the nano model's training step in PyTorch:
//! each batch as the model sees it (`<task>.safetensors`: the host-side inputs of
//! `NanoBackbone::loss_inputs`, plus the loss of the first weights without dropout, which the
//! replica must reproduce) and the weights (`weights.safetensors`: the frozen base, the
//! projector and the LoRA initialisation), with `meta.json` (model config, LoRA and
//! optimizer settings).

use anyhow::{Context, Result};
use candle_core::Tensor;
use cnext_adapters::{AdapterPlan, Ctx};
use cnext_backbones::{Backbone, Example};
use cnext_bases::nano::NanoBase;
use cnext_core::TaskId;
use std::collections::BTreeMap;
use std::path::Path;

/// The profile's nano base (loaded from the cache, built if missing), or `None` for another
/// backbone (the replica covers the nano model only).
pub fn nano_base(bench: &cnext_suite::setup::Bench) -> Result<Option<NanoBase>> {
    let sources = bench
        .profile
        .sources(bench.seed)
        .map_err(|e| anyhow::anyhow!(e))?;
    let cnext_bases::BaseSpec::Nano(cfg) = &sources.base else {
        return Ok(None);
    };
    let dev = candle_core::Device::Cpu;
    let base = cnext_bases::nano::ensure_base(&bench.cache, &bench.data_root, cfg, &dev, false)?;
    Ok(Some(base))
}

/// The padded sequence length of `batch`.
pub fn sequence_len(base: &NanoBase, batch: &[Example]) -> Result<usize> {
    let inputs = base.model(AdapterPlan::none())?.loss_inputs(batch)?;
    let positions = inputs.get("positions").context("no positions")?;
    Ok(positions.dim(0)? / batch.len().max(1))
}

fn write(map: &BTreeMap<String, Tensor>, path: &Path) -> Result<()> {
    // safetensors sorts by name itself, so the file does not depend on the map's order.
    let map: std::collections::HashMap<&str, Tensor> =
        map.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    cnext_core::fsx::write_atomic_with(path, |tmp| {
        candle_core::safetensors::save(&map, tmp).map_err(std::io::Error::other)
    })
    .with_context(|| format!("writing {}", path.display()))
}

/// `<dir>/<task>.safetensors` for `batch`, with the loss of `plan`'s first weights (no
/// dropout) under `loss`.
pub fn batch(
    base: &NanoBase,
    plan: &AdapterPlan,
    task: TaskId,
    batch: &[Example],
    dir: &Path,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let model = base.model(plan.clone())?;
    let mut map = model.loss_inputs(batch)?;
    let loss = model.loss(batch, Ctx::default())?.to_scalar::<f32>()?;
    map.insert(
        "loss".into(),
        Tensor::new(&[loss], &candle_core::Device::Cpu)?,
    );
    write(&map, &dir.join(format!("{task}.safetensors")))
}

/// `<dir>/weights.safetensors` and `<dir>/meta.json`.
pub fn weights(
    base: &NanoBase,
    plan: &AdapterPlan,
    optim: &cnext_harness::optim::AdamWConfig,
    dir: &Path,
) -> Result<()> {
    let model = base.model(plan.clone())?;
    let mut map = base.weights.clone();
    for (name, var) in model.trainable() {
        map.insert(name, var.as_tensor().copy()?);
    }
    write(&map, &dir.join("weights.safetensors"))?;
    let lora = plan
        .lora
        .clone()
        .context("the replica's plan has no LoRA")?;
    let meta = serde_json::json!({
        "config": base.cfg,
        "lora": {"r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout},
        "optim": optim,
        "trainable": model.trainable().keys().collect::<Vec<_>>(),
    });
    let path = dir.join("meta.json");
    cnext_core::fsx::write_atomic(&path, serde_json::to_string_pretty(&meta)?.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}
