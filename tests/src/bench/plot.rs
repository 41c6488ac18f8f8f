//! PNG plots of the benchmark results (plotters, bitmap backend, text drawn with ab_glyph from a system TTF).

use std::path::Path;

use anyhow::{Context, Result, anyhow};
use plotters::prelude::*;

const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

/// Registers a sans-serif font once (`BENCH_FONT` or a DejaVu/Liberation TTF; Debian: `fonts-dejavu-core`).
pub fn init_font() -> Result<()> {
    static DONE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        let candidates: Vec<String> = std::env::var("BENCH_FONT")
            .into_iter()
            .chain(FONT_PATHS.iter().map(|p| p.to_string()))
            .collect();
        let path = candidates
            .iter()
            .find(|p| Path::new(p).is_file())
            .ok_or_else(|| {
                format!(
                    "no TTF font for the plots: set BENCH_FONT or install fonts-dejavu-core (looked in {})",
                    candidates.join(", ")
                )
            })?;
        let bytes: &'static [u8] = Box::leak(
            std::fs::read(path)
                .map_err(|e| format!("{path}: {e}"))?
                .into_boxed_slice(),
        );
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| format!("{path} is not a usable TTF font"))
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// One named line.
pub struct Series {
    /// Legend.
    pub name: String,
    /// Points, in x order.
    pub points: Vec<(f64, f64)>,
}

/// A horizontal reference line (a target or a limit).
pub struct Level {
    /// Legend.
    pub name: String,
    /// Its y.
    pub y: f64,
}

/// A line chart.
pub struct LineChart<'a> {
    /// Title.
    pub title: &'a str,
    /// X axis label.
    pub x_label: &'a str,
    /// Y axis label.
    pub y_label: &'a str,
    /// The lines.
    pub series: Vec<Series>,
    /// Reference lines, dashed.
    pub levels: Vec<Level>,
    /// Log-scale x (latency distributions over decades).
    pub log_x: bool,
}

fn bounds(values: impl Iterator<Item = f64>, log: bool) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite() && (!log || *v > 0.0)) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return if log { (1.0, 10.0) } else { (0.0, 1.0) };
    }
    if log {
        (lo / 1.2, hi * 1.2)
    } else {
        let pad = ((hi - lo) * 0.05).max(1e-9);
        (if lo >= 0.0 { 0.0 } else { lo - pad }, hi + pad)
    }
}

/// Draws `chart` to `path` (800x500 PNG).
pub fn lines(path: &Path, chart: &LineChart<'_>) -> Result<()> {
    init_font()?;
    let root = BitMapBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let xs = chart
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0));
    let ys = chart
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .chain(chart.levels.iter().map(|l| l.y));
    let (x0, x1) = bounds(xs, chart.log_x);
    let (y0, y1) = bounds(ys, false);
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(chart.title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70);
    macro_rules! draw {
        ($ctx:expr) => {{
            let mut ctx = $ctx;
            ctx.configure_mesh()
                .x_desc(chart.x_label)
                .y_desc(chart.y_label)
                .label_style(("sans-serif", 14))
                .draw()?;
            for (i, s) in chart.series.iter().enumerate() {
                let color = PALETTE[i % PALETTE.len()];
                ctx.draw_series(LineSeries::new(
                    s.points.iter().copied(),
                    color.stroke_width(2),
                ))?
                .label(s.name.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
            }
            for (i, l) in chart.levels.iter().enumerate() {
                let color = PALETTE[(chart.series.len() + i) % PALETTE.len()];
                let y = l.y;
                ctx.draw_series(DashedLineSeries::new(
                    [(x0, y), (x1, y)],
                    8,
                    5,
                    color.stroke_width(2),
                ))?
                .label(l.name.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
            }
            ctx.configure_series_labels()
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .label_font(("sans-serif", 14))
                .position(SeriesLabelPosition::LowerRight)
                .draw()?;
        }};
    }
    if chart.log_x {
        draw!(builder.build_cartesian_2d((x0..x1).log_scale(), y0..y1)?);
    } else {
        draw!(builder.build_cartesian_2d(x0..x1, y0..y1)?);
    }
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// A bar's height and its whisker: (median, lowest run, highest run).
pub type Bar = (f64, f64, f64);

/// Grouped bars: per series, one bar a group.
pub struct Bars<'a> {
    /// Title.
    pub title: &'a str,
    /// Y axis label.
    pub y_label: &'a str,
    /// Group names along x.
    pub groups: Vec<String>,
    /// Per series: its name and, per group, (median, min, max).
    pub series: Vec<(String, Vec<Bar>)>,
}

/// Draws grouped bars with whiskers over the runs' range, log-scale y, to `path`.
pub fn bars(path: &Path, chart: &Bars<'_>) -> Result<()> {
    init_font()?;
    let root = BitMapBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let values = chart
        .series
        .iter()
        .flat_map(|(_, v)| v.iter().flat_map(|&(m, lo, hi)| [m, lo, hi]));
    let (y0, y1) = bounds(values, true);
    let groups = chart.groups.len().max(1);
    let mut ctx = ChartBuilder::on(&root)
        .caption(chart.title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(0f64..groups as f64, (y0..y1).log_scale())?;
    let names = chart.groups.clone();
    ctx.configure_mesh()
        .disable_x_mesh()
        .x_labels(groups * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - i as f64 - 0.5).abs() < 1e-6 && i < names.len() {
                names[i].clone()
            } else {
                String::new()
            }
        })
        .y_desc(chart.y_label)
        .label_style(("sans-serif", 14))
        .draw()?;
    let width = 0.8 / chart.series.len().max(1) as f64;
    for (s, (name, values)) in chart.series.iter().enumerate() {
        let color = PALETTE[s % PALETTE.len()];
        let left = |g: usize| g as f64 + 0.1 + s as f64 * width;
        ctx.draw_series(values.iter().enumerate().map(|(g, &(m, _, _))| {
            Rectangle::new([(left(g), y0), (left(g) + width * 0.9, m)], color.filled())
        }))?
        .label(name.clone())
        .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));
        ctx.draw_series(values.iter().enumerate().map(|(g, &(_, lo, hi))| {
            let x = left(g) + width * 0.45;
            PathElement::new(vec![(x, lo), (x, hi)], BLACK.stroke_width(2))
        }))?;
    }
    ctx.configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// The empirical cumulative distribution of `values` (sorted x, share at or below), for latency plots.
pub fn ecdf(values: &[f64]) -> Vec<(f64, f64)> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len() as f64;
    sorted
        .into_iter()
        .enumerate()
        .map(|(i, v)| (v, (i + 1) as f64 / n))
        .collect()
}
