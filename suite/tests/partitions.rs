//! The suite sharded the way `cargo nextest run --partition hash:k/3` shards it: three
//! processes of the suite binary, started together on one empty cache, each running a hash
//! partition of the smoke tests of four methods (lora, ewc, mage, upper_bound: chains split
//! across processes, a relational test that needs two chains), train every stage entry exactly
//! once and leave the same entries, with the same scores, as one process on its own cache.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

const METHODS: [&str; 4] = ["lora", "ewc", "mage", "upper_bound"];

/// The suite test binary: the newest `suite-<hash>` next to this test's own binary (cargo
/// builds both into `target/<profile>/deps`).
fn suite_binary() -> PathBuf {
    let me = std::env::current_exe().unwrap();
    let deps = me.parent().unwrap();
    let mut found: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(deps)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            name.strip_prefix("suite-")
                .is_some_and(|h| h.len() == 16 && h.chars().all(|c| c.is_ascii_hexdigit()))
        })
        .map(|p| (p.metadata().unwrap().modified().unwrap(), p))
        .collect();
    found.sort();
    found
        .pop()
        .expect("the suite test binary next to this one")
        .1
}

fn suite(bin: &Path, cache: &Path) -> Command {
    let mut c = Command::new(bin);
    c.env("CNEXT_PROFILE", "smoke")
        .env("CNEXT_CACHE_DIR", cache)
        .env("RAYON_NUM_THREADS", "1");
    c
}

/// Every test name the suite lists.
fn all_names(bin: &Path, cache: &Path) -> Vec<String> {
    let o = suite(bin, cache).arg("--list").output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .map(str::to_string)
        .collect()
}

/// Runs exactly `names` (every other listed name skipped), one test at a time.
fn spawn(bin: &Path, cache: &Path, all: &[String], names: &BTreeSet<String>) -> Child {
    let mut c = suite(bin, cache);
    c.args(["--exact", "--test-threads", "1"]);
    for n in all.iter().filter(|n| !names.contains(*n)) {
        c.args(["--skip", n]);
    }
    c.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Entry name -> its scores, for every complete stage entry of a cache.
fn entries(cache: &Path) -> BTreeMap<String, serde_json::Value> {
    std::fs::read_dir(cache.join("stages"))
        .unwrap()
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| {
            let body = std::fs::read_to_string(e.path().join("entry.json")).unwrap();
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                v["evals"].clone(),
            )
        })
        .collect()
}

#[test]
fn three_partitions_on_one_empty_cache_train_each_stage_once() {
    let bin = suite_binary();
    let tmp = tempfile::tempdir().unwrap();
    let (shared, alone) = (tmp.path().join("shared"), tmp.path().join("alone"));
    let all = all_names(&bin, &shared);
    let chosen: BTreeSet<String> = all
        .iter()
        .filter(|n| {
            METHODS
                .iter()
                .any(|m| n.starts_with(&format!("smoke::{m}::default_order::")))
        })
        .cloned()
        .collect();
    assert!(chosen.len() >= 5, "{chosen:?}");
    // nextest's hash partitioning in spirit: a stable hash of the name picks the shard.
    let mut parts = vec![BTreeSet::new(); 3];
    for n in &chosen {
        let h = cnext_core::hash::sha256_hex(n.as_bytes());
        let k = usize::from_str_radix(&h[..8], 16).unwrap() % 3;
        parts[k].insert(n.clone());
    }
    assert!(parts.iter().all(|p| !p.is_empty()), "{parts:?}");

    let children: Vec<Child> = parts
        .iter()
        .map(|p| spawn(&bin, &shared, &all, p))
        .collect();
    let mut trained: BTreeMap<String, usize> = BTreeMap::new();
    for c in children {
        let o = c.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            o.status.success(),
            "{}\n{err}",
            String::from_utf8_lossy(&o.stdout)
        );
        for l in err.lines() {
            if let Some(rest) = l.strip_prefix("stage cache: trained ") {
                let name = rest.split_whitespace().next().unwrap().to_string();
                *trained.entry(name).or_default() += 1;
            }
        }
    }
    let sharded = entries(&shared);
    assert!(trained.values().all(|&n| n == 1), "{trained:?}");
    assert_eq!(
        trained.keys().collect::<Vec<_>>(),
        sharded.keys().collect::<Vec<_>>()
    );

    eprintln!(
        "{} tests in shards of {:?}: {} stage entries, each trained once",
        chosen.len(),
        parts.iter().map(BTreeSet::len).collect::<Vec<_>>(),
        sharded.len()
    );
    let one = spawn(&bin, &alone, &all, &chosen)
        .wait_with_output()
        .unwrap();
    assert!(
        one.status.success(),
        "{}",
        String::from_utf8_lossy(&one.stderr)
    );
    assert_eq!(
        entries(&alone),
        sharded,
        "one process and three shards differ"
    );
}
