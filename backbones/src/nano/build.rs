//! Building, saving and loading the nano backbone: deterministic initialisation from our own
//! seeded generator (candle's CPU RNG cannot be seeded), base checkpoints as safetensors with
//! the config, tokenizer and codebook beside them.

use super::backbone::NanoBackbone;
use super::config::NanoConfig;
use super::model::NanoModel;
use super::tokenizer::Tokenizer;
use super::vq::Codebook;
use candle_core::{DType, Device, Tensor, Var};
type Result<T, E = candle_core::Error> = std::result::Result<T, E>;
use candle_nn::{VarBuilder, VarMap};
use cnext_adapters::{normal_values, AdapterPlan};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Initial value of a base weight, by naming rule.
fn init_value(name: &str, shape: &[usize], seed: u64) -> Vec<f32> {
    let n: usize = shape.iter().product();
    if name == "relevance.flag" {
        // As large as a patch's embedding (norms 16-50), or the decoder never notices it.
        return normal_values(seed, name, n, 2.0);
    }
    if name.ends_with("norm.weight") {
        return vec![1.0; n];
    }
    if name.ends_with(".bias") {
        return vec![0.0; n];
    }
    let std = if name.contains("embed") || name.starts_with("lm_head") {
        0.02
    } else {
        1.0 / (shape.last().copied().unwrap_or(1) as f64).sqrt()
    };
    normal_values(seed, name, n, std)
}

/// The variables of a VarMap by name, in a stable order.
fn varmap_vars(vm: &VarMap) -> Result<BTreeMap<String, Var>> {
    Ok(vm
        .data()
        .lock()
        .map_err(|_| candle_core::Error::Msg("varmap poisoned".into()))?
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect())
}

fn reinit(vm: &VarMap, seed: u64) -> Result<()> {
    let data = vm
        .data()
        .lock()
        .map_err(|_| candle_core::Error::Msg("varmap poisoned".into()))?;
    for (name, var) in data.iter() {
        let shape = var.dims().to_vec();
        let v = init_value(name, &shape, seed);
        var.set(&Tensor::from_vec(v, shape, var.device())?)?;
    }
    Ok(())
}

impl NanoBackbone {
    /// A fresh model whose every weight is a variable (for pretraining).
    pub fn init_pretrain(
        cfg: &NanoConfig,
        tokenizer: Tokenizer,
        codebook: Codebook,
        seed: u64,
        dev: &Device,
    ) -> Result<Self> {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, dev);
        let model = NanoModel::new(cfg, vb.clone(), vb, &AdapterPlan::none())?;
        reinit(&vm, seed)?;
        let vars = varmap_vars(&vm)?;
        Ok(NanoBackbone {
            model,
            tokenizer,
            codebook,
            plan: AdapterPlan::none(),
            extra_trainable: vars,
        })
    }

    /// A model on frozen base weights with the adapters of `plan`; the projector is trainable.
    pub fn from_base(
        cfg: &NanoConfig,
        base: &BTreeMap<String, Tensor>,
        tokenizer: Tokenizer,
        codebook: Codebook,
        plan: AdapterPlan,
        dev: &Device,
    ) -> Result<Self> {
        let frozen: HashMap<String, Tensor> = base
            .iter()
            .filter(|(k, _)| !k.starts_with("projector."))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let vb = VarBuilder::from_tensors(frozen, DType::F32, dev);
        let vm = VarMap::new();
        {
            let mut d = vm
                .data()
                .lock()
                .map_err(|_| candle_core::Error::Msg("varmap poisoned".into()))?;
            for (k, v) in base.iter().filter(|(k, _)| k.starts_with("projector.")) {
                d.insert(k.clone(), Var::from_tensor(&v.to_device(dev)?.copy()?)?);
            }
        }
        let vb_train = VarBuilder::from_varmap(&vm, DType::F32, dev);
        let model = NanoModel::new(cfg, vb, vb_train, &plan)?;
        let extra = varmap_vars(&vm)?;
        Ok(NanoBackbone {
            model,
            tokenizer,
            codebook,
            plan,
            extra_trainable: extra,
        })
    }
}

/// Saves a base checkpoint folder: model.safetensors, config.json, tokenizer.json, codebook.json.
pub fn save_base(
    dir: &Path,
    cfg: &NanoConfig,
    weights: &BTreeMap<String, Tensor>,
    tok: &Tokenizer,
    cb: &Codebook,
) -> Result<(), CheckpointError> {
    std::fs::create_dir_all(dir)?;
    candle_core::safetensors::save(
        &weights
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<HashMap<_, _>>(),
        dir.join("model.safetensors"),
    )?;
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(cfg)?)?;
    std::fs::write(dir.join("tokenizer.json"), serde_json::to_string(tok)?)?;
    std::fs::write(dir.join("codebook.json"), serde_json::to_string(cb)?)?;
    Ok(())
}

/// Loads what [`save_base`] wrote.
pub fn load_base(
    dir: &Path,
    dev: &Device,
) -> Result<(NanoConfig, BTreeMap<String, Tensor>, Tokenizer, Codebook), CheckpointError> {
    let read = |f: &str| std::fs::read_to_string(dir.join(f));
    let cfg: NanoConfig = serde_json::from_str(&read("config.json")?)?;
    let mut tok: Tokenizer = serde_json::from_str(&read("tokenizer.json")?)?;
    tok.reindex();
    let cb: Codebook = serde_json::from_str(&read("codebook.json")?)?;
    let w = candle_core::safetensors::load(dir.join("model.safetensors"), dev)?;
    Ok((cfg, w.into_iter().collect(), tok, cb))
}

/// Errors of checkpoint I/O.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
