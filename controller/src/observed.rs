//! What the leader has observed from the agents' telemetry: arrivals per second per task
//! (summed over nodes), the smallest latency budget requests arrived with, the latest report
//! of each node, and cumulative outcome counts. Not replicated: a new leader rebuilds it from
//! the next reports.
//!
//! Each second is filed by the agent's own index of it, mapped onto the controller's clock by
//! the node's offset (the least difference between the two clocks any report showed: a delayed
//! report shows a larger one). A report delayed past a second boundary thus lands on the
//! seconds it covers, not on the next ones, where it would add two agent seconds into one.
//! A task's history starts at its first reported second (no idle padding before it, which
//! would read as a ramp) and ends at the last second every reporting node has covered.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use tidal_common::profile::SizeMix;
use tidal_proto::v1::{ServedBatch, StageStatus, TelemetryReport};

/// Seconds of arrival history kept per task.
pub const HISTORY_S: u64 = 3600;

/// Most input sizes one stage's report is read for (agents send at most 64).
const MAX_SIZES_PER_REPORT: usize = 64;

/// Served batches of one variant kept for the next round: a correction's window
/// ([`tidal_common::profile_correction::WINDOW`]); older ones would leave it at once.
const MAX_SERVED_PER_ROUND: usize = tidal_common::profile_correction::WINDOW;

/// What a round made of a task's arrivals.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RoundRates {
    pub forecast_rps: f64,
    pub planned_rps: f64,
}

/// Batches served, per worker (node, worker id).
type ByWorker = BTreeMap<(String, String), Vec<ServedBatch>>;

pub struct Observed {
    started: Instant,
    arrivals: HashMap<String, BTreeMap<u64, f64>>,
    /// Per task and second of a report, the smallest budget a request carried, ms.
    budgets: HashMap<String, BTreeMap<u64, f64>>,
    /// Per (task, stage) and second of a report, requests per input size.
    sizes: HashMap<(String, String), BTreeMap<u64, BTreeMap<u64, f64>>>,
    pub reports: BTreeMap<String, (Instant, TelemetryReport)>,
    pub totals: HashMap<String, (u64, u64)>,
    /// Per task, variant and worker (node, worker id), batches served since the last round
    /// took them (each worker's latest [`MAX_SERVED_PER_ROUND`]).
    served: HashMap<String, BTreeMap<String, ByWorker>>,
    /// Per task, the profile corrections the last round planned with.
    pub corrections: BTreeMap<String, Vec<tidal_proto::v1::ProfileCorrection>>,
    /// Per task, the last round's forecast and the rate it planned for.
    pub round_rates: BTreeMap<String, RoundRates>,
    /// Per node, how its seconds map onto the controller's.
    clocks: HashMap<String, NodeClock>,
    /// Per task in a rollout, how its canary compares with its version served so far.
    pub rollouts: BTreeMap<String, RolloutWatch>,
    /// A node whose last report is older than this is taken for gone: not planned on.
    pub node_timeout: Duration,
    /// Workers the OOM killer killed since the leader last took them (see [`Self::take_oom_kills`]).
    oom_kills: Vec<OomKill>,
    /// Per task, when a report last said a request came for it (see [`Self::idle_s`]).
    last_request: HashMap<String, Instant>,
}

/// A worker killed by the kernel's OOM killer, as its agent's report counted it.
#[derive(Debug, Clone, PartialEq)]
pub struct OomKill {
    pub task: String,
    pub variant: String,
    pub node: String,
    pub worker: String,
    /// What the plan gave it, bytes, at what batch.
    pub memory_bytes: u64,
    pub max_batch: u32,
    /// Kills since the previous report.
    pub kills: u64,
}

/// Most OOM kills held between rounds (each names a variant; more are the same news).
const MAX_OOM_KILLS: usize = 64;

/// How one agent's seconds map onto the controller's.
#[derive(Debug, Clone, Copy)]
struct NodeClock {
    /// Controller second − agent second: the least any report showed.
    offset: i64,
    /// The agent's clock at its last report: every second before it has been reported.
    reported_until: u64,
}

impl NodeClock {
    fn at(&self, agent_second: u64) -> u64 {
        (agent_second as i64 + self.offset).max(0) as u64
    }
}

/// A rollout as the leader watches it: the totals of both versions when it began watching,
/// and their p99 latencies as the agents reported them since.
#[derive(Debug, Clone)]
pub struct RolloutWatch {
    version: u32,
    started: Instant,
    /// When the canary was first seen serving: its window counts from then (not from its
    /// workers' load).
    first_served: Option<Instant>,
    /// (answered, failed or late) of the version served and of the canary at the start.
    served_at_start: (u64, u64),
    canary_at_start: (u64, u64),
    served_p99: Vec<f64>,
    canary_p99: Vec<f64>,
    /// How the canary compares so far, for `tidalctl status`.
    pub progress: String,
}

/// Requests a canary must have served before its error rate is judged.
pub const MIN_CANARY_REQUESTS: u64 = 20;
/// Rounds with both versions' p99 before the canary's latency is judged (the median of a
/// few reports, not one).
pub const MIN_P99_SAMPLES: usize = 3;
/// Latency samples (one per round) kept per version of a rollout.
const MAX_P99_SAMPLES: usize = 4096;

/// The median of `values` (0 when empty).
fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// The default of [`Observed::node_timeout`]: five missed reports at the agents' default rate.
pub const NODE_TIMEOUT: Duration = Duration::from_secs(5);

impl Observed {
    pub fn new(started: Instant) -> Self {
        Self {
            started,
            arrivals: HashMap::new(),
            budgets: HashMap::new(),
            sizes: HashMap::new(),
            served: HashMap::new(),
            corrections: BTreeMap::new(),
            reports: BTreeMap::new(),
            totals: HashMap::new(),
            round_rates: BTreeMap::new(),
            clocks: HashMap::new(),
            rollouts: BTreeMap::new(),
            node_timeout: NODE_TIMEOUT,
            oom_kills: Vec::new(),
            last_request: HashMap::new(),
        }
    }

    pub fn with_node_timeout(self, node_timeout: Duration) -> Self {
        Self { node_timeout, ..self }
    }

    /// Whether `node` reported once and then fell silent for longer than the node timeout (a
    /// node that has not reported yet is given the benefit of the doubt: it just registered).
    pub fn is_silent(&self, node: &str, now: Instant) -> bool {
        self.reports.get(node).is_some_and(|(at, _)| now.saturating_duration_since(*at) > self.node_timeout)
    }

    fn second(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.started).as_secs()
    }

    /// Seconds since observation started: the adaptation core's clock.
    pub fn seconds(&self, at: Instant) -> f64 {
        at.saturating_duration_since(self.started).as_secs_f64()
    }

    /// Records a report received at `now`, each second at the controller's second for the
    /// agent's index of it (see the module docs); a report without indices (an older agent)
    /// has its k per-second counts taken for the k whole seconds before `now`. True when a
    /// worker serves that did not in the node's last report.
    pub fn record(&mut self, report: TelemetryReport, now: Instant) -> bool {
        let before: Vec<&str> = self
            .reports
            .get(&report.node)
            .map(|(_, r)| r.workers.iter().filter(|w| w.ready).map(|w| w.id.as_str()).collect())
            .unwrap_or_default();
        let came_up = report.workers.iter().any(|w| w.ready && !before.contains(&w.id.as_str()));
        let current = self.second(now);
        let clock = report.second.map(|agent| {
            let offset = current as i64 - agent as i64;
            let clock = self.clocks.entry(report.node.clone()).or_insert(NodeClock { offset, reported_until: agent });
            // A clock that went back is an agent that restarted: its seconds start again.
            if agent < clock.reported_until {
                clock.offset = offset;
            }
            clock.offset = clock.offset.min(offset);
            clock.reported_until = agent;
            *clock
        });
        for t in &report.tasks {
            // Requests that came, wait, or were served (a long one still running counts);
            // a canary's are its task's.
            if t.waiting > 0 || t.served > 0 || t.arrivals_per_second.iter().any(|&n| n > 0) {
                let task = tidal_common::task::parse_canary(&t.task).map_or(t.task.as_str(), |(base, _)| base);
                self.last_request.insert(task.to_string(), now);
            }
            let series = self.arrivals.entry(t.task.clone()).or_default();
            let k = t.arrivals_per_second.len() as u64;
            let first = match (clock, t.first_second) {
                (Some(clock), Some(first)) => clock.at(first),
                _ => current.saturating_sub(k),
            };
            for (i, &n) in t.arrivals_per_second.iter().enumerate() {
                *series.entry(first + i as u64).or_default() += n as f64;
            }
            while series.first_key_value().is_some_and(|(&s, _)| s + HISTORY_S < current) {
                series.pop_first();
            }
            if t.min_budget_ms > 0.0 && t.min_budget_ms.is_finite() {
                let budgets = self.budgets.entry(t.task.clone()).or_default();
                let least = budgets.entry(current).or_insert(f64::INFINITY);
                *least = least.min(t.min_budget_ms);
                while budgets.first_key_value().is_some_and(|(&s, _)| s + HISTORY_S < current) {
                    budgets.pop_first();
                }
            }
            for st in t.stages.iter().filter(|st| !st.sizes.is_empty()) {
                let seconds = self.sizes.entry((t.task.clone(), st.stage.clone())).or_default();
                let counts = seconds.entry(current).or_default();
                // Bounded as the agent bounds it: a report names at most its buckets.
                for c in st.sizes.iter().take(MAX_SIZES_PER_REPORT) {
                    *counts.entry(c.size).or_default() += c.count as f64;
                }
                while seconds.first_key_value().is_some_and(|(&s, _)| s + HISTORY_S < current) {
                    seconds.pop_first();
                }
            }
            let totals = self.totals.entry(t.task.clone()).or_default();
            totals.0 += t.served;
            totals.1 += t.errors + t.deadline_misses;
        }
        for w in report.workers.iter().filter(|w| !w.served.is_empty()) {
            let of_variant = self.served.entry(w.task.clone()).or_default().entry(w.variant.clone()).or_default();
            let kept = of_variant.entry((report.node.clone(), w.id.clone())).or_default();
            kept.extend(w.served.iter().copied());
            let over = kept.len().saturating_sub(MAX_SERVED_PER_ROUND);
            kept.drain(..over);
        }
        // A worker's count is its cgroup's since it started. A node this leader has no report
        // of yet (it just took over) gives the baseline: its kills were seen before.
        let previous = self.reports.get(&report.node).map(|(_, r)| r);
        for w in report.workers.iter().filter(|_| previous.is_some()) {
            let before = previous.and_then(|r| r.workers.iter().find(|o| o.id == w.id)).map_or(0, |o| o.oom_kills);
            // Fewer than before: the agent restarted and the id is a new worker's.
            let kills = if w.oom_kills >= before { w.oom_kills - before } else { w.oom_kills };
            if kills > 0 && self.oom_kills.len() < MAX_OOM_KILLS {
                self.oom_kills.push(OomKill {
                    task: w.task.clone(),
                    variant: w.variant.clone(),
                    node: report.node.clone(),
                    worker: w.id.clone(),
                    memory_bytes: w.memory_bytes,
                    max_batch: w.max_batch,
                    kills,
                });
            }
        }
        // Stages that stopped reporting (a task removed) age out with everything else.
        self.sizes.retain(|_, seconds| seconds.last_key_value().is_some_and(|(&s, _)| s + HISTORY_S >= current));
        self.reports.insert(report.node.clone(), (now, report));
        came_up
    }

    /// The OOM kills reported since the last call.
    pub fn take_oom_kills(&mut self) -> Vec<OomKill> {
        std::mem::take(&mut self.oom_kills)
    }

    /// Ready workers per (node, task, variant) in the nodes' latest reports.
    pub fn serving(&self) -> tidal_common::adapt::Serving {
        let mut out = tidal_common::adapt::Serving::new();
        for (node, (_, report)) in &self.reports {
            for w in report.workers.iter().filter(|w| w.ready) {
                *out.entry((node.clone(), w.task.clone(), w.variant.clone())).or_default() += 1;
            }
        }
        out
    }

    /// The controller's second up to which (exclusive) every node that reports has reported:
    /// a later second may still be missing a node's arrivals.
    pub fn reported_until(&self, now: Instant) -> u64 {
        let current = self.second(now);
        self.clocks
            .iter()
            .filter(|(node, _)| !self.is_silent(node, now))
            .map(|(_, c)| c.at(c.reported_until))
            .min()
            .unwrap_or(current)
            .min(current)
    }

    /// Per-second arrivals of `task` over the last `window_s` seconds every node has reported
    /// (see [`Self::reported_until`]), oldest first, zero where nothing arrived; from the
    /// task's first reported second on (empty before it).
    pub fn history(&self, task: &str, now: Instant, window_s: u64) -> Vec<f64> {
        let Some(series) = self.arrivals.get(task) else { return Vec::new() };
        let Some((&first, _)) = series.first_key_value() else { return Vec::new() };
        let end = self.reported_until(now);
        let begin = end.saturating_sub(window_s).max(first);
        (begin..end).map(|s| series.get(&s).copied().unwrap_or(0.0)).collect()
    }

    /// Mean arrival rate of `task` over the last `last_s` seconds.
    pub fn rate(&self, task: &str, now: Instant, last_s: u64) -> f64 {
        let h = self.history(task, now, last_s);
        if h.is_empty() {
            0.0
        } else {
            h.iter().sum::<f64>() / h.len() as f64
        }
    }

    /// The smallest latency budget a request of `task` arrived with in the last `window_s`
    /// seconds, ms; `None` when none carried one.
    pub fn min_budget(&self, task: &str, now: Instant, window_s: u64) -> Option<f64> {
        // A report received in second k carries the seconds before k.
        let from = self.second(now).saturating_sub(window_s.saturating_sub(1));
        let least = self.budgets.get(task)?.range(from..).map(|(_, &b)| b).fold(f64::INFINITY, f64::min);
        least.is_finite().then_some(least)
    }

    /// The input sizes the requests of each stage of `task` came in over the last `window_s`
    /// seconds (stages that reported none are left out).
    pub fn size_mixes(&self, task: &str, now: Instant, window_s: u64) -> BTreeMap<String, SizeMix> {
        let from = self.second(now).saturating_sub(window_s.saturating_sub(1));
        let mut out = BTreeMap::new();
        for ((t, stage), seconds) in &self.sizes {
            if t != task {
                continue;
            }
            let mut counts: BTreeMap<u64, f64> = BTreeMap::new();
            for per_size in seconds.range(from..).map(|(_, c)| c) {
                for (&size, &n) in per_size {
                    *counts.entry(size).or_default() += n;
                }
            }
            let mix = tidal_common::profile::size_mix(&counts);
            if !mix.is_empty() {
                out.insert(stage.clone(), mix);
            }
        }
        out
    }

    /// The batches each variant of `task` served since the last call, taken for a round: at
    /// most [`MAX_SERVED_PER_ROUND`] a variant, an equal share of them from each of its
    /// workers (the latest of each), so that one busy worker does not stand for them all.
    /// Those of a worker for which `measures(node, variant)` is false are dropped.
    pub fn take_served(
        &mut self,
        task: &str,
        measures: impl Fn(&str, &str) -> bool,
    ) -> BTreeMap<String, Vec<ServedBatch>> {
        let by_variant = self.served.remove(task).unwrap_or_default();
        by_variant
            .into_iter()
            .map(|(variant, mut workers)| {
                workers.retain(|(node, _), _| measures(node, &variant));
                let share = MAX_SERVED_PER_ROUND.div_ceil(workers.len().max(1));
                let batches = workers
                    .into_values()
                    .flat_map(|kept| {
                        let skip = kept.len().saturating_sub(share);
                        kept.into_iter().skip(skip)
                    })
                    .collect();
                (variant, batches)
            })
            .collect()
    }

    /// Compares rollout `r`'s canary with the task's version served, from the totals and
    /// latencies observed since this leader began watching it: rolled back as soon as the
    /// canary (after [`MIN_CANARY_REQUESTS`]) fails or misses its deadline more often than
    /// the version served by more than the margin, or its median p99 exceeds the served
    /// version's by more than the slow-down margin; promoted once the window has passed within
    /// both. `None` while undecided.
    pub fn judge(&mut self, r: &tidal_proto::v1::Rollout, now: Instant) -> Option<tidal_proto::v1::EndRollout> {
        let canary = tidal_common::task::canary_name(&r.task, r.version);
        let totals = |t: &str| self.totals.get(t).copied().unwrap_or_default();
        let (served, canaried) = (totals(&r.task), totals(&canary));
        let (served_p99, canary_p99) = (self.p99(&r.task), self.p99(&canary));
        let watch = self.rollouts.entry(r.task.clone()).or_insert_with(|| RolloutWatch {
            version: r.version,
            started: now,
            first_served: None,
            served_at_start: served,
            canary_at_start: canaried,
            served_p99: Vec::new(),
            canary_p99: Vec::new(),
            progress: String::new(),
        });
        if watch.version != r.version {
            self.rollouts.remove(&r.task);
            return self.judge(r, now);
        }
        if served_p99 > 0.0 && canary_p99 > 0.0 && watch.canary_p99.len() < MAX_P99_SAMPLES {
            watch.served_p99.push(served_p99);
            watch.canary_p99.push(canary_p99);
        }
        let since = |now: (u64, u64), start: (u64, u64)| (now.0.saturating_sub(start.0), now.1.saturating_sub(start.1));
        let rate = |(ok, bad): (u64, u64)| if ok + bad == 0 { 0.0 } else { bad as f64 / (ok + bad) as f64 };
        let (s, c) = (since(served, watch.served_at_start), since(canaried, watch.canary_at_start));
        let (s_rate, c_rate) = (rate(s), rate(c));
        let (s_p99, c_p99) = (median(&watch.served_p99), median(&watch.canary_p99));
        if c.0 + c.1 > 0 && watch.first_served.is_none() {
            watch.first_served = Some(now);
        }
        let elapsed = watch.first_served.map_or(0.0, |t| now.duration_since(t).as_secs_f64());
        watch.progress = format!(
            "version {} on {} %: {:.0} of {} s; failed or late {:.1} % of {} (served version {:.1} % of {}); p99 {:.0} ms (served version {:.0} ms)",
            r.version,
            r.canary_percent,
            elapsed.min(r.window_s as f64),
            r.window_s,
            100.0 * c_rate,
            c.0 + c.1,
            100.0 * s_rate,
            s.0 + s.1,
            c_p99,
            s_p99
        );
        let end = |promote: bool, reason: String| {
            Some(tidal_proto::v1::EndRollout { task: r.task.clone(), promote, reason, version: r.version })
        };
        let judged = c.0 + c.1 >= MIN_CANARY_REQUESTS;
        if judged && c_rate > s_rate + r.max_error_increase {
            let why = format!(
                "the canary failed or was late on {:.1} % of {} requests against {:.1} %, beyond the {:.1}-point margin",
                100.0 * c_rate,
                c.0 + c.1,
                100.0 * s_rate,
                100.0 * r.max_error_increase
            );
            return end(false, why);
        }
        let latencies = watch.canary_p99.len() >= MIN_P99_SAMPLES;
        if judged && latencies && s_p99 > 0.0 && c_p99 > r.max_slowdown * s_p99 {
            let why = format!(
                "the canary's p99 {c_p99:.0} ms is {:.1}× the served version's {s_p99:.0} ms, beyond {:.1}×",
                c_p99 / s_p99,
                r.max_slowdown
            );
            return end(false, why);
        }
        // Promoted only on the evidence of a whole window: enough requests and latencies.
        if elapsed >= r.window_s as f64 && judged && latencies {
            return end(true, format!("within the margins for {} s: {}", r.window_s, watch.progress));
        }
        let waited = now.duration_since(watch.started).as_secs_f64();
        if waited >= 2.0 * r.window_s as f64 {
            let why = format!(
                "in {waited:.0} s the canary served {} requests over {} reports, fewer than the {MIN_CANARY_REQUESTS} \
                 requests and {MIN_P99_SAMPLES} reports it is judged on",
                c.0 + c.1,
                watch.canary_p99.len()
            );
            return end(false, why);
        }
        None
    }

    /// Seconds since a report last said a request came for `task` (arrived, waits for a
    /// worker, or was served), or since observation started when none did; `planned`: the
    /// plan in force gives it a worker. A new leader gives a task that has one a whole idle
    /// time again before it unloads it, and leaves one that has none (unloaded, or never
    /// asked for since it was registered) unloaded until a request comes.
    pub fn idle_s(&self, task: &str, now: Instant, planned: bool) -> f64 {
        match self.last_request.get(task) {
            Some(&last) => now.saturating_duration_since(last).as_secs_f64(),
            None if planned => now.saturating_duration_since(self.started).as_secs_f64(),
            None => f64::INFINITY,
        }
    }

    /// Forgets all that was observed of a deleted task and its canaries: a task registered
    /// later under its name starts from nothing (what its draining workers still report comes
    /// back, for a round).
    pub fn forget_task(&mut self, task: &str) {
        let of = |t: &str| t == task || tidal_common::task::parse_canary(t).is_some_and(|(base, _)| base == task);
        self.arrivals.retain(|t, _| !of(t));
        self.budgets.retain(|t, _| !of(t));
        self.sizes.retain(|(t, _), _| !of(t));
        self.totals.retain(|t, _| !of(t));
        self.served.retain(|t, _| !of(t));
        self.corrections.retain(|t, _| !of(t));
        self.round_rates.retain(|t, _| !of(t));
        self.last_request.retain(|t, _| !of(t));
        self.rollouts.remove(task);
    }

    /// Forgets the batches served by tasks other than `tasks` (removed ones: no round takes
    /// them).
    pub fn keep_served_of<'a>(&mut self, tasks: impl IntoIterator<Item = &'a String>) {
        let tasks: std::collections::HashSet<&String> = tasks.into_iter().collect();
        self.served.retain(|t, _| tasks.contains(t));
    }

    /// Seconds the latest worker of each variant of `task` took from its start to serving,
    /// as the agents measured it.
    pub fn load_times(&self, task: &str) -> BTreeMap<&str, f64> {
        let mut out = BTreeMap::new();
        for (_, report) in self.reports.values() {
            for w in report.workers.iter().filter(|w| w.task == task && w.load_ms > 0) {
                out.insert(w.variant.as_str(), w.load_ms as f64 / 1000.0);
            }
        }
        out
    }

    /// Each stage of `task` (in `order`) as the nodes' latest reports show it: the rate
    /// reaching its workers summed over nodes, counts summed, the worst queueing and latency.
    pub fn stages(&self, task: &str, order: &[String]) -> Vec<StageStatus> {
        let mut out: Vec<StageStatus> =
            order.iter().map(|s| StageStatus { stage: s.clone(), ..Default::default() }).collect();
        let reported = self.reports.values().flat_map(|(_, r)| r.tasks.iter()).filter(|t| t.task == task);
        for st in reported.flat_map(|t| t.stages.iter()) {
            let Some(s) = out.iter_mut().find(|s| s.stage == st.stage) else { continue };
            let seconds = st.arrivals_per_second.len().max(1) as f64;
            s.rate_rps += st.arrivals_per_second.iter().map(|&n| n as f64).sum::<f64>() / seconds;
            s.served += st.served;
            s.errors += st.errors;
            s.queue_p99_ms = s.queue_p99_ms.max(st.queue_p99_ms);
            s.latency_p99_ms = s.latency_p99_ms.max(st.latency_p99_ms);
        }
        out
    }

    /// The worst p99 latency any node reported for `task` in its latest report.
    pub fn p99(&self, task: &str) -> f64 {
        self.reports
            .values()
            .flat_map(|(_, r)| r.tasks.iter())
            .filter(|t| t.task == task && t.served > 0)
            .map(|t| t.latency_p99_ms)
            .fold(0.0, f64::max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tidal_proto::v1::TaskTelemetry;

    fn report(node: &str, arrivals: Vec<u32>) -> TelemetryReport {
        TelemetryReport {
            node: node.into(),
            tasks: vec![TaskTelemetry { task: "t".into(), arrivals_per_second: arrivals, ..Default::default() }],
            ..Default::default()
        }
    }

    /// A report of worker `id` of variant "v" of task `task` that served `n` batches of `run_ms`.
    fn served(node: &str, task: &str, id: &str, n: usize, run_ms: f64) -> TelemetryReport {
        let batch = ServedBatch { batch: 1, millicores: 1000, run_ms, size: 0, after_idle: false };
        TelemetryReport {
            node: node.into(),
            workers: vec![tidal_proto::v1::WorkerTelemetry {
                id: id.into(),
                task: task.into(),
                variant: "v".into(),
                served: vec![batch; n],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    /// OOM kills count from the second report of a node on (the first is what a new leader
    /// finds: kills seen before), per worker, and a count that went back is a new worker's.
    #[test]
    fn a_task_is_idle_from_its_last_request_or_from_when_observation_began() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut o = Observed::new(t0);
        assert_eq!(o.idle_s("t", at(7), true), 7.0, "a new leader counts from its start");
        assert_eq!(o.idle_s("t", at(7), false), f64::INFINITY, "and leaves an unloaded task unloaded");
        o.record(report("n", vec![0, 3]), at(10));
        assert_eq!(o.idle_s("t", at(15), false), 5.0);
        o.record(report("n", vec![0, 0]), at(20));
        assert_eq!(o.idle_s("t", at(25), true), 15.0, "seconds without a request are not one");
        // A request waiting for a worker is one, though no whole second has counted it yet.
        let mut waiting = report("n", vec![]);
        waiting.tasks[0].waiting = 1;
        o.record(waiting, at(30));
        assert_eq!(o.idle_s("t", at(30), false), 0.0);
        // A canary's requests are its task's.
        let mut canary = report("n", vec![1]);
        canary.tasks[0].task = "t@2".into();
        o.record(canary, at(40));
        assert_eq!(o.idle_s("t", at(41), true), 1.0);
        o.forget_task("t");
        assert_eq!(o.idle_s("t", at(42), true), 42.0);
    }

    #[test]
    fn oom_kills_are_counted_once_from_each_worker_s_growing_count() {
        let t0 = Instant::now();
        let mut o = Observed::new(t0);
        let report = |workers: &[(&str, u64)]| TelemetryReport {
            node: "a".into(),
            workers: workers
                .iter()
                .map(|&(id, oom_kills)| tidal_proto::v1::WorkerTelemetry {
                    id: id.into(),
                    task: "t".into(),
                    variant: "v".into(),
                    memory_bytes: 64 << 20,
                    max_batch: 4,
                    oom_kills,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        o.record(report(&[("w1", 3)]), t0);
        assert!(o.take_oom_kills().is_empty(), "a node's first report is the baseline");
        o.record(report(&[("w1", 5), ("w2", 1)]), t0);
        let kills: Vec<(String, u64)> = o.take_oom_kills().into_iter().map(|k| (k.worker, k.kills)).collect();
        assert_eq!(kills, [("w1".to_string(), 2), ("w2".to_string(), 1)]);
        o.record(report(&[("w1", 5), ("w2", 1)]), t0);
        assert!(o.take_oom_kills().is_empty(), "nothing new");
        // The agent restarted: w1 is a new worker whose cgroup counts from 0.
        o.record(report(&[("w1", 1)]), t0);
        assert_eq!(o.take_oom_kills().iter().map(|k| k.kills).collect::<Vec<_>>(), [1]);
    }

    /// A round takes a share of the batches from every worker of a variant, the latest of each,
    /// not the last reporter's alone; and batches of a task no longer registered are dropped.
    #[test]
    fn served_batches_are_taken_in_shares_per_worker_and_dropped_with_their_task() {
        let t0 = Instant::now();
        let mut o = Observed::new(t0);
        o.record(served("a", "t", "w1", 10, 5.0), t0);
        o.record(served("b", "t", "w1", 100, 9.0), t0);
        o.record(served("a", "gone", "w2", 10, 5.0), t0);
        let taken = o.take_served("t", |_, _| true);
        let runs: Vec<f64> = taken["v"].iter().map(|b| b.run_ms).collect();
        assert_eq!(runs.iter().filter(|&&r| r == 5.0).count(), 10, "all of the quiet worker's");
        assert_eq!(runs.iter().filter(|&&r| r == 9.0).count(), MAX_SERVED_PER_ROUND / 2, "a share of the busy one's");
        assert!(o.take_served("t", |_, _| true).is_empty(), "each batch is taken once");
        // A worker the round does not measure by (a standby on node b) gives nothing.
        o.record(served("a", "t", "w1", 10, 5.0), t0);
        o.record(served("b", "t", "w1", 10, 9.0), t0);
        let taken = o.take_served("t", |node, variant| !(node == "b" && variant == "v"));
        assert!(taken["v"].iter().all(|b| b.run_ms == 5.0) && taken["v"].len() == 10, "node a's only");
        o.keep_served_of([&"t".to_string()]);
        assert!(o.take_served("gone", |_, _| true).is_empty());
    }

    #[test]
    fn arrivals_from_several_nodes_add_up_per_second() {
        let t0 = Instant::now();
        let mut o = Observed::new(t0);
        let now = t0 + Duration::from_secs(10);
        o.record(report("a", vec![5, 7]), now);
        o.record(report("b", vec![1, 1]), now);
        assert_eq!(o.history("t", now, 4), vec![6.0, 8.0], "from the task's first second on");
        assert_eq!(o.rate("t", now, 2), 7.0);
        assert!(o.history("unknown", now, 2).is_empty());
    }

    /// A report as an agent makes it: its clock and the index of its first second.
    fn indexed(node: &str, second: u64, first: u64, arrivals: Vec<u32>) -> TelemetryReport {
        let mut r = report(node, arrivals);
        r.second = Some(second);
        r.tasks[0].first_second = Some(first);
        r
    }

    /// The cause: a report delayed past a second boundary, followed at once by the next,
    /// was filed one second late and summed with it; the 60 s peak kept the doubled second.
    #[test]
    fn a_delayed_report_is_filed_at_the_seconds_it_covers() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut o = Observed::new(t0);
        // The agent's clock runs 100 s behind the controller's; it reports every second.
        o.record(indexed("a", 10, 8, vec![150, 150]), at(110_050));
        o.record(indexed("a", 11, 10, vec![150]), at(111_050));
        // Its next report waits 900 ms (a lock, a solve) and the one after comes on time.
        o.record(indexed("a", 12, 11, vec![150]), at(112_950));
        o.record(indexed("a", 13, 12, vec![150]), at(113_050));
        assert_eq!(o.history("t", at(113_500), 60), vec![150.0; 5]);
        assert_eq!(o.rate("t", at(113_500), 5), 150.0);
    }

    #[test]
    fn the_last_second_counts_once_every_node_has_reported_it() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut o = Observed::new(t0);
        o.record(indexed("a", 5, 3, vec![10, 10]), at(5_010));
        o.record(indexed("b", 5, 3, vec![10, 10]), at(5_020));
        o.record(indexed("a", 6, 5, vec![10]), at(6_010));
        // b has not reported second 5 yet: the rate is not averaged over a partial second.
        assert_eq!(o.history("t", at(6_500), 60), vec![20.0, 20.0]);
        o.record(indexed("b", 6, 5, vec![10]), at(6_030));
        assert_eq!(o.history("t", at(6_500), 60), vec![20.0, 20.0, 20.0]);
        // A node that falls silent no longer holds the others back.
        o.record(indexed("a", 20, 6, vec![10; 14]), at(20_010));
        assert_eq!(o.history("t", at(20_500), 60).len(), 17);
    }

    #[test]
    fn an_agent_that_restarts_is_filed_by_its_new_clock() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut o = Observed::new(t0);
        o.record(indexed("a", 50, 48, vec![1, 1]), at(50));
        // Restarted at controller second 60: its clock starts again at 0.
        o.record(indexed("a", 2, 0, vec![7, 7]), at(62));
        let h = o.history("t", at(62), 14);
        assert_eq!(h[h.len() - 2..], [7.0, 7.0]);
        assert_eq!(h[..2], [1.0, 1.0]);
    }

    #[test]
    fn the_least_budget_of_the_window_is_kept() {
        let t0 = Instant::now();
        let mut o = Observed::new(t0);
        let mut r = report("a", vec![1]);
        r.tasks[0].min_budget_ms = 80.0;
        o.record(r.clone(), t0 + Duration::from_secs(5));
        r.tasks[0].min_budget_ms = 120.0;
        o.record(r.clone(), t0 + Duration::from_secs(20));
        r.tasks[0].min_budget_ms = 0.0; // none carried a budget
        o.record(r, t0 + Duration::from_secs(21));
        assert_eq!(o.min_budget("t", t0 + Duration::from_secs(21), 30), Some(80.0));
        assert_eq!(o.min_budget("t", t0 + Duration::from_secs(21), 10), Some(120.0));
        assert_eq!(o.min_budget("t", t0 + Duration::from_secs(60), 10), None);
        assert_eq!(o.min_budget("other", t0, 10), None);
    }

    #[test]
    fn the_sizes_of_the_window_make_each_stage_s_mix() {
        use tidal_proto::v1::{SizeCount, StageTelemetry};
        let t0 = Instant::now();
        let mut o = Observed::new(t0);
        let sized = |node: &str, counts: &[(u64, u64)]| {
            let mut r = report(node, vec![1]);
            r.tasks[0].stages = vec![StageTelemetry {
                stage: "encode".into(),
                sizes: counts.iter().map(|&(size, count)| SizeCount { size, count }).collect(),
                ..Default::default()
            }];
            r
        };
        o.record(sized("a", &[(100, 6)]), t0 + Duration::from_secs(5));
        o.record(sized("b", &[(100, 2), (400, 2)]), t0 + Duration::from_secs(20));
        // Both nodes' counts over 30 s; the last 10 s only b's.
        assert_eq!(o.size_mixes("t", t0 + Duration::from_secs(21), 30)["encode"], vec![(100, 0.8), (400, 0.2)]);
        assert_eq!(o.size_mixes("t", t0 + Duration::from_secs(21), 10)["encode"], vec![(100, 0.5), (400, 0.5)]);
        assert!(o.size_mixes("t", t0 + Duration::from_secs(90), 10).is_empty(), "nothing in the window");
        assert!(o.size_mixes("other", t0, 10).is_empty());
    }

    /// A rollout judged from the agents' reports: rolled back at once on errors beyond the
    /// margin (not before enough requests), or on a p99 beyond the slow-down margin over a few
    /// reports; promoted once the window has passed within both; rolled back for want of
    /// requests at its end.
    #[test]
    fn a_rollout_is_judged_on_errors_latency_and_its_window() {
        let rollout = tidal_proto::v1::Rollout {
            task: "t".into(),
            version: 2,
            canary_percent: 10,
            window_s: 60,
            max_error_increase: 0.01,
            max_slowdown: 2.0,
        };
        // Per report: (served, errors, p99 ms) of the version served and of the canary.
        let report = |s: (u64, u64, f64), c: (u64, u64, f64)| TelemetryReport {
            node: "n".into(),
            tasks: [("t", s), ("t@2", c)]
                .into_iter()
                .map(|(task, (served, errors, p99))| TaskTelemetry {
                    task: task.into(),
                    served,
                    errors,
                    latency_p99_ms: p99,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let run = |reports: &[(TelemetryReport, u64)]| {
            let mut o = Observed::new(t0);
            // The leader starts watching at its first round after the rollout began.
            let mut verdict = o.judge(&rollout, t0);
            for (r, second) in reports {
                o.record(r.clone(), at(*second));
                verdict = verdict.or_else(|| o.judge(&rollout, at(*second)));
            }
            verdict
        };
        // Errors: 3 of 20 failed against none, rolled back at once; not before 20 requests.
        let erring = [(report((100, 0, 10.0), (5, 3, 10.0)), 1), (report((100, 0, 10.0), (12, 0, 10.0)), 2)];
        assert_eq!(run(&erring[..1]), None, "8 canary requests are not enough to judge");
        let v = run(&erring).expect("rolled back");
        assert!(!v.promote && v.reason.contains("failed or was late"), "{v:?}");
        // Latency: 3× the p99 over three reports.
        let slow: Vec<_> = (1..=3).map(|s| (report((100, 0, 10.0), (10, 0, 30.0)), s)).collect();
        let v = run(&slow).expect("rolled back");
        assert!(!v.promote && v.reason.contains("p99"), "{v:?}");
        assert_eq!(run(&slow[..2]), None, "two reports are not a median");
        // Within the margins: promoted at the end of the window, not before.
        let healthy: Vec<_> = (1..=61).map(|s| (report((100, 1, 10.0), (10, 0, 12.0)), s)).collect();
        assert_eq!(run(&healthy[..59]), None);
        assert!(run(&healthy).expect("promoted").promote);
        // No canary traffic by twice the window: rolled back, for want of evidence.
        let idle: Vec<_> = (1..=121).map(|s| (report((100, 0, 10.0), (0, 0, 0.0)), s)).collect();
        assert_eq!(run(&idle[..118]), None, "its window counts from its first request");
        let v = run(&idle).expect("ended");
        assert!(!v.promote && v.reason.contains("fewer than"), "{v:?}");
    }
}
