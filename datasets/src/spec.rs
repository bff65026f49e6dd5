//! Task specs: for each Continual-NExT task, its instruction template, scorer, expected answer
//! form, record layout and version. The templates are the paper's (the LLaVA/CoIN instruction
//! suffixes; "Please provide the bounding box coordinate ..." for RefCOCO; "Please generate the
//! image" for Flickr30k).

use cnext_core::scoring::Scorer;
use cnext_core::{Modality, TaskId};

/// The short-answer suffix used by VQAv2, ImageNet and OCR-VQA.
pub const SHORT_ANSWER: &str = "Answer the question using a single word or phrase.";
/// The OCR-VQA instruction that allows "Unanswerable".
pub const UNANSWERABLE: &str =
    "When the provided information is insufficient, respond with 'Unanswerable'.";
/// The classification question.
pub const CLASSIFY_QUESTION: &str = "What is the object in the image?";
/// The grounding prefix.
pub const GROUNDING_PREFIX: &str =
    "Please provide the bounding box coordinate of the region this sentence describes: ";
/// The first turn of a text-to-image training record, as the official files have it.
pub const T2I_TURN: &str = "Please generate the image.";
/// The model prompt prefix for text-to-image.
pub const T2I_PREFIX: &str = "Please generate the image: ";

/// The form an answer must take; the instruction-unfollowing classifier checks against it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerForm {
    /// A single word or short phrase.
    ShortPhrase,
    /// One of the classification task's class names.
    ClassName,
    /// Four normalised numbers `[x1,y1,x2,y2]`.
    Box,
    /// An image.
    Image,
}

/// How a task's train records are laid out (the official formats).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrainLayout {
    /// `{"image", "data": [q1, a1, ...]}`
    Conversation,
    /// `{"image", "data": ["Please generate the image.", caption]}`
    TextToImage,
    /// `{"source_image", "target_image", "instruction"}`
    Edit,
}

/// How a task's test records are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestLayout {
    /// `{"question_id", "image", "text", "answer"}`
    Question,
    /// Question keys plus `size`, `origin_answer_bbox`, `answer_bbox`.
    Grounding,
    /// `{"question_id", "text"}`
    Caption,
    /// `{"question_id", "source_image", "target_image", "instruction"}`
    Edit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskSpec {
    pub id: TaskId,
    /// Bumped whenever generated content or the record layout changes (part of cache keys).
    pub version: u32,
    pub scorer: Scorer,
    pub answer_form: AnswerForm,
    pub train_layout: TrainLayout,
    pub test_layout: TestLayout,
    /// Whether the instruction allows "Unanswerable".
    pub allows_unanswerable: bool,
}

impl TaskSpec {
    pub fn of(id: TaskId) -> TaskSpec {
        use TestLayout as T;
        use TrainLayout as L;
        let (scorer, answer_form, train_layout, test_layout) = match id {
            TaskId::Vqav2 => (
                Scorer::LooseMatch,
                AnswerForm::ShortPhrase,
                L::Conversation,
                T::Question,
            ),
            TaskId::Imagenet => (
                Scorer::LooseMatch,
                AnswerForm::ClassName,
                L::Conversation,
                T::Question,
            ),
            TaskId::Flickr30k => (Scorer::ClipT, AnswerForm::Image, L::TextToImage, T::Caption),
            TaskId::Ocrvqa => (
                Scorer::LooseMatchOcr,
                AnswerForm::ShortPhrase,
                L::Conversation,
                T::Question,
            ),
            TaskId::Refcoco => (
                Scorer::BoxIou,
                AnswerForm::Box,
                L::Conversation,
                T::Grounding,
            ),
            TaskId::Hqedit => (Scorer::ClipI, AnswerForm::Image, L::Edit, T::Edit),
        };
        TaskSpec {
            id,
            version: 1,
            scorer,
            answer_form,
            train_layout,
            test_layout,
            allows_unanswerable: id == TaskId::Ocrvqa,
        }
    }

    pub fn output(&self) -> Modality {
        self.id.output()
    }

    /// The full instruction for a question of this task, as it appears in the data files.
    pub fn question_text(&self, question: &str) -> String {
        match self.id {
            TaskId::Vqav2 => format!("{question}\n{SHORT_ANSWER}"),
            TaskId::Imagenet => format!("{CLASSIFY_QUESTION}\n{SHORT_ANSWER}"),
            TaskId::Ocrvqa => format!("{question}\n{UNANSWERABLE}\n{SHORT_ANSWER}"),
            TaskId::Refcoco => format!("{GROUNDING_PREFIX}{question}"),
            TaskId::Flickr30k => format!("{T2I_PREFIX}{question}"),
            TaskId::Hqedit => question.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_are_the_papers() {
        let s = TaskSpec::of(TaskId::Vqav2);
        assert_eq!(
            s.question_text("What color is the circle?"),
            "What color is the circle?\nAnswer the question using a single word or phrase."
        );
        assert!(TaskSpec::of(TaskId::Ocrvqa)
            .question_text("Who wrote this book?")
            .contains("respond with 'Unanswerable'"));
        assert_eq!(
            TaskSpec::of(TaskId::Refcoco).question_text("the red circle"),
            "Please provide the bounding box coordinate of the region this sentence describes: the red circle"
        );
        for t in TaskId::ALL {
            assert_eq!(TaskSpec::of(t).scorer.output(), t.output(), "{t}");
        }
    }
}
