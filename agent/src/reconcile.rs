//! Reconciliation: the pure difference between the workers a plan wants on this node and the
//! workers running, as a list of actions. Applying the same plan twice yields no action.

use std::collections::BTreeMap;

use tidal_proto::v1::VariantSpec;

use crate::worker::BatchSettings;

/// One worker per (task, variant) on a node.
pub type WorkerKey = (String, String);

#[derive(Debug, Clone, PartialEq)]
pub struct DesiredWorker {
    pub task: String,
    pub variant: VariantSpec,
    pub millicores: u32,
    pub settings: BatchSettings,
}

impl DesiredWorker {
    pub fn key(&self) -> WorkerKey {
        (self.task.clone(), self.variant.name.clone())
    }
}

/// What is running, as the agent observes it.
#[derive(Debug, Clone, PartialEq)]
pub struct RunningWorker {
    pub key: WorkerKey,
    pub model_file: String,
    pub millicores: u32,
    pub settings: BatchSettings,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Stop(WorkerKey),
    Resize { key: WorkerKey, millicores: u32 },
    Rebatch { key: WorkerKey, settings: BatchSettings },
    Start(DesiredWorker),
}

/// The actions that turn `running` into `desired`: stops first (they free cores), then
/// in-place changes, then starts. A worker whose model file changed is stopped and started.
pub fn diff(desired: &[DesiredWorker], running: &[RunningWorker]) -> Vec<Action> {
    let want: BTreeMap<WorkerKey, &DesiredWorker> = desired.iter().map(|d| (d.key(), d)).collect();
    let have: BTreeMap<&WorkerKey, &RunningWorker> = running.iter().map(|r| (&r.key, r)).collect();
    let mut stops = Vec::new();
    let mut changes = Vec::new();
    let mut starts = Vec::new();
    for (key, r) in &have {
        match want.get(*key) {
            None => stops.push(Action::Stop((*key).clone())),
            Some(d) if d.variant.model_file != r.model_file => {
                stops.push(Action::Stop((*key).clone()));
                starts.push(Action::Start((*d).clone()));
            }
            Some(d) => {
                if d.millicores != r.millicores {
                    changes.push(Action::Resize { key: (*key).clone(), millicores: d.millicores });
                }
                if d.settings != r.settings {
                    changes.push(Action::Rebatch { key: (*key).clone(), settings: d.settings });
                }
            }
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
    use std::time::Duration;

    fn settings(b: u32) -> BatchSettings {
        BatchSettings { max_batch: b, max_delay: Duration::from_millis(5) }
    }

    fn desired(variant: &str, millicores: u32, batch: u32) -> DesiredWorker {
        DesiredWorker {
            task: "t".into(),
            variant: VariantSpec {
                name: variant.into(),
                model_file: format!("{variant}.onnx"),
                accuracy: 70.0,
                input_shape: vec![3],
            },
            millicores,
            settings: settings(batch),
        }
    }

    fn running(d: &DesiredWorker) -> RunningWorker {
        RunningWorker {
            key: d.key(),
            model_file: d.variant.model_file.clone(),
            millicores: d.millicores,
            settings: d.settings,
        }
    }

    #[test]
    fn reconciling_what_already_runs_does_nothing() {
        let want = vec![desired("a", 1000, 4), desired("b", 500, 1)];
        let have: Vec<_> = want.iter().map(running).collect();
        assert!(diff(&want, &have).is_empty());
    }

    #[test]
    fn resizes_and_rebatches_in_place_and_stops_before_starting() {
        let have = vec![running(&desired("a", 1000, 4)), running(&desired("old", 1000, 1))];
        let want = vec![desired("a", 2000, 8), desired("new", 500, 1)];
        let actions = diff(&want, &have);
        assert_eq!(actions[0], Action::Stop(("t".into(), "old".into())));
        assert!(actions.contains(&Action::Resize { key: ("t".into(), "a".into()), millicores: 2000 }));
        assert!(actions.contains(&Action::Rebatch { key: ("t".into(), "a".into()), settings: settings(8) }));
        assert_eq!(actions.last(), Some(&Action::Start(desired("new", 500, 1))));
    }

    #[test]
    fn a_new_model_file_restarts_the_worker() {
        let mut r = running(&desired("a", 1000, 4));
        r.model_file = "a-v1.onnx".into();
        let actions = diff(&[desired("a", 1000, 4)], &[r]);
        assert_eq!(actions.len(), 2);
        assert!(matches!(actions[0], Action::Stop(_)));
        assert!(matches!(actions[1], Action::Start(_)));
    }
}
