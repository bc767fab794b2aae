//! The agent's telemetry: per task, arrivals per second, outcomes and a latency histogram,
//! drained into a report for the controller every reporting interval.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tidal_proto::v1::TaskTelemetry;

/// How a request ended, for the counters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome {
    Served(Duration),
    DeadlineMissed,
    Failed,
}

struct TaskStats {
    /// Arrivals per whole second since the agent started.
    arrivals: BTreeMap<u64, u32>,
    served: u64,
    errors: u64,
    deadline_misses: u64,
    /// The smallest budget a request of this report arrived with, ms.
    min_budget_ms: Option<u32>,
    latency_us: Histogram<u64>,
}

impl TaskStats {
    fn new() -> Self {
        Self {
            arrivals: BTreeMap::new(),
            served: 0,
            errors: 0,
            deadline_misses: 0,
            min_budget_ms: None,
            // 1 µs .. 10 min, 3 significant digits.
            latency_us: Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds"),
        }
    }
}

pub struct Telemetry {
    started: Instant,
    tasks: Mutex<HashMap<String, TaskStats>>,
}

impl Default for Telemetry {
    fn default() -> Self {
        Self::new(Instant::now())
    }
}

impl Telemetry {
    pub fn new(started: Instant) -> Self {
        Self { started, tasks: Mutex::new(HashMap::new()) }
    }

    fn with<R>(&self, task: &str, f: impl FnOnce(&mut TaskStats) -> R) -> R {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        f(tasks.entry(task.to_string()).or_insert_with(TaskStats::new))
    }

    /// A request of `task` arrived, with the latency budget it carried (if any).
    pub fn arrival(&self, task: &str, at: Instant, budget_ms: Option<u32>) {
        let second = at.saturating_duration_since(self.started).as_secs();
        self.with(task, |s| {
            *s.arrivals.entry(second).or_default() += 1;
            if let Some(b) = budget_ms {
                s.min_budget_ms = Some(s.min_budget_ms.map_or(b, |m| m.min(b)));
            }
        });
    }

    pub fn outcome(&self, task: &str, outcome: Outcome) {
        self.with(task, |s| match outcome {
            Outcome::Served(latency) => {
                s.served += 1;
                let _ = s.latency_us.record((latency.as_micros() as u64).clamp(1, 600_000_000));
            }
            Outcome::DeadlineMissed => s.deadline_misses += 1,
            Outcome::Failed => s.errors += 1,
        });
    }

    /// The report since the last one: arrivals of every whole second before `now` (seconds
    /// with no arrival included as 0), outcome counts and latency percentiles; resets them.
    pub fn drain(&self, now: Instant) -> Vec<TaskTelemetry> {
        let current_second = now.saturating_duration_since(self.started).as_secs();
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        for (name, s) in tasks.iter_mut() {
            let complete: Vec<u64> = s.arrivals.range(..current_second).map(|(&k, _)| k).collect();
            let mut per_second = Vec::new();
            if let (Some(&first), Some(&last)) = (complete.first(), complete.last()) {
                for sec in first..=last {
                    per_second.push(s.arrivals.remove(&sec).unwrap_or(0));
                }
            }
            let q = |p: f64| s.latency_us.value_at_quantile(p) as f64 / 1000.0;
            out.push(TaskTelemetry {
                task: name.clone(),
                arrivals_per_second: per_second,
                served: s.served,
                errors: s.errors,
                deadline_misses: s.deadline_misses,
                latency_p50_ms: q(0.50),
                latency_p95_ms: q(0.95),
                latency_p99_ms: q(0.99),
                min_budget_ms: s.min_budget_ms.take().map_or(0.0, f64::from),
            });
            s.served = 0;
            s.errors = 0;
            s.deadline_misses = 0;
            s.latency_us.reset();
        }
        out
    }
}

/// Seconds of arrivals an unsent report may carry forward (older ones are dropped).
pub const MAX_UNSENT_SECONDS: usize = 3600;

/// Folds a report that could not be sent into the next one, so that a controller failover
/// does not lose the seconds it covered: arrivals are concatenated (older first), counts
/// added, and the worse of the two latency percentiles kept.
pub fn carry_over(unsent: Vec<TaskTelemetry>, fresh: Vec<TaskTelemetry>) -> Vec<TaskTelemetry> {
    let mut by_task: BTreeMap<String, TaskTelemetry> = unsent.into_iter().map(|t| (t.task.clone(), t)).collect();
    for t in fresh {
        match by_task.get_mut(&t.task) {
            Some(old) => {
                old.arrivals_per_second.extend_from_slice(&t.arrivals_per_second);
                let excess = old.arrivals_per_second.len().saturating_sub(MAX_UNSENT_SECONDS);
                old.arrivals_per_second.drain(..excess);
                old.served += t.served;
                old.errors += t.errors;
                old.deadline_misses += t.deadline_misses;
                old.latency_p50_ms = old.latency_p50_ms.max(t.latency_p50_ms);
                old.latency_p95_ms = old.latency_p95_ms.max(t.latency_p95_ms);
                old.latency_p99_ms = old.latency_p99_ms.max(t.latency_p99_ms);
                if t.min_budget_ms > 0.0 && (old.min_budget_ms <= 0.0 || t.min_budget_ms < old.min_budget_ms) {
                    old.min_budget_ms = t.min_budget_ms;
                }
            }
            None => {
                by_task.insert(t.task.clone(), t);
            }
        }
    }
    by_task.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_counts_whole_seconds_including_idle_ones_and_resets() {
        let t0 = Instant::now();
        let t = Telemetry::new(t0);
        t.arrival("r", t0, None);
        t.arrival("r", t0 + Duration::from_millis(500), Some(120));
        t.arrival("r", t0 + Duration::from_millis(2100), Some(80));
        t.arrival("r", t0 + Duration::from_millis(3100), None); // the current second: not yet complete
        t.outcome("r", Outcome::Served(Duration::from_millis(10)));
        t.outcome("r", Outcome::DeadlineMissed);
        let report = t.drain(t0 + Duration::from_millis(3500));
        assert_eq!(report[0].arrivals_per_second, vec![2, 0, 1]);
        assert_eq!(report[0].served, 1);
        assert_eq!(report[0].deadline_misses, 1);
        assert!((report[0].latency_p99_ms - 10.0).abs() < 0.1);
        assert_eq!(report[0].min_budget_ms, 80.0, "the least budget of the report");
        let next = t.drain(t0 + Duration::from_millis(4500));
        assert_eq!(next[0].arrivals_per_second, vec![1]);
        assert_eq!(next[0].min_budget_ms, 0.0, "no request carried a budget");
        assert_eq!(next[0].served, 0);
    }

    #[test]
    fn an_unsent_report_is_carried_into_the_next() {
        let t = |task: &str, arrivals: Vec<u32>, served: u64, p99: f64| TaskTelemetry {
            task: task.into(),
            arrivals_per_second: arrivals,
            served,
            latency_p99_ms: p99,
            ..Default::default()
        };
        let merged =
            carry_over(vec![t("a", vec![1, 2], 3, 40.0)], vec![t("a", vec![5], 5, 10.0), t("b", vec![7], 7, 1.0)]);
        assert_eq!(merged.len(), 2);
        assert_eq!(merged[0].arrivals_per_second, vec![1, 2, 5], "older seconds first");
        assert_eq!(merged[0].served, 8);
        assert_eq!(merged[0].latency_p99_ms, 40.0);
        assert_eq!(merged[1].arrivals_per_second, vec![7]);
        let long = carry_over(vec![t("a", vec![1; MAX_UNSENT_SECONDS], 0, 0.0)], vec![t("a", vec![9], 0, 0.0)]);
        assert_eq!(long[0].arrivals_per_second.len(), MAX_UNSENT_SECONDS);
        assert_eq!(long[0].arrivals_per_second.last(), Some(&9));
    }
}
