//! Scoring a task's predictions (official `merge.jsonl`) against its test annotations. Shared
//! by `cnext score` and the harness. Predictions are matched by `question_id`; an unknown or
//! duplicate id is an error naming the line, a missing one is reported and scores 0.

use crate::formats::{PredictionRecord, QuestionId};
use crate::loader::{TestItem, TestSample};
use crate::spec::TaskSpec;
use cnext_core::scoring::{Compat, ScoreError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("{path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {msg}")]
    Line {
        path: PathBuf,
        line: usize,
        msg: String,
    },
    #[error("{task}: {source}")]
    Score { task: String, source: ScoreError },
    #[error("{0}: image tasks are scored with the CLIP-like scorer (clip_t / clip_i), which this command does not load yet")]
    NeedsClip(String),
}

/// A prediction with the line it came from.
#[derive(Debug, Clone)]
pub struct Prediction {
    pub line: usize,
    pub record: PredictionRecord,
}

/// Reads `merge.jsonl`, rejecting malformed lines and duplicate ids (both named by line).
pub fn read_predictions(path: &Path) -> Result<BTreeMap<QuestionId, Prediction>, EvalError> {
    let text = std::fs::read_to_string(path).map_err(|source| EvalError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut out: BTreeMap<QuestionId, Prediction> = BTreeMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let record: PredictionRecord = serde_json::from_str(raw).map_err(|e| EvalError::Line {
            path: path.to_path_buf(),
            line,
            msg: format!("malformed prediction: {e}"),
        })?;
        if let Some(prev) = out.get(&record.question_id) {
            return Err(EvalError::Line {
                path: path.to_path_buf(),
                line,
                msg: format!(
                    "duplicate question_id {} (first on line {})",
                    record.question_id, prev.line
                ),
            });
        }
        out.insert(record.question_id.clone(), Prediction { line, record });
    }
    Ok(out)
}

/// The score of one sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleScore {
    pub question_id: QuestionId,
    /// None when the prediction file has no entry for this id.
    pub prediction: Option<String>,
    pub answer: String,
    /// In [0, 1] (text tasks) or CLIP points / 100 (image tasks).
    pub score: f64,
    pub format_error: bool,
}

/// The score of a task: accuracy in percent over every test sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskScore {
    pub accuracy: f64,
    pub samples: usize,
    pub missing: Vec<QuestionId>,
    pub per_sample: Vec<SampleScore>,
}

/// Scores a text task. Predictions for ids absent from the annotations are an error.
pub fn score_text_task(
    spec: &TaskSpec,
    tests: &[TestSample],
    predictions: &BTreeMap<QuestionId, Prediction>,
    predictions_path: &Path,
    compat: Compat,
) -> Result<TaskScore, EvalError> {
    if spec.output() == cnext_core::Modality::Image {
        return Err(EvalError::NeedsClip(spec.id.to_string()));
    }
    let known: BTreeMap<&QuestionId, ()> = tests.iter().map(|t| (&t.question_id, ())).collect();
    if let Some(p) = predictions
        .values()
        .find(|p| !known.contains_key(&p.record.question_id))
    {
        return Err(EvalError::Line {
            path: predictions_path.to_path_buf(),
            line: p.line,
            msg: format!(
                "question_id {} is not in the {} annotations",
                p.record.question_id, spec.id
            ),
        });
    }
    let mut per_sample = Vec::with_capacity(tests.len());
    let mut missing = vec![];
    for t in tests {
        let (answer, refs) = match &t.item {
            TestItem::Question {
                answer, answers, ..
            } => {
                let refs = match (spec.scorer, answers) {
                    (cnext_core::scoring::Scorer::VqaAccuracy, Some(a)) => a.clone(),
                    _ => vec![answer.clone()],
                };
                (answer.clone(), refs)
            }
            TestItem::Grounding { answer, .. } => (answer.clone(), vec![answer.clone()]),
            _ => return Err(EvalError::NeedsClip(spec.id.to_string())),
        };
        let pred = predictions
            .get(&t.question_id)
            .map(|p| p.record.text.clone());
        let (score, format_error) = match &pred {
            None => {
                missing.push(t.question_id.clone());
                (0.0, false)
            }
            Some(p) => {
                let s = spec.scorer.score_text(p, &refs, compat).map_err(|source| {
                    EvalError::Score {
                        task: spec.id.to_string(),
                        source,
                    }
                })?;
                (s.score, s.format_error)
            }
        };
        per_sample.push(SampleScore {
            question_id: t.question_id.clone(),
            prediction: pred,
            answer,
            score,
            format_error,
        });
    }
    let total: f64 = per_sample.iter().map(|s| s.score).sum();
    Ok(TaskScore {
        accuracy: if tests.is_empty() {
            0.0
        } else {
            100.0 * total / tests.len() as f64
        },
        samples: tests.len(),
        missing,
        per_sample,
    })
}
