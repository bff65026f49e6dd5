//! The forgetting decomposition: per input, Avg.IUF, Avg.HAL and Avg.OTH next to the text
//! tasks' share of Forgetting (for binary scorers the three add up to it), as grouped bars and
//! as CSV. A multi-seed input shows the mean over its seeds.

use super::draw::{render as render_figure, text, DrawResult, Figure, FONT};
use super::tables::csv_line;
use super::Input;
use crate::seeds::opt2;
use anyhow::Result;
use cnext_harness::run::RunResult;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, VPos};

/// The decomposition of one input (means over the seeds of a multi-seed input).
#[derive(Debug, Clone, PartialEq)]
pub struct Decomposition {
    pub avg_iuf: Option<f64>,
    pub avg_hal: Option<f64>,
    pub avg_oth: Option<f64>,
    pub text_forgetting: Option<f64>,
}

fn mean_over(runs: &[RunResult], f: impl Fn(&RunResult) -> Option<f64>) -> Option<f64> {
    let v: Vec<f64> = runs.iter().map(f).collect::<Option<_>>()?;
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

impl Decomposition {
    pub fn of(input: &Input) -> Decomposition {
        let runs = &input.runs;
        let err = |r: &RunResult| r.errors.clone();
        Decomposition {
            avg_iuf: mean_over(runs, |r| err(r)?.avg_iuf),
            avg_hal: mean_over(runs, |r| err(r)?.avg_hal),
            avg_oth: mean_over(runs, |r| err(r)?.avg_oth),
            text_forgetting: mean_over(runs, |r| match &r.errors {
                Some(e) => e.text_forgetting,
                None => cnext_harness::errors::text_forgetting(&r.matrix),
            }),
        }
    }

    /// `Avg.IUF + Avg.HAL + Avg.OTH`.
    pub fn sum(&self) -> Option<f64> {
        Some(self.avg_iuf? + self.avg_hal? + self.avg_oth?)
    }

    fn values(&self) -> [Option<f64>; 4] {
        [
            self.avg_iuf,
            self.avg_hal,
            self.avg_oth,
            self.text_forgetting,
        ]
    }
}

const SERIES: [(&str, RGBColor); 4] = [
    ("Avg.IUF (instruction unfollowing)", RGBColor(214, 39, 40)),
    ("Avg.HAL (hallucination)", RGBColor(255, 127, 14)),
    ("Avg.OTH (other)", RGBColor(148, 103, 189)),
    ("text forgetting", RGBColor(110, 110, 110)),
];

/// Fraction of a group's width each bar takes, and where the first bar starts.
const BAR: f64 = 0.19;
const FIRST: f64 = 0.12;

struct Bars<'a> {
    labels: Vec<String>,
    data: &'a [Decomposition],
}

impl Figure for Bars<'_> {
    fn size(&self) -> (u32, u32) {
        ((220 + 300 * self.labels.len()).max(820) as u32, 620)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult<DB> {
        let all: Vec<f64> = self
            .data
            .iter()
            .flat_map(|d| d.values())
            .flatten()
            .collect();
        let lo = all.iter().copied().fold(0.0, f64::min);
        let hi = all.iter().copied().fold(5.0, f64::max);
        let span = hi - lo;
        let lo = if lo < 0.0 { lo - span * 0.08 } else { 0.0 };
        let hi = hi + span * 0.45;
        let n = self.labels.len() as f64;
        let mut chart = ChartBuilder::on(root)
            .caption(
                "Forgetting decomposition of the text tasks (points)",
                (FONT, 21),
            )
            .margin(18)
            .x_label_area_size(70)
            .y_label_area_size(62)
            .build_cartesian_2d(0.0..n, lo..hi)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .x_label_formatter(&|_| String::new())
            .y_label_formatter(&|y| format!("{y:.0}"))
            .light_line_style(RGBColor(246, 246, 246))
            .label_style((FONT, 14))
            .axis_desc_style((FONT, 16))
            .y_desc("points of accuracy")
            .draw()?;
        if lo < 0.0 {
            chart.draw_series(std::iter::once(PathElement::new(
                vec![(0.0, 0.0), (n, 0.0)],
                BLACK,
            )))?;
        }
        for (s, &(name, color)) in SERIES.iter().enumerate() {
            let x0 = |g: usize| g as f64 + FIRST + s as f64 * BAR;
            let bars = self.data.iter().enumerate().filter_map(move |(g, d)| {
                let v = d.values()[s]?;
                Some(Rectangle::new(
                    [(x0(g), 0.0), (x0(g) + BAR * 0.92, v)],
                    color.filled(),
                ))
            });
            chart.draw_series(bars)?.label(name).legend(move |(x, y)| {
                Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled())
            });
            for (g, d) in self.data.iter().enumerate() {
                if d.values().iter().all(Option::is_none) {
                    continue;
                }
                let xc = x0(g) + BAR * 0.46;
                let (label, v, style) = match d.values()[s] {
                    Some(v) if v < 0.0 => (opt2(Some(v)), v, text(13.0, HPos::Center, VPos::Top)),
                    Some(v) => (opt2(Some(v)), v, text(13.0, HPos::Center, VPos::Bottom)),
                    None => ("-".into(), 0.0, text(13.0, HPos::Center, VPos::Bottom)),
                };
                let (px, py) = chart.backend_coord(&(xc, v));
                let dy = if v < 0.0 { 4 } else { -4 };
                root.draw_text(&label, &style, (px, py + dy))?;
            }
        }
        // Group labels under the axis: the input, and the sum of the three types.
        for (g, (label, d)) in self.labels.iter().zip(self.data).enumerate() {
            let (px, py) = chart.backend_coord(&(g as f64 + 0.5, lo));
            root.draw_text(label, &text(16.0, HPos::Center, VPos::Top), (px, py + 10))?;
            if d.values().iter().all(Option::is_none) {
                let (_, y0) = chart.backend_coord(&(0.0, 0.0));
                root.draw_text(
                    "no error types or text forgetting",
                    &text(13.0, HPos::Center, VPos::Bottom).color(&RGBColor(90, 90, 90)),
                    (px, y0 - 6),
                )?;
                continue;
            }
            let sum = format!(
                "IUF+HAL+OTH = {}, text forgetting = {}",
                opt2(d.sum()),
                opt2(d.text_forgetting)
            );
            root.draw_text(
                &sum,
                &text(12.0, HPos::Center, VPos::Top).color(&RGBColor(70, 70, 70)),
                (px, py + 34),
            )?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font((FONT, 14))
            .background_style(WHITE.mix(0.9))
            .border_style(RGBColor(160, 160, 160))
            .margin(10)
            .draw()?;
        Ok(())
    }
}

/// The bars of all inputs as PNG bytes and SVG text.
pub(crate) fn render(inputs: &[Input], data: &[Decomposition]) -> Result<(Vec<u8>, String)> {
    let fig = Bars {
        labels: inputs.iter().map(Input::legend).collect(),
        data,
    };
    render_figure(&fig, "decomposition")
}

/// `decomposition.csv`: one row per input.
pub(crate) fn csv(inputs: &[Input], data: &[Decomposition]) -> String {
    let mut out = csv_line(&[
        "method",
        "order",
        "seeds",
        "Avg.IUF",
        "Avg.HAL",
        "Avg.OTH",
        "IUF+HAL+OTH",
        "text forgetting",
    ]);
    for (i, d) in inputs.iter().zip(data) {
        let mut line = i.id_cells();
        line.extend([
            opt2(d.avg_iuf),
            opt2(d.avg_hal),
            opt2(d.avg_oth),
            opt2(d.sum()),
            opt2(d.text_forgetting),
        ]);
        out.push_str(&csv_line(&line));
    }
    out
}
