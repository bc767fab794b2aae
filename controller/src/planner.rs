//! The controller's driver of the adaptation core ([`tidal_common::adapt`]): the round's
//! inputs come from the replicated state (tasks, nodes, profiles, the plan in force) and from
//! what the leader observed of the agents (arrivals per second, request budgets). Nothing is
//! decided here; the simulator drives the same core.

use std::collections::{BTreeMap, HashSet};
use std::time::Instant;

use tidal_common::adapt::{
    serves_only_as_standby, AdaptConfig, Adapter, NodeInput, Round, RoundInput, Serving, Surge, TaskInput,
};
use tidal_common::forecast::SURGE_WINDOW_S;

use tidal_common::task::{canary_name, parse_canary};
use tidal_proto::v1::{Canary, TaskSpec};

use crate::observed::Observed;
use crate::state::ClusterState;

/// What a round takes from the leader's observations, copied out so that the solve holds no
/// lock the telemetry handlers need.
pub struct Observations {
    /// The tasks planned ([`planned_tasks`]); what follows is per task, in this order.
    tasks: Vec<tidal_proto::v1::TaskSpec>,
    histories: Vec<Vec<f64>>,
    min_budgets: Vec<Option<f64>>,
    load_times: Vec<BTreeMap<String, f64>>,
    /// Per stage, the input sizes its requests came in over the lookback.
    sizes: Vec<BTreeMap<String, tidal_common::profile::SizeMix>>,
    /// Per variant, the batches it served since the last round.
    served: Vec<BTreeMap<String, Vec<tidal_proto::v1::ServedBatch>>>,
    /// Seconds since each task's last request (see [`Observed::idle_s`]).
    idle_s: Vec<f64>,
    /// Nodes that stopped reporting.
    silent: HashSet<String>,
    serving: Serving,
}

impl Observations {
    /// Takes the batches served since the last gathering: each is observed once.
    pub fn gather(adapter: &AdaptConfig, state: &ClusterState, observed: &mut Observed, now: Instant) -> Self {
        let lookback = adapter.lookback_s as u64;
        let interval = adapter.interval_s.ceil().max(1.0) as u64;
        let specs = planned_tasks(state);
        let tasks = specs.iter().map(|t| &t.name);
        observed.keep_served_of(tasks.clone());
        let mut histories: Vec<Vec<f64>> = tasks.clone().map(|t| observed.history(t, now, lookback)).collect();
        // A canary is planned for its share of the task's arrivals (both versions'), not for
        // its own: it has none before its workers serve, then takes its share at once.
        for (i, spec) in specs.iter().enumerate() {
            let Some(canary) = &spec.canary else { continue };
            let Some(c) = specs.iter().position(|t| t.name == canary.task) else { continue };
            let (served, own) = (&histories[i], &histories[c]);
            let len = served.len().max(own.len());
            let at =
                |h: &Vec<f64>, k: usize| (k + h.len()).checked_sub(len).and_then(|j| h.get(j)).copied().unwrap_or(0.0);
            let share = canary.percent as f64 / 100.0;
            let estimate: Vec<f64> = (0..len).map(|k| share * (at(served, k) + at(own, k))).collect();
            histories[c] = estimate;
        }
        Self {
            histories,
            min_budgets: tasks.clone().map(|t| observed.min_budget(t, now, interval)).collect(),
            load_times: tasks
                .clone()
                .map(|t| observed.load_times(t).into_iter().map(|(v, s)| (v.to_string(), s)).collect())
                .collect(),
            sizes: tasks.clone().map(|t| observed.size_mixes(t, now, lookback)).collect(),
            idle_s: tasks
                .clone()
                .map(|t| {
                    let planned = state.plan.as_ref().is_some_and(|p| p.assignments.iter().any(|a| &a.task == t));
                    observed.idle_s(profiled_as(t), now, planned)
                })
                .collect(),
            served: tasks
                .map(|t| {
                    let plan = state.plan.as_ref();
                    observed.take_served(t, |node, variant| {
                        !plan.is_some_and(|p| serves_only_as_standby(p, t, Some(node), variant))
                    })
                })
                .collect(),
            tasks: specs.clone(),
            silent: state.nodes.keys().filter(|n| observed.is_silent(n, now)).cloned().collect(),
            serving: observed.serving(),
        }
    }
}

/// The next round from the state and the observations at `now` (epoch and term left 0);
/// without `forecast`, the plan is reconsidered at the rates already planned (a worker came
/// up, see [`Adapter::reconsider`]).
pub fn plan_round(
    adapter: &mut Adapter,
    state: &ClusterState,
    observed: &mut Observed,
    now: Instant,
    forecast: bool,
) -> Round {
    let observations = Observations::gather(adapter.config(), state, observed, now);
    plan_from(adapter, state, &observations, forecast)
}

/// [`plan_round`] from observations gathered before.
pub fn plan_from(adapter: &mut Adapter, state: &ClusterState, observed: &Observations, forecast: bool) -> Round {
    let tasks = observed
        .tasks
        .iter()
        .enumerate()
        .map(|(i, spec)| TaskInput {
            spec,
            arrivals: &observed.histories[i],
            min_budget_ms: observed.min_budgets[i],
            profiles: profiles_of(state, profiled_as(&spec.name)),
            profile_indices: state
                .profiles
                .iter()
                .filter(|((t, _), _)| t == profiled_as(&spec.name))
                .map(|((_, variant), p)| (variant.as_str(), p.stored_index))
                .collect(),
            load_s: observed.load_times[i].iter().map(|(v, s)| (v.as_str(), *s)).collect(),
            sizes: observed.sizes[i].iter().map(|(stage, mix)| (stage.as_str(), mix.clone())).collect(),
            served: observed.served[i].iter().map(|(v, b)| (v.as_str(), b.as_slice())).collect(),
            idle_s: observed.idle_s[i],
        })
        .collect();
    // A node that stopped reporting, or is draining, is planned around: its share goes to the
    // others.
    let nodes = state
        .nodes
        .iter()
        .filter(|(name, n)| !n.draining && !observed.silent.contains(*name))
        .map(|(name, n)| NodeInput { name, address: &n.address, cores: n.cores, memory_bytes: n.memory_bytes })
        .collect();
    let input = RoundInput { tasks, nodes, current: state.plan.as_ref(), serving: &observed.serving };
    if forecast {
        adapter.round(&input)
    } else {
        adapter.reconsider(&input)
    }
}

/// The tasks a round plans: each task's version served (with its canary during a rollout)
/// and each rollout's canary, planned as a task of its own (`task@version`, see
/// [`tidal_common::task::canary_name`]) at the task's SLO.
pub fn planned_tasks(state: &ClusterState) -> Vec<TaskSpec> {
    let mut tasks = Vec::new();
    for (name, spec) in &state.tasks {
        let mut spec = spec.clone();
        let rollout = state.rollouts.get(name);
        if let Some((r, kept)) = rollout.and_then(|r| Some((r, state.earlier.get(name)?.get(&r.version)?))) {
            let canary = canary_name(name, r.version);
            spec.canary = Some(Canary { task: canary.clone(), version: r.version, percent: r.canary_percent });
            tasks.push(TaskSpec { name: canary, slo_ms: spec.slo_ms, share: None, canary: None, ..kept.clone() });
        }
        tasks.push(spec);
    }
    tasks
}

/// The task whose profiles a planned task uses: a canary's are its task's.
fn profiled_as(task: &str) -> &str {
    parse_canary(task).map_or(task, |(task, _)| task)
}

/// The nodes the plan in force gives workers to that have stopped reporting.
pub fn silent_nodes(plan: Option<&tidal_proto::v1::Plan>, observed: &Observed, now: Instant) -> Vec<String> {
    let mut nodes: Vec<String> = plan
        .into_iter()
        .flat_map(|p| p.assignments.iter())
        .filter(|a| observed.is_silent(&a.node, now))
        .map(|a| a.node.clone())
        .collect();
    nodes.sort();
    nodes.dedup();
    nodes
}

/// Whether the observed arrivals call for a round now (see [`Adapter::surge`]).
pub fn surge(adapter: &mut Adapter, tasks: &[String], observed: &Observed, now: Instant) -> Option<Surge> {
    let histories: Vec<(&str, Vec<f64>)> =
        tasks.iter().map(|t| (t.as_str(), observed.history(t, now, SURGE_WINDOW_S as u64))).collect();
    adapter.surge(observed.seconds(now), histories.iter().map(|(t, h)| (*t, h.as_slice())))
}

fn profiles_of<'a>(state: &'a ClusterState, task: &str) -> BTreeMap<&'a str, &'a [tidal_proto::v1::ProfilePoint]> {
    state
        .profiles
        .iter()
        .filter(|((t, _), _)| t == task)
        .map(|((_, variant), p)| (variant.as_str(), p.points.as_slice()))
        .collect()
}
