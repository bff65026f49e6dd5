//! Every malformed input gets an error that names the file and the line (or the image), and
//! none of them panics. Each case starts from valid generated data and breaks one thing.

use cnext_core::TaskId;
use cnext_datasets::loader::{load_test, load_train};
use cnext_datasets::{generate, load_image, DataProfile, GenConfig};
use std::fs;
use std::path::{Path, PathBuf};

fn fresh() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("data");
    generate(&root, &GenConfig::new(DataProfile::Smoke, 1), false).unwrap();
    (tmp, root)
}

/// Replaces line `n` (1-based) of a file.
fn set_line(path: &Path, n: usize, text: &str) {
    let body = fs::read_to_string(path).unwrap();
    let mut lines: Vec<String> = body.lines().map(String::from).collect();
    lines[n - 1] = text.to_string();
    fs::write(path, lines.join("\n") + "\n").unwrap();
}

fn train_err(root: &Path, task: TaskId) -> String {
    load_train(&root.join(task.as_str()), task)
        .unwrap_err()
        .to_string()
}

fn test_err(root: &Path, task: TaskId) -> String {
    load_test(&root.join(task.as_str()), task)
        .unwrap_err()
        .to_string()
}

fn assert_has(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "`{msg}` should contain `{p}`");
    }
}

#[test]
fn malformed_train_lines_name_file_and_line() {
    use TaskId::*;
    let img = r#""image":"images/train_000000.png""#;
    let cases: Vec<(TaskId, String, Vec<&str>)> = vec![
        // 1. not JSON at all
        (Vqav2, "{not json".into(), vec!["train.jsonl:3", "malformed JSON"]),
        // 2. unknown key (strict parsing)
        (Vqav2, format!(r#"{{{img},"data":["q","a"],"extra":1}}"#), vec!["train.jsonl:3", "unknown field `extra`"]),
        // 3. odd number of turns
        (Vqav2, format!(r#"{{{img},"data":["q"]}}"#), vec!["train.jsonl:3", "alternate"]),
        // 4. empty answer
        (Imagenet, format!(r#"{{{img},"data":["q",""]}}"#), vec!["train.jsonl:3", "data[1]` is empty"]),
        // 5. missing image key
        (Ocrvqa, r#"{"data":["q","a"]}"#.into(), vec!["train.jsonl:3", "missing `image`"]),
        // 6. absolute image path
        (Vqav2, r#"{"image":"/etc/passwd","data":["q","a"]}"#.into(), vec!["train.jsonl:3", "escapes the data root"]),
        // 7. `..` escape
        (Refcoco, r#"{"image":"../vqav2/images/train_000000.png","data":["q","a"]}"#.into(), vec!["train.jsonl:3", "escapes"]),
        // 8. image that does not exist
        (Vqav2, r#"{"image":"images/nope.png","data":["q","a"]}"#.into(), vec!["train.jsonl:3", "not found"]),
        // 9. wrong type for data
        (Vqav2, format!(r#"{{{img},"data":"q"}}"#), vec!["train.jsonl:3", "malformed JSON"]),
        // 10. text-to-image with more than one turn
        (Flickr30k, format!(r#"{{{img},"data":["a","b","c","d"]}}"#), vec!["train.jsonl:3", "[prompt, caption]"]),
        // 11. editing record missing its target
        (Hqedit, r#"{"source_image":"images/train_000000_src.png","instruction":"x"}"#.into(), vec!["train.jsonl:3", "missing field `target_image`"]),
        // 12. editing record with an empty instruction
        (Hqedit, r#"{"source_image":"images/train_000000_src.png","target_image":"images/train_000000_tgt.png","instruction":" "}"#.into(), vec!["train.jsonl:3", "`instruction` is empty"]),
    ];
    for (task, line, expect) in cases {
        let (_t, root) = fresh();
        set_line(&root.join(task.as_str()).join("train.jsonl"), 3, &line);
        assert_has(&train_err(&root, task), &expect);
    }
}

#[test]
fn malformed_test_records_name_file_and_line() {
    use TaskId::*;
    // (task, line to replace (1-based; line 2 is the first element), replacement, expected)
    let cases: Vec<(TaskId, usize, &str, Vec<&str>)> = vec![
        // 13. answer_bbox that is not four numbers
        (
            Refcoco,
            3,
            r#"{"question_id":1,"image":"images/test_000001.png","text":"t","answer":"a","size":[24,24],"origin_answer_bbox":[1,1,2,2],"answer_bbox":"[0.1,0.2,0.3]"},"#,
            vec!["test.json:3", "answer_bbox"],
        ),
        // 14. box outside [0,1]
        (
            Refcoco,
            2,
            r#"{"question_id":1,"image":"images/test_000001.png","text":"t","answer":"a","size":[24,24],"origin_answer_bbox":[1,1,2,2],"answer_bbox":"[0.1,0.2,1.3,0.4]"},"#,
            vec!["test.json:2", "answer_bbox"],
        ),
        // 15. zero image size
        (
            Refcoco,
            4,
            r#"{"question_id":1,"image":"images/test_000001.png","text":"t","answer":"a","size":[0,24],"origin_answer_bbox":[1,1,2,2],"answer_bbox":"[0.1,0.2,0.3,0.4]"},"#,
            vec!["test.json:4", "size"],
        ),
        // 16. duplicate question id
        (
            Vqav2,
            4,
            r#"{"question_id":1000000,"image":"images/test_000001.png","text":"t","answer":"a"},"#,
            vec!["test.json:4", "duplicate question_id"],
        ),
        // 17. missing answer
        (
            Imagenet,
            2,
            r#"{"question_id":1,"image":"images/test_000001.png","text":"t"},"#,
            vec!["test.json:2", "missing field `answer`"],
        ),
        // 18. question id of the wrong type
        (
            Ocrvqa,
            2,
            r#"{"question_id":[1],"image":"images/test_000001.png","text":"t","answer":"a"},"#,
            vec!["test.json:2"],
        ),
        // 19. caption record with an unknown key
        (
            Flickr30k,
            2,
            r#"{"question_id":1,"text":"t","image":"x.png"},"#,
            vec!["test.json:2", "unknown field `image`"],
        ),
        // 20. editing test with a missing source image
        (
            Hqedit,
            2,
            r#"{"question_id":1,"source_image":"images/gone.png","target_image":"images/test_000000_tgt.png","instruction":"x"},"#,
            vec!["test.json:2", "not found"],
        ),
        // 21. truncated JSON array
        (
            Vqav2,
            3,
            "{\"question_id\":",
            vec!["test.json:", "malformed JSON"],
        ),
        // 22. empty vqa `answers` list
        (
            Vqav2,
            2,
            r#"{"question_id":1,"image":"images/test_000000.png","text":"t","answer":"a","answers":[]},"#,
            vec!["test.json:2", "`answers` is an empty list"],
        ),
    ];
    for (task, n, line, expect) in cases {
        let (_t, root) = fresh();
        set_line(&root.join(task.as_str()).join("test.json"), n, line);
        assert_has(&test_err(&root, task), &expect);
    }
}

#[test]
fn empty_missing_and_corrupt_files() {
    let (_t, root) = fresh();
    let dir = root.join("vqav2");
    // 23. empty train file
    fs::write(dir.join("train.jsonl"), "\n\n").unwrap();
    assert_has(
        &train_err(&root, TaskId::Vqav2),
        &["train.jsonl", "no samples"],
    );
    // 24. empty test array
    fs::write(dir.join("test.json"), "[]").unwrap();
    assert_has(
        &test_err(&root, TaskId::Vqav2),
        &["test.json", "no samples"],
    );
    // 25. missing file
    fs::remove_file(dir.join("test.json")).unwrap();
    assert_has(
        &test_err(&root, TaskId::Vqav2),
        &["test.json", "cannot read"],
    );
    // 26. corrupt PNG
    let png = root.join("imagenet/images/train_000000.png");
    fs::write(&png, b"\x89PNG\r\n\x1a\nnot really").unwrap();
    let e = load_image(&png).unwrap_err().to_string();
    assert_has(&e, &["train_000000.png", "cannot decode image"]);
    // 27. a symlink that leaves the root is rejected even though it is a relative path
    #[cfg(unix)]
    {
        let link = root.join("refcoco/images/link.png");
        std::os::unix::fs::symlink(root.join("vqav2/images/train_000000.png"), &link).unwrap();
        let f = root.join("refcoco/train.jsonl");
        set_line(&f, 1, r#"{"image":"images/link.png","data":["q","a"]}"#);
        assert_has(
            &train_err(&root, TaskId::Refcoco),
            &["train.jsonl:1", "escapes"],
        );
    }
}
