//! Stage-cache entries as archives (`cnext cache export|import`), so CI runners without a
//! shared file system exchange trained stages as artifacts. An archive is a tar of one entry
//! folder with a `SHA256SUMS` manifest first; import checks every file against it, checks that
//! the entry's key inputs hash to its name (the content key), extracts into a temp folder and
//! renames it into place under the entry's lock, and never replaces a complete entry.

use crate::stages::{lock_exclusive, StageRecord};
use cnext_core::hash::{key16, sha256_hex};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

const MANIFEST: &str = "SHA256SUMS";

#[derive(Debug, thiserror::Error)]
pub enum CacheIoError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{archive}: {msg}")]
    Bad { archive: PathBuf, msg: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CacheIoError + '_ {
    move |source| CacheIoError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Complete entries of a cache: folders under `stages/` with their `entry.json`.
pub fn complete_entries(cache: &Path) -> Result<Vec<PathBuf>, CacheIoError> {
    let stages = cache.join("stages");
    if !stages.exists() {
        return Ok(vec![]);
    }
    let mut out = vec![];
    for e in std::fs::read_dir(&stages).map_err(io(&stages))? {
        let e = e.map_err(io(&stages))?;
        let hidden = e.file_name().to_string_lossy().starts_with('.');
        if !hidden && e.path().join("entry.json").is_file() {
            out.push(e.path());
        }
    }
    out.sort();
    Ok(out)
}

/// Files under `dir`, relative, in sorted order.
fn files(dir: &Path, rel: &Path, out: &mut BTreeMap<String, PathBuf>) -> Result<(), CacheIoError> {
    for e in std::fs::read_dir(dir).map_err(io(dir))? {
        let e = e.map_err(io(dir))?;
        let p = e.path();
        let r = rel.join(e.file_name());
        if p.is_dir() {
            files(&p, &r, out)?;
        } else {
            out.insert(r.to_string_lossy().replace('\\', "/"), p);
        }
    }
    Ok(())
}

fn append(tar: &mut tar::Builder<Vec<u8>>, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_size(bytes.len() as u64);
    // Fixed metadata: the same entry always gives the same archive bytes.
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_cksum();
    tar.append_data(&mut h, name, bytes)
}

/// Writes `<out>/<entry>.tar` for every complete entry; returns the archives written.
pub fn export(cache: &Path, out: &Path) -> Result<Vec<PathBuf>, CacheIoError> {
    std::fs::create_dir_all(out).map_err(io(out))?;
    let mut written = vec![];
    for dir in complete_entries(cache)? {
        // Entry names are ASCII (method, stage, task, hash); anything else is not ours.
        let Some(name) = dir.file_name().and_then(|n| n.to_str()).map(str::to_string) else {
            continue;
        };
        let mut listed = BTreeMap::new();
        files(&dir, Path::new(""), &mut listed)?;
        let mut contents = BTreeMap::new();
        for (rel, path) in &listed {
            contents.insert(rel.clone(), std::fs::read(path).map_err(io(path))?);
        }
        let sums: String = contents
            .iter()
            .map(|(rel, b)| format!("{}  {rel}\n", sha256_hex(b)))
            .collect();
        let archive = out.join(format!("{name}.tar"));
        let mut tar = tar::Builder::new(Vec::new());
        let mut add = || -> std::io::Result<Vec<u8>> {
            append(&mut tar, MANIFEST, sums.as_bytes())?;
            for (rel, b) in &contents {
                append(&mut tar, rel, b)?;
            }
            tar.finish()?;
            Ok(std::mem::take(tar.get_mut()))
        };
        let bytes = add().map_err(io(&archive))?;
        crate::run::write_atomic(&archive, &bytes).map_err(|e| CacheIoError::Bad {
            archive: archive.clone(),
            msg: e.to_string(),
        })?;
        written.push(archive);
    }
    Ok(written)
}

/// What an import did.
#[derive(Debug, Default, PartialEq)]
pub struct ImportReport {
    pub imported: Vec<String>,
    /// Entries the cache already had complete (left untouched).
    pub skipped: Vec<String>,
}

/// Reads an archive into (relative path, bytes), refusing anything but plain relative files.
fn read_archive(archive: &Path) -> Result<BTreeMap<String, Vec<u8>>, CacheIoError> {
    let bad = |msg: String| CacheIoError::Bad {
        archive: archive.to_path_buf(),
        msg,
    };
    let f = std::fs::File::open(archive).map_err(io(archive))?;
    let mut t = tar::Archive::new(f);
    let mut out = BTreeMap::new();
    for e in t
        .entries()
        .map_err(|e| bad(format!("not a tar archive: {e}")))?
    {
        let mut e = e.map_err(|e| bad(format!("corrupt archive: {e}")))?;
        let path = e
            .path()
            .map_err(|e| bad(format!("bad path: {e}")))?
            .to_path_buf();
        let shown = path.display().to_string();
        if e.header().entry_type() != tar::EntryType::Regular {
            return Err(bad(format!("`{shown}` is not a plain file")));
        }
        if !path.components().all(|c| matches!(c, Component::Normal(_))) {
            return Err(bad(format!("`{shown}` escapes the entry folder")));
        }
        let mut bytes = vec![];
        e.read_to_end(&mut bytes)
            .map_err(|e| bad(format!("`{shown}`: {e}")))?;
        out.insert(shown.replace('\\', "/"), bytes);
    }
    Ok(out)
}

/// Checks an archive's files against its manifest and its entry against its name.
fn verify(
    archive: &Path,
    name: &str,
    files: &BTreeMap<String, Vec<u8>>,
) -> Result<(), CacheIoError> {
    let bad = |msg: String| CacheIoError::Bad {
        archive: archive.to_path_buf(),
        msg,
    };
    let sums = files
        .get(MANIFEST)
        .ok_or_else(|| bad(format!("no {MANIFEST}")))?;
    let sums = std::str::from_utf8(sums).map_err(|_| bad(format!("{MANIFEST} is not text")))?;
    let mut listed = BTreeMap::new();
    for (i, line) in sums.lines().enumerate() {
        let (sum, rel) = line
            .split_once("  ")
            .ok_or_else(|| bad(format!("{MANIFEST}:{}: expected `<sha256>  <path>`", i + 1)))?;
        listed.insert(rel.to_string(), sum.to_string());
    }
    for (rel, bytes) in files.iter().filter(|(r, _)| *r != MANIFEST) {
        match listed.remove(rel) {
            None => return Err(bad(format!("`{rel}` is not in {MANIFEST}"))),
            Some(sum) if sum != sha256_hex(bytes) => {
                return Err(bad(format!("`{rel}`: sha256 does not match {MANIFEST}")))
            }
            Some(_) => {}
        }
    }
    if let Some(rel) = listed.keys().next() {
        return Err(bad(format!(
            "`{rel}` is in {MANIFEST} but not in the archive"
        )));
    }
    let entry = files
        .get("entry.json")
        .ok_or_else(|| bad("no entry.json".into()))?;
    let record: StageRecord =
        serde_json::from_slice(entry).map_err(|e| bad(format!("entry.json: {e}")))?;
    let suffix = name.rsplit('-').next().unwrap_or(name);
    if record.key != name || key16(&record.key_inputs.to_string()) != suffix {
        return Err(bad(format!(
            "entry.json's key inputs hash to {}, not to the archive's name {name}",
            key16(&record.key_inputs.to_string())
        )));
    }
    Ok(())
}

/// Imports archives into `cache`; a complete entry already there is kept as it is.
pub fn import(cache: &Path, archives: &[PathBuf]) -> Result<ImportReport, CacheIoError> {
    let stages = cache.join("stages");
    let mut report = ImportReport::default();
    for archive in archives {
        let bad = |msg: String| CacheIoError::Bad {
            archive: archive.clone(),
            msg,
        };
        let name = archive
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".tar"))
            .filter(|n| !n.is_empty() && !n.starts_with('.') && !n.contains(['/', '\\']))
            .ok_or_else(|| bad("expected `<entry>.tar`".into()))?
            .to_string();
        let files = read_archive(archive)?;
        verify(archive, &name, &files)?;
        let dest = stages.join(&name);
        // A training process may be building the same entry: take its lock.
        let _lock = lock_exclusive(&stages.join(".locks"), &name)
            .map_err(|(path, source)| CacheIoError::Io { path, source })?;
        if dest.join("entry.json").is_file() {
            report.skipped.push(name);
            continue;
        }
        let tmp = stages.join(format!(".tmp-import-{name}-{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
        }
        for (rel, bytes) in files.iter().filter(|(r, _)| *r != MANIFEST) {
            let p = tmp.join(rel);
            if let Some(parent) = p.parent() {
                std::fs::create_dir_all(parent).map_err(io(parent))?;
            }
            std::fs::write(&p, bytes).map_err(io(&p))?;
        }
        // An incomplete folder (no entry.json) is not an entry: replace it.
        if dest.exists() {
            std::fs::remove_dir_all(&dest).map_err(io(&dest))?;
        }
        std::fs::rename(&tmp, &dest).map_err(io(&dest))?;
        report.imported.push(name);
    }
    Ok(report)
}
