//! The agent's telemetry: per task, arrivals per second, outcomes and a latency histogram,
//! and the same per pipeline stage served here (with its queueing), drained into a report for
//! the controller every reporting interval.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tidal_proto::v1::{SizeCount, StageTelemetry, TaskTelemetry};

/// How a request ended, for the counters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome {
    Served(Duration),
    DeadlineMissed,
    Failed,
}

/// Arrivals per whole second since the agent started, reported once each: from the first
/// arrival on, every second, idle ones as 0.
#[derive(Default)]
struct Seconds {
    counts: BTreeMap<u64, u32>,
    /// The first second not reported yet (none before the first arrival).
    next: Option<u64>,
}

impl Seconds {
    fn add(&mut self, second: u64) {
        *self.counts.entry(second).or_default() += 1;
        self.next.get_or_insert(second);
    }

    /// The seconds before `current` not reported yet, and the first one's index, removed.
    fn drain(&mut self, current: u64) -> (Option<u64>, Vec<u32>) {
        let Some(from) = self.next.filter(|&f| f < current) else { return (None, Vec::new()) };
        let counts = (from..current).map(|sec| self.counts.remove(&sec).unwrap_or(0)).collect();
        self.next = Some(current);
        (Some(from), counts)
    }
}

struct TaskStats {
    arrivals: Seconds,
    served: u64,
    errors: u64,
    deadline_misses: u64,
    /// The smallest budget a request of this report arrived with, ms.
    min_budget_ms: Option<u32>,
    latency_us: Histogram<u64>,
    stages: BTreeMap<String, StageStats>,
}

/// 1 µs .. 10 min, 3 significant digits.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

fn record(h: &mut Histogram<u64>, d: Duration) {
    let _ = h.record((d.as_micros() as u64).clamp(1, 600_000_000));
}

impl TaskStats {
    fn new() -> Self {
        Self {
            arrivals: Seconds::default(),
            served: 0,
            errors: 0,
            deadline_misses: 0,
            min_budget_ms: None,
            latency_us: histogram(),
            stages: BTreeMap::new(),
        }
    }
}

/// One stage of a task, as this agent's workers served it.
struct StageStats {
    arrivals: Seconds,
    /// Requests per input size bucket (`tidal_common::profile::size_bucket`), this window.
    sizes: BTreeMap<u64, u64>,
    served: u64,
    errors: u64,
    queue_us: Histogram<u64>,
    latency_us: Histogram<u64>,
}

impl StageStats {
    fn new() -> Self {
        Self {
            arrivals: Seconds::default(),
            sizes: BTreeMap::new(),
            served: 0,
            errors: 0,
            queue_us: histogram(),
            latency_us: histogram(),
        }
    }
}

pub struct Telemetry {
    started: Instant,
    tasks: Mutex<HashMap<String, TaskStats>>,
    /// Requests waiting for a worker of a task that has none, per task (see [`Self::wait`]).
    waiting: Mutex<HashMap<String, u32>>,
    /// Told when a task's first request starts waiting: the report goes out at once.
    demand: tokio::sync::Notify,
}

/// Most requests an agent holds waiting for tasks without a worker (each also holds its bytes
/// in [`crate::admission`]): beyond it they are refused at once.
pub const MAX_WAITING: u32 = 1024;

/// One request waiting for a worker of its task; counted in the reports until dropped.
pub struct Waiting<'a> {
    telemetry: &'a Telemetry,
    task: String,
    /// The task's first to wait (none of its requests waited before).
    pub first: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut waiting = self.telemetry.waiting.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = waiting.get_mut(&self.task) {
            *n -= 1;
            if *n == 0 {
                waiting.remove(&self.task);
            }
        }
    }
}

impl Default for Telemetry {
    fn default() -> Self {
        Self::new(Instant::now())
    }
}

impl Telemetry {
    pub fn new(started: Instant) -> Self {
        Self {
            started,
            tasks: Mutex::new(HashMap::new()),
            waiting: Mutex::new(HashMap::new()),
            demand: Default::default(),
        }
    }

    /// Counts a request of `task` as waiting for a worker until the guard is dropped; the
    /// first one of a task wakes the report loop. `None`: [`MAX_WAITING`] already wait.
    pub fn wait(&self, task: &str) -> Option<Waiting<'_>> {
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        if waiting.values().sum::<u32>() >= MAX_WAITING {
            return None;
        }
        let n = waiting.entry(task.to_string()).or_default();
        *n += 1;
        let first = *n == 1;
        if first {
            self.demand.notify_one();
        }
        Some(Waiting { telemetry: self, task: task.to_string(), first })
    }

    /// Resolves when a task's first request starts waiting for a worker.
    pub async fn demand(&self) {
        self.demand.notified().await
    }

    fn with<R>(&self, task: &str, f: impl FnOnce(&mut TaskStats) -> R) -> R {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        f(tasks.entry(task.to_string()).or_insert_with(TaskStats::new))
    }

    /// A request of `task` arrived, with the latency budget it carried (if any).
    pub fn arrival(&self, task: &str, at: Instant, budget_ms: Option<u32>) {
        let second = at.saturating_duration_since(self.started).as_secs();
        self.with(task, |s| {
            s.arrivals.add(second);
            if let Some(b) = budget_ms {
                s.min_budget_ms = Some(s.min_budget_ms.map_or(b, |m| m.min(b)));
            }
        });
    }

    pub fn outcome(&self, task: &str, outcome: Outcome) {
        self.with(task, |s| match outcome {
            Outcome::Served(latency) => {
                s.served += 1;
                record(&mut s.latency_us, latency);
            }
            Outcome::DeadlineMissed => s.deadline_misses += 1,
            Outcome::Failed => s.errors += 1,
        });
    }

    /// A request reached this agent's workers of a stage.
    /// A request of a stage arrived here at `at`, its input `size` elements (one sample of
    /// the stage's first input).
    pub fn stage_arrival(&self, task: &str, stage: &str, at: Instant, size: u64) {
        let second = at.saturating_duration_since(self.started).as_secs();
        self.with(task, |s| {
            let st = s.stages.entry(stage.to_string()).or_insert_with(StageStats::new);
            st.arrivals.add(second);
            let bucket = tidal_common::profile::size_bucket(size);
            if st.sizes.len() >= MAX_SIZE_BUCKETS && !st.sizes.contains_key(&bucket) {
                // Full: the smallest bucket's requests join the next one up, so that sizes are
                // only ever counted larger, never smaller.
                if let Some((_, n)) = st.sizes.pop_first() {
                    if let Some(mut next) = st.sizes.first_entry() {
                        *next.get_mut() += n;
                    }
                }
            }
            *st.sizes.entry(bucket).or_default() += 1;
        });
    }

    /// A stage served here: `Some((queueing, latency))`, or `None` when it failed or was shed.
    pub fn stage_outcome(&self, task: &str, stage: &str, served: Option<(Duration, Duration)>) {
        self.with(task, |s| {
            let st = s.stages.entry(stage.to_string()).or_insert_with(StageStats::new);
            match served {
                Some((queue, latency)) => {
                    st.served += 1;
                    record(&mut st.queue_us, queue);
                    record(&mut st.latency_us, latency);
                }
                None => st.errors += 1,
            }
        });
    }

    /// The agent's clock at `now`: whole seconds since it started.
    pub fn second(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.started).as_secs()
    }

    /// The report since the last one: arrivals of every whole second before `now` not reported
    /// yet (idle ones as 0) with the first one's index, outcome counts and latency
    /// percentiles; resets them.
    pub fn drain(&self, now: Instant) -> Vec<TaskTelemetry> {
        let current_second = self.second(now);
        let waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        // A task whose only requests wait for a worker is reported too.
        for task in waiting.keys() {
            tasks.entry(task.clone()).or_insert_with(TaskStats::new);
        }
        let mut out = Vec::new();
        for (name, s) in tasks.iter_mut() {
            let (first_second, per_second) = s.arrivals.drain(current_second);
            let stages = s
                .stages
                .iter_mut()
                .map(|(stage, st)| {
                    let t = StageTelemetry {
                        stage: stage.clone(),
                        arrivals_per_second: st.arrivals.drain(current_second).1,
                        served: st.served,
                        errors: st.errors,
                        queue_p99_ms: st.queue_us.value_at_quantile(0.99) as f64 / 1000.0,
                        latency_p50_ms: st.latency_us.value_at_quantile(0.5) as f64 / 1000.0,
                        latency_p99_ms: st.latency_us.value_at_quantile(0.99) as f64 / 1000.0,
                        sizes: st.sizes.iter().map(|(&size, &count)| SizeCount { size, count }).collect(),
                    };
                    *st = StageStats { arrivals: std::mem::take(&mut st.arrivals), ..StageStats::new() };
                    t
                })
                .collect();
            let q = |p: f64| s.latency_us.value_at_quantile(p) as f64 / 1000.0;
            out.push(TaskTelemetry {
                task: name.clone(),
                arrivals_per_second: per_second,
                first_second,
                served: s.served,
                errors: s.errors,
                deadline_misses: s.deadline_misses,
                latency_p50_ms: q(0.50),
                latency_p95_ms: q(0.95),
                latency_p99_ms: q(0.99),
                min_budget_ms: s.min_budget_ms.take().map_or(0.0, f64::from),
                stages,
                waiting: waiting.get(name).copied().unwrap_or(0),
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

/// Most input size buckets a stage reports per window (8 per doubling: sizes 256× apart).
const MAX_SIZE_BUCKETS: usize = 64;

/// Folds a report that could not be sent into the next one, so that a controller failover
/// does not lose the seconds it covered: arrivals are concatenated (older first), counts
/// added, and the worse of the two latency percentiles kept.
pub fn carry_over(unsent: Vec<TaskTelemetry>, fresh: Vec<TaskTelemetry>) -> Vec<TaskTelemetry> {
    let mut by_task: BTreeMap<String, TaskTelemetry> = unsent.into_iter().map(|t| (t.task.clone(), t)).collect();
    for t in fresh {
        match by_task.get_mut(&t.task) {
            Some(old) => {
                if old.first_second.is_none() {
                    old.first_second = t.first_second;
                }
                let dropped = append_seconds(&mut old.arrivals_per_second, &t.arrivals_per_second);
                old.first_second = old.first_second.map(|f| f + dropped as u64);
                old.served += t.served;
                old.errors += t.errors;
                old.deadline_misses += t.deadline_misses;
                old.latency_p50_ms = old.latency_p50_ms.max(t.latency_p50_ms);
                old.latency_p95_ms = old.latency_p95_ms.max(t.latency_p95_ms);
                old.latency_p99_ms = old.latency_p99_ms.max(t.latency_p99_ms);
                if t.min_budget_ms > 0.0 && (old.min_budget_ms <= 0.0 || t.min_budget_ms < old.min_budget_ms) {
                    old.min_budget_ms = t.min_budget_ms;
                }
                old.stages = carry_stages(std::mem::take(&mut old.stages), t.stages);
                // A count of now, not of the window.
                old.waiting = t.waiting;
            }
            None => {
                by_task.insert(t.task.clone(), t);
            }
        }
    }
    by_task.into_values().collect()
}

/// Appends newer seconds of arrivals, keeping at most [`MAX_UNSENT_SECONDS`] (the newest);
/// returns how many of the oldest it dropped.
fn append_seconds(older: &mut Vec<u32>, newer: &[u32]) -> usize {
    older.extend_from_slice(newer);
    let excess = older.len().saturating_sub(MAX_UNSENT_SECONDS);
    older.drain(..excess);
    excess
}

/// [`carry_over`] for a task's stages.
fn carry_stages(unsent: Vec<StageTelemetry>, fresh: Vec<StageTelemetry>) -> Vec<StageTelemetry> {
    let mut by_stage: BTreeMap<String, StageTelemetry> = unsent.into_iter().map(|s| (s.stage.clone(), s)).collect();
    for s in fresh {
        match by_stage.get_mut(&s.stage) {
            Some(old) => {
                append_seconds(&mut old.arrivals_per_second, &s.arrivals_per_second);
                old.served += s.served;
                old.errors += s.errors;
                old.queue_p99_ms = old.queue_p99_ms.max(s.queue_p99_ms);
                old.latency_p50_ms = old.latency_p50_ms.max(s.latency_p50_ms);
                old.latency_p99_ms = old.latency_p99_ms.max(s.latency_p99_ms);
                old.sizes = merge_sizes(&old.sizes, &s.sizes);
            }
            None => {
                by_stage.insert(s.stage.clone(), s);
            }
        }
    }
    by_stage.into_values().collect()
}

/// Counts per input size of two windows added up, at most [`MAX_SIZE_BUCKETS`] kept (the
/// smallest merged into the next one up).
fn merge_sizes(a: &[SizeCount], b: &[SizeCount]) -> Vec<SizeCount> {
    let mut counts: BTreeMap<u64, u64> = BTreeMap::new();
    for c in a.iter().chain(b) {
        *counts.entry(c.size).or_default() += c.count;
    }
    while counts.len() > MAX_SIZE_BUCKETS {
        let Some((_, n)) = counts.pop_first() else { break };
        if let Some(mut next) = counts.first_entry() {
            *next.get_mut() += n;
        }
    }
    counts.into_iter().map(|(size, count)| SizeCount { size, count }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_waiting_for_a_worker_are_reported_as_they_are_now_and_bounded() {
        let t0 = Instant::now();
        let t = Telemetry::new(t0);
        let first = t.wait("cold").expect("room to wait");
        let second = t.wait("cold").expect("room to wait");
        // Reported though no whole second of arrivals is complete, and at once: the first
        // request to wait for a task leaves a wake-up for the report loop.
        let report = t.drain(t0);
        assert_eq!(report.iter().find(|r| r.task == "cold").map(|r| r.waiting), Some(2));
        assert!(tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
            .block_on(async { tokio::time::timeout(Duration::from_millis(100), t.demand()).await.is_ok() }));
        drop(first);
        assert_eq!(t.drain(t0).iter().find(|r| r.task == "cold").map(|r| r.waiting), Some(1));
        drop(second);
        assert_eq!(t.drain(t0).iter().find(|r| r.task == "cold").map(|r| r.waiting), Some(0));
        // A count of now: an unsent report's is replaced by the fresh one's.
        let carried = carry_over(
            vec![TaskTelemetry { task: "c".into(), waiting: 5, ..Default::default() }],
            vec![TaskTelemetry { task: "c".into(), waiting: 1, ..Default::default() }],
        );
        assert_eq!(carried[0].waiting, 1);
        let held: Vec<_> = (0..MAX_WAITING).map(|_| t.wait("many").unwrap()).collect();
        assert!(t.wait("other").is_none(), "no more than {MAX_WAITING} wait");
        drop(held);
        assert!(t.wait("other").is_some());
    }

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
        assert_eq!(report[0].first_second, Some(0));
        assert_eq!(report[0].served, 1);
        assert_eq!(report[0].deadline_misses, 1);
        assert!((report[0].latency_p99_ms - 10.0).abs() < 0.1);
        assert_eq!(report[0].min_budget_ms, 80.0, "the least budget of the report");
        assert!(report[0].stages.is_empty(), "no stage ran here");
        let next = t.drain(t0 + Duration::from_millis(4500));
        assert_eq!((next[0].first_second, next[0].arrivals_per_second.clone()), (Some(3), vec![1]));
        assert_eq!(next[0].min_budget_ms, 0.0, "no request carried a budget");
        assert_eq!(next[0].served, 0);
        // Idle seconds go on being reported, each once, and a report within a second has none.
        let idle = t.drain(t0 + Duration::from_millis(6500));
        assert_eq!((idle[0].first_second, idle[0].arrivals_per_second.clone()), (Some(4), vec![0, 0]));
        let none = t.drain(t0 + Duration::from_millis(6900));
        assert_eq!((none[0].first_second, none[0].arrivals_per_second.clone()), (None, vec![]));
    }

    #[test]
    fn seconds_carried_over_keep_their_index() {
        let t = |first: u64, arrivals: Vec<u32>| TaskTelemetry {
            task: "r".into(),
            first_second: Some(first),
            arrivals_per_second: arrivals,
            ..Default::default()
        };
        let merged = carry_over(vec![t(10, vec![1, 2])], vec![t(12, vec![3])]);
        assert_eq!((merged[0].first_second, merged[0].arrivals_per_second.clone()), (Some(10), vec![1, 2, 3]));
        let long = carry_over(vec![t(0, vec![1; MAX_UNSENT_SECONDS])], vec![t(MAX_UNSENT_SECONDS as u64, vec![2; 5])]);
        assert_eq!(long[0].first_second, Some(5), "the oldest seconds dropped");
        assert_eq!(long[0].arrivals_per_second.len(), MAX_UNSENT_SECONDS);
    }

    #[test]
    fn each_stage_served_here_is_reported_with_its_queueing() {
        let t0 = Instant::now();
        let t = Telemetry::new(t0);
        t.stage_arrival("video", "detect", t0, 3 * 640 * 480);
        t.stage_arrival("video", "detect", t0 + Duration::from_millis(1200), 3 * 640 * 480);
        t.stage_arrival("video", "classify", t0 + Duration::from_millis(1300), 3 * 224 * 224);
        t.stage_outcome("video", "detect", Some((Duration::from_millis(2), Duration::from_millis(20))));
        t.stage_outcome("video", "classify", None);
        let report = t.drain(t0 + Duration::from_millis(2500));
        let stages = &report[0].stages;
        assert_eq!(stages.len(), 2);
        let (classify, detect) = (&stages[0], &stages[1]);
        assert_eq!(detect.arrivals_per_second, vec![1, 1]);
        assert_eq!(classify.arrivals_per_second, vec![1], "from its first arrival");
        // Sizes in buckets at most 9 % above them.
        assert_eq!(detect.sizes.len(), 1);
        let bucket = detect.sizes[0].size as f64 / (3.0 * 640.0 * 480.0);
        assert!((1.0..1.091).contains(&bucket) && detect.sizes[0].count == 2, "{:?}", detect.sizes);
        assert_eq!((detect.served, detect.errors, classify.errors), (1, 0, 1));
        assert!((detect.queue_p99_ms - 2.0).abs() < 0.1 && (detect.latency_p99_ms - 20.0).abs() < 0.1);
        assert!(report[0].arrivals_per_second.is_empty(), "the task's own arrivals are the entry agent's");
        let next = t.drain(t0 + Duration::from_millis(3500));
        assert_eq!(next[0].stages[1].served, 0, "counts reset");
        assert!(next[0].stages[1].sizes.is_empty(), "sizes reset");
        // Many sizes: the smallest are counted as the next larger, never the largest dropped.
        for size in 1..=1000u64 {
            t.stage_arrival("text", "encode", t0, size * 100);
        }
        let report = t.drain(t0 + Duration::from_millis(4500));
        let sizes = &report.iter().find(|r| r.task == "text").unwrap().stages[0].sizes;
        assert!(sizes.len() <= MAX_SIZE_BUCKETS);
        assert_eq!(sizes.iter().map(|c| c.count).sum::<u64>(), 1000);
        assert!(sizes.last().unwrap().size >= 100_000);
        let merged = merge_sizes(
            &[SizeCount { size: 8, count: 2 }],
            &[SizeCount { size: 8, count: 1 }, SizeCount { size: 9, count: 1 }],
        );
        assert_eq!(merged, vec![SizeCount { size: 8, count: 3 }, SizeCount { size: 9, count: 1 }]);
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
