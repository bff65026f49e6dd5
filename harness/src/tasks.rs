//! Loaded task data -> training examples and evaluation items. Evaluation items carry the
//! references only for scoring; methods never see them (separate train and eval views).

use crate::data::ImageCache;
use cnext_backbones::{Example, OutputKind, Prompt, Target};
use cnext_core::{Modality, TaskId};
use cnext_datasets::formats::QuestionId;
use cnext_datasets::loader::{load_image, DataError, TaskData, TestItem, TestSample, TrainItem};
use std::path::PathBuf;

/// What a prediction is scored against.
#[derive(Debug, Clone)]
pub enum Reference {
    /// Ground-truth answer(s) for a text scorer.
    Text(Vec<String>),
    /// The caption of a text-to-image sample (clip_t).
    Caption(String),
    /// The target image of an edit (clip_i), decoded when scored.
    Image(PathBuf),
}

/// A test question. Its image is decoded only when its batch is generated (through the
/// chain's bounded [`crate::data::ImageCache`]), so a task of any size fits in memory.
#[derive(Debug, Clone)]
pub struct EvalItem {
    pub question_id: QuestionId,
    pub image: Option<PathBuf>,
    pub text: String,
    pub reference: Reference,
}

impl EvalItem {
    /// The model input, its image decoded through `images`.
    pub fn prompt(&self, images: &ImageCache) -> Result<Prompt, DataError> {
        Ok(Prompt {
            image: match &self.image {
                Some(p) => Some(images.get(p)?.as_ref().clone()),
                None => None,
            },
            text: self.text.clone(),
        })
    }
}

pub fn output_kind(task: TaskId) -> OutputKind {
    match task.output() {
        Modality::Text => OutputKind::Text,
        Modality::Image => OutputKind::Image,
    }
}

/// One example per (prompt, answer) turn, every image decoded now (small sets: tools and
/// tests; a chain reads its tasks through [`crate::data::TrainSet`]).
pub fn train_examples(data: &TaskData) -> Result<Vec<Example>, DataError> {
    let mut out = Vec::with_capacity(data.train.len());
    for s in &data.train {
        match &s.item {
            TrainItem::Conversation { image, turns } => {
                let img = load_image(image)?;
                for t in turns {
                    out.push(Example {
                        prompt: Prompt {
                            image: Some(img.clone()),
                            text: t.prompt.clone(),
                        },
                        target: Target::Text(t.answer.clone()),
                    });
                }
            }
            TrainItem::TextToImage { prompt, target } => out.push(Example {
                prompt: Prompt {
                    image: None,
                    text: prompt.clone(),
                },
                target: Target::Image(load_image(target)?),
            }),
            TrainItem::Edit {
                source,
                target,
                instruction,
            } => out.push(Example {
                prompt: Prompt {
                    image: Some(load_image(source)?),
                    text: instruction.clone(),
                },
                target: Target::Image(load_image(target)?),
            }),
        }
    }
    Ok(out)
}

pub fn eval_items(test: &[TestSample]) -> Vec<EvalItem> {
    test.iter()
        .map(|s| {
            let (image, text, reference) = match &s.item {
                TestItem::Question {
                    image,
                    text,
                    answer,
                    answers,
                } => (
                    Some(image.clone()),
                    text.clone(),
                    Reference::Text(answers.clone().unwrap_or_else(|| vec![answer.clone()])),
                ),
                TestItem::Grounding {
                    image,
                    text,
                    answer,
                    ..
                } => (
                    Some(image.clone()),
                    text.clone(),
                    Reference::Text(vec![answer.clone()]),
                ),
                TestItem::TextToImage { prompt, caption } => {
                    (None, prompt.clone(), Reference::Caption(caption.clone()))
                }
                TestItem::Edit {
                    source,
                    target,
                    instruction,
                } => (
                    Some(source.clone()),
                    instruction.clone(),
                    Reference::Image(target.clone()),
                ),
            };
            EvalItem {
                question_id: s.question_id.clone(),
                image,
                text,
                reference,
            }
        })
        .collect()
}
