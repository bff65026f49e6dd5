//! `cnext infer`: generate from a Hugging Face model directory by hand. A Janus directory
//! (`model_type` janus, Wu et al. 2024 / Chen et al. 2025, Janus and Janus-Pro) answers in text
//! (greedy) or draws an image (VQ codes with classifier-free guidance, decoded to a PNG); a
//! `LlamaForCausalLM` directory (`model_type` llama) runs the language model alone, text only.
//! `--adapter` loads a PEFT LoRA directory into the language model first.

use anyhow::{bail, Context, Result};
use cnext_adapters::AdapterPlan;
use cnext_backbones::janus::{CausalLm, DType, JanusBackbone, LlamaConfig, Members, TextTokenizer};
use cnext_backbones::peft::PeftAdapter;
use cnext_harness::device::DeviceSpec;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputArg {
    Text,
    Image,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DTypeArg {
    F32,
    Bf16,
}

#[derive(Debug, clap::Args)]
pub struct InferArgs {
    /// A Hugging Face model directory (Janus or LlamaForCausalLM).
    #[arg(long)]
    model: PathBuf,
    /// A PEFT LoRA adapter directory (adapter_config.json, adapter_model.safetensors).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// The prompt text, as HF's processor takes it: for Janus each `<image_placeholder>` marks
    /// where `--image` goes (expanded to BOI, the image tokens, EOI; put in front when the
    /// prompt has none); BOS is the tokenizer's.
    #[arg(
        long,
        required_unless_present = "prompt_ids",
        conflicts_with = "prompt_ids"
    )]
    prompt: Option<String>,
    /// The prompt as token ids, comma-separated (for a directory without a tokenizer).
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    /// An image the prompt is about (Janus only).
    #[arg(long)]
    image: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "text")]
    output: OutputArg,
    /// Largest number of generated text tokens (images always get the model's code count).
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Where the generated image is written (PNG); required with `--output image`.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print one JSON object: {"token_ids": [...], "text": ...} or {"token_ids", "image"}.
    #[arg(long)]
    json: bool,
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// Weight dtype (bf16 only on a GPU; the CPU computes in f32).
    #[arg(long, value_enum, default_value = "f32")]
    dtype: DTypeArg,
}

/// `model_type` of `dir/config.json`, naming the file on any error.
fn model_type(dir: &Path) -> Result<String> {
    if !dir.is_dir() {
        bail!("{}: no such model directory", dir.display());
    }
    let path = dir.join("config.json");
    let body = std::fs::read_to_string(&path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&body).with_context(|| format!("{}: invalid JSON", path.display()))?;
    match v.get("model_type").and_then(|m| m.as_str()) {
        Some(m) => Ok(m.to_string()),
        None => bail!("{}: no model_type", path.display()),
    }
}

/// The adapter (if any) and the plan a model must be built with to take it.
fn adapter_plan(adapter: &Option<PathBuf>) -> Result<(Option<PeftAdapter>, AdapterPlan)> {
    match adapter {
        Some(dir) => {
            let a = PeftAdapter::read(dir, "default")?;
            let plan = a.plan(0);
            Ok((Some(a), plan))
        }
        None => Ok((None, AdapterPlan::none())),
    }
}

fn print_text(json: bool, ids: &[u32], text: Option<String>) {
    if json {
        println!("{}", serde_json::json!({ "token_ids": ids, "text": text }));
    } else {
        match text {
            Some(t) => println!("{t}"),
            None => println!("{ids:?}"),
        }
    }
}

pub fn run(args: InferArgs) -> Result<()> {
    let kind = model_type(&args.model)?;
    let device = args.device.open()?;
    let dtype = match args.dtype {
        DTypeArg::F32 => DType::F32,
        DTypeArg::Bf16 => DType::BF16,
    };
    let (adapter, plan) = adapter_plan(&args.adapter)?;
    match kind.as_str() {
        "janus" => janus(&args, adapter, plan, &device, dtype),
        "llama" => llama(&args, adapter, plan, &device, dtype),
        other => bail!(
            "{}: model_type {other:?} is not supported (janus or llama)",
            args.model.join("config.json").display()
        ),
    }
}

fn janus(
    args: &InferArgs,
    adapter: Option<PeftAdapter>,
    plan: AdapterPlan,
    device: &cnext_backbones::janus::Device,
    dtype: DType,
) -> Result<()> {
    let Some(text) = &args.prompt else {
        bail!("a Janus model takes --prompt (its processor lays the prompt out)");
    };
    let image_mode = args.output == OutputArg::Image;
    if image_mode && args.out.is_none() {
        bail!("--output image needs --out PNG");
    }
    // Read the image before loading weights: a bad path fails fast and names the file.
    let images = match &args.image {
        Some(p) => vec![image::open(p)
            .with_context(|| format!("{}: cannot read the image", p.display()))?
            .to_rgb8()],
        None => vec![],
    };
    let bb = JanusBackbone::load(&args.model, plan, device, dtype)?;
    if let Some(a) = &adapter {
        a.apply(&bb.plan)?;
        // Connectors trained in full (modules_to_save) are trainable variables of the model.
        a.apply_saved(&cnext_backbones::Backbone::trainable(&bb))?;
    }
    // As HF JanusProcessor the text is taken verbatim, so each image needs its placeholder; a
    // prompt with none and one image gets it in front (Janus's own layout, image first).
    let placeholder = &bb.tokenizer.image.text;
    let n_ph = text.matches(placeholder.as_str()).count();
    let text = if n_ph == 0 && images.len() == 1 {
        format!("{placeholder}\n{text}")
    } else if n_ph != images.len() {
        bail!(
            "the prompt has {n_ph} {placeholder} but {} image(s) were given \
             (write e.g. \"{placeholder}\\n{{question}}\" with --image)",
            images.len()
        );
    } else {
        text.clone()
    };
    let prompt = bb.prepare_raw(&text, &images, image_mode)?;
    let prompt = std::slice::from_ref(&prompt);
    let members = Members::current();
    match (args.output, &args.out) {
        (OutputArg::Image, Some(out)) => {
            let codes = first(bb.image_code_ids_prepared(prompt, &members)?)?;
            let img = first(bb.decode_images(std::slice::from_ref(&codes))?)?;
            write_png(out, &img)?;
            if args.json {
                let path = out.display().to_string();
                println!(
                    "{}",
                    serde_json::json!({ "token_ids": codes, "image": path })
                );
            } else {
                println!("wrote {}", out.display());
            }
        }
        _ => {
            let ids = first(bb.text_ids_prepared(prompt, args.max_new_tokens, &members)?)?;
            let text = bb.tokenizer.decode(&ids)?;
            print_text(args.json, &ids, Some(text));
        }
    }
    Ok(())
}

/// The one row of a batch of one.
fn first<T>(v: Vec<T>) -> Result<T> {
    v.into_iter()
        .next()
        .context("generation returned no row for the prompt")
}

/// PNG-encodes `img` in memory, then writes it through a temp file in the same folder and a
/// rename, so `path` is never left half-written (the temp file is removed on failure).
fn write_png(path: &Path, img: &image::RgbImage) -> Result<()> {
    let mut bytes = std::io::Cursor::new(Vec::new());
    img.write_to(&mut bytes, image::ImageFormat::Png)
        .with_context(|| format!("{}: cannot encode the PNG", path.display()))?;
    if path.file_name().is_none() {
        anyhow::bail!("{}: --out needs a file name", path.display());
    }
    cnext_core::fsx::write_atomic(path, bytes.get_ref())
        .with_context(|| format!("{}: cannot write the image", path.display()))
}

fn llama(
    args: &InferArgs,
    adapter: Option<PeftAdapter>,
    plan: AdapterPlan,
    device: &cnext_backbones::janus::Device,
    dtype: DType,
) -> Result<()> {
    if args.output == OutputArg::Image || args.image.is_some() {
        bail!(
            "{}: a LlamaForCausalLM reads and writes text only",
            args.model.display()
        );
    }
    let cfg = LlamaConfig::from_file(&args.model.join("config.json"))?;
    let lm = CausalLm::load(&args.model, &plan, device, dtype)?;
    if let Some(a) = &adapter {
        a.apply(&plan)?;
        // A bare language model trains nothing in full: any modules_to_save is an error.
        a.apply_saved(&std::collections::BTreeMap::new())?;
    }
    let tok = match (&args.prompt, args.model.join("tokenizer.json").is_file()) {
        (Some(_), _) | (None, true) => Some(TextTokenizer::load(&args.model)?),
        (None, false) => None,
    };
    let ids = match (&args.prompt, &args.prompt_ids, &tok) {
        (Some(p), _, Some(t)) => t.encode(p)?,
        (None, Some(ids), _) => ids.clone(),
        _ => bail!("give --prompt or --prompt-ids"),
    };
    if ids.is_empty() {
        bail!("the prompt has no tokens");
    }
    let mut eos = cfg.eos_ids();
    let gen = cnext_backbones::janus::GenerationConfig::from_dir(&args.model)?;
    if let Some(e) = &gen.eos_token_id {
        eos.extend(e.ids());
    }
    let (mut out, _) = lm.generate_greedy(&[ids], args.max_new_tokens, &eos)?;
    let new = out.remove(0);
    let text = match &tok {
        Some(t) => Some(t.decode(&new)?),
        None => None,
    };
    print_text(args.json, &new, text);
    Ok(())
}
