//! The project's one atomic file writer: write a temp file in the target's folder, sync it,
//! rename it over the target. A crash never leaves a half-written file under the real name.

use std::path::{Path, PathBuf};

/// The temp name of `path` for this process (same folder, so the rename stays on one disk).
fn temp_of(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    path.with_file_name(format!(
        ".{}.tmp-{}",
        name.unwrap_or_default(),
        std::process::id()
    ))
}

/// Runs `write` on a temp path next to `path` (creating the folder), then renames the temp
/// file to `path`; on any error the temp file is removed.
pub fn write_atomic_with<E: From<std::io::Error>>(
    path: &Path,
    write: impl FnOnce(&Path) -> Result<(), E>,
) -> Result<(), E> {
    if let Some(p) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(p)?;
    }
    let tmp = temp_of(path);
    let res = write(&tmp).and_then(|()| {
        std::fs::File::open(&tmp).and_then(|f| f.sync_all())?;
        std::fs::rename(&tmp, path).map_err(E::from)
    });
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// Writes `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomic_with(path, |tmp| std::fs::write(tmp, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_whole_files_and_leaves_no_temp_on_error() {
        let d = std::env::temp_dir().join(format!("cnext-fsx-{}", std::process::id()));
        let p = d.join("sub").join("a.txt");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let err: std::io::Result<()> = write_atomic_with(&p, |tmp| {
            std::fs::write(tmp, b"half")?;
            Err(std::io::Error::other("writer failed"))
        });
        assert!(err.is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(d.join("sub")).unwrap().collect();
        assert_eq!(names.len(), 1, "a temp file was left behind");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
