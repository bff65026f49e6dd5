//! Mid-stage resume on the smoke profile: a chain killed in the middle of stage 2 (after a
//! checkpoint, with steps done since it) and rerun continues from the checkpoint and ends
//! bit-identical to an uninterrupted run without checkpoints: the same matrix bytes, the
//! same weights and method state in every entry, the same losses. MAGE (PEMA's theta* and
//! counters), LAE (the offline EMA) and CIA (DEMA) carry step state that must survive.

use std::path::Path;
use std::process::{Command, Output};

fn cnext(cache: &Path, every: usize) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cnext"));
    c.env("CNEXT_CACHE_DIR", cache)
        .env("CNEXT_CHECKPOINT_EVERY", every.to_string())
        .env("RAYON_NUM_THREADS", "1")
        .env_remove("CNEXT_ABORT_IN_STAGE");
    c
}

fn run(c: &mut Command, method: &str, out: &Path) -> Output {
    c.args(["run", "--profile", "smoke", "--method", method, "--out"])
        .arg(out)
        .output()
        .expect("run cnext")
}

fn ok(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{err}");
    err
}

/// Every entry folder's files that do not hold timings, by entry name and file.
fn entry_bytes(cache: &Path, method: &str) -> Vec<(String, Vec<u8>)> {
    let mut out = vec![];
    let mut dirs: Vec<_> = std::fs::read_dir(cache.join("stages"))
        .unwrap()
        .flatten()
        .map(|d| d.path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with(method) && !n.starts_with('.')
        })
        .collect();
    dirs.sort();
    for d in dirs {
        for f in ["weights.safetensors", "method_state.safetensors"] {
            if let Ok(b) = std::fs::read(d.join(f)) {
                out.push((format!("{}/{f}", d.display()), b));
            }
        }
        let e: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(d.join("entry.json")).unwrap()).unwrap();
        let losses = e["stats"]
            .as_object()
            .map(|s| format!("{} {} {}", s["steps"], s["first_loss"], s["last_loss"]));
        out.push((
            format!("{}/losses", d.display()),
            format!("{losses:?} {}", e["evals"]).into_bytes(),
        ));
    }
    out
}

#[test]
fn a_stage_killed_mid_way_resumes_from_its_checkpoint_bit_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let (plain, killed) = (tmp.path().join("plain"), tmp.path().join("killed"));
    for method in ["mage", "lae", "cia"] {
        let reference = tmp.path().join(format!("{method}-ref"));
        ok(&run(&mut cnext(&plain, 0), method, &reference));

        // Smoke stages train 20 steps: checkpoints after steps 4, 8, 12, 16; killed after 10.
        let out = tmp.path().join(format!("{method}-out"));
        let o = run(
            cnext(&killed, 4).env("CNEXT_ABORT_IN_STAGE", "2:10"),
            method,
            &out,
        );
        assert!(
            !o.status.success(),
            "{method}: the injected abort did not fire"
        );
        let ckpts = killed.join("stages").join(".checkpoints");
        let files: Vec<_> = std::fs::read_dir(&ckpts).unwrap().flatten().collect();
        assert_eq!(files.len(), 1, "{method}: one checkpoint of stage 2");
        let name = files[0].file_name().to_string_lossy().to_string();
        assert!(name.contains("stage2"), "{name}");

        let err = ok(&run(&mut cnext(&killed, 4), method, &out));
        assert!(
            err.contains("resumed at step 8/20"),
            "{method}: no resume in\n{err}"
        );
        assert_eq!(
            std::fs::read_dir(&ckpts).unwrap().count(),
            0,
            "{method}: the checkpoint outlived its stage"
        );
        assert_eq!(
            std::fs::read(reference.join("matrix.csv")).unwrap(),
            std::fs::read(out.join("matrix.csv")).unwrap(),
            "{method}: matrix"
        );
        let (a, b) = (entry_bytes(&plain, method), entry_bytes(&killed, method));
        assert_eq!(a.len(), b.len(), "{method}: entries");
        assert!(a.len() >= 6, "{method}: {} entry files", a.len());
        for ((fa, ba), (fb, bb)) in a.iter().zip(&b) {
            let (na, nb) = (
                fa.rsplit('/').take(2).collect::<Vec<_>>(),
                fb.rsplit('/').take(2).collect::<Vec<_>>(),
            );
            assert_eq!(na, nb, "{method}: entry names differ");
            assert!(ba == bb, "{method}: {fa} differs after the resume");
        }
    }
}
