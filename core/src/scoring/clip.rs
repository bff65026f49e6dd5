//! CLIP-T and CLIP-I: the interface a CLIP-like model plugs into, and the two scores.
//!
//! `clip_t = 100 * cosine(E_image(generated), E_text(caption))` and
//! `clip_i = 100 * cosine(E_image(generated), E_image(target))`: raw cosine, no clamp at 0
//! and no 2.5 weight (the CLIPScore paper's `2.5 * max(cos, 0)` is a different metric), and
//! a sample with no generated image scores 0. The paper uses OpenAI CLIP ViT-B/32; the mini
//! profile a tiny model trained here. Both only need [`ClipModel`]; averaging over samples
//! is the caller's.

/// A model with an image and a text tower embedding into one space.
pub trait ClipModel {
    /// The decoded image the model reads.
    type Image;
    /// Why an embedding could not be computed.
    type Error: std::error::Error;
    /// Embeds an image (any scale; [`cosine`] normalises).
    fn embed_image(&self, img: &Self::Image) -> Result<Vec<f32>, Self::Error>;
    /// Embeds a text (any scale; [`cosine`] normalises).
    fn embed_text(&self, text: &str) -> Result<Vec<f32>, Self::Error>;
}

/// Two embeddings that have no cosine.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CosineError {
    #[error("embedding lengths differ: {left} vs {right}")]
    LengthMismatch { left: usize, right: usize },
    #[error("empty embedding")]
    Empty,
    /// A zero vector has no direction: an error rather than 0, since a real CLIP tower never
    /// outputs one and scoring it 0 would hide a broken model.
    #[error("zero embedding has no direction")]
    ZeroVector,
    #[error("embedding holds NaN or infinity")]
    NotFinite,
}

/// A CLIP score that could not be computed.
#[derive(Debug, thiserror::Error)]
pub enum ClipError<E> {
    #[error("CLIP model failed: {0}")]
    Model(#[source] E),
    #[error(transparent)]
    Cosine(#[from] CosineError),
}

/// Cosine similarity, in `[-1, 1]` up to rounding (deliberately not clamped: the scores are
/// raw cosines), accumulated in `f64` so 512-dimensional `f32` embeddings do not lose
/// digits the two-decimal report could show.
pub fn cosine(a: &[f32], b: &[f32]) -> Result<f64, CosineError> {
    if a.len() != b.len() {
        return Err(CosineError::LengthMismatch {
            left: a.len(),
            right: b.len(),
        });
    }
    if a.is_empty() {
        return Err(CosineError::Empty);
    }
    if a.iter().chain(b).any(|x| !x.is_finite()) {
        return Err(CosineError::NotFinite);
    }
    let (mut dot, mut na, mut nb) = (0.0f64, 0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (f64::from(x), f64::from(y));
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    if na == 0.0 || nb == 0.0 {
        return Err(CosineError::ZeroVector);
    }
    Ok(dot / (na.sqrt() * nb.sqrt()))
}

/// CLIP-T of one sample: `100 * cosine(E_image(generated), E_text(caption))`, 0 when the
/// model produced no image.
pub fn clip_t<M: ClipModel>(
    model: &M,
    generated: Option<&M::Image>,
    caption: &str,
) -> Result<f64, ClipError<M::Error>> {
    let Some(img) = generated else {
        return Ok(0.0);
    };
    let e_img = model.embed_image(img).map_err(ClipError::Model)?;
    let e_txt = model.embed_text(caption).map_err(ClipError::Model)?;
    Ok(100.0 * cosine(&e_img, &e_txt)?)
}

/// CLIP-I of one sample: `100 * cosine(E_image(generated), E_image(target))`, 0 when the
/// model produced no image.
pub fn clip_i<M: ClipModel>(
    model: &M,
    generated: Option<&M::Image>,
    target: &M::Image,
) -> Result<f64, ClipError<M::Error>> {
    let Some(img) = generated else {
        return Ok(0.0);
    };
    let e_gen = model.embed_image(img).map_err(ClipError::Model)?;
    let e_tgt = model.embed_image(target).map_err(ClipError::Model)?;
    Ok(100.0 * cosine(&e_gen, &e_tgt)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Images are their embeddings; texts embed by keyword; "fail" fails.
    struct FakeClip;

    #[derive(Debug, thiserror::Error)]
    #[error("fake model failure")]
    struct FakeError;

    impl ClipModel for FakeClip {
        type Image = Vec<f32>;
        type Error = FakeError;
        fn embed_image(&self, img: &Vec<f32>) -> Result<Vec<f32>, FakeError> {
            if img.is_empty() {
                return Err(FakeError);
            }
            Ok(img.clone())
        }
        fn embed_text(&self, text: &str) -> Result<Vec<f32>, FakeError> {
            match text {
                "red" => Ok(vec![1.0, 0.0]),
                "green" => Ok(vec![0.0, 2.0]),
                "not red" => Ok(vec![-3.0, 0.0]),
                "mixed" => Ok(vec![1.0, 1.0]),
                "zero" => Ok(vec![0.0, 0.0]),
                "long" => Ok(vec![1.0, 0.0, 0.0]),
                _ => Err(FakeError),
            }
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn cosine_values_and_errors() {
        assert!(close(cosine(&[1.0, 0.0], &[5.0, 0.0]).unwrap(), 1.0));
        assert!(close(cosine(&[1.0, 0.0], &[0.0, 1.0]).unwrap(), 0.0));
        assert!(close(cosine(&[1.0, 0.0], &[-1.0, 0.0]).unwrap(), -1.0));
        assert!(close(
            cosine(&[1.0, 0.0], &[1.0, 1.0]).unwrap(),
            std::f64::consts::FRAC_1_SQRT_2
        ));
        let v = [0.1f32, 0.2, 0.3];
        assert!(close(cosine(&v, &v).unwrap(), 1.0));
        assert_eq!(
            cosine(&[1.0], &[1.0, 2.0]),
            Err(CosineError::LengthMismatch { left: 1, right: 2 })
        );
        assert_eq!(cosine(&[], &[]), Err(CosineError::Empty));
        assert_eq!(
            cosine(&[0.0, 0.0], &[1.0, 0.0]),
            Err(CosineError::ZeroVector)
        );
        assert_eq!(
            cosine(&[f32::NAN, 0.0], &[1.0, 0.0]),
            Err(CosineError::NotFinite)
        );
    }

    #[test]
    fn clip_t_is_100_times_raw_cosine() {
        let m = FakeClip;
        let red = vec![2.0f32, 0.0];
        assert!(close(clip_t(&m, Some(&red), "red").unwrap(), 100.0));
        assert!(close(clip_t(&m, Some(&red), "green").unwrap(), 0.0));
        // Negative cosine stays negative: no clamp.
        assert!(close(clip_t(&m, Some(&red), "not red").unwrap(), -100.0));
        assert!(close(
            clip_t(&m, Some(&red), "mixed").unwrap(),
            100.0 * std::f64::consts::FRAC_1_SQRT_2
        ));
    }

    #[test]
    fn missing_image_scores_zero_without_calling_the_model() {
        let m = FakeClip;
        // "unknown" would fail if embedded; no image means no call.
        assert_eq!(clip_t(&m, None, "unknown").unwrap(), 0.0);
        assert_eq!(clip_i(&m, None, &Vec::new()).unwrap(), 0.0);
    }

    #[test]
    fn clip_i_compares_two_images() {
        let m = FakeClip;
        let a = vec![1.0f32, 0.0];
        assert!(close(clip_i(&m, Some(&a), &vec![3.0, 0.0]).unwrap(), 100.0));
        assert!(close(clip_i(&m, Some(&a), &vec![0.0, 1.0]).unwrap(), 0.0));
        assert!(close(
            clip_i(&m, Some(&a), &vec![-1.0, 0.0]).unwrap(),
            -100.0
        ));
    }

    #[test]
    fn errors_propagate() {
        let m = FakeClip;
        let a = vec![1.0f32, 0.0];
        assert!(matches!(
            clip_t(&m, Some(&a), "unknown"),
            Err(ClipError::Model(FakeError))
        ));
        assert!(matches!(
            clip_i(&m, Some(&a), &Vec::new()),
            Err(ClipError::Model(FakeError))
        ));
        assert!(matches!(
            clip_t(&m, Some(&a), "zero"),
            Err(ClipError::Cosine(CosineError::ZeroVector))
        ));
        let err = clip_t(&m, Some(&a), "long").unwrap_err();
        assert_eq!(err.to_string(), "embedding lengths differ: 2 vs 3");
        let err = clip_t(&m, Some(&a), "unknown").unwrap_err();
        assert_eq!(err.to_string(), "CLIP model failed: fake model failure");
    }
}
