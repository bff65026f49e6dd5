//! Image preprocessing that reproduces the reference pipelines bit for bit.
//!
//! Hugging Face image processors in transformers 5.x run on the torchvision backend: the uint8
//! image is resized by ATen's `interpolate(..., mode="bicubic", antialias=True)` without ever
//! leaving uint8. That kernel is Pillow-SIMD's separable resampler: per output pixel a window
//! of input pixels whose width grows with the downscale factor, Keys cubic weights
//! (`a = -0.5`) computed in `f64`, normalised, then quantised to `i16` with a precision chosen
//! so the largest weight fits; a horizontal pass then a vertical pass, each accumulating in
//! `i32`, rounding by adding half a unit, shifting and clamping to `0..=255`. A float resize
//! differs from it by a uint8 level here and there (0.015 in CLIP's `pixel_values`), so this
//! module ports the integer arithmetic exactly instead of approximating it.

use image::{Rgb, RgbImage};

/// Keys' cubic convolution kernel with `a = -0.5` (Pillow's and ATen's antialiased bicubic;
/// ATen's `HelperInterpCubic::aa_filter`).
fn bicubic_filter(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
    } else {
        0.0
    }
}

/// The window and fixed-point weights of one output pixel along one axis.
struct Tap {
    /// First input index of the window.
    start: usize,
    /// Weights for `start..start + weights.len()`, scaled by `2^precision`.
    weights: Vec<i32>,
}

/// One axis of the resampler: ATen's `_compute_index_ranges_int16_weights` (bicubic,
/// antialias, `align_corners=False`, no explicit scale factor).
struct Axis {
    taps: Vec<Tap>,
    precision: u32,
}

impl Axis {
    fn new(in_size: usize, out_size: usize) -> Self {
        // `area_pixel_compute_scale` with no scale factor given: in / out, in f64.
        let scale = in_size as f64 / out_size as f64;
        // Bicubic spans 4 input pixels; when downscaling the kernel is stretched by `scale`
        // so every input pixel contributes (this is the antialiasing).
        let support = if scale >= 1.0 { 2.0 * scale } else { 2.0 };
        let invscale = if scale >= 1.0 { 1.0 / scale } else { 1.0 };
        let max_taps = support.ceil() as i64 * 2 + 1;
        let mut float_taps = Vec::with_capacity(out_size);
        let mut wt_max = 0.0f64;
        for i in 0..out_size {
            let center = scale * (i as f64 + 0.5);
            // C++ `static_cast<int64_t>` truncates toward zero.
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
            let xsize = (xmax - xmin).clamp(0, max_taps);
            let mut w: Vec<f64> = (0..xsize)
                .map(|j| bicubic_filter((j as f64 + xmin as f64 - center + 0.5) * invscale))
                .collect();
            let total: f64 = w.iter().sum();
            if total != 0.0 {
                for v in &mut w {
                    *v /= total;
                    wt_max = wt_max.max(*v);
                }
            }
            float_taps.push((xmin as usize, w));
        }
        // The largest precision (below 22) at which the largest weight, rounded, still fits
        // in an i16 one bit up: Pillow-SIMD's rule, so the SIMD madd cannot overflow.
        let mut precision = 0u32;
        while precision < 22 {
            let next = (0.5 + wt_max * f64::from(1u32 << (precision + 1))) as i32;
            if next >= 1 << 15 {
                break;
            }
            precision += 1;
        }
        let unit = f64::from(1u32 << precision);
        let taps = float_taps
            .into_iter()
            .map(|(start, w)| Tap {
                start,
                weights: w
                    .into_iter()
                    .map(|v| {
                        let v = v * unit;
                        // Round half away from zero, then store as i16 (as ATen does).
                        let r = if v < 0.0 {
                            (v - 0.5) as i32
                        } else {
                            (v + 0.5) as i32
                        };
                        i32::from(r as i16)
                    })
                    .collect(),
            })
            .collect();
        Axis { taps, precision }
    }

    /// `sum(pixel * weight)` in i32 with half a unit added, shifted down and clamped to u8
    /// (the SIMD `srai`, `packs_epi32`, `packus_epi16` sequence).
    fn apply(&self, tap: &Tap, mut value_at: impl FnMut(usize) -> u8) -> u8 {
        let mut acc: i32 = 1 << self.precision >> 1;
        for (j, &w) in tap.weights.iter().enumerate() {
            acc += i32::from(value_at(tap.start + j)) * w;
        }
        (acc >> self.precision).clamp(0, 255) as u8
    }
}

/// Resizes to `width x height` exactly as `torchvision.transforms.v2.functional.resize(img,
/// [height, width], InterpolationMode.BICUBIC, antialias=True)` does on a uint8 CHW tensor
/// on CPU (ATen's uint8 antialiased bicubic kernel, the path transformers 5.x image
/// processors take). An axis whose size does not change is not resampled, as in ATen; the
/// horizontal pass runs first and its uint8 result feeds the vertical pass.
pub fn resize_bicubic_antialias(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (in_w, in_h) = img.dimensions();
    if (in_w, in_h) == (width, height) {
        return img.clone();
    }
    if width == 0 || height == 0 || in_w == 0 || in_h == 0 {
        // Nothing to sample from (or nothing to fill): ATen yields zeros.
        return RgbImage::new(width, height);
    }
    let horizontal = if width != in_w {
        let axis = Axis::new(in_w as usize, width as usize);
        RgbImage::from_fn(width, in_h, |x, y| {
            let tap = &axis.taps[x as usize];
            Rgb(std::array::from_fn(|c| {
                axis.apply(tap, |sx| img.get_pixel(sx as u32, y).0[c])
            }))
        })
    } else {
        img.clone()
    };
    if height == in_h {
        return horizontal;
    }
    let axis = Axis::new(in_h as usize, height as usize);
    RgbImage::from_fn(width, height, |x, y| {
        let tap = &axis.taps[y as usize];
        Rgb(std::array::from_fn(|c| {
            axis.apply(tap, |sy| horizontal.get_pixel(x, sy as u32).0[c])
        }))
    })
}

/// Top-left offset (`(left, top)`) of a centred `width x height` crop, negative where the
/// image is smaller than the crop and gets padded.
///
/// transformers 5.x's `TorchvisionBackend.center_crop` rule: when the crop is larger the image
/// is first zero-padded by `(crop - size) // 2` before and `(crop - size + 1) // 2` after;
/// then the offset is `int((size - crop) / 2.0)`, i.e. floor (not torchvision's own
/// `round`, which rounds half to even and differs for odd margins).
pub fn center_crop_offsets(img_w: u32, img_h: u32, width: u32, height: u32) -> (i64, i64) {
    let offset = |size: u32, crop: u32| -> i64 {
        let (size, crop) = (i64::from(size), i64::from(crop));
        if crop > size {
            -((crop - size) / 2)
        } else {
            (size - crop) / 2
        }
    };
    (offset(img_w, width), offset(img_h, height))
}

/// A centred `width x height` crop, zero-padded where the image is smaller: transformers 5.x's
/// `TorchvisionBackend.center_crop` (see [`center_crop_offsets`] for the offset rule).
pub fn center_crop(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (left, top) = center_crop_offsets(img.width(), img.height(), width, height);
    RgbImage::from_fn(width, height, |x, y| {
        let sx = i64::from(x) + left;
        let sy = i64::from(y) + top;
        if (0..i64::from(img.width())).contains(&sx) && (0..i64::from(img.height())).contains(&sy) {
            *img.get_pixel(sx as u32, sy as u32)
        } else {
            Rgb([0, 0, 0])
        }
    })
}

/// Planar CHW float32 values `(x - mean / rescale) / (std / rescale)`, channel by channel:
/// transformers 5.x's fused rescale-and-normalise on the torchvision backend, which equals
/// `(x * rescale - mean) / std` up to rounding. As there, the folded mean and std are
/// `f32(mean) * f32(1 / rescale)` rounded to f32, and the image is cast to f32, then
/// subtracted and divided (not multiplied by a reciprocal), so the values match to the bit.
pub fn to_chw_normalized(img: &RgbImage, rescale: f64, mean: [f64; 3], std: [f64; 3]) -> Vec<f32> {
    let inv = (1.0 / rescale) as f32;
    let mean = mean.map(|m| m as f32 * inv);
    let std = std.map(|s| s as f32 * inv);
    let (w, h) = img.dimensions();
    let plane = (w * h) as usize;
    let mut out = vec![0.0f32; 3 * plane];
    for (x, y, px) in img.enumerate_pixels() {
        let i = (y * w + x) as usize;
        for c in 0..3 {
            out[c * plane + i] = (f32::from(px.0[c]) - mean[c]) / std[c];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use std::path::PathBuf;

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

    fn data_f64(t: &Value) -> Vec<f64> {
        t["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect()
    }

    fn shape(t: &Value) -> Vec<usize> {
        t["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect()
    }

    fn chw_u8(img: &RgbImage) -> Vec<f64> {
        let (w, h) = img.dimensions();
        let mut out = Vec::new();
        for c in 0..3 {
            for y in 0..h {
                for x in 0..w {
                    out.push(f64::from(img.get_pixel(x, y).0[c]));
                }
            }
        }
        out
    }

    /// Resize, crop and normalisation against transformers' `CLIPImageProcessor` (torchvision
    /// backend) on the four fixture images: uint8 identical, pixel values within 1e-6.
    #[test]
    fn matches_the_clip_fixture() {
        let dir = fixture_dir();
        let text = std::fs::read_to_string(dir.join("reference.json")).unwrap();
        let r: Value = serde_json::from_str(&text).unwrap();
        let pre = &r["preprocessing"];
        let target = pre["size"]["shortest_edge"].as_u64().unwrap() as u32;
        let crop_w = pre["crop_size"]["width"].as_u64().unwrap() as u32;
        let crop_h = pre["crop_size"]["height"].as_u64().unwrap() as u32;
        let rescale = pre["rescale_factor"].as_f64().unwrap();
        let three = |k: &str| -> [f64; 3] {
            let v: Vec<f64> = pre[k]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect();
            [v[0], v[1], v[2]]
        };
        let (mean, std) = (three("image_mean"), three("image_std"));
        let pixel_values = data_f64(&r["pixel_values"]);
        let per_image = (3 * crop_h * crop_w) as usize;
        let mut max_pv = 0.0f64;
        for (i, (file, p)) in r["image_files"]
            .as_array()
            .unwrap()
            .iter()
            .zip(r["per_image_preprocessing"].as_array().unwrap())
            .enumerate()
        {
            let img = image::open(dir.join(file.as_str().unwrap()))
                .unwrap()
                .to_rgb8();
            let (w, h) = img.dimensions();
            assert_eq!(
                [h as u64, w as u64],
                [
                    p["original_hw"][0].as_u64().unwrap(),
                    p["original_hw"][1].as_u64().unwrap()
                ]
            );
            // Shortest side to `target`, the other int(target * long / short).
            let (nw, nh) = if w <= h {
                (target, target * h / w)
            } else {
                (target * w / h, target)
            };
            let want = &p["resized_uint8_chw"];
            assert_eq!(shape(want), vec![3, nh as usize, nw as usize], "image {i}");
            let resized = resize_bicubic_antialias(&img, nw, nh);
            let got = chw_u8(&resized);
            let want = data_f64(want);
            let diffs = got.iter().zip(&want).filter(|(a, b)| a != b).count();
            let max = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            assert_eq!(
                diffs, 0,
                "image {i}: {diffs} uint8 values differ (max {max})"
            );
            let (left, top) = center_crop_offsets(nw, nh, crop_w, crop_h);
            assert_eq!(
                [top, left],
                [
                    p["crop_top_left"][0].as_i64().unwrap(),
                    p["crop_top_left"][1].as_i64().unwrap()
                ],
                "image {i}"
            );
            let pv = to_chw_normalized(&center_crop(&resized, crop_w, crop_h), rescale, mean, std);
            let want = &pixel_values[i * per_image..(i + 1) * per_image];
            for (a, b) in pv.iter().zip(want) {
                // Stored with 9 significant digits: f64 -> f32 gives torch's float back.
                max_pv = max_pv.max((f64::from(*a) - f64::from(*b as f32)).abs());
            }
        }
        eprintln!("pixel_values max abs diff vs reference: {max_pv:e}");
        assert!(max_pv <= 1e-6, "pixel_values max abs diff {max_pv}");
    }

    #[test]
    fn identity_and_constant_images() {
        let img = RgbImage::from_fn(7, 5, |x, y| Rgb([x as u8 * 30, y as u8 * 50, 9]));
        assert_eq!(resize_bicubic_antialias(&img, 7, 5), img);
        // Normalised weights sum to one unit, so a flat image stays flat at any scale.
        let flat = RgbImage::from_pixel(13, 11, Rgb([200, 0, 255]));
        for (w, h) in [(5, 4), (13, 3), (29, 11), (40, 31), (1, 1)] {
            let out = resize_bicubic_antialias(&flat, w, h);
            assert_eq!(out.dimensions(), (w, h));
            assert!(out.pixels().all(|p| p.0 == [200, 0, 255]), "{w}x{h}");
        }
        assert_eq!(resize_bicubic_antialias(&flat, 0, 3).dimensions(), (0, 3));
    }

    #[test]
    fn crop_pads_with_zeros_when_smaller() {
        let img = RgbImage::from_pixel(3, 2, Rgb([9, 9, 9]));
        // Crop 6x5: pad (6-3)//2 = 1 left, (5-2)//2 = 1 above.
        assert_eq!(center_crop_offsets(3, 2, 6, 5), (-1, -1));
        let out = center_crop(&img, 6, 5);
        assert_eq!(out.get_pixel(0, 0).0, [0, 0, 0]);
        assert_eq!(out.get_pixel(1, 1).0, [9, 9, 9]);
        assert_eq!(out.get_pixel(3, 2).0, [9, 9, 9]);
        assert_eq!(out.get_pixel(4, 2).0, [0, 0, 0]);
        assert_eq!(out.get_pixel(1, 3).0, [0, 0, 0]);
        // Odd margins floor: 37 -> 32 starts at 2, not round-half-even's 2 / 3 split.
        assert_eq!(center_crop_offsets(37, 39, 32, 32), (2, 3));
    }

    #[test]
    fn normalisation_is_planar() {
        let img = RgbImage::from_fn(2, 1, |x, _| Rgb([x as u8 * 255, 0, 51]));
        let v = to_chw_normalized(&img, 1.0 / 255.0, [0.0, 0.5, 0.2], [1.0, 0.5, 0.1]);
        assert_eq!(v.len(), 6);
        assert_eq!(&v[..2], &[0.0, 1.0]);
        assert_eq!(&v[2..4], &[-1.0, -1.0]);
        assert!((v[4] - 0.0).abs() < 1e-6 && (v[5] - 0.0).abs() < 1e-6);
    }
}
