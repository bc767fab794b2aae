//! The cost of a stage whose model writes tokens (`TextIo.generate`), learned from its own
//! batches: each request of a batch may write the task's most, or fewer when its remaining
//! time affords fewer at the measured cost per token. The agent's worker and the simulated
//! worker keep one each and decide by it alike (one rule, `agent/src/generation.rs` and
//! `crate::sim`).

use std::collections::VecDeque;
use std::time::Duration;

/// Batches the cost line is fitted to: enough to span a few lengths, few enough to follow a
/// resize within seconds.
const WINDOW: usize = 32;
/// The share of a request's remaining time its tokens may take: the rest is for decoding,
/// the answer's way back, and the line's error (a fit to batches of one length puts the
/// encoder's cost in every token).
const SPEND: f64 = 0.8;

/// A generating worker's time per batch as a line in the steps it took: the time to the
/// first token and per further token, fitted by least squares to its latest batches.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenCost {
    batches: VecDeque<(f64, f64)>,
}

impl TokenCost {
    /// One batch: `steps` decoder steps (its longest text) in `run`.
    pub fn observe(&mut self, steps: usize, run: Duration) {
        if steps == 0 {
            return;
        }
        if self.batches.len() == WINDOW {
            self.batches.pop_front();
        }
        self.batches.push_back((steps as f64, run.as_secs_f64() * 1e3));
    }

    /// The mean batch: (steps, milliseconds), and whether the batches give a slope (several
    /// lengths, the longer costlier).
    fn fit(&self) -> Option<Fit> {
        let n = self.batches.len() as f64;
        if n == 0.0 {
            return None;
        }
        let mean_x = self.batches.iter().map(|b| b.0).sum::<f64>() / n;
        let mean_y = self.batches.iter().map(|b| b.1).sum::<f64>() / n;
        let var: f64 = self.batches.iter().map(|b| (b.0 - mean_x).powi(2)).sum();
        let cov: f64 = self.batches.iter().map(|b| (b.0 - mean_x) * (b.1 - mean_y)).sum();
        let slope = (var >= 1e-9 && cov > 0.0).then(|| cov / var);
        Some(Fit { mean_x, mean_y, slope })
    }

    /// (milliseconds to the first token, milliseconds per further token), once measured.
    /// Batches of one length give no slope: then every token is taken to cost the mean, which
    /// spreads the fixed cost (the encoder) over the tokens and so understates a short text:
    /// [`Self::affordable`] does not budget by it below the length measured.
    pub fn line(&self) -> Option<(f64, f64)> {
        let fit = self.fit()?;
        match fit.slope {
            None => {
                let per_token = fit.mean_y / fit.mean_x;
                Some((per_token, per_token))
            }
            Some(slope) => {
                let intercept = fit.mean_y - slope * fit.mean_x;
                // The first token costs at least a token: an intercept below that is noise.
                Some(((intercept + slope).max(slope), slope))
            }
        }
    }

    /// Tokens a request with `left` of its time can write, within 1..=`most` (one at least:
    /// a request the queue kept is worth its first token). Without a slope, only what the
    /// measured batches bound is budgeted: a text of their length or longer costs at most
    /// their mean per token (the fixed part only shrinks per token), a shorter one may cost
    /// as much as they did; so a request with less time than they took writes one token,
    /// whose batch then gives the line its slope.
    pub fn affordable(&self, left: Duration, most: u32) -> u32 {
        let Some(fit) = self.fit() else { return most };
        let left = left.as_secs_f64() * 1e3 * SPEND;
        let tokens = match fit.slope {
            None if left < fit.mean_y => 1.0,
            None => (left * fit.mean_x / fit.mean_y).floor(),
            Some(_) => {
                let (first, per_token) = self.line().unwrap_or((fit.mean_y, fit.mean_y));
                if left <= first {
                    1.0
                } else {
                    1.0 + ((left - first) / per_token).floor()
                }
            }
        };
        tokens.clamp(1.0, f64::from(most.max(1))) as u32
    }
}

/// The batches' centre and, when they give one, the slope of time in steps.
struct Fit {
    mean_x: f64,
    mean_y: f64,
    slope: Option<f64>,
}

impl TokenCost {
    /// The time a batch that took `took` counts for in the queue's shedding
    /// ([`crate::shed`]): a request that may be answered with part of its text
    /// (`refuse_unfinished` false) needs only time for its first token, so the queue admits
    /// and keeps it for that.
    pub fn shedding_time(&self, took: Duration, refuse_unfinished: bool) -> Duration {
        match (refuse_unfinished, self.line()) {
            (false, Some((first_ms, _))) => took.min(Duration::from_secs_f64(first_ms.max(0.0) / 1e3)),
            _ => took,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cost_line_is_fitted_to_batches_of_several_lengths() {
        let mut cost = TokenCost::default();
        assert_eq!(cost.affordable(Duration::from_millis(5), 32), 32, "nothing measured: the most");
        for steps in [1usize, 4, 16, 32] {
            // 30 ms to the first token, 10 ms per further token.
            cost.observe(steps, Duration::from_millis(20 + 10 * steps as u64));
        }
        let (first, per_token) = cost.line().unwrap();
        assert!((first - 30.0).abs() < 1e-6 && (per_token - 10.0).abs() < 1e-6, "{first} {per_token}");
        // 80 % of 125 ms: 30 ms for the first token, 7 more at 10 ms.
        assert_eq!(cost.affordable(Duration::from_millis(125), 32), 8);
        assert_eq!(cost.affordable(Duration::from_millis(10), 32), 1);
        assert_eq!(cost.affordable(Duration::from_secs(10), 32), 32);
    }

    #[test]
    fn batches_of_one_length_budget_only_what_they_bound() {
        let mut cost = TokenCost::default();
        for _ in 0..3 {
            cost.observe(10, Duration::from_millis(100));
        }
        assert_eq!(cost.line(), Some((10.0, 10.0)));
        // 10 tokens took 100 ms: 80 % of 150 ms affords 12 tokens at 10 ms each (a longer
        // text costs no more per token); with 80 % of 110 ms, less than those 10 tokens took,
        // a shorter text might cost as much (its encoder alone), so it writes one.
        assert_eq!(cost.affordable(Duration::from_millis(150), 32), 12);
        assert_eq!(cost.affordable(Duration::from_millis(110), 32), 1);
        assert_eq!(cost.affordable(Duration::from_millis(70), 32), 1);
        assert_eq!(cost.affordable(Duration::from_secs(10), 32), 32);
        for _ in 0..WINDOW {
            cost.observe(10, Duration::from_millis(200));
        }
        assert_eq!(cost.line(), Some((20.0, 20.0)), "only the latest batches count");
    }

    #[test]
    fn a_short_budget_after_whole_texts_is_kept_in_time_and_teaches_the_slope() {
        // An encoder of 100 ms and 12 ms a token: whole texts of 32 tokens take 484 ms.
        let took = |steps: u32| Duration::from_millis(100 + 12 * u64::from(steps));
        let mut cost = TokenCost::default();
        for _ in 0..6 {
            cost.observe(32, took(32));
        }
        // A third of a whole text's time: charging the mean (15 ms a token) would budget 8
        // tokens, which take 196 ms, past the request's 161; one token takes 112.
        let left = Duration::from_millis(161);
        let tokens = cost.affordable(left, 32);
        assert_eq!(tokens, 1);
        assert!(took(tokens) < left);
        // That batch gives the line its slope: the next such request writes what fits.
        cost.observe(tokens as usize, took(tokens));
        let tokens = cost.affordable(left, 32);
        assert!(tokens > 1 && took(tokens) < left, "{tokens} tokens take {:?}", took(tokens));
    }

    #[test]
    fn a_text_that_may_end_early_is_kept_for_its_first_token() {
        let mut cost = TokenCost::default();
        let took = Duration::from_millis(330);
        assert_eq!(cost.shedding_time(took, false), took, "nothing measured: the whole batch");
        for steps in [1usize, 32] {
            cost.observe(steps, Duration::from_millis(20 + 10 * steps as u64));
        }
        assert_eq!(cost.shedding_time(took, false), Duration::from_millis(30));
        assert_eq!(cost.shedding_time(took, true), took, "a text refused unfinished needs all of it");
        assert_eq!(cost.shedding_time(Duration::from_millis(12), false), Duration::from_millis(12));
    }
}
