//! The simulator's executor of the contract in [`crate::executor`]: simulated workers whose
//! model loads take their variant's load time, on the agent's make before break.

use std::collections::HashMap;

use crate::executor::Executor;
use crate::reconcile::{DesiredWorker, WorkerKey};

use super::worker::{PendingResize, SimWorker};
use super::SimVariant;

pub(super) struct SimExecutor<'s> {
    pub workers: &'s mut Vec<SimWorker>,
    pub variants: &'s [SimVariant],
    /// Each (task, variant) name's index into `variants`.
    pub index: HashMap<(&'s str, &'s str), usize>,
    /// Now.
    pub t: f64,
    /// The first plan's workers serve at once (the replay starts warm).
    pub warm: bool,
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

    fn start(&mut self, d: DesiredWorker, variant: usize) {
        let ready_at = if self.warm { self.t } else { self.t + self.variants[variant].load_time_s };
        if let Some(old) = self.live(&d.key) {
            self.workers[old].retire_at = ready_at;
        }
        let delay = d.shape.max_delay_ms as f64 / 1000.0;
        let mut w =
            SimWorker::new(variant, d.shape.millicores.div_ceil(1000), d.shape.max_batch, delay, d.weight, ready_at);
        w.key = d.key;
        self.workers.push(w);
    }

    fn rebatch(&mut self, key: &WorkerKey, max_batch: u32, max_delay_ms: u32) {
        if let Some(i) = self.live(key) {
            self.workers[i].batch = max_batch.max(1);
            self.workers[i].max_delay = max_delay_ms as f64 / 1000.0;
        }
    }

    fn resize(&mut self, key: &WorkerKey, millicores: u32, after: &[WorkerKey]) {
        let Some(i) = self.live(key) else { return };
        let (at, cores) = (self.ready_of(after), millicores.div_ceil(1000));
        let w = &mut self.workers[i];
        if at > self.t {
            w.pending = Some(PendingResize { at, cores });
        } else {
            w.cores = cores;
        }
    }

    fn stop(&mut self, key: &WorkerKey, after: &[WorkerKey]) {
        let at = self.ready_of(after);
        if let Some(i) = self.live(key) {
            self.workers[i].retire_at = at;
        }
    }

    fn millicores(&self, key: &WorkerKey) -> Option<u32> {
        self.live(key).map(|i| self.workers[i].cores * 1000)
    }

    fn starting(&self, task: &str) -> Vec<WorkerKey> {
        self.workers
            .iter()
            .filter(|w| w.key.task == task && w.retire_at.is_infinite() && w.ready_at > self.t)
            .map(|w| w.key.clone())
            .collect()
    }
}
