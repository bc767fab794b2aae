//! A discrete-event simulator that replays a request-rate trace against a policy.
//!
//! Arrivals are a Poisson process within each second of the trace. The plans come from the
//! adaptation core ([`crate::adapt`]) that the controller drives too: the simulator is one of
//! its two drivers ([`SimPlanner`]), on a single node of `core_budget` cores. Plans are applied
//! as on an agent: the same reconcile ([`crate::reconcile::diff`]) carried out through the same
//! executor contract ([`crate::executor`]), and the workers have
//! deadline-ordered queues, the agent's dynamic batcher, and batch latencies drawn from the
//! profile (between its p50 and a tail that reaches its p99 once in a hundred batches; times
//! `SimConfig::slowdown`, a machine slower than profiled), which they report to the planner as
//! agents do, so that it corrects its profiles by the same rule ([`crate::profile_correction`]). Plan
//! changes cost what they cost on the real system: a new worker serves only after its model
//! load; an in-place policy grows a worker's cores at once and shrinks them once the task's new
//! workers serve; a blue-green one starts a worker of the new shape and retires the old one
//! when it is ready, paying for both meanwhile; a worker leaving the plan keeps serving until
//! its task's starting workers are ready, then drains its queue. Deterministic for a seed.

mod executor;
mod worker;

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BinaryHeap, HashMap};

use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use tidal_proto::v1::{ProfilePoint, ServedBatch};

use tidal_proto::v1::{Plan, TaskSpec, VariantSpec};

use crate::adapt::{
    serves_only_as_standby, AdaptConfig, Adapter, NodeInput, Round, RoundInput, Serving, Surge, TaskInput,
};
use crate::profile::ProfileGrid;
pub use executor::{NodeTimeline, ServingWorker};
use worker::{Next, Request, SimWorker};

/// A stage of the simulated task: the variants that may serve it.
#[derive(Debug, Clone, PartialEq)]
pub struct SimStage {
    pub name: String,
    pub variants: Vec<SimVariant>,
    /// Objects of each frame it takes from the previous stage's detections (1: its output as
    /// is). The simulator serves a frame's crops as one request of the stage's profile seen
    /// per frame ([`crate::task::per_request`]), as the planner sees it.
    pub crops: u32,
}

impl SimStage {
    pub fn new(name: &str, variants: Vec<SimVariant>) -> Self {
        Self { name: name.into(), variants, crops: 1 }
    }
}

/// A variant as the simulator knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct SimVariant {
    pub name: String,
    pub accuracy: f64,
    pub points: Vec<ProfilePoint>,
    /// Seconds from starting a worker to its first request.
    pub load_time_s: f64,
    /// Of a stage that writes tokens: how many at most, and its profile by output length.
    pub generate: Option<SimGenerate>,
}

/// A variant that writes tokens, as the simulator serves it: `points` (planned at the most
/// tokens, as the controller plans) is its profile at `max_tokens`; each batch writes what its
/// requests' time affords by the agent's rule ([`crate::generation`]) and takes the time
/// `by_output` gives for that many tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct SimGenerate {
    pub max_tokens: u32,
    /// A request cut short is refused (a violation), not answered with part of its text.
    pub refuse_unfinished: bool,
    /// Its profile points measured at several output lengths (`output_tokens`).
    pub by_output: Vec<ProfilePoint>,
}

impl SimVariant {
    /// A variant that writes no tokens.
    pub fn new(name: &str, accuracy: f64, points: Vec<ProfilePoint>, load_time_s: f64) -> Self {
        Self { name: name.into(), accuracy, points, load_time_s, generate: None }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// The adaptation round's settings, policy included, as the controller takes them.
    pub adapt: AdaptConfig,
    pub slo_ms: f64,
    pub core_budget: u32,
    pub seed: u64,
    /// Per second of the trace (cycled), the share of the SLO left for inference once the
    /// request has crossed the network (dynamic SLOs); `None`: all of it.
    pub slo_fractions: Option<Vec<f64>>,
    /// How much slower than their profiles the workers run (1: as profiled; 1.2: a node
    /// that slowed by a fifth after profiling). The planner is not told: it learns it from
    /// the batches served, as the controller does, when it corrects profiles.
    pub slowdown: f64,
    /// The memory the node's workers may take, bytes (0: not declared; planned by cores
    /// only, as an agent started with `--memory 0`). A worker takes what the plan gives it:
    /// its variant's profiled peak (`ProfilePoint::resident_bytes`) with the planner's
    /// headroom.
    pub memory_bytes: u64,
    /// Let make before break hold a leaving worker and its successor both while it loads, past
    /// the declared memory (the agent's `--overlap-transitions`). By default transitions keep
    /// within it too: a worker starts only when the node's memory holds it beside what runs, and
    /// a switch that cannot be made before it breaks breaks first (see [`crate::executor`]).
    pub overlap_transitions: bool,
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

/// One task's part of a run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskReport {
    pub task: String,
    pub requests: u64,
    pub served: u64,
    pub dropped: u64,
    pub violations: u64,
    pub violation_pct: f64,
    pub p99_ms: f64,
    pub accuracy: f64,
    pub core_seconds: f64,
    pub mean_cores: f64,
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
    /// Mean accuracy of the served requests, percent: the mean over a request's stages.
    pub accuracy: f64,
    /// The same with the product over a request's stages (IPA's second definition).
    pub accuracy_product: f64,
    /// IPA's normalised accuracy: the sum over a request's stages of where its variant's
    /// accuracy lies between its stage's least and most accurate variants (0 to 1 each; 1 for
    /// a stage of one variant), the mean over served requests.
    pub accuracy_normalised: f64,
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
    /// Requests the plan's pick would have refused that another variant of their stage took
    /// (routing by slack, [`crate::slack`]).
    pub slack_reroutes: u64,
    pub intervals: Vec<IntervalStats>,
    /// Per task, in the order given.
    pub tasks: Vec<TaskReport>,
    /// Jain's fairness index of the tasks' SLO attainment (the share of each task's requests
    /// answered within its SLO): 1 when all attain alike, 1/n when one task has it all.
    pub jain_attainment: f64,
    /// The profile corrections the planner ended with (task, variant, factor), those not 1.
    pub profile_factors: Vec<(String, String, f64)>,
    /// The most memory a plan gave the node's workers, bytes.
    pub peak_planned_memory_bytes: u64,
    /// The most memory the node's workers held at once (bytes, sampled each second; a worker
    /// counted from its start until it has retired and drained, so a worker replaced keeps
    /// its memory while its successor loads, as on an agent), and the mean.
    pub peak_memory_bytes: u64,
    pub mean_memory_bytes: f64,
    /// Seconds in which the memory held exceeded the node's declared memory (0 when none was
    /// declared): plans keep within it, their transitions need not.
    pub seconds_over_memory: u64,
    /// Times a task without a worker was given one again because a request came for it
    /// (cold starts), and the requests that waited for such a worker.
    pub cold_starts: u32,
    pub cold_requests: u64,
    /// Times a plan took a task's last worker away (idle, or unloaded for others' memory).
    pub unloads: u32,
}

/// A task of a multi-task run: its pipeline, SLO, share and the arrivals it replays.
#[derive(Debug, Clone, PartialEq)]
pub struct SimTask {
    pub name: String,
    pub stages: Vec<SimStage>,
    pub slo_ms: f64,
    /// Requests per second, one per simulated second (the run lasts as long as the longest).
    pub rates: Vec<f64>,
    /// The seconds before, which the forecaster sees as history but which are not served.
    pub warmup: Vec<f64>,
    pub share: Option<tidal_proto::v1::TaskShare>,
}

/// Replays `rates` (requests per second, one per second) after `warmup` (the seconds before,
/// which the forecaster sees as history but which are not served) against a one-stage task
/// of `variants`.
pub fn simulate(rates: &[f64], warmup: &[f64], variants: &[SimVariant], cfg: &SimConfig) -> SimReport {
    let stage = SimStage::new(SimPlanner::TASK, variants.to_vec());
    simulate_pipeline(rates, warmup, &[stage], cfg)
}

/// Replays `rates` against a pipeline of `stages`: a request runs stage after stage, each on a
/// worker of that stage the plan's weights pick, within one deadline; its accuracy is the mean
/// of the accuracies of the variants that served its stages (the planner's own measure).
pub fn simulate_pipeline(rates: &[f64], warmup: &[f64], stages: &[SimStage], cfg: &SimConfig) -> SimReport {
    let task = SimTask {
        name: SimPlanner::TASK.into(),
        stages: stages.to_vec(),
        slo_ms: cfg.slo_ms,
        rates: rates.to_vec(),
        warmup: warmup.to_vec(),
        share: None,
    };
    simulate_tasks(&[task], cfg)
}

/// Replays several tasks at once on one node of `cfg.core_budget` cores (and `cfg.memory_bytes`
/// of memory), each its own arrivals,
/// planned together by the adaptation core as the controller plans them (`cfg.slo_ms` is not
/// used: each task has its own). The forecaster is the configuration's, as on the controller.
pub fn simulate_tasks(tasks: &[SimTask], cfg: &SimConfig) -> SimReport {
    let mut sim = Sim::new(tasks, cfg);
    let interval = (cfg.adapt.interval_s.round() as usize).max(1);
    let seconds = tasks.iter().map(|t| t.rates.len()).max().unwrap_or(0);
    let mut arrivals: Vec<(f64, usize)> = Vec::new();
    for second in 0..seconds {
        let t0 = second as f64;
        if second % interval == 0 {
            sim.close_interval(second);
            sim.replan(t0);
        }
        arrivals.clear();
        for (task, t) in tasks.iter().enumerate() {
            let rate = t.rates.get(second).copied().unwrap_or(0.0).max(0.0);
            let drawn = poisson_arrivals(&mut sim.rng, t0, rate);
            sim.history[task].push(drawn.len() as f64);
            arrivals.extend(drawn.into_iter().map(|a| (a, task)));
        }
        if tasks.len() > 1 {
            arrivals.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
        for &(a, task) in &arrivals {
            sim.release_cold(a);
            sim.run_events_until(a);
            sim.arrive(task, a, second);
        }
        sim.release_cold(t0 + 1.0);
        sim.run_events_until(t0 + 1.0);
        sim.current.arrivals += arrivals.len() as u64;
        sim.account_cores(t0 + 1.0);
        // Requests wait for a task without a worker: its agent reports at once, and the
        // controller plans it (at the second's end here: the report and the round's wait).
        if std::mem::take(&mut sim.woken) {
            sim.replan(t0 + 1.0);
        } else if sim.planner.surge(t0 + 1.0, &sim.history).is_some() {
            sim.surges += 1;
            sim.replan(t0 + 1.0);
        }
    }
    // Let queued work finish (it is still counted), with no new arrivals; requests still
    // waiting for a worker go unanswered.
    sim.release_cold(f64::INFINITY);
    sim.run_events_until(f64::INFINITY);
    sim.close_interval(seconds);
    let policy = cfg.adapt.policy.to_string();
    sim.report(policy, seconds)
}

/// How long a request for a task without a worker waits for one: the agent's default
/// (`--cold-start-wait-s`).
pub const COLD_START_WAIT_S: f64 = 30.0;

/// Seconds since the last second with an arrival (all of them when none had one).
fn idle_seconds(arrivals: &[f64]) -> f64 {
    arrivals.iter().rev().take_while(|&&a| a <= 0.0).count() as f64
}

/// The model file the simulator's task names for a variant; what its running workers report,
/// so that reconcile sees them unchanged.
fn model_file(variant: &str) -> String {
    format!("{variant}.onnx")
}

/// The simulator's driver of the adaptation core: its tasks (one, named [`SimPlanner::TASK`],
/// unless given) on one node, [`SimPlanner::NODE`], of `core_budget` cores. The controller
/// drives the same core from its replicated state and the agents' telemetry.
pub struct SimPlanner {
    adapter: Adapter,
    specs: Vec<TaskSpec>,
    /// Per task, per variant.
    profiles: Vec<Vec<(String, Vec<tidal_proto::v1::ProfilePoint>)>>,
    load_s: Vec<Vec<(String, f64)>>,
    cores: u32,
    /// The node's declared memory, bytes (0: none).
    memory_bytes: u64,
    /// The plan in force (epochs count from 1).
    pub plan: Option<Plan>,
}

impl SimPlanner {
    pub const TASK: &'static str = "task";
    pub const NODE: &'static str = "sim";

    /// A one-stage task of `variants`.
    pub fn new(variants: &[SimVariant], slo_ms: f64, core_budget: u32, adapter: Adapter) -> Self {
        let stage = SimStage::new(Self::TASK, variants.to_vec());
        Self::pipeline(&[stage], slo_ms, core_budget, adapter)
    }

    /// A task of `stages`.
    pub fn pipeline(stages: &[SimStage], slo_ms: f64, core_budget: u32, adapter: Adapter) -> Self {
        Self::tasks(&[(Self::TASK, stages, slo_ms, None)], core_budget, adapter)
    }

    /// Several tasks: (name, stages, SLO in ms, share) each.
    pub fn tasks(
        tasks: &[(&str, &[SimStage], f64, Option<tidal_proto::v1::TaskShare>)],
        core_budget: u32,
        adapter: Adapter,
    ) -> Self {
        let specs: Vec<TaskSpec> =
            tasks.iter().map(|(name, stages, slo_ms, share)| task_spec(name, stages, *slo_ms, *share)).collect();
        let variants = |stages: &[SimStage]| stages.iter().flat_map(|s| s.variants.clone()).collect::<Vec<_>>();
        let profiles = tasks
            .iter()
            .map(|(_, stages, ..)| variants(stages).into_iter().map(|v| (v.name, v.points)).collect())
            .collect();
        let load_s = tasks
            .iter()
            .map(|(_, stages, ..)| variants(stages).into_iter().map(|v| (v.name, v.load_time_s)).collect())
            .collect();
        Self { adapter, specs, profiles, load_s, cores: core_budget, memory_bytes: 0, plan: None }
    }

    /// The node declares `bytes` of memory for its workers (0: none, the default).
    pub fn with_memory(self, bytes: u64) -> Self {
        Self { memory_bytes: bytes, ..self }
    }

    /// The (first) task as the simulator registers it.
    pub fn spec(&self) -> &TaskSpec {
        &self.specs[0]
    }

    /// One round of a single task on its arrivals so far (see [`Self::round_all`]).
    pub fn round(&mut self, arrivals: &[f64], min_budget_ms: Option<f64>) -> Round {
        self.round_all(&[arrivals], &[min_budget_ms], &[])
    }

    /// One round on each task's arrivals so far, the smallest budget its requests carried and
    /// the batches its variants served since the last round; a changed plan becomes the plan
    /// in force with the next epoch.
    pub fn round_all(
        &mut self,
        arrivals: &[&[f64]],
        min_budget_ms: &[Option<f64>],
        served: &[BTreeMap<String, Vec<ServedBatch>>],
    ) -> Round {
        let tasks = self
            .specs
            .iter()
            .enumerate()
            .map(|(i, spec)| TaskInput {
                spec,
                arrivals: arrivals.get(i).copied().unwrap_or_default(),
                min_budget_ms: min_budget_ms.get(i).copied().flatten(),
                profiles: self.profiles[i].iter().map(|(n, p)| (n.as_str(), p.as_slice())).collect(),
                // Outside the replicated state: each profile is known by its points.
                profile_indices: BTreeMap::new(),
                load_s: self.load_s[i].iter().map(|(n, s)| (n.as_str(), *s)).collect(),
                // The simulated requests carry no sizes: each variant at its profile's own.
                sizes: BTreeMap::new(),
                served: served
                    .get(i)
                    .map(|by_variant| by_variant.iter().map(|(n, b)| (n.as_str(), b.as_slice())).collect())
                    .unwrap_or_default(),
                idle_s: idle_seconds(arrivals.get(i).copied().unwrap_or_default()),
            })
            .collect();
        let input = RoundInput {
            tasks,
            nodes: vec![NodeInput {
                name: Self::NODE,
                address: "",
                cores: self.cores,
                memory_bytes: self.memory_bytes,
            }],
            current: self.plan.as_ref(),
            // One node: the agent's own make before break applies, nothing is held.
            serving: &Serving::new(),
        };
        let mut round = self.adapter.round(&input);
        if round.changed {
            round.plan.epoch = self.plan.as_ref().map_or(0, |p| p.epoch) + 1;
            self.plan = Some(round.plan.clone());
        }
        round
    }

    /// Whether arrivals call for a round now (see [`Adapter::surge`]); one history per task.
    pub fn surge(&mut self, now_s: f64, arrivals: &[Vec<f64>]) -> Option<Surge> {
        let tasks = self.specs.iter().zip(arrivals).map(|(s, a)| (s.name.as_str(), a.as_slice()));
        self.adapter.surge(now_s, tasks)
    }
}

/// The task the simulator registers for `stages`.
fn task_spec(name: &str, stages: &[SimStage], slo_ms: f64, share: Option<tidal_proto::v1::TaskShare>) -> TaskSpec {
    let slo = slo_ms.round().clamp(1.0, u32::MAX as f64) as u32;
    TaskSpec {
        name: name.into(),
        slo_ms: slo,
        variants: vec![],
        stages: stages
            .iter()
            .map(|s| {
                let variants = s
                    .variants
                    .iter()
                    .map(|v| VariantSpec {
                        name: v.name.clone(),
                        model_file: model_file(&v.name),
                        accuracy: v.accuracy,
                        input_shape: vec![3, 1, 1],
                        tensor_names: Default::default(),
                        tokenizer_file: String::new(),
                        io: None,
                        model_sha256: String::new(),
                    })
                    .collect();
                let mut stage = crate::task::stage(&s.name, variants);
                if s.crops > 1 {
                    stage.connector = tidal_proto::v1::Connector::Crops as i32;
                    stage.crops = s.crops;
                }
                stage
            })
            .collect(),
        share,
        version: 1,
        canary: None,
    }
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

/// What one task's requests met.
struct TaskCounters {
    requests: u64,
    dropped: u64,
    violations: u64,
    accuracy_sum: f64,
    accuracy_product_sum: f64,
    accuracy_normalised_sum: f64,
    core_seconds: f64,
    latencies_us: Histogram<u64>,
}

impl TaskCounters {
    fn new() -> Self {
        Self {
            requests: 0,
            dropped: 0,
            violations: 0,
            accuracy_sum: 0.0,
            accuracy_product_sum: 0.0,
            accuracy_normalised_sum: 0.0,
            core_seconds: 0.0,
            latencies_us: Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds"),
        }
    }

    /// The latency at quantile `q` of all requests, a dropped one counting as infinitely late.
    fn quantile_ms(&self, q: f64) -> f64 {
        let served = self.latencies_us.len();
        let rank = (q * self.requests as f64).ceil() as u64;
        if served == 0 || rank > served {
            f64::INFINITY
        } else {
            self.latencies_us.value_at_quantile(rank as f64 / served as f64) as f64 / 1000.0
        }
    }
}

struct Sim<'a> {
    /// Every task's every stage's variants, in order; `task_of` and `stage_of` give each
    /// one's task and stage (within the task).
    variants: Vec<SimVariant>,
    task_of: Vec<usize>,
    stage_of: Vec<usize>,
    /// Each variant's accuracy scaled to its stage's range (IPA's normalisation).
    normalised: Vec<f64>,
    /// Whether each variant's served batches are reported to the planner, and at what input
    /// size (its grid's).
    reports: Vec<bool>,
    served_size: Vec<u64>,
    tasks: &'a [SimTask],
    grids: Vec<ProfileGrid>,
    /// Of a variant that writes tokens, its points by output length (per request, as `grids`);
    /// empty for the others.
    by_output: Vec<Vec<ProfilePoint>>,
    cfg: &'a SimConfig,
    planner: SimPlanner,
    rng: ChaCha8Rng,
    workers: Vec<SimWorker>,
    events: BinaryHeap<Reverse<Event>>,
    /// (variant, cores, batch, tokens written (0: not a generating variant)) → its latency.
    latency_cache: HashMap<(usize, u32, u32, u32), (f64, f64)>,
    /// Per task, per stage, the serving workers with the running sum of their shares.
    routes: Vec<Vec<Vec<(usize, f64)>>>,
    routes_valid_until: f64,
    /// The plan's routing is by slack ([`crate::slack`]).
    by_slack: bool,
    /// Requests the pick would have refused that another worker took.
    rerouted: u64,
    /// Per task, the arrivals of every second so far (its warm-up first).
    history: Vec<Vec<f64>>,
    expired: Vec<Request>,
    counters: Vec<TaskCounters>,
    reconfigurations: u32,
    overloaded: u32,
    failed: u32,
    surges: u32,
    /// Per task, requests waiting for a worker of a task the plan gave none (unloaded while
    /// idle), as they wait at an agent; `woken`: one started waiting this second.
    cold: Vec<Vec<Request>>,
    woken: bool,
    /// Per task, whether it may go without a worker (`TaskShare.min_workers` 0).
    unloads: Vec<bool>,
    cold_starts: u32,
    cold_requests: u64,
    unloaded: u32,
    /// Whether a plan was applied (the first one's workers serve at once).
    planned: bool,
    /// Memory the workers hold: the most at once, the sum over seconds, and the seconds over
    /// the node's declared memory.
    peak_memory: u64,
    peak_planned_memory: u64,
    memory_seconds: f64,
    seconds_over_memory: u64,
    current: IntervalStats,
    interval_acc: f64,
    interval_cores: f64,
    interval_seconds: u32,
    intervals: Vec<IntervalStats>,
}

impl<'a> Sim<'a> {
    fn new(tasks: &'a [SimTask], cfg: &'a SimConfig) -> Self {
        let adapter = Adapter::new(cfg.adapt.clone());
        let described: Vec<(&str, &[SimStage], f64, Option<tidal_proto::v1::TaskShare>)> =
            tasks.iter().map(|t| (t.name.as_str(), t.stages.as_slice(), t.slo_ms, t.share)).collect();
        let planner = SimPlanner::tasks(&described, cfg.core_budget, adapter).with_memory(cfg.memory_bytes);
        let (mut variants, mut task_of, mut stage_of, mut grids) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut by_output = Vec::new();
        let (mut normalised, mut reports, mut served_size) = (Vec::new(), Vec::new(), Vec::new());
        for (i, (task, spec)) in tasks.iter().zip(&planner.specs).enumerate() {
            let factors = crate::task::load_factors(spec);
            for (s, stage) in task.stages.iter().enumerate() {
                let least = stage.variants.iter().map(|v| v.accuracy).fold(f64::INFINITY, f64::min);
                let most = stage.variants.iter().map(|v| v.accuracy).fold(f64::NEG_INFINITY, f64::max);
                for v in &stage.variants {
                    // The profile at one input size, the one the planner takes for requests of
                    // no particular size (`points_at_mix` without a mix): the variant's own,
                    // else the largest measured.
                    let own = spec.stages[s]
                        .variants
                        .iter()
                        .find(|sv| sv.name == v.name)
                        .and_then(|sv| crate::tensor::element_count(&sv.input_shape))
                        .unwrap_or(0) as u64;
                    let at = crate::profile::points_at_mix(&v.points, own, &[]);
                    grids.push(ProfileGrid::new(&crate::task::per_request(&at.points, factors[s])));
                    let size_of = |p: &ProfilePoint| if p.size == 0 { own } else { p.size };
                    let size = if v.points.iter().any(|p| size_of(p) == own) {
                        own
                    } else {
                        v.points.iter().map(size_of).max().unwrap_or(own)
                    };
                    served_size.push(size);
                    by_output.push(
                        v.generate
                            .as_ref()
                            .map_or_else(Vec::new, |g| crate::task::per_request(&g.by_output, factors[s])),
                    );
                    normalised.push(if most > least { (v.accuracy - least) / (most - least) } else { 1.0 });
                    // A fan-out stage's simulated batch is of requests, each several model
                    // inputs ([`crate::task::per_request`]), not a batch its profile measured;
                    // a stage that writes text is timed by the tokens it wrote, not by its
                    // profile (the controller does not correct either).
                    reports.push(factors[s] <= 1.0 && v.generate.is_none());
                    variants.push(v.clone());
                    task_of.push(i);
                    stage_of.push(s);
                }
            }
        }
        let unloads = planner.specs.iter().map(|spec| crate::task::unloads_after_s(spec).is_some()).collect();
        Self {
            grids,
            by_output,
            reports,
            served_size,
            variants,
            task_of,
            stage_of,
            normalised,
            tasks,
            cfg,
            planner,
            rng: ChaCha8Rng::seed_from_u64(cfg.seed),
            workers: Vec::new(),
            events: BinaryHeap::new(),
            latency_cache: HashMap::new(),
            routes: tasks.iter().map(|t| vec![Vec::new(); t.stages.len()]).collect(),
            routes_valid_until: f64::NEG_INFINITY,
            by_slack: false,
            rerouted: 0,
            history: tasks.iter().map(|t| t.warmup.clone()).collect(),
            expired: Vec::new(),
            counters: tasks.iter().map(|_| TaskCounters::new()).collect(),
            reconfigurations: 0,
            overloaded: 0,
            failed: 0,
            surges: 0,
            cold: tasks.iter().map(|_| Vec::new()).collect(),
            woken: false,
            unloads,
            cold_starts: 0,
            cold_requests: 0,
            unloaded: 0,
            planned: false,
            peak_memory: 0,
            peak_planned_memory: 0,
            memory_seconds: 0.0,
            seconds_over_memory: 0,
            current: empty_interval(0),
            interval_acc: 0.0,
            interval_cores: 0.0,
            interval_seconds: 0,
            intervals: Vec::new(),
        }
    }

    fn slo_fraction(&self, second: usize) -> f64 {
        let f = self.cfg.slo_fractions.as_ref().filter(|f| !f.is_empty());
        f.map_or(1.0, |f| f[second % f.len()].clamp(0.0, 1.0))
    }

    fn deadline(&self, task: usize, arrival: f64, second: usize) -> f64 {
        arrival + self.tasks[task].slo_ms * self.slo_fraction(second) / 1000.0
    }

    /// The smallest budget a task's requests arrived with over the last interval, ms, as an
    /// agent reports it (none without dynamic SLOs).
    fn min_budget_ms(&self, task: usize, second: usize) -> Option<f64> {
        self.cfg.slo_fractions.as_ref().filter(|f| !f.is_empty())?;
        let from = second.saturating_sub((self.cfg.adapt.interval_s.round() as usize).max(1));
        let least = (from..second.max(from + 1)).map(|s| self.slo_fraction(s)).fold(1.0, f64::min);
        Some(self.tasks[task].slo_ms * least)
    }

    fn replan(&mut self, t: f64) {
        let budgets: Vec<Option<f64>> = (0..self.tasks.len()).map(|i| self.min_budget_ms(i, t as usize)).collect();
        // What the workers served since the last round, per task and variant, as the
        // agents' telemetry tells the controller.
        let mut served: Vec<BTreeMap<String, Vec<ServedBatch>>> = vec![BTreeMap::new(); self.tasks.len()];
        for w in &mut self.workers {
            let batches = w.take_served();
            if !batches.is_empty() && self.reports[w.variant] {
                let (task, variant) = (self.task_of[w.variant], &self.variants[w.variant]);
                // As the controller: a standby's batches are no measure of its variant.
                let plan = self.planner.plan.as_ref();
                if plan.is_some_and(|p| serves_only_as_standby(p, &self.planner.specs[task].name, None, &variant.name))
                {
                    continue;
                }
                let size = self.served_size[w.variant];
                let batches = batches.into_iter().map(|b| ServedBatch { size, ..b });
                served[task].entry(variant.name.clone()).or_default().extend(batches);
            }
        }
        self.compact(t);
        let histories: Vec<&[f64]> = self.history.iter().map(Vec::as_slice).collect();
        let round = self.planner.round_all(&histories, &budgets, &served);
        let outcomes = round.tasks.values();
        self.current.forecast_rps = outcomes.clone().map(|o| o.forecast_rps).sum();
        self.current.planned_rps = outcomes.clone().map(|o| o.planned_rps).sum();
        self.overloaded += outcomes.clone().any(|o| o.overloaded) as u32;
        self.failed += outcomes.clone().any(|o| o.failed) as u32;
        if round.changed {
            self.apply(&round.plan, t);
            self.reconfigurations += (t > 0.0) as u32;
        }
        self.routes_valid_until = f64::NEG_INFINITY;
    }

    /// Drops the workers that have retired and drained (their batches taken), so that every
    /// scan stays as long as what runs: a day of unloads and cold starts leaves thousands.
    /// Their events are stale; the others keep their order, and so the run is the same.
    fn compact(&mut self, t: f64) {
        if !self.workers.iter().any(|w| w.gone(t)) {
            return;
        }
        let mut index = vec![None; self.workers.len()];
        let mut kept = Vec::with_capacity(self.workers.len());
        for (i, w) in std::mem::take(&mut self.workers).into_iter().enumerate() {
            if !w.gone(t) {
                index[i] = Some(kept.len());
                kept.push(w);
            }
        }
        self.workers = kept;
        let events = std::mem::take(&mut self.events).into_vec();
        self.events = events
            .into_iter()
            .filter_map(|Reverse(e)| index[e.worker].map(|worker| Reverse(Event { worker, ..e })))
            .collect();
        self.routes_valid_until = f64::NEG_INFINITY;
    }

    /// Applies a plan as the agent does (see [`executor::apply_plan`]); the first plan's
    /// workers serve at once (the replay starts warm).
    fn apply(&mut self, plan: &Plan, t: f64) {
        let index = (0..self.variants.len())
            .map(|i| ((self.tasks[self.task_of[i]].name.as_str(), self.variants[i].name.as_str()), i))
            .collect();
        let planned = plan.assignments.iter().filter(|a| a.node == SimPlanner::NODE).map(|a| a.memory_bytes);
        self.peak_planned_memory = self.peak_planned_memory.max(planned.fold(0, u64::saturating_add));
        let warm = !std::mem::replace(&mut self.planned, true);
        let had: Vec<bool> = (0..self.tasks.len()).map(|task| self.has_worker(task, t)).collect();
        self.by_slack = plan.routing == tidal_proto::v1::Routing::BySlack as i32;
        let variants = &self.variants;
        let model_file = |v: usize| model_file(&variants[v].name);
        let memory = (!self.cfg.overlap_transitions && self.cfg.memory_bytes > 0).then(|| executor::MemoryBudget {
            bytes: self.cfg.memory_bytes,
            drain_s: self.task_of.iter().map(|&task| self.tasks[task].slo_ms / 1000.0).collect(),
        });
        let applied = executor::apply_plan(
            &mut self.workers,
            variants,
            index,
            model_file,
            plan,
            SimPlanner::NODE,
            t,
            warm,
            memory,
        );
        if let Err(e) = applied {
            // The planner plans only the variants it was given: a bug, and the plan is not applied.
            debug_assert!(false, "{e}");
        }
        let lost = had.iter().enumerate().filter(|&(task, &had)| had && !self.has_worker(task, t));
        self.unloaded += lost.count() as u32;
    }

    fn arrive(&mut self, task: usize, a: f64, second: usize) {
        self.counters[task].requests += 1;
        let deadline = self.deadline(task, a, second);
        let r = Request {
            task,
            arrival: a,
            enqueued: a,
            deadline,
            stage: 0,
            accuracy_sum: 0.0,
            accuracy_product: 1.0,
            accuracy_normalised: 0.0,
        };
        self.send(r, a);
    }

    /// A request that no worker answers in time.
    fn drop_request(&mut self, task: usize) {
        self.counters[task].dropped += 1;
        self.counters[task].violations += 1;
        self.current.violations += 1;
    }

    /// Queues a request at a worker of its stage, or drops it when the stage has none; a
    /// request of a task the plan gives no worker waits for one, as at an agent.
    fn send(&mut self, r: Request, t: f64) {
        let Some(picked) = self.route(r.task, r.stage, t) else {
            // Of a task that may go without a worker, it waits for one to serve (one loading
            // included); the controller is told when the task has none at all.
            if r.stage == 0 && self.unloads[r.task] {
                let none = !self.has_worker(r.task, t);
                // The first request to find no worker at all calls for a cold start.
                self.cold_starts += (none && self.cold[r.task].is_empty()) as u32;
                self.cold_requests += 1;
                self.woken |= none;
                self.cold[r.task].push(r);
            } else {
                self.drop_request(r.task);
            }
            return;
        };
        let w = if self.by_slack { self.bend_by_slack(&r, picked, t) } else { picked };
        if self.workers[w].enqueue(r, t).is_err() {
            self.drop_request(r.task);
            return;
        }
        self.start(w, t);
    }

    /// Whether the plan gives `task` a worker (serving or loading, not retiring) for its first
    /// stage.
    fn has_worker(&self, task: usize, t: f64) -> bool {
        self.workers.iter().any(|w| self.task_of[w.variant] == task && self.stage_of[w.variant] == 0 && t < w.retire_at)
    }

    /// Sends on the requests that waited for a worker of their task once one serves, at the
    /// time it does (up to `t`), their budget counted from then, as the agent does; drops
    /// those that waited longer than an agent lets them ([`COLD_START_WAIT_S`]).
    fn release_cold(&mut self, t: f64) {
        // In time order across tasks: events are run up to each release.
        let mut due: Vec<(f64, Request)> = Vec::new();
        for task in 0..self.cold.len() {
            if self.cold[task].is_empty() {
                continue;
            }
            let serving =
                |w: &&SimWorker| self.task_of[w.variant] == task && self.stage_of[w.variant] == 0 && w.serving(t);
            let ready = self.workers.iter().filter(serving).map(|w| w.ready_at).fold(f64::INFINITY, f64::min);
            for r in std::mem::take(&mut self.cold[task]) {
                let at = ready.max(r.arrival);
                if at.min(t) - r.arrival > COLD_START_WAIT_S {
                    self.drop_request(task);
                } else if at <= t {
                    due.push((at, r));
                } else {
                    self.cold[task].push(r);
                }
            }
        }
        due.sort_by(|a, b| a.0.total_cmp(&b.0));
        for (at, r) in due {
            self.run_events_until(at);
            let waited = at - r.arrival;
            self.send(Request { enqueued: at, deadline: r.deadline + waited, ..r }, at);
        }
    }

    /// The worker `r` goes to when the plan routes by slack: the pick, or when the pick would
    /// refuse it the most accurate other serving worker of its stage that would finish it in
    /// time, by the agent's rule ([`crate::slack`]); the pick (which refuses it) when none would.
    fn bend_by_slack(&mut self, r: &Request, picked: usize, t: f64) -> usize {
        let accuracy = |w: &SimWorker| self.variants[w.variant].accuracy;
        let first = self.workers[picked].offer(r, t, accuracy(&self.workers[picked]));
        if first.admits {
            return picked;
        }
        let others: Vec<usize> =
            self.routes[r.task][r.stage].iter().map(|&(i, _)| i).filter(|&i| i != picked).collect();
        let mut offers = vec![first];
        offers.extend(others.iter().map(|&i| self.workers[i].offer(r, t, accuracy(&self.workers[i]))));
        match crate::slack::choose(0, &offers) {
            Some(i) if i > 0 => {
                self.rerouted += 1;
                others[i - 1]
            }
            _ => picked,
        }
    }

    /// A serving worker of `stage` of `task`, drawn in proportion to the traffic the plan
    /// gives it.
    fn route(&mut self, task: usize, stage: usize, t: f64) -> Option<usize> {
        if t >= self.routes_valid_until {
            self.rebuild_routes(t);
        }
        let routes = &self.routes[task][stage];
        let total = routes.last()?.1;
        if total <= 0.0 {
            return routes.first().map(|r| r.0);
        }
        let x = self.rng.gen_range(0.0..total);
        let k = routes.partition_point(|r| r.1 <= x);
        routes.get(k.min(routes.len() - 1)).map(|r| r.0)
    }

    fn rebuild_routes(&mut self, t: f64) {
        self.routes.iter_mut().flatten().for_each(Vec::clear);
        let mut sums: Vec<Vec<f64>> = self.routes.iter().map(|stages| vec![0.0; stages.len()]).collect();
        let mut next_change = f64::INFINITY;
        self.apply_due_resizes(t);
        for (i, w) in self.workers.iter().enumerate() {
            if w.serving(t) {
                let (task, stage) = (self.task_of[w.variant], self.stage_of[w.variant]);
                sums[task][stage] += w.share.max(1e-9);
                self.routes[task][stage].push((i, sums[task][stage]));
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
                w.resize(r.cores);
                w.pending = None;
            }
        }
    }

    fn start(&mut self, w: usize, t: f64) {
        let mut expired = std::mem::take(&mut self.expired);
        let next = self.workers[w].try_start(t, &mut expired);
        for r in expired.drain(..) {
            self.drop_request(r.task);
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

    /// A batch's latency: a floor plus an exponential tail, so that the mean is what the
    /// profile's throughput implies and one batch in a hundred passes its p99; of a batch
    /// that writes tokens, the profile's at its longest text.
    fn service_time(&mut self, w: usize, k: u32) -> f64 {
        let (variant, cores, steps) = (self.workers[w].variant, self.workers[w].cores(), self.workers[w].steps());
        let (grid, by_output) = (&self.grids[variant], &self.by_output[variant]);
        let (floor, tail) = *self.latency_cache.entry((variant, cores, k, steps)).or_insert_with(|| {
            if steps == 0 || by_output.is_empty() {
                return batch_latency(grid, cores, k);
            }
            let grid = ProfileGrid::new(&crate::profile::points_at_output(by_output, steps));
            batch_latency(&grid, cores, k)
        });
        let e = -self.rng.gen_range(f64::EPSILON..1.0f64).ln();
        let slowdown = if self.cfg.slowdown.is_finite() && self.cfg.slowdown > 0.0 { self.cfg.slowdown } else { 1.0 };
        (floor + tail * e) * slowdown / 1000.0
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

    /// A batch finished: its requests go on to their next stage, or are answered.
    fn complete(&mut self, w: usize, t: f64) {
        let variant = self.workers[w].variant;
        let (accuracy, normalised) = (self.variants[variant].accuracy, self.normalised[variant]);
        let mut refused = std::mem::take(&mut self.expired);
        let batch = self.workers[w].finish(t, &mut refused);
        for r in refused.drain(..) {
            self.drop_request(r.task);
        }
        self.expired = refused;
        for r in batch {
            let accuracy_sum = r.accuracy_sum + accuracy;
            let accuracy_product = r.accuracy_product * accuracy / 100.0;
            let accuracy_normalised = r.accuracy_normalised + normalised;
            let stages = self.tasks[r.task].stages.len();
            if r.stage + 1 < stages {
                let next = Request {
                    stage: r.stage + 1,
                    enqueued: t,
                    accuracy_sum,
                    accuracy_product,
                    accuracy_normalised,
                    ..r
                };
                self.send(next, t);
                continue;
            }
            let c = &mut self.counters[r.task];
            c.accuracy_product_sum += 100.0 * accuracy_product;
            c.accuracy_normalised_sum += accuracy_normalised;
            let latency_us = ((t - r.arrival) * 1e6).max(1.0) as u64;
            let _ = c.latencies_us.record(latency_us.min(3_600_000_000));
            let accuracy = accuracy_sum / stages as f64;
            c.accuracy_sum += accuracy;
            self.interval_acc += accuracy;
            self.current.served += 1;
            if t > r.deadline + 1e-9 {
                c.violations += 1;
                self.current.violations += 1;
            }
        }
    }

    fn account_cores(&mut self, t: f64) {
        let mut memory = 0u64;
        for w in self.workers.iter().filter(|w| !w.gone(t)) {
            self.counters[self.task_of[w.variant]].core_seconds += w.cores() as f64;
            self.interval_cores += w.cores() as f64;
            if t >= w.loads_from {
                memory = memory.saturating_add(w.memory_bytes);
            }
        }
        self.interval_seconds += 1;
        self.peak_memory = self.peak_memory.max(memory);
        self.memory_seconds += memory as f64;
        self.seconds_over_memory += (self.cfg.memory_bytes > 0 && memory > self.cfg.memory_bytes) as u64;
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

    fn report(self, policy: String, seconds: usize) -> SimReport {
        let mut all = TaskCounters::new();
        let tasks: Vec<TaskReport> = self
            .counters
            .iter()
            .zip(self.tasks)
            .map(|(c, t)| {
                all.requests += c.requests;
                all.dropped += c.dropped;
                all.violations += c.violations;
                all.accuracy_sum += c.accuracy_sum;
                all.accuracy_product_sum += c.accuracy_product_sum;
                all.accuracy_normalised_sum += c.accuracy_normalised_sum;
                all.core_seconds += c.core_seconds;
                let _ = all.latencies_us.add(&c.latencies_us);
                let served = c.latencies_us.len();
                TaskReport {
                    task: t.name.clone(),
                    requests: c.requests,
                    served,
                    dropped: c.dropped,
                    violations: c.violations,
                    violation_pct: 100.0 * c.violations as f64 / c.requests.max(1) as f64,
                    p99_ms: c.quantile_ms(0.99),
                    accuracy: if served > 0 { c.accuracy_sum / served as f64 } else { 0.0 },
                    core_seconds: c.core_seconds,
                    mean_cores: c.core_seconds / seconds.max(1) as f64,
                }
            })
            .collect();
        let attainment: Vec<f64> = tasks.iter().map(|t| 1.0 - t.violation_pct / 100.0).collect();
        let served = all.latencies_us.len();
        SimReport {
            policy,
            requests: all.requests,
            served,
            dropped: all.dropped,
            violations: all.violations,
            violation_pct: 100.0 * all.violations as f64 / all.requests.max(1) as f64,
            p99_ms: all.quantile_ms(0.99),
            p50_ms: all.quantile_ms(0.50),
            accuracy: if served > 0 { all.accuracy_sum / served as f64 } else { 0.0 },
            accuracy_product: if served > 0 { all.accuracy_product_sum / served as f64 } else { 0.0 },
            accuracy_normalised: if served > 0 { all.accuracy_normalised_sum / served as f64 } else { 0.0 },
            core_seconds: all.core_seconds,
            mean_cores: all.core_seconds / seconds.max(1) as f64,
            reconfigurations: self.reconfigurations,
            overloaded_intervals: self.overloaded,
            failed_plans: self.failed,
            surge_replans: self.surges,
            slack_reroutes: self.rerouted,
            intervals: self.intervals,
            tasks,
            jain_attainment: jain(&attainment),
            profile_factors: (self.planner.adapter.corrections().carried().into_iter())
                .map(|c| (c.task, c.variant, c.factor))
                .collect(),
            peak_planned_memory_bytes: self.peak_planned_memory,
            peak_memory_bytes: self.peak_memory,
            mean_memory_bytes: self.memory_seconds / seconds.max(1) as f64,
            seconds_over_memory: self.seconds_over_memory,
            cold_starts: self.cold_starts,
            cold_requests: self.cold_requests,
            unloads: self.unloaded,
        }
    }
}

/// Jain's fairness index of `xs`: (Σx)² / (n·Σx²), 1 for equal values (and for none).
pub fn jain(xs: &[f64]) -> f64 {
    let (sum, squares) = xs.iter().fold((0.0, 0.0), |(s, q), x| (s + x, q + x * x));
    if squares <= 0.0 {
        1.0
    } else {
        sum * sum / (xs.len() as f64 * squares)
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

/// A batch of `k` on `cores` takes `floor + tail·E` ms, E exponential of mean 1: the profile's
/// estimate (for a partial batch below the smallest measured batch, that batch's) with the
/// mean of back-to-back batches, batch / throughput where measured, and its p99 (floor +
/// tail·ln 100).
fn batch_latency(grid: &ProfileGrid, cores: u32, k: u32) -> (f64, f64) {
    let measured = grid.estimate(cores, k).map(|e| (k, e)).or_else(|| {
        let b = *grid.batches().iter().find(|&&b| b >= k)?;
        grid.estimate(cores, b).map(|e| (b, e))
    });
    let Some((b, e)) = measured else { return (1e6, 0.0) };
    // Between measured batch sizes a profile's p50 and its throughput interpolate apart (a
    // batch of 2 between 1 and 4 is 7-10 % slower by 2 / throughput): there a batch takes the
    // p50 the profile interpolates (latency is near affine in the batch size), which the
    // profile correction compares with; else a simulated machine as fast as its profile would
    // read as a slower one. At a measured batch size (whatever the cores) batch / throughput,
    // the planner's capacity.
    let mean = if grid.batches().contains(&b) {
        1000.0 * b as f64 / e.throughput_rps.max(f64::MIN_POSITIVE)
    } else {
        e.latency_p50_ms
    };
    let tail = ((e.latency_p99_ms - mean) / (100f64.ln() - 1.0)).max(0.0);
    if tail >= mean {
        // A p99 beyond 4.6× the mean: all of it exponential (its p99 then falls short).
        (0.0, mean)
    } else {
        (mean - tail, tail)
    }
}

#[cfg(test)]
mod tests;
