//! Scenes of coloured shapes on a 3x3 grid of 8x8 cells (24x24 pixels). Every answer, box,
//! caption and edit target is computed from the scene description, never read back from pixels,
//! so it is exact by construction. Shapes are aligned to the 8x8 grid (the nano backbone's patch
//! size): a small shape fills one cell, a large one a 2x2 block.

use crate::rng::Rng;
use image::{Rgb, RgbImage};
use serde::{Deserialize, Serialize};

/// Side of a scene image in pixels (3 cells of 8).
pub const SCENE_PX: u32 = 24;
/// Side of one grid cell in pixels.
pub const CELL_PX: u32 = 8;
pub const WHITE: Rgb<u8> = Rgb([255, 255, 255]);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Shape {
    Circle,
    Square,
    Triangle,
    Diamond,
    Cross,
}

impl Shape {
    pub const ALL: [Shape; 5] = [
        Shape::Circle,
        Shape::Square,
        Shape::Triangle,
        Shape::Diamond,
        Shape::Cross,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
            Shape::Diamond => "diamond",
            Shape::Cross => "cross",
        }
    }
    /// Whether the pixel centre (u, v) in [0,1)^2 of the shape's box is inside the shape.
    fn covers(self, u: f64, v: f64) -> bool {
        let (du, dv) = (u - 0.5, v - 0.5);
        match self {
            Shape::Square => true,
            Shape::Circle => du * du + dv * dv <= 0.25,
            Shape::Triangle => du.abs() <= v / 2.0 + 0.05,
            Shape::Diamond => du.abs() + dv.abs() <= 0.52,
            Shape::Cross => du.abs() <= 0.17 || dv.abs() <= 0.17,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Color {
    Red,
    Green,
    Blue,
    Yellow,
    Purple,
    Orange,
}

impl Color {
    pub const ALL: [Color; 6] = [
        Color::Red,
        Color::Green,
        Color::Blue,
        Color::Yellow,
        Color::Purple,
        Color::Orange,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Color::Red => "red",
            Color::Green => "green",
            Color::Blue => "blue",
            Color::Yellow => "yellow",
            Color::Purple => "purple",
            Color::Orange => "orange",
        }
    }
    pub fn rgb(self) -> Rgb<u8> {
        Rgb(match self {
            Color::Red => [220, 40, 40],
            Color::Green => [40, 170, 60],
            Color::Blue => [40, 80, 220],
            Color::Yellow => [235, 200, 30],
            Color::Purple => [150, 60, 190],
            Color::Orange => [245, 130, 20],
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Size {
    Small,
    Large,
}

impl Size {
    pub fn name(self) -> &'static str {
        match self {
            Size::Small => "small",
            Size::Large => "large",
        }
    }
    /// Grid cells per side.
    pub fn cells(self) -> u32 {
        match self {
            Size::Small => 1,
            Size::Large => 2,
        }
    }
}

/// One object: its top-left grid cell is (`row`, `col`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Object {
    pub shape: Shape,
    pub color: Color,
    pub size: Size,
    pub row: u32,
    pub col: u32,
}

const ROWS: [&str; 3] = ["top", "middle", "bottom"];
const COLS: [&str; 3] = ["left", "middle", "right"];

/// The name of a small object's cell, e.g. "top left", "center", "middle right".
pub fn cell_name(row: u32, col: u32) -> String {
    match (row, col) {
        (1, 1) => "center".to_string(),
        _ => format!("{} {}", ROWS[row as usize % 3], COLS[col as usize % 3]),
    }
}

/// Every position a small object can be named by, with its cell.
pub fn small_positions() -> Vec<(u32, u32)> {
    (0..3).flat_map(|r| (0..3).map(move |c| (r, c))).collect()
}

impl Object {
    /// "top left" etc.; a large object is named by the corner its 2x2 block sits in.
    pub fn position(&self) -> String {
        match self.size {
            Size::Small => cell_name(self.row, self.col),
            Size::Large => format!(
                "{} {}",
                if self.row == 0 { "top" } else { "bottom" },
                if self.col == 0 { "left" } else { "right" }
            ),
        }
    }

    /// The cells the object occupies.
    pub fn cells(&self) -> Vec<(u32, u32)> {
        let n = self.size.cells();
        (self.row..self.row + n)
            .flat_map(|r| (self.col..self.col + n).map(move |c| (r, c)))
            .collect()
    }

    /// "red circle"
    pub fn noun(&self) -> String {
        format!("{} {}", self.color.name(), self.shape.name())
    }

    /// "a large red circle at the top left"
    pub fn phrase(&self) -> String {
        format!(
            "a {} {} at the {}",
            self.size.name(),
            self.noun(),
            self.position()
        )
    }

    /// The pixel box drawn for the object, `[x, y, w, h]`: its cells less a 1-pixel margin.
    pub fn pixel_box(&self) -> [u32; 4] {
        let side = self.size.cells() * CELL_PX;
        [
            self.col * CELL_PX + 1,
            self.row * CELL_PX + 1,
            side - 2,
            side - 2,
        ]
    }
}

/// A whole scene: objects on a white canvas, no two sharing a cell or a (colour, shape) pair,
/// so every question about "the red circle" has exactly one answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scene {
    pub objects: Vec<Object>,
}

impl Scene {
    /// Whether an object fits: inside the grid, on free cells, with a new (colour, shape).
    pub fn can_place(&self, o: &Object) -> bool {
        let n = o.size.cells();
        if o.row + n > 3 || o.col + n > 3 {
            return false;
        }
        let taken: Vec<(u32, u32)> = self.objects.iter().flat_map(|p| p.cells()).collect();
        o.cells().iter().all(|c| !taken.contains(c))
            && !self
                .objects
                .iter()
                .any(|p| p.color == o.color && p.shape == o.shape)
    }

    /// A random object that fits, or None if none was found.
    pub fn random_object(&self, rng: &mut Rng, large_p: f64) -> Option<Object> {
        for _ in 0..64 {
            let size = if rng.chance(large_p) {
                Size::Large
            } else {
                Size::Small
            };
            let span = 4 - size.cells() as usize; // 3 origins for small, 2 for large
            let o = Object {
                shape: *rng.pick(&Shape::ALL),
                color: *rng.pick(&Color::ALL),
                size,
                row: rng.below(span) as u32,
                col: rng.below(span) as u32,
            };
            if self.can_place(&o) {
                return Some(o);
            }
        }
        None
    }

    /// A random scene of `lo..=hi` objects; at most one large object keeps scenes readable.
    pub fn random(rng: &mut Rng, lo: usize, hi: usize) -> Scene {
        let n = rng.range(lo, hi);
        let mut s = Scene { objects: vec![] };
        while s.objects.len() < n {
            let large_p = if s.objects.iter().any(|o| o.size == Size::Large) {
                0.0
            } else {
                0.25
            };
            match s.random_object(rng, large_p) {
                Some(o) => s.objects.push(o),
                None => break,
            }
        }
        s.sort();
        s
    }

    /// Canonical (reading) order: top to bottom, left to right.
    pub fn sort(&mut self) {
        self.objects.sort_by_key(|o| (o.row, o.col));
    }

    /// A caption that fully describes the scene, objects in reading order.
    pub fn caption(&self) -> String {
        let parts: Vec<String> = self.objects.iter().map(|o| o.phrase()).collect();
        match parts.len() {
            0 => "an empty white canvas".to_string(),
            1 => parts[0].clone(),
            n => format!("{} and {}", parts[..n - 1].join(", "), parts[n - 1]),
        }
    }

    pub fn render(&self) -> RgbImage {
        let mut img = RgbImage::from_pixel(SCENE_PX, SCENE_PX, WHITE);
        for o in &self.objects {
            draw_shape(&mut img, o.pixel_box(), o.shape, o.color.rgb());
        }
        img
    }
}

/// Fills the pixels of `shape` inside the box `[x, y, w, h]`.
pub fn draw_shape(img: &mut RgbImage, b: [u32; 4], shape: Shape, color: Rgb<u8>) {
    let [x0, y0, w, h] = b;
    for y in 0..h {
        for x in 0..w {
            let u = (x as f64 + 0.5) / w as f64;
            let v = (y as f64 + 0.5) / h as f64;
            if shape.covers(u, v) && x0 + x < img.width() && y0 + y < img.height() {
                img.put_pixel(x0 + x, y0 + y, color);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drawn_pixels_span_exactly_the_pixel_box() {
        for shape in Shape::ALL {
            for size in [Size::Small, Size::Large] {
                let o = Object {
                    shape,
                    color: Color::Red,
                    size,
                    row: 1,
                    col: 0,
                };
                let img = Scene { objects: vec![o] }.render();
                let (mut x0, mut y0, mut x1, mut y1) = (u32::MAX, u32::MAX, 0, 0);
                for (x, y, p) in img.enumerate_pixels() {
                    if *p != WHITE {
                        (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x), y1.max(y));
                    }
                }
                let [bx, by, bw, bh] = o.pixel_box();
                assert_eq!(
                    [x0, y0, x1 + 1 - x0, y1 + 1 - y0],
                    [bx, by, bw, bh],
                    "{shape:?}"
                );
            }
        }
    }

    #[test]
    fn shapes_differ_at_small_size() {
        let mut imgs = vec![];
        for shape in Shape::ALL {
            let o = Object {
                shape,
                color: Color::Blue,
                size: Size::Small,
                row: 0,
                col: 0,
            };
            imgs.push(Scene { objects: vec![o] }.render());
        }
        for i in 0..imgs.len() {
            for j in i + 1..imgs.len() {
                assert_ne!(imgs[i], imgs[j]);
            }
        }
    }

    #[test]
    fn random_scenes_respect_the_placement_rules() {
        let mut rng = Rng::new(3);
        for _ in 0..200 {
            let s = Scene::random(&mut rng, 1, 4);
            let mut cells: Vec<_> = s.objects.iter().flat_map(|o| o.cells()).collect();
            let n = cells.len();
            cells.sort();
            cells.dedup();
            assert_eq!(cells.len(), n);
            assert!(cells.iter().all(|&(r, c)| r < 3 && c < 3));
        }
    }

    #[test]
    fn captions_name_every_object() {
        let s = Scene {
            objects: vec![
                Object {
                    shape: Shape::Circle,
                    color: Color::Red,
                    size: Size::Large,
                    row: 0,
                    col: 0,
                },
                Object {
                    shape: Shape::Cross,
                    color: Color::Green,
                    size: Size::Small,
                    row: 2,
                    col: 2,
                },
            ],
        };
        assert_eq!(
            s.caption(),
            "a large red circle at the top left and a small green cross at the bottom right"
        );
    }
}
