//! Error types of wrong answers on text tasks (SCORING.md, "Error-type diagnostics"): IUF
//! (instruction unfollowing), HAL (hallucination) and OTH, by rules derived from each task's
//! instruction ([`TaskSpec::answer_form`], whether "Unanswerable" is allowed).
//!
//! The rules, in order (the first that applies decides, so a case that is both ill-formed and
//! wrong counts as IUF):
//! 1. the model started an image ([`IMAGE_MARKER`]) where text was asked: IUF;
//! 2. nothing left after cleaning: IUF (no answer is not the form asked for);
//! 3. unreadable output (replacement or control characters): OTH;
//! 4. a token repeated more than twice (the scorers' degenerate-loop rule): IUF;
//! 5. a box is asked: four numbers in `[0, 1]` with `x1 < x2`, `y1 < y2` is well formed (HAL),
//!    anything else IUF;
//! 6. a word or phrase is asked: a box, more than one line or more than [`MAX_PHRASE_WORDS`]
//!    words is IUF; "Unanswerable" is OTH (a refusal) where the instruction allows it, IUF where
//!    it does not; a class name with digits in it is IUF; anything else is HAL.

use crate::spec::{AnswerForm, TaskSpec};
pub use cnext_core::metrics::ErrorType;
use cnext_core::scoring::boxes::parse_box;
use cnext_core::scoring::text::clean_text;
use cnext_core::TaskId;
use serde::{Deserialize, Serialize};
use std::fmt;

/// What a backbone writes into a text prediction when it begins an image instead of text.
/// It is a `<...>` tag, so the scorers' cleaning removes it and scores are unaffected.
pub const IMAGE_MARKER: &str = "<image>";

/// "A single word or phrase": the longest test answer in Continual-NExT-mini has 3 words (a
/// class name); the slack leaves room for the real data's longer OCR-VQA titles.
pub const MAX_PHRASE_WORDS: usize = 6;

/// Why the rules chose a type (kept per cell in reports).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    ImageForText,
    Empty,
    Unreadable,
    Repetition,
    NotABox,
    BoxForWord,
    TooLong,
    UnanswerableNotAllowed,
    Refusal,
    DigitsInClassName,
    /// Of the form asked for, but wrong.
    WellFormed,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::ImageForText => "image_for_text",
            Reason::Empty => "empty",
            Reason::Unreadable => "unreadable",
            Reason::Repetition => "repetition",
            Reason::NotABox => "not_a_box",
            Reason::BoxForWord => "box_for_word",
            Reason::TooLong => "too_long",
            Reason::UnanswerableNotAllowed => "unanswerable_not_allowed",
            Reason::Refusal => "refusal",
            Reason::DigitsInClassName => "digits_in_class_name",
            Reason::WellFormed => "well_formed",
        }
    }

    /// The error type this reason implies.
    pub fn kind(self) -> ErrorType {
        match self {
            Reason::WellFormed => ErrorType::Hal,
            Reason::Unreadable | Reason::Refusal => ErrorType::Oth,
            _ => ErrorType::Iuf,
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A well-formed normalised box.
fn is_normalised_box(s: &str) -> bool {
    parse_box(s).is_ok_and(|[x1, y1, x2, y2]| {
        [x1, y1, x2, y2].iter().all(|v| (0.0..=1.0).contains(v)) && x1 < x2 && y1 < y2
    })
}

/// Classifies a prediction the scorer judged wrong. Returns `None` for tasks that answer with
/// an image (no text answer to classify).
pub fn classify_wrong(spec: &TaskSpec, prediction: &str) -> Option<Reason> {
    let form = spec.answer_form;
    if form == AnswerForm::Image {
        return None;
    }
    if prediction.contains(IMAGE_MARKER) {
        return Some(Reason::ImageForText);
    }
    let pred = clean_text(prediction);
    if pred.is_empty() {
        return Some(Reason::Empty);
    }
    if pred.contains('\u{fffd}') || pred.chars().any(|c| c.is_control() && c != '\n') {
        return Some(Reason::Unreadable);
    }
    let words: Vec<&str> = pred.split_whitespace().collect();
    let repeated = words
        .iter()
        .any(|w| words.iter().filter(|v| *v == w).count() > 2);
    if repeated {
        return Some(Reason::Repetition);
    }
    if form == AnswerForm::Box {
        return Some(if is_normalised_box(&pred) {
            Reason::WellFormed
        } else {
            Reason::NotABox
        });
    }
    if parse_box(&pred).is_ok() {
        return Some(Reason::BoxForWord);
    }
    if pred.contains('\n') || words.len() > MAX_PHRASE_WORDS {
        return Some(Reason::TooLong);
    }
    if pred.to_lowercase().contains("unanswerable") {
        return Some(if spec.allows_unanswerable {
            Reason::Refusal
        } else {
            Reason::UnanswerableNotAllowed
        });
    }
    if form == AnswerForm::ClassName && pred.chars().any(|c| c.is_ascii_digit()) {
        return Some(Reason::DigitsInClassName);
    }
    Some(Reason::WellFormed)
}

/// One wrong answer, as a judge sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JudgeCase<'a> {
    pub task: TaskId,
    /// The instruction the model was given.
    pub instruction: &'a str,
    pub prediction: &'a str,
    pub references: &'a [String],
}

/// An external classifier of wrong answers (an LLM judge). Failures fall back to the rules.
pub trait Judge: Sync {
    /// A short name for reports (endpoint and model; never a key).
    fn name(&self) -> String;
    fn judge(&self, case: &JudgeCase<'_>) -> Result<ErrorType, JudgeError>;
}

/// Why a judge gave no usable answer; each kind is counted in the report.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JudgeError {
    #[error("judge request failed: {0}")]
    Transport(String),
    #[error("judge timed out")]
    Timeout,
    #[error("judge answered HTTP {0}")]
    Status(u16),
    #[error("judge answer out of format: {0}")]
    Format(String),
}

impl JudgeError {
    /// The counter this failure goes to.
    pub fn kind(&self) -> &'static str {
        match self {
            JudgeError::Transport(_) => "transport",
            JudgeError::Timeout => "timeout",
            JudgeError::Status(_) => "status",
            JudgeError::Format(_) => "format",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ErrorType::*;
    use TaskId::*;

    fn kind(task: TaskId, pred: &str) -> (ErrorType, Reason) {
        let r = classify_wrong(&TaskSpec::of(task), pred).unwrap();
        (r.kind(), r)
    }

    #[test]
    fn short_answer_tasks() {
        assert_eq!(kind(Vqav2, "blue"), (Hal, Reason::WellFormed));
        assert_eq!(
            kind(Vqav2, "  <s>dark green</s> "),
            (Hal, Reason::WellFormed)
        );
        assert_eq!(kind(Vqav2, ""), (Iuf, Reason::Empty));
        assert_eq!(kind(Vqav2, "<image>"), (Iuf, Reason::ImageForText));
        assert_eq!(kind(Vqav2, "red<image>"), (Iuf, Reason::ImageForText));
        assert_eq!(kind(Vqav2, "[0.1,0.2,0.5,0.6]"), (Iuf, Reason::BoxForWord));
        assert_eq!(kind(Vqav2, "red red red"), (Iuf, Reason::Repetition));
        assert_eq!(
            kind(Vqav2, "the circle in the top left is red"),
            (Iuf, Reason::TooLong)
        );
        assert_eq!(kind(Vqav2, "two\nthree"), (Iuf, Reason::TooLong));
        assert_eq!(
            kind(Vqav2, "Unanswerable"),
            (Iuf, Reason::UnanswerableNotAllowed)
        );
        assert_eq!(kind(Vqav2, "r\u{fffd}d"), (Oth, Reason::Unreadable));
        // Numbers are fine answers to a VQA question ("How many ...?").
        assert_eq!(kind(Vqav2, "3"), (Hal, Reason::WellFormed));
    }

    #[test]
    fn ocr_allows_unanswerable_as_a_refusal() {
        assert_eq!(kind(Ocrvqa, "Unanswerable"), (Oth, Reason::Refusal));
        assert_eq!(kind(Ocrvqa, "unanswerable."), (Oth, Reason::Refusal));
        assert_eq!(kind(Ocrvqa, "Quiet River Tales"), (Hal, Reason::WellFormed));
    }

    #[test]
    fn classification_wants_a_class_name() {
        assert_eq!(kind(Imagenet, "tabby cat"), (Hal, Reason::WellFormed));
        assert_eq!(kind(Imagenet, "4"), (Iuf, Reason::DigitsInClassName));
        assert_eq!(kind(Imagenet, "[0,0,1,1]"), (Iuf, Reason::BoxForWord));
    }

    #[test]
    fn grounding_wants_a_normalised_box() {
        assert_eq!(
            kind(Refcoco, "[0.10,0.20,0.40,0.50]"),
            (Hal, Reason::WellFormed)
        );
        assert_eq!(
            kind(Refcoco, "(0.1, 0.2, 0.4, 0.5)"),
            (Hal, Reason::WellFormed)
        );
        assert_eq!(kind(Refcoco, "red"), (Iuf, Reason::NotABox));
        assert_eq!(kind(Refcoco, "[0.1,0.2,0.4]"), (Iuf, Reason::NotABox));
        assert_eq!(kind(Refcoco, "[12,20,40,50]"), (Iuf, Reason::NotABox));
        assert_eq!(kind(Refcoco, "[0.5,0.2,0.4,0.5]"), (Iuf, Reason::NotABox));
        assert_eq!(kind(Refcoco, "<image>"), (Iuf, Reason::ImageForText));
    }

    #[test]
    fn image_tasks_have_no_text_error_type() {
        assert_eq!(classify_wrong(&TaskSpec::of(Flickr30k), "x"), None);
        assert_eq!(classify_wrong(&TaskSpec::of(Hqedit), ""), None);
    }
}
