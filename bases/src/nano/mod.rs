//! The nano base of the mini and smoke profiles: tokenizer, VQ codebook and the pretrained
//! nano model (our own Dual-to-Dual model, `cnext_backbones::nano`), built deterministically
//! on first use from the profile's data and cached under a key that hashes everything that
//! shapes them; written to a temp folder and renamed, so a killed build never leaves an entry
//! that looks complete. Pretraining is a supervised vision phase ([`vision`]) then an
//! instruction mix ([`pretrain`], [`instruct`]), both through the harness's training loop.

pub mod instruct;
pub mod pretrain;
pub mod vision;

use candle_core::{DType, Device, Tensor};
use cnext_backbones::nano::backbone::NanoBackbone;
use cnext_backbones::nano::build::{load_base, save_base, CheckpointError};
use cnext_backbones::nano::config::NanoConfig;
use cnext_backbones::nano::tokenizer::Tokenizer;
use cnext_backbones::nano::vq::Codebook;
use cnext_backbones::{Backbone, BaseModel};
use cnext_core::hash::key16;
use cnext_core::TaskId;
use cnext_datasets::loader::{load_train, DataError, TrainItem};
use cnext_datasets::rng::Rng;
use cnext_datasets::scene::Scene;
use cnext_harness::optim::AdamWConfig;
use cnext_harness::train::{train, TrainConfig, TrainError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Which nano size a profile uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelSize {
    Mini,
    Smoke,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaseConfig {
    pub size: ModelSize,
    pub seed: u64,
    pub pretrain: TrainConfig,
    /// Distinct pretraining examples generated (the loop cycles through them).
    pub examples: usize,
    pub codebook_size: usize,
    pub min_word_count: usize,
    /// Steps of each supervised vision phase before the mix ([`crate::vision`]: patch encoder,
    /// then relevance gate), which stay frozen after. 0: neither; everything trains with the mix.
    pub vision_steps: usize,
}

impl BaseConfig {
    pub fn mini(seed: u64) -> Self {
        BaseConfig {
            size: ModelSize::Mini,
            seed,
            pretrain: TrainConfig {
                steps: 1500,
                batch_size: 32,
                optim: AdamWConfig {
                    lr: 2e-3,
                    weight_decay: 0.0,
                    warmup_ratio: 0.05,
                    ..Default::default()
                },
                seed,
                epochs: None,
            },
            examples: 24_000,
            codebook_size: 256,
            min_word_count: 3,
            vision_steps: 600,
        }
    }

    pub fn smoke(seed: u64) -> Self {
        BaseConfig {
            size: ModelSize::Smoke,
            pretrain: TrainConfig {
                steps: 60,
                batch_size: 16,
                ..Self::mini(seed).pretrain
            },
            examples: 1_000,
            vision_steps: 20,
            ..Self::mini(seed)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AssetError {
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error("{path}: {source}")]
    Checkpoint {
        path: PathBuf,
        source: CheckpointError,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("base key: config cannot be serialised: {0}")]
    Key(String),
}

/// A loaded nano base.
pub struct NanoBase {
    pub dir: PathBuf,
    pub cfg: NanoConfig,
    pub weights: BTreeMap<String, Tensor>,
    pub tokenizer: Tokenizer,
    pub codebook: Codebook,
    /// Where the weights live (and where runs on this base train).
    pub device: Device,
    /// Set when this call built the base: (seconds, first loss, last loss).
    pub built: Option<(f64, f64, f64)>,
}

impl NanoBase {
    /// A model on this base's frozen weights with the adapters of `plan`.
    pub fn model(&self, plan: cnext_adapters::AdapterPlan) -> candle_core::Result<NanoBackbone> {
        NanoBackbone::from_base(
            &self.cfg,
            &self.weights,
            self.tokenizer.clone(),
            self.codebook.clone(),
            plan,
            &self.device,
        )
    }
}

impl BaseModel for NanoBase {
    /// The cache folder's name: the size and the content key of the base.
    fn name(&self) -> String {
        self.dir
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn dtype(&self) -> DType {
        DType::F32
    }

    fn build(&self, plan: cnext_adapters::AdapterPlan) -> candle_core::Result<Box<dyn Backbone>> {
        Ok(Box::new(self.model(plan)?))
    }

    /// The projector trains at 1/10 of the adapters' learning rate, as in LLaVA-1.5's LoRA
    /// recipe (`mm_projector_lr`). Measured on mini (lora, default order, seed 0): at the
    /// adapters' rate the projector drifts over the early stages until RefCOCO cannot be
    /// re-learned (29.0; 91.5 from the same adapter with the base projector); at 1/10 it
    /// reaches 50.0 and New.ACC 74.37.
    fn lr_scale(&self) -> BTreeMap<String, f64> {
        BTreeMap::from([("projector.".to_string(), 0.1)])
    }

    /// Every nano text answer fits in 32 tokens (the longest, a box, is 14).
    fn max_new_tokens(&self) -> usize {
        32
    }
}

/// Every text of the six tasks' train files, for the vocabulary.
fn task_texts(data_root: &Path) -> Result<Vec<String>, DataError> {
    let mut out = vec![];
    for task in TaskId::ALL {
        for s in load_train(&data_root.join(task.as_str()), task)? {
            match s.item {
                TrainItem::Conversation { turns, .. } => {
                    for t in turns {
                        out.push(t.prompt);
                        out.push(t.answer);
                    }
                }
                TrainItem::TextToImage { prompt, .. } => out.push(prompt),
                TrainItem::Edit { instruction, .. } => out.push(instruction),
            }
        }
    }
    Ok(out)
}

/// Loads the base for `cfg` from `cache`, building it first if needed.
pub fn ensure_base(
    cache: &Path,
    data_root: &Path,
    cfg: &BaseConfig,
    dev: &Device,
    progress: bool,
) -> Result<NanoBase, AssetError> {
    // The first mix hashes as nothing, so bases built before the version existed keep their keys.
    let mix = match pretrain::MIX_VERSION {
        1 => String::new(),
        v => format!("|mix{v}"),
    };
    // The base is keyed by the data it learns from: no manifest, no key (a default here
    // would give every data root one base).
    let manifest = data_root.join("manifest.json");
    let manifest_text = std::fs::read_to_string(&manifest).map_err(|source| AssetError::Io {
        path: manifest.clone(),
        source,
    })?;
    let cfg_text = serde_json::to_string(cfg).map_err(|e| AssetError::Key(e.to_string()))?;
    let key = key16(&format!(
        "{cfg_text}|{}|{manifest_text}{mix}",
        env!("CARGO_PKG_VERSION"),
    ));
    let dir = cache
        .join("base")
        .join(format!("{:?}-{key}", cfg.size).to_lowercase());
    let mut built = None;
    if !dir.join("model.safetensors").exists() {
        // Candle's ops only, whichever kernels the stages use: the base is one artefact.
        built = Some(cnext_kernels::fused::unfused(|| {
            build(&dir, data_root, cfg, dev, progress)
        })?);
    }
    let (ncfg, weights, tokenizer, codebook) =
        load_base(&dir, dev).map_err(|source| AssetError::Checkpoint {
            path: dir.clone(),
            source,
        })?;
    Ok(NanoBase {
        dir,
        cfg: ncfg,
        weights,
        tokenizer,
        codebook,
        device: dev.clone(),
        built,
    })
}

fn build(
    dir: &Path,
    data_root: &Path,
    cfg: &BaseConfig,
    dev: &Device,
    progress: bool,
) -> Result<(f64, f64, f64), AssetError> {
    let t0 = std::time::Instant::now();
    let mut rng = Rng::derive(cfg.seed, "codebook");
    let scenes: Vec<_> = (0..4000)
        .map(|_| Scene::random(&mut rng, 1, 4).render())
        .collect();
    let codebook = Codebook::learn(&scenes, cfg.codebook_size, 10, cfg.seed);
    let mut texts = pretrain::corpus(cfg.seed, cfg.examples);
    texts.extend(task_texts(data_root)?);
    let tokenizer = Tokenizer::build(
        texts.iter().map(String::as_str),
        cfg.min_word_count,
        codebook.len() as u32,
    );
    let ncfg = match cfg.size {
        ModelSize::Mini => NanoConfig::mini(tokenizer.vocab_size()),
        ModelSize::Smoke => NanoConfig::smoke(tokenizer.vocab_size()),
    };
    let words: Vec<String> = (0..tokenizer.vocab_size() as u32)
        .map(|i| tokenizer.decode(&[i]))
        .filter(|w| w.len() > 1)
        .collect();
    let examples = pretrain::mix(cfg.seed, cfg.examples, &words);
    let model =
        NanoBackbone::init_pretrain(&ncfg, tokenizer.clone(), codebook.clone(), cfg.seed, dev)?;
    let mut vars = model.trainable();
    if cfg.vision_steps > 0 {
        vision::pretrain(&model, &mut vars, &words, cfg, dev, progress)?;
    }
    let stats = train(
        &model,
        &vars,
        &examples,
        &cfg.pretrain,
        "pretrain base",
        progress,
        None,
        &mut (),
    )?;
    let weights: BTreeMap<String, Tensor> = model.trainable_tensors();
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|source| AssetError::Io {
        path: parent.to_path_buf(),
        source,
    })?;
    let tmp = parent.join(format!(
        ".tmp-{}-{}",
        std::process::id(),
        key16(&dir.display().to_string())
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    save_base(&tmp, &ncfg, &weights, &tokenizer, &codebook).map_err(|source| {
        AssetError::Checkpoint {
            path: tmp.clone(),
            source,
        }
    })?;
    if dir.exists() {
        // Another process finished first: keep theirs.
        let _ = std::fs::remove_dir_all(&tmp);
    } else {
        std::fs::rename(&tmp, dir).map_err(|source| AssetError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    Ok((
        t0.elapsed().as_secs_f64(),
        stats.first_loss,
        stats.last_loss,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A data root without `manifest.json` has no base key: an error naming the file, and
    /// nothing is built or written to the cache.
    #[test]
    fn a_missing_manifest_is_a_key_error_not_an_empty_key() {
        let cache = tempfile::tempdir().unwrap();
        let data = tempfile::tempdir().unwrap();
        let cfg = BaseConfig::smoke(0);
        let err = ensure_base(cache.path(), data.path(), &cfg, &Device::Cpu, false)
            .err()
            .expect("no manifest, no base");
        let msg = err.to_string();
        assert!(
            msg.contains("manifest.json") && matches!(err, AssetError::Io { .. }),
            "{msg}"
        );
        assert!(!cache.path().join("base").exists());
    }
}
