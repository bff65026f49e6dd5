//! `cnext export-adapter`: one stage of a method's chain as a PEFT LoRA directory that
//! Python PEFT loads onto the Hugging Face model (`PeftModel.from_pretrained`) and
//! `cnext infer --adapter` reads. The stage comes from the stage cache, trained first when it
//! is missing, with the same flags and keys as `cnext run`.
//!
//! What PEFT can represent: plain LoRA, and MAGE's equal-weight experts as one LoRA of the
//! total rank; trained connectors (Janus's aligners) go in full under `modules_to_save`.
//! What it cannot, and is refused with the reason: MoELoRA's router, RegLoRA's merged base
//! weights, and LAE's decoding from an ensemble of weight sets.

use anyhow::{bail, Context, Result};
use cnext_backbones::peft::{self, ExportOptions};
use cnext_core::Order;
use cnext_harness::device::DeviceSpec;
use cnext_harness::method::{MethodEntry, Schedule};
use cnext_suite::profile::{Overrides, Profile};
use cnext_suite::setup::{cache_dir, Bench};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    /// A registered method (`cnext_baselines::ALL`).
    #[arg(long, default_value = "lora", value_parser = crate::parse_method)]
    method: &'static MethodEntry,
    #[arg(long, default_value = "default_order")]
    order: Order,
    #[arg(long, default_value = "janus_smoke")]
    profile: Profile,
    /// A Janus / Janus-Pro model directory instead of the profile's base.
    #[arg(long)]
    model: Option<PathBuf>,
    /// 1-based stage (default: the last).
    #[arg(long)]
    stage: Option<usize>,
    /// Training seed of the chain.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 0)]
    data_seed: u64,
    #[arg(long)]
    steps: Option<usize>,
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long, value_name = "PATH=VALUE", value_parser = crate::parse_override)]
    set: Vec<(String, serde_json::Value)>,
    #[arg(long)]
    cache: Option<PathBuf>,
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// The adapter directory to write.
    #[arg(long)]
    out: PathBuf,
}

pub fn export_cmd(a: ExportArgs) -> Result<()> {
    let overrides: BTreeMap<_, _> = a.set.iter().cloned().collect();
    let factory = a
        .method
        .with_overrides(&overrides)
        .map_err(|e| anyhow::anyhow!("--set: {e}"))?;
    let overrides = Overrides {
        model: a.model.clone(),
        ..Overrides::default()
    };
    let sources = a
        .profile
        .sources_with(a.data_seed, overrides)
        .map_err(|e| anyhow::anyhow!(e))?;
    let Some(model_dir) = sources.base.hf_dir().map(Path::to_path_buf) else {
        bail!(
            "--profile {}: the built-in base has no Hugging Face model for PEFT to load onto; \
             export from janus_smoke or paper, or with --model DIR",
            a.profile
        );
    };
    let bench = Bench::open_with(
        a.profile,
        a.data_seed,
        cache_dir(a.cache),
        &sources,
        a.device,
    )?;
    let cfg = bench.run_config(a.order, a.seed, a.steps, a.lr);
    let chain = bench.chain(&cfg, factory.clone())?;
    let mut method = factory();
    let last = match method.schedule() {
        Schedule::Joint => 1,
        _ => a.order.tasks().len(),
    };
    let k = a.stage.unwrap_or(last);
    if !(1..=last).contains(&k) {
        bail!("--stage {k}: the chain has stages 1..={last}");
    }
    let entry = chain.ensure(k)?;

    // The stage's model: the method's plan, its variables set from the entry.
    let plan = method.adapters(&cfg.lora, cfg.seed);
    let model = bench.base.build(plan.clone())?;
    let dev = bench.base.device();
    let weights_path = entry.dir.join("weights.safetensors");
    let weights = candle_core::safetensors::load(&weights_path, dev)
        .with_context(|| format!("reading {}", weights_path.display()))?;
    let vars = model.trainable();
    for (name, var) in &vars {
        let t = weights
            .get(name)
            .with_context(|| format!("{}: no tensor `{name}`", weights_path.display()))?;
        var.set(t)?;
    }
    let state_path = entry.dir.join("method_state.safetensors");
    if state_path.exists() {
        let state = candle_core::safetensors::load(&state_path, dev)
            .with_context(|| format!("reading {}", state_path.display()))?;
        method.load_state(state.into_iter().collect())?;
    }
    if let Some(sets) = method.ensemble(&vars)? {
        bail!(
            "{}: decodes with the max over an ensemble of {} weight sets; a PEFT LoRA is one \
             weight set, so it cannot be exported",
            a.method.id,
            sets.len()
        );
    }

    // Trainable weights outside the adapters (connectors) go in full, grouped by the base's
    // parameter groups (`model.aligner.` -> module `model.aligner`).
    let adapters = plan.vars();
    let groups: Vec<String> = bench.base.lr_scale().into_keys().collect();
    let mut saved = BTreeMap::new();
    let mut modules = std::collections::BTreeSet::new();
    for (name, var) in &vars {
        if adapters.contains_key(name) {
            continue;
        }
        let module = groups
            .iter()
            .find(|g| name.starts_with(g.as_str()))
            .map(|g| g.trim_end_matches('.').to_string())
            .or_else(|| name.rsplit_once('.').map(|(m, _)| m.to_string()))
            .unwrap_or_else(|| name.clone());
        modules.insert(module);
        saved.insert(name.clone(), var.as_tensor().clone());
    }
    let opts = ExportOptions {
        base_model_name_or_path: Some(
            std::fs::canonicalize(&model_dir)
                .unwrap_or(model_dir)
                .display()
                .to_string(),
        ),
        modules_to_save: modules.into_iter().collect(),
        saved,
    };
    peft::export(&plan, &a.out, &opts)?;
    println!(
        "wrote {} ({} stage {k} of {}: {} LoRA modules, r = {}{})",
        a.out.display(),
        a.method.id,
        a.order,
        plan.adapted_paths().len(),
        cfg.lora.r,
        if opts.modules_to_save.is_empty() {
            String::new()
        } else {
            format!(", modules_to_save {:?}", opts.modules_to_save)
        }
    );
    Ok(())
}
