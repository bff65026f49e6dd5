//! End-to-end checks of the `cnext` binary: data generation, scoring official prediction files
//! and metrics from a matrix CSV, including their error paths.

use std::path::Path;
use std::process::{Command, Output};

fn cnext(args: &[&str]) -> Output {
    // Tests run in parallel: one thread per training process avoids oversubscription.
    Command::new(env!("CARGO_BIN_EXE_cnext"))
        .env("RAYON_NUM_THREADS", "1")
        .args(args)
        .output()
        .expect("run cnext")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn write(path: &Path, body: &str) {
    std::fs::write(path, body).unwrap();
}

/// The paper's MAGE final row (45.42 .. 91.19) has Avg.ACC 49.575, published as 49.58.
#[test]
fn metrics_round_the_published_mean_as_published() {
    let tmp = tempfile::tempdir().unwrap();
    let csv = tmp.path().join("m.csv");
    let mut body = String::from("vqav2,imagenet,flickr30k,ocrvqa,refcoco,hqedit\n");
    for j in 0..5 {
        let row: Vec<&str> = (0..6).map(|i| if i <= j { "50" } else { "-" }).collect();
        body += &(row.join(",") + "\n");
    }
    body += "45.42,68.02,31.44,27.28,34.10,91.19\n";
    write(&csv, &body);
    let o = cnext(&["metrics", "--matrix", csv.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["avg_acc"], serde_json::json!(49.58));
    let o = cnext(&["metrics", "--matrix", csv.to_str().unwrap()]);
    assert!(stdout(&o).contains("49.58"), "{}", stdout(&o));
}

#[test]
fn metrics_prints_table_and_json_and_names_bad_lines() {
    let tmp = tempfile::tempdir().unwrap();
    let csv = tmp.path().join("m.csv");
    write(&csv, "vqav2,imagenet,flickr30k\n80,-,-\n60,90,\n50,70,40\n");
    let o = cnext(&["metrics", "--matrix", csv.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    // Avg.ACC = (50+70+40)/3 = 53.333.. ; New.ACC = (80+90+40)/3 = 70 ;
    // Forgetting = ((80-50)+(90-70))/2 = 25
    assert_eq!(v["avg_acc"], serde_json::json!(53.33));
    assert_eq!(v["new_acc"], serde_json::json!(70.0));
    assert_eq!(v["forgetting"], serde_json::json!(25.0));
    assert_eq!(v["bwt"], serde_json::json!(-25.0));
    let o = cnext(&["metrics", "--matrix", csv.to_str().unwrap()]);
    assert!(stdout(&o).contains("Avg.ACC") && stdout(&o).contains("53.33"));

    write(&csv, "vqav2,imagenet\n80,-\n60,abc\n");
    let o = cnext(&["metrics", "--matrix", csv.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains(":3"), "{}", stderr(&o));
    write(&csv, "vqav2,imagenet\n80\n");
    let o = cnext(&["metrics", "--matrix", csv.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains(":2"), "{}", stderr(&o));
}

/// Generates smoke data and returns (tempdir, data root).
/// The stage-cache entry under `cache` whose folder name starts with `prefix`.
fn stage_entry(cache: &Path, prefix: &str) -> std::path::PathBuf {
    std::fs::read_dir(cache.join("stages"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with(prefix))
        .unwrap_or_else(|| panic!("no stage entry {prefix}* in {}", cache.display()))
}

fn smoke() -> (tempfile::TempDir, std::path::PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("data");
    let o = cnext(&[
        "data",
        "generate",
        "--profile",
        "smoke",
        "--seed",
        "4",
        "--out",
        root.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("refcoco"));
    let o = cnext(&["data", "check", "--root", root.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    (tmp, root)
}

fn predictions(test_json: &Path, answer: impl Fn(usize, &str) -> Option<String>) -> String {
    let tests: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(test_json).unwrap()).unwrap();
    let mut out = String::new();
    for (i, t) in tests.iter().enumerate() {
        if let Some(a) = answer(i, t["answer"].as_str().unwrap()) {
            let rec = serde_json::json!({"question_id": t["question_id"], "prompt": t["text"],
                "text": a, "answer_id": format!("a{i}"), "model_id": "test", "metadata": {}});
            out.push_str(&rec.to_string());
            out.push('\n');
        }
    }
    out
}

#[test]
fn score_reads_official_predictions_and_reports_problems() {
    let (tmp, root) = smoke();
    let ann = root.join("vqav2/test.json");
    let pred = tmp.path().join("merge.jsonl");
    // Half right, one missing, one empty (the official script counts "" correct).
    write(
        &pred,
        &predictions(&ann, |i, a| match i {
            0 => None,
            1 => Some(String::new()),
            i if i % 2 == 0 => Some(format!("<s>{}</s>", a.to_uppercase())),
            _ => Some("zebra zebra zebra".into()),
        }),
    );
    let args = |compat: &'static str, per: &str| {
        vec![
            "score".to_string(),
            "--task".into(),
            "vqav2".into(),
            "--annotations".into(),
            ann.display().to_string(),
            "--predictions".into(),
            pred.display().to_string(),
            "--compat".into(),
            compat.into(),
            "--json".into(),
            "--per-sample".into(),
            per.into(),
        ]
    };
    let per = tmp.path().join("per.jsonl");
    let a = args("correct", per.to_str().unwrap());
    let o = cnext(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    // 12 smoke test samples: indexes 2,4,..,10 right (5), 0 missing, 1 empty -> 5/12.
    assert_eq!(v["samples"], 12);
    assert_eq!(v["missing"], 1);
    assert_eq!(v["accuracy"], serde_json::json!(41.67));
    assert!(stderr(&o).contains("1 test samples have no prediction"));
    assert_eq!(std::fs::read_to_string(&per).unwrap().lines().count(), 12);
    let a = args("official", per.to_str().unwrap());
    let o = cnext(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(
        v["accuracy"],
        serde_json::json!(50.0),
        "empty counts correct in official mode"
    );

    // Unknown id and duplicate id: errors naming the line.
    let mut body = std::fs::read_to_string(&pred).unwrap();
    body.push_str(r#"{"question_id": 999, "prompt": "", "text": "x", "answer_id": "", "model_id": "", "metadata": {}}"#);
    write(&pred, &body);
    let a = args("correct", per.to_str().unwrap());
    let o = cnext(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("merge.jsonl:12") && stderr(&o).contains("999"),
        "{}",
        stderr(&o)
    );
    let first = body.lines().next().unwrap().to_string();
    write(&pred, &format!("{first}\n{first}\n"));
    let o = cnext(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        stderr(&o).contains("merge.jsonl:2") && stderr(&o).contains("duplicate"),
        "{}",
        stderr(&o)
    );
    write(&pred, "{\"question_id\": 1, \"text\": \n");
    let o = cnext(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(stderr(&o).contains("merge.jsonl:1"), "{}", stderr(&o));
}

#[test]
fn score_grounding_with_box_iou() {
    let (tmp, root) = smoke();
    let ann = root.join("refcoco/test.json");
    let pred = tmp.path().join("merge.jsonl");
    let no_cache = tmp.path().join("no-cache");
    write(
        &pred,
        &predictions(&ann, |i, a| {
            Some(match i % 3 {
                0 => a.to_string(),
                1 => "[0.00,0.00,0.01,0.01]".into(),
                _ => "the red one".into(),
            })
        }),
    );
    let o = cnext(&[
        "score",
        "--task",
        "refcoco",
        "--annotations",
        ann.to_str().unwrap(),
        "--predictions",
        pred.to_str().unwrap(),
        "--json",
        "--cache",
        no_cache.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        !no_cache.exists(),
        "a text task must not load or train the scorer"
    );
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["accuracy"], serde_json::json!(33.33));
    assert_eq!(v["format_errors"], 4);
}

/// Runs `cnext` and checks that it fails with `msg` on stderr.
fn refused(args: &[&str], msg: &str) {
    let o = cnext(args);
    assert!(!o.status.success());
    assert!(stderr(&o).contains(msg), "{}", stderr(&o));
}

#[test]
fn bad_arguments_fail_cleanly() {
    refused(
        &[
            "score",
            "--task",
            "coco",
            "--annotations",
            "a",
            "--predictions",
            "b",
        ],
        "unknown task id `coco`",
    );
    refused(
        &["metrics", "--matrix", "/nonexistent/m.csv"],
        "/nonexistent/m.csv",
    );
}

/// On a real run's output: every wrong text answer has exactly one error type, so in each text
/// cell IUF + HAL + OTH = 100 - accuracy, and Avg.IUF + Avg.HAL + Avg.OTH equals the text tasks'
/// share of Forgetting, recomputed here from matrix.csv.
fn decomposition_invariant_holds(out: &Path) {
    let r: cnext_harness::run::RunResult =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let e = r
        .errors
        .as_ref()
        .expect("results.json has the error report");
    let csv = std::fs::read_to_string(out.join("matrix.csv")).unwrap();
    let rows: Vec<Vec<Option<f64>>> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').map(|c| c.parse().ok()).collect())
        .collect();
    let tasks = r.matrix.tasks();
    let mut wrong_cells = 0;
    for (j, row) in rows.iter().enumerate() {
        for (i, task) in tasks.iter().enumerate().take(j + 1) {
            let rate = |x: &Vec<Vec<Option<f64>>>| x[j][i];
            let (iuf, hal, oth) = (rate(&e.rates.iuf), rate(&e.rates.hal), rate(&e.rates.oth));
            if task.output() == cnext_core::Modality::Image {
                assert_eq!((iuf, hal, oth), (None, None, None), "{task} after {j}");
                continue;
            }
            let sum = iuf.unwrap() + hal.unwrap() + oth.unwrap();
            let acc = row[i].unwrap();
            assert!(
                (sum - (100.0 - acc)).abs() < 1e-9,
                "{task} after {j}: {sum} vs {acc}"
            );
            wrong_cells += usize::from(sum > 0.0);
        }
    }
    assert!(
        wrong_cells > 0,
        "a 3-step smoke run answers some questions wrong"
    );
    let t = rows.len();
    let text_forgetting: f64 = (0..t - 1)
        .filter(|&i| tasks[i].output() == cnext_core::Modality::Text)
        .map(|i| rows[i][i].unwrap() - rows[t - 1][i].unwrap())
        .sum::<f64>()
        / (t - 1) as f64;
    let avg_sum = e.avg_iuf.unwrap() + e.avg_hal.unwrap() + e.avg_oth.unwrap();
    assert!(
        (avg_sum - text_forgetting).abs() < 1e-9,
        "{avg_sum} vs {text_forgetting}"
    );
    assert!((e.text_forgetting.unwrap() - text_forgetting).abs() < 1e-9);
}

#[test]
fn run_smoke_lora_end_to_end_writes_matrix_results_and_predictions() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let out = tmp.path().join("run");
    let args: Vec<String> = [
        "run",
        "--method",
        "lora",
        "--profile",
        "smoke",
        "--steps",
        "3",
        "--cache",
        cache.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let o = cnext(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("Avg.ACC"), "{}", stdout(&o));
    // The matrix CSV is what `cnext metrics` reads.
    let m = cnext(&[
        "metrics",
        "--matrix",
        out.join("matrix.csv").to_str().unwrap(),
        "--json",
    ]);
    assert!(m.status.success(), "{}", stderr(&m));
    let csv = std::fs::read_to_string(out.join("matrix.csv")).unwrap();
    assert_eq!(csv.lines().count(), 7, "{csv}");
    // The same run again trains nothing: every stage comes from the stage cache, same matrix.
    let again = tmp.path().join("again");
    let mut args = args.clone();
    *args.last_mut().unwrap() = again.to_str().unwrap().to_string();
    let o2 = cnext(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o2.status.success(), "{}", stderr(&o2));
    assert!(
        stdout(&o2).contains("6 of 6 stages from the cache"),
        "{}",
        stdout(&o2)
    );
    assert_eq!(
        std::fs::read_to_string(again.join("matrix.csv")).unwrap(),
        csv
    );
    // An entry without its entry.json (as if cut off while writing) is not taken as complete:
    // that stage is retrained, the later ones still load, and the matrix is the same.
    let stage3 = stage_entry(&cache, "lora-stage3-");
    std::fs::remove_file(stage3.join("entry.json")).unwrap();
    let o3 = cnext(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o3.status.success(), "{}", stderr(&o3));
    assert!(
        stdout(&o3).contains("5 of 6 stages from the cache"),
        "{}",
        stdout(&o3)
    );
    assert!(stage3.join("entry.json").exists());
    assert_eq!(
        std::fs::read_to_string(again.join("matrix.csv")).unwrap(),
        csv
    );
    let res: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    assert_eq!(res["stages"].as_array().unwrap().len(), 6);
    decomposition_invariant_holds(&out);
    // Predictions per stage and task in the official format; images for image tasks.
    let p = out.join("predictions/stage6/vqav2/merge.jsonl");
    let first = std::fs::read_to_string(&p).unwrap();
    let rec: serde_json::Value = serde_json::from_str(first.lines().next().unwrap()).unwrap();
    assert!(rec["question_id"].is_u64() && rec["model_id"] == "lora");
    let img_pred =
        std::fs::read_to_string(out.join("predictions/stage3/flickr30k/merge.jsonl")).unwrap();
    let rec: serde_json::Value = serde_json::from_str(img_pred.lines().next().unwrap()).unwrap();
    let png = out
        .join("predictions/stage3/flickr30k")
        .join(rec["text"].as_str().unwrap());
    assert!(png.exists(), "{}", png.display());
    // `cnext score` rescores the saved image predictions with the cached scorer and agrees
    // with the run's last matrix row.
    let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    let last: Vec<&str> = csv.lines().nth(6).unwrap().split(',').collect();
    for task in ["hqedit", "flickr30k"] {
        let col = header.iter().position(|h| *h == task).unwrap();
        let cell: f64 = last[col].parse().unwrap();
        let ann = cache.join("data/smoke-seed0").join(task).join("test.json");
        let pred = out
            .join("predictions/stage6")
            .join(task)
            .join("merge.jsonl");
        let o = cnext(&[
            "score",
            "--task",
            task,
            "--profile",
            "smoke",
            "--cache",
            cache.to_str().unwrap(),
            "--annotations",
            ann.to_str().unwrap(),
            "--predictions",
            pred.to_str().unwrap(),
            "--json",
        ]);
        assert!(o.status.success(), "{task}: {}", stderr(&o));
        assert!(!stderr(&o).contains("training"), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
        assert_eq!(
            v["scorer"],
            if task == "hqedit" { "clip_i" } else { "clip_t" }
        );
        assert_eq!(
            v["accuracy"],
            serde_json::json!(cnext_core::metrics::round2(cell)),
            "{task}: matrix.csv has {cell}"
        );
    }
    // Several training seeds: the seed-0 run comes from the cache, and summary.json holds the
    // per-seed values with their mean and sample std.
    let ms = tmp.path().join("seeds");
    let o = cnext(&[
        "run",
        "--method",
        "lora",
        "--profile",
        "smoke",
        "--steps",
        "3",
        "--seeds",
        "0,1",
        "--cache",
        cache.to_str().unwrap(),
        "--out",
        ms.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("mean ± std over seeds 0,1"),
        "{}",
        stdout(&o)
    );
    assert_eq!(
        std::fs::read_to_string(ms.join("seed0/matrix.csv")).unwrap(),
        csv
    );
    let sum: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ms.join("summary.json")).unwrap()).unwrap();
    let per_seed: Vec<f64> = ["seed0", "seed1"]
        .iter()
        .map(|d| {
            let r: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(ms.join(d).join("results.json")).unwrap(),
            )
            .unwrap();
            r["metrics"]["avg_acc"].as_f64().unwrap()
        })
        .collect();
    let avg = &sum["metrics"]["avg_acc"];
    let mean = (per_seed[0] + per_seed[1]) / 2.0;
    let std = ((per_seed[0] - mean).powi(2) + (per_seed[1] - mean).powi(2)).sqrt();
    assert!((avg["mean"].as_f64().unwrap() - mean).abs() < 1e-9, "{sum}");
    assert!((avg["std"].as_f64().unwrap() - std).abs() < 1e-9, "{sum}");
    decomposition_invariant_holds(&ms.join("seed1"));
    // A report over the single run and the multi-seed folder.
    let rep = tmp.path().join("report");
    let o = cnext(&[
        "report",
        out.to_str().unwrap(),
        ms.to_str().unwrap(),
        "--out",
        rep.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let files: Vec<String> = std::fs::read_dir(&rep)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    for f in [
        "curves.png",
        "curves.svg",
        "decomposition.png",
        "comparison.csv",
        "transfer.csv",
    ] {
        assert!(files.iter().any(|n| n == f), "{f} missing: {files:?}");
    }
    let heatmaps = files
        .iter()
        .filter(|n| n.starts_with("heatmap-") && n.ends_with(".png"));
    assert_eq!(heatmaps.count(), 2, "{files:?}");
    let cmp = std::fs::read_to_string(rep.join("comparison.csv")).unwrap();
    assert_eq!(cmp.lines().count(), 3, "{cmp}");
    assert!(
        cmp.contains(" ± "),
        "the multi-seed row has mean ± std: {cmp}"
    );
    let o = cnext(&[
        "run",
        "--method",
        "lora",
        "--profile",
        "smoke",
        "--seeds",
        "1,1",
        "--cache",
        cache.to_str().unwrap(),
    ]);
    assert!(
        !o.status.success() && stderr(&o).contains("distinct seeds"),
        "{}",
        stderr(&o)
    );
    // The zero-shot rows are identical at every stage.
    let o = cnext(&[
        "run",
        "--method",
        "zero_shot",
        "--profile",
        "smoke",
        "--cache",
        cache.to_str().unwrap(),
        "--out",
        tmp.path().join("zs").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let zs = std::fs::read_to_string(tmp.path().join("zs/matrix.csv")).unwrap();
    let rows: Vec<Vec<&str>> = zs.lines().skip(1).map(|l| l.split(',').collect()).collect();
    for j in 1..rows.len() {
        assert_eq!(rows[j][..j], rows[j - 1][..j]);
    }
}

#[test]
fn run_lr_and_steps_overrides_reach_the_stage_and_name_the_run_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let c = cache.to_str().unwrap();
    refused(
        &[
            "run",
            "--method",
            "lora",
            "--profile",
            "smoke",
            "--lr",
            "0",
            "--cache",
            c,
        ],
        "--lr must be a positive number, got 0",
    );
    // Refused before any data, base or scorer is built.
    assert!(!cache.exists());
    let o = cnext(&[
        "run",
        "--method",
        "lora",
        "--profile",
        "smoke",
        "--steps",
        "2",
        "--lr",
        "0.01",
        "--cache",
        c,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    // A run with other training settings never overwrites the default run's folder.
    let dir = cache.join("runs/lora-default_order-smoke-steps2-lr0.01-seed0");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("results.json")).unwrap()).unwrap();
    assert_eq!(r["config"]["stage"]["optim"]["lr"], serde_json::json!(0.01));
    assert_eq!(r["config"]["stage"]["steps"], serde_json::json!(2));
}

#[test]
fn a_shared_first_stage_is_the_same_whichever_method_builds_it() {
    // `lora` and `ewc` share stage 1 (one cache key); built by either, in its own cache, it must
    // hold the same weights, or the cache would keep whichever method came first.
    let tmp = tempfile::tempdir().unwrap();
    let stage1 = |method: &str| -> Vec<u8> {
        let cache = tmp.path().join(method);
        let o = cnext(&[
            "run",
            "--method",
            method,
            "--profile",
            "smoke",
            "--steps",
            "3",
            "--cache",
            cache.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let dir = stage_entry(&cache, "shared-lora-stage1-");
        std::fs::read(dir.join("weights.safetensors")).unwrap()
    };
    assert!(stage1("lora") == stage1("ewc"));
}
