//! Book covers for the OCR task: title, author and year rendered with the embedded font (one
//! glyph per 8x8 cell, so the text is aligned to the backbone's patches) and a genre cue (cover
//! colour and icon). 48x48 pixels: six rows of six glyph cells.

use crate::font::{draw_text, renderable};
use crate::rng::Rng;
use crate::scene::{draw_shape, Shape};
use image::{Rgb, RgbImage};
use serde::{Deserialize, Serialize};

/// Side of a cover in pixels (6 cells of 8).
pub const COVER_PX: u32 = 48;
/// Glyphs per row.
pub const COVER_COLS: usize = 6;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Genre {
    Romance,
    Mystery,
    Travel,
    Cookbooks,
    History,
    ScienceFiction,
}

impl Genre {
    pub const ALL: [Genre; 6] = [
        Genre::Romance,
        Genre::Mystery,
        Genre::Travel,
        Genre::Cookbooks,
        Genre::History,
        Genre::ScienceFiction,
    ];
    /// The genre as OCR-VQA names it.
    pub fn name(self) -> &'static str {
        match self {
            Genre::Romance => "Romance",
            Genre::Mystery => "Mystery",
            Genre::Travel => "Travel",
            Genre::Cookbooks => "Cookbooks",
            Genre::History => "History",
            Genre::ScienceFiction => "Science Fiction",
        }
    }
    /// (background, icon colour, text colour, icon shape)
    fn style(self) -> ([u8; 3], [u8; 3], [u8; 3], Shape) {
        const BLACK: [u8; 3] = [0, 0, 0];
        const WHITE: [u8; 3] = [255, 255, 255];
        match self {
            Genre::Romance => ([240, 150, 180], [200, 20, 60], BLACK, Shape::Circle),
            Genre::Mystery => ([60, 60, 70], [200, 200, 210], WHITE, Shape::Diamond),
            Genre::Travel => ([120, 190, 235], [40, 120, 50], BLACK, Shape::Triangle),
            Genre::Cookbooks => ([245, 200, 120], [180, 60, 30], BLACK, Shape::Square),
            Genre::History => ([140, 90, 50], [240, 220, 160], WHITE, Shape::Cross),
            Genre::ScienceFiction => ([40, 40, 120], [120, 230, 255], WHITE, Shape::Circle),
        }
    }
}

pub const TITLE_WORDS: [&str; 48] = [
    "DARK", "RIVER", "NIGHT", "STORM", "GOLDEN", "SILENT", "LOST", "CITY", "OCEAN", "WINTER",
    "SUMMER", "HIDDEN", "SECRET", "GARDEN", "EMPIRE", "SHADOW", "FOREST", "DREAM", "STONE", "FIRE",
    "ICE", "MOON", "STAR", "ROAD", "HOUSE", "KING", "QUEEN", "WIND", "BLOOD", "LIGHT", "GHOST",
    "PARIS", "ROME", "TOKYO", "SPICE", "BREAD", "TABLE", "SPACE", "ROBOT", "PLANET", "LOVE",
    "HEART", "CROWN", "WAR", "MAP", "ISLAND", "SUGAR", "CODE",
];

pub const AUTHORS: [&str; 32] = [
    "SMITH", "MORGAN", "HAYES", "BROWN", "KLEIN", "PATEL", "GARCIA", "NGUYEN", "LOPEZ", "WALSH",
    "REED", "COLE", "BAKER", "CRUZ", "FOX", "HALE", "KANE", "LANE", "MARSH", "NASH", "PRICE",
    "QUINN", "ROSS", "SHAW", "TATE", "VANCE", "WARD", "YOUNG", "ZHANG", "OKAFOR", "IVANOV", "BERG",
];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cover {
    /// One or two words, each at most six letters (one row each).
    pub title: Vec<String>,
    pub author: String,
    pub year: u32,
    pub genre: Genre,
}

/// Upper-case word -> "Title Case".
pub fn title_case(w: &str) -> String {
    let mut c = w.chars();
    match c.next() {
        Some(f) => f.to_ascii_uppercase().to_string() + &c.as_str().to_ascii_lowercase(),
        None => String::new(),
    }
}

impl Cover {
    pub fn random(rng: &mut Rng) -> Cover {
        let words = if rng.chance(0.5) { 1 } else { 2 };
        let mut title = vec![rng.pick(&TITLE_WORDS).to_string()];
        while title.len() < words {
            let w = rng.pick(&TITLE_WORDS).to_string();
            if !title.contains(&w) {
                title.push(w);
            }
        }
        Cover {
            title,
            author: rng.pick(&AUTHORS).to_string(),
            year: 1950 + rng.below(75) as u32,
            genre: *rng.pick(&Genre::ALL),
        }
    }

    /// The title as an answer: "Dark River".
    pub fn title_answer(&self) -> String {
        self.title
            .iter()
            .map(|w| title_case(w))
            .collect::<Vec<_>>()
            .join(" ")
    }

    pub fn author_answer(&self) -> String {
        title_case(&self.author)
    }

    /// Each line of text as drawn: (glyph row, first glyph column, text). Titles take rows 0-1,
    /// the author row 4 and the year row 5, each centred.
    pub fn text_rows(&self) -> Vec<(u32, u32, String)> {
        let centred = |s: &str| ((COVER_COLS - s.len().min(COVER_COLS)) / 2) as u32;
        let mut rows: Vec<(u32, String)> = self
            .title
            .iter()
            .enumerate()
            .map(|(i, w)| (i as u32, w.clone()))
            .collect();
        rows.push((4, self.author.clone()));
        rows.push((5, self.year.to_string()));
        rows.into_iter().map(|(r, w)| (r, centred(&w), w)).collect()
    }

    pub fn render(&self) -> RgbImage {
        let (bg, icon, text, shape) = self.genre.style();
        let mut img = RgbImage::from_pixel(COVER_PX, COVER_PX, Rgb(bg));
        draw_shape(&mut img, [17, 17, 14, 14], shape, Rgb(icon));
        for (row, col, w) in self.text_rows() {
            draw_text(&mut img, col, row, &w, Rgb(text));
        }
        img
    }
}

/// Every word a cover can show fits its row and the font.
pub fn vocabulary_fits() -> bool {
    TITLE_WORDS
        .iter()
        .chain(AUTHORS.iter())
        .all(|w| w.len() <= COVER_COLS && renderable(w))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_words_fit_a_row() {
        assert!(vocabulary_fits());
    }

    #[test]
    fn covers_show_their_text_in_the_right_rows() {
        let c = Cover {
            title: vec!["ICE".into()],
            author: "FOX".into(),
            year: 1999,
            genre: Genre::Travel,
        };
        let img = c.render();
        let (bg, ..) = Genre::Travel.style();
        let row_has_ink = |r: u32| {
            (r * 8..r * 8 + 8).any(|y| (0..48).any(|x| img.get_pixel(x, y).0 == [0, 0, 0]))
        };
        assert!(row_has_ink(0) && row_has_ink(4) && row_has_ink(5));
        assert!(!row_has_ink(1));
        assert_eq!(img.get_pixel(0, 47).0, bg);
        assert_eq!(c.title_answer(), "Ice");
    }
}
