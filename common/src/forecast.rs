//! Forecasters: from the per-second arrival rates seen so far to the *peak* rate expected in
//! the next interval, which is what a plan must carry.
//!
//! Pure functions of the history, so that the controller and the simulator call the same code.

/// Predicts the peak arrival rate (req/s) of the next `horizon_s` seconds from per-second
/// arrival counts, oldest first.
pub trait Forecaster: Send + Sync {
    fn name(&self) -> &'static str;
    fn forecast(&self, history: &[f64], horizon_s: usize) -> f64;
}

/// The last second's rate.
pub struct LastValue;

impl Forecaster for LastValue {
    fn name(&self) -> &'static str {
        "last"
    }
    fn forecast(&self, history: &[f64], _horizon_s: usize) -> f64 {
        history.last().copied().unwrap_or(0.0)
    }
}

/// Exponentially weighted moving average of the per-second rates.
pub struct Ewma {
    pub alpha: f64,
}

impl Forecaster for Ewma {
    fn name(&self) -> &'static str {
        "ewma"
    }
    fn forecast(&self, history: &[f64], _horizon_s: usize) -> f64 {
        let mut it = history.iter();
        let Some(&first) = it.next() else { return 0.0 };
        it.fold(first, |s, &x| self.alpha * x + (1.0 - self.alpha) * s)
    }
}

/// The highest per-second rate of the last `window_s` seconds, raised by `headroom` and by the
/// trend between the window's two halves when the load is rising: robust to the Poisson noise
/// of single seconds, quick to follow a ramp, and biased towards over- rather than
/// under-prediction (an under-prediction costs SLO violations, an over-prediction only cores).
pub struct PeakWindow {
    pub window_s: usize,
    pub headroom: f64,
}

impl Default for PeakWindow {
    fn default() -> Self {
        Self { window_s: 60, headroom: 1.1 }
    }
}

impl Forecaster for PeakWindow {
    fn name(&self) -> &'static str {
        "peak-window"
    }
    fn forecast(&self, history: &[f64], _horizon_s: usize) -> f64 {
        let window = &history[history.len().saturating_sub(self.window_s.max(1))..];
        let peak = window.iter().copied().fold(0.0, f64::max);
        let half = window.len() / 2;
        let rising = if half > 0 {
            let older = mean(&window[..half]);
            let newer = mean(&window[half..]);
            (newer - older).max(0.0)
        } else {
            0.0
        };
        (peak + rising) * self.headroom
    }
}

fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        0.0
    } else {
        xs.iter().sum::<f64>() / xs.len() as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_history_forecasts_no_load() {
        assert_eq!(LastValue.forecast(&[], 30), 0.0);
        assert_eq!(Ewma { alpha: 0.5 }.forecast(&[], 30), 0.0);
        assert_eq!(PeakWindow::default().forecast(&[], 30), 0.0);
    }

    #[test]
    fn ewma_moves_towards_the_new_level() {
        let f = Ewma { alpha: 0.5 }.forecast(&[10.0, 10.0, 20.0], 30);
        assert_eq!(f, 15.0);
    }

    #[test]
    fn peak_window_covers_the_peak_and_a_rising_trend() {
        let flat = PeakWindow { window_s: 4, headroom: 1.0 }.forecast(&[0.0, 50.0, 10.0, 12.0, 8.0, 10.0], 30);
        assert_eq!(flat, 12.0);
        let ramp = PeakWindow { window_s: 4, headroom: 1.0 }.forecast(&[10.0, 20.0, 30.0, 40.0], 30);
        assert_eq!(ramp, 40.0 + 20.0);
    }
}
