//! `cnext cache export|import` on smoke chains: two caches merged through archives give the
//! same matrices as the processes that trained them and train nothing again; a complete entry
//! is never overwritten; a tampered or misnamed archive is refused and adds nothing.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn cnext(cache: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cnext"))
        .env("CNEXT_CACHE_DIR", cache)
        .env("RAYON_NUM_THREADS", "1")
        .args(args)
        .output()
        .expect("run cnext")
}

fn ok(o: Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{err}");
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn run(cache: &Path, method: &str, out: &Path) -> serde_json::Value {
    let out_s = out.display().to_string();
    ok(cnext(
        cache,
        &[
            "run",
            "--profile",
            "smoke",
            "--method",
            method,
            "--out",
            &out_s,
        ],
    ));
    serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap()
}

fn archives(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

fn import(cache: &Path, files: &[PathBuf]) -> Output {
    let mut args = vec!["cache".to_string(), "import".to_string()];
    args.extend(files.iter().map(|p| p.display().to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    cnext(cache, &args)
}

fn none_trained(r: &serde_json::Value) -> bool {
    r["trained_now"]
        .as_array()
        .unwrap()
        .iter()
        .all(|t| t == false)
}

#[test]
fn merged_caches_train_nothing_again_and_refuse_bad_archives() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |s: &str| tmp.path().join(s);
    // Two runners: lora on one cache, ewc on another (they share the plain first stage).
    let lora = run(&p("cache-a"), "lora", &p("lora-a"));
    let ewc = run(&p("cache-b"), "ewc", &p("ewc-b"));
    for (cache, out) in [("cache-a", "arch-a"), ("cache-b", "arch-b")] {
        let a = p(cache).display().to_string();
        let o = p(out).display().to_string();
        ok(cnext(
            &p(cache),
            &["cache", "export", "--out", &o, "--cache", &a],
        ));
    }
    let (arch_a, arch_b) = (archives(&p("arch-a")), archives(&p("arch-b")));
    assert_eq!(arch_a.len(), 6);
    assert_eq!(arch_b.len(), 6);
    // Exports are deterministic: the same entry gives the same bytes.
    let again = p("arch-a2").display().to_string();
    ok(cnext(&p("cache-a"), &["cache", "export", "--out", &again]));
    for (x, y) in arch_a.iter().zip(archives(&p("arch-a2"))) {
        assert_eq!(std::fs::read(x).unwrap(), std::fs::read(y).unwrap());
    }

    // Merge both into an empty cache: the shared first stage arrives twice, kept once.
    let merged = p("merged");
    let first = ok(import(&merged, &arch_a));
    assert!(first.contains("imported 6 entries, kept 0"), "{first}");
    let second = ok(import(&merged, &arch_b));
    assert!(second.contains("imported 5 entries, kept 1"), "{second}");
    let entry = |name: &Path| {
        let stem = name.file_stem().unwrap().to_string_lossy().to_string();
        std::fs::read(merged.join("stages").join(stem).join("entry.json")).unwrap()
    };
    let before: Vec<Vec<u8>> = arch_a.iter().map(|a| entry(a)).collect();
    let third = ok(import(&merged, &arch_a));
    assert!(third.contains("imported 0 entries, kept 6"), "{third}");
    assert_eq!(before, arch_a.iter().map(|a| entry(a)).collect::<Vec<_>>());

    let lora_m = run(&merged, "lora", &p("lora-m"));
    let ewc_m = run(&merged, "ewc", &p("ewc-m"));
    assert!(none_trained(&lora_m) && none_trained(&ewc_m));
    assert_eq!(lora_m["matrix"], lora["matrix"]);
    assert_eq!(ewc_m["matrix"], ewc["matrix"]);

    // A flipped byte inside the weights, and an archive renamed to another key.
    let bad_dir = p("bad");
    std::fs::create_dir(&bad_dir).unwrap();
    let mut bytes = std::fs::read(&arch_a[1]).unwrap();
    // The file's tar header (512-aligned; the name also appears inside SHA256SUMS).
    let at = (0..bytes.len())
        .step_by(512)
        .find(|&i| bytes[i..].starts_with(b"weights.safetensors"))
        .expect("weights in the archive");
    // Past the 512-byte header, inside the tensor data.
    bytes[at + 512 + 200] ^= 0x55;
    let flipped = bad_dir.join(arch_a[1].file_name().unwrap());
    std::fs::write(&flipped, &bytes).unwrap();
    let renamed = bad_dir.join("lora-stage2-imagenet-0000000000000000.tar");
    std::fs::copy(&arch_a[1], &renamed).unwrap();
    let fresh = p("fresh");
    for (file, want) in [
        (
            &flipped,
            "`weights.safetensors`: sha256 does not match SHA256SUMS",
        ),
        (&renamed, "not to the archive's name"),
    ] {
        let o = import(&fresh, std::slice::from_ref(file));
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(
            err.contains(want) && err.contains(&file.display().to_string()),
            "{err}"
        );
    }
    let stages = fresh.join("stages");
    let left: Vec<_> = std::fs::read_dir(&stages)
        .map(|d| {
            d.flatten()
                .filter(|e| !e.file_name().to_string_lossy().starts_with(".locks"))
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
}
