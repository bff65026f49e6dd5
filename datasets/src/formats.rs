//! The official file formats (SCORING.md): train JSONL records, test JSON records and the
//! `merge.jsonl` prediction records. Parsing is strict (`deny_unknown_fields`) so a typo in a
//! key is an error, not a silently missing field.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A question id as the official files write it: a number or a string.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum QuestionId {
    Int(u64),
    Str(String),
}

impl fmt::Display for QuestionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QuestionId::Int(i) => write!(f, "{i}"),
            QuestionId::Str(s) => f.write_str(s),
        }
    }
}

/// `{"image": "x.png", "data": [q1, a1, q2, a2, ...]}` (understanding tasks and text-to-image).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConversationRecord {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    pub data: Vec<String>,
}

/// `{"source_image", "target_image", "instruction"}` (editing, train).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EditRecord {
    pub source_image: String,
    pub target_image: String,
    pub instruction: String,
}

/// `{"question_id", "image", "text", "answer"}`; `answers` (the 10 human answers) is optional
/// and only read by the `vqa_accuracy` scorer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuestionRecord {
    pub question_id: QuestionId,
    pub image: String,
    pub text: String,
    pub answer: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answers: Option<Vec<String>>,
}

/// Grounding test record: question keys plus the image size, the pixel box `[x, y, w, h]` and
/// the normalised box string `"[x1,y1,x2,y2]"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroundingRecord {
    pub question_id: QuestionId,
    pub image: String,
    pub text: String,
    pub answer: String,
    pub size: [u32; 2],
    pub origin_answer_bbox: [f64; 4],
    pub answer_bbox: String,
}

/// Text-to-image test record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptionRecord {
    pub question_id: QuestionId,
    pub text: String,
}

/// Editing test record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EditTestRecord {
    pub question_id: QuestionId,
    pub source_image: String,
    pub target_image: String,
    pub instruction: String,
}

/// One line of `merge.jsonl`, as the official inference scripts write it. For image tasks
/// `text` is the path of the generated image, relative to the predictions file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PredictionRecord {
    pub question_id: QuestionId,
    #[serde(default)]
    pub prompt: String,
    pub text: String,
    #[serde(default)]
    pub answer_id: String,
    #[serde(default)]
    pub model_id: String,
    #[serde(default)]
    pub metadata: serde_json::Map<String, serde_json::Value>,
}

/// Writes a JSON array with one compact element per line, so errors can name a line and diffs
/// stay readable.
pub fn json_array_lines<T: Serialize>(items: &[T]) -> serde_json::Result<String> {
    let mut out = String::from("[\n");
    for (i, it) in items.iter().enumerate() {
        out.push_str(&serde_json::to_string(it)?);
        out.push_str(if i + 1 < items.len() { ",\n" } else { "\n" });
    }
    out.push_str("]\n");
    Ok(out)
}

/// Byte offsets where each element of a top-level JSON array starts (the input must already be
/// valid JSON). Used to name the line of an element that parsed but failed validation.
pub fn array_element_offsets(text: &str) -> Vec<usize> {
    let bytes = text.as_bytes();
    let (mut depth, mut in_str, mut esc) = (0i32, false, false);
    let mut out = vec![];
    let mut expecting = false;
    for (i, &b) in bytes.iter().enumerate() {
        if in_str {
            match (esc, b) {
                (true, _) => esc = false,
                (false, b'\\') => esc = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
            continue;
        }
        if expecting && !b.is_ascii_whitespace() && b != b']' {
            out.push(i);
            expecting = false;
        }
        match b {
            b'"' => in_str = true,
            b'[' | b'{' => {
                depth += 1;
                if depth == 1 && b == b'[' {
                    expecting = true;
                }
            }
            b']' | b'}' => depth -= 1,
            b',' if depth == 1 => expecting = true,
            _ => {}
        }
    }
    out
}

/// 1-based line of a byte offset.
pub fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn element_offsets_skip_nested_values_and_strings() {
        let t = "[\n{\"a\": [1, 2], \"s\": \"x,]\\\"\"},\n  {\"b\": {}}\n]";
        let offs = array_element_offsets(t);
        assert_eq!(offs.len(), 2);
        assert_eq!(line_of(t, offs[0]), 2);
        assert_eq!(line_of(t, offs[1]), 3);
        assert!(array_element_offsets("[]").is_empty());
    }

    #[test]
    fn array_writer_round_trips() {
        let recs = vec![
            CaptionRecord {
                question_id: QuestionId::Int(1),
                text: "a".into(),
            },
            CaptionRecord {
                question_id: QuestionId::Str("q2".into()),
                text: "b".into(),
            },
        ];
        let s = json_array_lines(&recs).unwrap();
        assert_eq!(s.lines().count(), 4);
        let back: Vec<CaptionRecord> = serde_json::from_str(&s).unwrap();
        assert_eq!(back, recs);
    }
}
