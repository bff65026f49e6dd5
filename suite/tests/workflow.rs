//! The GPU CI workflow (`.github/workflows/gpu-suite.yml`) parses, its shards cover
//! `hash:1/N` .. `hash:N/N` exactly once, and every `cnext` command it runs is one the binary
//! accepts (checked with `--help` on the real binary, so a renamed flag breaks this test).

use serde_yaml::Value;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

fn workflow() -> Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.github/workflows/gpu-suite.yml");
    let body = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_yaml::from_str(&body).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Every `run:` script of a job, joined, with line continuations folded.
fn scripts(job: &Value) -> String {
    job["steps"]
        .as_sequence()
        .expect("steps")
        .iter()
        .filter_map(|s| s["run"].as_str())
        .collect::<Vec<_>>()
        .join("\n")
        .replace("\\\n", " ")
}

#[test]
fn the_gpu_workflow_shards_the_suite_and_merges_the_caches() {
    let w = workflow();
    let jobs = &w["jobs"];
    for j in ["build", "shard", "check"] {
        assert!(jobs[j].is_mapping(), "job {j} is missing");
    }
    assert_eq!(w["env"]["CNEXT_PROFILE"].as_str(), Some("paper"));
    for var in cnext_suite::profile::PAPER_ENV {
        assert!(w["env"][var].is_string(), "{var} is not set");
    }

    // hash:k/N with k from the matrix: every partition 1..=N once.
    let parts: Vec<u64> = jobs["shard"]["strategy"]["matrix"]["partition"]
        .as_sequence()
        .expect("a partition matrix")
        .iter()
        .map(|v| v.as_u64().expect("partition numbers"))
        .collect();
    let shard = scripts(&jobs["shard"]);
    let n: u64 = shard
        .split("--partition hash:${{ matrix.partition }}/")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("a --partition hash:${{ matrix.partition }}/N flag");
    assert_eq!(
        parts.iter().copied().collect::<BTreeSet<_>>(),
        (1..=n).collect::<BTreeSet<_>>()
    );
    assert_eq!(parts.len() as u64, n);
    assert!(jobs["check"]["needs"].as_str() == Some("shard"));

    // Each cnext invocation: its subcommand path accepts every flag the workflow passes.
    let all = format!("{shard}\n{}", scripts(&jobs["check"]));
    let mut seen = 0;
    for line in all.lines() {
        let Some(rest) = line.trim().strip_prefix("target/release/cnext ") else {
            continue;
        };
        let words: Vec<&str> = rest.split_whitespace().collect();
        let subs: Vec<&str> = words
            .iter()
            .take_while(|w| !w.starts_with('-'))
            .copied()
            .take(2)
            .collect();
        let help = Command::new(env!("CARGO_BIN_EXE_cnext"))
            .args(&subs)
            .arg("--help")
            .output()
            .unwrap();
        assert!(help.status.success(), "cnext {subs:?} does not exist");
        let help = String::from_utf8_lossy(&help.stdout);
        for flag in words.iter().filter(|w| w.starts_with("--")) {
            assert!(help.contains(flag), "cnext {subs:?} has no {flag}:\n{help}");
        }
        seen += 1;
    }
    assert_eq!(seen, 2, "expected the cache export and import commands");
}
