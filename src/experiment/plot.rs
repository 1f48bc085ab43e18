//! The summation experiment's scatter plot: each combination's mean
//! perplexity change against its RMS cosine, labelled, with each member's
//! own change beside it and the least-squares line, as SVG (plotters; text
//! is left to the viewer's fonts, so nothing needs a font file here).

use std::path::Path;

use plotters::prelude::*;

use super::summation::Report;
use crate::{Error, Result};

fn plot_error<E: std::fmt::Display>(e: E) -> Error {
    Error::invalid("summation plot", e.to_string())
}

/// `[lo, hi]` of `values` widened by 8% of the span each side (or ±`pad`
/// when every value is equal).
fn range(values: impl Iterator<Item = f64>, pad: f64) -> (f64, f64) {
    let (lo, hi) =
        values.filter(|v| v.is_finite()).fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), v| (l.min(v), h.max(v)));
    if !lo.is_finite() {
        return (-pad, pad);
    }
    let span = hi - lo;
    if span == 0.0 {
        (lo - pad, hi + pad)
    } else {
        (lo - 0.08 * span, hi + 0.08 * span)
    }
}

/// The plot as SVG text.
pub fn svg(report: &Report) -> Result<String> {
    let points: Vec<(f64, f64, &str)> =
        report.combinations.iter().map(|c| (c.rms_cosine, c.mean_change_percent, c.label.as_str())).collect();
    let members: Vec<(f64, f64)> = report
        .combinations
        .iter()
        .flat_map(|c| c.members.iter().map(move |m| (c.rms_cosine, m.change_percent)))
        .collect();
    let (x0, x1) = range(points.iter().map(|p| p.0), 0.01);
    let (y0, y1) = range(members.iter().map(|p| p.1).chain([0.0]), 1.0);
    let mut text = String::new();
    {
        let root = SVGBackend::with_string(&mut text, (860, 580)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        let title = format!(
            "Summed vs merged-data adapters: {} combinations of {} domains",
            report.combinations.len(),
            report.domains.len()
        );
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(18)
            .x_label_area_size(50)
            .y_label_area_size(70)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(plot_error)?;
        chart
            .configure_mesh()
            .x_desc("RMS of per-module cosines between the summed adapters' ΔW")
            .y_desc("perplexity change of the sum vs merged-data adapter (%)")
            .axis_desc_style(("sans-serif", 15))
            .draw()
            .map_err(plot_error)?;
        chart.draw_series(LineSeries::new([(x0, 0.0), (x1, 0.0)], BLACK.mix(0.3))).map_err(plot_error)?;
        if let Some(f) = &report.fit {
            let line = [(x0, f.intercept + f.slope * x0), (x1, f.intercept + f.slope * x1)];
            chart
                .draw_series(LineSeries::new(line, RED.stroke_width(2)))
                .map_err(plot_error)?
                .label(format!(
                    "least squares: {:+.2} {:+.2}·x   R² = {:.2}, Spearman ρ = {:+.2}",
                    f.intercept, f.slope, f.r_squared, f.spearman
                ))
                .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED.stroke_width(2)));
        }
        chart
            .draw_series(members.iter().map(|&(x, y)| Circle::new((x, y), 3, BLACK.mix(0.35).stroke_width(1))))
            .map_err(plot_error)?
            .label("one member domain's change")
            .legend(|(x, y)| Circle::new((x + 10, y), 3, BLACK.mix(0.35).stroke_width(1)));
        chart
            .draw_series(points.iter().map(|&(x, y, label)| {
                EmptyElement::at((x, y))
                    + Circle::new((0, 0), 5, BLUE.filled())
                    + Text::new(label.to_string(), (8, -14), ("sans-serif", 13))
            }))
            .map_err(plot_error)?
            .label("combination: mean change over its members")
            .legend(|(x, y)| Circle::new((x + 10, y), 5, BLUE.filled()));
        crate::train::plot::draw_legend(&mut chart, SeriesLabelPosition::UpperLeft).map_err(plot_error)?;
        root.present().map_err(plot_error)?;
    }
    Ok(text)
}

/// Writes [`svg`] to `path` atomically.
pub fn write_svg(path: &Path, report: &Report) -> Result<()> {
    crate::atomic_file::write_atomic(path, svg(report)?.as_bytes())
}
