//! `cnext data check`: a whole data root checked before any training, every problem reported
//! at once (file, line, what was expected) rather than the first one per run.

use crate::loader::{
    decode_text, load_image, parse_test_all, parse_train_all, DataError, ImageCheck,
};
use cnext_core::TaskId;
use std::path::{Path, PathBuf};

/// What one task of the root holds: good samples per file (problems are in the report).
#[derive(Debug, Clone, PartialEq)]
pub struct TaskCounts {
    pub task: TaskId,
    pub train: usize,
    pub test: usize,
}

/// Every problem of a root, in task order and, within a file, in line order.
#[derive(Debug, Default)]
pub struct RootReport {
    pub tasks: Vec<TaskCounts>,
    pub problems: Vec<DataError>,
}

impl RootReport {
    /// Every problem, one per line (at most `per_file` per file, the rest counted), then
    /// `N problems in M files`; None when the root is clean.
    pub fn describe(&self, root: &Path, per_file: usize) -> Option<String> {
        if self.problems.is_empty() {
            return None;
        }
        let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
        let mut out = String::new();
        for p in &self.problems {
            let n = counts.entry(p.file().display().to_string()).or_default();
            *n += 1;
            if *n <= per_file {
                out.push_str(&format!("{p}\n"));
            }
        }
        for (file, n) in &counts {
            if *n > per_file {
                out.push_str(&format!("{file}: ... and {} more problems\n", n - per_file));
            }
        }
        out.push_str(&format!(
            "{}: {} problems in {} files",
            root.display(),
            self.problems.len(),
            counts.len()
        ));
        Some(out)
    }
}

fn read_all(path: &Path, problems: &mut Vec<DataError>) -> Option<String> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(source) => {
            problems.push(DataError::Io {
                path: path.to_path_buf(),
                source,
            });
            return None;
        }
    };
    match decode_text(bytes) {
        Ok(t) => Some(t),
        Err((line, msg)) => {
            problems.push(DataError::Invalid {
                path: path.to_path_buf(),
                line,
                msg,
            });
            None
        }
    }
}

/// Decodes every image once (within the pixel limit), naming the first record that uses it:
/// VQA-style files ask several questions of one image.
fn check_images<'a>(
    file: &Path,
    images: impl Iterator<Item = (usize, &'a Path)>,
    problems: &mut Vec<DataError>,
) {
    let mut seen = std::collections::BTreeSet::new();
    for (line, image) in images {
        if !seen.insert(image) {
            continue;
        }
        if let Err(e) = load_image(image) {
            problems.push(DataError::Invalid {
                path: file.to_path_buf(),
                line,
                msg: e.to_string(),
            });
        }
    }
}

/// Checks the six tasks under `root`: train JSONL, test JSON, and every image they name.
pub fn check_root(root: &Path) -> RootReport {
    let mut r = RootReport::default();
    for task in TaskId::ALL {
        let dir = root.join(task.as_str());
        let train_file: PathBuf = dir.join("train.jsonl");
        let test_file: PathBuf = dir.join("test.json");
        let mut counts = TaskCounts {
            task,
            train: 0,
            test: 0,
        };
        if let Some(text) = read_all(&train_file, &mut r.problems) {
            let (samples, errors) = parse_train_all(&text, &train_file, task);
            r.problems.extend(errors);
            let images = samples
                .iter()
                .flat_map(|s| s.item.images().into_iter().map(move |p| (s.line, p)));
            check_images(&train_file, images, &mut r.problems);
            counts.train = samples.len();
        }
        if let Some(text) = read_all(&test_file, &mut r.problems) {
            let (samples, errors) = parse_test_all(&text, &test_file, task, ImageCheck::Resolve);
            r.problems.extend(errors);
            let images = samples
                .iter()
                .flat_map(|s| s.item.images().into_iter().map(move |p| (s.line, p)));
            check_images(&test_file, images, &mut r.problems);
            counts.test = samples.len();
        }
        r.tasks.push(counts);
    }
    r
}
