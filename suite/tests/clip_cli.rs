//! `cnext clip-score` and `cnext score --clip-model` on the `tiny_clip` fixture (a random HF
//! `CLIPModel` with transformers' and torchmetrics' numbers in `reference.json`), and their
//! error paths.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Score points: the fixture README allows 1e-3 on `100 * cos`.
const TOL: f64 = 1e-3;

fn cnext(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cnext"))
        .env("RAYON_NUM_THREADS", "1")
        .args(args)
        .output()
        .expect("run cnext")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `<repo root>/../shared/fixtures/tiny_clip`, or `$CNEXT_FIXTURES/tiny_clip`.
fn fixture_dir() -> PathBuf {
    let root = std::env::var_os("CNEXT_FIXTURES").map_or_else(
        || {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../shared/fixtures"
            ))
        },
        PathBuf::from,
    );
    let dir = root.join("tiny_clip");
    assert!(
        dir.join("reference.json").is_file(),
        "CLIP fixture not found at {} (set CNEXT_FIXTURES to the shared fixtures folder)",
        dir.display()
    );
    dir
}

fn reference(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `cnext clip-score ... --json`, parsed.
fn clip_score(args: &[&str]) -> f64 {
    let o = cnext(&[&["clip-score"], args, &["--json"]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    v["score"].as_f64().unwrap()
}

#[test]
fn clip_score_matches_the_reference_per_pair() {
    let dir = fixture_dir();
    let r = reference(&dir);
    let caps = strings(&r["captions"]);
    let files: Vec<PathBuf> = strings(&r["image_files"])
        .iter()
        .map(|f| dir.join(f))
        .collect();
    // CLIP-T: the per-sample scores torchmetrics sums (sample 3 is negative and stays so).
    let want = floats(&r["clip_score_per_sample"]);
    let mut worst = 0.0f64;
    for (i, cap) in caps.iter().enumerate() {
        let got = clip_score(&["--model", s(&dir), "--image", s(&files[i]), "--text", cap]);
        worst = worst.max((got - want[i]).abs());
    }
    eprintln!("clip-score CLIP-T max abs diff: {worst:e}");
    assert!(worst <= TOL, "CLIP-T max diff {worst}");
    // CLIP-I: the image x image matrix.
    let ii = floats(&r["cos100_image_image"]);
    let n = files.len();
    for (a, b) in [(0, 1), (2, 3), (1, 1)] {
        let got = clip_score(&[
            "--model",
            s(&dir),
            "--image",
            s(&files[a]),
            "--target",
            s(&files[b]),
        ]);
        assert!((got - ii[a * n + b]).abs() <= TOL, "CLIP-I {a},{b}: {got}");
    }
    // Without --json: one line naming the metric.
    let o = cnext(&[
        "clip-score",
        "--model",
        s(&dir),
        "--image",
        s(&files[0]),
        "--text",
        &caps[0],
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("CLIP-T "));
}

/// Writes `merge.jsonl` naming `images` (copied next to it) for ids 0..n.
fn predictions(out: &Path, images: &[PathBuf]) -> PathBuf {
    std::fs::create_dir_all(out.join("img")).unwrap();
    let mut body = String::new();
    for (i, src) in images.iter().enumerate() {
        let name = format!("img/{i}.png");
        std::fs::copy(src, out.join(&name)).unwrap();
        let rec = serde_json::json!({"question_id": i, "prompt": "", "text": name,
            "answer_id": "", "model_id": "ref", "metadata": {}});
        body.push_str(&format!("{rec}\n"));
    }
    let p = out.join("merge.jsonl");
    std::fs::write(&p, body).unwrap();
    p
}

/// `cnext score --json --per-sample`: (accuracy, per-sample scores in CLIP points).
fn score(task: &str, ann: &Path, pred: &Path, model: &Path) -> (f64, Vec<f64>) {
    let per = pred.with_file_name("per_sample.jsonl");
    let o = cnext(&[
        "score",
        "--task",
        task,
        "--annotations",
        s(ann),
        "--predictions",
        s(pred),
        "--clip-model",
        s(model),
        "--per-sample",
        s(&per),
        "--json",
    ]);
    assert!(o.status.success(), "{task}: {}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let samples = std::fs::read_to_string(&per)
        .unwrap()
        .lines()
        .map(|l| {
            100.0
                * serde_json::from_str::<Value>(l).unwrap()["score"]
                    .as_f64()
                    .unwrap()
        })
        .collect();
    (v["accuracy"].as_f64().unwrap(), samples)
}

#[test]
fn score_with_clip_model_scores_image_tasks_like_the_reference() {
    let dir = fixture_dir();
    let r = reference(&dir);
    let caps = strings(&r["captions"]);
    let files: Vec<PathBuf> = strings(&r["image_files"])
        .iter()
        .map(|f| dir.join(f))
        .collect();
    let tmp = tempfile::tempdir().unwrap();

    // flickr30k (clip_t): the generated images are the fixture's, the captions its captions.
    let t2i = tmp.path().join("flickr30k");
    let pred = predictions(&t2i, &files);
    let ann = t2i.join("test.json");
    let recs: Vec<Value> = caps
        .iter()
        .enumerate()
        .map(|(i, c)| serde_json::json!({"question_id": i, "text": c}))
        .collect();
    std::fs::write(&ann, serde_json::to_string(&recs).unwrap()).unwrap();
    let (acc, got) = score("flickr30k", &ann, &pred, &dir);
    let want = floats(&r["clip_score_per_sample"]);
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!((g - w).abs() <= TOL, "sample {i}: {g} vs {w}");
    }
    // The mean of raw scores; here it is positive, so it is torchmetrics' CLIPScore too.
    let tm = r["torchmetrics_CLIPScore"].as_f64().unwrap();
    assert!((acc - tm).abs() <= 0.005 + TOL, "accuracy {acc} vs {tm}");

    // hqedit (clip_i): generated image i against target image (i + 1) % n.
    let edit = tmp.path().join("hqedit");
    let pred = predictions(&edit, &files);
    let n = files.len();
    let recs: Vec<Value> = (0..n)
        .map(|i| {
            // Relative to test.json (annotations may not leave their folder): the copies.
            serde_json::json!({"question_id": i, "source_image": format!("img/{i}.png"),
                "target_image": format!("img/{}.png", (i + 1) % n), "instruction": "edit"})
        })
        .collect();
    let ann = edit.join("test.json");
    std::fs::write(&ann, serde_json::to_string(&recs).unwrap()).unwrap();
    let (_, got) = score("hqedit", &ann, &pred, &dir);
    let ii = floats(&r["cos100_image_image"]);
    for (i, g) in got.iter().enumerate() {
        let w = ii[i * n + (i + 1) % n];
        assert!((g - w).abs() <= TOL, "edit {i}: {g} vs {w}");
    }
}

/// Fails cleanly (no panic), naming `name` on stderr.
fn fails_naming(args: &[&str], name: &str) {
    let o = cnext(args);
    let e = stderr(&o);
    assert!(!o.status.success(), "{args:?} succeeded");
    assert!(!e.contains("panicked"), "{e}");
    assert!(e.contains(name), "{args:?}: expected `{name}` in: {e}");
}

#[test]
fn missing_model_and_corrupt_images_are_errors_naming_the_file() {
    let dir = fixture_dir();
    let img = dir.join("inputs/img2_32x32_green_triangle.png");
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("no-such-clip");
    fails_naming(
        &[
            "clip-score",
            "--model",
            s(&missing),
            "--image",
            s(&img),
            "--text",
            "x",
        ],
        "no-such-clip",
    );
    let bad = tmp.path().join("corrupt.png");
    std::fs::write(&bad, b"not a png").unwrap();
    fails_naming(
        &[
            "clip-score",
            "--model",
            s(&dir),
            "--image",
            s(&bad),
            "--text",
            "x",
        ],
        "corrupt.png",
    );
    fails_naming(
        &[
            "clip-score",
            "--model",
            s(&dir),
            "--image",
            s(&img),
            "--target",
            s(&bad),
        ],
        "corrupt.png",
    );
    let gone = tmp.path().join("gone.png");
    fails_naming(
        &[
            "clip-score",
            "--model",
            s(&dir),
            "--image",
            s(&gone),
            "--text",
            "x",
        ],
        "gone.png",
    );
    // A model folder with a broken file names that file.
    let broken = tmp.path().join("broken");
    std::fs::create_dir(&broken).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ] {
        std::fs::copy(dir.join(f), broken.join(f)).unwrap();
    }
    std::fs::write(broken.join("tokenizer.json"), "{").unwrap();
    fails_naming(
        &[
            "clip-score",
            "--model",
            s(&broken),
            "--image",
            s(&img),
            "--text",
            "x",
        ],
        "tokenizer.json",
    );
    // Neither --text nor --target.
    fails_naming(
        &["clip-score", "--model", s(&dir), "--image", s(&img)],
        "--text",
    );

    // `cnext score --clip-model`: a corrupt generated image names the image and the line.
    let t2i = tmp.path().join("t2i");
    let pred = predictions(&t2i, &[img.clone(), bad.clone()]);
    let ann = t2i.join("test.json");
    std::fs::write(
        &ann,
        r#"[{"question_id": 0, "text": "a"}, {"question_id": 1, "text": "b"}]"#,
    )
    .unwrap();
    let args = [
        "score",
        "--task",
        "flickr30k",
        "--annotations",
        s(&ann),
        "--predictions",
        s(&pred),
        "--clip-model",
    ];
    fails_naming(&[&args[..], &[s(&dir)]].concat(), "img/1.png");
    fails_naming(&[&args[..], &[s(&missing)]].concat(), "no-such-clip");
}
