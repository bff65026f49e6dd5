//! Evaluation of one task: batched greedy generation, then the task's scorer (text scorers
//! from cnext-core; clip_t / clip_i through any `ClipModel`). Predictions are kept in the
//! official merge.jsonl record format.

use crate::data::ImageCache;
use crate::tasks::{output_kind, EvalItem, Reference};
use cnext_backbones::{Backbone, Output, Prompt};
use cnext_core::scoring::clip::{clip_i, clip_t, ClipModel};
use cnext_core::scoring::Compat;
use cnext_datasets::evaluate::score_text_sample;
use cnext_datasets::formats::PredictionRecord;
use cnext_datasets::TaskSpec;
use image::RgbImage;

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("{task}: generation failed: {source}")]
    Generate {
        task: String,
        source: candle_core::Error,
    },
    #[error("{task}: {source}")]
    Data {
        task: String,
        source: Box<cnext_datasets::loader::DataError>,
    },
    #[error("{task}: question {qid}: {msg}")]
    Score {
        task: String,
        qid: String,
        msg: String,
    },
}

/// The outcome of evaluating one task.
#[derive(Debug, Clone)]
pub struct TaskEval {
    /// Percent (text tasks) or mean CLIP score (image tasks).
    pub accuracy: f64,
    pub predictions: Vec<PredictionRecord>,
    /// Generated images (image tasks), by question id, in the order of `predictions`.
    pub images: Vec<RgbImage>,
    pub scores: Vec<f64>,
}

/// clip_t against a caption, clip_i against a target image, in [0, 1] units (CLIP points / 100);
/// a text reference cannot be matched by an image and scores 0.
fn clip_score<C: ClipModel<Image = RgbImage>>(
    m: &C,
    img: &RgbImage,
    reference: &Reference,
    images: &ImageCache,
) -> Result<f64, String> {
    let points = match reference {
        Reference::Caption(c) => clip_t(m, Some(img), c).map_err(|e| e.to_string())?,
        Reference::Image(target) => {
            let target = images.get(target).map_err(|e| e.to_string())?;
            clip_i(m, Some(img), &target).map_err(|e| e.to_string())?
        }
        Reference::Text(_) => 0.0,
    };
    Ok(points / 100.0)
}

/// How evaluation generates: prompts per batch, and the longest text answer in tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Generation {
    pub batch: usize,
    pub max_new_tokens: usize,
}

/// Generates and scores `items`, decoding their images through `images`. `image_path` names the file a generated image is saved to
/// (the prediction's `text`).
#[allow(clippy::too_many_arguments)]
pub fn evaluate<C: ClipModel<Image = RgbImage>>(
    backbone: &dyn Backbone,
    spec: &TaskSpec,
    items: &[EvalItem],
    images: &ImageCache,
    clip: Option<&C>,
    gen: Generation,
    model_id: &str,
    image_path: &dyn Fn(&str) -> String,
) -> Result<TaskEval, EvalError> {
    let task = spec.id.to_string();
    let kind = output_kind(spec.id);
    let mut out = TaskEval {
        accuracy: 0.0,
        predictions: vec![],
        images: vec![],
        scores: vec![],
    };
    for chunk in items.chunks(gen.batch.max(1)) {
        let prompts = chunk
            .iter()
            .map(|i| i.prompt(images))
            .collect::<Result<Vec<Prompt>, _>>()
            .map_err(|source| EvalError::Data {
                task: task.clone(),
                source: Box::new(source),
            })?;
        let gens = backbone
            .generate(&prompts, kind, gen.max_new_tokens)
            .map_err(|source| EvalError::Generate {
                task: task.clone(),
                source,
            })?;
        for (item, g) in chunk.iter().zip(gens) {
            let qid = item.question_id.to_string();
            let err = |msg: String| EvalError::Score {
                task: task.clone(),
                qid: qid.clone(),
                msg,
            };
            let (text, score) = match (&item.reference, g) {
                (Reference::Text(refs), Output::Text(t)) => {
                    let (s, _) = score_text_sample(spec.scorer, &t, refs, Compat::Correct)
                        .map_err(|e| err(e.to_string()))?;
                    (t, s)
                }
                (Reference::Caption(_) | Reference::Image(_), Output::Image(img)) => {
                    let m =
                        clip.ok_or_else(|| err("image tasks need the CLIP-like scorer".into()))?;
                    let s = clip_score(m, &img, &item.reference, images).map_err(err)?;
                    out.images.push(img);
                    (image_path(&qid), s)
                }
                (_, Output::Text(t)) => (t, 0.0),
                (_, Output::Image(_)) => (String::new(), 0.0),
            };
            out.scores.push(score);
            out.predictions.push(PredictionRecord {
                question_id: item.question_id.clone(),
                prompt: item.text.clone(),
                text,
                answer_id: format!("{model_id}-{qid}"),
                model_id: model_id.to_string(),
                metadata: Default::default(),
            });
        }
    }
    let n = out.scores.len().max(1) as f64;
    out.accuracy = 100.0 * out.scores.iter().sum::<f64>() / n;
    Ok(out)
}
