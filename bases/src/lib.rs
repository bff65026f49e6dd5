//! The bases a profile runs on, behind the backbone factory ([`cnext_backbones::BaseModel`]):
//! the nano base of the mini and smoke profiles, built and pretrained here from the profile's
//! data ([`nano`]), and Janus / Janus-Pro from a Hugging Face directory ([`janus`]). The suite
//! names a [`BaseSpec`] and gets a `Box<dyn BaseModel>`; the harness, the methods and the
//! suite never see either backbone's types.

pub mod janus;
pub mod nano;

use candle_core::Device;
use cnext_backbones::BaseModel;
use cnext_datasets::DataProfile;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Which base a run builds its backbones on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "lowercase")]
pub enum BaseSpec {
    /// Our nano model, pretrained on first use from the data root and cached.
    Nano(nano::BaseConfig),
    /// A Janus / Janus-Pro Hugging Face directory.
    Janus(janus::JanusSpec),
}

impl BaseSpec {
    /// The built-in base of a data profile: nano, sized and pretrained for it.
    pub fn builtin(profile: DataProfile, seed: u64) -> Self {
        BaseSpec::Nano(match profile {
            DataProfile::Mini => nano::BaseConfig::mini(seed),
            DataProfile::Smoke => nano::BaseConfig::smoke(seed),
        })
    }

    /// A Janus directory with the default settings.
    pub fn janus(dir: PathBuf) -> Self {
        BaseSpec::Janus(janus::JanusSpec::new(dir))
    }

    /// The Hugging Face model directory of the base, if it has one (a built-in base has none).
    pub fn hf_dir(&self) -> Option<&Path> {
        match self {
            BaseSpec::Nano(_) => None,
            BaseSpec::Janus(j) => Some(&j.dir),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BaseError {
    #[error(transparent)]
    Nano(Box<nano::AssetError>),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Model(String),
    #[error("base key: {0}")]
    Key(String),
}

impl From<nano::AssetError> for BaseError {
    fn from(e: nano::AssetError) -> Self {
        BaseError::Nano(Box::new(e))
    }
}

/// An opened base and what opening it did.
pub struct Opened {
    pub base: Box<dyn BaseModel>,
    /// Where it lives (a cache folder or a model directory).
    pub location: PathBuf,
    /// Set when this call built it: (seconds, first loss, last loss) of pretraining.
    pub built: Option<(f64, f64, f64)>,
}

/// Opens the base of `spec` on `dev`. A nano base is built on first use from `data_root`
/// (its vocabulary and key come from the data) and cached under `cache`.
pub fn open(
    spec: &BaseSpec,
    cache: &Path,
    data_root: &Path,
    dev: &Device,
    progress: bool,
) -> Result<Opened, BaseError> {
    match spec {
        BaseSpec::Nano(cfg) => {
            let b = nano::ensure_base(cache, data_root, cfg, dev, progress)?;
            Ok(Opened {
                location: b.dir.clone(),
                built: b.built,
                base: Box::new(b),
            })
        }
        BaseSpec::Janus(j) => {
            let b = janus::JanusBase::open(j, dev)?;
            Ok(Opened {
                location: b.dir().to_path_buf(),
                built: None,
                base: Box::new(b),
            })
        }
    }
}
