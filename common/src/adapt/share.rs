//! How one round divides the cluster's cores among its tasks.
//!
//! Each task brings a [`Claim`]: its weight, its guaranteed minimum and its maximum, the fewest
//! cores that carry its whole planned load (`enough`), and the plans that carry it at more
//! cores, each with the value its policy's objective gives it. [`divide`] has two regimes:
//!
//! - **The cores suffice** when every task can carry its load at once (Σ enough ≤ cores). The
//!   division then maximises Σ weight × value: a multiple-choice knapsack, solved exactly by
//!   merging the tasks' options one task at a time and keeping only the (cores, value) pairs
//!   that no pair with fewer cores beats (at most one per core count, so a layer never holds
//!   more than cores + 1 of them).
//! - **Shortage** otherwise, where the declared [`ShareRule`] decides. First each task gets its
//!   guaranteed minimum (as far as its load asks for it, highest weight first); then every task
//!   of positive weight that carries nothing yet gets its first step of capacity (the fewest
//!   cores that carry some of its load); then the remaining cores go one step at a time to the
//!   task the rule favours: `weighted`, the task with the fewest cores per unit of weight;
//!   `max-min`, the task carrying the least fraction of its demand (as Faro does). A task never
//!   gets more than `enough`. Tasks of weight 0 are best effort: they get what the weighted
//!   tasks cannot use, by max-min among themselves.
//!
//! So no task of positive weight is left with no capacity while another holds more than its
//! guaranteed minimum, unless the cores run out at the first steps.
//!
//! The division works on abstract figures (a task's carried fraction at a budget is asked of the
//! caller, who solves the task's own problem for it), so it is tested on its own.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The rule that divides the cores when they do not carry every task's load.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShareRule {
    /// Cores in proportion to the tasks' weights (each at most what carries its load).
    #[default]
    Weighted,
    /// The largest least fraction of each task's demand carried (Faro's max-min fairness).
    MaxMin,
}

impl FromStr for ShareRule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "weighted" => Ok(Self::Weighted),
            "max-min" => Ok(Self::MaxMin),
            other => Err(format!("unknown share rule {other:?}: expected weighted or max-min")),
        }
    }
}

impl fmt::Display for ShareRule {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            Self::Weighted => "weighted",
            Self::MaxMin => "max-min",
        })
    }
}

/// What one task asks of the cluster's cores.
#[derive(Debug, Clone, PartialEq)]
pub struct Claim {
    /// Its weight, ≥ 0 (0: best effort).
    pub weight: f64,
    /// Cores guaranteed to it while its load asks for them.
    pub min_cores: u32,
    /// The fewest cores that carry its whole load or, when no budget up to its maximum does,
    /// the cores of the plan that carries the most.
    pub enough: u32,
    /// Its plans from `enough` cores up to its best plan: (cores, value), cores ascending,
    /// the first at `enough`. A task that cannot be planned has none and gets no cores.
    pub options: Vec<(u32, f64)>,
}

/// The cores each task may use, in the order of the claims, and which regime decided them.
#[derive(Debug, Clone, PartialEq)]
pub struct Division {
    pub cores: Vec<u32>,
    /// The cores did not carry every task's load; the rule divided them.
    pub shortage: bool,
}

const EPS: f64 = 1e-9;

/// Divides `total` cores among `claims` (see the module docs). `carried(task, cores)` is the
/// fraction (0..=1) of that task's demand its best plan within `cores` carries, never falling
/// as `cores` grows; it is asked only under shortage and only for budgets below the task's
/// `enough`.
pub fn divide(total: u32, claims: &[Claim], rule: ShareRule, carried: impl FnMut(usize, u32) -> f64) -> Division {
    let planned = |c: &Claim| c.options.first().map_or(0, |o| o.0);
    let needed: u64 = claims.iter().map(|c| planned(c) as u64).sum();
    if needed <= total as u64 {
        return Division { cores: best_combination(total, claims), shortage: false };
    }
    Division { cores: shares(total, claims, rule, carried), shortage: true }
}

/// The options, one per task, of the highest Σ weight × value within `total` cores; every
/// task's first option fits (the caller checked; a task whose options do not gets none).
fn best_combination(total: u32, claims: &[Claim]) -> Vec<u32> {
    #[derive(Clone, Copy)]
    struct State {
        cores: u32,
        value: f64,
        parent: usize,
        pick: usize,
    }
    let mut layers: Vec<Vec<State>> = Vec::with_capacity(claims.len());
    let mut last = vec![State { cores: 0, value: 0.0, parent: 0, pick: 0 }];
    for claim in claims {
        let mut next = Vec::with_capacity(last.len() * claim.options.len().max(1));
        for (p, s) in last.iter().enumerate() {
            if claim.options.is_empty() {
                next.push(State { parent: p, pick: usize::MAX, ..*s });
            }
            for (k, &(cores, value)) in claim.options.iter().enumerate() {
                let cores = s.cores.saturating_add(cores);
                if cores > total {
                    break;
                }
                next.push(State { cores, value: s.value + claim.weight * value, parent: p, pick: k });
            }
        }
        if next.is_empty() {
            // Only if the claims' first options did not fit after all: the task gets nothing
            // rather than the division failing.
            next = last.iter().enumerate().map(|(p, s)| State { parent: p, pick: usize::MAX, ..*s }).collect();
        }
        // Fewest cores first, the best value first among equal cores; keep a state only if
        // it beats every state with fewer cores.
        next.sort_by(|a, b| a.cores.cmp(&b.cores).then(b.value.total_cmp(&a.value)));
        let mut kept: Vec<State> = Vec::with_capacity(next.len());
        for s in next {
            if kept.last().is_none_or(|k| s.value > k.value + EPS) {
                kept.push(s);
            }
        }
        layers.push(std::mem::replace(&mut last, kept));
    }
    layers.push(last);
    // The last layer's values rise with its cores: its last state is the best.
    let mut cores = vec![0; claims.len()];
    let mut at = layers[claims.len()].len() - 1;
    for (i, claim) in claims.iter().enumerate().rev() {
        let s = layers[i + 1][at];
        cores[i] = claim.options.get(s.pick).map_or(0, |o| o.0);
        at = s.parent;
    }
    cores
}

/// Under shortage: minimums, first steps, then the rule (see the module docs).
fn shares(total: u32, claims: &[Claim], rule: ShareRule, mut carried: impl FnMut(usize, u32) -> f64) -> Vec<u32> {
    let n = claims.len();
    let cap: Vec<u32> = claims.iter().map(|c| if c.options.is_empty() { 0 } else { c.enough }).collect();
    let mut cores = vec![0u32; n];
    let mut left = total;
    let mut by_weight: Vec<usize> = (0..n).collect();
    by_weight.sort_by(|&a, &b| claims[b].weight.total_cmp(&claims[a].weight).then(a.cmp(&b)));
    for &i in &by_weight {
        let give = claims[i].min_cores.min(cap[i]).min(left);
        cores[i] = give;
        left -= give;
    }
    let mut fraction = |i: usize, c: u32| {
        if c == 0 {
            0.0
        } else if c >= cap[i] {
            1.0
        } else {
            carried(i, c)
        }
    };
    // The smallest budget above `from` that carries more, within the task's cap: a bisection,
    // as what a budget carries never falls when the budget grows.
    let next_step = |i: usize, from: u32, fraction: &mut dyn FnMut(usize, u32) -> f64| {
        let now = fraction(i, from);
        if from >= cap[i] || fraction(i, cap[i]) <= now + EPS {
            return None;
        }
        let (mut lo, mut hi) = (from, cap[i]);
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if fraction(i, mid) > now + EPS {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        Some(hi)
    };
    for &i in by_weight.iter().filter(|&&i| claims[i].weight > 0.0) {
        if fraction(i, cores[i]) <= EPS {
            if let Some(step) = next_step(i, cores[i], &mut fraction).filter(|&s| s - cores[i] <= left) {
                left -= step - cores[i];
                cores[i] = step;
            }
        }
    }
    for best_effort in [false, true] {
        let mut open: Vec<usize> = (0..n).filter(|&i| (claims[i].weight <= 0.0) == best_effort).collect();
        loop {
            let mut candidates: Vec<(usize, u32, f64)> = Vec::new();
            open.retain(|&i| match next_step(i, cores[i], &mut fraction) {
                Some(step) if step - cores[i] <= left => {
                    let key = match (rule, best_effort) {
                        (ShareRule::Weighted, false) => cores[i] as f64 / claims[i].weight,
                        _ => fraction(i, cores[i]),
                    };
                    candidates.push((i, step, key));
                    true
                }
                _ => false,
            });
            let Some(&(i, step, _)) = candidates.iter().min_by(|a, b| a.2.total_cmp(&b.2).then(a.0.cmp(&b.0))) else {
                break;
            };
            left -= step - cores[i];
            cores[i] = step;
        }
    }
    cores
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A task whose load needs `enough` cores, carried in proportion below that, and whose
    /// plans at more cores are worth `value_per_core` more per core.
    fn claim(weight: f64, enough: u32, best: u32, value_per_core: f64) -> Claim {
        Claim {
            weight,
            min_cores: 0,
            enough,
            options: (enough..=best).map(|c| (c, value_per_core * (c - enough) as f64)).collect(),
        }
    }

    fn proportional(claims: &[Claim]) -> impl FnMut(usize, u32) -> f64 + '_ {
        |i, c| (c as f64 / claims[i].enough as f64).min(1.0)
    }

    #[test]
    fn where_the_cores_suffice_the_weighted_values_decide() {
        // Both carry their loads on 1 core each; 2 more cores go to the task they are worth
        // more to, weight × value.
        let claims = [claim(1.0, 1, 3, 0.1), claim(3.0, 1, 3, 0.05)];
        let d = divide(4, &claims, ShareRule::Weighted, proportional(&claims));
        assert_eq!(d, Division { cores: vec![1, 3], shortage: false });
        let claims = [claim(1.0, 1, 3, 0.2), claim(3.0, 1, 3, 0.05)];
        assert_eq!(divide(4, &claims, ShareRule::Weighted, proportional(&claims)).cores, vec![3, 1]);
    }

    #[test]
    fn the_knapsack_matches_every_combination() {
        // Uneven staircases, where the greedy choice by value per core is wrong.
        let claims = [
            Claim { weight: 1.0, min_cores: 0, enough: 1, options: vec![(1, 0.0), (4, 0.9)] },
            Claim { weight: 1.0, min_cores: 0, enough: 1, options: vec![(1, 0.0), (2, 0.5), (3, 0.6)] },
            Claim { weight: 2.0, min_cores: 0, enough: 2, options: vec![(2, 0.0), (3, 0.3), (5, 0.45)] },
        ];
        for total in 4..=12 {
            let got = divide(total, &claims, ShareRule::Weighted, |_, _| 1.0).cores;
            let value = |pick: &[(u32, f64)]| pick.iter().zip(&claims).map(|(o, c)| c.weight * o.1).sum::<f64>();
            let mut best = f64::MIN;
            for a in &claims[0].options {
                for b in &claims[1].options {
                    for c in &claims[2].options {
                        if a.0 + b.0 + c.0 <= total {
                            best = best.max(value(&[*a, *b, *c]));
                        }
                    }
                }
            }
            let picked: Vec<(u32, f64)> =
                got.iter().zip(&claims).map(|(&k, c)| *c.options.iter().find(|o| o.0 == k).unwrap()).collect();
            assert!(got.iter().sum::<u32>() <= total);
            assert!(
                (value(&picked) - best).abs() < 1e-9,
                "{total} cores: {got:?} is worth {}, not {best}",
                value(&picked)
            );
        }
    }

    #[test]
    fn under_shortage_weighted_shares_follow_the_weights() {
        let claims = [claim(1.0, 8, 8, 0.0), claim(3.0, 8, 8, 0.0)];
        let d = divide(8, &claims, ShareRule::Weighted, proportional(&claims));
        assert!(d.shortage);
        assert_eq!(d.cores, vec![2, 6]);
    }

    #[test]
    fn under_shortage_max_min_evens_the_fraction_carried() {
        // Demands of 2 and 6 cores on 4: max-min carries 50 % of each (1 and 3 cores), where
        // equal weights would split 2 and 2.
        let claims = [claim(1.0, 2, 2, 0.0), claim(1.0, 6, 6, 0.0)];
        let d = divide(4, &claims, ShareRule::MaxMin, proportional(&claims));
        assert_eq!(d.cores, vec![1, 3]);
        assert_eq!(divide(4, &claims, ShareRule::Weighted, proportional(&claims)).cores, vec![2, 2]);
    }

    #[test]
    fn no_task_goes_without_while_another_holds_more_than_its_minimum() {
        // The heavy task alone would take every core under weighted shares.
        let claims = [claim(100.0, 10, 10, 0.0), claim(1.0, 10, 10, 0.0), claim(1.0, 10, 10, 0.0)];
        for rule in [ShareRule::Weighted, ShareRule::MaxMin] {
            let d = divide(4, &claims, rule, proportional(&claims));
            assert!(d.cores.iter().all(|&c| c >= 1), "{rule}: {:?}", d.cores);
            assert_eq!(d.cores.iter().sum::<u32>(), 4);
        }
    }

    #[test]
    fn minimums_are_guaranteed_and_never_exceed_the_load() {
        let mut claims = vec![claim(1.0, 10, 10, 0.0), claim(5.0, 10, 10, 0.0), claim(1.0, 2, 2, 0.0)];
        claims[0].min_cores = 5;
        claims[2].min_cores = 6;
        let d = divide(10, &claims, ShareRule::Weighted, proportional(&claims));
        assert!(d.cores[0] >= 5, "{:?}", d.cores);
        assert_eq!(d.cores[2], 2, "a minimum above the load is not held: {:?}", d.cores);
        assert_eq!(d.cores.iter().sum::<u32>(), 10);
    }

    #[test]
    fn weight_zero_is_best_effort() {
        let claims = [claim(0.0, 3, 3, 0.0), claim(1.0, 3, 3, 0.0)];
        assert_eq!(divide(4, &claims, ShareRule::Weighted, proportional(&claims)).cores, vec![1, 3]);
        assert_eq!(divide(3, &claims, ShareRule::MaxMin, proportional(&claims)).cores, vec![0, 3]);
        // While the cores suffice it carries its load, at the fewest cores (its value counts 0).
        let claims = [claim(0.0, 1, 4, 0.5), claim(1.0, 1, 1, 0.0)];
        assert_eq!(divide(6, &claims, ShareRule::Weighted, proportional(&claims)).cores, vec![1, 1]);
    }

    #[test]
    fn options_that_do_not_fit_leave_the_task_without_cores_not_a_panic() {
        // A claim whose first option is above its `enough` (inconsistent, as a caller may err).
        let claims = [
            Claim { weight: 1.0, min_cores: 0, enough: 1, options: vec![(3, 0.5)] },
            Claim { weight: 1.0, min_cores: 0, enough: 1, options: vec![(2, 0.1)] },
        ];
        let d = divide(4, &claims, ShareRule::Weighted, |_, c| c as f64 / 3.0);
        assert!(d.cores.iter().sum::<u32>() <= 4, "{d:?}");
    }

    #[test]
    fn a_step_of_several_cores_is_taken_whole() {
        // The first task's plans carry nothing below 2 cores (a variant of 2 cores at least).
        let claims = [claim(1.0, 4, 4, 0.0), claim(1.0, 4, 4, 0.0)];
        let d = divide(5, &claims, ShareRule::MaxMin, |i, c| if i == 0 && c < 2 { 0.0 } else { c as f64 / 4.0 });
        assert_eq!(d.cores.iter().sum::<u32>(), 5);
        assert!(d.cores[0] >= 2, "{:?}", d.cores);
    }
}
