//! Training curves as SVG, drawn with plotters (text is left to the
//! viewer's fonts, so nothing here needs a font file or an image crate).
//!
//! Each run ([`Curve`]) gets one colour: its per-step training loss as a
//! faint line, an exponential moving average over it when the raw loss is
//! noisy ([`ema`], [`is_noisy`]), and its held-out loss at each evaluation
//! as markers joined by a dashed line. The picture has a title, axis labels
//! (step, loss), integer step ticks and a legend naming every run, so it
//! reads without the console.
//!
//! ```
//! use lorafuse::train::plot::{svg, Curve};
//! # fn main() -> lorafuse::Result<()> {
//! let mut run = Curve::new("lora");
//! for step in 1..=200u64 {
//!     run.train.push((step, 3.0 / (1.0 + step as f64 / 20.0) + 0.1 * ((step * 7919) % 13) as f64 / 13.0));
//! }
//! run.eval.extend([(100, 0.9), (200, 0.6)]);
//! let text = svg("lora on `sort`", &[run])?;
//! assert!(text.contains("lora on `sort`") && text.contains("held-out"));
//! # Ok(()) }
//! ```

use std::path::Path;

use plotters::prelude::*;

use crate::{Error, Result};

/// One run's curves.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Curve {
    /// The run's name in the legend (`base`, `lora`, …).
    pub label: String,
    /// Training loss per step, `(step, loss)`; non-finite losses (refused
    /// steps) are left out of the drawing.
    pub train: Vec<(u64, f64)>,
    /// Held-out loss at each evaluation, `(step, loss)`.
    pub eval: Vec<(u64, f64)>,
    /// What the held-out points measure, in the legend: `held-out loss`,
    /// or `held-out loss on answers` when the training loss counts every
    /// token but evaluation scores answers only.
    pub eval_label: String,
}

impl Curve {
    /// An empty curve named `label`.
    pub fn new(label: impl Into<String>) -> Curve {
        Curve { label: label.into(), eval_label: "held-out loss".into(), ..Curve::default() }
    }
}

/// Run colours in order: matplotlib's `tab10`, as other training tools draw.
const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// Exponential moving average over `values` with span `span` (weight
/// `α = 2/(span+1)` on the newest value), bias-corrected as TensorBoard's
/// smoothing is: early values are the weighted mean of what was seen so
/// far, not pulled toward a zero start. Non-finite values are skipped
/// (their slot repeats the running average; `NaN` before any finite value).
pub fn ema(values: &[f64], span: f64) -> Vec<f64> {
    let decay = 1.0 - 2.0 / (span.max(1.0) + 1.0);
    let (mut acc, mut weight) = (0.0, 0.0);
    values
        .iter()
        .map(|&v| {
            if v.is_finite() {
                acc = decay * acc + (1.0 - decay) * v;
                weight = decay * weight + (1.0 - decay);
            }
            if weight > 0.0 {
                acc / weight
            } else {
                f64::NAN
            }
        })
        .collect()
}

/// The smoothing span for a run of `n` steps: a thirtieth of the run, at
/// least 5 steps.
pub fn span_for(n: usize) -> f64 {
    (n as f64 / 30.0).max(5.0)
}

/// Whether `raw` is noisy: its step-to-step noise exceeds 1% of its
/// range. The noise is estimated from second differences
/// (`x[i+1] − 2·x[i] + x[i−1]` has variance `6σ²` for white noise of
/// variance `σ²`, while a smooth trend, however steep, contributes almost
/// nothing), so a fast but clean decrease is not mistaken for noise. A
/// smooth curve is drawn as it is; a noisy one faint, under its average.
pub fn is_noisy(raw: &[f64]) -> bool {
    let v: Vec<f64> = raw.iter().copied().filter(|x| x.is_finite()).collect();
    if v.len() < 3 {
        return false;
    }
    let d2 = v.windows(3).map(|w| (w[2] - 2.0 * w[1] + w[0]).powi(2)).sum::<f64>() / (v.len() - 2) as f64;
    let sigma = (d2 / 6.0).sqrt();
    let (lo, hi) = v.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &x| (l.min(x), h.max(x)));
    sigma > 0.01 * (hi - lo)
}

fn plot_error<E: std::fmt::Display>(e: E) -> Error {
    Error::invalid("loss plot", e.to_string())
}

/// Draws `chart`'s series legend at `position` in the style every plot of
/// the crate shares (a light box, so it stays readable over the lines).
pub(crate) fn draw_legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
    position: SeriesLabelPosition,
) -> std::result::Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .label_font(("sans-serif", 13))
        .draw()
}

/// The curves as an SVG picture titled `title` (name the run: method,
/// data, model).
pub fn svg(title: &str, curves: &[Curve]) -> Result<String> {
    let finite = |points: &[(u64, f64)]| points.iter().copied().filter(|p| p.1.is_finite()).collect::<Vec<_>>();
    type Points = Vec<(u64, f64)>;
    let runs: Vec<(&Curve, Points, Points)> = curves.iter().map(|c| (c, finite(&c.train), finite(&c.eval))).collect();
    let all = || runs.iter().flat_map(|(_, t, e)| t.iter().chain(e));
    if all().next().is_none() {
        return Err(Error::invalid("loss plot", "no finite loss to draw"));
    }
    let (x0, x1) = all().fold((u64::MAX, 0), |(l, h), p| (l.min(p.0), h.max(p.0)));
    let (y0, y1) = all().fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), p| (l.min(p.1), h.max(p.1)));
    let pad = if y1 > y0 { 0.05 * (y1 - y0) } else { 0.5 };
    let (y0, y1) = ((y0 - pad).max(if y0 >= 0.0 { 0.0 } else { f64::NEG_INFINITY }), y1 + pad);
    let x1 = x1.max(x0 + 1);

    let mut text = String::new();
    {
        let root = SVGBackend::with_string(&mut text, (900, 560)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(18)
            .x_label_area_size(48)
            .y_label_area_size(64)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(plot_error)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss (cross-entropy, nats per token)")
            .axis_desc_style(("sans-serif", 15))
            .x_labels(10)
            .y_labels(8)
            .y_label_formatter(&|v| format!("{v:.2}"))
            .light_line_style(BLACK.mix(0.06))
            .draw()
            .map_err(plot_error)?;
        let mut any_faint = false;
        for (i, (curve, train, eval)) in runs.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            let raw: Vec<f64> = train.iter().map(|p| p.1).collect();
            let span = span_for(raw.len());
            let smooth = ema(&raw, span);
            let noisy = is_noisy(&raw);
            if !train.is_empty() {
                let (line, label) = if noisy {
                    any_faint = true;
                    chart.draw_series(LineSeries::new(train.iter().copied(), color.mix(0.3))).map_err(plot_error)?;
                    let line: Vec<(u64, f64)> = train.iter().zip(&smooth).map(|(p, &s)| (p.0, s)).collect();
                    (line, format!("{}: training loss, moving average over {span:.0} steps", curve.label))
                } else {
                    (train.clone(), format!("{}: training loss", curve.label))
                };
                chart
                    .draw_series(LineSeries::new(line, color.stroke_width(2)))
                    .map_err(plot_error)?
                    .label(label)
                    .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
            }
            if !eval.is_empty() {
                if eval.len() > 1 {
                    chart
                        .draw_series(DashedLineSeries::new(eval.iter().copied(), 5, 4, color.stroke_width(1)))
                        .map_err(plot_error)?;
                }
                chart
                    .draw_series(eval.iter().map(|&p| {
                        EmptyElement::at(p)
                            + Circle::new((0, 0), 5, color.filled())
                            + Circle::new((0, 0), 5, BLACK.mix(0.7).stroke_width(1))
                    }))
                    .map_err(plot_error)?
                    .label(format!("{}: {}", curve.label, curve.eval_label))
                    .legend(move |(x, y)| {
                        EmptyElement::at((x + 10, y))
                            + Circle::new((0, 0), 5, color.filled())
                            + Circle::new((0, 0), 5, BLACK.mix(0.7).stroke_width(1))
                    });
            }
        }
        if any_faint {
            // A legend entry for the faint lines, drawn off the plot area.
            chart
                .draw_series(std::iter::empty::<Circle<(u64, f64), i32>>())
                .map_err(plot_error)?
                .label("faint: training loss of each step")
                .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK.mix(0.3)));
        }
        draw_legend(&mut chart, SeriesLabelPosition::UpperRight).map_err(plot_error)?;
        root.present().map_err(plot_error)?;
    }
    Ok(text)
}

/// Writes [`svg`] to `path` atomically (a crash never leaves half a file).
pub fn write_svg(path: &Path, title: &str, curves: &[Curve]) -> Result<()> {
    crate::atomic_file::write_atomic(path, svg(title, curves)?.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn ema_is_bias_corrected_and_skips_non_finite_values() {
        // A constant is its own average from the first value on (an
        // uncorrected EMA starting at 0 would read 1/3 of it at step one).
        assert!(ema(&[3.0; 10], 5.0).iter().all(|&v| (v - 3.0).abs() < 1e-12));
        // span 3 → α = 1/2: after 1 then 0, the corrected mean is
        // (0.5·0.5·1 + 0.5·0) / (1 − 0.25) = 1/3.
        let e = ema(&[1.0, 0.0], 3.0);
        assert!((e[1] - 1.0 / 3.0).abs() < 1e-12, "{e:?}");
        let e = ema(&[f64::NAN, 2.0, f64::INFINITY, 2.0], 4.0);
        assert!(e[0].is_nan() && e[1..].iter().all(|&v| v == 2.0), "{e:?}");
    }

    #[test]
    fn only_noisy_curves_count_as_noisy() {
        // A steep but clean decrease is not noise; ±0.5 on top of it is.
        let smooth: Vec<f64> = (0..400).map(|i| 4.0 * (-(i as f64) / 30.0).exp()).collect();
        assert!(!is_noisy(&smooth));
        let mut rng = Rng::new(1);
        let noisy: Vec<f64> = smooth.iter().map(|v| v + rng.uniform_vec(1, -0.5, 0.5)[0] as f64).collect();
        assert!(is_noisy(&noisy));
    }

    /// The text of every `<text>` element of an SVG.
    fn texts(svg: &str) -> Vec<String> {
        svg.split("<text")
            .skip(1)
            .filter_map(|t| Some(t.split_once('>')?.1.split_once("</text>")?.0.trim().to_string()))
            .collect()
    }

    #[test]
    fn the_picture_has_a_title_axis_labels_a_legend_per_run_and_integer_steps() {
        let mut rng = Rng::new(2);
        let mut a = Curve::new("lora");
        let mut b = Curve::new("tied:vBuA");
        for step in 1..=103u64 {
            let base = 3.0 * (-(step as f64) / 40.0).exp() + 0.5;
            a.train.push((step, base + rng.uniform_vec(1, -0.3, 0.3)[0] as f64));
            b.train.push((step, base + 0.2));
        }
        b.train[10].1 = f64::NAN; // a refused step
        a.eval = vec![(25, 2.1), (50, 1.3), (75, 1.0), (103, 0.9)];
        let svg = svg("adapters on `sort`", &[a, b]).unwrap();
        let t = texts(&svg);
        for want in [
            "adapters on `sort`",
            "step",
            "loss (cross-entropy, nats per token)",
            "lora: training loss, moving average over 5 steps",
            "lora: held-out loss",
            "tied:vBuA: training loss",
            "faint: training loss of each step",
        ] {
            assert!(t.iter().any(|s| s == want), "no text `{want}` in {t:?}");
        }
        assert!(!t.iter().any(|s| s == "tied:vBuA: held-out loss"), "a run without evaluations has no marker entry");
        // Step ticks are whole numbers (y labels all carry two decimals).
        let x_ticks: Vec<&String> = t.iter().filter(|s| s.parse::<u64>().is_ok()).collect();
        assert!(x_ticks.len() >= 5, "{t:?}");
    }

    #[test]
    fn nothing_to_draw_is_an_error_not_an_empty_picture() {
        let mut c = Curve::new("x");
        c.train.push((1, f64::NAN));
        assert!(svg("t", &[c]).is_err());
        assert!(svg("t", &[]).is_err());
    }
}
