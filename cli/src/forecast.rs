//! `tidalctl forecast`: scores every forecaster on a rate trace — one forecast of the next
//! interval's peak per interval — and prints a table.

use std::path::PathBuf;

use tidal_common::forecast::{evaluate, Ewma, Forecaster, Holt, LastValue, PeakWindow};

#[derive(clap::Args)]
pub struct ForecastOpts {
    /// Rate trace: one integer per line, the requests in that second.
    #[arg(long)]
    pub trace: PathBuf,
    /// Adaptation interval: each forecast predicts the peak of the next this many seconds.
    #[arg(long, default_value_t = 30)]
    pub interval_s: usize,
    /// Seconds of history each forecaster sees.
    #[arg(long, default_value_t = 600)]
    pub lookback_s: usize,
    /// First trace line (0-based) and how many seconds to score (default: all).
    #[arg(long, default_value_t = 0)]
    pub start: usize,
    /// Trace seconds to score (default: to the end).
    #[arg(long)]
    pub duration: Option<usize>,
}

/// The forecasters compared, with the settings they are scored at.
pub fn candidates(interval_s: usize) -> Vec<(String, Box<dyn Forecaster>)> {
    vec![
        ("last".into(), Box::new(LastValue)),
        ("ewma α=0.5".into(), Box::new(Ewma { alpha: 0.5 })),
        ("holt α=0.5 β=0.3".into(), Box::new(Holt { alpha: 0.5, beta: 0.3 })),
        (
            format!("peak-window {}s ×1.0", 2 * interval_s),
            Box::new(PeakWindow { window_s: 2 * interval_s, headroom: 1.0, ..PeakWindow::default() }),
        ),
        (
            format!("peak-window {}s ×1.1", 2 * interval_s),
            Box::new(PeakWindow { window_s: 2 * interval_s, headroom: 1.1, ..PeakWindow::default() }),
        ),
        (
            format!("peak-window {}s ×1.1", 4 * interval_s),
            Box::new(PeakWindow { window_s: 4 * interval_s, headroom: 1.1, ..PeakWindow::default() }),
        ),
    ]
}

pub fn run(opts: ForecastOpts) -> anyhow::Result<()> {
    let rates = crate::load::read_trace(&opts.trace, opts.start, opts.duration)?;
    println!(
        "{} s of trace from line {}, forecasting each {} s interval's peak from the last {} s",
        rates.len(),
        opts.start + 1,
        opts.interval_s,
        opts.lookback_s
    );
    println!(
        "{:<24} {:>10} {:>9} {:>16} {:>15}",
        "forecaster", "intervals", "MAPE %", "under-predicted %", "mean f / peak"
    );
    for (name, f) in candidates(opts.interval_s) {
        let a = evaluate(f.as_ref(), &rates, opts.interval_s, opts.lookback_s);
        println!(
            "{:<24} {:>10} {:>9.1} {:>16.1} {:>15.2}",
            name, a.intervals, a.mape_pct, a.under_pct, a.over_provision
        );
    }
    Ok(())
}
