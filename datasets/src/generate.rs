//! `cnext data generate`: writes Continual-NExT-mini (six tasks, official formats, PNG images)
//! into a fresh folder, atomically: everything goes to a sibling temp folder that is renamed
//! into place only when complete, so an interrupted run never leaves a data set that looks whole.

use crate::formats::json_array_lines;
use crate::rng::Rng;
use crate::spec::TaskSpec;
use crate::tasks::{test_sample, train_sample};
use cnext_core::TaskId;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Bumped when the generator's output changes for a fixed seed.
pub const GENERATOR_VERSION: u32 = 1;

/// Data sizes of a generated profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataProfile {
    /// The benchmark: a few thousand train samples and 200 test samples per task.
    Mini,
    /// A tiny slice for plumbing tests.
    Smoke,
}

impl DataProfile {
    pub fn as_str(self) -> &'static str {
        match self {
            DataProfile::Mini => "mini",
            DataProfile::Smoke => "smoke",
        }
    }
    /// (train, test) samples per task.
    pub fn sizes(self) -> (usize, usize) {
        match self {
            DataProfile::Mini => (3000, 200),
            DataProfile::Smoke => (48, 12),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenConfig {
    pub profile: DataProfile,
    pub seed: u64,
    pub train: usize,
    pub test: usize,
}

impl GenConfig {
    pub fn new(profile: DataProfile, seed: u64) -> Self {
        let (train, test) = profile.sizes();
        GenConfig {
            profile,
            seed,
            train,
            test,
        }
    }
}

/// What was generated, written as `manifest.json` at the root (no timestamps: it must be
/// byte-identical for a seed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub generator: String,
    pub generator_version: u32,
    pub config: GenConfig,
    pub tasks: BTreeMap<TaskId, TaskManifest>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskManifest {
    pub version: u32,
    pub train: usize,
    pub test: usize,
    pub images: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum GenError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: cannot encode PNG: {source}")]
    Png {
        path: PathBuf,
        source: image::ImageError,
    },
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    #[error("{0} already exists (pass --force to replace it)")]
    Exists(PathBuf),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> GenError + '_ {
    move |source| GenError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Question ids are unique across tasks, as in the official merged files.
fn question_id(task: TaskId, i: usize) -> u64 {
    let t = TaskId::ALL.iter().position(|&x| x == task).unwrap_or(0) as u64;
    (t + 1) * 1_000_000 + i as u64
}

/// Writes one task into `dir` (created if needed): `cfg.train` train and `cfg.test` test
/// samples (benchmarks of data at scale generate one task of many times the mini size).
pub fn write_task(dir: &Path, task: TaskId, cfg: &GenConfig) -> Result<TaskManifest, GenError> {
    fs::create_dir_all(dir.join("images")).map_err(io(dir))?;
    let mut images = 0;
    let mut save = |rel: &str, img: &image::RgbImage| -> Result<(), GenError> {
        let p = dir.join(rel);
        img.save_with_format(&p, image::ImageFormat::Png)
            .map_err(|source| GenError::Png { path: p, source })?;
        images += 1;
        Ok(())
    };
    let mut rng = Rng::derive(cfg.seed, &format!("{task}/train"));
    let mut lines = String::new();
    for i in 0..cfg.train {
        let (rec, imgs) = train_sample(task, i, &mut rng);
        for (rel, img) in &imgs {
            save(rel, img)?;
        }
        lines.push_str(&serde_json::to_string(&rec)?);
        lines.push('\n');
    }
    let mut rng = Rng::derive(cfg.seed, &format!("{task}/test"));
    let mut tests = Vec::with_capacity(cfg.test);
    for i in 0..cfg.test {
        let (rec, imgs) = test_sample(task, i, question_id(task, i), &mut rng);
        for (rel, img) in &imgs {
            save(rel, img)?;
        }
        tests.push(rec);
    }
    let train_path = dir.join("train.jsonl");
    fs::write(&train_path, lines).map_err(io(&train_path))?;
    let test_path = dir.join("test.json");
    fs::write(&test_path, json_array_lines(&tests)?).map_err(io(&test_path))?;
    Ok(TaskManifest {
        version: TaskSpec::of(task).version,
        train: cfg.train,
        test: cfg.test,
        images,
    })
}

/// Generates every task into `out`. With `force`, an existing `out` is replaced (only once the
/// new data is complete).
pub fn generate(out: &Path, cfg: &GenConfig, force: bool) -> Result<Manifest, GenError> {
    if out.exists() && !force {
        return Err(GenError::Exists(out.to_path_buf()));
    }
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "data".into());
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty());
    let parent = parent.unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(io(parent))?;
    let tmp = parent.join(format!(".{name}.partial-{}", std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    let result = (|| {
        let mut tasks = BTreeMap::new();
        for task in TaskId::ALL {
            tasks.insert(task, write_task(&tmp.join(task.as_str()), task, cfg)?);
        }
        let manifest = Manifest {
            generator: "continual-next-mini".into(),
            generator_version: GENERATOR_VERSION,
            config: cfg.clone(),
            tasks,
        };
        let mpath = tmp.join("manifest.json");
        let mut f = fs::File::create(&mpath).map_err(io(&mpath))?;
        f.write_all(serde_json::to_string_pretty(&manifest)?.as_bytes())
            .and_then(|_| f.write_all(b"\n"))
            .and_then(|_| f.sync_all())
            .map_err(io(&mpath))?;
        Ok(manifest)
    })();
    let manifest = match result {
        Ok(m) => m,
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    if out.exists() {
        fs::remove_dir_all(out).map_err(io(out))?;
    }
    fs::rename(&tmp, out).map_err(io(out))?;
    Ok(manifest)
}

/// Reads `manifest.json` of a generated data set, if there is one.
pub fn read_manifest(root: &Path) -> Option<Manifest> {
    let text = fs::read_to_string(root.join("manifest.json")).ok()?;
    serde_json::from_str(&text).ok()
}
