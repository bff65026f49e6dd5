//! Scoring a task's predictions (official `merge.jsonl`) against its test annotations. Shared
//! by `cnext score` and the harness. Predictions are matched by `question_id`; an unknown or
//! duplicate id is an error naming the line, a missing one is reported and scores 0.
//!
//! Text tasks go through the task's text scorer ([`score_text_sample`]). Image tasks go
//! through a [`ClipModel`]: a prediction's `text` names the generated image, relative to the
//! folder holding `merge.jsonl` (as the harness writes them), and scores `clip_t` against the
//! caption (flickr30k) or `clip_i` against the target image (hqedit), stored as CLIP points
//! / 100 so that the task's accuracy is the mean CLIP score.

use crate::formats::{PredictionRecord, QuestionId};
use crate::loader::{load_image, resolve_image, DataError, TestItem, TestSample};
use crate::spec::TaskSpec;
use cnext_core::scoring::clip::{clip_i, clip_t, ClipModel};
use cnext_core::scoring::{Compat, ScoreError, Scorer};
use cnext_core::Modality;
use image::RgbImage;
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
    #[error("{0}: image tasks need the CLIP-like scorer")]
    NeedsClip(String),
    /// A prediction image path that is unsafe or names no file (names the file and line).
    #[error(transparent)]
    Image(#[from] DataError),
    #[error("{task}: question {question_id}: target image: {source}")]
    Target {
        task: String,
        question_id: QuestionId,
        // Boxed: keeps every `Result<_, EvalError>` small (clippy::result_large_err).
        source: Box<DataError>,
    },
}

/// A prediction with the line it came from.
#[derive(Debug, Clone)]
pub struct Prediction {
    pub line: usize,
    pub record: PredictionRecord,
}

/// Reads `merge.jsonl`, rejecting malformed lines and duplicate ids (both named by line).
pub fn read_predictions(path: &Path) -> Result<BTreeMap<QuestionId, Prediction>, EvalError> {
    let bytes = std::fs::read(path).map_err(|source| EvalError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let text = crate::loader::decode_text(bytes).map_err(|(line, msg)| EvalError::Line {
        path: path.to_path_buf(),
        line,
        msg,
    })?;
    parse_predictions(&text, path)
}

/// Parses the text of prediction file `path` (named in errors).
pub fn parse_predictions(
    text: &str,
    path: &Path,
) -> Result<BTreeMap<QuestionId, Prediction>, EvalError> {
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

/// The references a text scorer reads for a question: the human answers for `vqa_accuracy`
/// when the annotations have them, else the one answer.
pub fn text_references(scorer: Scorer, answer: &str, answers: Option<&[String]>) -> Vec<String> {
    match (scorer, answers) {
        (Scorer::VqaAccuracy, Some(a)) => a.to_vec(),
        _ => vec![answer.to_string()],
    }
}

/// Scores one text prediction against its references: `(score in [0, 1], format_error)`.
/// The one per-sample text rule of `cnext score` and the harness's in-memory evaluation.
pub fn score_text_sample(
    scorer: Scorer,
    prediction: &str,
    references: &[String],
    compat: Compat,
) -> Result<(f64, bool), ScoreError> {
    let s = scorer.score_text(prediction, references, compat)?;
    Ok((s.score, s.format_error))
}

/// Scores a task of any modality. Image tasks need `clip` (else [`EvalError::NeedsClip`]);
/// text tasks ignore it. Predictions for ids absent from the annotations are an error.
pub fn score_task<C: ClipModel<Image = RgbImage>>(
    spec: &TaskSpec,
    tests: &[TestSample],
    predictions: &BTreeMap<QuestionId, Prediction>,
    predictions_path: &Path,
    compat: Compat,
    clip: Option<&C>,
) -> Result<TaskScore, EvalError> {
    if spec.output() == Modality::Image && clip.is_none() {
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
        let pred = predictions.get(&t.question_id);
        let (score, format_error) = match pred {
            None => {
                missing.push(t.question_id.clone());
                (0.0, false)
            }
            Some(p) => score_sample(spec, &t.item, p, predictions_path, compat, clip)?,
        };
        per_sample.push(SampleScore {
            question_id: t.question_id.clone(),
            prediction: pred.map(|p| p.record.text.clone()),
            answer: answer_of(&t.item),
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

/// What a sample is scored against, as reported per sample.
fn answer_of(item: &TestItem) -> String {
    match item {
        TestItem::Question { answer, .. } | TestItem::Grounding { answer, .. } => answer.clone(),
        TestItem::TextToImage { caption, .. } => caption.clone(),
        TestItem::Edit { target, .. } => target.display().to_string(),
    }
}

/// One present prediction: `(score in [0, 1] or CLIP points / 100, format_error)`.
fn score_sample<C: ClipModel<Image = RgbImage>>(
    spec: &TaskSpec,
    item: &TestItem,
    p: &Prediction,
    predictions_path: &Path,
    compat: Compat,
    clip: Option<&C>,
) -> Result<(f64, bool), EvalError> {
    let text = |refs: &[String]| {
        score_text_sample(spec.scorer, &p.record.text, refs, compat).map_err(|source| {
            EvalError::Score {
                task: spec.id.to_string(),
                source,
            }
        })
    };
    let model = || clip.ok_or_else(|| EvalError::NeedsClip(spec.id.to_string()));
    let clip_err = |e: &dyn std::fmt::Display| EvalError::Line {
        path: predictions_path.to_path_buf(),
        line: p.line,
        msg: format!("CLIP scorer failed: {e}"),
    };
    let points = match item {
        TestItem::Question {
            answer, answers, ..
        } => return text(&text_references(spec.scorer, answer, answers.as_deref())),
        TestItem::Grounding { answer, .. } => return text(std::slice::from_ref(answer)),
        TestItem::TextToImage { caption, .. } => {
            let m = model()?;
            let Some(img) = prediction_image(p, predictions_path)? else {
                return Ok((0.0, true));
            };
            clip_t(m, Some(&img), caption).map_err(|e| clip_err(&e))?
        }
        TestItem::Edit { target, .. } => {
            let m = model()?;
            let Some(img) = prediction_image(p, predictions_path)? else {
                return Ok((0.0, true));
            };
            let target = load_image(target).map_err(|source| EvalError::Target {
                task: spec.id.to_string(),
                question_id: p.record.question_id.clone(),
                source: Box::new(source),
            })?;
            clip_i(m, Some(&img), &target).map_err(|e| clip_err(&e))?
        }
    };
    Ok((points / 100.0, false))
}

/// The generated image a prediction names, relative to the predictions file's folder (no
/// absolute path, no `..`, no symlink out of it). A blank `text` is no image output (`None`:
/// scores 0, flagged as a format error); a missing or undecodable file is an error naming
/// the image and the line.
fn prediction_image(
    p: &Prediction,
    predictions_path: &Path,
) -> Result<Option<RgbImage>, EvalError> {
    let rel = &p.record.text;
    if rel.trim().is_empty() {
        return Ok(None);
    }
    let root = match predictions_path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let full = resolve_image(root, rel, predictions_path, p.line)?;
    load_image(&full).map(Some).map_err(|e| EvalError::Line {
        path: predictions_path.to_path_buf(),
        line: p.line,
        msg: format!("prediction image: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use cnext_core::TaskId;
    use image::Rgb;

    /// Embeds an image as its mean colour and a colour word as that colour.
    struct MeanColour;

    #[derive(Debug, thiserror::Error)]
    #[error("unknown colour word {0:?}")]
    struct UnknownWord(String);

    impl ClipModel for MeanColour {
        type Image = RgbImage;
        type Error = UnknownWord;
        fn embed_image(&self, img: &RgbImage) -> Result<Vec<f32>, UnknownWord> {
            let mut sum = [0f32; 3];
            for px in img.pixels() {
                for (s, &c) in sum.iter_mut().zip(&px.0) {
                    *s += f32::from(c);
                }
            }
            Ok(sum.to_vec())
        }
        fn embed_text(&self, text: &str) -> Result<Vec<f32>, UnknownWord> {
            match text {
                "red" => Ok(vec![1.0, 0.0, 0.0]),
                "green" => Ok(vec![0.0, 1.0, 0.0]),
                _ => Err(UnknownWord(text.to_string())),
            }
        }
    }

    const RED: [u8; 3] = [255, 0, 0];
    const GREEN: [u8; 3] = [0, 255, 0];
    const YELLOW: [u8; 3] = [255, 255, 0];

    fn png(path: &Path, rgb: [u8; 3]) {
        RgbImage::from_pixel(4, 4, Rgb(rgb)).save(path).unwrap();
    }

    /// Writes `merge.jsonl` under `dir/preds` (one line per `(id, text)`) and reads it back.
    fn preds(dir: &Path, lines: &[(u64, &str)]) -> (PathBuf, BTreeMap<QuestionId, Prediction>) {
        let folder = dir.join("preds");
        std::fs::create_dir_all(&folder).unwrap();
        let path = folder.join("merge.jsonl");
        let body: String = lines
            .iter()
            .map(|(id, text)| format!("{{\"question_id\": {id}, \"text\": {text:?}}}\n"))
            .collect();
        std::fs::write(&path, body).unwrap();
        let p = read_predictions(&path).unwrap();
        (path, p)
    }

    fn t2i(id: u64, caption: &str) -> TestSample {
        TestSample {
            question_id: QuestionId::Int(id),
            line: 1,
            item: TestItem::TextToImage {
                prompt: format!("Please generate the image: {caption}"),
                caption: caption.into(),
            },
        }
    }

    fn edit(id: u64, target: &Path) -> TestSample {
        TestSample {
            question_id: QuestionId::Int(id),
            line: 1,
            item: TestItem::Edit {
                source: target.with_file_name("unused.png"),
                target: target.to_path_buf(),
                instruction: "make it red".into(),
            },
        }
    }

    fn score(
        task: TaskId,
        tests: &[TestSample],
        path: &Path,
        p: &BTreeMap<QuestionId, Prediction>,
    ) -> Result<TaskScore, EvalError> {
        score_task(
            &TaskSpec::of(task),
            tests,
            p,
            path,
            Compat::Correct,
            Some(&MeanColour),
        )
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-6
    }

    #[test]
    fn flickr30k_scores_clip_t_against_the_caption() {
        let tmp = tempfile::tempdir().unwrap();
        let (path, p) = preds(tmp.path(), &[(1, "1.png"), (2, "sub/2.png"), (4, "")]);
        png(&tmp.path().join("preds/1.png"), RED);
        std::fs::create_dir(tmp.path().join("preds/sub")).unwrap();
        png(&tmp.path().join("preds/sub/2.png"), GREEN);
        let tests = [t2i(1, "red"), t2i(2, "red"), t2i(3, "red"), t2i(4, "red")];
        let s = score(TaskId::Flickr30k, &tests, &path, &p).unwrap();
        // Perfect 100, wrong colour 0, missing 0, blank (no image) 0: mean 25 CLIP points.
        let scores: Vec<f64> = s.per_sample.iter().map(|x| x.score).collect();
        assert!(close(scores[0], 1.0) && close(scores[1], 0.0), "{scores:?}");
        assert!(close(s.accuracy, 25.0), "{}", s.accuracy);
        assert_eq!(s.missing, vec![QuestionId::Int(3)]);
        assert_eq!(s.per_sample[0].answer, "red");
        assert!(s.per_sample[3].format_error && !s.per_sample[0].format_error);
    }

    #[test]
    fn hqedit_scores_clip_i_against_the_target_image() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("target.png");
        png(&target, RED);
        let (path, p) = preds(tmp.path(), &[(1, "1.png"), (2, "2.png")]);
        png(&tmp.path().join("preds/1.png"), RED);
        png(&tmp.path().join("preds/2.png"), YELLOW);
        let tests = [edit(1, &target), edit(2, &target)];
        let s = score(TaskId::Hqedit, &tests, &path, &p).unwrap();
        // Perfect: 100; yellow vs red: 100 * cos 45 degrees.
        let yellow = 100.0 * std::f64::consts::FRAC_1_SQRT_2;
        assert!(close(s.per_sample[0].score, 1.0));
        assert!(close(s.per_sample[1].score * 100.0, yellow));
        assert!(close(s.accuracy, (100.0 + yellow) / 2.0), "{}", s.accuracy);
        // A missing target image is an error naming it.
        let gone = tmp.path().join("gone.png");
        let tests = [edit(1, &gone), edit(2, &target)];
        let err = score(TaskId::Hqedit, &tests, &path, &p).unwrap_err();
        assert!(err.to_string().contains("gone.png"), "{err}");
    }

    #[test]
    fn missing_or_corrupt_image_names_the_path_and_line() {
        let tmp = tempfile::tempdir().unwrap();
        let (path, p) = preds(tmp.path(), &[(1, "1.png"), (2, "nope.png")]);
        png(&tmp.path().join("preds/1.png"), RED);
        let tests = [t2i(1, "red"), t2i(2, "red")];
        let err = score(TaskId::Flickr30k, &tests, &path, &p)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("merge.jsonl:2") && err.contains("nope.png"),
            "{err}"
        );
        std::fs::write(tmp.path().join("preds/nope.png"), b"not a png").unwrap();
        let err = score(TaskId::Flickr30k, &tests, &path, &p)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("merge.jsonl:2") && err.contains("nope.png") && err.contains("decode"),
            "{err}"
        );
    }

    #[test]
    fn image_paths_escaping_the_predictions_folder_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside.png");
        png(&outside, RED);
        let abs = outside.display().to_string();
        for text in ["../outside.png", abs.as_str()] {
            let (path, p) = preds(tmp.path(), &[(1, text)]);
            let err = score(TaskId::Flickr30k, &[t2i(1, "red")], &path, &p).unwrap_err();
            assert!(
                matches!(err, EvalError::Image(DataError::UnsafePath { line: 1, .. })),
                "{text}: {err}"
            );
            assert!(err.to_string().contains("merge.jsonl:1"), "{err}");
        }
        #[cfg(unix)]
        {
            let link = tmp.path().join("preds/link.png");
            std::os::unix::fs::symlink(&outside, &link).unwrap();
            let (path, p) = preds(tmp.path(), &[(1, "link.png")]);
            let err = score(TaskId::Flickr30k, &[t2i(1, "red")], &path, &p).unwrap_err();
            assert!(
                matches!(err, EvalError::Image(DataError::UnsafePath { .. })),
                "{err}"
            );
        }
    }

    #[test]
    fn image_tasks_without_a_scorer_fail_and_text_tasks_need_none() {
        let tmp = tempfile::tempdir().unwrap();
        let (path, p) = preds(tmp.path(), &[(1, "1.png")]);
        let spec = TaskSpec::of(TaskId::Flickr30k);
        let none = None::<&MeanColour>;
        let err = score_task(&spec, &[t2i(1, "red")], &p, &path, Compat::Correct, none);
        let err = err.unwrap_err();
        assert!(matches!(err, EvalError::NeedsClip(_)));
        assert_eq!(
            err.to_string(),
            "flickr30k: image tasks need the CLIP-like scorer"
        );

        let (path, p) = preds(tmp.path(), &[(1, "<s>CAT</s>"), (2, "dog")]);
        let q = |id: u64| TestSample {
            question_id: QuestionId::Int(id),
            line: 1,
            item: TestItem::Question {
                image: PathBuf::from("x.png"),
                text: "What is it?".into(),
                answer: "cat".into(),
                answers: None,
            },
        };
        let spec = TaskSpec::of(TaskId::Vqav2);
        let s = score_task(&spec, &[q(1), q(2)], &p, &path, Compat::Correct, none).unwrap();
        assert!(close(s.accuracy, 50.0), "{}", s.accuracy);
    }

    #[test]
    fn text_sample_scores_and_references() {
        let one = text_references(Scorer::LooseMatch, "cat", Some(&["dog".to_string()]));
        assert_eq!(one, vec!["cat".to_string()]);
        let ten: Vec<String> = (0..10).map(|_| "2".to_string()).collect();
        let refs = text_references(Scorer::VqaAccuracy, "2", Some(&ten));
        assert_eq!(refs.len(), 10);
        let s = score_text_sample(Scorer::VqaAccuracy, "2", &refs, Compat::Correct).unwrap();
        assert_eq!(s, (1.0, false));
        let bad = ["[0.1,0.1,0.5,0.5]".to_string()];
        let s = score_text_sample(Scorer::BoxIou, "left", &bad, Compat::Correct).unwrap();
        assert_eq!(s, (0.0, true));
        assert!(score_text_sample(Scorer::ClipT, "x", &bad, Compat::Correct).is_err());
    }
}
