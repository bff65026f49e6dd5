//! Resilience of the cache and the run command on the smoke profile (a chain takes seconds):
//! runs killed at many points and rerun give the uninterrupted matrix byte for byte and never
//! load a partial entry; three processes on one empty cache train every stage once; an output
//! folder that cannot be written fails before training and leaves the cache usable.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn complete_entries(cache: &Path) -> usize {
    std::fs::read_dir(cache.join("stages"))
        .map(|d| {
            d.flatten()
                .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                .count()
        })
        .unwrap_or(0)
}

fn cnext(cache: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cnext"));
    c.env("CNEXT_CACHE_DIR", cache)
        .env("RAYON_NUM_THREADS", "1");
    c
}

fn run_args(out: &Path) -> Vec<String> {
    ["run", "--profile", "smoke", "--method", "lora", "--out"]
        .iter()
        .map(|s| s.to_string())
        .chain([out.display().to_string()])
        .collect()
}

fn run(cache: &Path, out: &Path) -> Output {
    cnext(cache)
        .args(run_args(out))
        .output()
        .expect("run cnext")
}

fn spawn(cache: &Path, out: &Path) -> Child {
    cnext(cache)
        .args(run_args(out))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cnext")
}

fn ok(o: &Output) {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn matrix(out: &Path) -> Vec<u8> {
    std::fs::read(out.join("matrix.csv")).expect("matrix.csv")
}

fn results(out: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(out.join("results.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Entry folders: every one complete (its `entry.json` written last, inside the temp folder).
fn assert_no_partial_entry(cache: &Path) {
    let Ok(dirs) = std::fs::read_dir(cache.join("stages")) else {
        return;
    };
    for d in dirs.flatten() {
        let name = d.file_name().to_string_lossy().to_string();
        if name.starts_with('.') {
            continue;
        }
        let dir: PathBuf = d.path();
        assert!(
            dir.join("entry.json").is_file() && dir.join("weights.safetensors").is_file(),
            "partial entry {}",
            dir.display()
        );
    }
}

#[test]
fn killed_runs_resume_to_the_same_matrix_byte_for_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = tmp.path().join("ref");
    let t0 = Instant::now();
    ok(&run(&tmp.path().join("cache-ref"), &reference));
    let full = t0.elapsed();

    let cache = tmp.path().join("cache");
    let out = tmp.path().join("out");
    // Points spread over an uninterrupted run (data, base, scorer, stages), each on the cache
    // the previous kill left, so later points land further into the chain. Their sum stays
    // near half a run, so stages are left for the entry-write abort and the kills below
    // however the time splits between setup and stages.
    let mut killed = 0;
    let mut kill_at = |frac: f64| {
        let mut child = spawn(&cache, &out);
        std::thread::sleep(full.mul_f64(frac));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            killed += 1;
        }
        child.wait().unwrap();
        assert_no_partial_entry(&cache);
    };
    for frac in [0.03, 0.08, 0.15, 0.25] {
        kill_at(frac);
    }
    // Die inside the next stage's entry write: weights written, entry.json not, the folder
    // not renamed.
    let done = complete_entries(&cache);
    assert!(
        done < 5,
        "the early kills should land before the stages end"
    );
    let o = cnext(&cache)
        .env("CNEXT_ABORT_IN_ENTRY_WRITE", (done + 1).to_string())
        .args(run_args(&out))
        .output()
        .unwrap();
    assert!(!o.status.success(), "the injected abort did not fire");
    assert_no_partial_entry(&cache);
    // Then inside later stages: kill 50 ms after the next entry appears.
    for _ in 0..2 {
        let want = complete_entries(&cache) + 1;
        let mut child = spawn(&cache, &out);
        let t = Instant::now();
        while complete_entries(&cache) < want && t.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(50));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            killed += 1;
        }
        child.wait().unwrap();
        assert_no_partial_entry(&cache);
    }
    ok(&run(&cache, &out));
    assert!(
        killed >= 5,
        "only {killed} of 6 kills landed before the run ended (plus the abort)"
    );
    assert_eq!(
        String::from_utf8(matrix(&out)).unwrap(),
        String::from_utf8(matrix(&reference)).unwrap()
    );
}

#[test]
fn three_processes_on_one_empty_cache_train_each_stage_once() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let outs: Vec<PathBuf> = (0..3).map(|i| tmp.path().join(format!("out{i}"))).collect();
    let children: Vec<Child> = outs.iter().map(|o| spawn(&cache, o)).collect();
    let mut logs = String::new();
    for c in children {
        let o = c.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(o.status.success(), "{err}");
        logs += &err;
    }
    let mut trained = [0usize; 6];
    for o in &outs {
        let r = results(o);
        for (k, t) in r["trained_now"].as_array().unwrap().iter().enumerate() {
            trained[k] += usize::from(t.as_bool().unwrap());
        }
    }
    assert_eq!(trained, [1; 6], "stages trained per stage over 3 processes");
    assert_eq!(logs.matches("built base").count(), 1, "{logs}");
    assert_eq!(matrix(&outs[0]), matrix(&outs[1]));
    assert_eq!(matrix(&outs[1]), matrix(&outs[2]));
}

#[test]
fn an_unwritable_output_folder_fails_before_training_and_keeps_the_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let good = tmp.path().join("good");
    ok(&run(&cache, &good));
    let entries = |c: &Path| std::fs::read_dir(c.join("stages")).unwrap().count();
    let before = entries(&cache);

    // Under a regular file: no one, root included, can create it.
    let file = tmp.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let mut bad = vec![file.join("out")];
    // Read-only permissions bind only non-root users; test them where they bind.
    let ro = tmp.path().join("read-only");
    std::fs::create_dir(&ro).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
        if std::fs::write(ro.join("probe"), "x").is_err() {
            bad.push(ro.join("out"));
        }
    }
    let fresh = tmp.path().join("cache-fresh");
    for out in &bad {
        for c in [&cache, &fresh] {
            let o = run(c, out);
            let err = String::from_utf8_lossy(&o.stderr);
            assert_eq!(o.status.code(), Some(1), "{err}");
            assert!(
                err.contains("is not writable") && err.contains(&out.display().to_string()),
                "{err}"
            );
        }
    }
    // Nothing trained for a run that cannot write its results.
    assert!(!fresh.join("stages").exists() || entries(&fresh) == 0);
    assert_eq!(entries(&cache), before);
    let again = tmp.path().join("again");
    ok(&run(&cache, &again));
    assert_eq!(matrix(&again), matrix(&good));
    assert!(results(&again)["trained_now"]
        .as_array()
        .unwrap()
        .iter()
        .all(|t| t == false));
}
