//! Loaded task data -> training examples and evaluation items. Evaluation items carry the
//! references only for scoring; methods never see them (separate train and eval views).

use cnext_backbones::{Example, OutputKind, Prompt, Target};
use cnext_core::{Modality, TaskId};
use cnext_datasets::formats::QuestionId;
use cnext_datasets::loader::{load_image, DataError, TaskData, TestItem, TrainItem};
use image::RgbImage;

/// What a prediction is scored against.
#[derive(Debug, Clone)]
pub enum Reference {
    /// Ground-truth answer(s) for a text scorer.
    Text(Vec<String>),
    /// The caption of a text-to-image sample (clip_t).
    Caption(String),
    /// The target image of an edit (clip_i).
    Image(RgbImage),
}

#[derive(Debug, Clone)]
pub struct EvalItem {
    pub question_id: QuestionId,
    pub prompt: Prompt,
    pub reference: Reference,
}

pub fn output_kind(task: TaskId) -> OutputKind {
    match task.output() {
        Modality::Text => OutputKind::Text,
        Modality::Image => OutputKind::Image,
    }
}

/// One example per (prompt, answer) turn.
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

pub fn eval_items(data: &TaskData) -> Result<Vec<EvalItem>, DataError> {
    let mut out = Vec::with_capacity(data.test.len());
    for s in &data.test {
        let (prompt, reference) = match &s.item {
            TestItem::Question {
                image,
                text,
                answer,
                answers,
            } => (
                Prompt {
                    image: Some(load_image(image)?),
                    text: text.clone(),
                },
                Reference::Text(answers.clone().unwrap_or_else(|| vec![answer.clone()])),
            ),
            TestItem::Grounding {
                image,
                text,
                answer,
                ..
            } => (
                Prompt {
                    image: Some(load_image(image)?),
                    text: text.clone(),
                },
                Reference::Text(vec![answer.clone()]),
            ),
            TestItem::TextToImage { prompt, caption } => (
                Prompt {
                    image: None,
                    text: prompt.clone(),
                },
                Reference::Caption(caption.clone()),
            ),
            TestItem::Edit {
                source,
                target,
                instruction,
            } => (
                Prompt {
                    image: Some(load_image(source)?),
                    text: instruction.clone(),
                },
                Reference::Image(load_image(target)?),
            ),
        };
        out.push(EvalItem {
            question_id: s.question_id.clone(),
            prompt,
            reference,
        });
    }
    Ok(out)
}
