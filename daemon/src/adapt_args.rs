//! The flags that decide an adaptation round, one set for `tidal-controller` and `tidalctl
//! simulate`, so that a simulation runs exactly a configuration a controller can run. Each
//! flag also reads the controller's environment variable (its environment file).

use clap::Args;
use tidal_common::adapt::{AdaptConfig, ShareRule};
use tidal_common::forecast::ForecasterKind;
use tidal_common::latency::LatencyModel;
use tidal_common::solver::{Limits, PolicyKind, Weights};

#[derive(Debug, Clone, Args)]
pub struct AdaptArgs {
    /// Forecaster of each task's arrivals: peak-window (the window's peak and its sure trend,
    /// times --headroom), last, ewma or holt (on the window's per-interval peaks).
    #[arg(long, env = "TIDAL_FORECASTER", default_value_t = ForecasterKind::default())]
    pub forecaster: ForecasterKind,
    /// Seconds of arrival history the forecaster looks at.
    #[arg(long, visible_alias = "lookback-s", env = "TIDAL_FORECAST_WINDOW_S", default_value_t = AdaptConfig::default().lookback_s)]
    pub forecast_window_s: usize,
    /// Factor the peak-window forecast is raised by before solving (≥ 1).
    #[arg(long, env = "TIDAL_HEADROOM", default_value_t = AdaptConfig::default().headroom)]
    pub headroom: f64,
    /// Seconds the forecaster averages the arrival rate over before it takes the window's peak
    /// (1: the peak of single seconds, which a Poisson load's scatter raises by a fifth).
    #[arg(long, env = "TIDAL_SMOOTH_S", default_value_t = AdaptConfig::default().smooth_s)]
    pub smooth_s: usize,
    /// Adaptation rounds the forecast must stay lower before a plan is sized down (1: at once;
    /// InfAdapter: 4).
    #[arg(long, env = "TIDAL_SCALE_DOWN_AFTER", default_value_t = AdaptConfig::default().scale_down_after)]
    pub scale_down_after: u32,
    /// How the cores are divided among tasks when they do not carry every task's load:
    /// weighted (in proportion to the tasks' weights) or max-min (the largest least fraction
    /// of each task's demand carried). While the cores suffice, the tasks' weighted objectives
    /// decide.
    #[arg(long, env = "TIDAL_SHARE", default_value = "weighted")]
    pub share: ShareRule,
    /// Share of a profiled throughput a worker is planned to carry, in (0, 1].
    #[arg(long, env = "TIDAL_UTILISATION", default_value_t = AdaptConfig::default().model.utilisation)]
    pub utilisation: f64,
    /// Objective weight of the traffic-weighted accuracy (per 100 %).
    #[arg(long, env = "TIDAL_ALPHA", default_value_t = Weights::default().alpha)]
    pub alpha: f64,
    /// Objective weight of the cores used, per core budget (higher: cheaper plans).
    #[arg(long, env = "TIDAL_BETA", default_value_t = Weights::default().beta)]
    pub beta: f64,
    /// Objective weight of starting variants that are not running (model loads).
    #[arg(long, env = "TIDAL_GAMMA", default_value_t = Weights::default().gamma)]
    pub gamma: f64,
    /// Objective weight per unit of batch size.
    #[arg(long, env = "TIDAL_DELTA", default_value_t = Weights::default().delta)]
    pub delta: f64,
    /// Largest batch size a plan may use.
    #[arg(long, env = "TIDAL_MAX_BATCH", default_value_t = Limits::default().max_batch)]
    pub max_batch: u32,
    /// Most replicas of one variant a policy that scales out may use.
    #[arg(long, env = "TIDAL_MAX_REPLICAS", default_value_t = Limits::default().max_replicas)]
    pub max_replicas: u32,
    /// Route every request of a Tidal plan by the plan's weights alone: a request its picked
    /// worker would refuse (too late by its queue) is refused, not sent to the most accurate
    /// other variant of its stage that would finish it in time (the default; the peers'
    /// policies always route by the weights).
    #[arg(long, env = "TIDAL_NO_SLACK_ROUTING")]
    pub no_slack_routing: bool,
    /// Plan on the profiles exactly as stored: do not correct them by the batches the
    /// variants serve (by default a variant whose batches run slower or faster than its
    /// profile is planned as it runs; see `tidalctl profile --show`).
    #[arg(long, env = "TIDAL_NO_PROFILE_CORRECTION")]
    pub no_profile_correction: bool,
}

impl AdaptArgs {
    /// The round's configuration with these flags, or why they cannot be run.
    pub fn config(&self, policy: PolicyKind, interval_s: f64, load_time_s: f64) -> Result<AdaptConfig, String> {
        if !(interval_s.is_finite() && interval_s > 0.0) {
            return Err(format!("the interval must be a positive number of seconds, not {interval_s}"));
        }
        if !(self.headroom.is_finite() && self.headroom >= 1.0) {
            return Err(format!("--headroom must be a number ≥ 1, not {}", self.headroom));
        }
        if !(self.utilisation > 0.0 && self.utilisation <= 1.0) {
            return Err(format!("--utilisation must be in (0, 1], not {}", self.utilisation));
        }
        let weights = [self.alpha, self.beta, self.gamma, self.delta];
        if !weights.iter().all(|w| w.is_finite() && *w >= 0.0) {
            return Err(format!("--alpha, --beta, --gamma and --delta must be finite and ≥ 0, not {weights:?}"));
        }
        if !(load_time_s.is_finite() && (0.0..=600.0).contains(&load_time_s)) {
            return Err(format!("a load time must be 0–600 s, not {load_time_s}"));
        }
        Ok(AdaptConfig {
            policy,
            forecaster: self.forecaster,
            model: LatencyModel { utilisation: self.utilisation },
            weights: Weights { alpha: self.alpha, beta: self.beta, gamma: self.gamma, delta: self.delta },
            limits: Limits {
                max_batch: self.max_batch.clamp(1, tidal_common::plan::MAX_BATCH),
                max_replicas: self.max_replicas.clamp(1, 1024),
            },
            interval_s,
            lookback_s: self.forecast_window_s.max(1),
            headroom: self.headroom,
            smooth_s: self.smooth_s.max(1),
            scale_down_after: self.scale_down_after.max(1),
            reserve_cores: 0,
            load_time_s,
            share: self.share,
            correct_profiles: !self.no_profile_correction,
            route_by_slack: !self.no_slack_routing,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        adapt: AdaptArgs,
    }

    #[test]
    fn the_defaults_are_the_cores_and_bad_numbers_are_refused() {
        let args = Cli::parse_from(["x"]).adapt;
        let cfg = args.config(PolicyKind::Tidal, 30.0, 2.0).unwrap();
        assert_eq!(cfg, AdaptConfig::default());
        let holt = Cli::parse_from(["x", "--forecaster", "holt", "--lookback-s", "20", "--share", "max-min"]).adapt;
        let cfg = holt.config(PolicyKind::Tidal, 5.0, 2.0).unwrap();
        assert_eq!((cfg.forecaster, cfg.lookback_s, cfg.share), (ForecasterKind::Holt, 20, ShareRule::MaxMin));
        assert_eq!(cfg.forecaster().name(), "holt");
        assert!(Cli::try_parse_from(["x", "--forecaster", "crystal-ball"]).is_err());
        for bad in ["--headroom=0.9", "--utilisation=0", "--beta=-1", "--alpha=NaN"] {
            let args = Cli::parse_from(["x", bad]).adapt;
            assert!(args.config(PolicyKind::Tidal, 30.0, 2.0).is_err(), "{bad:?} accepted");
        }
        assert!(args.config(PolicyKind::Tidal, 0.0, 2.0).is_err());
    }
}
