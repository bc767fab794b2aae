//! A discrete-event simulator that replays a request-rate trace against a policy.
//!
//! Arrivals are a Poisson process within each second of the trace. Every interval the real
//! forecaster, scale-down stabiliser and solver decide a plan, exactly as the controller does;
//! the plan's workers have deadline-ordered queues, the agent's dynamic batcher, and batch
//! latencies drawn from the profile (between its p50 and a tail that reaches its p99 once in a
//! hundred batches). Plan changes cost what they cost on the real system: a new variant or
//! replica serves only after its model load; a policy that resizes in place changes a worker's
//! cores at once, one that does not (blue-green) starts a new worker and retires the old one
//! when it is ready, paying for both meanwhile; a worker leaving the plan keeps serving until
//! its successors are ready, then drains its queue. Deterministic for a seed.

mod worker;

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap};

use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use tidal_proto::v1::ProfilePoint;

use crate::forecast::{is_surge, Forecaster, ScaleDownStabiliser, SURGE_WINDOW_S};
use crate::latency::LatencyModel;
use crate::profile::ProfileGrid;
use crate::solver::{solve, Limits, PolicyKind, Problem, Solution, Stage, Variant, Weights};
use worker::{Next, Request, Resize, SimWorker};

/// A variant as the simulator knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct SimVariant {
    pub name: String,
    pub accuracy: f64,
    pub points: Vec<ProfilePoint>,
    /// Seconds from starting a worker to its first request.
    pub load_time_s: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    pub slo_ms: f64,
    pub interval_s: usize,
    pub core_budget: u32,
    pub weights: Weights,
    pub model: LatencyModel,
    pub limits: Limits,
    /// Rounds a lower forecast must hold before a plan is sized down.
    pub scale_down_after: u32,
    /// Seconds of history the forecaster sees.
    pub lookback_s: usize,
    pub seed: u64,
    /// Per second of the trace (cycled), the share of the SLO left for inference once the
    /// request has crossed the network (dynamic SLOs); `None`: all of it.
    pub slo_fractions: Option<Vec<f64>>,
}

/// What happened in one adaptation interval.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IntervalStats {
    pub start_s: usize,
    pub arrivals: u64,
    pub forecast_rps: f64,
    pub planned_rps: f64,
    pub mean_cores: f64,
    pub served: u64,
    /// Late or dropped, among the requests that finished (or were dropped) in the interval.
    pub violations: u64,
    pub accuracy: f64,
}

/// One policy's run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SimReport {
    pub policy: String,
    pub requests: u64,
    pub served: u64,
    /// Dropped at a deadline (or with no worker to take them).
    pub dropped: u64,
    /// Served late or dropped.
    pub violations: u64,
    pub violation_pct: f64,
    /// Over all requests, a dropped one counting as infinitely late.
    pub p99_ms: f64,
    pub p50_ms: f64,
    /// Mean accuracy of the served requests, percent.
    pub accuracy: f64,
    pub core_seconds: f64,
    pub mean_cores: f64,
    /// Intervals whose plan changed a worker.
    pub reconfigurations: u32,
    /// Intervals planned as overloaded (the forecast exceeded what the budget carries).
    pub overloaded_intervals: u32,
    /// Intervals whose solve failed (the previous plan was kept).
    pub failed_plans: u32,
    /// Re-plans between intervals because arrivals exceeded the planned rate.
    pub surge_replans: u32,
    pub intervals: Vec<IntervalStats>,
}

/// Replays `rates` (requests per second, one per second) after `warmup` (the seconds before,
/// which the forecaster sees as history but which are not served).
pub fn simulate(
    rates: &[f64],
    warmup: &[f64],
    variants: &[SimVariant],
    policy: &PolicyKind,
    forecaster: &dyn Forecaster,
    cfg: &SimConfig,
) -> SimReport {
    let mut sim = Sim::new(variants, policy, cfg, warmup);
    let interval = cfg.interval_s.max(1);
    let surges = policy.space(&cfg.limits).reacts_to_surges;
    for (second, &rate) in rates.iter().enumerate() {
        let t0 = second as f64;
        if second % interval == 0 {
            sim.close_interval(second);
            sim.replan(t0, forecaster);
        }
        let arrivals = poisson_arrivals(&mut sim.rng, t0, rate.max(0.0));
        for &a in &arrivals {
            sim.run_events_until(a);
            sim.arrive(a, second);
        }
        sim.run_events_until(t0 + 1.0);
        sim.history.push(arrivals.len() as f64);
        sim.current.arrivals += arrivals.len() as u64;
        sim.account_cores(t0 + 1.0);
        if surges
            && t0 + 1.0 >= sim.last_surge + SURGE_COOLDOWN_S
            && is_surge(&sim.history, sim.planned, SURGE_WINDOW_S)
        {
            sim.last_surge = t0 + 1.0;
            sim.surges += 1;
            sim.replan(t0 + 1.0, forecaster);
        }
    }
    // Let queued work finish (it is still counted), with no new arrivals.
    sim.run_events_until(f64::INFINITY);
    sim.close_interval(rates.len());
    sim.report(policy, rates.len())
}

/// Arrival times of a Poisson process of `rate` per second within [t0, t0 + 1).
fn poisson_arrivals(rng: &mut ChaCha8Rng, t0: f64, rate: f64) -> Vec<f64> {
    let mut out = Vec::with_capacity(rate as usize + 4);
    if rate <= 0.0 {
        return out;
    }
    let mut t = t0;
    loop {
        let u: f64 = rng.gen_range(f64::EPSILON..1.0);
        t += -u.ln() / rate;
        if t >= t0 + 1.0 {
            return out;
        }
        out.push(t);
    }
}

/// The least time between two surge re-plans, as in the controller.
const SURGE_COOLDOWN_S: f64 = 3.0;

#[derive(Debug, Clone, Copy, PartialEq)]
struct Event {
    at: f64,
    worker: usize,
    done: bool,
}

impl Eq for Event {}
impl PartialOrd for Event {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Event {
    fn cmp(&self, other: &Self) -> Ordering {
        self.at.total_cmp(&other.at).then(self.worker.cmp(&other.worker)).then(self.done.cmp(&other.done))
    }
}

struct Sim<'a> {
    variants: &'a [SimVariant],
    grids: Vec<ProfileGrid>,
    policy: &'a PolicyKind,
    cfg: &'a SimConfig,
    rng: ChaCha8Rng,
    workers: Vec<SimWorker>,
    events: BinaryHeap<Reverse<Event>>,
    latency_cache: HashMap<(usize, u32, u32), (f64, f64)>,
    routes: Vec<(usize, f64)>,
    routes_valid_until: f64,
    history: Vec<f64>,
    stabiliser: ScaleDownStabiliser,
    expired: Vec<Request>,
    latencies_us: Histogram<u64>,
    requests: u64,
    dropped: u64,
    violations: u64,
    accuracy_sum: f64,
    core_seconds: f64,
    reconfigurations: u32,
    overloaded: u32,
    failed: u32,
    /// The rate the current plan was sized for, and surge re-plans so far.
    planned: f64,
    last_surge: f64,
    surges: u32,
    current: IntervalStats,
    interval_acc: f64,
    interval_cores: f64,
    interval_seconds: u32,
    intervals: Vec<IntervalStats>,
}

impl<'a> Sim<'a> {
    fn new(variants: &'a [SimVariant], policy: &'a PolicyKind, cfg: &'a SimConfig, warmup: &[f64]) -> Self {
        Self {
            variants,
            grids: variants.iter().map(|v| ProfileGrid::new(&v.points)).collect(),
            policy,
            cfg,
            rng: ChaCha8Rng::seed_from_u64(cfg.seed),
            workers: Vec::new(),
            events: BinaryHeap::new(),
            latency_cache: HashMap::new(),
            routes: Vec::new(),
            routes_valid_until: f64::NEG_INFINITY,
            history: warmup.to_vec(),
            stabiliser: ScaleDownStabiliser::new(cfg.scale_down_after.max(1)),
            expired: Vec::new(),
            latencies_us: Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds"),
            requests: 0,
            dropped: 0,
            violations: 0,
            accuracy_sum: 0.0,
            core_seconds: 0.0,
            reconfigurations: 0,
            overloaded: 0,
            failed: 0,
            planned: 0.0,
            last_surge: f64::NEG_INFINITY,
            surges: 0,
            current: empty_interval(0),
            interval_acc: 0.0,
            interval_cores: 0.0,
            interval_seconds: 0,
            intervals: Vec::new(),
        }
    }

    fn deadline(&self, arrival: f64, second: usize) -> f64 {
        let fraction = self.cfg.slo_fractions.as_ref().filter(|f| !f.is_empty()).map_or(1.0, |f| f[second % f.len()]);
        arrival + self.cfg.slo_ms * fraction.clamp(0.0, 1.0) / 1000.0
    }

    /// The largest communication latency of the last interval's requests, in ms.
    fn comm_latency_ms(&self, second: usize) -> f64 {
        let Some(f) = self.cfg.slo_fractions.as_ref().filter(|f| !f.is_empty()) else { return 0.0 };
        let from = second.saturating_sub(self.cfg.interval_s.max(1));
        let least = (from..second.max(from + 1)).map(|s| f[s % f.len()]).fold(1.0, f64::min);
        self.cfg.slo_ms * (1.0 - least.clamp(0.0, 1.0))
    }

    fn replan(&mut self, t: f64, forecaster: &dyn Forecaster) {
        let lookback = &self.history[self.history.len().saturating_sub(self.cfg.lookback_s.max(1))..];
        let forecast = forecaster.forecast(lookback, self.cfg.interval_s.max(1));
        let planned = self.stabiliser.next(forecast);
        self.current.forecast_rps = forecast;
        self.current.planned_rps = planned;
        self.planned = planned;
        let running: Vec<usize> =
            self.workers.iter().filter(|w| w.retire_at.is_infinite()).map(|w| w.variant).collect();
        let problem = Problem {
            stages: vec![Stage {
                name: "task".into(),
                variants: self
                    .variants
                    .iter()
                    .enumerate()
                    .map(|(i, v)| Variant {
                        name: v.name.clone(),
                        accuracy: v.accuracy,
                        load_cost: if running.contains(&i) { 0.0 } else { 1.0 },
                        grid: self.grids[i].clone(),
                    })
                    .collect(),
            }],
            load_rps: planned,
            slo_ms: self.cfg.slo_ms,
            comm_latency_ms: self.comm_latency_ms(t as usize),
            core_budget: self.cfg.core_budget,
            weights: self.cfg.weights,
            model: self.cfg.model,
        };
        let space = self.policy.space(&self.cfg.limits);
        match solve(&problem, &space) {
            Ok(s) => {
                self.overloaded += s.overloaded as u32;
                let changed = self.apply(&s, t, space.in_place);
                self.reconfigurations += (changed && t > 0.0) as u32;
            }
            Err(_) => self.failed += 1,
        }
        self.routes_valid_until = f64::NEG_INFINITY;
    }

    /// Turns the solution into workers; true when any worker changed. Make before break: a
    /// worker that shrinks in place or leaves the plan keeps its shape and traffic until the
    /// workers that take over are ready.
    fn apply(&mut self, s: &Solution, t: f64, in_place: bool) -> bool {
        let mut current: Vec<usize> =
            (0..self.workers.len()).filter(|&i| self.workers[i].retire_at.is_infinite()).collect();
        let first = self.workers.is_empty();
        let mut changed = false;
        let mut latest_ready = t;
        let mut shrinking = Vec::new();
        for c in &s.choices {
            let max_delay = c.point.max_delay_ms as f64 / 1000.0;
            let share = c.share_rps / c.replicas as f64;
            for _ in 0..c.replicas {
                let reuse =
                    current.iter().position(|&i| self.workers[i].variant == c.variant).map(|k| current.remove(k));
                let ready_at = if first { t } else { t + self.variants[c.variant].load_time_s };
                let resize = Resize { at: t, cores: c.point.cores, batch: c.point.batch, max_delay, share };
                match reuse {
                    Some(i) if self.workers[i].cores == c.point.cores && self.workers[i].batch == c.point.batch => {
                        self.workers[i].resize(&resize);
                    }
                    Some(i) if in_place => {
                        if c.point.cores >= self.workers[i].cores {
                            self.workers[i].resize(&resize);
                        } else {
                            shrinking.push((i, resize));
                        }
                        changed = true;
                    }
                    reuse => {
                        let w = SimWorker::new(c.variant, c.point.cores, c.point.batch, max_delay, share, ready_at);
                        if let Some(old) = reuse {
                            self.workers[old].retire_at = ready_at;
                        }
                        latest_ready = latest_ready.max(ready_at);
                        self.workers.push(w);
                        changed = true;
                    }
                }
            }
        }
        for (i, mut resize) in shrinking {
            resize.at = latest_ready;
            if latest_ready <= t {
                self.workers[i].resize(&resize);
            } else {
                self.workers[i].pending = Some(resize);
            }
        }
        for i in current {
            self.workers[i].retire_at = latest_ready;
            changed = true;
        }
        changed
    }

    fn arrive(&mut self, a: f64, second: usize) {
        self.requests += 1;
        let r = Request { arrival: a, deadline: self.deadline(a, second) };
        let Some(w) = self.route(a) else {
            self.dropped += 1;
            self.violations += 1;
            self.current.violations += 1;
            return;
        };
        self.workers[w].enqueue(r);
        self.start(w, a);
    }

    /// A serving worker, drawn in proportion to the traffic the plan gives it.
    fn route(&mut self, t: f64) -> Option<usize> {
        if t >= self.routes_valid_until {
            self.rebuild_routes(t);
        }
        let total = self.routes.last()?.1;
        if total <= 0.0 {
            return self.routes.first().map(|r| r.0);
        }
        let x = self.rng.gen_range(0.0..total);
        let k = self.routes.partition_point(|r| r.1 <= x);
        self.routes.get(k.min(self.routes.len() - 1)).map(|r| r.0)
    }

    fn rebuild_routes(&mut self, t: f64) {
        self.routes.clear();
        let mut sum = 0.0;
        let mut next_change = f64::INFINITY;
        self.apply_due_resizes(t);
        for (i, w) in self.workers.iter().enumerate() {
            if w.serving(t) {
                sum += w.share.max(1e-9);
                self.routes.push((i, sum));
            }
            for at in [w.ready_at, w.retire_at, w.pending.map_or(f64::INFINITY, |r| r.at)] {
                if at > t {
                    next_change = next_change.min(at);
                }
            }
        }
        self.routes_valid_until = next_change;
    }

    /// In-place resizes that waited for their successors to be ready.
    fn apply_due_resizes(&mut self, t: f64) {
        for w in &mut self.workers {
            if let Some(r) = w.pending.filter(|r| r.at <= t) {
                w.resize(&r);
                w.pending = None;
            }
        }
    }

    fn start(&mut self, w: usize, t: f64) {
        let mut expired = std::mem::take(&mut self.expired);
        let next = self.workers[w].try_start(t, &mut expired);
        for _ in expired.drain(..) {
            self.dropped += 1;
            self.violations += 1;
            self.current.violations += 1;
        }
        self.expired = expired;
        match next {
            Next::Idle => {}
            Next::Started(k) => {
                let service = self.service_time(w, k as u32);
                self.events.push(Reverse(Event { at: t + service, worker: w, done: true }));
            }
            Next::WakeAt(at) => self.events.push(Reverse(Event { at, worker: w, done: false })),
        }
    }

    /// A batch's latency: p50 plus an exponential tail that passes p99 once in 100 batches.
    fn service_time(&mut self, w: usize, k: u32) -> f64 {
        let (variant, cores) = (self.workers[w].variant, self.workers[w].cores);
        let grid = &self.grids[variant];
        let (p50, p99) =
            *self.latency_cache.entry((variant, cores, k)).or_insert_with(|| batch_latency(grid, cores, k));
        let e = -self.rng.gen_range(f64::EPSILON..1.0f64).ln();
        (p50 + (p99 - p50).max(0.0) * e / 100f64.ln()) / 1000.0
    }

    fn run_events_until(&mut self, t: f64) {
        while let Some(Reverse(e)) = self.events.peek().copied() {
            if e.at > t {
                return;
            }
            self.events.pop();
            if e.done {
                self.complete(e.worker, e.at);
                self.start(e.worker, e.at);
            } else if self.workers[e.worker].wake_at == Some(e.at) {
                self.start(e.worker, e.at);
            }
        }
    }

    fn complete(&mut self, w: usize, t: f64) {
        let accuracy = self.variants[self.workers[w].variant].accuracy;
        let batch = std::mem::take(&mut self.workers[w].in_flight);
        for r in &batch {
            let latency_us = ((t - r.arrival) * 1e6).max(1.0) as u64;
            let _ = self.latencies_us.record(latency_us.min(3_600_000_000));
            self.accuracy_sum += accuracy;
            self.interval_acc += accuracy;
            self.current.served += 1;
            if t > r.deadline + 1e-9 {
                self.violations += 1;
                self.current.violations += 1;
            }
        }
    }

    fn account_cores(&mut self, t: f64) {
        let cores: u32 = self.workers.iter().filter(|w| !w.gone(t)).map(|w| w.cores).sum();
        self.core_seconds += cores as f64;
        self.interval_cores += cores as f64;
        self.interval_seconds += 1;
    }

    fn close_interval(&mut self, second: usize) {
        if self.interval_seconds > 0 || self.current.served > 0 {
            let mut done = std::mem::replace(&mut self.current, empty_interval(second));
            done.mean_cores = self.interval_cores / self.interval_seconds.max(1) as f64;
            done.accuracy = if done.served > 0 { self.interval_acc / done.served as f64 } else { 0.0 };
            self.intervals.push(done);
        } else {
            self.current.start_s = second;
        }
        (self.interval_acc, self.interval_cores, self.interval_seconds) = (0.0, 0.0, 0);
    }

    fn report(self, policy: &PolicyKind, seconds: usize) -> SimReport {
        let served = self.latencies_us.len();
        let quantile = |q: f64| -> f64 {
            let rank = (q * self.requests as f64).ceil() as u64;
            if served == 0 || rank > served {
                f64::INFINITY
            } else {
                self.latencies_us.value_at_quantile(rank as f64 / served as f64) as f64 / 1000.0
            }
        };
        SimReport {
            policy: policy.to_string(),
            requests: self.requests,
            served,
            dropped: self.dropped,
            violations: self.violations,
            violation_pct: 100.0 * self.violations as f64 / self.requests.max(1) as f64,
            p99_ms: quantile(0.99),
            p50_ms: quantile(0.50),
            accuracy: if served > 0 { self.accuracy_sum / served as f64 } else { 0.0 },
            core_seconds: self.core_seconds,
            mean_cores: self.core_seconds / seconds.max(1) as f64,
            reconfigurations: self.reconfigurations,
            overloaded_intervals: self.overloaded,
            failed_plans: self.failed,
            surge_replans: self.surges,
            intervals: self.intervals,
        }
    }
}

fn empty_interval(start_s: usize) -> IntervalStats {
    IntervalStats {
        start_s,
        arrivals: 0,
        forecast_rps: 0.0,
        planned_rps: 0.0,
        mean_cores: 0.0,
        served: 0,
        violations: 0,
        accuracy: 0.0,
    }
}

/// (p50, p99) of a batch of `k` on `cores`: the profile's estimate, or for a partial batch
/// below the smallest measured batch, that batch's latency.
fn batch_latency(grid: &ProfileGrid, cores: u32, k: u32) -> (f64, f64) {
    let estimate = grid.estimate(cores, k).or_else(|| {
        let b = *grid.batches().iter().find(|&&b| b >= k)?;
        grid.estimate(cores, b)
    });
    estimate.map_or((1e6, 1e6), |e| (e.latency_p50_ms, e.latency_p99_ms))
}

#[cfg(test)]
mod tests;
