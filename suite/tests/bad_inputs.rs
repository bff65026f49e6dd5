//! The bad-input corpus (`tests/bad_inputs/cases.json`): malformed and hostile train JSONL, test
//! JSON, images, prediction files and matrices, each run through the `cnext` command a user
//! would run on it. A case with `expect` must exit 1 (an error, not a panic) with every expected
//! piece (file, line, what was wrong) on stderr, and leave no output file; a case without is a
//! form the loaders accept (a BOM, CRLF, string boxes, a 1 MB prediction) and must succeed.

use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    kind: Kind,
    task: Option<String>,
    file: String,
    expect: Option<Vec<String>>,
    /// Images: the path under the task folder the file replaces.
    target: Option<String>,
    #[serde(default)]
    note: String,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Kind {
    Train,
    Test,
    Image,
    Predictions,
    Matrix,
}

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bad_inputs")
}

fn cnext(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cnext"))
        .env("RAYON_NUM_THREADS", "1")
        .args(args)
        .output()
        .expect("run cnext")
}

/// Runs one case against the data root; returns what went wrong, if anything.
fn run_case(c: &Case, root: &Path, out_dir: &Path) -> Option<String> {
    let input = corpus().join(&c.file);
    let task = c.task.as_deref().unwrap_or("vqav2");
    let replaced = match c.kind {
        Kind::Train => Some(root.join(task).join("train.jsonl")),
        Kind::Test => Some(root.join(task).join("test.json")),
        Kind::Image => Some(root.join(task).join(c.target.as_deref()?)),
        Kind::Predictions | Kind::Matrix => None,
    };
    let backup = replaced
        .as_ref()
        .map(|p| (p.clone(), std::fs::read(p).ok()));
    if let Some(p) = &replaced {
        std::fs::copy(&input, p).expect("place the case file");
    }
    let per_sample = out_dir.join(format!("{}.per_sample.jsonl", c.name));
    let root_s = root.display().to_string();
    let annotations = root.join(task).join("test.json").display().to_string();
    let input_s = input.display().to_string();
    let per_sample_s = per_sample.display().to_string();
    let o = match c.kind {
        Kind::Train | Kind::Test | Kind::Image => cnext(&["data", "check", "--root", &root_s]),
        Kind::Predictions => cnext(&[
            "score",
            "--task",
            task,
            "--annotations",
            &annotations,
            "--predictions",
            &input_s,
            "--per-sample",
            &per_sample_s,
            "--json",
        ]),
        Kind::Matrix => cnext(&["metrics", "--matrix", &input_s]),
    };
    if let Some((p, Some(bytes))) = backup {
        std::fs::write(p, bytes).expect("restore");
    }
    let stderr = String::from_utf8_lossy(&o.stderr);
    if stderr.contains("panicked") || o.status.code() == Some(101) {
        return Some(format!("{}: panicked: {stderr}", c.name));
    }
    match &c.expect {
        None if o.status.success() => None,
        None => Some(format!("{} ({}): should load: {stderr}", c.name, c.note)),
        Some(_) if o.status.success() => Some(format!("{}: accepted, should fail", c.name)),
        Some(parts) => {
            let missing: Vec<&String> = parts.iter().filter(|p| !stderr.contains(*p)).collect();
            if o.status.code() != Some(1) {
                Some(format!("{}: exit {:?}, want 1", c.name, o.status.code()))
            } else if !missing.is_empty() {
                Some(format!("{}: `{}` lacks {missing:?}", c.name, stderr.trim()))
            } else if per_sample.exists() {
                Some(format!("{}: left {} behind", c.name, per_sample.display()))
            } else {
                None
            }
        }
    }
}

#[test]
fn every_bad_input_gets_a_named_error_and_every_accepted_form_loads() {
    let text = std::fs::read_to_string(corpus().join("cases.json")).unwrap();
    let cases: Vec<Case> = serde_json::from_str(&text).unwrap();
    let errors = cases.iter().filter(|c| c.expect.is_some()).count();
    assert!(
        errors >= 40,
        "the corpus keeps at least 40 bad inputs, has {errors}"
    );
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("data");
    let gen = cnext_datasets::GenConfig::new(cnext_datasets::DataProfile::Smoke, 0);
    cnext_datasets::generate(&root, &gen, false).unwrap();
    // The untouched root passes, so every failure below is the case's own.
    let ok = cnext(&["data", "check", "--root", &root.display().to_string()]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|c| run_case(c, &root, tmp.path()))
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} cases:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// Replaces line `n` (1-based) of a file.
fn set_line(path: &Path, n: usize, text: &str) {
    let body = std::fs::read_to_string(path).unwrap();
    let mut lines: Vec<String> = body.lines().map(String::from).collect();
    lines[n - 1] = text.to_string();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

/// `cnext data check` reports every problem of the root in one run, not the first one.
#[test]
fn data_check_reports_every_problem_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("data");
    let gen = cnext_datasets::GenConfig::new(cnext_datasets::DataProfile::Smoke, 0);
    cnext_datasets::generate(&root, &gen, false).unwrap();
    set_line(&root.join("vqav2/train.jsonl"), 2, "{not json");
    set_line(
        &root.join("vqav2/train.jsonl"),
        5,
        r#"{"image":"images/gone.png","data":["q","a"]}"#,
    );
    set_line(
        &root.join("imagenet/test.json"),
        3,
        r#"{"question_id":1,"image":"images/test_000001.png","text":"t"},"#,
    );
    std::fs::write(root.join("ocrvqa/images/train_000000.png"), b"").unwrap();
    std::fs::remove_file(root.join("hqedit/test.json")).unwrap();
    let r = root.display().to_string();
    let cache = tmp.path().join("cache");
    let out = tmp.path().join("run");
    let (c, o) = (cache.display().to_string(), out.display().to_string());
    // `data check`, and the paper profile's check before anything loads or trains.
    let paper = [
        "run",
        "--profile",
        "paper",
        "--data-root",
        &r,
        "--cache",
        &c,
        "--out",
        &o,
    ];
    for args in [&["data", "check", "--root", &r][..], &paper[..]] {
        let o = cnext(args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        for want in [
            "vqav2/train.jsonl:2: malformed JSON",
            "vqav2/train.jsonl:5: image `images/gone.png` not found",
            "imagenet/test.json:3: malformed JSON: missing field `answer`",
            "ocrvqa/train.jsonl:1: ",
            "train_000000.png: cannot decode image",
            "hqedit/test.json: cannot read",
            "5 problems in 4 files",
        ] {
            assert!(
                err.contains(want),
                "{args:?}: `{want}` missing from:\n{err}"
            );
        }
    }
    assert!(!cache.join("stages").exists() && !out.exists());
}
