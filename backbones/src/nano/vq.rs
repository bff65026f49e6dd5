//! The VQ image tokenizer of the generation path: a codebook of 8x8 RGB patches learned by
//! k-means (Lloyd's algorithm, k-means++ seeding from our own RNG) over patches of generated
//! images. An image becomes one code per patch (raster order); codes decode back to pixels by
//! tiling the centroids.

use cnext_core::rng::{Rng, GAMMA};
use image::{Rgb, RgbImage};
use serde::{Deserialize, Serialize};

pub const PATCH: u32 = 8;
const DIM: usize = (PATCH * PATCH * 3) as usize;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Codebook {
    /// `k` centroids of `PATCH*PATCH*3` values in [0, 255].
    pub centroids: Vec<Vec<f32>>,
}

/// The patches of an image (raster order), as flat RGB vectors.
pub fn patches(img: &RgbImage) -> Vec<Vec<f32>> {
    let (gw, gh) = (img.width() / PATCH, img.height() / PATCH);
    let mut out = Vec::with_capacity((gw * gh) as usize);
    for py in 0..gh {
        for px in 0..gw {
            let mut v = Vec::with_capacity(DIM);
            for y in 0..PATCH {
                for x in 0..PATCH {
                    let p = img.get_pixel(px * PATCH + x, py * PATCH + y);
                    v.extend(p.0.iter().map(|&c| f32::from(c)));
                }
            }
            out.push(v);
        }
    }
    out
}

fn dist2(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

impl Codebook {
    /// Learns up to `k` codes. Identical patches are merged first (weighted k-means), which makes
    /// this fast on rendered data with few distinct patches.
    pub fn learn(images: &[RgbImage], k: usize, iters: usize, seed: u64) -> Codebook {
        let mut uniq: std::collections::BTreeMap<Vec<u32>, (Vec<f32>, f32)> = Default::default();
        for img in images {
            for p in patches(img) {
                let key: Vec<u32> = p.iter().map(|v| v.to_bits()).collect();
                uniq.entry(key).or_insert((p, 0.0)).1 += 1.0;
            }
        }
        let pts: Vec<(Vec<f32>, f32)> = uniq.into_values().collect();
        if pts.is_empty() {
            return Codebook {
                centroids: vec![vec![255.0; DIM]],
            };
        }
        let mut rng = Rng::new(seed ^ GAMMA);
        let mut unit = move || rng.unit();
        // k-means++ seeding (weighted by patch frequency).
        let mut cents: Vec<Vec<f32>> = vec![pts[0].0.clone()];
        let mut d: Vec<f32> = pts.iter().map(|(p, _)| dist2(p, &cents[0])).collect();
        while cents.len() < k {
            let total: f64 = pts.iter().zip(&d).map(|((_, w), d)| f64::from(w * d)).sum();
            if total <= 0.0 {
                break; // every distinct patch already has its own code
            }
            let mut r = unit() * total;
            let mut pick = pts.len() - 1;
            for (i, ((_, w), dd)) in pts.iter().zip(&d).enumerate() {
                r -= f64::from(w * dd);
                if r <= 0.0 {
                    pick = i;
                    break;
                }
            }
            cents.push(pts[pick].0.clone());
            for (i, (p, _)) in pts.iter().enumerate() {
                d[i] = d[i].min(dist2(p, &pts[pick].0));
            }
        }
        for _ in 0..iters {
            let mut sums = vec![vec![0f64; DIM]; cents.len()];
            let mut ws = vec![0f64; cents.len()];
            for (p, w) in &pts {
                let c = nearest(&cents, p);
                ws[c] += f64::from(*w);
                for (s, v) in sums[c].iter_mut().zip(p) {
                    *s += f64::from(*v) * f64::from(*w);
                }
            }
            for (c, cent) in cents.iter_mut().enumerate() {
                if ws[c] > 0.0 {
                    *cent = sums[c].iter().map(|s| (s / ws[c]) as f32).collect();
                }
            }
        }
        Codebook { centroids: cents }
    }

    pub fn len(&self) -> usize {
        self.centroids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.centroids.is_empty()
    }

    /// One code per patch, raster order.
    pub fn encode(&self, img: &RgbImage) -> Vec<u32> {
        patches(img)
            .iter()
            .map(|p| nearest(&self.centroids, p) as u32)
            .collect()
    }

    /// Tiles the centroids of `codes` into a `grid_w x grid_h` patch image.
    pub fn decode(&self, codes: &[u32], grid_w: u32, grid_h: u32) -> RgbImage {
        let mut img = RgbImage::new(grid_w * PATCH, grid_h * PATCH);
        for (i, &c) in codes.iter().enumerate().take((grid_w * grid_h) as usize) {
            let cent = &self.centroids[(c as usize).min(self.centroids.len() - 1)];
            let (px, py) = (i as u32 % grid_w, i as u32 / grid_w);
            for y in 0..PATCH {
                for x in 0..PATCH {
                    let o = ((y * PATCH + x) * 3) as usize;
                    let px_val = |k: usize| cent[o + k].round().clamp(0.0, 255.0) as u8;
                    img.put_pixel(
                        px * PATCH + x,
                        py * PATCH + y,
                        Rgb([px_val(0), px_val(1), px_val(2)]),
                    );
                }
            }
        }
        img
    }
}

fn nearest(cents: &[Vec<f32>], p: &[f32]) -> usize {
    let mut best = (f32::INFINITY, 0);
    for (i, c) in cents.iter().enumerate() {
        let d = dist2(c, p);
        if d < best.0 {
            best = (d, i);
        }
    }
    best.1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn few_distinct_patches_are_reconstructed_exactly() {
        let mut a = RgbImage::from_pixel(16, 8, Rgb([255, 255, 255]));
        for y in 0..8 {
            a.put_pixel(3, y, Rgb([200, 0, 0]));
        }
        let b = RgbImage::from_pixel(16, 8, Rgb([0, 0, 255]));
        let cb = Codebook::learn(&[a.clone(), b.clone()], 16, 5, 1);
        assert_eq!(cb.len(), 3);
        assert_eq!(cb.decode(&cb.encode(&a), 2, 1), a);
        assert_eq!(cb.decode(&cb.encode(&b), 2, 1), b);
        assert_eq!(Codebook::learn(&[a.clone(), b.clone()], 16, 5, 1), cb);
    }
}
