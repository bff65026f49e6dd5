//! Supervised vision pretraining of the nano base, before its generic mix, in two phases whose
//! parts stay frozen afterwards. A real MLLM reads images through an encoder that arrives
//! pretrained and whose patch features name what each patch shows; trained only through the
//! language loss, ours never did, and its decoder never learned to pick out the patch a question
//! names ("Which cell holds the red circle?" got the same answer for either object of a scene).
//! 1. The patch encoder: through linear heads (thrown away after), every patch learns what it
//!    holds: a scene cell's colour, shape and part of its object, a cover cell's glyph, a
//!    sprite's class, its own row and column.
//! 2. The relevance gate ([`NanoBackbone::relevance_logits`]): for a phrase of attribute words
//!    among filler words, it learns which patches belong to the objects the phrase names.

use candle_core::{Device, Result, Tensor, Var};
use cnext_backbones::nano::backbone::NanoBackbone;
use cnext_backbones::Prompt;
use cnext_datasets::classes::{render_sample, CLASS_NAMES};
use cnext_datasets::covers::{Cover, COVER_COLS};
use cnext_datasets::rng::Rng;
use cnext_datasets::scene::{Scene, Shape, Size};
use cnext_harness::optim::AdamWConfig;
use cnext_harness::train::{self, FitConfig, LossFn, TrainError};
use image::RgbImage;
use std::collections::BTreeMap;

/// Characters a cover cell can show; label 0 is a cell without a glyph.
const GLYPHS: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";

/// Label groups, in order of their logits: (name, classes).
const HEADS: [(&str, usize); 7] = [
    ("color", 7),
    ("shape", 6),
    ("part", 6),
    ("glyph", 37),
    ("sprite", CLASS_NAMES.len()),
    ("row", 6),
    ("col", 6),
];

fn head_offset(name: &str) -> (usize, usize) {
    let mut off = 0;
    for (n, k) in HEADS {
        if n == name {
            return (off, k);
        }
        off += k;
    }
    (off, 0)
}

/// One kind of image with a label per patch for some of the heads.
#[derive(Default)]
struct Batch {
    images: Vec<RgbImage>,
    /// head name -> one label per patch, over all images in order.
    labels: BTreeMap<&'static str, Vec<u32>>,
}

fn grid_labels(batch: &mut Batch, side: u32) {
    for r in 0..side {
        for c in 0..side {
            batch.labels.entry("row").or_default().push(r);
            batch.labels.entry("col").or_default().push(c);
        }
    }
}

/// Colour, shape and part (small, or which quarter of a large object) of each of the 9 cells.
fn scenes(rng: &mut Rng, n: usize) -> Batch {
    let mut b = Batch::default();
    for _ in 0..n {
        let s = Scene::random(rng, 1, 4);
        let mut cells = [[0u32; 3]; 9];
        for o in &s.objects {
            for (r, c) in o.cells() {
                let part = match o.size {
                    Size::Small => 1,
                    Size::Large => 2 + 2 * (r - o.row) + (c - o.col),
                };
                let shape = Shape::ALL.iter().position(|x| *x == o.shape).unwrap_or(0) as u32;
                let color = cnext_datasets::scene::Color::ALL
                    .iter()
                    .position(|x| *x == o.color)
                    .unwrap_or(0) as u32;
                cells[(r * 3 + c) as usize] = [color + 1, shape + 1, part];
            }
        }
        for cell in cells {
            for (head, v) in ["color", "shape", "part"].into_iter().zip(cell) {
                b.labels.entry(head).or_default().push(v);
            }
        }
        grid_labels(&mut b, 3);
        b.images.push(s.render());
    }
    b
}

/// The glyph in each of a cover's 36 cells, where `Cover::text_rows` draws them.
fn covers(rng: &mut Rng, n: usize) -> Batch {
    let mut b = Batch::default();
    for _ in 0..n {
        let c = Cover::random(rng);
        let mut cells = vec![0u32; COVER_COLS * COVER_COLS];
        for (row, start, w) in c.text_rows() {
            let at = row as usize * COVER_COLS + start as usize;
            for (i, ch) in w.chars().enumerate() {
                cells[at + i] = GLYPHS.find(ch).map_or(0, |k| k as u32 + 1);
            }
        }
        b.labels.entry("glyph").or_default().extend(cells);
        grid_labels(&mut b, COVER_COLS as u32);
        b.images.push(c.render());
    }
    b
}

/// Every patch of a sprite is labelled with the sprite's class.
fn sprites(rng: &mut Rng, n: usize) -> Batch {
    let mut b = Batch::default();
    for _ in 0..n {
        let label = rng.below(CLASS_NAMES.len());
        b.images.push(render_sample(label, rng));
        b.labels
            .entry("sprite")
            .or_default()
            .extend([label as u32; 9]);
        grid_labels(&mut b, 3);
    }
    b
}

/// The harness's loop over `vars` for `steps` on the loss `batch_loss` draws for each step
/// (AdamW at 3e-3 without weight decay); returns the (first, last) step's loss.
fn fit(
    label: &str,
    vars: &BTreeMap<String, Var>,
    steps: usize,
    seed: u64,
    mut batch_loss: impl FnMut(&mut Rng) -> Result<Tensor>,
) -> std::result::Result<(f64, f64), TrainError> {
    let optim = AdamWConfig {
        lr: 3e-3,
        weight_decay: 0.0,
        ..Default::default()
    };
    let mut rng = Rng::derive(seed, label);
    let cfg = FitConfig {
        label,
        steps,
        optim: &optim,
        seed,
        progress: false,
        checkpoint: None,
    };
    let losses = train::fit(&cfg, vars, &mut LossFn(|_| batch_loss(&mut rng)), &mut ())?;
    let at = |i: Option<&f64>| i.copied().unwrap_or(f64::NAN);
    Ok((at(losses.first()), at(losses.last())))
}

/// Phase 1: trains `vars` (the patch encoder's) on patch labels; returns (first, last) loss.
pub fn pretrain_encoder(
    model: &NanoBackbone,
    vars: &BTreeMap<String, Var>,
    steps: usize,
    seed: u64,
    dev: &Device,
) -> std::result::Result<(f64, f64), TrainError> {
    let d = model.model.config().hidden_size;
    let classes: usize = HEADS.iter().map(|h| h.1).sum();
    let init = cnext_adapters::normal_values(seed, "vision.heads", classes * d, 0.02);
    let head = Tensor::from_vec(init, (classes, d), dev)
        .and_then(|t| Var::from_tensor(&t))
        .map_err(|source| TrainError::Candle {
            label: "vision pretraining".into(),
            step: 0,
            source,
        })?;
    let mut all = vars.clone();
    all.insert("vision.heads".into(), head.clone());
    fit("vision pretraining", &all, steps, seed, |rng| {
        let mut loss = Tensor::zeros((), candle_core::DType::F32, dev)?;
        for batch in [scenes(rng, 32), covers(rng, 8), sprites(rng, 16)] {
            let imgs: Vec<&RgbImage> = batch.images.iter().collect();
            let logits = model.model.patch_features(&imgs)?.matmul(&head.t()?)?;
            for (name, labels) in &batch.labels {
                let (off, k) = head_offset(name);
                let target = Tensor::new(labels.as_slice(), dev)?;
                let ce = candle_nn::loss::cross_entropy(&logits.narrow(1, off, k)?, &target)?;
                loss = (loss + ce)?;
            }
        }
        Ok(loss)
    })
}

/// Words that name an attribute the relevance gate is taught (anything else is filler).
fn attribute_words() -> Vec<&'static str> {
    let mut w: Vec<&str> = cnext_datasets::scene::Color::ALL
        .iter()
        .map(|c| c.name())
        .collect();
    w.extend(Shape::ALL.iter().map(|s| s.name()));
    w.extend(["small", "large"]);
    w
}

/// Scenes, each with a phrase of attribute words among filler words and, per patch, whether the
/// patch belongs to an object that has every attribute named (none named: every object).
fn phrases(rng: &mut Rng, n: usize, filler: &[String]) -> (Vec<Prompt>, Vec<f32>) {
    let (mut prompts, mut targets) = (vec![], vec![]);
    for _ in 0..n {
        let s = Scene::random(rng, 1, 4);
        let o = *rng.pick(&s.objects);
        // Sometimes a colour and shape drawn at random, so absent things light up nothing.
        let (color, shape) = if rng.chance(0.2) {
            (
                *rng.pick(&cnext_datasets::scene::Color::ALL),
                *rng.pick(&Shape::ALL),
            )
        } else {
            (o.color, o.shape)
        };
        let (c, sh, sz) = match rng.below(6) {
            0 => (true, true, false),
            1 => (false, true, false),
            2 => (true, false, false),
            3 => (true, true, true),
            4 => (false, true, true),
            _ => (false, false, false),
        };
        let mut words: Vec<String> = (0..rng.below(16))
            .map(|_| rng.pick(filler).trim().to_string())
            .collect();
        if c {
            words.push(color.name().into());
        }
        if sh {
            words.push(shape.name().into());
        }
        if sz {
            words.push(o.size.name().into());
        }
        rng.shuffle(&mut words);
        let mut cells = [0f32; 9];
        for p in &s.objects {
            let hit =
                (!c || p.color == color) && (!sh || p.shape == shape) && (!sz || p.size == o.size);
            if hit {
                for (r, col) in p.cells() {
                    cells[(r * 3 + col) as usize] = 1.0;
                }
            }
        }
        targets.extend(cells);
        prompts.push(Prompt {
            image: Some(s.render()),
            text: words.join(" "),
        });
    }
    (prompts, targets)
}

/// Phase 2: trains the relevance gate (`vars`: its word table, key and query) to light up the
/// patches of the objects a phrase names; `words` are the vocabulary's (fillers are drawn from
/// them). Returns (first, last) loss.
pub fn pretrain_relevance(
    model: &NanoBackbone,
    vars: &BTreeMap<String, Var>,
    words: &[String],
    steps: usize,
    seed: u64,
    dev: &Device,
) -> std::result::Result<(f64, f64), TrainError> {
    let attrs = attribute_words();
    let filler: Vec<String> = words
        .iter()
        .filter(|w| {
            let t = w.trim().to_ascii_lowercase();
            !attrs.iter().any(|a| t.starts_with(a))
        })
        .cloned()
        .collect();
    fit("relevance pretraining", vars, steps, seed, |rng| {
        let (prompts, targets) = phrases(rng, 64, &filler);
        let x = model.relevance_logits(&prompts)?;
        let y = Tensor::new(targets.as_slice(), dev)?;
        // Binary cross-entropy with logits: softplus(x) - y x, softplus stable for any x.
        let softplus = (x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
        (softplus - (y * &x)?)?.mean_all()
    })
}

/// Both phases on `model`, each for `cfg.vision_steps`; the parts they train leave `vars`
/// (frozen while the mix trains the rest). The gate's flag stays: the mix learns its direction.
pub fn pretrain(
    model: &NanoBackbone,
    vars: &mut BTreeMap<String, Var>,
    words: &[String],
    cfg: &super::BaseConfig,
    dev: &Device,
    progress: bool,
) -> std::result::Result<(), TrainError> {
    let take = |vars: &mut BTreeMap<String, Var>, part: &dyn Fn(&str) -> bool| {
        let (taken, rest) = std::mem::take(vars).into_iter().partition(|(k, _)| part(k));
        *vars = rest;
        taken
    };
    let encoder = take(vars, &|k| k.starts_with("vision."));
    let gate = take(vars, &|k| {
        k.starts_with("relevance.") && k != "relevance.flag"
    });
    let (steps, seed) = (cfg.vision_steps, cfg.seed);
    let report = |name: &str, t: std::time::Instant, (first, last): (f64, f64)| {
        if progress {
            let secs = t.elapsed().as_secs_f64();
            eprintln!("{name}: {steps} steps, loss {first:.3} -> {last:.3} ({secs:.1}s)");
        }
    };
    let t = std::time::Instant::now();
    report(
        "patch encoder",
        t,
        pretrain_encoder(model, &encoder, steps, seed, dev)?,
    );
    let t = std::time::Instant::now();
    let losses = pretrain_relevance(model, &gate, words, steps, seed, dev)?;
    report("relevance gate", t, losses);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use cnext_datasets::scene::{Color, WHITE};

    #[test]
    fn scene_labels_name_the_pixels_of_each_cell() {
        let b = scenes(&mut Rng::new(3), 40);
        let (color, part) = (&b.labels["color"], &b.labels["part"]);
        for (i, img) in b.images.iter().enumerate() {
            for cell in 0..9u32 {
                let k = i * 9 + cell as usize;
                let (x, y) = ((cell % 3) * 8, (cell / 3) * 8);
                if part[k] == 0 {
                    // An empty cell is white, every pixel.
                    assert!((0..64).all(|p| *img.get_pixel(x + p % 8, y + p / 8) == WHITE));
                } else if part[k] == 1 {
                    // Every shape covers the centre of its cell.
                    let want = Color::ALL[color[k] as usize - 1].rgb();
                    assert_eq!(*img.get_pixel(x + 4, y + 4), want, "image {i} cell {cell}");
                }
            }
        }
        assert_eq!(b.labels["row"].len(), 40 * 9);
    }

    #[test]
    fn cover_labels_spell_the_rows_as_rendered() {
        let mut rng = Rng::new(4);
        let b = covers(&mut rng.clone(), 10);
        for i in 0..10 {
            let c = Cover::random(&mut rng);
            let row = |r: usize| -> String {
                let cells = &b.labels["glyph"][(i * 36 + r * 6)..(i * 36 + r * 6 + 6)];
                cells
                    .iter()
                    .filter(|&&g| g > 0)
                    .map(|&g| GLYPHS.as_bytes()[g as usize - 1] as char)
                    .collect()
            };
            assert_eq!(row(0), c.title[0]);
            assert_eq!(row(4), c.author);
            assert_eq!(row(5), c.year.to_string());
            assert_eq!(b.images[i], c.render());
        }
    }

    #[test]
    fn phrases_light_the_objects_with_every_named_colour() {
        let filler = vec![" please".to_string(), " the".to_string()];
        let (prompts, targets) = phrases(&mut Rng::new(5), 300, &filler);
        let mut lit = 0;
        for (i, p) in prompts.iter().enumerate() {
            let img = p.image.as_ref().expect("scene");
            let named = Color::ALL
                .iter()
                .find(|c| p.text.split(' ').any(|w| w == c.name()));
            for cell in 0..9u32 {
                let centre = *img.get_pixel((cell % 3) * 8 + 4, (cell / 3) * 8 + 4);
                let on = targets[i * 9 + cell as usize] == 1.0;
                // Large shapes may leave a quarter's centre white; check the cells they paint.
                if on && centre != WHITE {
                    lit += 1;
                    if let Some(c) = named {
                        assert_eq!(centre, c.rgb(), "{:?} cell {cell}", p.text);
                    }
                }
            }
        }
        assert!(lit > 300, "only {lit} lit cells");
    }
}
