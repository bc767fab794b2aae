//! Forecasters: from the per-second arrival rates seen so far to the *peak* rate expected in
//! the next interval, which is what a plan must carry.
//!
//! Pure functions of the history, so that the controller, the simulator and the evaluation
//! call the same code. All but `peak-window` work on the series of per-interval peaks (the
//! history cut into `horizon_s`-second chunks, aligned to its end).

/// Predicts the peak arrival rate (req/s) of the next `horizon_s` seconds from per-second
/// arrival counts, oldest first.
pub trait Forecaster: Send + Sync {
    fn name(&self) -> &'static str;
    fn forecast(&self, history: &[f64], horizon_s: usize) -> f64;
}

/// Which forecaster a round uses: part of the round's configuration ([`crate::adapt::AdaptConfig`]),
/// so that the controller and the simulator run the same one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ForecasterKind {
    /// The peak of the lookback window with its sure trend, times the headroom.
    #[default]
    PeakWindow,
    Last,
    Ewma,
    Holt,
}

impl ForecasterKind {
    pub const NAMES: &'static str = "peak-window, last, ewma or holt";

    pub fn name(self) -> &'static str {
        match self {
            Self::PeakWindow => "peak-window",
            Self::Last => "last",
            Self::Ewma => "ewma",
            Self::Holt => "holt",
        }
    }
}

impl std::fmt::Display for ForecasterKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for ForecasterKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "peak-window" => Self::PeakWindow,
            "last" => Self::Last,
            "ewma" => Self::Ewma,
            "holt" => Self::Holt,
            other => return Err(format!("unknown forecaster {other:?}: {}", Self::NAMES)),
        })
    }
}

/// Peaks of consecutive `horizon_s`-second chunks of `history`, aligned to its end (the
/// oldest, partial chunk is dropped unless it is the only one).
pub fn interval_peaks(history: &[f64], horizon_s: usize) -> Vec<f64> {
    let h = horizon_s.max(1);
    let full = history.len() / h;
    if full == 0 {
        return if history.is_empty() { vec![] } else { vec![history.iter().copied().fold(0.0, f64::max)] };
    }
    let start = history.len() - full * h;
    history[start..].chunks(h).map(|c| c.iter().copied().fold(0.0, f64::max)).collect()
}

/// The last interval's peak.
pub struct LastValue;

impl Forecaster for LastValue {
    fn name(&self) -> &'static str {
        "last"
    }
    fn forecast(&self, history: &[f64], horizon_s: usize) -> f64 {
        interval_peaks(history, horizon_s).last().copied().unwrap_or(0.0)
    }
}

/// Exponentially weighted moving average of the interval peaks.
pub struct Ewma {
    pub alpha: f64,
}

impl Forecaster for Ewma {
    fn name(&self) -> &'static str {
        "ewma"
    }
    fn forecast(&self, history: &[f64], horizon_s: usize) -> f64 {
        let peaks = interval_peaks(history, horizon_s);
        let mut it = peaks.iter();
        let Some(&first) = it.next() else { return 0.0 };
        it.fold(first, |s, &x| self.alpha * x + (1.0 - self.alpha) * s)
    }
}

/// Holt's linear trend (double exponential smoothing) on the interval peaks, one step ahead.
pub struct Holt {
    pub alpha: f64,
    pub beta: f64,
}

impl Forecaster for Holt {
    fn name(&self) -> &'static str {
        "holt"
    }
    fn forecast(&self, history: &[f64], horizon_s: usize) -> f64 {
        let peaks = interval_peaks(history, horizon_s);
        let (mut level, mut trend) = match peaks.as_slice() {
            [] => return 0.0,
            [only] => return *only,
            [a, b, ..] => (*b, b - a),
        };
        for &x in &peaks[2..] {
            let previous = level;
            level = self.alpha * x + (1.0 - self.alpha) * (level + trend);
            trend = self.beta * (level - previous) + (1.0 - self.beta) * trend;
        }
        (level + trend).max(0.0)
    }
}

/// The highest rate of the last `window_s` seconds, as a mean over `smooth_s` seconds, plus
/// the rising trend carried to the end of the horizon, raised by `headroom`.
///
/// - The peak is of `smooth_s`-second means ([`SMOOTH_S`] by default): the counts of single
///   seconds scatter around the rate (a Poisson load of 150 req/s has seconds of 180 within a
///   minute), which planning for the peak of single seconds pays for in cores.
/// - The trend is the least-squares slope of the window (req/s per second), as far as it surely
///   rises (see [`sure_rise`]) over the whole window and over its recent half, times the seconds from the latest mean's centre to the end of
///   the horizon (no more than the window's length); it sees only the history it is given,
///   which starts at a task's first report.
/// - Biased towards over- rather than under-prediction (an under-prediction costs SLO
///   violations, an over-prediction only cores).
pub struct PeakWindow {
    pub window_s: usize,
    pub headroom: f64,
    pub smooth_s: usize,
}

/// Seconds the default forecaster averages a rate over: 1, the peak of single seconds. With
/// 5, a flat Poisson load is planned within +8 % of rate × headroom (+31 % with 1, at 150
/// req/s), but replays of the Twitter trace in the simulator had 2.4× the SLO violations on
/// 12 % fewer cores (0.22 % against 0.09 % over a day at 48 cores): the trace's own
/// second-to-second peaks are real load, which a queue of a 750 ms SLO does not ride out.
pub const SMOOTH_S: usize = 1;

impl Default for PeakWindow {
    fn default() -> Self {
        Self { window_s: 60, headroom: 1.1, smooth_s: SMOOTH_S }
    }
}

impl Forecaster for PeakWindow {
    fn name(&self) -> &'static str {
        "peak-window"
    }
    fn forecast(&self, history: &[f64], horizon_s: usize) -> f64 {
        let window = &history[history.len().saturating_sub(self.window_s.max(1))..];
        if window.is_empty() {
            return 0.0;
        }
        let k = self.smooth_s.clamp(1, window.len());
        let peak = window.windows(k).map(mean).fold(0.0, f64::max);
        // From the latest mean's centre to the end of the horizon, but no further ahead than
        // the history the slope was taken from reaches back.
        let reach = (horizon_s as f64 + (k - 1) as f64 / 2.0).min(window.len() as f64);
        // A ramp rises over the whole window and over its recent half alike; a step rises over
        // the whole window only, until it is in the recent half, and is no trend after it.
        let recent = &window[window.len() / 2..];
        let trend = sure_rise(window).min(sure_rise(recent)) * reach;
        (peak + trend) * self.headroom
    }
}

/// How far the least-squares slope of `ys` over their indices surely rises: the slope less one
/// standard error (about 84 % one-sided), so that the scatter of a flat load's seconds mostly
/// does not read as a trend (two standard errors left more of the demo's burst onset
/// unplanned); 0 for fewer than three points or no sure rise.
fn sure_rise(ys: &[f64]) -> f64 {
    if ys.len() < 3 {
        return 0.0;
    }
    let n = ys.len() as f64;
    let x_mean = (n - 1.0) / 2.0;
    let y_mean = mean(ys);
    let (mut cov, mut var) = (0.0, 0.0);
    for (i, &y) in ys.iter().enumerate() {
        let dx = i as f64 - x_mean;
        cov += dx * (y - y_mean);
        var += dx * dx;
    }
    let slope = cov / var;
    let residuals: f64 = ys.iter().enumerate().map(|(i, &y)| (y - y_mean - slope * (i as f64 - x_mean)).powi(2)).sum();
    let standard_error = (residuals / (n - 2.0) / var).sqrt();
    (slope - 1.0 * standard_error).max(0.0)
}

fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        0.0
    } else {
        xs.iter().sum::<f64>() / xs.len() as f64
    }
}

/// Seconds of arrivals a surge is judged on.
pub const SURGE_WINDOW_S: usize = 2;

/// Whether the mean arrival rate of the last `window_s` seconds of `history` exceeds the rate
/// the plan was sized for: a burst the forecast missed, which should be re-planned at once
/// rather than a whole interval later.
pub fn is_surge(history: &[f64], planned_rps: f64, window_s: usize) -> bool {
    let window = &history[history.len().saturating_sub(window_s.max(1))..];
    !window.is_empty() && mean(window) > planned_rps.max(crate::solver::MIN_PLANNED_RPS)
}

/// Hysteresis on the rate a plan is sized for: a rise takes effect at once, a fall only once
/// the forecast has stayed below the planned rate for `rounds` adaptation rounds in a row, and
/// then only down to the highest of those lower forecasts. Scaling down on one low forecast
/// would swap variants (a model load each time) on every dip and be caught short by the next
/// rise; InfAdapter waits for four lower forecasts.
#[derive(Debug, Clone, PartialEq)]
pub struct ScaleDownStabiliser {
    pub rounds: u32,
    planned: Option<f64>,
    below: u32,
    below_max: f64,
}

impl ScaleDownStabiliser {
    pub fn new(rounds: u32) -> Self {
        Self { rounds, planned: None, below: 0, below_max: 0.0 }
    }

    /// The rate to plan for this round, given the round's forecast.
    pub fn next(&mut self, forecast: f64) -> f64 {
        match self.planned {
            Some(planned) if forecast < planned => {
                self.below += 1;
                self.below_max = self.below_max.max(forecast);
                if self.below < self.rounds {
                    return planned;
                }
                let lowered = self.below_max;
                self.reset(lowered);
                lowered
            }
            _ => {
                self.reset(forecast);
                forecast
            }
        }
    }

    fn reset(&mut self, planned: f64) {
        self.planned = Some(planned);
        self.below = 0;
        self.below_max = 0.0;
    }
}

/// How a forecaster did on a trace: one forecast per interval, scored against the interval's
/// real peak.
#[derive(Debug, Clone, PartialEq)]
pub struct Accuracy {
    pub intervals: usize,
    /// Mean absolute percentage error over intervals with a non-zero peak.
    pub mape_pct: f64,
    /// Share of intervals whose peak was above the forecast.
    pub under_pct: f64,
    /// Mean forecast over mean real peak: the capacity an over-predicting forecaster buys.
    pub over_provision: f64,
}

/// Replays `rates` (per second) in intervals of `interval_s`: before each interval the
/// forecaster sees the last `lookback_s` seconds.
pub fn evaluate(f: &dyn Forecaster, rates: &[f64], interval_s: usize, lookback_s: usize) -> Accuracy {
    let interval_s = interval_s.max(1);
    let (mut n, mut n_ape, mut ape, mut under, mut sum_f, mut sum_peak) = (0, 0, 0.0, 0, 0.0, 0.0);
    let mut t = interval_s;
    while t + interval_s <= rates.len() {
        let history = &rates[t.saturating_sub(lookback_s)..t];
        let predicted = f.forecast(history, interval_s);
        let peak = rates[t..t + interval_s].iter().copied().fold(0.0, f64::max);
        n += 1;
        if peak > 0.0 {
            n_ape += 1;
            ape += (predicted - peak).abs() / peak;
        }
        if predicted < peak {
            under += 1;
        }
        sum_f += predicted;
        sum_peak += peak;
        t += interval_s;
    }
    Accuracy {
        intervals: n,
        mape_pct: if n_ape > 0 { 100.0 * ape / n_ape as f64 } else { 0.0 },
        under_pct: if n > 0 { 100.0 * under as f64 / n as f64 } else { 0.0 },
        over_provision: if sum_peak > 0.0 { sum_f / sum_peak } else { 0.0 },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_surge_is_a_mean_above_the_planned_rate() {
        assert!(!is_surge(&[], 10.0, 2));
        assert!(!is_surge(&[100.0, 40.0, 60.0], 55.0, 2), "a mean of 50 is within 55");
        assert!(is_surge(&[0.0, 40.0, 60.0], 45.0, 2));
        assert!(!is_surge(&[0.5], 0.0, 2), "below the least planned rate");
    }

    #[test]
    fn an_empty_history_forecasts_no_load() {
        assert_eq!(LastValue.forecast(&[], 30), 0.0);
        assert_eq!(Ewma { alpha: 0.5 }.forecast(&[], 30), 0.0);
        assert_eq!(Holt { alpha: 0.5, beta: 0.5 }.forecast(&[], 30), 0.0);
        assert_eq!(PeakWindow::default().forecast(&[], 30), 0.0);
    }

    #[test]
    fn interval_peaks_align_to_the_end() {
        assert_eq!(interval_peaks(&[9.0, 1.0, 2.0, 3.0, 4.0], 2), vec![2.0, 4.0]);
        assert_eq!(interval_peaks(&[1.0, 5.0], 4), vec![5.0]);
    }

    #[test]
    fn last_and_ewma_follow_the_interval_peaks() {
        let h = [10.0, 10.0, 20.0, 20.0];
        assert_eq!(LastValue.forecast(&h, 2), 20.0);
        assert_eq!(Ewma { alpha: 0.5 }.forecast(&h, 2), 15.0);
    }

    #[test]
    fn holt_extrapolates_a_linear_ramp() {
        let ramp: Vec<f64> = (0..10).map(|i| 10.0 * i as f64).collect();
        let f = Holt { alpha: 0.8, beta: 0.8 }.forecast(&ramp, 1);
        assert!((f - 100.0).abs() < 1e-6, "{f}");
    }

    #[test]
    fn peak_window_covers_the_peak_and_a_rising_trend_over_the_horizon() {
        let one = |window_s, smooth_s| PeakWindow { window_s, headroom: 1.0, smooth_s };
        // No trend in a flat window, whatever its spikes before.
        assert_eq!(one(4, 1).forecast(&[0.0, 50.0, 10.0, 10.0, 10.0, 10.0], 30), 10.0);
        // A ramp of 10 req/s a second is carried to the end of the horizon.
        let ramp: Vec<f64> = (1..=40).map(|i| 10.0 * i as f64).collect();
        assert_eq!(one(40, 1).forecast(&ramp, 30), 400.0 + 10.0 * 30.0);
        assert_eq!(one(40, 1).forecast(&ramp, 5), 400.0 + 10.0 * 5.0);
        // Smoothed over 3 s, the latest mean (390) is a second old.
        assert_eq!(one(40, 3).forecast(&ramp, 5), 390.0 + 10.0 * 6.0);
        // Six seconds of history are extrapolated six seconds, not thirty.
        assert_eq!(one(40, 1).forecast(&ramp[..6], 30), 60.0 + 10.0 * 6.0);
        // A step is no trend once it is in the older half of the window.
        let step: Vec<f64> = (0..40).map(|i| if i < 15 { 20.0 } else { 60.0 }).collect();
        assert_eq!(one(40, 1).forecast(&step, 30), 60.0);
        // A falling load has no trend.
        assert_eq!(one(4, 1).forecast(&[40.0, 30.0, 20.0, 10.0], 30), 40.0);
    }

    /// A flat 150 req/s from a task's first report on, smoothed over 5 s, is planned within the
    /// headroom, although its single seconds scatter (Poisson): over ten minutes of rounds, the
    /// median within +10 % of rate × headroom and all within −10 %…+25 % (the peak of a
    /// minute's 5-second means of a Poisson load is +8 % typically, +16 % at the worst). The
    /// default, the peak of single seconds, plans it at about 1.2 × rate × headroom, never
    /// more than 1.4 ×, and no trend is read into the scatter.
    #[test]
    fn a_flat_poisson_load_is_forecast_within_the_headroom() {
        use rand::{Rng, SeedableRng};
        let f = PeakWindow { smooth_s: 5, ..PeakWindow::default() };
        for seed in 0..4 {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            // Arrivals in a second of a Poisson process of 150 req/s: exponential gaps.
            let mut second = || {
                let (mut t, mut n) = (0.0, 0.0);
                loop {
                    t += -rng.gen_range(f64::EPSILON..1.0f64).ln() / 150.0;
                    if t >= 1.0 {
                        return n;
                    }
                    n += 1.0;
                }
            };
            let seconds: Vec<f64> = (0..600).map(|_| second()).collect();
            let mut ratios: Vec<f64> = (5..=seconds.len())
                .flat_map(|end| [5, 30].map(|h| f.forecast(&seconds[..end], h) / (150.0 * f.headroom)))
                .collect();
            ratios.sort_by(f64::total_cmp);
            let median = ratios[ratios.len() / 2];
            let (least, most) = (ratios[0], ratios[ratios.len() - 1]);
            assert!((1.0..1.1).contains(&median), "seed {seed}: median {median}");
            assert!(least > 0.9 && most < 1.25, "seed {seed}: {least}..{most}");
            let default = PeakWindow::default();
            let mut ratios: Vec<f64> = (60..=seconds.len())
                .flat_map(|end| [5, 30].map(|h| default.forecast(&seconds[..end], h) / (150.0 * f.headroom)))
                .collect();
            ratios.sort_by(f64::total_cmp);
            let (median, most) = (ratios[ratios.len() / 2], ratios[ratios.len() - 1]);
            assert!((1.1..1.3).contains(&median) && most < 1.4, "seed {seed}, single seconds: {median}, {most}");
        }
        assert_eq!(f.forecast(&[150.0; 60], 30), 150.0 * f.headroom);
    }

    #[test]
    fn the_stabiliser_rises_at_once_and_falls_after_enough_lower_rounds() {
        let mut s = ScaleDownStabiliser::new(3);
        assert_eq!(s.next(100.0), 100.0);
        assert_eq!(s.next(150.0), 150.0, "a rise is immediate");
        assert_eq!(s.next(80.0), 150.0);
        assert_eq!(s.next(90.0), 150.0);
        assert_eq!(s.next(70.0), 90.0, "after 3 lower rounds, down to the highest of them");
        assert_eq!(s.next(60.0), 90.0);
        assert_eq!(s.next(95.0), 95.0, "a rise resets the count");
        assert_eq!(ScaleDownStabiliser::new(1).next(5.0), 5.0);
        let mut now = ScaleDownStabiliser::new(1);
        now.next(10.0);
        assert_eq!(now.next(5.0), 5.0, "one round: no hysteresis");
    }

    #[test]
    fn evaluation_scores_under_prediction_and_error() {
        // Peaks alternate 10, 20: "last" is wrong by 100 % or 50 % and under half the time.
        let rates: Vec<f64> = (0..8).flat_map(|i| if i % 2 == 0 { [10.0, 10.0] } else { [20.0, 20.0] }).collect();
        let a = evaluate(&LastValue, &rates, 2, 10);
        assert_eq!(a.intervals, 7);
        assert!((a.under_pct - 100.0 * 4.0 / 7.0).abs() < 1e-9, "{a:?}");
        assert!(a.mape_pct > 50.0);
    }
}
