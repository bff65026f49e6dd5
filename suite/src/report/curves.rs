//! Avg.ACC and Forgetting after each stage, every input on one figure (two panels). A joint run
//! has no stages: it is a dashed horizontal line in the Avg.ACC panel.

use super::draw::{render as render_figure, series_color, text, DrawResult, Figure, FONT};
use super::Input;
use anyhow::Result;
use cnext_core::metrics::{forgetting, stage_avg_acc};
use cnext_core::{AccuracyMatrix, TaskId};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, VPos};

/// Values per stage (index 0 = stage 1) of one input.
struct Curve {
    label: String,
    joint: bool,
    avg_acc: Vec<Option<f64>>,
    forgetting: Vec<Option<f64>>,
}

/// The Forgetting of the matrix as it stood after each stage (`None` at stage 1).
pub(crate) fn stage_forgetting(m: &AccuracyMatrix) -> Vec<Option<f64>> {
    if m.is_joint() {
        return vec![];
    }
    (1..=m.num_stages())
        .map(|k| {
            let mut part = AccuracyMatrix::sequential(m.tasks().to_vec()).ok()?;
            for row in &m.rows()[..k] {
                part.push_row(row.clone()).ok()?;
            }
            forgetting(&part)
        })
        .collect()
}

impl Curve {
    fn of(input: &Input) -> Curve {
        let m = &input.matrix;
        // A single run stores its curve; a mean matrix gets it recomputed.
        let avg_acc = match (&input.summary, input.runs.first()) {
            (None, Some(r)) if !r.metrics.stage_avg_acc.is_empty() => {
                r.metrics.stage_avg_acc.clone()
            }
            _ => stage_avg_acc(m),
        };
        Curve {
            label: input.legend(),
            joint: m.is_joint(),
            avg_acc,
            forgetting: stage_forgetting(m),
        }
    }
}

struct Curves {
    curves: Vec<Curve>,
    /// The tasks by stage, when every sequential input trains in the same order.
    tasks: Option<Vec<TaskId>>,
    stages: usize,
}

/// Lower and upper axis bounds in steps of 10, keeping 0 on the axis and leaving room above
/// the data for a legend of `entries` lines.
fn y_range<'a>(values: impl Iterator<Item = &'a Option<f64>>, entries: usize) -> (f64, f64) {
    let vals: Vec<f64> = values.flatten().copied().collect();
    let lo = vals.iter().copied().fold(0.0, f64::min);
    let hi = vals.iter().copied().fold(10.0, f64::max);
    let lo = (lo / 10.0).floor() * 10.0;
    let room = 0.12 + 0.07 * entries as f64;
    let hi = ((hi + (hi - lo) * room) / 10.0).ceil() * 10.0;
    (lo, hi)
}

impl Curves {
    fn x_label(&self, x: f64) -> String {
        let k = x.round();
        if (x - k).abs() > 1e-6 || k < 1.0 || k as usize > self.stages {
            return String::new();
        }
        match self.tasks.as_ref().and_then(|t| t.get(k as usize - 1)) {
            Some(t) => format!("{}: {t}", k as usize),
            None => format!("{}", k as usize),
        }
    }

    fn panel<DB: DrawingBackend>(
        &self,
        area: &DrawingArea<DB, Shift>,
        title: &str,
        y_desc: &str,
        avg: bool,
    ) -> DrawResult<DB> {
        fn pick(c: &Curve, avg: bool) -> &[Option<f64>] {
            if avg {
                &c.avg_acc
            } else {
                &c.forgetting
            }
        }
        let entries = self.curves.iter().filter(|c| avg || !c.joint).count();
        let (lo, hi) = y_range(
            self.curves.iter().flat_map(|c| pick(c, avg).iter()),
            entries,
        );
        let n = self.stages.max(1) as f64;
        let mut chart = ChartBuilder::on(area)
            .caption(title, (FONT, 20))
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(62)
            .build_cartesian_2d(0.6..n + 0.4, lo..hi)?;
        chart
            .configure_mesh()
            .x_labels(self.stages.max(1))
            .x_label_formatter(&|x| self.x_label(*x))
            .y_label_formatter(&|y| format!("{y:.0}"))
            .disable_x_mesh()
            .light_line_style(RGBColor(246, 246, 246))
            .label_style((FONT, 14))
            .axis_desc_style((FONT, 16))
            .x_desc(if self.tasks.is_some() {
                "stage: task trained"
            } else {
                "stage"
            })
            .y_desc(y_desc)
            .draw()?;
        for (k, c) in self.curves.iter().enumerate() {
            let color = series_color(k);
            if c.joint {
                let Some(v) = c.avg_acc.first().copied().flatten().filter(|_| avg) else {
                    continue;
                };
                chart
                    .draw_series(DashedLineSeries::new(
                        vec![(0.6, v), (n + 0.4, v)],
                        10,
                        6,
                        color.stroke_width(2),
                    ))?
                    .label(format!("{} (joint)", c.label))
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 9, y)], color.stroke_width(2))
                    });
                continue;
            }
            let points: Vec<(f64, f64)> = pick(c, avg)
                .iter()
                .enumerate()
                .filter_map(|(j, v)| v.map(|v| ((j + 1) as f64, v)))
                .collect();
            if points.is_empty() {
                continue;
            }
            chart
                .draw_series(LineSeries::new(points.clone(), color.stroke_width(3)))?
                .label(c.label.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x - 6, y), (x + 14, y)], color.stroke_width(3))
                });
            chart.draw_series(points.iter().map(|&p| Circle::new(p, 5, color.filled())))?;
        }
        chart
            .configure_series_labels()
            .position(if avg {
                SeriesLabelPosition::UpperRight
            } else {
                SeriesLabelPosition::UpperLeft
            })
            .label_font((FONT, 15))
            .background_style(WHITE.mix(0.9))
            .border_style(RGBColor(160, 160, 160))
            .margin(10)
            .draw()?;
        Ok(())
    }
}

impl Figure for Curves {
    fn size(&self) -> (u32, u32) {
        (1500, 600)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult<DB> {
        let (w, _) = self.size();
        let order_note = if self.tasks.is_none() {
            " (inputs differ in task order)"
        } else {
            ""
        };
        root.draw_text(
            &format!("Accuracy and forgetting after each stage{order_note}"),
            &text(22.0, HPos::Center, VPos::Center),
            (w as i32 / 2, 24),
        )?;
        let body = root.margin(44, 0, 0, 0);
        let (left, right) = body.split_horizontally(w / 2);
        self.panel(
            &left,
            "Avg.ACC of the tasks seen so far",
            "Avg.ACC (%)",
            true,
        )?;
        self.panel(&right, "Forgetting so far", "Forgetting (points)", false)?;
        Ok(())
    }
}

/// The curves of all inputs as PNG bytes and SVG text.
pub(crate) fn render(inputs: &[Input]) -> Result<(Vec<u8>, String)> {
    let seq: Vec<&Input> = inputs.iter().filter(|i| !i.matrix.is_joint()).collect();
    let tasks = seq.first().map(|i| i.matrix.tasks().to_vec());
    let same = seq
        .iter()
        .all(|i| Some(i.matrix.tasks()) == tasks.as_deref());
    let stages = inputs
        .iter()
        .map(|i| {
            if i.matrix.is_joint() {
                i.matrix.tasks().len()
            } else {
                i.matrix.num_stages()
            }
        })
        .max()
        .unwrap_or(1);
    let fig = Curves {
        curves: inputs.iter().map(Curve::of).collect(),
        tasks: tasks.filter(|_| same),
        stages,
    };
    render_figure(&fig, "curves")
}
