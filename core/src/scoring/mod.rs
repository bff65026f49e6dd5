//! Per-task scorers of the protocol (SCORING.md, "Per-task scorers").
//!
//! [`Scorer`] is the closed set a task spec names; [`Scorer::score_text`] is the single entry
//! point for text outputs, and [`clip`] holds the image scores, which need a model. Each
//! submodule documents its formula and where it reproduces the official scripts.
//!
//! [`Compat::Official`] reproduces the official scripts' quirks exactly, so published numbers
//! can be recomputed from the same prediction files: an empty prediction is correct for the
//! loose matches ("" is a substring of every answer), and grounding predictions go through
//! [`boxes::parse_box_official`] (brackets removed, then first and last character dropped);
//! a box that does not parse is wrong, as in the default mode.

pub mod boxes;
pub mod clip;
pub mod text;
pub mod vqa;

pub use boxes::{box_correct, iou, parse_box, parse_box_official, BoxParseError, IOU_THRESHOLD};
pub use clip::{clip_i, clip_t, cosine, ClipError, ClipModel, CosineError};
pub use text::{clean_text, exact_match, loose_match, loose_match_ocr};
pub use vqa::{normalize_answer, vqa_accuracy, vqa_accuracy_with, VqaNormalization};

use crate::{Modality, ParseIdError};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// The scorers a task can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scorer {
    LooseMatch,
    LooseMatchOcr,
    ExactMatch,
    VqaAccuracy,
    BoxIou,
    ClipT,
    ClipI,
}

impl Scorer {
    pub const ALL: [Scorer; 7] = [
        Scorer::LooseMatch,
        Scorer::LooseMatchOcr,
        Scorer::ExactMatch,
        Scorer::VqaAccuracy,
        Scorer::BoxIou,
        Scorer::ClipT,
        Scorer::ClipI,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scorer::LooseMatch => "loose_match",
            Scorer::LooseMatchOcr => "loose_match_ocr",
            Scorer::ExactMatch => "exact_match",
            Scorer::VqaAccuracy => "vqa_accuracy",
            Scorer::BoxIou => "box_iou",
            Scorer::ClipT => "clip_t",
            Scorer::ClipI => "clip_i",
        }
    }

    /// The modality of the output this scorer reads.
    pub fn output(self) -> Modality {
        match self {
            Scorer::ClipT | Scorer::ClipI => Modality::Image,
            _ => Modality::Text,
        }
    }

    /// Whether every sample scores 0 or 1 (the error-type identity
    /// `Avg.IUF + Avg.HAL + Avg.OTH = Forgetting` holds only for these).
    pub fn is_binary(self) -> bool {
        !matches!(self, Scorer::VqaAccuracy | Scorer::ClipT | Scorer::ClipI)
    }

    /// Scores one text prediction in `[0, 1]`.
    ///
    /// The prediction is first cleaned ([`clean_text`]: tags removed, trimmed), in both
    /// compat modes. `references` is the one ground truth for the match scorers and for
    /// `box_iou` (a normalised box string such as `"[0.12,0.30,0.55,0.90]"`, parsed with
    /// [`parse_box`] in both modes), and the human answers for `vqa_accuracy` (scored with
    /// the current official [`VqaNormalization`]). An unparsable predicted box scores 0 with
    /// `format_error` set; bad references are errors, since they are data bugs.
    pub fn score_text(
        self,
        prediction: &str,
        references: &[String],
        compat: Compat,
    ) -> Result<TextScore, ScoreError> {
        let pred = clean_text(prediction);
        let correct = match self {
            Scorer::ClipT | Scorer::ClipI => return Err(ScoreError::NotATextScorer(self)),
            Scorer::LooseMatch => loose_match(&pred, self.single(references)?, compat),
            Scorer::LooseMatchOcr => loose_match_ocr(&pred, self.single(references)?, compat),
            Scorer::ExactMatch => exact_match(&pred, self.single(references)?),
            Scorer::VqaAccuracy if references.is_empty() => {
                return Err(ScoreError::NoReference(self))
            }
            Scorer::VqaAccuracy => {
                let score = vqa_accuracy(&pred, references);
                return Ok(TextScore::graded(score));
            }
            Scorer::BoxIou => {
                let reference = self.single(references)?;
                let gt = parse_box(reference).map_err(|source| ScoreError::BadReferenceBox {
                    reference: reference.to_string(),
                    source,
                })?;
                let parsed = match compat {
                    Compat::Correct => parse_box(&pred),
                    Compat::Official => parse_box_official(&pred),
                };
                match parsed {
                    Ok(b) => box_correct(iou(&b, &gt)),
                    Err(_) => return Ok(TextScore::FORMAT_ERROR),
                }
            }
        };
        Ok(TextScore::binary(correct))
    }

    /// The one non-blank reference a single-answer scorer needs.
    fn single(self, references: &[String]) -> Result<&str, ScoreError> {
        match references {
            [] => Err(ScoreError::NoReference(self)),
            [one] if one.trim().is_empty() => Err(ScoreError::BlankReference(self)),
            [one] => Ok(one),
            many => Err(ScoreError::TooManyReferences {
                scorer: self,
                found: many.len(),
            }),
        }
    }
}

impl fmt::Display for Scorer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Scorer {
    type Err = ParseIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Scorer::ALL
            .into_iter()
            .find(|x| x.as_str() == s)
            .ok_or_else(|| ParseIdError {
                kind: "scorer",
                given: s.to_string(),
                expected: Scorer::ALL.map(|x| x.as_str()).join(", "),
            })
    }
}

/// Scoring mode: SCORING.md's correct rules, or the official scripts' quirks.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Compat {
    #[default]
    Correct,
    Official,
}

impl Compat {
    pub const ALL: [Compat; 2] = [Compat::Correct, Compat::Official];

    pub fn as_str(self) -> &'static str {
        match self {
            Compat::Correct => "correct",
            Compat::Official => "official",
        }
    }
}

impl fmt::Display for Compat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Compat {
    type Err = ParseIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Compat::ALL
            .into_iter()
            .find(|x| x.as_str() == s)
            .ok_or_else(|| ParseIdError {
                kind: "compat mode",
                given: s.to_string(),
                expected: Compat::ALL.map(|x| x.as_str()).join(", "),
            })
    }
}

/// The score of one text prediction.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TextScore {
    /// In `[0, 1]`; 0 or 1 for binary scorers.
    pub score: f64,
    /// The prediction is not of the form the scorer needs (a box that does not parse):
    /// evidence for instruction unfollowing in the error-type diagnostics.
    pub format_error: bool,
}

impl TextScore {
    /// An unparsable prediction: score 0, flagged.
    pub const FORMAT_ERROR: TextScore = TextScore {
        score: 0.0,
        format_error: true,
    };

    /// A well-formed prediction that is right (1) or wrong (0).
    pub fn binary(correct: bool) -> Self {
        Self::graded(if correct { 1.0 } else { 0.0 })
    }

    /// A well-formed prediction with a partial score.
    pub fn graded(score: f64) -> Self {
        TextScore {
            score,
            format_error: false,
        }
    }
}

/// A sample that cannot be scored: the scorer or the references are wrong, not the model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScoreError {
    #[error("scorer `{0}` scores images; it has no text scoring")]
    NotATextScorer(Scorer),
    #[error("scorer `{0}` needs a reference answer, none given")]
    NoReference(Scorer),
    #[error("scorer `{0}` got a blank reference answer")]
    BlankReference(Scorer),
    #[error("scorer `{scorer}` takes one reference answer, got {found}")]
    TooManyReferences { scorer: Scorer, found: usize },
    #[error("reference box `{reference}` is not a box: {source}")]
    BadReferenceBox {
        reference: String,
        #[source]
        source: BoxParseError,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use Compat::{Correct, Official};

    fn refs(xs: &[&str]) -> Vec<String> {
        xs.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn scorer_names_round_trip() {
        for s in Scorer::ALL {
            assert_eq!(s.as_str().parse::<Scorer>().unwrap(), s);
            assert_eq!(s.to_string(), s.as_str());
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(json, format!("\"{}\"", s.as_str()));
            assert_eq!(serde_json::from_str::<Scorer>(&json).unwrap(), s);
        }
        let err = "bleu".parse::<Scorer>().unwrap_err();
        assert_eq!(err.kind, "scorer");
        assert_eq!(err.given, "bleu");
        assert_eq!(
            err.expected,
            "loose_match, loose_match_ocr, exact_match, vqa_accuracy, box_iou, clip_t, clip_i"
        );
    }

    #[test]
    fn scorer_output_modality_and_binarity() {
        let image: Vec<Scorer> = Scorer::ALL
            .into_iter()
            .filter(|s| s.output() == Modality::Image)
            .collect();
        assert_eq!(image, [Scorer::ClipT, Scorer::ClipI]);
        let graded: Vec<Scorer> = Scorer::ALL.into_iter().filter(|s| !s.is_binary()).collect();
        assert_eq!(graded, [Scorer::VqaAccuracy, Scorer::ClipT, Scorer::ClipI]);
    }

    #[test]
    fn compat_names_round_trip_and_default() {
        assert_eq!(Compat::default(), Correct);
        for c in Compat::ALL {
            assert_eq!(c.as_str().parse::<Compat>().unwrap(), c);
            assert_eq!(c.to_string(), c.as_str());
            let json = serde_json::to_string(&c).unwrap();
            assert_eq!(serde_json::from_str::<Compat>(&json).unwrap(), c);
        }
        assert_eq!(serde_json::to_string(&Official).unwrap(), "\"official\"");
        let err = "strict".parse::<Compat>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown compat mode `strict` (expected one of: correct, official)"
        );
    }

    #[test]
    fn clip_scorers_have_no_text_scoring() {
        for s in [Scorer::ClipT, Scorer::ClipI] {
            assert_eq!(
                s.score_text("x", &refs(&["x"]), Correct),
                Err(ScoreError::NotATextScorer(s))
            );
        }
    }

    #[test]
    fn match_scorers_clean_the_prediction_first() {
        let gt = refs(&["Paris"]);
        let score = |s: Scorer, p: &str, c| s.score_text(p, &gt, c).unwrap().score;
        assert_eq!(
            score(Scorer::LooseMatch, "<s> It is PARIS.</s>", Correct),
            1.0
        );
        assert_eq!(score(Scorer::LooseMatch, "London", Correct), 0.0);
        assert_eq!(score(Scorer::ExactMatch, "<s> paris </s>", Correct), 1.0);
        assert_eq!(score(Scorer::ExactMatch, "It is Paris", Correct), 0.0);
        assert_eq!(score(Scorer::LooseMatchOcr, "unanswerable", Correct), 0.0);
        assert_eq!(score(Scorer::LooseMatchOcr, "paris", Official), 1.0);
        // Empty after cleaning: wrong by default, right under the official quirk.
        for s in [Scorer::LooseMatch, Scorer::LooseMatchOcr] {
            assert_eq!(score(s, "<s></s>", Correct), 0.0);
            assert_eq!(score(s, "<s></s>", Official), 1.0);
        }
        assert_eq!(score(Scorer::ExactMatch, "", Official), 0.0);
        let r = Scorer::LooseMatch
            .score_text("Paris", &gt, Correct)
            .unwrap();
        assert!(!r.format_error);
    }

    #[test]
    fn single_reference_scorers_check_references() {
        for s in [
            Scorer::LooseMatch,
            Scorer::LooseMatchOcr,
            Scorer::ExactMatch,
            Scorer::BoxIou,
        ] {
            assert_eq!(
                s.score_text("a", &[], Correct),
                Err(ScoreError::NoReference(s))
            );
            assert_eq!(
                s.score_text("a", &refs(&[" "]), Correct),
                Err(ScoreError::BlankReference(s))
            );
            assert_eq!(
                s.score_text("a", &refs(&["a", "b"]), Correct),
                Err(ScoreError::TooManyReferences {
                    scorer: s,
                    found: 2
                })
            );
        }
    }

    #[test]
    fn vqa_accuracy_uses_all_answers() {
        let answers = refs(&["2", "2", "2", "two", "3", "3", "4", "5", "6", "7"]);
        let r = Scorer::VqaAccuracy
            .score_text("<s>Two</s>", &answers, Correct)
            .unwrap();
        assert_eq!(r.score, 1.0);
        let r = Scorer::VqaAccuracy
            .score_text("3", &answers, Official)
            .unwrap();
        assert!((r.score - 0.6).abs() < 1e-12);
        assert_eq!(
            Scorer::VqaAccuracy.score_text("3", &[], Correct),
            Err(ScoreError::NoReference(Scorer::VqaAccuracy))
        );
    }

    #[test]
    fn box_iou_scoring_by_compat() {
        let gt = refs(&["[0.1,0.2,0.3,0.4]"]);
        let run = |p: &str, c| Scorer::BoxIou.score_text(p, &gt, c).unwrap();
        let (hit, miss, bad) = (
            TextScore::binary(true),
            TextScore::binary(false),
            TextScore::FORMAT_ERROR,
        );
        assert_eq!(run("[0.1, 0.2, 0.3, 0.4]", Correct), hit);
        assert_eq!(run("(0.1 0.2 0.3 0.4)", Correct), hit);
        assert_eq!(run("[0.5, 0.5, 0.9, 0.9]", Correct), miss);
        // The official slice turns y2 = 0.4 into 0.0: degenerate box, a miss.
        assert_eq!(run("[0.1,0.2,0.3,0.4]", Official), miss);
        assert_eq!(run("[0.1,0.2,0.3,0.40]", Official), hit);
        for c in Compat::ALL {
            assert_eq!(run("the left dog", c), bad);
            assert_eq!(run("[0.1,0.2,0.3]", c), bad);
        }
        assert_eq!(run("[0.1,0.2,0.3,nan]", Correct), bad);
        let err = Scorer::BoxIou
            .score_text("[0,0,1,1]", &refs(&["[0.1,0.2]"]), Correct)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "reference box `[0.1,0.2]` is not a box: expected exactly four numbers, found 2"
        );
    }
}
