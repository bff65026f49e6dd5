//! A word-level tokenizer with byte fallback, built from a corpus: pieces are letter runs,
//! number runs (with an optional decimal part, so "0.71" is one piece) and single other
//! characters, each letter or number run taking one leading space. Pieces seen often enough get
//! their own id; anything else is spelled in bytes, so every string round-trips. Short sequences
//! are the biggest lever on training cost, which is why this is not byte-level.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const PAD: u32 = 0;
pub const BOS: u32 = 1;
pub const EOS: u32 = 2;
/// Start of the answer.
pub const SEP: u32 = 3;
/// Begin of an image output (image codes follow).
pub const BOI: u32 = 4;
const SPECIALS: u32 = 5;
const BYTES: u32 = 256;

/// Splits text into pieces (see module doc).
pub fn pieces(text: &str) -> Vec<&str> {
    let b = text.as_bytes();
    let mut out = vec![];
    let mut i = 0;
    while i < b.len() {
        let start = i;
        let lead = b[i] == b' ' && i + 1 < b.len() && (b[i + 1].is_ascii_alphanumeric());
        if lead {
            i += 1;
        }
        if i < b.len() && b[i].is_ascii_alphabetic() {
            while i < b.len() && b[i].is_ascii_alphabetic() {
                i += 1;
            }
        } else if i < b.len() && b[i].is_ascii_digit() {
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
            if i + 1 < b.len() && b[i] == b'.' && b[i + 1].is_ascii_digit() {
                i += 1;
                while i < b.len() && b[i].is_ascii_digit() {
                    i += 1;
                }
            }
        } else {
            // One character (UTF-8 aware).
            let ch_len = text[i..].chars().next().map_or(1, char::len_utf8);
            i += ch_len;
        }
        out.push(&text[start..i]);
    }
    out
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tokenizer {
    /// Word pieces in id order (ids start after specials and bytes).
    words: Vec<String>,
    /// Number of image codes appended after the words.
    image_codes: u32,
    #[serde(skip)]
    index: BTreeMap<String, u32>,
}

impl Tokenizer {
    /// Builds the vocabulary from a corpus: pieces seen at least `min_count` times, ordered by
    /// (count desc, piece) so the result is deterministic.
    pub fn build<'a>(
        corpus: impl IntoIterator<Item = &'a str>,
        min_count: usize,
        image_codes: u32,
    ) -> Self {
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for text in corpus {
            for p in pieces(text) {
                if p.len() > 1 {
                    *counts.entry(p).or_default() += 1;
                }
            }
        }
        let mut words: Vec<(&str, usize)> = counts
            .into_iter()
            .filter(|(_, c)| *c >= min_count)
            .collect();
        words.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        Self::from_words(
            words.into_iter().map(|(w, _)| w.to_string()).collect(),
            image_codes,
        )
    }

    pub fn from_words(words: Vec<String>, image_codes: u32) -> Self {
        let mut t = Tokenizer {
            words,
            image_codes,
            index: BTreeMap::new(),
        };
        t.reindex();
        t
    }

    /// Rebuilds the lookup table (after deserialising).
    pub fn reindex(&mut self) {
        self.index = self
            .words
            .iter()
            .enumerate()
            .map(|(i, w)| (w.clone(), SPECIALS + BYTES + i as u32))
            .collect();
    }

    pub fn vocab_size(&self) -> usize {
        (SPECIALS + BYTES) as usize + self.words.len() + self.image_codes as usize
    }

    /// Id of image code `c`.
    pub fn image_code_id(&self, c: u32) -> u32 {
        SPECIALS + BYTES + self.words.len() as u32 + c
    }

    /// The id range of image codes.
    pub fn image_code_range(&self) -> std::ops::Range<u32> {
        self.image_code_id(0)..self.image_code_id(self.image_codes)
    }

    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = vec![];
        for p in pieces(text) {
            match self.index.get(p) {
                Some(&id) => out.push(id),
                None => out.extend(p.bytes().map(|b| SPECIALS + u32::from(b))),
            }
        }
        out
    }

    /// Decodes text ids; specials and image codes are skipped.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = vec![];
        for &id in ids {
            if (SPECIALS..SPECIALS + BYTES).contains(&id) {
                bytes.push((id - SPECIALS) as u8);
            } else if let Some(w) = id
                .checked_sub(SPECIALS + BYTES)
                .and_then(|i| self.words.get(i as usize))
            {
                bytes.extend_from_slice(w.as_bytes());
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_keep_leading_spaces_and_decimals() {
        assert_eq!(
            pieces("Where is it?\nAnswer [0.04,0.71] in 1994"),
            vec![
                "Where", " is", " it", "?", "\n", "Answer", " ", "[", "0.04", ",", "0.71", "]",
                " in", " 1994"
            ]
        );
    }

    #[test]
    fn round_trip_with_byte_fallback() {
        let t = Tokenizer::build(["the red circle", "the red square", "the blue"], 2, 4);
        let ids = t.encode("the red zebra, café");
        assert_eq!(t.decode(&ids), "the red zebra, café");
        // "the" and " red" are words; " zebra" is spelled in bytes.
        assert_eq!(t.encode("the red").len(), 2);
        assert_eq!(t.encode(" zebra").len(), 6);
        assert_eq!(t.vocab_size(), 5 + 256 + 2 + 4);
        assert!(t.image_code_range().contains(&t.image_code_id(3)));
    }
}
