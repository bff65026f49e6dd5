//! The suite's trials: every registered method x order x stage x seen task is a named test
//! (libtest-mimic), plus a matrix test per chain and relational checks. Trials share one
//! bench per profile and one chain per (profile, method, order), built on first use, so
//! `--list` loads nothing and `--exact NAME` builds only what that test needs.
//!
//! Which profiles run is one setting, `CNEXT_PROFILE`: `smoke` (every method, seconds each),
//! `janus_smoke` (every method on the tiny Janus fixture), `paper` (the paper's recipe on
//! `CNEXT_PAPER_{MODEL,CLIP,DATA}`, by default the fixtures and generated smoke data), `mini`
//! (every method on the benchmark), or unset: smoke, janus_smoke and paper for every method
//! plus the mini chains CI can afford ([`CI_MINI`]); every other mini chain is registered as
//! ignored.
//! The default order runs by default; the other orders are ignored (`--include-ignored`).

use crate::names::{Check, Stage, TestName};
use crate::profile::Profile;
use crate::setup::{Bench, Scorer};
use crate::snapshot::{self, Snapshot, Tolerance};
use cnext_core::metrics::Metrics;
use cnext_core::{AccuracyMatrix, Order, TaskId};
use cnext_harness::device::DeviceSpec;
use cnext_harness::method::{MethodEntry, Schedule};
use cnext_harness::stages::Chain;
use libtest_mimic::{Failed, Trial};
use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};

/// The mini chains that run by default (CI runs them), default order: one method per mechanism
/// family, the fewest chains that cover them all (with candle's ops, measured, adding `lora`
/// would not fit CI's 90 minutes; the README gives the budget): regularisation (`ewc`), projection (`pgp`), merging
/// (`reglora`), and experts with a parameter-wise EMA (`mage`). The first three train `lora`'s
/// shared stage 1, so the baseline's first stage is checked through them.
pub const CI_MINI: &[&str] = &["ewc", "pgp", "reglora", "mage"];

/// The profiles to register and whether a mini chain is active, from `CNEXT_PROFILE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Unset: smoke everywhere, plus [`CI_MINI`] on mini.
    Default,
    Only(Profile),
}

impl Scope {
    pub fn from_env() -> Result<Self, String> {
        match std::env::var("CNEXT_PROFILE").ok().as_deref() {
            None | Some("") => Ok(Scope::Default),
            Some(other) => other
                .parse()
                .map(Scope::Only)
                .map_err(|e| format!("CNEXT_PROFILE={other}: {e}")),
        }
    }

    fn profiles(self) -> Vec<Profile> {
        match self {
            Scope::Default => vec![
                Profile::Smoke,
                Profile::JanusSmoke,
                Profile::Paper,
                Profile::Mini,
            ],
            Scope::Only(p) => vec![p],
        }
    }

    /// Whether a chain runs without `--include-ignored`.
    fn active(self, profile: Profile, method: &str, order: Order) -> bool {
        order == Order::DefaultOrder
            && match (self, profile) {
                (Scope::Default, Profile::Mini) => CI_MINI.contains(&method),
                _ => true,
            }
    }
}

/// Every test name of a scope, with whether it is ignored by default.
pub fn names(scope: Scope, methods: &[MethodEntry]) -> Vec<(TestName, bool)> {
    let mut out = vec![];
    for profile in scope.profiles() {
        for order in Order::ALL {
            for m in methods {
                let ignored = !scope.active(profile, m.id, order);
                let schedule = (m.new)().schedule();
                let name = |check| TestName {
                    profile,
                    method: m.id.to_string(),
                    order,
                    check,
                };
                let tasks = order.tasks();
                let cells: Vec<(Stage, TaskId)> = match schedule {
                    Schedule::Joint => tasks.iter().map(|&t| (Stage::Joint, t)).collect(),
                    _ => (1..=tasks.len())
                        .flat_map(|k| tasks[..k].iter().map(move |&t| (Stage::K(k), t)))
                        .collect(),
                };
                let floor = CellFloor::of(profile, &snapshot_path(&name(Check::Matrix)));
                for (stage, task) in cells {
                    if floor.can_fail(stage, task) {
                        out.push((name(Check::Cell { stage, task }), ignored));
                    }
                }
                out.push((name(Check::Matrix), ignored));
                match (m.id, schedule) {
                    (_, Schedule::Frozen) => out.push((name(Check::RowsIdentical), ignored)),
                    ("upper_bound", _) if methods.iter().any(|e| e.id == "lora") => {
                        let lora_ignored = !scope.active(profile, "lora", order);
                        out.push((name(Check::AtLeastLora), ignored || lora_ignored))
                    }
                    _ => {}
                }
            }
        }
    }
    out
}

/// Which cells are checks. A one-sided check whose snapshot value is within its tolerance of
/// 0 can never fail (accuracy has no lower value), so it is not registered: the chain's
/// matrix test covers it. Smoke has no cell tests at all: with 12 test samples per task its
/// tolerance (25) is larger than most of its cells, so they would only ever pass; smoke keeps
/// the matrix and relational tests (plumbing, determinism). Reading a snapshot is not loading
/// weights, so `--list` stays instant.
enum CellFloor {
    None,
    All,
    Snapshot(Snapshot, Tolerance),
}

impl CellFloor {
    fn of(profile: Profile, path: &std::path::Path) -> Self {
        if profile.data() == cnext_datasets::DataProfile::Smoke {
            return CellFloor::None;
        }
        match snapshot::read(path) {
            Ok(Some(s)) => CellFloor::Snapshot(s, Tolerance::of(profile)),
            // Without a (readable) snapshot every cell is registered, and fails saying why.
            _ => CellFloor::All,
        }
    }

    fn can_fail(&self, stage: Stage, task: TaskId) -> bool {
        match self {
            CellFloor::None => false,
            CellFloor::All => true,
            CellFloor::Snapshot(s, tol) => s
                .cell(stage.number(), task)
                .is_none_or(|v| v - tol.cell(task) > 0.0),
        }
    }
}

/// One bench per profile, opened on first use and kept for the process.
fn bench(profile: Profile) -> Result<&'static Bench, String> {
    static BENCHES: Mutex<BTreeMap<Profile, &'static Bench>> = Mutex::new(BTreeMap::new());
    let mut m = BENCHES
        .lock()
        .map_err(|_| "bench state poisoned".to_string())?;
    if let Some(b) = m.get(&profile) {
        return Ok(b);
    }
    // Tests run in the package folder: default to the workspace's target/cnext.
    let cache = std::env::var_os("CNEXT_CACHE_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| snapshot::workspace().join("target").join("cnext"));
    // GPU runners set CNEXT_DEVICE=cuda (the GPU CI workflow); the default is the CPU.
    let device: DeviceSpec = match std::env::var("CNEXT_DEVICE") {
        Ok(d) if !d.is_empty() => d.parse().map_err(|e| format!("CNEXT_DEVICE={d}: {e}"))?,
        _ => DeviceSpec::Cpu,
    };
    let b = Bench::open(profile, 0, cache, device).map_err(|e| format!("{e:#}"))?;
    let b: &'static Bench = Box::leak(Box::new(b));
    m.insert(profile, b);
    Ok(b)
}

type Key = (Profile, String, Order);

/// One chain per (profile, method, order), so its loaded task data is shared by its trials.
fn chain(
    profile: Profile,
    method: &MethodEntry,
    order: Order,
) -> Result<&'static Chain<'static, Scorer>, String> {
    static CHAINS: OnceLock<Mutex<BTreeMap<Key, &'static Chain<'static, Scorer>>>> =
        OnceLock::new();
    let b = bench(profile)?;
    let mut m = CHAINS
        .get_or_init(Mutex::default)
        .lock()
        .map_err(|_| "chain state poisoned".to_string())?;
    let key = (profile, method.id.to_string(), order);
    if let Some(c) = m.get(&key) {
        return Ok(c);
    }
    let cfg: &'static _ = Box::leak(Box::new(b.run_config(order, 0, None, None)));
    let c = b
        .chain(cfg, method.factory())
        .map_err(|e| format!("{e:#}"))?;
    let c: &'static Chain<'static, Scorer> = Box::leak(Box::new(c));
    m.insert(key, c);
    Ok(c)
}

fn matrix_of(
    profile: Profile,
    method: &MethodEntry,
    order: Order,
) -> Result<AccuracyMatrix, String> {
    let c = chain(profile, method, order)?;
    c.matrix().map(|(m, _)| m).map_err(|e| e.to_string())
}

fn snapshot_of(name: &TestName, method: &MethodEntry) -> Result<Snapshot, String> {
    let c = chain(name.profile, method, name.order)?;
    let (m, _) = c.matrix().map_err(|e| e.to_string())?;
    let mut prov = BTreeMap::new();
    prov.insert("seed".into(), serde_json::json!(c.cfg.seed));
    prov.insert("cnext".into(), serde_json::json!(env!("CARGO_PKG_VERSION")));
    prov.insert("base".into(), serde_json::json!(c.base.name()));
    prov.insert(
        "device".into(),
        serde_json::json!(cnext_harness::run::device_name(c.base.device())),
    );
    prov.insert(
        "method_config".into(),
        (method.new)()
            .config()
            .map_err(|e| format!("{}: method config: {e}", method.id))?,
    );
    prov.insert(
        "train".into(),
        serde_json::json!({
            "steps": c.cfg.stage.steps,
            "batch_size": c.cfg.stage.batch_size,
            "lr": c.cfg.stage.optim.lr,
            "lr_scale": c.cfg.stage.optim.lr_scale,
            "lora_r": c.cfg.lora.r,
        }),
    );
    let tasks: BTreeMap<String, u32> = name
        .order
        .tasks()
        .iter()
        .map(|t| (t.to_string(), cnext_datasets::TaskSpec::of(*t).version))
        .collect();
    prov.insert("task_versions".into(), serde_json::json!(tasks));
    Ok(Snapshot::new(
        name.profile,
        method.id,
        name.order.as_str(),
        &m,
        prov,
    ))
}

fn snapshot_path(name: &TestName) -> std::path::PathBuf {
    snapshot::dir(name.profile).join(format!(
        "{}.snap",
        snapshot::name(&name.method, name.order.as_str())
    ))
}

/// Runs one test.
pub fn run(name: &TestName, methods: &[MethodEntry]) -> Result<(), String> {
    let method = methods
        .iter()
        .find(|m| m.id == name.method)
        .ok_or_else(|| format!("{name}: no method `{}`", name.method))?;
    let tol = Tolerance::of(name.profile);
    let path = snapshot_path(name);
    match name.check {
        Check::Cell { stage, task } => {
            let c = chain(name.profile, method, name.order)?;
            let e = c.ensure(stage.number()).map_err(|e| e.to_string())?;
            let new = e
                .record
                .evals
                .get(&task)
                .ok_or_else(|| format!("{name}: stage entry has no {task}"))?
                .accuracy;
            let snap = snapshot::read(&path)?.ok_or_else(|| {
                format!(
                    "{name}: no snapshot {} (new value {new:.2}); run `{}` to record one, \
                     then `cargo insta review`",
                    path.display(),
                    TestName {
                        check: Check::Matrix,
                        ..name.clone()
                    }
                )
            })?;
            let old = snap.cell(stage.number(), task).ok_or_else(|| {
                format!("{name}: the snapshot {} has no such cell", path.display())
            })?;
            if new < old - tol.cell(task) {
                return Err(format!(
                    "{name}: {new:.2} is below the snapshot value {old:.2} by {:.2} \
                     (tolerance {:.2}; {})",
                    old - new,
                    tol.cell(task),
                    path.display()
                ));
            }
            Ok(())
        }
        Check::Matrix => {
            let new = snapshot_of(name, method)?;
            let old = snapshot::read(&path)?;
            let outcome = match &old {
                None => Err(format!("no snapshot {} yet", path.display())),
                Some(old) => snapshot::compare_matrix(&new, old, tol),
            };
            match outcome {
                Ok(mut notes) => {
                    // Same numbers from another config, base or version: the provenance the
                    // snapshot states is stale, so it is re-recorded like moved numbers.
                    if old.is_some_and(|o| o.provenance != new.provenance) {
                        notes.push("provenance changed".into());
                    }
                    if !notes.is_empty() {
                        eprintln!(
                            "{name}: within tolerance of {} ({}); `INSTA_UPDATE=always` records the new values",
                            path.display(),
                            notes.join(", ")
                        );
                        if std::env::var("INSTA_UPDATE").as_deref() == Ok("always") {
                            snapshot::record(&new);
                        }
                    }
                    Ok(())
                }
                Err(why) => {
                    // insta writes `.snap.new` for review (or the snapshot itself with
                    // INSTA_UPDATE=always); in CI it writes nothing and this fails.
                    if snapshot::record(&new) && std::env::var("CI").is_err() {
                        eprintln!("{name}: recorded {} ({why})", path.display());
                        return Ok(());
                    }
                    Err(format!("{name}: {why}"))
                }
            }
        }
        Check::RowsIdentical => {
            let m = matrix_of(name.profile, method, name.order)?;
            let rows = m.rows();
            for (j, row) in rows.iter().enumerate() {
                for (i, cell) in row.iter().enumerate().take(j + 1) {
                    if *cell != rows[i][i] {
                        return Err(format!(
                            "{name}: stage {} {}: {cell:?} differs from stage {} ({:?})",
                            j + 1,
                            m.tasks()[i],
                            i + 1,
                            rows[i][i]
                        ));
                    }
                }
            }
            Ok(())
        }
        Check::AtLeastLora => {
            let lora = methods
                .iter()
                .find(|m| m.id == "lora")
                .ok_or_else(|| format!("{name}: lora is not registered"))?;
            let ub = Metrics::of(&matrix_of(name.profile, method, name.order)?).avg_acc;
            let lo = Metrics::of(&matrix_of(name.profile, lora, name.order)?).avg_acc;
            match (ub, lo) {
                (Some(u), Some(l)) if u >= l => Ok(()),
                _ => Err(format!(
                    "{name}: upper_bound Avg.ACC {ub:?} is below lora's {lo:?}"
                )),
            }
        }
    }
}

/// The libtest-mimic trials of a scope.
pub fn trials(scope: Scope, methods: &'static [MethodEntry]) -> Vec<Trial> {
    names(scope, methods)
        .into_iter()
        .map(|(name, ignored)| {
            let s = name.to_string();
            Trial::test(s, move || run(&name, methods).map_err(Failed::from))
                .with_ignored_flag(ignored)
        })
        .collect()
}
