//! Matrix snapshots: `snapshots/<profile>/<method>__<order>.snap`, written by insta (review
//! with `cargo insta review`, or accept with `INSTA_UPDATE=always`), holding the matrix, the
//! headline metrics and their provenance. Comparisons are one-sided with a per-profile
//! tolerance: a cell fails when it falls below its snapshot by more than the tolerance, the
//! matrix when Forgetting rises or Avg.ACC falls by more than it. Improvements pass and are
//! reported, so a better method never breaks the suite, but a worse one always does.

use crate::profile::Profile;
use cnext_core::metrics::{round2, Metrics};
use cnext_core::{AccuracyMatrix, TaskId};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// How far (in accuracy points) a result may fall behind its snapshot.
///
/// Same seed, same machine: matrices are bit-identical (measured), so the tolerance only has
/// to absorb other machines, whose float summation sends training down another trajectory,
/// about as far as another training seed does. The mini values cover the largest drops
/// measured across seeds and across two machines, with a margin (README, "Tolerances").
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerance {
    /// Cells of text tasks (accuracy in percent).
    pub text_cell: f64,
    /// Cells of image tasks (CLIP score): a forgotten generation path collapses or recovers
    /// as a whole, so these move far more between machines than text accuracies do.
    pub image_cell: f64,
    pub metric: f64,
}

impl Tolerance {
    pub fn of(profile: Profile) -> Self {
        match profile {
            // 12 test samples per task: one sample is 8.33 points.
            // The paper profile on its default inputs is smoke-sized too.
            Profile::Smoke | Profile::JanusSmoke | Profile::Paper => Tolerance {
                text_cell: 25.0,
                image_cell: 25.0,
                metric: 10.0,
            },
            // From measured spreads on the instruction-tuned base (lora, mage, ewc; seeds 0, 1,
            // 2; README "Tolerances"): cells get twice the largest seed-to-seed standard
            // deviation of their kind (text 11.63, image 9.94), metrics four times theirs
            // (largest 2.01, ewc Forgetting).
            Profile::Mini => Tolerance {
                text_cell: 23.5,
                image_cell: 20.0,
                metric: 8.0,
            },
        }
    }

    /// The tolerance of a cell of `task`.
    pub fn cell(&self, task: TaskId) -> f64 {
        match task.output() {
            cnext_core::Modality::Text => self.text_cell,
            cnext_core::Modality::Image => self.image_cell,
        }
    }
}

/// The snapshot body (JSON, two decimals).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    pub profile: Profile,
    pub method: String,
    pub order: String,
    pub tasks: Vec<TaskId>,
    /// Row j: accuracies after stage j (a joint method has one row); null: not evaluated.
    pub matrix: Vec<Vec<Option<f64>>>,
    pub avg_acc: Option<f64>,
    pub forgetting: Option<f64>,
    pub new_acc: Option<f64>,
    pub provenance: BTreeMap<String, serde_json::Value>,
}

impl Snapshot {
    pub fn new(
        profile: Profile,
        method: &str,
        order: &str,
        m: &AccuracyMatrix,
        provenance: BTreeMap<String, serde_json::Value>,
    ) -> Self {
        let met = Metrics::of(m).rounded();
        Snapshot {
            profile,
            method: method.into(),
            order: order.into(),
            tasks: m.tasks().to_vec(),
            matrix: m
                .rows()
                .iter()
                .map(|r| r.iter().map(|c| c.map(round2)).collect())
                .collect(),
            avg_acc: met.avg_acc,
            forgetting: met.forgetting,
            new_acc: met.new_acc,
            provenance,
        }
    }

    pub fn body(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// The cell after 1-based stage `stage` for `task`.
    pub fn cell(&self, stage: usize, task: TaskId) -> Option<f64> {
        let col = self.tasks.iter().position(|t| *t == task)?;
        self.matrix
            .get(stage.checked_sub(1)?)?
            .get(col)
            .copied()
            .flatten()
    }
}

/// Where the snapshots of a profile live (the workspace's `snapshots/<profile>`).
pub fn dir(profile: Profile) -> PathBuf {
    workspace()
        .join("snapshots")
        .join(profile.snapshot_folder())
}

/// The workspace root (the suite crate's parent folder).
pub fn workspace() -> PathBuf {
    // At run time first: nextest sets it to the remapped checkout when an archive runs on
    // another machine (`--workspace-remap`); the build's path is the fallback.
    let suite = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .filter(|p| p.join("Cargo.toml").is_file())
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    suite.parent().unwrap_or(&suite).to_path_buf()
}

pub fn name(method: &str, order: &str) -> String {
    format!("{method}__{order}")
}

/// Reads a snapshot file written by insta (a `---` metadata header, then the body).
pub fn read(path: &Path) -> Result<Option<Snapshot>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let body = text
        .strip_prefix("---\n")
        .and_then(|rest| rest.split_once("\n---\n"))
        .map(|(_, body)| body)
        .ok_or_else(|| {
            format!(
                "{}: not an insta snapshot (no `---` header)",
                path.display()
            )
        })?;
    serde_json::from_str(body)
        .map(Some)
        .map_err(|e| format!("{}: line {}: {e}", path.display(), e.line()))
}

/// A new matrix against its snapshot: Err with every regression beyond the tolerance.
pub fn compare_matrix(
    new: &Snapshot,
    old: &Snapshot,
    tol: Tolerance,
) -> Result<Vec<String>, String> {
    if new.tasks != old.tasks || new.matrix.len() != old.matrix.len() {
        return Err(format!(
            "the matrix shape changed: tasks {:?} x {} rows, snapshot {:?} x {} rows",
            new.tasks,
            new.matrix.len(),
            old.tasks,
            old.matrix.len()
        ));
    }
    let mut bad = vec![];
    let mut notes = vec![];
    let mut check = |what: &str, n: Option<f64>, o: Option<f64>, higher_is_worse: bool| match (n, o)
    {
        (Some(n), Some(o)) => {
            let worse = if higher_is_worse { n - o } else { o - n };
            if worse > tol.metric {
                bad.push(format!(
                    "{what} {} {:.2} -> {:.2} (snapshot {o:.2}, new {n:.2}, tolerance {:.2})",
                    if higher_is_worse { "rose" } else { "fell" },
                    o,
                    n,
                    tol.metric
                ));
            } else if n != o {
                notes.push(format!("{what}: snapshot {o:.2}, new {n:.2}"));
            }
        }
        (n, o) if n != o => bad.push(format!("{what}: snapshot {o:?}, new {n:?}")),
        _ => {}
    };
    check("Forgetting", new.forgetting, old.forgetting, true);
    check("Avg.ACC", new.avg_acc, old.avg_acc, false);
    check("New.ACC", new.new_acc, old.new_acc, false);
    if bad.is_empty() {
        Ok(notes)
    } else {
        Err(bad.join("; "))
    }
}

/// Records `snap` through insta: with `INSTA_UPDATE=always` it is written, otherwise a
/// `.snap.new` is left for `cargo insta review` (never in CI, where insta writes nothing).
/// Returns whether insta accepted it.
pub fn record(snap: &Snapshot) -> bool {
    let mut settings = insta::Settings::clone_current();
    settings.set_snapshot_path(dir(snap.profile));
    settings.set_prepend_module_to_snapshot(false);
    settings.set_omit_expression(true);
    let name = name(&snap.method, &snap.order);
    let body = snap.body();
    // insta reports a mismatch by panicking (after writing `.snap.new` outside CI).
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        settings.bind(|| insta::assert_snapshot!(name.as_str(), body));
    }))
    .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(rows: Vec<Vec<Option<f64>>>) -> Snapshot {
        let tasks = vec![TaskId::Vqav2, TaskId::Imagenet];
        let mut m = AccuracyMatrix::sequential(tasks).unwrap();
        for r in rows {
            m.push_row(r).unwrap();
        }
        Snapshot::new(Profile::Mini, "lora", "x", &m, BTreeMap::new())
    }

    #[test]
    fn one_sided_comparison_with_tolerance() {
        let tol = Tolerance {
            text_cell: 5.0,
            image_cell: 5.0,
            metric: 3.0,
        };
        let old = snap(vec![vec![Some(80.0), None], vec![Some(40.0), Some(70.0)]]);
        // Forgetting 40 -> 50 is a regression; naming both values.
        let worse = snap(vec![vec![Some(80.0), None], vec![Some(30.0), Some(70.0)]]);
        let e = compare_matrix(&worse, &old, tol).unwrap_err();
        assert!(e.contains("Forgetting rose 40.00 -> 50.00"), "{e}");
        assert!(e.contains("Avg.ACC fell 55.00 -> 50.00"), "{e}");
        // Within tolerance, or better: passes, with a note when the numbers moved.
        let close = snap(vec![vec![Some(80.0), None], vec![Some(38.0), Some(70.0)]]);
        assert_eq!(compare_matrix(&close, &old, tol).unwrap().len(), 2);
        let better = snap(vec![vec![Some(90.0), None], vec![Some(60.0), Some(70.0)]]);
        assert!(compare_matrix(&better, &old, tol).is_ok());
        assert!(compare_matrix(&old, &old, tol).unwrap().is_empty());
        assert_eq!(old.cell(2, TaskId::Vqav2), Some(40.0));
        assert_eq!(old.cell(1, TaskId::Imagenet), None);
        assert_eq!(old.cell(3, TaskId::Vqav2), None);
    }

    #[test]
    fn reads_what_insta_writes() {
        let s = snap(vec![vec![Some(80.0), None]]);
        let file = format!("---\nsource: suite/tests/suite.rs\n---\n{}\n", s.body());
        let tmp = std::env::temp_dir().join(format!("cnext-snap-{}.snap", std::process::id()));
        std::fs::write(&tmp, file).unwrap();
        assert_eq!(read(&tmp).unwrap(), Some(s));
        std::fs::write(&tmp, "garbage").unwrap();
        assert!(read(&tmp).unwrap_err().contains("not an insta snapshot"));
        std::fs::remove_file(&tmp).unwrap();
        assert_eq!(read(Path::new("/nonexistent/x.snap")).unwrap(), None);
    }
}
