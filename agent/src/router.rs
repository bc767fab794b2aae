//! The router: splits a task's requests across its workers by the plan's weights.
//!
//! Smooth weighted round-robin (as nginx does it) spreads each worker's share evenly in time
//! rather than in random bursts, which keeps the queues short. A worker that is not ready yet
//! (its model is loading) gives its turn to the ready ones; workers being retired keep serving
//! with weight 0 until the new ones are ready, so a plan change loses no request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::worker::Worker;

struct Entry {
    worker: Arc<Worker>,
    weight: f64,
    current: f64,
}

#[derive(Default)]
pub struct Router {
    tasks: Mutex<HashMap<String, Vec<Entry>>>,
}

impl Router {
    /// Replaces a task's routes: `(worker, weight)`; weight 0 marks a worker being retired.
    pub fn set_routes(&self, task: &str, routes: Vec<(Arc<Worker>, f64)>) {
        let entries = routes
            .into_iter()
            .map(|(worker, weight)| Entry { worker, weight: weight.max(0.0), current: 0.0 })
            .collect();
        self.tasks.lock().unwrap_or_else(|p| p.into_inner()).insert(task.to_string(), entries);
    }

    pub fn remove_task(&self, task: &str) {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner()).remove(task);
    }

    pub fn tasks(&self) -> Vec<String> {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect()
    }

    /// The current weight of each of a task's workers, by worker id.
    pub fn weights(&self, task: &str) -> Vec<(String, f64)> {
        let tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        tasks
            .get(task)
            .map_or_else(Vec::new, |entries| entries.iter().map(|e| (e.worker.spec.id.clone(), e.weight)).collect())
    }

    /// The worker for the next request of `task`: by weight among ready workers, else any
    /// ready worker, else any weighted worker (the request waits for its model to load).
    pub fn pick(&self, task: &str) -> Option<Arc<Worker>> {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        let entries = tasks.get_mut(task)?;
        if let Some(w) = smooth_weighted(entries, |e| e.worker.is_ready() && e.weight > 0.0) {
            return Some(w);
        }
        if let Some(e) = entries.iter().find(|e| e.worker.is_ready()) {
            return Some(e.worker.clone());
        }
        smooth_weighted(entries, |e| e.weight > 0.0).or_else(|| entries.first().map(|e| e.worker.clone()))
    }
}

fn smooth_weighted(entries: &mut [Entry], eligible: impl Fn(&Entry) -> bool) -> Option<Arc<Worker>> {
    let weights: Vec<f64> = entries.iter().map(|e| if eligible(e) { e.weight } else { 0.0 }).collect();
    let mut current: Vec<f64> = entries.iter().map(|e| e.current).collect();
    let i = swrr_pick(&weights, &mut current)?;
    for (e, c) in entries.iter_mut().zip(current) {
        e.current = c;
    }
    Some(entries[i].worker.clone())
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
