//! The official file formats (SCORING.md): train JSONL records, test JSON records and the
//! `merge.jsonl` prediction records. Parsing is strict (`deny_unknown_fields`) so a typo in a
//! key is an error, not a silently missing field.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A question id as the official files write it: a number or a string.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(untagged)]
pub enum QuestionId {
    Int(u64),
    Str(String),
}

/// By hand rather than `untagged`, so a bad id says what an id is instead of "data did not
/// match any variant".
impl<'de> Deserialize<'de> for QuestionId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = QuestionId;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a question_id: a non-negative integer or a string")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<QuestionId, E> {
                Ok(QuestionId::Int(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<QuestionId, E> {
                u64::try_from(v)
                    .map(QuestionId::Int)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(v), &self))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<QuestionId, E> {
                Err(E::invalid_type(serde::de::Unexpected::Float(v), &self))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<QuestionId, E> {
                Ok(QuestionId::Str(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
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

/// Grounding test record: question keys plus the image size `[w, h]`, `origin_answer_bbox` (the
/// target box in pixels, `[x, y, w, h]`: top-left corner, width, height) and `answer_bbox` (the
/// same box normalised to corners in [0, 1], `[x1, y1, x2, y2]`, the answer the model must
/// print). Public copies write either box as a JSON array or as a string holding one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroundingRecord {
    pub question_id: QuestionId,
    pub image: String,
    pub text: String,
    pub answer: String,
    pub size: [u32; 2],
    pub origin_answer_bbox: BoxField,
    pub answer_bbox: BoxField,
}

/// A box field as the files write it: `[0, 0, 1, 1]` or `"[0,0,1,1]"`. Kept in its own form, so
/// a file round-trips unchanged; [`BoxField::values`] reads the four numbers.
#[derive(Debug, Clone, PartialEq)]
pub enum BoxField {
    Numbers(Vec<f64>),
    Text(String),
}

impl BoxField {
    /// The four numbers, all finite, or what is wrong with them.
    pub fn values(&self) -> Result<[f64; 4], String> {
        let v = match self {
            BoxField::Numbers(v) => v.clone(),
            BoxField::Text(s) => {
                let inner = s
                    .trim()
                    .strip_prefix('[')
                    .and_then(|t| t.strip_suffix(']'))
                    .ok_or_else(|| format!("{s:?} is not a bracketed list"))?;
                inner
                    .split(',')
                    .map(|p| p.trim().parse::<f64>())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|_| format!("{s:?} is not a list of numbers"))?
            }
        };
        let b: [f64; 4] = v
            .try_into()
            .map_err(|v: Vec<f64>| format!("has {} numbers, expected 4", v.len()))?;
        if b.iter().any(|x| !x.is_finite()) {
            return Err(format!("{b:?} is not finite"));
        }
        Ok(b)
    }

    /// The box as the answer text the model prints: a string field as written, an array as
    /// `[x1,y1,x2,y2]` with no spaces (the generated and official form).
    pub fn answer_text(&self) -> String {
        match self {
            BoxField::Text(s) => s.clone(),
            BoxField::Numbers(v) => {
                let parts: Vec<String> = v.iter().map(|x| x.to_string()).collect();
                format!("[{}]", parts.join(","))
            }
        }
    }
}

impl Serialize for BoxField {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            BoxField::Numbers(v) => v.serialize(s),
            BoxField::Text(t) => s.serialize_str(t),
        }
    }
}

impl<'de> Deserialize<'de> for BoxField {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = BoxField;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a box: an array of four numbers or a string such as \"[0,0,1,1]\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<BoxField, E> {
                Ok(BoxField::Text(v.to_string()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<BoxField, A::Error> {
                let mut v = Vec::with_capacity(4);
                while let Some(x) = a.next_element::<f64>()? {
                    // Four is all a box has; stop a hostile file early.
                    if v.len() == 16 {
                        return Err(serde::de::Error::invalid_length(17, &self));
                    }
                    v.push(x);
                }
                Ok(BoxField::Numbers(v))
            }
        }
        d.deserialize_any(V)
    }
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
