//! The simulator's executor of the contract in [`crate::executor`]: simulated workers whose
//! model loads take their variant's load time, on the agent's make before break.

use std::collections::HashMap;

use tidal_proto::v1::{Plan, Transition, VariantSpec};

use crate::executor::{execute, Executor};
use crate::reconcile::{desired_on, diff, DesiredWorker, RunningWorker, WorkerKey, WorkerShape};

use super::worker::{PendingResize, SimWorker};
use super::SimVariant;

/// Applies a plan to `node`'s simulated workers as the agent does, through the executor
/// contract ([`crate::executor::execute`]): the same actions, in the same order, with the same
/// waits; a newer plan cancels a shrink still waiting. The plan's shares route at once.
/// `index` maps (task, variant) names to `variants`; `model_file` names a variant's file (a
/// changed file is a replacement); with `warm`, started workers serve at once.
#[allow(clippy::too_many_arguments)]
pub(super) fn apply_plan<'s>(
    workers: &'s mut Vec<SimWorker>,
    variants: &'s [SimVariant],
    index: HashMap<(&'s str, &'s str), usize>,
    model_file: impl Fn(usize) -> String,
    plan: &Plan,
    node: &str,
    t: f64,
    warm: bool,
    memory: Option<MemoryBudget>,
) -> Result<(), String> {
    let desired = desired_on(plan, node);
    let transition = Transition::try_from(plan.transition).unwrap_or(Transition::InPlace);
    for w in workers.iter_mut() {
        w.pending = None;
    }
    // What runs, as the agent's reconcile sees it: the workers in the plan, at the quota and
    // batcher they have now.
    let running: Vec<RunningWorker> = workers
        .iter()
        .filter(|w| w.retire_at.is_infinite())
        .map(|w| RunningWorker {
            key: w.key.clone(),
            model_file: model_file(w.variant),
            model_sha256: String::new(),
            shape: WorkerShape {
                millicores: w.cores() * 1000,
                max_batch: w.batch,
                max_delay_ms: (w.max_delay * 1000.0).round() as u32,
                // Simulated workers are not limited (no limit is ever raised).
                memory_bytes: 0,
            },
        })
        .collect();
    let actions = diff(&desired, &running, transition);
    execute(&mut SimExecutor { workers, variants, index, t, warm, memory }, actions)?;
    for d in &desired {
        if let Some(w) = workers.iter_mut().find(|w| w.key == d.key && w.retire_at.is_infinite()) {
            w.share = d.weight;
            w.memory_bytes = d.shape.memory_bytes;
        }
    }
    Ok(())
}

/// A node's declared memory, as the executor keeps transitions within it.
pub(super) struct MemoryBudget {
    pub bytes: u64,
    /// Per variant, the longest a request it takes may wait (its task's SLO, seconds): how
    /// long a worker that stops later may drain after it stops taking requests.
    pub drain_s: Vec<f64>,
}

/// One node's make before break as the simulator carries it out, on its own: plans applied at
/// their times, each variant loading in its time; what serves when. The agent's reconciler is
/// held to the same timeline (its parity test).
pub struct NodeTimeline {
    node: String,
    /// Each variant's task and model file, by index into `variants`.
    of: Vec<(String, String)>,
    variants: Vec<SimVariant>,
    workers: Vec<SimWorker>,
}

/// A worker that serves, and its cores.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServingWorker {
    pub task: String,
    pub variant: String,
    pub replica: u32,
    pub cores: u32,
}

impl NodeTimeline {
    /// A node whose plans may run `variants`: (task, variant, seconds its model takes to load).
    pub fn new(node: &str, variants: &[(&str, VariantSpec, f64)]) -> Self {
        Self {
            node: node.into(),
            of: variants.iter().map(|(task, v, _)| (task.to_string(), v.model_file.clone())).collect(),
            variants: variants
                .iter()
                .map(|(_, v, load_time_s)| SimVariant::new(&v.name, v.accuracy, Vec::new(), *load_time_s))
                .collect(),
            workers: Vec::new(),
        }
    }

    /// Applies `plan` at time `t` (seconds); workers it starts load in their time, the first
    /// plan's too.
    pub fn apply(&mut self, plan: &Plan, t: f64) -> Result<(), String> {
        let index = self.of.iter().zip(&self.variants).enumerate();
        let index = index.map(|(i, ((task, _), v))| ((task.as_str(), v.name.as_str()), i)).collect();
        let of = &self.of;
        let model_file = |v: usize| of[v].1.clone();
        apply_plan(&mut self.workers, &self.variants, index, model_file, plan, &self.node, t, false, None)
    }

    /// The workers that serve at `t`, with the cores they have then, in order; `t` not before
    /// the last plan applied (a plan changes what runs from its time on).
    pub fn serving(&self, t: f64) -> Vec<ServingWorker> {
        let mut serving: Vec<ServingWorker> = self
            .workers
            .iter()
            .filter(|w| w.serving(t))
            .map(|w| ServingWorker {
                task: w.key.task.clone(),
                variant: w.key.variant.clone(),
                replica: w.key.replica,
                cores: w.pending.filter(|r| r.at <= t).map_or(w.cores(), |r| r.cores),
            })
            .collect();
        serving.sort();
        serving
    }
}

pub(super) struct SimExecutor<'s> {
    pub workers: &'s mut Vec<SimWorker>,
    pub variants: &'s [SimVariant],
    /// Each (task, variant) name's index into `variants`.
    pub index: HashMap<(&'s str, &'s str), usize>,
    /// Now.
    pub t: f64,
    /// The first plan's workers serve at once (the replay starts warm).
    pub warm: bool,
    /// The node's declared memory (`None`: not declared, or transitions may pass it).
    pub memory: Option<MemoryBudget>,
}

impl SimExecutor<'_> {
    /// The worker in the plan under `key` (not one retiring).
    fn live(&self, key: &WorkerKey) -> Option<usize> {
        self.workers.iter().position(|w| &w.key == key && w.retire_at.is_infinite())
    }

    /// When every worker of `keys` serves (now, if they all do).
    fn ready_of(&self, keys: &[WorkerKey]) -> f64 {
        keys.iter().filter_map(|k| self.live(k)).map(|i| self.workers[i].ready_at).fold(self.t, f64::max)
    }
}

impl Executor for SimExecutor<'_> {
    type Prepared = usize;
    type Error = String;

    fn prepare(&mut self, d: &DesiredWorker) -> Result<usize, String> {
        self.index
            .get(&(d.key.task.as_str(), d.key.variant.as_str()))
            .copied()
            .ok_or_else(|| format!("the simulator has no variant {} of task {}", d.key.variant, d.key.task))
    }

    fn abandon(&mut self, _: usize) {}

    /// A start that waits for workers to stop begins to load when they are estimated to have
    /// drained: when the last request they hold is due (they serve or shed it by then), or,
    /// for one that stops taking requests later, an SLO after that.
    fn start(&mut self, d: DesiredWorker, variant: usize, after_gone: &[WorkerKey]) {
        let stopped = |k: &WorkerKey| self.workers.iter().rposition(|w| &w.key == k && w.retire_at.is_finite());
        let drained = |i: usize| {
            let w = &self.workers[i];
            let drain_s = self.memory.as_ref().and_then(|m| m.drain_s.get(w.variant)).copied().unwrap_or(0.0);
            let later = if w.retire_at > self.t { w.retire_at + drain_s } else { w.retire_at };
            w.drained_by().max(later)
        };
        let loads_from = after_gone.iter().filter_map(stopped).map(drained).fold(self.t, f64::max);
        let ready_at = if self.warm { self.t } else { loads_from + self.variants[variant].load_time_s };
        if let Some(old) = self.live(&d.key) {
            self.workers[old].retire_at = ready_at;
        }
        let delay = d.shape.max_delay_ms as f64 / 1000.0;
        let mut w =
            SimWorker::new(variant, d.shape.millicores.div_ceil(1000), d.shape.max_batch, delay, d.weight, ready_at)
                .generating(self.variants[variant].generate.as_ref());
        w.key = d.key;
        w.loads_from = if self.warm { self.t } else { loads_from };
        w.memory_bytes = d.shape.memory_bytes;
        self.workers.push(w);
    }

    fn rebatch(&mut self, key: &WorkerKey, max_batch: u32, max_delay_ms: u32) {
        if let Some(i) = self.live(key) {
            self.workers[i].batch = max_batch.max(1);
            self.workers[i].max_delay = max_delay_ms as f64 / 1000.0;
        }
    }

    /// Simulated workers run within what the plan gives them: memory is the planner's to
    /// respect, not the simulator's to enforce.
    fn limit_memory(&mut self, _: &WorkerKey, _: u64) {}

    fn resize(&mut self, key: &WorkerKey, millicores: u32, after: &[WorkerKey]) {
        let Some(i) = self.live(key) else { return };
        let (at, cores) = (self.ready_of(after), millicores.div_ceil(1000));
        let w = &mut self.workers[i];
        if at > self.t {
            w.pending = Some(PendingResize { at, cores });
        } else {
            w.resize(cores);
        }
    }

    fn stop(&mut self, key: &WorkerKey, after: &[WorkerKey]) {
        let at = self.ready_of(after);
        if let Some(i) = self.live(key) {
            self.workers[i].retire_at = at;
        }
    }

    fn millicores(&self, key: &WorkerKey) -> Option<u32> {
        self.live(key).map(|i| self.workers[i].cores() * 1000)
    }

    fn starting(&self, task: &str) -> Vec<WorkerKey> {
        self.workers
            .iter()
            .filter(|w| w.key.task == task && w.retire_at.is_infinite() && w.ready_at > self.t)
            .map(|w| w.key.clone())
            .collect()
    }

    fn memory_budget(&self) -> Option<u64> {
        self.memory.as_ref().map(|m| m.bytes)
    }

    fn memory_held(&self) -> u64 {
        self.workers.iter().filter(|w| !w.gone(self.t)).map(|w| w.memory_bytes).fold(0, u64::saturating_add)
    }

    fn memory_of(&self, key: &WorkerKey) -> u64 {
        self.live(key).map_or(0, |i| self.workers[i].memory_bytes)
    }

    fn leaving(&self) -> Vec<(WorkerKey, u64)> {
        let leaving = self.workers.iter().filter(|w| w.retire_at.is_finite() && !w.gone(self.t));
        leaving.map(|w| (w.key.clone(), w.memory_bytes)).collect()
    }
}
