//! `cnext run`: the main job.

use crate::{base, cache_dir, ensure_data, opt2};
use anyhow::{Context, Result};
use cnext_core::Order;
use cnext_datasets::DataProfile;
use cnext_harness::clip::{train_tiny_clip, ClipTrainConfig, TinyClip};
use cnext_harness::device::DeviceSpec;
use cnext_harness::run::{run, MethodId, RunConfig};
use comfy_table::Table;
use std::path::{Path, PathBuf};

/// The CLIP-like scorer of a seed, trained once and cached.
pub(crate) fn ensure_clip(cache: &Path, profile: DataProfile, seed: u64) -> Result<TinyClip> {
    let cfg = match profile {
        DataProfile::Mini => ClipTrainConfig {
            seed,
            ..ClipTrainConfig::default()
        },
        // Plumbing only: a few steps, so the smoke suite stays fast.
        DataProfile::Smoke => ClipTrainConfig {
            seed,
            steps: 40,
            batch_size: 32,
            heldout: 32,
            ..ClipTrainConfig::default()
        },
    };
    let key = cnext_harness::assets::fnv_hex(&serde_json::to_string(&cfg)?);
    let dir = cache.join("clip").join(key);
    if let Ok(m) = TinyClip::load(&dir) {
        return Ok(m);
    }
    eprintln!("training the CLIP-like scorer ...");
    let (m, report) = train_tiny_clip(&cfg, true)?;
    eprintln!(
        "scorer trained in {:.1} s; held-out image->text R@1 = {:.3}",
        report.seconds, report.r1_heldout
    );
    m.save(&dir)
        .with_context(|| format!("saving the scorer to {}", dir.display()))?;
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    Ok(m)
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn run_cmd(
    method: MethodId,
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
    let data = ensure_data(&cache, profile, seed)?;
    let b = base(profile, seed, Some(cache.clone()), device)?;
    let clip = ensure_clip(&cache, profile, seed)?;
    let steps = steps.unwrap_or(match profile {
        DataProfile::Mini => 300,
        DataProfile::Smoke => 20,
    });
    let mut cfg = RunConfig::new(method, order, seed, steps);
    if profile == DataProfile::Smoke {
        cfg.stage.batch_size = 8;
    }
    let out = out.unwrap_or_else(|| {
        cache.join("runs").join(format!(
            "{}-{order}-{}-seed{seed}",
            method.as_str(),
            profile.as_str()
        ))
    });
    let setup = t0.elapsed().as_secs_f64();
    let r = run(&cfg, &b, &data, &clip, &out, true)?;
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
    // `+ 0.0`: an empty float sum is -0.0, which would print as "-0.0 s".
    let train_s: f64 = r.stages.iter().map(|s| s.seconds).sum::<f64>() + 0.0;
    let eval_s: f64 = r.eval_seconds.iter().sum::<f64>() + 0.0;
    println!(
        "wrote {} (setup {setup:.1} s, training {train_s:.1} s, evaluation {eval_s:.1} s, total {:.1} s)",
        out.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
