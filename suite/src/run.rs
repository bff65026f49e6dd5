//! `cnext run`: the main job.

use crate::opt2;
use anyhow::Result;
use cnext_core::Order;
use cnext_datasets::DataProfile;
use cnext_harness::device::DeviceSpec;
use cnext_harness::method::MethodEntry;
use cnext_harness::run::run;
use cnext_suite::setup::{cache_dir, run_config, Bench};
use comfy_table::Table;
use std::path::PathBuf;

#[allow(clippy::too_many_arguments)]
pub(crate) fn run_cmd(
    method: &MethodEntry,
    order: Order,
    profile: DataProfile,
    seed: u64,
    steps: Option<usize>,
    out: Option<PathBuf>,
    cache: Option<PathBuf>,
    device: DeviceSpec,
) -> Result<()> {
    let t0 = std::time::Instant::now();
    let cache = cache_dir(cache);
    let bench = Bench::open(profile, seed, cache.clone(), device)?;
    let cfg = run_config(profile, order, seed, steps);
    let out = out.unwrap_or_else(|| {
        cache.join("runs").join(format!(
            "{}-{order}-{}-seed{seed}",
            method.id,
            profile.as_str()
        ))
    });
    let mut chain = bench.chain(&cfg, method)?;
    chain.progress = true;
    let setup = t0.elapsed().as_secs_f64();
    let r = run(&chain, &out)?;
    let mut table = Table::new();
    let mut header = vec!["stage".to_string()];
    header.extend(r.matrix.tasks().iter().map(|t| t.to_string()));
    table.set_header(header);
    for (j, row) in r.matrix.rows().iter().enumerate() {
        let mut cells = vec![if r.matrix.is_joint() {
            "joint".into()
        } else {
            (j + 1).to_string()
        }];
        cells.extend(row.iter().map(|c| opt2(*c)));
        table.add_row(cells);
    }
    println!("{table}");
    let m = &r.metrics;
    let mut t2 = Table::new();
    t2.set_header([
        "Avg.ACC",
        "Forgetting",
        "New.ACC",
        "BWT",
        "MAA",
        "text avg",
        "image avg",
    ]);
    t2.add_row([
        opt2(m.avg_acc),
        opt2(m.forgetting),
        opt2(m.new_acc),
        opt2(m.bwt),
        opt2(m.maa),
        opt2(m.text_avg),
        opt2(m.image_avg),
    ]);
    println!("{t2}");
    let keys: std::collections::BTreeSet<&String> =
        r.diagnostics.iter().flat_map(|d| d.keys()).collect();
    if !keys.is_empty() {
        let mut t3 = Table::new();
        let mut header = vec!["stage".to_string()];
        header.extend(keys.iter().map(|k| k.to_string()));
        t3.set_header(header);
        for (j, d) in r.diagnostics.iter().enumerate() {
            let mut row = vec![(j + 1).to_string()];
            row.extend(
                keys.iter()
                    .map(|k| d.get(*k).map_or("-".into(), |v| format!("{v:.4}"))),
            );
            t3.add_row(row);
        }
        println!("{} diagnostics\n{t3}", r.method);
    }
    // `+ 0.0`: an empty float sum is -0.0, which would print as "-0.0 s".
    let train_s: f64 = r.stages.iter().flatten().map(|s| s.seconds).sum::<f64>() + 0.0;
    let cached = r.trained_now.iter().filter(|t| !**t).count();
    let eval_s: f64 = r.eval_seconds.iter().sum::<f64>() + 0.0;
    println!(
        "wrote {} ({cached} of {} stages from the cache; setup {setup:.1} s; the stages took {train_s:.1} s to train and {eval_s:.1} s to evaluate when built; total {:.1} s)",
        out.display(),
        r.trained_now.len(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
