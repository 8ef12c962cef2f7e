//! trail-plot: PNG charts, each with an SVG beside it (same name, `.svg`: vector, for a paper),
//! shared by the pipeline's stages (the predictor reports, `trail eval
//! latency`, `trail sim`): multi-series lines (optional error bars, log axes), CDFs, bars,
//! heatmaps (confusion matrices) and reliability scatters with a y = x line.
//!
//! Text is rendered in pure Rust (plotters' `ab_glyph` backend) with DejaVu Sans, embedded in
//! the binary ([`EMBEDDED_FONT`], `eval/plot/fonts/`, licence beside it), so charts render on
//! any machine; the `TRAIL_FONT` environment variable names another TrueType file instead (one
//! that cannot be read is an [`Error::Font`]).
//!
//! ```no_run
//! use trail_plot::{Axes, Series, line_chart};
//! let s = Series::line("FCFS", vec![(0.5, 1.0), (0.9, 5.0)]);
//! line_chart("out.png".as_ref(), &Axes::new("E[T] vs load", "load", "E[T]"), &[s]).unwrap();
//! ```
//!
//! Every chart is written atomically (`trail_fs::AtomicFile`).

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::prelude::*;

/// Errors of this crate; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A heatmap without a cell.
    #[error("empty heatmap: no cell to draw")]
    EmptyHeatmap,
    /// Writing the chart.
    #[error("{}: {source}", path.display())]
    Io {
        /// The chart (or its temporary file).
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The font could not be read or is not TrueType.
    #[error("font {}: {reason}", path.display())]
    Font {
        /// The font file (`TRAIL_FONT`) or `<embedded DejaVuSans.ttf>`.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// plotters failed to draw.
    #[error("plot {}: {reason}", path.display())]
    Plot {
        /// The chart.
        path: PathBuf,
        /// plotters' message.
        reason: String,
    },
}

impl From<trail_fs::Error> for Error {
    fn from(e: trail_fs::Error) -> Self {
        Error::Io {
            path: e.path,
            source: e.source,
        }
    }
}

/// The font used unless `TRAIL_FONT` names another: DejaVu Sans 2.37 (Bitstream Vera licence,
/// `eval/plot/fonts/LICENSE-DejaVu`).
pub static EMBEDDED_FONT: &[u8] = include_bytes!("../fonts/DejaVuSans.ttf");

/// Chart size in pixels.
pub const SIZE: (u32, u32) = (1000, 700);

static FONT: OnceLock<Result<(), (PathBuf, String)>> = OnceLock::new();

/// Loads and registers the font (once per process) as plotters' "sans-serif".
pub fn init_font() -> Result<(), Error> {
    FONT.get_or_init(|| {
        let (path, bytes) = match std::env::var_os("TRAIL_FONT").map(PathBuf::from) {
            Some(path) => {
                let bytes = std::fs::read(&path).map_err(|e| (path.clone(), e.to_string()))?;
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                (path, bytes)
            }
            None => (PathBuf::from("<embedded DejaVuSans.ttf>"), EMBEDDED_FONT),
        };
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| (path, "not a TrueType font".to_string()))
    })
    .clone()
    .map_err(|(path, reason)| Error::Font { path, reason })
}

/// Title and axis labels, and which axes are logarithmic.
#[derive(Debug, Clone, PartialEq)]
pub struct Axes {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub log_x: bool,
    pub log_y: bool,
}

impl Axes {
    pub fn new(title: &str, x_label: &str, y_label: &str) -> Self {
        Self {
            title: title.into(),
            x_label: x_label.into(),
            y_label: y_label.into(),
            log_x: false,
            log_y: false,
        }
    }

    pub fn log_x(mut self) -> Self {
        self.log_x = true;
        self
    }

    pub fn log_y(mut self) -> Self {
        self.log_y = true;
        self
    }
}

/// How a series is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    Line,
    Points,
    LinePoints,
}

/// One named series; `err` holds each point's interval `(lo, hi)` (same length as `points`),
/// drawn as it is, asymmetric or not.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    pub err: Option<Vec<(f64, f64)>>,
    pub mark: Mark,
    /// Index into the palette; series with the same colour index share a colour (e.g. a
    /// closed form as a line and its simulation as points).
    pub color: Option<usize>,
}

impl Series {
    pub fn line(label: &str, points: Vec<(f64, f64)>) -> Self {
        Self {
            label: label.into(),
            points,
            err: None,
            mark: Mark::Line,
            color: None,
        }
    }

    pub fn points(label: &str, points: Vec<(f64, f64)>) -> Self {
        Self {
            label: label.into(),
            points,
            err: None,
            mark: Mark::Points,
            color: None,
        }
    }

    /// Adds symmetric error bars (half-widths).
    pub fn with_err(mut self, err: Vec<f64>) -> Self {
        let err = self.points.iter().zip(err).map(|(p, h)| (p.1 - h, p.1 + h));
        self.err = Some(err.collect());
        self
    }

    /// Adds error bars from each point's interval `(lo, hi)`, drawn as they are (a bootstrap
    /// interval of a ratio or a tail is rarely symmetric).
    pub fn with_interval(mut self, bounds: Vec<(f64, f64)>) -> Self {
        self.err = Some(bounds);
        self
    }

    pub fn with_mark(mut self, mark: Mark) -> Self {
        self.mark = mark;
        self
    }

    pub fn with_color(mut self, index: usize) -> Self {
        self.color = Some(index);
        self
    }
}

/// A colour-blind-friendly palette (Okabe–Ito, then four of Tol's muted colours, so a report's
/// dozen predictors get distinct colours).
pub fn color(i: usize) -> RGBColor {
    const P: [RGBColor; 12] = [
        RGBColor(0, 114, 178),
        RGBColor(213, 94, 0),
        RGBColor(0, 158, 115),
        RGBColor(204, 121, 167),
        RGBColor(230, 159, 0),
        RGBColor(86, 180, 233),
        RGBColor(0, 0, 0),
        RGBColor(240, 228, 66),
        RGBColor(136, 34, 85),
        RGBColor(68, 170, 153),
        RGBColor(136, 136, 136),
        RGBColor(51, 34, 136),
    ];
    P[i % P.len()]
}

fn plot_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Plot {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// Renders `body` (a drawing on `root`, for any backend) into the PNG at `path` and into the
/// SVG beside it.
macro_rules! render {
    ($path:expr, |$root:ident| $body:expr) => {{
        let path: &Path = $path;
        atomic_png(path, |$root| $body)?;
        atomic_svg(&path.with_extension("svg"), |$root| $body)
    }};
}

/// Renders into a temporary SVG beside `path`, then commits it into place.
fn atomic_svg(
    path: &Path,
    draw: impl FnOnce(&DrawingArea<SVGBackend<'_>, plotters::coord::Shift>) -> Result<(), Error>,
) -> Result<(), Error> {
    let file = trail_fs::AtomicFile::create(path)?;
    {
        let root = SVGBackend::new(file.temp_path(), SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot_err(path, e))?;
        draw(&root)?;
        root.present().map_err(|e| plot_err(path, e))?;
    }
    Ok(file.commit()?)
}

/// Renders into a temporary PNG beside `path` (plotters writes it by path; the temporary name
/// keeps the `.png` it picks the format by), then commits it into place.
fn atomic_png(
    path: &Path,
    draw: impl FnOnce(&DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>) -> Result<(), Error>,
) -> Result<(), Error> {
    init_font()?;
    let file = trail_fs::AtomicFile::create(path)?;
    {
        let root = BitMapBackend::new(file.temp_path(), SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot_err(path, e))?;
        draw(&root)?;
        root.present().map_err(|e| plot_err(path, e))?;
    }
    Ok(file.commit()?)
}

/// Data bounds padded by 5 % (or by a factor on log axes).
fn bounds(values: impl Iterator<Item = f64>, log: bool) -> Range<f64> {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite() && (!log || *v > 0.0)) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return if log { 0.1..10.0 } else { 0.0..1.0 };
    }
    if log {
        let (lo, hi) = if lo == hi {
            (lo / 2.0, hi * 2.0)
        } else {
            (lo, hi)
        };
        lo / (hi / lo).powf(0.05)..hi * (hi / lo).powf(0.05)
    } else {
        let pad = if hi > lo {
            0.05 * (hi - lo)
        } else {
            0.5 * lo.abs().max(1.0)
        };
        lo - pad..hi + pad
    }
}

/// A multi-series line chart; series with `err` get vertical error bars.
pub fn line_chart(path: &Path, axes: &Axes, series: &[Series]) -> Result<(), Error> {
    let xs = bounds(
        series.iter().flat_map(|s| s.points.iter().map(|p| p.0)),
        axes.log_x,
    );
    let ys = bounds(
        series.iter().flat_map(|s| {
            s.points.iter().enumerate().flat_map(move |(i, p)| {
                let (lo, hi) = s
                    .err
                    .as_ref()
                    .and_then(|e| e.get(i))
                    .copied()
                    .unwrap_or((p.1, p.1));
                [lo.min(p.1), hi.max(p.1)]
            })
        }),
        axes.log_y,
    );
    let legend = legend_corner(series, axes, (&xs, &ys));
    let ys = legend_room(ys, &legend, series, axes.log_y);
    render!(path, |root| {
        let (xs, ys) = (xs.clone(), ys.clone());
        let d = (path, root, axes, series, legend.clone());
        match (axes.log_x, axes.log_y) {
            (false, false) => draw_series(d, xs, ys),
            (true, false) => draw_series(d, xs.log_scale(), ys),
            (false, true) => draw_series(d, xs, ys.log_scale()),
            (true, true) => draw_series(d, xs.log_scale(), ys.log_scale()),
        }
    })
}

/// What a line chart draws on: the file it names in errors, the area, the axes, the series and
/// the legend's corner.
type Drawing<'a, DB> = (
    &'a Path,
    &'a DrawingArea<DB, plotters::coord::Shift>,
    &'a Axes,
    &'a [Series],
    SeriesLabelPosition,
);

/// The corner of the plot with the fewest data points (error bars included), so the legend
/// hides as little as it can; ties keep the upper left.
fn legend_corner(
    series: &[Series],
    axes: &Axes,
    (xs, ys): (&Range<f64>, &Range<f64>),
) -> SeriesLabelPosition {
    let unit = |v: f64, r: &Range<f64>, log: bool| {
        if log {
            (v.max(f64::MIN_POSITIVE).ln() - r.start.ln()) / (r.end.ln() - r.start.ln())
        } else {
            (v - r.start) / (r.end - r.start)
        }
    };
    let mut count = [0usize; 4];
    for s in series {
        for (i, &(x, y)) in s.points.iter().enumerate() {
            let (lo, hi) = s
                .err
                .as_ref()
                .and_then(|e| e.get(i))
                .copied()
                .unwrap_or((y, y));
            let u = unit(x, xs, axes.log_x);
            for y in [y, lo, hi] {
                let v = unit(y, ys, axes.log_y);
                let k = usize::from(u >= 0.5) + 2 * usize::from(v < 0.5);
                count[k] += 1;
            }
        }
    }
    let corners = [
        SeriesLabelPosition::UpperLeft,
        SeriesLabelPosition::UpperRight,
        SeriesLabelPosition::LowerLeft,
        SeriesLabelPosition::LowerRight,
    ];
    let best = (0..4).min_by_key(|&k| (count[k], k)).unwrap_or(0);
    corners[best].clone()
}

/// `ys` stretched on the legend's side by about the legend's height (a line per labelled
/// series), so the legend sits beside the data rather than over it.
fn legend_room(
    ys: Range<f64>,
    legend: &SeriesLabelPosition,
    series: &[Series],
    log: bool,
) -> Range<f64> {
    let n = series.iter().filter(|s| !s.label.is_empty()).count();
    if n == 0 {
        return ys;
    }
    let share = 0.05 * n as f64 + 0.03;
    let upper = matches!(
        legend,
        SeriesLabelPosition::UpperLeft | SeriesLabelPosition::UpperRight
    );
    match (log, upper) {
        (false, true) => ys.start..ys.end + share * (ys.end - ys.start),
        (false, false) => ys.start - share * (ys.end - ys.start)..ys.end,
        (true, true) => ys.start..ys.end * (ys.end / ys.start).powf(share),
        (true, false) => ys.start / (ys.end / ys.start).powf(share)..ys.end,
    }
}

/// A tick label: an integral value as an integer, else four significant digits at most.
fn tick(v: &f64) -> String {
    let v = *v;
    if v == v.round() && v.abs() < 1e15 {
        return format!("{v:.0}");
    }
    let decimals = (3 - v.abs().log10().floor() as i32).clamp(0, 12);
    let f = 10f64.powi(decimals);
    format!("{}", (v * f).round() / f)
}

fn draw_series<DB: DrawingBackend, XR, YR>(
    (path, root, axes, series, legend): Drawing<'_, DB>,
    xr: XR,
    yr: YR,
) -> Result<(), Error>
where
    XR: AsRangedCoord<Value = f64>,
    YR: AsRangedCoord<Value = f64>,
    XR::CoordDescType: ValueFormatter<f64>,
    YR::CoordDescType: ValueFormatter<f64>,
{
    let e = |err| plot_err(path, err);
    let mut chart = ChartBuilder::on(root)
        .caption(&axes.title, ("sans-serif", 30))
        .margin(20)
        .x_label_area_size(60)
        .y_label_area_size(90)
        .build_cartesian_2d(xr, yr)
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_label_formatter(&tick)
        .y_label_formatter(&tick)
        .x_desc(&axes.x_label)
        .y_desc(&axes.y_label)
        .label_style(("sans-serif", 18))
        .axis_desc_style(("sans-serif", 22))
        .draw()
        .map_err(e)?;
    for (i, s) in series.iter().enumerate() {
        let c = color(s.color.unwrap_or(i));
        let style = c.stroke_width(3);
        let pts = s.points.clone();
        let anno = match s.mark {
            Mark::Line => chart.draw_series(LineSeries::new(pts, style)).map_err(e)?,
            Mark::Points => chart
                .draw_series(pts.iter().map(|&(x, y)| Circle::new((x, y), 6, c.filled())))
                .map_err(e)?,
            Mark::LinePoints => {
                chart
                    .draw_series(LineSeries::new(pts.clone(), style))
                    .map_err(e)?;
                chart
                    .draw_series(pts.iter().map(|&(x, y)| Circle::new((x, y), 5, c.filled())))
                    .map_err(e)?
            }
        };
        if !s.label.is_empty() {
            let mark = s.mark;
            anno.label(s.label.clone())
                .legend(move |(x, y)| match mark {
                    Mark::Points => Circle::new((x + 10, y), 6, c.filled()).into_dyn(),
                    _ => PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(3)).into_dyn(),
                });
        }
        if let Some(err) = &s.err {
            chart
                .draw_series(s.points.iter().zip(err).map(|(&(x, y), &(lo, hi))| {
                    ErrorBar::new_vertical(x, lo, y, hi, c.stroke_width(2), 12)
                }))
                .map_err(e)?;
        }
    }
    if series.iter().any(|s| !s.label.is_empty()) {
        chart
            .configure_series_labels()
            .label_font(("sans-serif", 18))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(legend)
            .draw()
            .map_err(e)?;
    }
    Ok(())
}

/// Empirical CDFs of several samples, as step lines.
pub fn cdf_chart(path: &Path, axes: &Axes, samples: &[(String, Vec<f64>)]) -> Result<(), Error> {
    let series: Vec<Series> = samples
        .iter()
        .map(|(label, v)| {
            let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
            v.sort_by(f64::total_cmp);
            Series::line(label, cdf_points(&v))
        })
        .collect();
    line_chart(path, axes, &series)
}

/// Steps of a drawn CDF at most: beyond, a curve joins every `stride`-th sample (a step of at
/// most 0.1 % in probability, invisible at the plot's size), so an SVG of 10,000 samples a
/// curve stays small.
const CDF_STEPS: usize = 1000;

/// The empirical CDF of sorted `v` as a staircase (every sample a step), or, past
/// [`CDF_STEPS`] samples, the line through every `stride`-th step's corners, ending at the
/// largest sample.
fn cdf_points(v: &[f64]) -> Vec<(f64, f64)> {
    let n = v.len() as f64;
    let stride = v.len().div_ceil(CDF_STEPS).max(1);
    let mut pts = Vec::with_capacity(2 * CDF_STEPS.min(v.len()));
    for i in (0..v.len()).step_by(stride) {
        let next = (i + stride).min(v.len());
        pts.push((v[i], i as f64 / n));
        pts.push((v[next - 1], next as f64 / n));
    }
    pts
}

/// A bar chart of labelled values (bars start at zero).
pub fn bar_chart(path: &Path, axes: &Axes, labels: &[String], values: &[f64]) -> Result<(), Error> {
    let hi = values
        .iter()
        .copied()
        .filter(|v| v.is_finite())
        .fold(0.0_f64, f64::max);
    let lo = values
        .iter()
        .copied()
        .filter(|v| v.is_finite())
        .fold(0.0_f64, f64::min);
    let pad = 0.08 * (hi - lo).max(f64::MIN_POSITIVE);
    let n = labels.len().max(1);
    render!(path, |root| {
        let e = |err| plot_err(path, err);
        let mut chart = ChartBuilder::on(root)
            .caption(&axes.title, ("sans-serif", 30))
            .margin(20)
            .x_label_area_size(60)
            .y_label_area_size(90)
            .build_cartesian_2d(
                -0.5..n as f64 - 0.5,
                (lo - if lo < 0.0 { pad } else { 0.0 })..hi + pad,
            )
            .map_err(e)?;
        let names = labels.to_vec();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n)
            .x_label_formatter(&|x| {
                let i = x.round();
                if (x - i).abs() < 1e-6 && i >= 0.0 {
                    names.get(i as usize).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .x_desc(&axes.x_label)
            .y_desc(&axes.y_label)
            .label_style(("sans-serif", 18))
            .axis_desc_style(("sans-serif", 22))
            .draw()
            .map_err(e)?;
        chart
            .draw_series(values.iter().enumerate().map(|(i, &v)| {
                let x = i as f64;
                Rectangle::new([(x - 0.35, 0.0), (x + 0.35, v)], color(i).filled())
            }))
            .map_err(e)?;
        Ok(())
    })
}

/// A heatmap (e.g. a confusion matrix: rows true, columns predicted), each cell annotated with
/// its value; colour scales from white (min) to blue (max).
pub fn heatmap(
    path: &Path,
    axes: &Axes,
    row_labels: &[String],
    col_labels: &[String],
    values: &[Vec<f64>],
) -> Result<(), Error> {
    let rows = values.len();
    let cols = values.iter().map(Vec::len).max().unwrap_or(0);
    if rows == 0 || cols == 0 {
        return Err(Error::EmptyHeatmap);
    }
    let finite = values.iter().flatten().copied().filter(|v| v.is_finite());
    let (lo, hi) = finite.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
        (a.min(v), b.max(v))
    });
    render!(path, |root| {
        let e = |err| plot_err(path, err);
        let mut chart = ChartBuilder::on(root)
            .caption(&axes.title, ("sans-serif", 30))
            .margin(20)
            .x_label_area_size(60)
            .y_label_area_size(110)
            .build_cartesian_2d(0.0..cols as f64, 0.0..rows as f64)
            .map_err(e)?;
        let (rl, cl) = (row_labels.to_vec(), col_labels.to_vec());
        let pick = |names: &[String], v: f64, n: usize, flip: bool| {
            let f = v - 0.5;
            let i = f.round();
            if (f - i).abs() > 1e-6 || i < 0.0 || i as usize >= n {
                return String::new();
            }
            let i = if flip { n - 1 - i as usize } else { i as usize };
            names.get(i).cloned().unwrap_or_else(|| i.to_string())
        };
        chart
            .configure_mesh()
            .disable_mesh()
            .x_labels(2 * cols + 1)
            .y_labels(2 * rows + 1)
            .x_label_formatter(&|v| pick(&cl, *v, cols, false))
            .y_label_formatter(&|v| pick(&rl, *v, rows, true))
            .x_desc(&axes.x_label)
            .y_desc(&axes.y_label)
            .label_style(("sans-serif", 18))
            .axis_desc_style(("sans-serif", 22))
            .draw()
            .map_err(e)?;
        let span = if hi > lo { hi - lo } else { 1.0 };
        for (r, row) in values.iter().enumerate() {
            let y = (rows - 1 - r) as f64;
            for (c, &v) in row.iter().enumerate() {
                let t = if v.is_finite() { (v - lo) / span } else { 0.0 };
                let fill = RGBColor(
                    (255.0 * (1.0 - 0.9 * t)) as u8,
                    (255.0 * (1.0 - 0.6 * t)) as u8,
                    (255.0 * (1.0 - 0.25 * t)) as u8,
                );
                let x = c as f64;
                chart
                    .draw_series(std::iter::once(Rectangle::new(
                        [(x, y), (x + 1.0, y + 1.0)],
                        fill.filled(),
                    )))
                    .map_err(e)?;
                let ink = if t > 0.6 { WHITE } else { BLACK };
                let label = if v.fract() == 0.0 && v.abs() < 1e9 {
                    format!("{v:.0}")
                } else {
                    format!("{v:.3}")
                };
                chart
                    .draw_series(std::iter::once(Text::new(
                        label,
                        (x + 0.5, y + 0.5),
                        ("sans-serif", 20).into_font().color(&ink).pos(
                            plotters::style::text_anchor::Pos::new(
                                plotters::style::text_anchor::HPos::Center,
                                plotters::style::text_anchor::VPos::Center,
                            ),
                        ),
                    )))
                    .map_err(e)?;
            }
        }
        Ok(())
    })
}

/// A reliability (calibration) plot: points (predicted, observed) with the y = x diagonal.
pub fn reliability(
    path: &Path,
    axes: &Axes,
    label: &str,
    points: &[(f64, f64)],
) -> Result<(), Error> {
    let all = points.iter().flat_map(|p| [p.0, p.1]);
    let r = bounds(all, axes.log_x || axes.log_y);
    let diag = if axes.log_x || axes.log_y {
        let (a, b) = (r.start.ln(), r.end.ln());
        (0..=100)
            .map(|i| (a + (b - a) * i as f64 / 100.0).exp())
            .map(|v| (v, v))
            .collect()
    } else {
        vec![(r.start, r.start), (r.end, r.end)]
    };
    let series = [
        Series::line("y = x", diag).with_color(6),
        Series::points(label, points.to_vec()).with_color(0),
    ];
    // Same range on both axes: pad the data with the diagonal's end points.
    line_chart(path, axes, &series)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CDF keeps every step up to [`CDF_STEPS`] samples; beyond, at most that many, from the
    /// smallest sample at 0 to the largest at 1, never decreasing.
    #[test]
    fn cdf_points_are_the_staircase_or_at_most_cdf_steps_of_it() {
        let small = [1.0, 2.0, 4.0];
        assert_eq!(
            cdf_points(&small),
            vec![
                (1.0, 0.0),
                (1.0, 1.0 / 3.0),
                (2.0, 1.0 / 3.0),
                (2.0, 2.0 / 3.0),
                (4.0, 2.0 / 3.0),
                (4.0, 1.0)
            ]
        );
        let big: Vec<f64> = (0..12_345).map(f64::from).collect();
        let pts = cdf_points(&big);
        assert!(pts.len() <= 2 * CDF_STEPS, "{}", pts.len());
        assert_eq!(pts[0], (0.0, 0.0));
        assert_eq!(*pts.last().unwrap(), (12_344.0, 1.0));
        assert!(pts.windows(2).all(|w| w[1].0 >= w[0].0 && w[1].1 >= w[0].1));
    }

    fn png_ok(path: &Path) {
        let bytes = std::fs::read(path).unwrap();
        assert!(
            bytes.starts_with(b"\x89PNG"),
            "{} is not a PNG",
            path.display()
        );
        assert!(
            bytes.len() > 5_000,
            "{} is suspiciously small",
            path.display()
        );
    }

    #[test]
    fn the_axis_makes_room_for_the_legend_on_its_side() {
        let s = [Series::line("a", vec![]), Series::line("b", vec![])];
        let up = legend_room(0.0..1.0, &SeriesLabelPosition::UpperLeft, &s, false);
        assert!(up.start == 0.0 && (up.end - 1.13).abs() < 1e-12, "{up:?}");
        let down = legend_room(0.0..1.0, &SeriesLabelPosition::LowerRight, &s, false);
        assert!(
            (down.start + 0.13).abs() < 1e-12 && down.end == 1.0,
            "{down:?}"
        );
        let none = legend_room(0.0..1.0, &SeriesLabelPosition::UpperLeft, &[], false);
        assert_eq!(none, 0.0..1.0);
    }

    #[test]
    fn ticks_print_integers_as_integers() {
        assert_eq!(tick(&3.0), "3");
        assert_eq!(tick(&512.0), "512");
        assert_eq!(tick(&0.5), "0.5");
        assert_eq!(tick(&0.30000000000000004), "0.3");
        assert_eq!(tick(&1.23456), "1.235");
    }

    #[test]
    fn the_legend_goes_to_the_emptiest_corner() {
        let axes = Axes::new("t", "x", "y");
        // Points rising from lower left to upper right: the upper left and lower right are
        // empty; ties keep the upper left.
        let s = [Series::line("a", vec![(0.0, 0.0), (1.0, 1.0)])];
        let pos = legend_corner(&s, &axes, (&(0.0..1.0), &(0.0..1.0)));
        assert!(matches!(pos, SeriesLabelPosition::UpperLeft));
        // Falling points with one in the upper left: the legend moves to the lower left.
        let s = [Series::line(
            "a",
            vec![(0.0, 1.0), (0.2, 0.9), (1.0, 0.0), (0.9, 0.9)],
        )];
        let pos = legend_corner(&s, &axes, (&(0.0..1.0), &(0.0..1.0)));
        assert!(matches!(pos, SeriesLabelPosition::LowerLeft), "{pos:?}");
    }

    #[test]
    fn intervals_keep_their_asymmetry_and_half_widths_become_intervals() {
        let s = Series::line("a", vec![(1.0, 2.0), (2.0, 3.0)]);
        let sym = s.clone().with_err(vec![0.5, 1.0]);
        assert_eq!(sym.err, Some(vec![(1.5, 2.5), (2.0, 4.0)]));
        let asym = s.with_interval(vec![(1.9, 2.6), (2.0, 3.1)]);
        assert_eq!(asym.err, Some(vec![(1.9, 2.6), (2.0, 3.1)]));
    }

    #[test]
    fn every_chart_kind_renders_a_png() {
        let dir = std::env::temp_dir().join(format!("trail-plot-{}", std::process::id()));
        let axes = Axes::new("E[T] vs load", "load", "mean response");
        let s = vec![
            Series::line("closed form", vec![(0.5, 1.0), (0.7, 2.0), (0.9, 6.0)]),
            Series::points("simulated", vec![(0.5, 1.01), (0.7, 1.98), (0.9, 6.1)])
                .with_err(vec![0.02, 0.05, 0.3])
                .with_color(0),
        ];
        line_chart(&dir.join("line.png"), &axes, &s).unwrap();
        line_chart(&dir.join("loglog.png"), &axes.clone().log_x().log_y(), &s).unwrap();
        cdf_chart(
            &dir.join("cdf.png"),
            &Axes::new("CDF", "x", "F"),
            &[("a".into(), vec![3.0, 1.0, 2.0])],
        )
        .unwrap();
        bar_chart(
            &dir.join("bar.png"),
            &Axes::new("bars", "policy", "E[T]"),
            &["fcfs".into(), "srpt".into()],
            &[2.0, 1.0],
        )
        .unwrap();
        heatmap(
            &dir.join("heat.png"),
            &Axes::new("confusion", "predicted", "true"),
            &["0".into(), "1".into()],
            &["0".into(), "1".into()],
            &[vec![10.0, 2.0], vec![3.0, 7.0]],
        )
        .unwrap();
        reliability(
            &dir.join("rel.png"),
            &Axes::new("reliability", "predicted", "observed"),
            "bins",
            &[(1.0, 1.2), (2.0, 1.8)],
        )
        .unwrap();
        for f in ["line", "loglog", "cdf", "bar", "heat", "rel"] {
            png_ok(&dir.join(format!("{f}.png")));
            let svg = std::fs::read_to_string(dir.join(format!("{f}.svg"))).unwrap();
            assert!(svg.starts_with("<svg") && svg.contains("</svg>"), "{f}.svg");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
