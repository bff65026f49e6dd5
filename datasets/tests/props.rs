//! Property tests over the file parsers: random valid records round-trip through serde and the
//! loaders; random byte-level mutations of valid files never panic and either load or fail
//! with an error naming the file. 10,000 cases per property. The loaders' text entry points
//! (`parse_train`, `parse_test`, `parse_predictions`, after `decode_text`) are what the file
//! loaders call after reading, so no case pays for a file write.

use cnext_core::TaskId;
use cnext_datasets::evaluate::parse_predictions;
use cnext_datasets::formats::{
    BoxField, ConversationRecord, GroundingRecord, PredictionRecord, QuestionId, QuestionRecord,
};
use cnext_datasets::loader::{decode_text, parse_test, parse_train, ImageCheck};
use proptest::prelude::*;
use std::path::Path;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 10_000,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn qid() -> impl Strategy<Value = QuestionId> {
    prop_oneof![
        any::<u64>().prop_map(QuestionId::Int),
        "[a-z0-9_]{1,12}".prop_map(QuestionId::Str),
    ]
}

/// Non-empty text with anything JSON must escape.
fn text() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9 ?\"\\\\\u{e9}\u{4e2d}\t]{0,20}[a-z]"
}

fn question() -> impl Strategy<Value = QuestionRecord> {
    (
        qid(),
        text(),
        text(),
        proptest::option::of(proptest::collection::vec(text(), 1..4)),
    )
        .prop_map(|(question_id, text, answer, answers)| QuestionRecord {
            question_id,
            image: "images/a.png".into(),
            text,
            answer,
            answers,
        })
}

fn grounding() -> impl Strategy<Value = GroundingRecord> {
    let corners = (0u32..50, 0u32..50, 51u32..=100, 51u32..=100);
    (qid(), text(), corners, any::<bool>(), any::<bool>()).prop_map(
        |(question_id, text, (x1, y1, x2, y2), origin_text, answer_text)| {
            let n = [x1, y1, x2, y2].map(|v| f64::from(v) / 100.0);
            let px = [x1, y1, x2 - x1, y2 - y1].map(f64::from);
            let as_field = |v: [f64; 4], text: bool| {
                let f = BoxField::Numbers(v.to_vec());
                if text {
                    BoxField::Text(f.answer_text())
                } else {
                    f
                }
            };
            GroundingRecord {
                question_id,
                image: "images/a.png".into(),
                answer: as_field(n, true).answer_text(),
                text,
                size: [100, 100],
                origin_answer_bbox: as_field(px, origin_text),
                answer_bbox: as_field(n, answer_text),
            }
        },
    )
}

fn prediction() -> impl Strategy<Value = PredictionRecord> {
    (qid(), text(), any::<String>()).prop_map(|(question_id, prompt, text)| PredictionRecord {
        question_id,
        prompt,
        text,
        answer_id: String::new(),
        model_id: "m".into(),
        metadata: Default::default(),
    })
}

fn json_array<T: serde::Serialize>(items: &[T]) -> String {
    cnext_datasets::formats::json_array_lines(items).unwrap()
}

fn jsonl<T: serde::Serialize>(items: &[T]) -> String {
    items
        .iter()
        .map(|r| serde_json::to_string(r).unwrap() + "\n")
        .collect()
}

/// Byte-level edits of `text`: overwrite, delete, insert a structural byte, truncate.
fn mutate(text: String) -> impl Strategy<Value = Vec<u8>> {
    let len = text.len().max(1);
    let edit = (0..len, 0u8..4, any::<u8>(), 0usize..10);
    proptest::collection::vec(edit, 1..5).prop_map(move |edits| {
        let mut b = text.clone().into_bytes();
        for (at, kind, byte, pick) in edits {
            let at = at.min(b.len());
            let special = [b',', b'\n', b'"', b'{', b'}', b'[', b']', 0xff, b'\\', b'-'][pick];
            match kind {
                0 if at < b.len() => b[at] = byte,
                1 if at < b.len() => {
                    b.remove(at);
                }
                2 => b.insert(at, special),
                _ => b.truncate(at),
            }
        }
        b
    })
}

/// One scratch folder per property (properties run in parallel); each case overwrites its
/// file, so 10,000 cases do not make 10,000 folders.
fn scratch(name: &str) -> std::path::PathBuf {
    static ROOT: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    let dir = ROOT
        .get_or_init(|| tempfile::tempdir().unwrap())
        .path()
        .join(name);
    if !dir.join("images/a.png").exists() {
        std::fs::create_dir_all(dir.join("images")).unwrap();
        image::RgbImage::new(2, 2)
            .save(dir.join("images/a.png"))
            .unwrap();
    }
    dir
}

fn names_file(e: &impl std::fmt::Display, file: &Path) -> bool {
    e.to_string().contains(&file.display().to_string())
}

/// The text a loader would parse, or `None` when the bytes are not UTF-8 (the loaders then
/// report the line of the first bad byte; checked here too).
fn text_of(bytes: &[u8]) -> Option<String> {
    match decode_text(bytes.to_vec()) {
        Ok(t) => Some(t),
        Err((line, msg)) => {
            assert!(line >= 1 && msg.contains("UTF-8"), "{line}: {msg}");
            None
        }
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn question_files_round_trip(recs in proptest::collection::vec(question(), 1..4)) {
        let dir = scratch("questions");
        let f = dir.as_path().join("test.json");
        let unique: std::collections::BTreeMap<_, _> =
            recs.iter().map(|r| (r.question_id.clone(), r.clone())).collect();
        let recs: Vec<_> = unique.into_values().collect();
        let text = json_array(&recs);
        let back: Vec<QuestionRecord> = serde_json::from_str(&text).unwrap();
        prop_assert_eq!(&back, &recs);
        let loaded = parse_test(&text, &f, TaskId::Vqav2, ImageCheck::Resolve).unwrap();
        prop_assert_eq!(loaded.len(), recs.len());
    }

    #[test]
    fn grounding_records_round_trip_in_either_box_form(r in grounding()) {
        let text = serde_json::to_string(&r).unwrap();
        let back: GroundingRecord = serde_json::from_str(&text).unwrap();
        prop_assert_eq!(&back, &r);
        prop_assert_eq!(back.answer_bbox.values().unwrap(), r.answer_bbox.values().unwrap());
    }

    #[test]
    fn mutated_grounding_files_load_or_name_the_file(
        bytes in proptest::collection::vec(grounding(), 1..3)
            .prop_flat_map(|rs| mutate(json_array(&rs[..1])))
    ) {
        let dir = scratch("grounding_mut");
        let f = dir.as_path().join("test.json");
        if let Some(text) = text_of(&bytes) {
            if let Err(e) = parse_test(&text, &f, TaskId::Refcoco, ImageCheck::PathsOnly) {
                prop_assert!(names_file(&e, &f), "{}", e);
            }
        }
    }

    #[test]
    fn mutated_question_files_load_or_name_the_file(
        bytes in proptest::collection::vec(question(), 1..3).prop_flat_map(|rs| mutate(json_array(&rs[..1])))
    ) {
        let dir = scratch("questions_mut");
        let f = dir.as_path().join("test.json");
        if let Some(text) = text_of(&bytes) {
            if let Err(e) = parse_test(&text, &f, TaskId::Ocrvqa, ImageCheck::Resolve) {
                prop_assert!(names_file(&e, &f), "{}", e);
            }
        }
    }

    #[test]
    fn mutated_train_files_load_or_name_the_file(
        b in proptest::collection::vec((text(), text()), 1..3).prop_flat_map(|t| {
            let data = t.into_iter().flat_map(|(q, a)| [q, a]).collect();
            let rec = ConversationRecord { image: Some("images/a.png".into()), data };
            mutate(jsonl(&[rec.clone(), rec]))
        }),
    ) {
        let dir = scratch("train_mut");
        let f = dir.as_path().join("train.jsonl");
        if let Some(text) = text_of(&b) {
            if let Err(e) = parse_train(&text, &f, TaskId::Vqav2) {
                prop_assert!(names_file(&e, &f), "{}", e);
            }
        }
    }

    #[test]
    fn prediction_files_round_trip_and_survive_mutation(
        recs in proptest::collection::vec(prediction(), 1..3),
        cut in any::<proptest::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let dir = scratch("predictions");
        let f = dir.as_path().join("merge.jsonl");
        let unique: std::collections::BTreeMap<_, _> =
            recs.iter().map(|r| (r.question_id.clone(), r.clone())).collect();
        let text = jsonl(&unique.values().cloned().collect::<Vec<_>>());
        let back = parse_predictions(&text, &f).unwrap();
        prop_assert_eq!(back.len(), unique.len());
        for (id, p) in &back {
            prop_assert_eq!(&p.record, &unique[id]);
        }
        let mut bytes = text.into_bytes();
        let at = cut.index(bytes.len());
        bytes[at] = byte;
        if let Some(text) = text_of(&bytes) {
            if let Err(e) = parse_predictions(&text, &f) {
                prop_assert!(names_file(&e, &f), "{}", e);
            }
        }
    }
}
