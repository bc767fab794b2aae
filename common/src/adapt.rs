//! The adaptation round: forecast, stabilise, solve, place, transition. One pure core, free of
//! clocks, threads and I/O, that the live controller and the simulator both drive, so that a
//! policy means the same thing live and simulated.
//!
//! A driver owns an [`Adapter`] and calls it with what it observed:
//! - every interval, [`Adapter::round`] with each task's per-second arrivals, the smallest
//!   latency budget its requests carried, the nodes, the profiles and the plan in force; it
//!   returns the next plan (epoch and term left for the driver to set) and its notes;
//! - every second, [`Adapter::surge`]: whether arrivals already exceed what the plan was sized
//!   for, so that a policy that reacts to surges re-plans at once (at most every
//!   [`SURGE_COOLDOWN_S`]).
//!
//! The adapter remembers, per task, the scale-down stabiliser (a lower forecast shrinks the
//! plan only after it held for `scale_down_after` rounds) and the rate the plan was sized for.
//! A new controller leader [`Adapter::resume`]s from the last plan's rates.
//!
//! Transitions are the policy's: in place (resize a running worker's quota and batcher) or
//! blue-green (start a worker of the new shape, retire the old one when it serves), carried in
//! the plan for the agents and the simulator, which both apply it through
//! [`crate::reconcile::diff`].

use std::collections::{BTreeMap, HashSet};

use tidal_proto::v1::{
    Assignment, Plan, PlanCorrection, ProfilePoint, Routing, ServedBatch, StageSpec, TaskSpec, Transition,
};

mod cluster;
mod handover;
pub mod share;
mod standby;

pub use handover::Serving;
pub use share::ShareRule;
pub use standby::serves_only_as_standby;

use crate::forecast::{
    is_surge, Ewma, Forecaster, ForecasterKind, Holt, LastValue, PeakWindow, ScaleDownStabiliser, SURGE_WINDOW_S,
};
use crate::latency::LatencyModel;
use crate::plan::Capacity;
use crate::profile::ProfileGrid;
use crate::profile::SizeMix;
use crate::profile_correction::Corrections;
use crate::solver::{solve, Limits, PolicyKind, Problem, SearchSpace, Solution, SolveError, Stage, Variant, Weights};

/// The least time between two surge re-plans, seconds.
pub const SURGE_COOLDOWN_S: f64 = 3.0;

/// Everything that decides a round. One set of defaults for the controller and the simulator.
#[derive(Debug, Clone, PartialEq)]
pub struct AdaptConfig {
    pub policy: PolicyKind,
    pub model: LatencyModel,
    pub weights: Weights,
    pub limits: Limits,
    /// Seconds between rounds; the forecast looks this far ahead.
    pub interval_s: f64,
    /// The forecaster of every task's arrivals.
    pub forecaster: ForecasterKind,
    /// Seconds of arrival history the forecaster sees.
    pub lookback_s: usize,
    /// Headroom of the default peak-window forecaster.
    pub headroom: f64,
    /// Seconds the default forecaster averages a rate over before taking the peak.
    pub smooth_s: usize,
    /// Rounds a lower forecast must hold before a plan is sized down.
    pub scale_down_after: u32,
    /// Cores per node kept free of workers (for the agent itself and the OS).
    pub reserve_cores: u32,
    /// Seconds a new worker takes to serve, where a variant's own is not known.
    pub load_time_s: f64,
    /// How the cores are divided when they do not carry every task's load.
    pub share: ShareRule,
    /// Whether profiles are corrected by the batches the variants served
    /// ([`crate::profile_correction`]); off, the planner plans on the profiles as stored.
    pub correct_profiles: bool,
    /// Whether the agents of a Tidal plan bend its mix by each request's slack
    /// ([`crate::slack`]); off, or for any other policy, requests go by the plan's weights.
    pub route_by_slack: bool,
}

impl Default for AdaptConfig {
    fn default() -> Self {
        Self {
            policy: PolicyKind::Tidal,
            model: LatencyModel::default(),
            weights: Weights::default(),
            limits: Limits::default(),
            interval_s: 30.0,
            forecaster: ForecasterKind::PeakWindow,
            lookback_s: 60,
            headroom: 1.1,
            smooth_s: crate::forecast::SMOOTH_S,
            scale_down_after: 3,
            reserve_cores: 0,
            load_time_s: 2.0,
            share: ShareRule::default(),
            correct_profiles: true,
            route_by_slack: true,
        }
    }
}

impl AdaptConfig {
    /// The peak-window forecaster of this configuration's window, headroom and smoothing.
    pub fn peak_window(&self) -> PeakWindow {
        PeakWindow { window_s: self.lookback_s.max(1), headroom: self.headroom, smooth_s: self.smooth_s.max(1) }
    }

    /// This configuration's forecaster.
    pub fn forecaster(&self) -> Box<dyn Forecaster> {
        match self.forecaster {
            ForecasterKind::PeakWindow => Box::new(self.peak_window()),
            ForecasterKind::Last => Box::new(LastValue),
            ForecasterKind::Ewma => Box::new(Ewma { alpha: 0.5 }),
            ForecasterKind::Holt => Box::new(Holt { alpha: 0.5, beta: 0.3 }),
        }
    }

    pub fn space(&self) -> SearchSpace {
        self.policy.space(&self.limits)
    }

    /// How the agents route a plan's requests: by slack for Tidal (its data plane), by the
    /// weights for the peers' policies, which have no such rule.
    pub fn routing(&self) -> Routing {
        if self.route_by_slack && self.policy == PolicyKind::Tidal {
            Routing::BySlack
        } else {
            Routing::ByWeight
        }
    }

    pub fn transition(&self) -> Transition {
        if self.space().in_place {
            Transition::InPlace
        } else {
            Transition::BlueGreen
        }
    }
}

/// What a driver observed of one task.
#[derive(Debug, Clone)]
pub struct TaskInput<'a> {
    pub spec: &'a TaskSpec,
    /// Arrivals per second, oldest first, up to the last complete second.
    pub arrivals: &'a [f64],
    /// The smallest latency budget its requests arrived with over the last interval, ms.
    pub min_budget_ms: Option<f64>,
    /// Measured profile per variant name.
    pub profiles: BTreeMap<&'a str, &'a [ProfilePoint]>,
    /// The log index that stored each variant's profile (`VariantProfile.stored_index`;
    /// absent outside the replicated state): what tells a profile stored again from the old.
    pub profile_indices: BTreeMap<&'a str, u64>,
    /// Seconds a new worker of a variant takes to serve, where known (a variant not known
    /// is assumed to take as long as the slowest known, else `AdaptConfig::load_time_s`).
    pub load_s: BTreeMap<&'a str, f64>,
    /// Per stage, the input sizes its requests came in (none observed: each variant is planned
    /// at its profile's own size; see [`crate::profile::points_at_mix`]).
    pub sizes: BTreeMap<&'a str, SizeMix>,
    /// Per variant, the batches its workers served since the last round, as the agents
    /// measured them: what corrects its profile (see [`crate::profile_correction`]).
    pub served: BTreeMap<&'a str, &'a [ServedBatch]>,
    /// Seconds since its last request (or since the driver began to observe, when none came
    /// since): a task that may be unloaded (`TaskShare.min_workers` 0) is, once this reaches
    /// its idle time, and is the first unloaded when memory runs short (least recently used
    /// first). 0: it is being asked for now (a request waits for a worker); infinite: none
    /// came since the driver began to observe and it has no worker (it stays unloaded).
    pub idle_s: f64,
}

#[derive(Debug, Clone)]
pub struct NodeInput<'a> {
    pub name: &'a str,
    pub address: &'a str,
    pub cores: u32,
    /// The memory Tidal's workers may take on it, bytes; 0: not declared (only its cores are
    /// planned).
    pub memory_bytes: u64,
}

impl NodeInput<'_> {
    /// The memory free for workers: all it declared, or without bound when it declared none.
    fn memory_free(&self) -> u64 {
        if self.memory_bytes == 0 {
            u64::MAX
        } else {
            self.memory_bytes.min(crate::memory::MAX_NODE_BYTES)
        }
    }
}

#[derive(Debug, Clone)]
pub struct RoundInput<'a> {
    pub tasks: Vec<TaskInput<'a>>,
    pub nodes: Vec<NodeInput<'a>>,
    /// The plan in force.
    pub current: Option<&'a Plan>,
    /// Ready workers per (node, task, variant), as the agents last reported them.
    pub serving: &'a Serving,
}

/// What the round decided for one task.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct TaskOutcome {
    pub forecast_rps: f64,
    /// After the scale-down stabiliser: the rate the plan is sized for.
    pub planned_rps: f64,
    /// No plan within the cores carries the planned rate; the plan carries what it can.
    pub overloaded: bool,
    /// No plan was found; the task keeps the workers it had.
    pub failed: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Round {
    /// The next plan, epoch and term 0.
    pub plan: Plan,
    pub tasks: BTreeMap<String, TaskOutcome>,
    /// Whether it asks for other workers than the plan in force (or routes differently).
    pub changed: bool,
    /// Workers of a variant planned on a node where it did not run while it ran on another:
    /// moves, each a model load the objective did not ask for.
    pub moved: u32,
}

/// Arrivals above a task's planned rate.
#[derive(Debug, Clone, PartialEq)]
pub struct Surge {
    pub task: String,
    pub rate_rps: f64,
    pub planned_rps: f64,
}

pub struct Adapter {
    cfg: AdaptConfig,
    forecaster: Box<dyn Forecaster>,
    stabilisers: BTreeMap<String, ScaleDownStabiliser>,
    planned: BTreeMap<String, f64>,
    last_surge_s: Option<f64>,
    /// How much slower than profiled each variant's batches run: learned from served batches,
    /// applied to the profiles the planner uses.
    corrections: Corrections,
    /// What each task's workers are held to while the nodes are short of memory.
    memory_holds: cluster::MemoryHolds,
}

impl Adapter {
    /// A driver of rounds with `cfg`, its forecaster included.
    pub fn new(cfg: AdaptConfig) -> Self {
        let forecaster = cfg.forecaster();
        Self {
            cfg,
            forecaster,
            stabilisers: BTreeMap::new(),
            planned: BTreeMap::new(),
            last_surge_s: None,
            corrections: Corrections::default(),
            memory_holds: cluster::MemoryHolds::default(),
        }
    }

    pub fn config(&self) -> &AdaptConfig {
        &self.cfg
    }

    /// The rate each task's plan is sized for.
    pub fn planned_rps(&self) -> &BTreeMap<String, f64> {
        &self.planned
    }

    /// The profiles' corrections as the last round left them.
    pub fn corrections(&self) -> &Corrections {
        &self.corrections
    }

    /// Forgets everything and starts from these planned rates and profile corrections (a new
    /// leader takes over, from the plan in force).
    pub fn resume(&mut self, planned: &BTreeMap<String, f64>, corrections: &[PlanCorrection]) {
        self.stabilisers.clear();
        self.last_surge_s = None;
        // Off, nothing is corrected: not even what a leader that corrected carried.
        self.corrections =
            if self.cfg.correct_profiles { Corrections::resume(corrections) } else { Corrections::default() };
        self.planned = planned.clone();
        for (task, &rate) in planned {
            let mut s = ScaleDownStabiliser::new(self.cfg.scale_down_after.max(1));
            s.next(rate);
            self.stabilisers.insert(task.clone(), s);
        }
    }

    /// The first task whose arrivals over the last seconds exceed its planned rate, if the
    /// policy re-plans on surges and the last surge re-plan is old enough. A returned surge
    /// starts the cooldown: the driver is expected to run a round now.
    pub fn surge<'a>(&mut self, now_s: f64, tasks: impl IntoIterator<Item = (&'a str, &'a [f64])>) -> Option<Surge> {
        if !self.cfg.space().reacts_to_surges || self.last_surge_s.is_some_and(|t| now_s < t + SURGE_COOLDOWN_S) {
            return None;
        }
        let surge = tasks.into_iter().find_map(|(task, arrivals)| {
            let planned = *self.planned.get(task)?;
            is_surge(arrivals, planned, SURGE_WINDOW_S).then(|| {
                let window = &arrivals[arrivals.len().saturating_sub(SURGE_WINDOW_S)..];
                let rate_rps = window.iter().sum::<f64>() / window.len().max(1) as f64;
                Surge { task: task.to_string(), rate_rps, planned_rps: planned }
            })
        })?;
        self.last_surge_s = Some(now_s);
        Some(surge)
    }

    /// One round: per task the forecast, the stabilised rate and the solve; then placement
    /// over the nodes and the policy's transition.
    pub fn round(&mut self, input: &RoundInput) -> Round {
        self.decide(input, true)
    }

    /// The plan again at the rates already planned, without a forecast (nothing of the
    /// stabiliser moves): for a change that is not a new round, such as a worker that now
    /// serves and lets the workers it replaces go.
    pub fn reconsider(&mut self, input: &RoundInput) -> Round {
        self.decide(input, false)
    }

    fn decide(&mut self, input: &RoundInput, forecast: bool) -> Round {
        let names: HashSet<&str> = input.tasks.iter().map(|t| t.spec.name.as_str()).collect();
        self.stabilisers.retain(|t, _| names.contains(t.as_str()));
        self.planned.retain(|t, _| names.contains(t.as_str()));
        // Every profiled variant, served or not: a variant profiled anew starts from its new
        // profile at once.
        if self.cfg.correct_profiles {
            let profiled: HashSet<(&str, &str)> =
                input.tasks.iter().flat_map(|t| t.profiles.keys().map(|&v| (t.spec.name.as_str(), v))).collect();
            self.corrections.retain_profiled(&profiled);
            for task in &input.tasks {
                for (&variant, &points) in &task.profiles {
                    let batches = task.served.get(variant).copied().unwrap_or_default();
                    let stored = task.profile_indices.get(variant).copied().unwrap_or(0);
                    let profile = crate::profile_correction::profile_id(stored, points);
                    self.corrections.observe(task.spec, variant, points, profile, batches);
                }
            }
        }
        // A round moves each correction one bounded step; a reconsidered plan leaves them.
        if forecast {
            self.corrections.round(&names);
        }
        let mut outcomes = BTreeMap::new();
        let mut rates = Vec::with_capacity(input.tasks.len());
        for task in &input.tasks {
            let outcome = match self.planned.get(&task.spec.name) {
                Some(&planned_rps) if !forecast => TaskOutcome { planned_rps, ..Default::default() },
                _ => self.forecast(task),
            };
            rates.push(outcome.planned_rps);
            outcomes.insert(task.spec.name.clone(), outcome);
        }
        let mut plan = Plan {
            tasks: input.tasks.iter().map(|t| t.spec.clone()).collect(),
            node_addresses: input.nodes.iter().map(|n| (n.name.to_string(), n.address.to_string())).collect(),
            planned_rps: self.planned.clone().into_iter().collect(),
            transition: self.cfg.transition() as i32,
            routing: self.cfg.routing() as i32,
            corrections: if self.cfg.correct_profiles { self.corrections.carried() } else { Vec::new() },
            ..Default::default()
        };
        if input.nodes.is_empty() {
            plan.notes.push("no agent has registered: nothing to place".into());
        }
        let free: Vec<u32> = input.nodes.iter().map(|n| n.cores.saturating_sub(self.cfg.reserve_cores)).collect();
        let mut tasks: Vec<TaskPlans> = input
            .tasks
            .iter()
            .zip(rates)
            .map(|(task, rate)| {
                TaskPlans::new(&self.cfg, task, input.current, rate, free.iter().sum(), &self.corrections)
            })
            .collect();
        let (choices, short_of_memory) =
            cluster::divide_and_place(&self.cfg, &mut tasks, &free, input, &mut plan, &self.memory_holds);
        self.memory_holds.after(short_of_memory, &plan, forecast, self.cfg.scale_down_after);
        for (task, choice) in input.tasks.iter().zip(choices) {
            let outcome = outcomes.get_mut(&task.spec.name).expect("an outcome per task");
            outcome.overloaded = choice.overloaded;
            outcome.failed = choice.failed;
        }
        if let Some(current) = input.current {
            let capacity = input
                .nodes
                .iter()
                .map(|n| {
                    let capacity = Capacity { millicores: n.cores.saturating_mul(1000), memory_bytes: n.memory_bytes };
                    (n.name.to_string(), capacity)
                })
                .collect();
            let held = handover::hold_across_nodes(current, &mut plan, input.serving, &capacity);
            plan.notes.extend(held);
        }
        if self.cfg.routing() == Routing::BySlack {
            standby::keep(&mut plan, input, self.cfg.reserve_cores);
        }
        let moved = input.current.map_or(0, |c| moved_workers(c, &plan));
        if moved > 0 {
            plan.notes.push(format!("{moved} workers moved to another node"));
        }
        let changed = input.current.is_none_or(|c| {
            c.assignments != plan.assignments
                || c.tasks != plan.tasks
                || c.node_addresses != plan.node_addresses
                || c.transition != plan.transition
                || c.routing != plan.routing
        });
        Round { plan, tasks: outcomes, changed, moved }
    }

    fn forecast(&mut self, task: &TaskInput) -> TaskOutcome {
        let window = &task.arrivals[task.arrivals.len().saturating_sub(self.cfg.lookback_s.max(1))..];
        // The plan must carry the load until the next round's workers serve: an interval and a
        // model load (the slowest known of the task's, else the configured one).
        let load_s = task.load_s.values().copied().reduce(f64::max);
        let horizon = self.cfg.interval_s + load_s.unwrap_or(self.cfg.load_time_s);
        let forecast_rps = self.forecaster.forecast(window, horizon.round().max(1.0) as usize);
        let rounds = self.cfg.scale_down_after.max(1);
        let stabiliser =
            self.stabilisers.entry(task.spec.name.clone()).or_insert_with(|| ScaleDownStabiliser::new(rounds));
        let planned_rps = stabiliser.next(forecast_rps);
        self.planned.insert(task.spec.name.clone(), planned_rps);
        TaskOutcome { forecast_rps, planned_rps, ..Default::default() }
    }
}

/// Workers of `next` whose variant ran in `current` on other nodes but not on theirs.
fn moved_workers(current: &Plan, next: &Plan) -> u32 {
    let ran = |a: &Assignment, same_node: bool| {
        current.assignments.iter().any(|c| {
            c.task == a.task
                && c.stage == a.stage
                && variant_name(c) == variant_name(a)
                && (c.node == a.node) == same_node
        })
    };
    next.assignments.iter().filter(|a| !ran(a, true) && ran(a, false)).count() as u32
}

/// The workers of `task` in the plan in force.
fn workers_in<'a>(current: Option<&'a Plan>, task: &str) -> Vec<&'a Assignment> {
    current.iter().flat_map(|p| p.assignments.iter()).filter(|a| a.task == task).collect()
}

fn variant_name(a: &Assignment) -> &str {
    a.variant.as_ref().map_or("", |v| v.name.as_str())
}

/// The nodes where each worker's variant runs in the plan in force, to keep it there.
fn current_nodes(input: &RoundInput, task: &str, workers: &[Assignment]) -> Vec<Vec<usize>> {
    let old = workers_in(input.current, task);
    workers
        .iter()
        .map(|w| {
            old.iter()
                .filter(|a| variant_name(a) == variant_name(w))
                .filter_map(|a| input.nodes.iter().position(|n| n.name == a.node))
                .collect()
        })
        .collect()
}

/// One task's workers (nodes not yet set) and the notes that explain them.
#[derive(Debug, Clone, Default)]
struct Choice {
    workers: Vec<Assignment>,
    notes: Vec<String>,
    overloaded: bool,
    failed: bool,
}

impl Choice {
    fn cores(&self) -> u32 {
        self.workers.iter().map(|w| w.millicores.div_ceil(1000)).sum()
    }
}

/// How long a task went without a request, said: "no request for 61 s", or "no request yet"
/// (none since the driver began to observe, and no worker).
fn idle_for(idle_s: f64) -> String {
    if idle_s.is_finite() {
        format!("no request for {idle_s:.0} s")
    } else {
        "no request yet".into()
    }
}

/// One task's best plan within a budget, with what the division of the cores weighs.
#[derive(Debug, Clone)]
struct Planned {
    choice: Choice,
    cores: u32,
    /// The policy's objective, its core term weighed against the cluster's cores.
    value: f64,
    carried_rps: f64,
}

/// How one task is planned in a round: fixed (no stages, no profiles yet, or no plan at all,
/// which keeps its workers as they are), or at the budget the division of the cluster's cores
/// gives it, each budget solved once.
struct TaskPlans<'r, 'a> {
    cfg: &'r AdaptConfig,
    task: &'r TaskInput<'a>,
    old: Vec<&'r Assignment>,
    rate: f64,
    /// The cluster's cores less the reserve: what a plan's cores are weighed against.
    cluster: u32,
    /// The most cores the task may have: its maximum, the cluster's at most.
    cap: u32,
    fixed: Option<Choice>,
    /// Its problem at the whole cap, built once; each budget's is a copy.
    base: Problem,
    /// What the problem's profiles estimate beyond what was measured (input sizes).
    profile_notes: Vec<String>,
    solved: BTreeMap<(u32, WorkerLimit), Result<Planned, SolveError>>,
}

/// The largest worker a plan may have: when a task's worker finds no node with room, the task
/// is planned again with workers no larger than the room that is left.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
struct WorkerLimit {
    cores: Option<u32>,
    memory: Option<u64>,
}

impl WorkerLimit {
    const ANY: Self = Self { cores: None, memory: None };
}

impl<'r, 'a> TaskPlans<'r, 'a> {
    fn new(
        cfg: &'r AdaptConfig,
        task: &'r TaskInput<'a>,
        current: Option<&'r Plan>,
        rate: f64,
        cluster: u32,
        corrections: &Corrections,
    ) -> Self {
        let max = task.spec.share.as_ref().map_or(0, |s| s.max_cores);
        let cap = if max > 0 { max.min(cluster) } else { cluster };
        let old = workers_in(current, &task.spec.name);
        let (base, profile_notes) = problem(cfg, task, &old, rate, cap, cluster, corrections);
        let mut plans =
            Self { cfg, task, old, rate, cluster, cap, fixed: None, base, profile_notes, solved: BTreeMap::new() };
        plans.fixed = plans.fixed_choice();
        plans
    }

    fn name(&self) -> &str {
        &self.task.spec.name
    }

    /// Its weight in the cluster's objective and shares (absent: 1).
    fn weight(&self) -> f64 {
        self.task.spec.share.as_ref().and_then(|s| s.weight).unwrap_or(1.0).max(0.0)
    }

    fn min_cores(&self) -> u32 {
        self.task.spec.share.as_ref().map_or(0, |s| s.min_cores)
    }

    /// Whether it may be unloaded to free memory for others: it may go without a worker and
    /// had no request for a whole round.
    fn evictable(&self) -> bool {
        crate::task::unloads_after_s(self.task.spec).is_some() && self.task.idle_s >= self.cfg.interval_s.max(1.0)
    }

    fn fixed_choice(&mut self) -> Option<Choice> {
        let spec = self.task.spec;
        if let Some(after_s) = crate::task::unloads_after_s(spec).filter(|&after| self.task.idle_s >= after) {
            let note = format!(
                "{}: unloaded: {} (min-workers 0, idle time {after_s:.0} s); its next request loads it",
                spec.name,
                idle_for(self.task.idle_s)
            );
            return Some(Choice { notes: vec![note], ..Choice::default() });
        }
        if spec.stages.is_empty() {
            return Some(Choice { notes: vec![format!("{}: the task has no stages", spec.name)], ..Choice::default() });
        }
        if self.base.stages.iter().any(|s| s.variants.is_empty()) {
            let choice = match unprofiled_default(spec, self.cap) {
                Some((workers, note)) => Choice { workers, notes: vec![note], ..Choice::default() },
                None => Choice {
                    notes: vec![format!("{}: not enough free cores for one worker per stage", spec.name)],
                    ..Choice::default()
                },
            };
            return Some(choice);
        }
        let cap = self.cap;
        let error = match self.within(cap, WorkerLimit::ANY) {
            Ok(_) => return None,
            Err(e) => e.to_string(),
        };
        // Keep what serves: a task without a plan would lose every worker.
        let workers = self.old.iter().map(|&a| Assignment { node: String::new(), replica: 0, ..a.clone() }).collect();
        let note = format!("{}: no plan ({error}); its workers are kept as they are", spec.name);
        Some(Choice { workers, notes: vec![note], overloaded: false, failed: true })
    }

    /// The best plan within `budget` cores, each worker within `limit`.
    fn within(&mut self, budget: u32, limit: WorkerLimit) -> Result<&Planned, &SolveError> {
        let key = (budget, limit);
        if !self.solved.contains_key(&key) {
            let planned = self.solve(budget, limit);
            self.solved.insert(key, planned);
        }
        self.solved[&key].as_ref()
    }

    fn solve(&self, budget: u32, limit: WorkerLimit) -> Result<Planned, SolveError> {
        let (cfg, task) = (self.cfg, self.task);
        let mut problem = self.base.clone();
        problem.core_budget = budget;
        problem.max_worker_cores = limit.cores;
        problem.max_worker_memory = limit.memory;
        problem.weights = weights_within(cfg, budget, self.cluster);
        let space = cfg.space();
        let s = solve(&problem, &space)?;
        let (problem, s, kept) = price_transition(cfg, &space, task, &self.old, self.rate, problem, s);
        let mut notes = notes_of(task.spec, &problem, &s, self.rate, budget);
        notes.extend(kept);
        notes.extend(self.profile_notes.iter().cloned());
        Ok(Planned {
            choice: Choice {
                workers: workers_of(task.spec, &problem, &s),
                notes,
                overloaded: s.overloaded,
                failed: false,
            },
            cores: s.cores,
            value: s.objective,
            carried_rps: s.carried_rps,
        })
    }

    /// The fraction of its planned rate the best plan within `budget` carries.
    fn carried_fraction(&mut self, budget: u32) -> f64 {
        let rate = self.rate.max(crate::solver::MIN_PLANNED_RPS);
        self.within(budget, WorkerLimit::ANY).map_or(0.0, |p| (p.carried_rps / rate).min(1.0))
    }
}

/// For a policy that prices transitions: the best plan also restricted to the variants that
/// run, and whichever of the two is worth more once each pays for its transition (see
/// [`transition_cost`]). A note says when the running variants are kept for that reason.
fn price_transition(
    cfg: &AdaptConfig,
    space: &SearchSpace,
    task: &TaskInput,
    old: &[&Assignment],
    rate: f64,
    problem: Problem,
    best: Solution,
) -> (Problem, Solution, Option<String>) {
    let running: HashSet<&str> = old.iter().map(|a| variant_name(a)).collect();
    let uses_new =
        best.choices.iter().any(|c| !running.contains(problem.stages[c.stage].variants[c.variant].name.as_str()));
    if !space.prices_transitions || running.is_empty() || !uses_new {
        return (problem, best, None);
    }
    let mut kept = problem.clone();
    for stage in &mut kept.stages {
        stage.variants.retain(|v| running.contains(v.name.as_str()));
    }
    let Ok(keep) = solve(&kept, space) else { return (problem, best, None) };
    let cost_best = transition_cost(cfg, space.in_place, task, old, &problem, &best, rate);
    let cost_keep = transition_cost(cfg, space.in_place, task, old, &kept, &keep, rate);
    if keep.objective - cost_keep.value > best.objective - cost_best.value {
        let note = format!(
            "{}: kept the running variants: the better mix would leave {:.1} req/s uncarried for {:.1} s while its workers load",
            task.spec.name, cost_best.shortfall_rps, cost_best.load_s
        );
        return (kept, keep, Some(note));
    }
    (problem, best, None)
}

/// What moving from the workers `old` to `new` costs while new workers load.
#[derive(Debug, Clone, Copy, PartialEq)]
struct TransitionCost {
    /// The planned rate less what serves meanwhile: old workers keep serving until their
    /// successors do (make before break), and an in-place policy grows running workers at once.
    shortfall_rps: f64,
    /// The longest load among the new workers.
    load_s: f64,
    /// In the objective's units: the accuracy term lost on the requests left uncarried — while
    /// new workers load, and afterwards if the plan is overloaded — over the requests of the
    /// horizon a plan holds at least (`scale_down_after` rounds): the transition is paid once,
    /// an overload every second of it.
    value: f64,
}

fn transition_cost(
    cfg: &AdaptConfig,
    in_place: bool,
    task: &TaskInput,
    old: &[&Assignment],
    problem: &Problem,
    new: &Solution,
    rate: f64,
) -> TransitionCost {
    let grid_of =
        |name: &str| problem.stages.iter().flat_map(|s| &s.variants).find(|v| v.name == name).map(|v| &v.grid);
    let capacity = |name: &str, cores: u32, batch: u32| {
        grid_of(name).and_then(|g| g.estimate(cores, batch)).map_or(0.0, |e| cfg.model.utilisation * e.throughput_rps)
    };
    let mut interim = 0.0;
    let mut load_s: f64 = 0.0;
    // A variant that never ran here is assumed to load as slowly as the slowest that did.
    let slowest = task.load_s.values().copied().reduce(f64::max);
    let load_of = |name: &str| task.load_s.get(name).copied().or(slowest).unwrap_or(cfg.load_time_s);
    let mut names: Vec<&str> = old.iter().map(|a| variant_name(a)).collect();
    names.sort();
    names.dedup();
    for name in &names {
        let olds: Vec<&&Assignment> = old.iter().filter(|a| variant_name(a) == *name).collect();
        let old_cap: f64 = olds.iter().map(|a| capacity(name, a.millicores.div_ceil(1000), a.max_batch)).sum();
        let mut immediate = 0.0;
        for c in new.choices.iter().filter(|c| problem.stages[c.stage].variants[c.variant].name == *name) {
            let same_shape = olds.iter().all(|a| a.millicores == c.point.cores * 1000 && a.max_batch == c.point.batch);
            let kept = (c.replicas as usize).min(olds.len()) as f64;
            if in_place || same_shape {
                immediate += kept * capacity(name, c.point.cores, c.point.batch);
            } else {
                load_s = load_s.max(load_of(name));
            }
            if c.replicas as usize > olds.len() {
                load_s = load_s.max(load_of(name));
            }
        }
        interim += f64::max(old_cap, immediate);
    }
    for c in &new.choices {
        let name = problem.stages[c.stage].variants[c.variant].name.as_str();
        if !names.contains(&name) {
            load_s = load_s.max(load_of(name));
        }
    }
    let horizon = cfg.interval_s.max(1.0) * cfg.scale_down_after.max(1) as f64;
    let load_s = load_s.min(horizon);
    let shortfall_rps = if load_s > 0.0 { (rate - interim).max(0.0) } else { 0.0 };
    let steady_rps = (rate - new.carried_rps).max(0.0);
    let lost = (shortfall_rps * load_s + steady_rps * (horizon - load_s)) / (rate.max(f64::MIN_POSITIVE) * horizon);
    let value = cfg.weights.alpha * new.accuracy / 100.0 * lost.min(1.0);
    TransitionCost { shortfall_rps, load_s, value }
}

/// The planning problem of one task: per stage its profiled variants, the planned rate, the
/// SLO less the communication latency its requests' budgets show, and load costs as the
/// policy defines them (a variant that runs costs nothing to keep). Its cores are weighed
/// against the cluster's (β·RC/cluster rather than β·RC/budget), so that plans of different
/// budgets, and of different tasks, are worth the same for the same cores; for a task alone
/// on the cluster the two are one.
fn problem(
    cfg: &AdaptConfig,
    task: &TaskInput,
    old: &[&Assignment],
    rate: f64,
    budget: u32,
    cluster: u32,
    corrections: &Corrections,
) -> (Problem, Vec<String>) {
    let spec = task.spec;
    let running: HashSet<&str> = old.iter().map(|a| variant_name(a)).collect();
    // A stage that sees several inputs per request (crops) is planned per request.
    let factors = crate::task::load_factors(spec);
    let mut notes = Vec::new();
    let mut stage = |(s, &factor): (&StageSpec, &f64)| {
        Stage {
        name: s.name.clone(),
        variants: s
            .variants
            .iter()
            .filter_map(|v| {
                let points = task.profiles.get(v.name.as_str()).filter(|p| !p.is_empty())?;
                // A stage that writes text: at the most tokens a request may write.
                let served = crate::task::as_served(s, v);
                let written = served.text.as_ref().and_then(|t| t.generate.as_ref()).map(|g| g.max_tokens);
                let at_length;
                let points = match written {
                    Some(tokens) => {
                        at_length = crate::profile::points_at_output(points, tokens);
                        at_length.as_slice()
                    }
                    None => points,
                };
                // At the sizes the stage's requests come in.
                let own_size = crate::tensor::element_count(&v.input_shape).unwrap_or(0) as u64;
                let mix = task.sizes.get(s.name.as_str()).map_or(&[][..], |m| m.as_slice());
                let at = crate::profile::points_at_mix(points, own_size, mix);
                if let Some((seen, measured)) = at.beyond {
                    notes.push(format!(
                        "{}: {} is profiled up to input size {measured}, requests come up to {seen}: estimated beyond what was measured (tidalctl profile --samples)",
                        spec.name, v.name
                    ));
                }
                // As the machine runs now, by the batches it served.
                let corrected = corrections.factor(&spec.name, &v.name);
                if (corrected - 1.0).abs() >= 0.005 {
                    notes.push(format!(
                        "{}: {} runs at {corrected:.2}× its profile's latency in the batches it served: planned so",
                        spec.name, v.name
                    ));
                }
                Some(Variant {
                    name: v.name.clone(),
                    accuracy: v.accuracy,
                    load_cost: if running.contains(v.name.as_str()) { 0.0 } else { 1.0 },
                    grid: ProfileGrid::new(&crate::task::per_request(&at.points, factor)).corrected(corrected),
                    // From every point measured (a stage that writes takes its memory at the
                    // most tokens, which the latency's points at one length do not show).
                    memory: crate::memory::MemoryCurve::new(task.profiles.get(v.name.as_str()).copied().unwrap_or_default()),
                })
            })
            .collect(),
    }
    };
    let stages = spec.stages.iter().zip(&factors).map(&mut stage).collect();
    let slo_ms = spec.slo_ms as f64;
    let problem = Problem {
        stages,
        load_rps: rate,
        slo_ms,
        comm_latency_ms: task.min_budget_ms.map_or(0.0, |b| (slo_ms - b).clamp(0.0, slo_ms)),
        core_budget: budget,
        max_worker_cores: None,
        max_worker_memory: None,
        weights: weights_within(cfg, budget, cluster),
        model: cfg.model,
    };
    (problem, notes)
}

/// The objective's weights for a plan within `budget` cores whose cores are weighed against the
/// cluster's: β·RC/budget rescaled to β·RC/cluster.
fn weights_within(cfg: &AdaptConfig, budget: u32, cluster: u32) -> Weights {
    Weights { beta: cfg.weights.beta * budget as f64 / cluster.max(1) as f64, ..cfg.weights }
}

/// One assignment per replica; each carries its replica's share of the traffic.
fn workers_of(task: &TaskSpec, problem: &Problem, solution: &Solution) -> Vec<Assignment> {
    let mut workers = Vec::new();
    for c in &solution.choices {
        let planned = &problem.stages[c.stage].variants[c.variant];
        let name = &planned.name;
        let stage = &task.stages[c.stage];
        let variant = stage.variants.iter().find(|v| &v.name == name).cloned();
        for _ in 0..c.replicas {
            workers.push(Assignment {
                task: task.name.clone(),
                stage: stage.name.clone(),
                variant: variant.clone(),
                node: String::new(),
                millicores: c.point.cores * 1000,
                max_batch: c.point.batch,
                max_delay_ms: c.point.max_delay_ms,
                weight: c.share_rps / c.replicas as f64 / solution.carried_rps.max(f64::MIN_POSITIVE),
                replica: 0,
                memory_bytes: planned.memory.worker_bytes(c.point.batch),
            });
        }
    }
    workers
}

fn notes_of(task: &TaskSpec, problem: &Problem, s: &Solution, rate: f64, budget: u32) -> Vec<String> {
    let mix: Vec<String> = s
        .choices
        .iter()
        .map(|c| {
            let name = &problem.stages[c.stage].variants[c.variant].name;
            let stage =
                if problem.stages.len() > 1 { format!("{}: ", problem.stages[c.stage].name) } else { String::new() };
            format!("{stage}{}×{name} {}c/b{} {:.0} req/s", c.replicas, c.point.cores, c.point.batch, c.share_rps)
        })
        .collect();
    let mut notes = vec![format!(
        "{}: planned {:.1} req/s → {} ({} cores, accuracy {:.2} %, latency bound {:.0} ms{})",
        task.name,
        rate,
        mix.join(" + "),
        s.cores,
        s.accuracy,
        s.latency_bound_ms,
        if problem.comm_latency_ms > 0.0 {
            format!(", {:.0} ms of the SLO left to the network", problem.comm_latency_ms)
        } else {
            String::new()
        }
    )];
    if s.overloaded {
        notes.push(format!(
            "{}: OVERLOADED: the budget of {budget} cores carries {:.1} req/s within the SLO, the excess is shed by deadline",
            task.name, s.carried_rps
        ));
    }
    for c in s.interpolated() {
        let name = &problem.stages[c.stage].variants[c.variant].name;
        notes.push(format!(
            "{}: {name} at {} cores, batch {} was not profiled; its latency and throughput are interpolated",
            task.name, c.point.cores, c.point.batch
        ));
    }
    notes
}

/// Before every stage has a profile: each stage's least accurate (cheapest) variant on one
/// core, batch 1, so the task is served while it is profiled.
fn unprofiled_default(task: &TaskSpec, budget: u32) -> Option<(Vec<Assignment>, String)> {
    if (budget as usize) < task.stages.len() {
        return None;
    }
    let workers: Vec<Assignment> = task
        .stages
        .iter()
        .map(|stage| {
            let cheapest = stage.variants.iter().min_by(|a, b| a.accuracy.total_cmp(&b.accuracy)).cloned()?;
            Some(Assignment {
                task: task.name.clone(),
                stage: stage.name.clone(),
                variant: Some(cheapest),
                node: String::new(),
                millicores: 1000,
                max_batch: 1,
                max_delay_ms: 0,
                weight: 1.0,
                replica: 0,
                // Not profiled: its memory is not known (nor limited).
                memory_bytes: 0,
            })
        })
        .collect::<Option<_>>()?;
    let names: Vec<&str> = workers.iter().map(variant_name).collect();
    let note = format!(
        "{}: no profiles yet, serving {} on 1 core each until `tidalctl profile` runs",
        task.name,
        names.join(", ")
    );
    Some((workers, note))
}

#[cfg(test)]
mod tests;
