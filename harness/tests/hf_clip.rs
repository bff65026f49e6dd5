//! The Hugging Face CLIP scorer against the `tiny_clip` fixture: a random `CLIPModel` saved by
//! transformers 5.23 with the numbers transformers and torchmetrics computed from it
//! (`reference.json`; tolerances from the fixtures README). Then the error paths.

use candle_core::{Device, Tensor};
use cnext_core::scoring::clip::{clip_i, clip_t, cosine, ClipModel};
use cnext_harness::clip::{clip_score, HfClip, HfClipError};
use image::RgbImage;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// `<repo root>/../shared/fixtures/tiny_clip`, or `$CNEXT_FIXTURES/tiny_clip`.
fn fixture_dir() -> PathBuf {
    let root = match std::env::var_os("CNEXT_FIXTURES") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/fixtures"
        )),
    };
    let dir = root.join("tiny_clip");
    assert!(
        dir.join("reference.json").is_file(),
        "CLIP fixture not found at {} (set CNEXT_FIXTURES to the shared fixtures folder)",
        dir.display()
    );
    dir
}

struct Fixture {
    dir: PathBuf,
    r: Value,
}

impl Fixture {
    fn load() -> Self {
        let dir = fixture_dir();
        let text = std::fs::read_to_string(dir.join("reference.json")).unwrap();
        Fixture {
            r: serde_json::from_str(&text).unwrap(),
            dir,
        }
    }

    /// A stored tensor: its shape and its values (9 significant digits: f64 -> f32 is exact).
    fn tensor(&self, key: &str) -> (Vec<usize>, Vec<f64>) {
        let t = &self.r[key];
        let shape = t["shape"]
            .as_array()
            .unwrap_or_else(|| panic!("reference.json has no tensor {key}"))
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        let data = t["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        (shape, data)
    }

    fn rows_f32(&self, key: &str) -> Vec<Vec<f32>> {
        let (shape, data) = self.tensor(key);
        data.chunks(shape[1])
            .map(|r| r.iter().map(|&x| x as f32).collect())
            .collect()
    }

    fn captions(&self) -> Vec<String> {
        self.r["captions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap().to_string())
            .collect()
    }

    fn images(&self) -> Vec<RgbImage> {
        self.r["image_files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                image::open(self.dir.join(f.as_str().unwrap()))
                    .unwrap()
                    .to_rgb8()
            })
            .collect()
    }

    fn model(&self) -> HfClip {
        HfClip::load_cpu(&self.dir).unwrap()
    }
}

/// Largest absolute difference, asserting equal lengths.
fn max_diff(got: &[Vec<f32>], want: &[Vec<f32>]) -> f64 {
    assert_eq!(got.len(), want.len());
    let mut m = 0.0f64;
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g.len(), w.len());
        for (a, b) in g.iter().zip(w) {
            m = m.max((f64::from(*a) - f64::from(*b)).abs());
        }
    }
    m
}

fn l2_normalized(rows: &[Vec<f32>]) -> Vec<Vec<f32>> {
    rows.iter()
        .map(|r| {
            let n = r.iter().map(|x| x * x).sum::<f32>().sqrt();
            r.iter().map(|x| x / n).collect()
        })
        .collect()
}

/// `100 * cos` between every row of `a` and every row of `b`.
fn cos100(a: &[Vec<f32>], b: &[Vec<f32>]) -> Vec<Vec<f32>> {
    a.iter()
        .map(|x| {
            b.iter()
                .map(|y| (100.0 * cosine(x, y).unwrap()) as f32)
                .collect()
        })
        .collect()
}

#[test]
fn token_ids_and_attention_mask_are_identical() {
    let f = Fixture::load();
    let m = f.model();
    let caps = f.captions();
    let refs: Vec<&str> = caps.iter().map(String::as_str).collect();
    let batch = m.tokenize(&refs).unwrap();
    let (shape, ids) = f.tensor("input_ids");
    let (_, mask) = f.tensor("attention_mask");
    let flat =
        |rows: &[Vec<u32>]| -> Vec<f64> { rows.iter().flatten().map(|&x| x.into()).collect() };
    assert_eq!(batch.input_ids.len(), shape[0]);
    assert_eq!(batch.input_ids[0].len(), shape[1]);
    assert_eq!(flat(&batch.input_ids), ids);
    assert_eq!(flat(&batch.attention_mask), mask);
    assert_eq!(
        m.pad_id(),
        f.r["tokenizer"]["pad_token_id"].as_u64().unwrap() as u32
    );
    // One caption alone is not padded: its ids are the reference's unpadded ones.
    for (i, cap) in refs.iter().enumerate() {
        let one = m.tokenize(&[cap]).unwrap();
        let want: Vec<u32> = f.r["input_ids_unpadded"][i]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(one.input_ids[0], want, "caption {i}");
    }
}

#[test]
fn pixel_values_match_the_torchvision_processor() {
    let f = Fixture::load();
    let m = f.model();
    let (shape, want) = f.tensor("pixel_values");
    let per = shape[1] * shape[2] * shape[3];
    let mut worst = 0.0f64;
    for (i, img) in f.images().iter().enumerate() {
        let got = m.preprocess(img).unwrap();
        assert_eq!(got.len(), per);
        for (a, b) in got.iter().zip(&want[i * per..(i + 1) * per]) {
            worst = worst.max((f64::from(*a) - f64::from(*b as f32)).abs());
        }
    }
    eprintln!("pixel_values max abs diff: {worst:e}");
    assert!(worst <= 1e-6, "pixel_values max abs diff {worst}");
}

#[test]
fn embeddings_match_from_reference_and_own_pixel_values() {
    let f = Fixture::load();
    let m = f.model();
    let (shape, pv) = f.tensor("pixel_values");
    let pv: Vec<f32> = pv.iter().map(|&x| x as f32).collect();
    let pv = Tensor::from_vec(pv, (shape[0], shape[1], shape[2], shape[3]), &Device::Cpu).unwrap();
    let want_img = f.rows_f32("image_embeds");
    let want_txt = f.rows_f32("text_embeds");

    // The model alone, given transformers' pixel values.
    let img = m.image_features(&pv).unwrap().to_vec2::<f32>().unwrap();
    let d = max_diff(&img, &want_img);
    eprintln!("image_embeds (reference pixel_values) max abs diff: {d:e}");
    assert!(d <= 1e-4, "image_embeds {d}");
    let d = max_diff(&l2_normalized(&img), &f.rows_f32("image_embeds_normalized"));
    eprintln!("image_embeds_normalized (reference pixel_values) max abs diff: {d:e}");
    assert!(d <= 1e-4, "image_embeds_normalized {d}");

    // The whole path from the PNG files.
    let img = m.embed_images(&f.images()).unwrap();
    let d = max_diff(&img, &want_img);
    eprintln!("image_embeds (own preprocessing) max abs diff: {d:e}");
    assert!(d <= 1e-4, "image_embeds {d}");
    let d = max_diff(&l2_normalized(&img), &f.rows_f32("image_embeds_normalized"));
    eprintln!("image_embeds_normalized (own preprocessing) max abs diff: {d:e}");
    assert!(d <= 1e-4, "image_embeds_normalized {d}");

    let caps = f.captions();
    let refs: Vec<&str> = caps.iter().map(String::as_str).collect();
    let txt = m.embed_texts(&refs).unwrap();
    let d = max_diff(&txt, &want_txt);
    eprintln!("text_embeds max abs diff: {d:e}");
    assert!(d <= 1e-4, "text_embeds {d}");
    let d = max_diff(&l2_normalized(&txt), &f.rows_f32("text_embeds_normalized"));
    eprintln!("text_embeds_normalized max abs diff: {d:e}");
    assert!(d <= 1e-4, "text_embeds_normalized {d}");
    // Alone (no padding) the text embeddings agree as well.
    for (i, cap) in refs.iter().enumerate() {
        let one = m.embed_text(cap).unwrap();
        let d = max_diff(&[one], &want_txt[i..=i]);
        assert!(d <= 1e-4, "caption {i} alone: {d}");
    }
}

#[test]
fn similarity_matrices_logits_and_clip_score_match() {
    let f = Fixture::load();
    let m = f.model();
    let caps = f.captions();
    let refs: Vec<&str> = caps.iter().map(String::as_str).collect();
    let images = f.images();
    let img = m.embed_images(&images).unwrap();
    let txt = m.embed_texts(&refs).unwrap();
    for (key, got) in [
        ("cos100_image_text", cos100(&img, &txt)),
        ("cos100_image_image", cos100(&img, &img)),
        ("cos100_text_text", cos100(&txt, &txt)),
    ] {
        let d = max_diff(&got, &f.rows_f32(key));
        eprintln!("{key} max abs diff: {d:e}");
        assert!(d <= 1e-3, "{key} {d}");
    }
    let want_scale = f.r["logit_scale"].as_f64().unwrap();
    assert!((f64::from(m.logit_scale()) - want_scale).abs() < 1e-6);
    let scale = f64::from(m.logit_scale()).exp();
    let logits: Vec<Vec<f32>> = img
        .iter()
        .map(|x| {
            txt.iter()
                .map(|y| (scale * cosine(x, y).unwrap()) as f32)
                .collect()
        })
        .collect();
    let d = max_diff(&logits, &f.rows_f32("logits_per_image"));
    eprintln!("logits_per_image max abs diff: {d:e}");
    assert!(d <= 1e-3, "logits_per_image {d}");

    let s = clip_score(&m, &images, &refs).unwrap();
    let want = f.r["torchmetrics_CLIPScore"].as_f64().unwrap();
    eprintln!(
        "CLIPScore {} vs {want}: diff {:e}",
        s.score,
        (s.score - want).abs()
    );
    assert!(
        (s.score - want).abs() <= 1e-3,
        "CLIPScore {} vs {want}",
        s.score
    );
    let (_, per) = f.tensor("clip_score_per_sample");
    assert_eq!(s.per_sample.len(), per.len());
    // One sample is negative: the clamp applies to the mean only.
    assert!(per.iter().any(|&p| p < 0.0));
    for (i, (got, want)) in s.per_sample.iter().zip(&per).enumerate() {
        assert!((got - want).abs() <= 1e-3, "sample {i}: {got} vs {want}");
        // The project's clip_t (raw cosine, x100) is the same per-sample number.
        let t = clip_t(&m, Some(&images[i]), refs[i]).unwrap();
        assert!((t - want).abs() <= 1e-3, "clip_t {i}: {t} vs {want}");
    }
    let ii = f.rows_f32("cos100_image_image");
    let c = clip_i(&m, Some(&images[0]), &images[1]).unwrap();
    assert!((c - f64::from(ii[0][1])).abs() <= 1e-3, "clip_i {c}");
}

/// A copy of the fixture's model files in a temp folder, for breaking one of them.
fn copy_fixture() -> tempfile::TempDir {
    let src = fixture_dir();
    let tmp = tempfile::tempdir().unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "preprocessor_config.json",
    ] {
        std::fs::copy(src.join(f), tmp.path().join(f)).unwrap();
    }
    tmp
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut Value)) {
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, serde_json::to_string(&v).unwrap()).unwrap();
}

fn load_err(dir: &Path) -> String {
    let e = HfClip::load_cpu(dir).unwrap_err();
    e.to_string()
}

#[test]
fn bad_folders_give_errors_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("no-such-model");
    let e = HfClip::load_cpu(&missing).unwrap_err();
    assert!(matches!(e, HfClipError::NoModelDir { .. }));
    assert!(e.to_string().contains("no-such-model"), "{e}");

    let d = copy_fixture();
    let cfg = d.path().join("config.json");
    edit_json(&cfg, |v| v["model_type"] = "siglip".into());
    let e = load_err(d.path());
    assert!(
        e.contains("config.json") && e.contains("model_type") && e.contains("siglip"),
        "{e}"
    );

    let d = copy_fixture();
    let cfg = d.path().join("config.json");
    edit_json(&cfg, |v| v["vision_config"]["hidden_act"] = "gelu".into());
    let e = load_err(d.path());
    assert!(
        e.contains("vision_config.hidden_act") && e.contains("gelu"),
        "{e}"
    );

    let d = copy_fixture();
    let cfg = d.path().join("config.json");
    edit_json(&cfg, |v| {
        v["text_config"]
            .as_object_mut()
            .unwrap()
            .remove("hidden_size");
    });
    let e = load_err(d.path());
    assert!(
        e.contains("config.json") && e.contains("text_config.hidden_size"),
        "{e}"
    );

    let d = copy_fixture();
    std::fs::write(d.path().join("tokenizer.json"), "{\"model\": 3}").unwrap();
    let e = load_err(d.path());
    assert!(
        e.contains("tokenizer.json") && e.contains("bad tokenizer"),
        "{e}"
    );

    let d = copy_fixture();
    std::fs::remove_file(d.path().join("preprocessor_config.json")).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("preprocessor_config.json"), "{e}");

    let d = copy_fixture();
    edit_json(&d.path().join("preprocessor_config.json"), |v| {
        v["crop_size"] = serde_json::json!({"height": 30, "width": 30});
    });
    let e = load_err(d.path());
    assert!(
        e.contains("preprocessor_config.json") && e.contains("30x30"),
        "{e}"
    );

    // A tensor missing from the weights.
    let d = copy_fixture();
    let st = d.path().join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&st, &Device::Cpu).unwrap();
    tensors.remove("text_projection.weight").unwrap();
    candle_core::safetensors::save(&tensors, &st).unwrap();
    let e = HfClip::load_cpu(d.path()).unwrap_err();
    assert!(matches!(e, HfClipError::MissingTensor { .. }), "{e}");
    let e = e.to_string();
    assert!(
        e.contains("model.safetensors") && e.contains("text_projection.weight"),
        "{e}"
    );
    // And one candle would have made up.
    tensors.remove("logit_scale").unwrap();
    candle_core::safetensors::save(&tensors, &st).unwrap();
    let e = load_err(d.path());
    assert!(
        e.contains("model.safetensors") && e.contains("logit_scale"),
        "{e}"
    );
}

#[test]
fn empty_images_and_mismatched_score_inputs_are_errors() {
    let f = Fixture::load();
    let m = f.model();
    let e = m.embed_image(&RgbImage::new(0, 4)).unwrap_err();
    assert!(matches!(e, HfClipError::EmptyImage { .. }), "{e}");
    assert!(m.embed_images(&[]).unwrap().is_empty());
    assert!(clip_score(&m, &f.images(), &["one caption"]).is_err());
    // Overlong text is truncated to max_position_embeddings, keeping <|endoftext|> last.
    let long = "red ".repeat(200);
    let b = m.tokenize(&[long.as_str()]).unwrap();
    assert_eq!(
        b.input_ids[0].len(),
        m.config().text.max_position_embeddings
    );
    assert_eq!(
        *b.input_ids[0].last().unwrap(),
        m.config().text.eos_token_id
    );
    assert_eq!(
        m.embed_text(&long).unwrap().len(),
        m.config().projection_dim
    );
}
