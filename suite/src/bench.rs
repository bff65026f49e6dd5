//! `cnext bench pema`: one PEMA update at the paper's LoRA shapes (7B/13B: A is 8 x 5120 or
//! 8 x 13824, B is 5120 x 8), by the dense n x n system and by Woodbury, in f64 (alpha is of
//! order 1/lambda: f32 is too ill-conditioned for the dense reference). Prints both times,
//! their ratio and the largest relative difference of theta*.

use anyhow::Result;
use cnext_kernels::pema::{pema_alpha_dense, pema_alpha_woodbury, pema_update, AlphaPolicy, Mat};
use comfy_table::Table;
use std::time::Instant;

fn rand(m: usize, n: usize, seed: u64, scale: f64) -> Mat {
    let mut rng = cnext_core::rng::Rng::new(seed);
    Mat::new(
        m,
        n,
        (0..m * n)
            .map(|_| (rng.unit() * 2.0 - 1.0) * scale)
            .collect(),
    )
}

fn theta_star(theta: &Mat, star: &Mat, alpha: &Mat) -> Vec<f64> {
    alpha
        .v
        .iter()
        .zip(&star.v)
        .zip(&theta.v)
        .map(|((a, s), t)| a * s + (1.0 - a) * t)
        .collect()
}

/// Runs the benchmark; `max_dense` caps n for the dense n x n solve (its cost is n^3).
pub fn pema(max_dense: usize) -> Result<()> {
    let lambda = 1e-5;
    let mut table = Table::new();
    table.set_header([
        "matrix",
        "dense n x n (s)",
        "Woodbury m x m (s)",
        "dense / Woodbury",
        "max rel diff of theta*",
        "cheaper form",
    ]);
    for (name, m, n) in [
        ("LoRA-A 8 x 5120", 8, 5120),
        ("LoRA-A 8 x 13824", 8, 13824),
        ("LoRA-B 5120 x 8", 5120, 8),
    ] {
        let theta = rand(m, n, 1, 1e-2);
        let star = rand(m, n, 2, 1e-2);
        let g = rand(m, n, 3, 1e-3);
        let h = Mat::new(m, n, g.v.iter().map(|x| x * x).collect());
        let time = |f: &dyn Fn() -> Option<Mat>| -> Result<(f64, Mat)> {
            let t0 = Instant::now();
            let a = f().ok_or_else(|| anyhow::anyhow!("{name}: singular system"))?;
            Ok((t0.elapsed().as_secs_f64(), a))
        };
        // Woodbury solves an m x m system: the point for LoRA-A (m = rank); for LoRA-B (m =
        // d_out) it is the slow form, so it runs only where m is small enough.
        let (tw, aw) = if m < n || m <= 1024 {
            let (t, a) = time(&|| pema_alpha_woodbury(&theta, &star, &g, &h, lambda))?;
            (Some(t), Some(a))
        } else {
            (None, None)
        };
        let (td, ad) = if n <= max_dense {
            let (t, a) = time(&|| pema_alpha_dense(&theta, &star, &g, &h, lambda))?;
            (Some(t), Some(a))
        } else {
            (None, None)
        };
        let diff = match (&ad, &aw) {
            (Some(d), Some(w)) => {
                let sd = theta_star(&theta, &star, d);
                let sw = theta_star(&theta, &star, w);
                let scale = sd.iter().fold(0f64, |a, x| a.max(x.abs()));
                let worst = sd
                    .iter()
                    .zip(&sw)
                    .fold(0f64, |a, (x, y)| a.max((x - y).abs()));
                format!("{:.2e}", worst / scale)
            }
            _ => "-".into(),
        };
        eprintln!("{name}: dense {td:?} s, Woodbury {tw:?} s, max rel diff of theta* {diff}");
        let secs = |t: Option<f64>, size: usize| match t {
            Some(t) => format!("{t:.4}"),
            None => format!("not run ({size}^3 solve)"),
        };
        let ratio = match (td, tw) {
            (Some(d), Some(w)) => format!("{:.0}x", d / w.max(1e-9)),
            _ => "-".into(),
        };
        table.add_row([
            name.to_string(),
            secs(td, n),
            secs(tw, m),
            ratio,
            diff,
            if m < n { "Woodbury" } else { "dense" }.to_string(),
        ]);
        // What the clip policy does at this shape (the fraction of alpha outside [0, 1]).
        let (_, fell) = pema_update(&theta, &star, &g, &h, lambda, AlphaPolicy::Clip);
        eprintln!(
            "{name}: {:.1}% of alpha elements outside [0, 1] (lambda = {lambda:e})",
            100.0 * fell as f64 / (m * n) as f64
        );
    }
    println!("{table}");
    Ok(())
}
