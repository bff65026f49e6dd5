//! The project's one content hash: SHA-256. Cache keys (bases, scorers, stages) are its first
//! 16 hex digits over a canonical text; archive manifests use the full digest.

use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// The full SHA-256 of `bytes`, lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// A cache key: the first 16 hex digits (64 bits) of the SHA-256 of `text`.
pub fn key16(text: &str) -> String {
    hex(&Sha256::digest(text.as_bytes())[..8])
}

/// The full SHA-256 of a file's bytes, read in chunks (a 15 GB checkpoint is never held
/// in memory).
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// What shapes a Hugging Face model folder: one `name=sha256` line per `.json` and
/// `.safetensors` file directly in `dir` (configs, tokenizer, every weight shard), sorted by
/// name. The folder's own path is not in it, so a copy elsewhere has the same digest.
pub fn model_dir_digest(dir: &Path) -> Result<String, (PathBuf, std::io::Error)> {
    let err = |p: &Path| {
        let p = p.to_path_buf();
        move |e| (p, e)
    };
    let mut files = vec![];
    for e in std::fs::read_dir(dir).map_err(err(dir))? {
        let p = e.map_err(err(dir))?.path();
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if p.is_file() && (name.ends_with(".json") || name.ends_with(".safetensors")) {
            files.push((name, p));
        }
    }
    files.sort();
    let mut out = String::new();
    for (name, p) in files {
        let h = sha256_file(&p).map_err(err(&p))?;
        out.push_str(&format!("{name}={h}\n"));
    }
    Ok(out)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_digests() {
        // FIPS 180-2 test vector "abc".
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(key16("abc"), "ba7816bf8f01cfea");
    }

    #[test]
    fn files_hash_in_chunks_like_bytes_and_folders_ignore_their_path() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        for d in [a.path(), b.path()] {
            std::fs::write(d.join("model.safetensors"), &big).unwrap();
            std::fs::write(d.join("config.json"), b"{}").unwrap();
            std::fs::write(d.join("README.md"), d.display().to_string()).unwrap();
        }
        assert_eq!(
            sha256_file(&a.path().join("model.safetensors")).unwrap(),
            sha256_hex(&big)
        );
        let da = model_dir_digest(a.path()).unwrap();
        assert_eq!(da, model_dir_digest(b.path()).unwrap());
        assert!(
            da.starts_with("config.json=") && da.lines().count() == 2,
            "{da}"
        );
    }
}
