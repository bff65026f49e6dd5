//! The accuracy matrix of one input as a heatmap: a row per stage ("after stage k", with the
//! task trained there), a column per task in training order, the value in every evaluated cell.
//! Image tasks are CLIP scores (-100..100) coloured on the same 0..100 scale as accuracies.

use super::draw::{ink_on, render as render_figure, text, viridis, DrawResult, Figure};
use super::Input;
use anyhow::Result;
use cnext_core::metrics::fmt2;
use cnext_core::{AccuracyMatrix, Modality};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, VPos};

const MARGIN: i32 = 20;
const TITLE_H: i32 = 48;
const HEADER_H: i32 = 54;
const ROW_LABEL_W: i32 = 210;
const CELL_W: i32 = 124;
const CELL_H: i32 = 52;
const LEGEND_GAP: i32 = 34;
const LEGEND_W: i32 = 22;
const LEGEND_LABELS_W: i32 = 56;
const FOOTER_H: i32 = 44;
const MISSING: RGBColor = RGBColor(222, 222, 222);

struct Heatmap<'a> {
    title: String,
    matrix: &'a AccuracyMatrix,
}

impl Heatmap<'_> {
    fn rows(&self) -> i32 {
        self.matrix.num_stages().max(1) as i32
    }
    fn cols(&self) -> i32 {
        self.matrix.tasks().len() as i32
    }
    fn legend_h(&self) -> i32 {
        (self.rows() * CELL_H).max(3 * CELL_H)
    }
    fn row_label(&self, j: usize) -> String {
        if self.matrix.is_joint() {
            return "joint (all tasks)".into();
        }
        match self.matrix.tasks().get(j) {
            Some(t) => format!("after stage {}: {t}", j + 1),
            None => format!("after stage {}", j + 1),
        }
    }
}

impl Figure for Heatmap<'_> {
    fn size(&self) -> (u32, u32) {
        let w = MARGIN * 2 + ROW_LABEL_W + self.cols() * CELL_W + LEGEND_GAP + LEGEND_W;
        let h = MARGIN * 2 + TITLE_H + HEADER_H + self.legend_h() + FOOTER_H;
        ((w + LEGEND_LABELS_W) as u32, h as u32)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult<DB> {
        let (w, _) = self.size();
        let m = self.matrix;
        root.draw_text(
            &self.title,
            &text(21.0, HPos::Center, VPos::Center),
            (w as i32 / 2, MARGIN + TITLE_H / 2 - 6),
        )?;
        let x0 = MARGIN + ROW_LABEL_W;
        let y0 = MARGIN + TITLE_H + HEADER_H;
        // Column headers: the task, and the scale of image tasks.
        for (i, task) in m.tasks().iter().enumerate() {
            let cx = x0 + i as i32 * CELL_W + CELL_W / 2;
            let image = task.output() == Modality::Image;
            let name_y = if image { y0 - 34 } else { y0 - 20 };
            root.draw_text(
                task.as_str(),
                &text(16.0, HPos::Center, VPos::Center),
                (cx, name_y),
            )?;
            if image {
                root.draw_text(
                    "(CLIP score)",
                    &text(13.0, HPos::Center, VPos::Center).color(&RGBColor(90, 90, 90)),
                    (cx, y0 - 14),
                )?;
            }
        }
        for j in 0..self.rows() as usize {
            let y = y0 + j as i32 * CELL_H;
            root.draw_text(
                &self.row_label(j),
                &text(15.0, HPos::Right, VPos::Center),
                (x0 - 10, y + CELL_H / 2),
            )?;
            for i in 0..self.cols() as usize {
                let x = x0 + i as i32 * CELL_W;
                let value = m.get(j, i);
                let bg = value.map_or(MISSING, |v| viridis(v / 100.0));
                root.draw(&Rectangle::new(
                    [(x, y), (x + CELL_W, y + CELL_H)],
                    bg.filled(),
                ))?;
                root.draw(&Rectangle::new(
                    [(x, y), (x + CELL_W, y + CELL_H)],
                    WHITE.stroke_width(1),
                ))?;
                if let Some(v) = value {
                    root.draw_text(
                        &fmt2(v),
                        &text(17.0, HPos::Center, VPos::Center).color(&ink_on(bg)),
                        (x + CELL_W / 2, y + CELL_H / 2),
                    )?;
                }
            }
            // The task just learned: outline its cell.
            if !m.is_joint() && j < self.cols() as usize {
                let x = x0 + j as i32 * CELL_W;
                root.draw(&Rectangle::new(
                    [(x + 1, y + 1), (x + CELL_W - 1, y + CELL_H - 1)],
                    BLACK.stroke_width(2),
                ))?;
            }
        }
        self.draw_legend(root, x0 + self.cols() * CELL_W + LEGEND_GAP, y0)?;
        let foot_y = y0 + self.legend_h() + FOOTER_H / 2 + 4;
        let note = if m.is_joint() {
            "Joint run: every task trained together, one evaluation. \
             Image tasks (CLIP score, -100..100) use the same 0..100 colour scale."
        } else {
            "Outlined: the task just trained. Grey: not evaluated. \
             Image tasks (CLIP score, -100..100) use the same 0..100 colour scale."
        };
        root.draw_text(
            note,
            &text(13.0, HPos::Left, VPos::Center).color(&RGBColor(70, 70, 70)),
            (MARGIN, foot_y),
        )?;
        Ok(())
    }
}

impl Heatmap<'_> {
    /// A vertical colour bar from 0 (bottom) to 100 (top) with ticks every 20.
    fn draw_legend<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
        x: i32,
        y: i32,
    ) -> DrawResult<DB> {
        let h = self.legend_h();
        root.draw_text("score", &text(13.0, HPos::Left, VPos::Center), (x, y - 16))?;
        for p in 0..h {
            let t = 1.0 - p as f64 / (h - 1) as f64;
            root.draw(&Rectangle::new(
                [(x, y + p), (x + LEGEND_W, y + p + 1)],
                viridis(t).filled(),
            ))?;
        }
        root.draw(&Rectangle::new(
            [(x, y), (x + LEGEND_W, y + h)],
            BLACK.stroke_width(1),
        ))?;
        for k in 0..=5 {
            let v = k * 20;
            let ty = y + h - 1 - ((h - 1) * v) / 100;
            root.draw(&PathElement::new(
                vec![(x + LEGEND_W, ty), (x + LEGEND_W + 5, ty)],
                BLACK,
            ))?;
            let label = if k == 0 {
                "≤0".to_string()
            } else {
                v.to_string()
            };
            root.draw_text(
                &label,
                &text(13.0, HPos::Left, VPos::Center),
                (x + LEGEND_W + 8, ty),
            )?;
        }
        Ok(())
    }
}

/// The heatmap of one input as PNG bytes and SVG text.
pub(crate) fn render(input: &Input) -> Result<(Vec<u8>, String)> {
    let fig = Heatmap {
        title: format!("Accuracy matrix: {}", input.title()),
        matrix: &input.matrix,
    };
    render_figure(&fig, &format!("heatmap of {}", input.dir.display()))
}
