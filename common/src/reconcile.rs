//! Reconciliation: the pure difference between the workers a plan wants on a node and the
//! workers running there, as a list of actions. The agent applies it to processes and cgroups,
//! the simulator to its simulated workers, so a plan moves both the same way. Applying the
//! same plan twice yields no action.
//!
//! How the actions are carried out is the executor's, but both follow make before break: a
//! `Stop` and a shrinking `Resize` of a task wait until that task's `Start`s and `Replace`s
//! serve, and a `Replace` retires the old worker only once its successor serves.

use std::collections::BTreeMap;

use tidal_proto::v1::{Plan, Transition, VariantSpec};

/// A worker's identity on a node: replica `replica` of (task, stage, variant).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WorkerKey {
    pub task: String,
    pub stage: String,
    pub variant: String,
    pub replica: u32,
}

impl std::fmt::Display for WorkerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A one-stage task's stage is named after it: not repeated.
        if self.stage == self.task {
            write!(f, "{}/{}#{}", self.task, self.variant, self.replica)
        } else {
            write!(f, "{}/{}/{}#{}", self.task, self.stage, self.variant, self.replica)
        }
    }
}

/// What a worker is sized to: its CPU quota, its batcher and its memory (0: not planned).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerShape {
    pub millicores: u32,
    pub max_batch: u32,
    pub max_delay_ms: u32,
    pub memory_bytes: u64,
}

impl WorkerShape {
    /// Whether the quota or the batcher differ (memory aside: it is only ever raised in place).
    fn reshaped(&self, other: &WorkerShape) -> bool {
        (self.millicores, self.max_batch, self.max_delay_ms) != (other.millicores, other.max_batch, other.max_delay_ms)
    }
}

/// A memory figure as a limit: 0 (not planned) is no limit.
fn as_limit(memory_bytes: u64) -> u64 {
    if memory_bytes == 0 {
        u64::MAX
    } else {
        memory_bytes
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct DesiredWorker {
    pub key: WorkerKey,
    pub variant: VariantSpec,
    pub shape: WorkerShape,
    /// Its share of the task's traffic.
    pub weight: f64,
}

/// What is running, as the executor observes it.
#[derive(Debug, Clone, PartialEq)]
pub struct RunningWorker {
    pub key: WorkerKey,
    pub model_file: String,
    /// Its file's digest as registered (empty: not recorded): the same name with another
    /// digest is another model.
    pub model_sha256: String,
    pub shape: WorkerShape,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Stop(WorkerKey),
    /// A new quota, in place.
    Resize {
        key: WorkerKey,
        millicores: u32,
    },
    /// A higher memory limit (0: none), or a first one, in place.
    Limit {
        key: WorkerKey,
        memory_bytes: u64,
    },
    /// New batcher settings, in place.
    Rebatch {
        key: WorkerKey,
        max_batch: u32,
        max_delay_ms: u32,
    },
    /// A worker of the new shape (or model file) takes over from the running one.
    Replace(DesiredWorker),
    Start(DesiredWorker),
}

impl Action {
    pub fn key(&self) -> &WorkerKey {
        match self {
            Action::Stop(key)
            | Action::Resize { key, .. }
            | Action::Rebatch { key, .. }
            | Action::Limit { key, .. } => key,
            Action::Replace(d) | Action::Start(d) => &d.key,
        }
    }
}

/// The workers `plan` asks `node` to run.
pub fn desired_on(plan: &Plan, node: &str) -> Vec<DesiredWorker> {
    plan.assignments
        .iter()
        .filter(|a| a.node == node)
        .map(|a| {
            let variant = a.variant.clone().unwrap_or_default();
            DesiredWorker {
                key: WorkerKey {
                    task: a.task.clone(),
                    stage: a.stage.clone(),
                    variant: variant.name.clone(),
                    replica: a.replica,
                },
                variant,
                shape: WorkerShape {
                    millicores: a.millicores,
                    max_batch: a.max_batch,
                    max_delay_ms: a.max_delay_ms,
                    memory_bytes: a.memory_bytes,
                },
                weight: a.weight,
            }
        })
        .collect()
}

/// The actions that turn `running` into `desired`: stops first, then in-place changes, then
/// starts and replacements. A worker whose model file changed is replaced; one whose shape
/// changed is resized and rebatched in place, or replaced when the transition is blue-green.
pub fn diff(desired: &[DesiredWorker], running: &[RunningWorker], transition: Transition) -> Vec<Action> {
    let want: BTreeMap<&WorkerKey, &DesiredWorker> = desired.iter().map(|d| (&d.key, d)).collect();
    let have: BTreeMap<&WorkerKey, &RunningWorker> = running.iter().map(|r| (&r.key, r)).collect();
    let mut stops = Vec::new();
    let mut changes = Vec::new();
    let mut starts = Vec::new();
    for (&key, r) in &have {
        let Some(&d) = want.get(key) else {
            stops.push(Action::Stop(key.clone()));
            continue;
        };
        let reshaped = d.shape.reshaped(&r.shape);
        let other_model = d.variant.model_file != r.model_file || d.variant.model_sha256 != r.model_sha256;
        if other_model || (reshaped && transition == Transition::BlueGreen) {
            starts.push(Action::Replace(d.clone()));
            continue;
        }
        // Before the resize: a worker resized builds a session for its new thread count, and
        // reads its limit to know whether it may build it beside the running one.
        // Raised at once (a worker killed for want of memory restarts within the new limit);
        // never lowered under a running process, whose arenas may already hold more: it
        // starts within a lower figure when it is next started. A worker started before its
        // memory was planned (a task served before it was profiled) is limited at once: else
        // it would run unlimited for as long as it lives (the executor refuses a limit below
        // what the process already holds).
        let first = r.shape.memory_bytes == 0 && d.shape.memory_bytes > 0;
        if first || as_limit(d.shape.memory_bytes) > as_limit(r.shape.memory_bytes) {
            changes.push(Action::Limit { key: key.clone(), memory_bytes: d.shape.memory_bytes });
        }
        if d.shape.millicores != r.shape.millicores {
            changes.push(Action::Resize { key: key.clone(), millicores: d.shape.millicores });
        }
        if (d.shape.max_batch, d.shape.max_delay_ms) != (r.shape.max_batch, r.shape.max_delay_ms) {
            changes.push(Action::Rebatch {
                key: key.clone(),
                max_batch: d.shape.max_batch,
                max_delay_ms: d.shape.max_delay_ms,
            });
        }
    }
    for (key, d) in &want {
        if !have.contains_key(key) {
            starts.push(Action::Start((*d).clone()));
        }
    }
    stops.into_iter().chain(changes).chain(starts).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(variant: &str) -> WorkerKey {
        WorkerKey { task: "t".into(), stage: "t".into(), variant: variant.into(), replica: 0 }
    }

    fn desired(variant: &str, millicores: u32, batch: u32) -> DesiredWorker {
        DesiredWorker {
            key: key(variant),
            variant: VariantSpec {
                name: variant.into(),
                model_file: format!("{variant}.onnx"),
                accuracy: 70.0,
                input_shape: vec![3],
                tensor_names: Default::default(),
                tokenizer_file: String::new(),
                io: None,
                model_sha256: String::new(),
            },
            shape: WorkerShape { millicores, max_batch: batch, max_delay_ms: 5, memory_bytes: 0 },
            weight: 1.0,
        }
    }

    fn running(d: &DesiredWorker) -> RunningWorker {
        RunningWorker {
            key: d.key.clone(),
            model_file: d.variant.model_file.clone(),
            model_sha256: d.variant.model_sha256.clone(),
            shape: d.shape,
        }
    }

    #[test]
    fn reconciling_what_already_runs_does_nothing() {
        let want = vec![desired("a", 1000, 4), desired("b", 500, 1)];
        let have: Vec<_> = want.iter().map(running).collect();
        assert!(diff(&want, &have, Transition::InPlace).is_empty());
        assert!(diff(&want, &have, Transition::BlueGreen).is_empty());
    }

    #[test]
    fn resizes_and_rebatches_in_place_and_stops_before_starting() {
        let have = vec![running(&desired("a", 1000, 4)), running(&desired("old", 1000, 1))];
        let want = vec![desired("a", 2000, 8), desired("new", 500, 1)];
        let actions = diff(&want, &have, Transition::InPlace);
        assert_eq!(actions[0], Action::Stop(key("old")));
        assert!(actions.contains(&Action::Resize { key: key("a"), millicores: 2000 }));
        assert!(actions.contains(&Action::Rebatch { key: key("a"), max_batch: 8, max_delay_ms: 5 }));
        assert_eq!(actions.last(), Some(&Action::Start(desired("new", 500, 1))));
    }

    #[test]
    fn blue_green_replaces_a_worker_whose_shape_changes() {
        let have = vec![running(&desired("a", 1000, 4))];
        let actions = diff(&[desired("a", 2000, 4)], &have, Transition::BlueGreen);
        assert_eq!(actions, vec![Action::Replace(desired("a", 2000, 4))]);
    }

    #[test]
    fn a_new_model_file_replaces_the_worker() {
        let mut r = running(&desired("a", 1000, 4));
        r.model_file = "a-v1.onnx".into();
        let actions = diff(&[desired("a", 1000, 4)], &[r], Transition::InPlace);
        assert_eq!(actions, vec![Action::Replace(desired("a", 1000, 4))]);
        // The same name, another file (its digest as registered).
        let mut r = running(&desired("a", 1000, 4));
        r.model_sha256 = "0".repeat(64);
        let actions = diff(&[desired("a", 1000, 4)], &[r], Transition::InPlace);
        assert_eq!(actions, vec![Action::Replace(desired("a", 1000, 4))]);
    }

    #[test]
    fn memory_is_raised_or_first_limited_in_place_and_never_lowered() {
        let with_memory = |bytes: u64| {
            let mut d = desired("a", 1000, 4);
            d.shape.memory_bytes = bytes;
            d
        };
        let limit = |bytes: u64| vec![Action::Limit { key: key("a"), memory_bytes: bytes }];
        for transition in [Transition::InPlace, Transition::BlueGreen] {
            let diff_of = |want: u64, runs: u64| diff(&[with_memory(want)], &[running(&with_memory(runs))], transition);
            assert_eq!(diff_of(200, 100), limit(200), "raised");
            // Started before its task was profiled (no limit): limited once the plan says.
            assert_eq!(diff_of(300, 0), limit(300), "a first limit");
            assert_eq!(diff_of(100, 200), vec![], "never lowered under a running process");
            assert_eq!(diff_of(0, 200), limit(0), "no longer planned: no limit, which is higher");
            assert_eq!(diff_of(0, 0), vec![]);
        }
    }

    #[test]
    fn replicas_of_a_variant_are_separate_workers() {
        let mut second = desired("a", 1000, 4);
        second.key.replica = 1;
        let have = vec![running(&desired("a", 1000, 4))];
        let actions = diff(&[desired("a", 1000, 4), second.clone()], &have, Transition::InPlace);
        assert_eq!(actions, vec![Action::Start(second)]);
    }
}
