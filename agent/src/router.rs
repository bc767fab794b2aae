//! The router: splits each stage of a task's requests across the stage's workers, here and on
//! other agents, by the plan's weights.
//!
//! Smooth weighted round-robin (as nginx does it) spreads each worker's share evenly in time
//! rather than in random bursts, which keeps the queues short. A worker that is not ready yet
//! (its model is loading) gives its turn to the ready ones; workers being retired keep the
//! share they had until their successors are ready, so a plan change loses no capacity.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tidal_proto::v1::inference_client::InferenceClient;
use tidal_proto::v1::Routing;
use tonic::transport::Channel;

use crate::worker::Worker;

/// A task's workers on another agent, reached over gRPC. A request forwarded there is served
/// by that agent's own workers and never forwarded again.
pub struct Remote {
    pub node: String,
    pub address: String,
    pub client: InferenceClient<Channel>,
    down_until: Mutex<Option<Instant>>,
}

impl Remote {
    pub fn new(node: String, address: String, client: InferenceClient<Channel>) -> Self {
        Self { node, address, client, down_until: Mutex::new(None) }
    }

    pub fn is_up(&self) -> bool {
        self.down_until.lock().unwrap_or_else(|p| p.into_inner()).is_none_or(|t| Instant::now() >= t)
    }

    /// Takes the node out of the rotation for a while (it failed a forwarded request).
    pub fn mark_down(&self, pause: Duration) {
        *self.down_until.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now() + pause);
    }
}

/// Where a request goes.
#[derive(Clone)]
pub enum Target {
    Local(Arc<Worker>),
    Remote(Arc<Remote>),
}

struct Entry {
    target: Target,
    weight: f64,
    current: f64,
}

impl Entry {
    fn local(&self) -> Option<&Arc<Worker>> {
        match &self.target {
            Target::Local(w) => Some(w),
            Target::Remote(_) => None,
        }
    }

    fn ready(&self) -> bool {
        match &self.target {
            Target::Local(w) => w.is_ready(),
            Target::Remote(r) => r.is_up(),
        }
    }
}

/// A stage of a task: what a route serves.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StageKey {
    pub task: String,
    pub stage: String,
}

impl StageKey {
    pub fn new(task: &str, stage: &str) -> Self {
        Self { task: task.into(), stage: stage.into() }
    }
}

#[derive(Default)]
pub struct Router {
    stages: Mutex<HashMap<StageKey, Vec<Entry>>>,
    /// The plan's routing is by slack (`tidal_common::slack`): a request the picked worker
    /// would refuse may go to another of the stage's workers here.
    by_slack: AtomicBool,
}

impl Router {
    /// Follows the plan's routing.
    pub fn set_routing(&self, routing: Routing) {
        self.by_slack.store(routing == Routing::BySlack, Ordering::Relaxed);
    }

    pub fn by_slack(&self) -> bool {
        self.by_slack.load(Ordering::Relaxed)
    }

    /// The stage's ready workers here other than `except`: where a request its pick would
    /// refuse may go instead, when routing by slack.
    pub fn other_ready_local(&self, stage: &StageKey, except: &Arc<Worker>) -> Vec<Arc<Worker>> {
        let stages = self.stages.lock().unwrap_or_else(|p| p.into_inner());
        stages.get(stage).map_or_else(Vec::new, |entries| {
            entries
                .iter()
                .filter_map(Entry::local)
                .filter(|w| w.is_ready() && !Arc::ptr_eq(w, except))
                .cloned()
                .collect()
        })
    }

    /// Replaces a stage's local routes `(worker, weight)`, keeping its remote ones; weight 0
    /// marks a worker being retired.
    pub fn set_routes(&self, stage: &StageKey, routes: Vec<(Arc<Worker>, f64)>) {
        let local = routes.into_iter().map(|(w, weight)| (Target::Local(w), weight)).collect();
        self.replace(stage, local, |e| e.local().is_some());
    }

    /// Replaces a stage's routes to other agents `(node, weight)`, keeping its local ones.
    pub fn set_remote_routes(&self, stage: &StageKey, routes: Vec<(Arc<Remote>, f64)>) {
        let remote = routes.into_iter().map(|(r, weight)| (Target::Remote(r), weight)).collect();
        self.replace(stage, remote, |e| e.local().is_none());
    }

    fn replace(&self, stage: &StageKey, targets: Vec<(Target, f64)>, replaced: impl Fn(&Entry) -> bool) {
        let mut stages = self.stages.lock().unwrap_or_else(|p| p.into_inner());
        let entries = stages.entry(stage.clone()).or_default();
        entries.retain(|e| !replaced(e));
        entries.extend(targets.into_iter().map(|(target, weight)| Entry {
            target,
            weight: weight.max(0.0),
            current: 0.0,
        }));
    }

    /// Keeps only the routes of `stages`.
    pub fn retain(&self, stages: &[StageKey]) {
        self.stages.lock().unwrap_or_else(|p| p.into_inner()).retain(|k, _| stages.contains(k));
    }

    /// The current weight of each of a stage's local workers, by worker id.
    pub fn weights(&self, stage: &StageKey) -> Vec<(String, f64)> {
        let stages = self.stages.lock().unwrap_or_else(|p| p.into_inner());
        stages.get(stage).map_or_else(Vec::new, |entries| {
            entries.iter().filter_map(|e| Some((e.local()?.spec.id.clone(), e.weight))).collect()
        })
    }

    /// Where the next request of `stage` goes: by weight among ready workers here and
    /// reachable agents elsewhere; else any ready local worker; else a weighted local worker
    /// (the request waits for its model to load); else a reachable agent.
    pub fn pick(&self, stage: &StageKey) -> Option<Target> {
        let mut stages = self.stages.lock().unwrap_or_else(|p| p.into_inner());
        let entries = stages.get_mut(stage)?;
        if let Some(t) = smooth_weighted(entries, |e| e.ready() && e.weight > 0.0) {
            return Some(t);
        }
        pick_local(entries)
            .map(Target::Local)
            .or_else(|| entries.iter().find(|e| e.local().is_none() && e.ready()).map(|e| e.target.clone()))
    }

    /// Whether `pick` would find a ready worker here or a reachable agent for `stage`.
    pub fn stage_ready(&self, stage: &StageKey) -> bool {
        let stages = self.stages.lock().unwrap_or_else(|p| p.into_inner());
        stages.get(stage).is_some_and(|entries| entries.iter().any(Entry::ready))
    }

    /// Like `pick`, among this agent's own workers only (for forwarded requests).
    pub fn pick_local(&self, stage: &StageKey) -> Option<Arc<Worker>> {
        let mut stages = self.stages.lock().unwrap_or_else(|p| p.into_inner());
        let entries = stages.get_mut(stage)?;
        match smooth_weighted(entries, |e| e.local().is_some_and(|w| w.is_ready()) && e.weight > 0.0) {
            Some(Target::Local(w)) => Some(w),
            _ => pick_local(entries),
        }
    }
}

/// A local worker when none is picked by weight: any ready one, else a weighted one.
fn pick_local(entries: &mut [Entry]) -> Option<Arc<Worker>> {
    if let Some(w) = entries.iter().filter_map(Entry::local).find(|w| w.is_ready()) {
        return Some(w.clone());
    }
    match smooth_weighted(entries, |e| e.local().is_some() && e.weight > 0.0) {
        Some(Target::Local(w)) => Some(w),
        _ => entries.iter().find_map(Entry::local).cloned(),
    }
}

fn smooth_weighted(entries: &mut [Entry], eligible: impl Fn(&Entry) -> bool) -> Option<Target> {
    let weights: Vec<f64> = entries.iter().map(|e| if eligible(e) { e.weight } else { 0.0 }).collect();
    let mut current: Vec<f64> = entries.iter().map(|e| e.current).collect();
    let i = swrr_pick(&weights, &mut current)?;
    for (e, c) in entries.iter_mut().zip(current) {
        e.current = c;
    }
    Some(entries[i].target.clone())
}

/// One step of smooth weighted round-robin over `weights` (0 = not eligible), updating the
/// running `current` scores; the index picked.
fn swrr_pick(weights: &[f64], current: &mut [f64]) -> Option<usize> {
    let total: f64 = weights.iter().sum();
    if total <= 0.0 {
        return None;
    }
    let mut best: Option<usize> = None;
    for i in 0..weights.len() {
        if weights[i] <= 0.0 {
            continue;
        }
        current[i] += weights[i];
        if best.is_none_or(|b| current[i] > current[b]) {
            best = Some(i);
        }
    }
    let b = best?;
    current[b] -= total;
    Some(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_follow_the_weights_and_interleave() {
        let weights = [0.75, 0.25, 0.0];
        let mut current = [0.0; 3];
        let picks: Vec<usize> = (0..8).map(|_| swrr_pick(&weights, &mut current).unwrap()).collect();
        assert_eq!(picks.iter().filter(|&&i| i == 0).count(), 6);
        assert_eq!(picks.iter().filter(|&&i| i == 1).count(), 2);
        assert!(!picks.contains(&2));
        // Smooth: the light worker is never picked twice in a row.
        assert!(picks.windows(2).all(|w| !(w[0] == 1 && w[1] == 1)));
    }

    #[test]
    fn no_eligible_weight_picks_nothing() {
        assert_eq!(swrr_pick(&[0.0, 0.0], &mut [0.0, 0.0]), None);
    }
}
