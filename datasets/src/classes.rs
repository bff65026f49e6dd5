//! Object classes for the classification task: each class is a fixed two-colour sprite (a
//! mirrored 6x6 pattern drawn at 3x scale), and every sample of it is the sprite at a random
//! offset on a tinted background with colour jitter and noise pixels. Class names are
//! multi-word, like ImageNet's. Prototypes come from a constant seed, not the data seed, so a
//! class looks the same in every generated data set.

use crate::rng::Rng;
use image::{Rgb, RgbImage};

/// The class names, in label order.
pub const CLASS_NAMES: [&str; 30] = [
    "goldfish",
    "great white shark",
    "tree frog",
    "bald eagle",
    "golden retriever",
    "tabby cat",
    "monarch butterfly",
    "sea anemone",
    "red fox",
    "brown bear",
    "fire truck",
    "school bus",
    "traffic light",
    "grand piano",
    "teddy bear",
    "hot air balloon",
    "pizza",
    "strawberry",
    "acoustic guitar",
    "coffee mug",
    "sports car",
    "mountain bike",
    "sailboat",
    "castle",
    "lighthouse",
    "umbrella",
    "pineapple",
    "ice cream",
    "wall clock",
    "tennis ball",
];

/// Side of a classification image in pixels.
pub const CLASS_PX: u32 = 24;
const PATTERN: usize = 6;
const SCALE: u32 = 3;
const PROTOTYPE_SEED: u64 = 0x5eed_c1a5_5e50_0001;

/// A class prototype: a mirrored pattern of cells (0 empty, 1 main colour, 2 accent colour).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prototype {
    pub cells: [[u8; PATTERN]; PATTERN],
    pub main: [u8; 3],
    pub accent: [u8; 3],
}

/// The prototype of class `label` (panics never: labels outside the table wrap around).
pub fn prototype(label: usize) -> Prototype {
    let mut rng = Rng::derive(PROTOTYPE_SEED, CLASS_NAMES[label % CLASS_NAMES.len()]);
    let mut cells = [[0u8; PATTERN]; PATTERN];
    for row in cells.iter_mut() {
        for c in 0..PATTERN / 2 {
            let v = match rng.below(10) {
                0..=3 => 0,
                4..=7 => 1,
                _ => 2,
            };
            row[c] = v;
            row[PATTERN - 1 - c] = v;
        }
    }
    let color = |rng: &mut Rng| [rng.below(6) as u8, rng.below(6) as u8, rng.below(6) as u8];
    // Colour levels 0..5 scaled to 0..250: a 216-colour cube, dark enough to stand out on pale
    // backgrounds.
    let main = color(&mut rng).map(|v| v * 40);
    let accent = color(&mut rng).map(|v| v * 50);
    Prototype {
        cells,
        main,
        accent,
    }
}

fn jitter(rng: &mut Rng, c: [u8; 3], amount: i32) -> Rgb<u8> {
    Rgb(c.map(|v| {
        let d = rng.below((2 * amount + 1) as usize) as i32 - amount;
        (i32::from(v) + d).clamp(0, 255) as u8
    }))
}

/// One sample of class `label`.
pub fn render_sample(label: usize, rng: &mut Rng) -> RgbImage {
    let p = prototype(label);
    let tints: [[u8; 3]; 4] = [
        [255, 255, 255],
        [250, 245, 225],
        [230, 240, 250],
        [235, 250, 235],
    ];
    let bg = *rng.pick(&tints);
    let mut img = RgbImage::from_pixel(CLASS_PX, CLASS_PX, Rgb(bg));
    let span = CLASS_PX - PATTERN as u32 * SCALE; // 6 pixels of free play
    let (ox, oy) = (
        rng.range(0, span as usize) as u32,
        rng.range(0, span as usize) as u32,
    );
    let main = jitter(rng, p.main, 12);
    let accent = jitter(rng, p.accent, 12);
    for (r, row) in p.cells.iter().enumerate() {
        for (c, &v) in row.iter().enumerate() {
            let color = match v {
                1 => main,
                2 => accent,
                _ => continue,
            };
            for dy in 0..SCALE {
                for dx in 0..SCALE {
                    img.put_pixel(
                        ox + c as u32 * SCALE + dx,
                        oy + r as u32 * SCALE + dy,
                        color,
                    );
                }
            }
        }
    }
    // Sparse noise so the task is recognition, not pixel lookup.
    for _ in 0..(CLASS_PX * CLASS_PX / 30) {
        let (x, y) = (rng.below(CLASS_PX as usize), rng.below(CLASS_PX as usize));
        let v = [
            rng.below(256) as u8,
            rng.below(256) as u8,
            rng.below(256) as u8,
        ];
        img.put_pixel(x as u32, y as u32, Rgb(v));
    }
    img
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prototypes_are_fixed_and_pairwise_distinct() {
        assert_eq!(prototype(3), prototype(3));
        for (i, ni) in CLASS_NAMES.iter().enumerate() {
            for (j, nj) in CLASS_NAMES.iter().enumerate().skip(i + 1) {
                let (a, b) = (prototype(i), prototype(j));
                let cells_differ = a
                    .cells
                    .iter()
                    .flatten()
                    .zip(b.cells.iter().flatten())
                    .filter(|(x, y)| x != y)
                    .count();
                assert!(cells_differ >= 6 || a.main != b.main, "{ni} vs {nj}");
            }
        }
    }

    #[test]
    fn names_are_unique_and_renderable_as_answers() {
        let mut n = CLASS_NAMES.to_vec();
        n.sort();
        n.dedup();
        assert_eq!(n.len(), CLASS_NAMES.len());
        assert!(CLASS_NAMES.iter().filter(|c| c.contains(' ')).count() >= 10);
    }
}
