//! The controller's driver of the adaptation core ([`tidal_common::adapt`]): the round's
//! inputs come from the replicated state (tasks, nodes, profiles, the plan in force) and from
//! what the leader observed of the agents (arrivals per second, request budgets). Nothing is
//! decided here; the simulator drives the same core.

use std::collections::BTreeMap;
use std::time::Instant;

use tidal_common::adapt::{Adapter, NodeInput, Round, RoundInput, Surge, TaskInput};
use tidal_common::forecast::SURGE_WINDOW_S;

use crate::observed::Observed;
use crate::state::ClusterState;

/// The next round from the state and the observations at `now` (epoch and term left 0);
/// without `forecast`, the plan is reconsidered at the rates already planned (a worker came
/// up, see [`Adapter::reconsider`]).
pub fn plan_round(
    adapter: &mut Adapter,
    state: &ClusterState,
    observed: &Observed,
    now: Instant,
    forecast: bool,
) -> Round {
    let cfg = adapter.config();
    let lookback = cfg.lookback_s as u64;
    let interval = cfg.interval_s.ceil().max(1.0) as u64;
    let histories: Vec<Vec<f64>> = state.tasks.keys().map(|t| observed.history(t, now, lookback)).collect();
    let tasks = state
        .tasks
        .values()
        .zip(&histories)
        .map(|(spec, arrivals)| TaskInput {
            spec,
            arrivals,
            min_budget_ms: observed.min_budget(&spec.name, now, interval),
            profiles: profiles_of(state, &spec.name),
            load_s: observed.load_times(&spec.name),
        })
        .collect();
    // A node that stopped reporting, or is draining, is planned around: its share goes to the
    // others.
    let nodes = state
        .nodes
        .iter()
        .filter(|(name, n)| !n.draining && !observed.is_silent(name, now))
        .map(|(name, n)| NodeInput { name, address: &n.address, cores: n.cores })
        .collect();
    let serving = observed.serving();
    let input = RoundInput { tasks, nodes, current: state.plan.as_ref(), serving: &serving };
    if forecast {
        adapter.round(&input)
    } else {
        adapter.reconsider(&input)
    }
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
