//! `cnext clip-score` and the Hugging Face CLIP behind `cnext score --clip-model`: the paper's
//! scorer (OpenAI CLIP ViT-B/32 from a `CLIPModel` folder) instead of the mini profile's tiny
//! CLIP-like model.
//!
//! One pair scores as SCORING.md's `clip_t` / `clip_i`: `100 * cos`, raw (a negative cosine
//! stays negative). torchmetrics' clamp at 0 applies to a mean over samples, so it is not
//! applied to a single pair; `cnext score` averages the raw scores as the task's accuracy.

use anyhow::{Context, Result};
use candle_core::DType;
use cnext_core::scoring::clip::{clip_i, clip_t};
use cnext_datasets::loader::load_image;
use cnext_harness::clip::HfClip;
use cnext_harness::device::DeviceSpec;
use std::path::{Path, PathBuf};

/// Arguments of `cnext clip-score`.
#[derive(clap::Args)]
pub struct ClipScoreArgs {
    /// A Hugging Face `CLIPModel` folder (config.json, model.safetensors, tokenizer.json,
    /// preprocessor_config.json), e.g. a download of openai/clip-vit-base-patch32.
    #[arg(long)]
    pub model: PathBuf,
    /// The (generated) image.
    #[arg(long)]
    pub image: PathBuf,
    /// CLIP-T: the caption to score the image against.
    #[arg(long, conflicts_with = "target", required_unless_present = "target")]
    pub text: Option<String>,
    /// CLIP-I: the target image to score the image against.
    #[arg(long)]
    pub target: Option<PathBuf>,
    /// Where the model runs: cpu, cuda or cuda:N (CUDA needs `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
    /// Print `{"score": x}` instead of a line of text.
    #[arg(long)]
    pub json: bool,
}

/// Loads a Hugging Face CLIP folder in f32 (the reference precision; a scorer's numbers should
/// not depend on the card).
pub fn load_hf_clip(dir: &Path, device: DeviceSpec) -> Result<HfClip> {
    let dev = device.open()?;
    HfClip::load(dir, &dev, DType::F32)
        .with_context(|| format!("{}: cannot load the CLIP model", dir.display()))
}

pub fn clip_score_cmd(a: ClipScoreArgs) -> Result<()> {
    // Images first: a wrong path fails fast, before the (large) model loads.
    let image = load_image(&a.image)?;
    let target = a.target.as_deref().map(load_image).transpose()?;
    let model = load_hf_clip(&a.model, a.device)?;
    let what = |e: &dyn std::fmt::Display| anyhow::anyhow!("{}: {e}", a.image.display());
    let (metric, score) = match (&a.text, &target) {
        (Some(text), _) => (
            "CLIP-T",
            clip_t(&model, Some(&image), text).map_err(|e| what(&e))?,
        ),
        (None, Some(t)) => (
            "CLIP-I",
            clip_i(&model, Some(&image), t).map_err(|e| what(&e))?,
        ),
        // clap requires one of the two.
        (None, None) => anyhow::bail!("give --text (CLIP-T) or --target (CLIP-I)"),
    };
    if a.json {
        println!("{}", serde_json::json!({ "score": score }));
    } else {
        println!("{metric} {score:.4}");
    }
    Ok(())
}
