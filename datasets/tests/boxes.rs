//! Grounding box fields as public copies of the test JSON write them: arrays or strings holding
//! one (`"origin_answer_bbox": "[0,0,1,1]"`), with the same validation either way.

use cnext_core::TaskId;
use cnext_datasets::loader::{load_test, TestItem};
use cnext_datasets::{generate, DataProfile, GenConfig};
use std::fs;
use std::path::PathBuf;

fn with_first_record(record: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("data");
    generate(&root, &GenConfig::new(DataProfile::Smoke, 1), false).unwrap();
    let path = root.join("refcoco/test.json");
    let body = fs::read_to_string(&path).unwrap();
    let mut lines: Vec<String> = body.lines().map(String::from).collect();
    lines[1] = record.to_string();
    fs::write(&path, lines.join("\n") + "\n").unwrap();
    (tmp, root)
}

fn record(origin: &str, answer: &str) -> String {
    format!(
        r#"{{"question_id":1,"image":"images/test_000000.png","text":"t","answer":"a","size":[24,24],"origin_answer_bbox":{origin},"answer_bbox":{answer}}},"#
    )
}

fn first_box(root: &std::path::Path) -> ([f64; 4], String) {
    let test = load_test(&root.join("refcoco"), TaskId::Refcoco).unwrap();
    match &test[0].item {
        TestItem::Grounding { bbox, answer, .. } => (*bbox, answer.clone()),
        other => panic!("not a grounding item: {other:?}"),
    }
}

#[test]
fn string_and_array_boxes_load_alike() {
    // The exact form found in public copies.
    let (_t, root) = with_first_record(&record(r#""[0,0,1,1]""#, r#""[0,0,1,1]""#));
    assert_eq!(
        first_box(&root),
        ([0.0, 0.0, 1.0, 1.0], "[0,0,1,1]".to_string())
    );
    // An array `answer_bbox` prints as the same answer text.
    let (_t, root) = with_first_record(&record("[0, 0, 1, 1]", "[0, 0, 1, 1]"));
    assert_eq!(
        first_box(&root),
        ([0.0, 0.0, 1.0, 1.0], "[0,0,1,1]".to_string())
    );
    let (_t, root) = with_first_record(&record(r#"" [3, 4.5, 6, 7] ""#, "[0.1, 0.25, 0.5, 0.75]"));
    assert_eq!(
        first_box(&root),
        ([0.1, 0.25, 0.5, 0.75], "[0.1,0.25,0.5,0.75]".to_string())
    );
}

#[test]
fn bad_boxes_name_the_field_and_line_in_either_form() {
    let cases = [
        (
            record(r#""[0,0,1]""#, r#""[0,0,1,1]""#),
            "origin_answer_bbox",
        ),
        (
            record(r#""[0,0,nan,1]""#, r#""[0,0,1,1]""#),
            "origin_answer_bbox",
        ),
        (
            record(r#""[0,0,-1,1]""#, r#""[0,0,1,1]""#),
            "origin_answer_bbox",
        ),
        (
            record(r#""0,0,1,1""#, r#""[0,0,1,1]""#),
            "origin_answer_bbox",
        ),
        (record("[0,0,1,1]", r#""[0.5,0,0.2,1]""#), "x1 < x2"),
        (record("[0,0,1,1]", "[0,0.5,1,0.5]"), "y1 < y2"),
        (record("[0,0,1,1]", r#""[0,0,inf,1]""#), "answer_bbox"),
        (record("[0,0,1,1]", "[0,0,1,1,1]"), "answer_bbox"),
        (record("[0,0,1,1]", r#"["0",0,1,1]"#), "test.json:2"),
        (record("{}", "[0,0,1,1]"), "a box"),
    ];
    for (line, want) in cases {
        let (_t, root) = with_first_record(&line);
        let e = load_test(&root.join("refcoco"), TaskId::Refcoco)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("test.json:2") && e.contains(want),
            "{line}\n-> {e}"
        );
    }
}
