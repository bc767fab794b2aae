//! SVG plots of simulation runs: offered load, cores and served accuracy per interval, one line
//! per policy.

use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;
use tidal_common::sim::SimReport;

const COLOURS: [RGBColor; 8] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0xe3, 0x77, 0xc2),
    RGBColor(0x7f, 0x7f, 0x7f),
];

/// Three stacked panels over time (hours): load, cores, accuracy.
pub fn timeline(path: &Path, reports: &[SimReport], interval_s: usize, scale: f64) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (1200, 900)).into_drawing_area();
    root.fill(&WHITE).context("drawing the plot")?;
    let panels = root.split_evenly((3, 1));
    let hours = |s: usize| s as f64 / 3600.0;
    let end =
        reports.iter().flat_map(|r| r.intervals.last()).map(|i| hours(i.start_s + interval_s)).fold(0.0, f64::max);
    let Some(first) = reports.first() else { return Ok(()) };

    let load: Vec<(f64, f64)> =
        first.intervals.iter().map(|i| (hours(i.start_s), i.arrivals as f64 / interval_s as f64)).collect();
    let max_load = load.iter().map(|p| p.1).fold(1.0, f64::max);
    let mut chart = ChartBuilder::on(&panels[0])
        .caption(format!("offered load (trace ×{scale}), mean req/s per interval"), ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..end.max(1e-3), 0.0..max_load * 1.1)
        .context("drawing the plot")?;
    chart.configure_mesh().x_desc("hours").y_desc("req/s").draw().context("drawing the plot")?;
    chart.draw_series(LineSeries::new(load, BLACK.stroke_width(1))).context("drawing the plot")?;

    let max_cores = reports.iter().flat_map(|r| r.intervals.iter().map(|i| i.mean_cores)).fold(1.0, f64::max);
    series_panel(&panels[1], reports, "cores in use (mean per interval)", "cores", 0.0..max_cores * 1.1, end, |i| {
        Some(i.mean_cores)
    })?;
    let (lo, hi) = reports
        .iter()
        .flat_map(|r| r.intervals.iter().filter(|i| i.served > 0).map(|i| i.accuracy))
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), a| (lo.min(a), hi.max(a)));
    let range = if lo.is_finite() { (lo - 0.5)..(hi + 0.5) } else { 0.0..100.0 };
    series_panel(&panels[2], reports, "served accuracy (top-1 %, per interval)", "%", range, end, |i| {
        (i.served > 0).then_some(i.accuracy)
    })?;
    root.present().with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn series_panel(
    area: &DrawingArea<SVGBackend, plotters::coord::Shift>,
    reports: &[SimReport],
    caption: &str,
    y_desc: &str,
    y: std::ops::Range<f64>,
    end: f64,
    value: impl Fn(&tidal_common::sim::IntervalStats) -> Option<f64>,
) -> anyhow::Result<()> {
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..end.max(1e-3), y)
        .context("drawing the plot")?;
    chart.configure_mesh().x_desc("hours").y_desc(y_desc).draw().context("drawing the plot")?;
    for (k, r) in reports.iter().enumerate() {
        let colour = COLOURS[k % COLOURS.len()];
        let points: Vec<(f64, f64)> =
            r.intervals.iter().filter_map(|i| value(i).map(|v| (i.start_s as f64 / 3600.0, v))).collect();
        chart
            .draw_series(LineSeries::new(points, colour.stroke_width(1)))
            .context("drawing the plot")?
            .label(r.policy.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], colour));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .context("drawing the plot")?;
    Ok(())
}
