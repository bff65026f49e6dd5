//! The forgetting decomposition of a run: every wrong answer on a text task gets an error type
//! (IUF / HAL / OTH, `cnext_datasets::errors`), per-cell rates in percent of the cell's samples,
//! and `Avg.X` over the final row (SCORING.md). Computed from the stored predictions, so it
//! needs no retraining and works on any cached stage.

use crate::run::RunError;
use cnext_core::metrics::{avg_error_type, ErrorType, ErrorTypeRates};
use cnext_core::scoring::Compat;
use cnext_core::{AccuracyMatrix, Modality, TaskId};
use cnext_datasets::errors::{classify_wrong, Judge, JudgeCase, Reason};
use cnext_datasets::evaluate::{read_predictions, score_text_sample};
use cnext_datasets::formats::QuestionId;
use cnext_datasets::TaskSpec;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Who typed the wrong answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Classifier {
    /// The rule-based classifier alone.
    Rules,
    /// An LLM judge; cases where it failed or answered out of format fell back to the rules.
    Judge {
        name: String,
        judged: usize,
        fell_back: usize,
        /// Fallbacks by failure kind (`transport`, `timeout`, `status`, `format`).
        failures: BTreeMap<String, usize>,
    },
}

/// The error-type decomposition stored in `results.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorReport {
    /// Percent of each cell's samples; image tasks and unseen cells are `None`.
    pub rates: ErrorTypeRates,
    pub avg_iuf: Option<f64>,
    pub avg_hal: Option<f64>,
    pub avg_oth: Option<f64>,
    /// `(1/(T-1)) * sum over text tasks i<T of (a[i][i] - a[T-1][i])`: what the three averages
    /// add up to when every text scorer is binary (the decomposition invariant).
    pub text_forgetting: Option<f64>,
    /// Wrong answers by rule reason, one map per stage row.
    pub reasons: Vec<BTreeMap<TaskId, BTreeMap<Reason, usize>>>,
    pub classifier: Classifier,
}

/// The predictions of one evaluated cell: the merge.jsonl and the references by question id.
pub struct Cell {
    pub stage: usize,
    pub task: TaskId,
    pub predictions: PathBuf,
}

/// The share of Forgetting that text tasks carry, with the divisor of the paper's formula.
pub fn text_forgetting(m: &AccuracyMatrix) -> Option<f64> {
    let t = m.num_stages();
    if m.is_joint() || t < 2 {
        return None;
    }
    let mut sum = 0.0;
    for (i, task) in m.tasks().iter().enumerate().take(t - 1) {
        if task.output() == Modality::Text {
            sum += m.get(i, i)? - m.get(t - 1, i)?;
        }
    }
    Some(sum / (t - 1) as f64)
}

#[derive(Default)]
struct Counts {
    samples: usize,
    by_type: BTreeMap<ErrorType, usize>,
    reasons: BTreeMap<Reason, usize>,
}

/// Classifies every wrong answer of the cells. `references` gives the text references of a
/// task by question id. A judge, when given, types each wrong case; its failures fall back to
/// the rule and are counted.
pub fn error_report(
    matrix: &AccuracyMatrix,
    cells: &[Cell],
    references: &dyn Fn(TaskId) -> Result<BTreeMap<QuestionId, Vec<String>>, RunError>,
    judge: Option<&dyn Judge>,
) -> Result<ErrorReport, RunError> {
    let tasks = matrix.tasks().to_vec();
    let rows = matrix.num_stages();
    let empty = vec![vec![None; tasks.len()]; rows];
    let mut rates = ErrorTypeRates {
        tasks: tasks.clone(),
        iuf: empty.clone(),
        hal: empty.clone(),
        oth: empty,
    };
    let mut reasons = vec![BTreeMap::new(); rows];
    let (mut judged, mut fell_back) = (0, 0);
    let mut failures = BTreeMap::new();
    let mut refs_cache: BTreeMap<TaskId, BTreeMap<QuestionId, Vec<String>>> = BTreeMap::new();
    for cell in cells {
        let spec = TaskSpec::of(cell.task);
        let col = tasks.iter().position(|&t| t == cell.task);
        let (Some(col), Modality::Text) = (col, spec.output()) else {
            continue;
        };
        if cell.stage == 0 || cell.stage > rows {
            return Err(RunError::Stage(format!(
                "error types: stage {} out of range 1..={rows}",
                cell.stage
            )));
        }
        let refs = match refs_cache.entry(cell.task) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => e.insert(references(cell.task)?),
        };
        let preds = read_predictions(&cell.predictions.join("merge.jsonl"))
            .map_err(|e| RunError::Stage(format!("error types: {e}")))?;
        let mut counts = Counts::default();
        for (qid, p) in &preds {
            let r = refs.get(qid).ok_or_else(|| {
                RunError::Stage(format!(
                    "{}: line {}: question {qid} is not in the {} test set",
                    cell.predictions.join("merge.jsonl").display(),
                    p.line,
                    cell.task
                ))
            })?;
            counts.samples += 1;
            let (score, _) = score_text_sample(spec.scorer, &p.record.text, r, Compat::Correct)
                .map_err(|e| RunError::Stage(format!("{}: question {qid}: {e}", cell.task)))?;
            // Graded scorers (vqa_accuracy): only answers with no credit are wrong.
            let wrong = if spec.scorer.is_binary() {
                score < 1.0
            } else {
                score == 0.0
            };
            if !wrong {
                continue;
            }
            let Some(reason) = classify_wrong(&spec, &p.record.text) else {
                continue;
            };
            let mut kind = reason.kind();
            if let Some(j) = judge {
                let case = JudgeCase {
                    task: cell.task,
                    instruction: &p.record.prompt,
                    prediction: &p.record.text,
                    references: r,
                };
                match j.judge(&case) {
                    Ok(k) => {
                        kind = k;
                        judged += 1;
                    }
                    Err(e) => {
                        fell_back += 1;
                        *failures.entry(e.kind().to_string()).or_insert(0) += 1;
                    }
                }
            }
            *counts.by_type.entry(kind).or_insert(0) += 1;
            *counts.reasons.entry(reason).or_insert(0) += 1;
        }
        let n = counts.samples.max(1) as f64;
        let rate = |k| Some(100.0 * *counts.by_type.get(&k).unwrap_or(&0) as f64 / n);
        let j = cell.stage - 1;
        rates.iuf[j][col] = rate(ErrorType::Iuf);
        rates.hal[j][col] = rate(ErrorType::Hal);
        rates.oth[j][col] = rate(ErrorType::Oth);
        reasons[j].insert(cell.task, counts.reasons);
    }
    let classifier = match judge {
        None => Classifier::Rules,
        Some(j) => Classifier::Judge {
            name: j.name(),
            judged,
            fell_back,
            failures,
        },
    };
    Ok(ErrorReport {
        avg_iuf: avg_error_type(&rates, ErrorType::Iuf),
        avg_hal: avg_error_type(&rates, ErrorType::Hal),
        avg_oth: avg_error_type(&rates, ErrorType::Oth),
        text_forgetting: text_forgetting(matrix),
        rates,
        reasons,
        classifier,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use cnext_datasets::errors::JudgeError;
    use TaskId::*;

    /// Writes one merge.jsonl with `preds` (question id -> text) and returns its folder.
    fn cell(root: &std::path::Path, name: &str, preds: &[(u64, &str)]) -> PathBuf {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let body: String = preds
            .iter()
            .map(|(q, t)| format!("{}\n", serde_json::json!({"question_id": q, "text": t})))
            .collect();
        std::fs::write(dir.join("merge.jsonl"), body).unwrap();
        dir
    }

    fn refs(t: TaskId) -> Result<BTreeMap<QuestionId, Vec<String>>, RunError> {
        let answers: &[&str] = match t {
            Vqav2 => &["red", "blue", "two", "yes"],
            _ => &["[0.10,0.10,0.50,0.50]"; 4],
        };
        Ok(answers
            .iter()
            .enumerate()
            .map(|(i, a)| (QuestionId::Int(i as u64), vec![a.to_string()]))
            .collect())
    }

    /// vqav2 then refcoco: after stage 1, vqav2 has 1 wrong (HAL); after stage 2 vqav2 has 3
    /// wrong (an empty answer, a box, a wrong word) and refcoco 2 (a word, a wrong box).
    fn setup(root: &std::path::Path) -> (AccuracyMatrix, Vec<Cell>) {
        let mut m = AccuracyMatrix::sequential(vec![Vqav2, Refcoco]).unwrap();
        m.push_row(vec![Some(75.0), None]).unwrap();
        m.push_row(vec![Some(25.0), Some(50.0)]).unwrap();
        let c = |stage, task, dir| Cell {
            stage,
            task,
            predictions: dir,
        };
        let cells = vec![
            c(
                1,
                Vqav2,
                cell(
                    root,
                    "s1v",
                    &[(0, "red"), (1, "green"), (2, "two"), (3, "yes")],
                ),
            ),
            c(
                2,
                Vqav2,
                cell(
                    root,
                    "s2v",
                    &[(0, ""), (1, "[0.1,0.1,0.2,0.2]"), (2, "three"), (3, "yes")],
                ),
            ),
            c(
                2,
                Refcoco,
                cell(
                    root,
                    "s2r",
                    &[
                        (0, "[0.10,0.10,0.50,0.50]"),
                        (1, "red"),
                        (2, "[0.60,0.60,0.90,0.90]"),
                        (3, "[0.12,0.1,0.5,0.5]"),
                    ],
                ),
            ),
        ];
        (m, cells)
    }

    #[test]
    fn rates_and_averages_by_hand() {
        let tmp = std::env::temp_dir().join(format!("cnext-errors-{}", std::process::id()));
        let (m, cells) = setup(&tmp);
        let r = error_report(&m, &cells, &refs, None).unwrap();
        assert_eq!(r.rates.hal[0], vec![Some(25.0), None]);
        assert_eq!(r.rates.iuf[1], vec![Some(50.0), Some(25.0)]);
        assert_eq!(r.rates.hal[1], vec![Some(25.0), Some(25.0)]);
        assert_eq!(r.rates.oth[1], vec![Some(0.0), Some(0.0)]);
        // Avg.X over the one earlier task: X[1][0] - X[0][0].
        assert_eq!(
            (r.avg_iuf, r.avg_hal, r.avg_oth),
            (Some(50.0), Some(0.0), Some(0.0))
        );
        // The decomposition: 50 + 0 + 0 = 75 - 25.
        assert_eq!(r.text_forgetting, Some(50.0));
        assert_eq!(r.reasons[1][&Vqav2][&Reason::Empty], 1);
        assert_eq!(r.reasons[1][&Vqav2][&Reason::BoxForWord], 1);
        assert_eq!(r.reasons[1][&Refcoco][&Reason::NotABox], 1);
        assert_eq!(r.classifier, Classifier::Rules);
        std::fs::remove_dir_all(&tmp).ok();
    }

    /// Says OTH for everything, except that it fails on empty answers and times out on boxes.
    struct Fake;
    impl Judge for Fake {
        fn name(&self) -> String {
            "fake".into()
        }
        fn judge(&self, case: &JudgeCase<'_>) -> Result<ErrorType, JudgeError> {
            match case.prediction {
                "" => Err(JudgeError::Format("?".into())),
                p if p.starts_with('[') => Err(JudgeError::Timeout),
                _ => Ok(ErrorType::Oth),
            }
        }
    }

    #[test]
    fn judge_failures_fall_back_to_the_rules_and_are_counted() {
        let tmp = std::env::temp_dir().join(format!("cnext-judge-{}", std::process::id()));
        let (m, cells) = setup(&tmp);
        let r = error_report(&m, &cells, &refs, Some(&Fake)).unwrap();
        // Judged: "green", "three", "red" (OTH). Fell back: "" (IUF), two boxes (IUF, HAL).
        assert_eq!(r.rates.oth[1], vec![Some(25.0), Some(25.0)]);
        assert_eq!(r.rates.iuf[1], vec![Some(50.0), Some(0.0)]);
        assert_eq!(r.rates.hal[1], vec![Some(0.0), Some(25.0)]);
        let Classifier::Judge {
            judged,
            fell_back,
            failures,
            ..
        } = &r.classifier
        else {
            panic!("{:?}", r.classifier)
        };
        assert_eq!((*judged, *fell_back), (3, 3));
        assert_eq!(failures["format"], 1);
        assert_eq!(failures["timeout"], 2);
        std::fs::remove_dir_all(&tmp).ok();
    }

    #[test]
    fn a_prediction_for_an_unknown_question_names_the_file_and_line() {
        let tmp = std::env::temp_dir().join(format!("cnext-unknown-{}", std::process::id()));
        let m = {
            let mut m = AccuracyMatrix::sequential(vec![Vqav2]).unwrap();
            m.push_row(vec![Some(0.0)]).unwrap();
            m
        };
        let dir = cell(&tmp, "s1", &[(0, "red"), (99, "blue")]);
        let cells = [Cell {
            stage: 1,
            task: Vqav2,
            predictions: dir,
        }];
        let e = error_report(&m, &cells, &refs, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("merge.jsonl: line 2: question 99"), "{e}");
        std::fs::remove_dir_all(&tmp).ok();
    }
}
