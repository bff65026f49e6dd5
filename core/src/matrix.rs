//! The accuracy matrix `a[j][i]`: accuracy (percent) on task `i` after training stage `j`.
//!
//! Cells are `Option<f64>` so that "not evaluated" can never be mistaken for an accuracy of 0.
//! Every constructor, the CSV reader and the JSON deserialiser validate the same invariants, so a
//! matrix in hand is always well formed: unique tasks, rows as long as the task list, values
//! finite and in `0..=100`, at most one row per task (sequential) or exactly one row (joint).

use crate::task::{ParseIdError, TaskId};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::io::Read;
use std::str::FromStr;

/// Why a matrix could not be built.
///
/// CSV variants name the input (`src`, the label the caller passed as `source`) and the 1-based
/// line. The field is called `src`, not `source`, because thiserror treats a field named `source`
/// as the wrapped cause (it must then implement `Error`). The other variants come from building a
/// matrix in code or from JSON, where there is no line to point at.
#[derive(Debug, thiserror::Error)]
pub enum MatrixError {
    #[error("{src}:{line}: no header row (expected a line of task ids)")]
    NoHeader { src: String, line: usize },
    #[error("{src}:{line}: {error}")]
    UnknownTask {
        src: String,
        line: usize,
        #[source]
        error: ParseIdError,
    },
    #[error("{src}:{line}: task `{task}` appears twice in the header")]
    DuplicateTask {
        src: String,
        line: usize,
        task: TaskId,
    },
    #[error("{src}:{line}: row has {got} cells but the header names {expected} tasks")]
    Ragged {
        src: String,
        line: usize,
        expected: usize,
        got: usize,
    },
    #[error("{src}:{line}: column `{task}`: `{cell}` is not a number (leave empty or write `-` for not evaluated)")]
    NotNumeric {
        src: String,
        line: usize,
        task: TaskId,
        cell: String,
    },
    /// Also NaN (printed `NaN`) and infinities: not evaluated is written empty or `-`.
    #[error("{src}:{line}: column `{task}`: {value} is not a score in {}", range_of(*task))]
    OutOfRange {
        src: String,
        line: usize,
        task: TaskId,
        value: f64,
    },
    #[error("{src}:{line}: too many rows: {tasks} tasks allow at most {tasks} stage rows")]
    TooManyRows {
        src: String,
        line: usize,
        tasks: usize,
    },
    #[error("{src}:{line}: malformed CSV: {error}")]
    Csv {
        src: String,
        line: usize,
        #[source]
        error: csv::Error,
    },
    #[error("{src}: cannot read: {error}")]
    Io {
        src: String,
        #[source]
        error: std::io::Error,
    },
    #[error("a matrix needs at least one task")]
    NoTasks,
    #[error("task `{task}` is listed twice")]
    RepeatedTask { task: TaskId },
    #[error("stage {stage}: row has {got} cells but there are {expected} tasks")]
    RowLength {
        stage: usize,
        expected: usize,
        got: usize,
    },
    #[error("stage {stage}, task `{task}`: {value} is not a finite score in {}", range_of(*task))]
    BadCell {
        stage: usize,
        task: TaskId,
        value: f64,
    },
    #[error("too many stages: this matrix holds at most {max} rows")]
    TooManyStages { max: usize },
    #[error("a joint matrix has exactly one row, got {got}")]
    JointRowCount { got: usize },
}

impl MatrixError {
    /// The 1-based line of a CSV error, `None` for errors that did not come from CSV.
    pub fn line(&self) -> Option<usize> {
        use MatrixError::*;
        match self {
            NoHeader { line, .. }
            | UnknownTask { line, .. }
            | DuplicateTask { line, .. }
            | Ragged { line, .. }
            | NotNumeric { line, .. }
            | OutOfRange { line, .. }
            | TooManyRows { line, .. }
            | Csv { line, .. } => Some(*line),
            _ => None,
        }
    }
}

/// Accuracy of every task after every training stage, plus whether it is the joint
/// (multitask upper bound) run.
///
/// JSON form: `{"tasks": ["vqav2", ...], "rows": [[80.0, null, ...], ...], "joint": false}`;
/// deserialising re-checks every invariant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "MatrixRepr")]
pub struct AccuracyMatrix {
    /// Columns, in training order.
    tasks: Vec<TaskId>,
    /// Row `j` = accuracies after stage `j`; `None` = not evaluated.
    rows: Vec<Vec<Option<f64>>>,
    /// The multitask baseline: one row, all tasks trained together.
    joint: bool,
}

/// Unvalidated JSON shape of [`AccuracyMatrix`].
#[derive(Deserialize)]
struct MatrixRepr {
    tasks: Vec<TaskId>,
    rows: Vec<Vec<Option<f64>>>,
    joint: bool,
}

impl TryFrom<MatrixRepr> for AccuracyMatrix {
    type Error = MatrixError;
    fn try_from(r: MatrixRepr) -> Result<Self, MatrixError> {
        if r.joint && r.rows.len() != 1 {
            return Err(MatrixError::JointRowCount { got: r.rows.len() });
        }
        AccuracyMatrix::with_rows(r.tasks, r.rows, r.joint)
    }
}

fn check_tasks(tasks: &[TaskId]) -> Result<(), MatrixError> {
    if tasks.is_empty() {
        return Err(MatrixError::NoTasks);
    }
    let mut seen = HashSet::new();
    match tasks.iter().find(|&&t| !seen.insert(t)) {
        Some(&task) => Err(MatrixError::RepeatedTask { task }),
        None => Ok(()),
    }
}

/// Text tasks score accuracies in 0..=100; image tasks score 100 x a raw cosine (CLIP score,
/// no clamp: SCORING.md), which is negative for a generation unlike its reference.
fn valid_accuracy(task: TaskId, v: f64) -> bool {
    let low = match task.output() {
        crate::Modality::Text => 0.0,
        crate::Modality::Image => -100.0,
    };
    v.is_finite() && (low..=100.0).contains(&v)
}

fn range_of(task: TaskId) -> &'static str {
    match task.output() {
        crate::Modality::Text => "0..=100",
        crate::Modality::Image => "-100..=100 (CLIP score)",
    }
}

impl AccuracyMatrix {
    /// An empty sequential matrix over `tasks` (training order); push one row per stage.
    pub fn sequential(tasks: Vec<TaskId>) -> Result<Self, MatrixError> {
        AccuracyMatrix::with_rows(tasks, Vec::new(), false)
    }

    /// The multitask upper bound: a single row measured after training on all tasks at once.
    pub fn joint(tasks: Vec<TaskId>, row: Vec<Option<f64>>) -> Result<Self, MatrixError> {
        AccuracyMatrix::with_rows(tasks, vec![row], true)
    }

    /// Builds through [`AccuracyMatrix::push_row`] so every path checks the same invariants.
    fn with_rows(
        tasks: Vec<TaskId>,
        rows: Vec<Vec<Option<f64>>>,
        joint: bool,
    ) -> Result<Self, MatrixError> {
        check_tasks(&tasks)?;
        let mut m = AccuracyMatrix {
            tasks,
            rows: Vec::with_capacity(rows.len()),
            joint,
        };
        rows.into_iter().try_for_each(|row| m.push_row(row))?;
        Ok(m)
    }

    /// Appends the accuracies measured after the next stage.
    pub fn push_row(&mut self, row: Vec<Option<f64>>) -> Result<(), MatrixError> {
        let max = if self.joint { 1 } else { self.tasks.len() };
        if self.rows.len() >= max {
            return Err(MatrixError::TooManyStages { max });
        }
        let stage = self.rows.len();
        if row.len() != self.tasks.len() {
            return Err(MatrixError::RowLength {
                stage,
                expected: self.tasks.len(),
                got: row.len(),
            });
        }
        for (&task, cell) in self.tasks.iter().zip(&row) {
            if let Some(value) = *cell {
                if !valid_accuracy(task, value) {
                    return Err(MatrixError::BadCell { stage, task, value });
                }
            }
        }
        self.rows.push(row);
        Ok(())
    }

    /// Columns, in training order.
    pub fn tasks(&self) -> &[TaskId] {
        &self.tasks
    }

    /// Rows, one per stage present so far.
    pub fn rows(&self) -> &[Vec<Option<f64>>] {
        &self.rows
    }

    /// `a[stage][col]`; `None` when not evaluated or out of bounds.
    pub fn get(&self, stage: usize, col: usize) -> Option<f64> {
        self.rows
            .get(stage)
            .and_then(|r| r.get(col))
            .copied()
            .flatten()
    }

    /// Number of stage rows present (a partial run has fewer than `tasks().len()`).
    pub fn num_stages(&self) -> usize {
        self.rows.len()
    }

    /// Whether this is the joint (multitask) baseline.
    pub fn is_joint(&self) -> bool {
        self.joint
    }

    /// The column of `task`, if the matrix has it.
    pub fn column_of(&self, task: TaskId) -> Option<usize> {
        self.tasks.iter().position(|&t| t == task)
    }

    /// Reads a matrix from CSV: a header of task ids, then one row per stage; an empty cell or
    /// `-` means not evaluated. `source` names the input in errors (e.g. the file path).
    ///
    /// The CSV has no joint flag, so the shape decides: exactly one data row with every cell
    /// filled and more than one task is read as joint; anything else is sequential. (A
    /// sequential run stopped after stage 0 that also evaluated every future task therefore reads
    /// as joint; use JSON when that distinction matters.)
    pub fn from_csv_reader<R: Read>(mut reader: R, source: &str) -> Result<Self, MatrixError> {
        let src = || source.to_string();
        // Matrices are tiny; holding the bytes lets errors point at the true line (the csv crate
        // reports a record's position before the blank lines it skips).
        let mut data = Vec::new();
        reader
            .read_to_end(&mut data)
            .map_err(|error| MatrixError::Io { src: src(), error })?;
        let mut rdr = csv::ReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            .trim(csv::Trim::All)
            .from_reader(data.as_slice());
        let mut record = csv::StringRecord::new();
        let mut last_line = 0;

        if !next_record(&mut rdr, &mut record, &mut last_line, &data, source)? {
            return Err(MatrixError::NoHeader {
                src: src(),
                line: 1,
            });
        }
        let header_line = last_line;
        let mut tasks = Vec::with_capacity(record.len());
        for cell in record.iter() {
            let task = TaskId::from_str(cell).map_err(|error| MatrixError::UnknownTask {
                src: src(),
                line: header_line,
                error,
            })?;
            if tasks.contains(&task) {
                return Err(MatrixError::DuplicateTask {
                    src: src(),
                    line: header_line,
                    task,
                });
            }
            tasks.push(task);
        }

        let mut rows = Vec::new();
        while next_record(&mut rdr, &mut record, &mut last_line, &data, source)? {
            let line = last_line;
            if rows.len() >= tasks.len() {
                return Err(MatrixError::TooManyRows {
                    src: src(),
                    line,
                    tasks: tasks.len(),
                });
            }
            if record.len() != tasks.len() {
                return Err(MatrixError::Ragged {
                    src: src(),
                    line,
                    expected: tasks.len(),
                    got: record.len(),
                });
            }
            let mut row = Vec::with_capacity(tasks.len());
            for (&task, cell) in tasks.iter().zip(record.iter()) {
                row.push(parse_cell(cell, task, source, line)?);
            }
            rows.push(row);
        }

        let joint = tasks.len() > 1 && rows.len() == 1 && rows[0].iter().all(Option::is_some);
        AccuracyMatrix::with_rows(tasks, rows, joint)
    }

    /// Writes the CSV form read by [`AccuracyMatrix::from_csv_reader`]. Missing cells are written
    /// as `-` (an empty line would be skipped by CSV readers in a one-task matrix); values use the
    /// shortest representation that reads back to the same `f64`.
    pub fn to_csv_string(&self) -> String {
        let header = self.tasks.iter().map(|t| t.as_str().to_string());
        let cell = |c: &Option<f64>| c.map_or_else(|| "-".to_string(), |v| v.to_string());
        let rows = self.rows.iter().map(|r| r.iter().map(cell).collect());
        std::iter::once(header.collect::<Vec<_>>())
            .chain(rows)
            .map(|cells| cells.join(",") + "\n")
            .collect()
    }
}

/// 1-based line of the record whose position the csv crate reports as `byte`: that position is
/// the end of the previous record, so skip the blank lines in between.
fn line_at(data: &[u8], byte: u64) -> usize {
    let start = usize::try_from(byte).unwrap_or(usize::MAX).min(data.len());
    let skipped = data[start..]
        .iter()
        .take_while(|&&b| b == b'\n' || b == b'\r')
        .count();
    1 + data[..start + skipped]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
}

/// Reads the next record, setting `line` to its 1-based line; `Ok(false)` at the end.
fn next_record(
    rdr: &mut csv::Reader<&[u8]>,
    rec: &mut csv::StringRecord,
    line: &mut usize,
    data: &[u8],
    source: &str,
) -> Result<bool, MatrixError> {
    match rdr.read_record(rec) {
        Ok(more) => {
            if let Some(p) = rec.position() {
                *line = line_at(data, p.byte());
            }
            Ok(more)
        }
        Err(error) => Err(MatrixError::Csv {
            src: source.to_string(),
            line: error
                .position()
                .map_or(*line + 1, |p| line_at(data, p.byte())),
            error,
        }),
    }
}

fn parse_cell(
    cell: &str,
    task: TaskId,
    source: &str,
    line: usize,
) -> Result<Option<f64>, MatrixError> {
    if cell.is_empty() || cell == "-" {
        return Ok(None);
    }
    let value: f64 = cell.parse().map_err(|_| MatrixError::NotNumeric {
        src: source.to_string(),
        line,
        task,
        cell: cell.to_string(),
    })?;
    if !valid_accuracy(task, value) {
        return Err(MatrixError::OutOfRange {
            src: source.to_string(),
            line,
            task,
            value,
        });
    }
    Ok(Some(value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use TaskId::*;

    fn csv(text: &str) -> Result<AccuracyMatrix, MatrixError> {
        AccuracyMatrix::from_csv_reader(text.as_bytes(), "m.csv")
    }

    /// Asserts the error's message names the source and the expected line.
    fn assert_err_at(err: MatrixError, line: usize, needle: &str) {
        let msg = err.to_string();
        assert_eq!(err.line(), Some(line), "{msg}");
        assert!(msg.starts_with(&format!("m.csv:{line}: ")), "{msg}");
        assert!(msg.contains(needle), "`{msg}` lacks `{needle}`");
    }

    #[test]
    fn push_row_checks_length_range_and_count() {
        let mut m = AccuracyMatrix::sequential(vec![Vqav2, Imagenet]).unwrap();
        let err = |r: Result<(), MatrixError>| r.unwrap_err().to_string();
        assert_eq!(
            err(m.push_row(vec![Some(1.0)])),
            "stage 0: row has 1 cells but there are 2 tasks"
        );
        for bad in [f64::NAN, f64::INFINITY, -0.5, 100.5] {
            let msg = format!("stage 0, task `vqav2`: {bad} is not a finite score in 0..=100");
            assert_eq!(err(m.push_row(vec![Some(bad), None])), msg);
        }
        // A CLIP score may be negative.
        let mut img = AccuracyMatrix::sequential(vec![TaskId::Flickr30k, TaskId::Hqedit]).unwrap();
        assert!(err(img.push_row(vec![Some(-100.5), None])).contains("-100..=100 (CLIP score)"));
        img.push_row(vec![Some(-11.5), None]).unwrap();
        m.push_row(vec![Some(0.0), None]).unwrap();
        m.push_row(vec![Some(100.0), Some(50.0)]).unwrap();
        let full = err(m.push_row(vec![None, None]));
        assert_eq!(full, "too many stages: this matrix holds at most 2 rows");
        assert_eq!(
            (m.num_stages(), m.get(0, 1), m.get(1, 1), m.get(5, 0)),
            (2, None, Some(50.0), None)
        );
        assert_eq!(
            (m.column_of(Imagenet), m.column_of(Hqedit)),
            (Some(1), None)
        );
        assert!(!m.is_joint());
    }

    #[test]
    fn constructors_reject_bad_task_lists_and_joint_has_one_row() {
        let err = |r: Result<AccuracyMatrix, MatrixError>| r.unwrap_err().to_string();
        assert_eq!(
            err(AccuracyMatrix::sequential(vec![])),
            "a matrix needs at least one task"
        );
        let twice = err(AccuracyMatrix::sequential(vec![Vqav2, Vqav2]));
        assert_eq!(twice, "task `vqav2` is listed twice");
        let mut j =
            AccuracyMatrix::joint(vec![Vqav2, Hqedit], vec![Some(70.0), Some(40.0)]).unwrap();
        assert!(j.is_joint());
        assert_eq!(j.rows(), &[vec![Some(70.0), Some(40.0)]]);
        let more = j.push_row(vec![None, None]).unwrap_err();
        assert!(
            matches!(more, MatrixError::TooManyStages { max: 1 }),
            "{more}"
        );
    }

    #[test]
    fn csv_reads_missing_cells_and_round_trips() {
        let m = csv("vqav2, imagenet ,flickr30k\n80,-,\n\n85,90,\n60,85,50\n").unwrap();
        assert_eq!(m.tasks(), &[Vqav2, Imagenet, Flickr30k]);
        assert_eq!(m.num_stages(), 3);
        assert!(!m.is_joint());
        assert_eq!(m.rows()[0], vec![Some(80.0), None, None]);
        assert_eq!(m.get(2, 2), Some(50.0));
        let text = m.to_csv_string();
        assert_eq!(
            text,
            "vqav2,imagenet,flickr30k\n80,-,-\n85,90,-\n60,85,50\n"
        );
        assert_eq!(csv(&text).unwrap(), m);

        // Header only: a run that has not finished a stage yet.
        let empty = csv("vqav2,imagenet\n").unwrap();
        assert_eq!(empty.num_stages(), 0);

        // One-task matrix with a missing cell survives the round trip thanks to `-`.
        let mut one = AccuracyMatrix::sequential(vec![Refcoco]).unwrap();
        one.push_row(vec![None]).unwrap();
        assert_eq!(csv(&one.to_csv_string()).unwrap(), one);
    }

    #[test]
    fn csv_single_full_row_is_joint() {
        let j = csv("vqav2,hqedit\n70.5,40\n").unwrap();
        assert!(j.is_joint());
        assert_eq!(csv(&j.to_csv_string()).unwrap(), j);
        // A missing cell, more rows or a single task keep it sequential.
        assert!(!csv("vqav2,hqedit\n70.5,-\n").unwrap().is_joint());
        assert!(!csv("vqav2,hqedit\n70,-\n60,50\n").unwrap().is_joint());
        assert!(!csv("vqav2\n70\n").unwrap().is_joint());
    }

    #[test]
    fn csv_errors_name_source_and_line() {
        let cases = [
            ("", 1, "no header row"),
            ("vqav2,coco\n", 1, "unknown task id `coco`"),
            ("vqav2,vqav2\n", 1, "`vqav2` appears twice"),
            (
                "vqav2,imagenet\n80,-\n1,2,3\n",
                3,
                "row has 3 cells but the header names 2",
            ),
            ("vqav2,imagenet\n80\n", 2, "row has 1 cells"),
            (
                "vqav2,imagenet\n80,-\n\n7o,1\n",
                4,
                "column `vqav2`: `7o` is not a number",
            ),
            (
                "vqav2,imagenet\nNaN,-\n",
                2,
                "NaN is not a score in 0..=100",
            ),
            (
                "vqav2,imagenet\n80,-\n50,100.1\n",
                3,
                "`imagenet`: 100.1 is not a score",
            ),
            ("vqav2,imagenet\n-3,-\n", 2, "-3 is not a score"),
            ("vqav2,imagenet\ninf,-\n", 2, "inf is not a score"),
            ("vqav2\n1\n2\n", 3, "at most 1 stage rows"),
        ];
        for (text, line, needle) in cases {
            assert_err_at(csv(text).unwrap_err(), line, needle);
        }
        let bad_utf8: &[u8] = b"vqav2\n\xff\n";
        let e = AccuracyMatrix::from_csv_reader(bad_utf8, "m.csv").unwrap_err();
        assert!(matches!(e, MatrixError::Csv { line: 2, .. }), "{e}");
        assert!(e.to_string().starts_with("m.csv:2: malformed CSV"), "{e}");
        let late: &[u8] = b"vqav2\n\n\r\n1\n\n\xff\n";
        let e = AccuracyMatrix::from_csv_reader(late, "m.csv").unwrap_err();
        assert_eq!(e.line(), Some(6), "{e}");

        struct Broken;
        impl Read for Broken {
            fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
                Err(std::io::Error::other("disk gone"))
            }
        }
        let e = AccuracyMatrix::from_csv_reader(Broken, "m.csv").unwrap_err();
        assert!(matches!(e, MatrixError::Io { .. }), "{e}");
        assert_eq!(e.to_string(), "m.csv: cannot read: disk gone");
    }

    #[test]
    fn json_round_trips_and_is_validated() {
        let m = csv("vqav2,imagenet\n80,-\n70,90\n").unwrap();
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(
            json,
            r#"{"tasks":["vqav2","imagenet"],"rows":[[80.0,null],[70.0,90.0]],"joint":false}"#
        );
        let back: AccuracyMatrix = serde_json::from_str(&json).unwrap();
        assert_eq!(back, m);
        for bad in [
            r#"{"tasks":["vqav2"],"rows":[[101.0]],"joint":false}"#,
            r#"{"tasks":["vqav2"],"rows":[[1.0, 2.0]],"joint":false}"#,
            r#"{"tasks":["vqav2","vqav2"],"rows":[],"joint":false}"#,
            r#"{"tasks":["vqav2"],"rows":[[1.0],[2.0]],"joint":false}"#,
            r#"{"tasks":["vqav2","imagenet"],"rows":[],"joint":true}"#,
        ] {
            assert!(
                serde_json::from_str::<AccuracyMatrix>(bad).is_err(),
                "{bad}"
            );
        }
    }
}
