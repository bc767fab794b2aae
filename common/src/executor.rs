//! The executor contract: how a plan's actions are carried out, once for every executor.
//! The agent's executor works on processes and cgroups, the simulator's on simulated workers;
//! both go through [`execute`], so make before break is written once.
//!
//! Applying a plan is all or nothing: first everything is checked that can be checked without
//! touching a worker ([`stage`]: model files, per task), then everything that can fail is
//! prepared (cgroups for new workers), and only then is any worker started, resized or
//! retired. A plan whose preparation fails leaves the running set as it was. A task whose
//! model is missing is held at what runs, with the reason, and does not block the others.
//!
//! Make before break: a worker that leaves the plan, and a worker whose quota shrinks, wait
//! until every worker of their task that is starting serves, this plan's or an earlier one's
//! (a plan that comes while a task's new workers load does not shrink it early); a replaced
//! worker serves until its successor does.

use std::collections::{BTreeMap, BTreeSet};

use tidal_proto::v1::{Transition, VariantSpec};

use crate::reconcile::{diff, Action, DesiredWorker, RunningWorker, WorkerKey};

/// The actions to take, and the tasks held at what runs (with why).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Staged {
    pub actions: Vec<Action>,
    pub held: BTreeMap<String, String>,
}

/// The actions that move `running` to `desired`, without those of tasks that cannot move here
/// (`check_model` refuses a model of theirs: missing, or taking another input than declared):
/// those keep running as they are.
pub fn stage(
    desired: &[DesiredWorker],
    running: &[RunningWorker],
    transition: Transition,
    check_model: impl Fn(&VariantSpec) -> Result<(), String>,
) -> Staged {
    let mut held = BTreeMap::new();
    for d in desired {
        if held.contains_key(&d.key.task) {
            continue;
        }
        if let Err(why) = check_model(&d.variant) {
            held.insert(d.key.task.clone(), format!("variant {:?}: {why}", d.variant.name));
        }
    }
    let actions =
        diff(desired, running, transition).into_iter().filter(|a| !held.contains_key(&a.key().task)).collect();
    Staged { actions, held }
}

/// What applying a plan does to workers. `prepare` is the only step that may fail; it must
/// have no effect that `abandon` does not undo. A wait (`after`) is for every worker named to
/// serve; a newer plan cancels a resize still waiting (it decides the size itself) but not a
/// stop.
pub trait Executor {
    type Prepared;
    type Error;
    fn prepare(&mut self, worker: &DesiredWorker) -> Result<Self::Prepared, Self::Error>;
    fn abandon(&mut self, prepared: Self::Prepared);
    /// Starts a worker; if one runs under its key, it is replaced: it serves until this one
    /// does, then retires.
    fn start(&mut self, worker: DesiredWorker, prepared: Self::Prepared);
    /// New batcher settings, at once.
    fn rebatch(&mut self, key: &WorkerKey, max_batch: u32, max_delay_ms: u32);
    /// A higher memory limit (0: none), at once.
    fn limit_memory(&mut self, key: &WorkerKey, memory_bytes: u64);
    /// A new quota once every worker of `after` serves (at once when it is empty).
    fn resize(&mut self, key: &WorkerKey, millicores: u32, after: &[WorkerKey]);
    /// Retires a worker once every worker of `after` serves: it takes no new requests, drains
    /// its queue and stops.
    fn stop(&mut self, key: &WorkerKey, after: &[WorkerKey]);
    /// The quota a running worker has now.
    fn millicores(&self, key: &WorkerKey) -> Option<u32>;
    /// The workers of `task` started (by this plan or an earlier one) that do not serve yet.
    fn starting(&self, task: &str) -> Vec<WorkerKey>;
}

/// Carries out `actions`: prepares every new worker first and, if one preparation fails,
/// abandons the others and changes nothing. Then starts, rebatches, and resizes and stops,
/// make before break.
pub fn execute<E: Executor>(exec: &mut E, actions: Vec<Action>) -> Result<(), E::Error> {
    let mut prepared = Vec::new();
    for action in &actions {
        if let Action::Start(d) | Action::Replace(d) = action {
            match exec.prepare(d) {
                Ok(p) => prepared.push((d.clone(), p)),
                Err(e) => {
                    for (_, p) in prepared {
                        exec.abandon(p);
                    }
                    return Err(e);
                }
            }
        }
    }
    for (d, p) in prepared {
        exec.start(d, p);
    }
    // What each task's shrinks and stops wait for, read once all starts are under way.
    let tasks: BTreeSet<&str> = actions.iter().map(|a| a.key().task.as_str()).collect();
    let starting: BTreeMap<&str, Vec<WorkerKey>> = tasks.into_iter().map(|t| (t, exec.starting(t))).collect();
    for action in &actions {
        let after = starting.get(action.key().task.as_str()).map_or(&[][..], Vec::as_slice);
        match action {
            Action::Rebatch { key, max_batch, max_delay_ms } => exec.rebatch(key, *max_batch, *max_delay_ms),
            Action::Limit { key, memory_bytes } => exec.limit_memory(key, *memory_bytes),
            Action::Resize { key, millicores } => {
                let shrink = exec.millicores(key).is_some_and(|m| *millicores < m);
                exec.resize(key, *millicores, if shrink { after } else { &[] });
            }
            Action::Stop(key) => exec.stop(key, after),
            Action::Start(_) | Action::Replace(_) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::WorkerShape;
    use std::collections::HashMap;

    fn key(task: &str, variant: &str) -> WorkerKey {
        WorkerKey { task: task.into(), stage: task.into(), variant: variant.into(), replica: 0 }
    }

    fn desired(task: &str, variant: &str, millicores: u32) -> DesiredWorker {
        DesiredWorker {
            key: key(task, variant),
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
            shape: WorkerShape { millicores, max_batch: 1, max_delay_ms: 0, memory_bytes: 0 },
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

    /// Records what it is asked to do; refuses to prepare the variants in `fail`. Workers it
    /// starts do not serve until `loaded`.
    #[derive(Default)]
    struct Fake {
        fail: Vec<String>,
        quotas: HashMap<WorkerKey, u32>,
        loading: Vec<WorkerKey>,
        log: Vec<String>,
    }

    fn keys(after: &[WorkerKey]) -> String {
        if after.is_empty() {
            return String::new();
        }
        let names: Vec<String> = after.iter().map(ToString::to_string).collect();
        format!(" after {}", names.join(","))
    }

    impl Executor for Fake {
        type Prepared = String;
        type Error = String;
        fn prepare(&mut self, w: &DesiredWorker) -> Result<String, String> {
            if self.fail.contains(&w.key.variant) {
                return Err(format!("no cgroup for {}", w.key));
            }
            self.log.push(format!("prepare {}", w.key));
            Ok(w.key.to_string())
        }
        fn abandon(&mut self, p: String) {
            self.log.push(format!("abandon {p}"));
        }
        fn start(&mut self, w: DesiredWorker, _: String) {
            self.log.push(format!("start {} {}", w.key, w.shape.millicores));
            self.loading.push(w.key);
        }
        fn rebatch(&mut self, key: &WorkerKey, b: u32, _: u32) {
            self.log.push(format!("rebatch {key} {b}"));
        }
        fn limit_memory(&mut self, key: &WorkerKey, bytes: u64) {
            self.log.push(format!("limit {key} {bytes}"));
        }
        fn resize(&mut self, key: &WorkerKey, m: u32, after: &[WorkerKey]) {
            self.log.push(format!("resize {key} {m}{}", keys(after)));
        }
        fn stop(&mut self, key: &WorkerKey, after: &[WorkerKey]) {
            self.log.push(format!("stop {key}{}", keys(after)));
        }
        fn millicores(&self, key: &WorkerKey) -> Option<u32> {
            self.quotas.get(key).copied()
        }
        fn starting(&self, task: &str) -> Vec<WorkerKey> {
            self.loading.iter().filter(|k| k.task == task).cloned().collect()
        }
    }

    #[test]
    fn a_plan_whose_preparation_fails_changes_nothing() {
        let have = vec![running(&desired("t", "old", 1000))];
        let want = vec![desired("t", "a", 1000), desired("t", "b", 1000)];
        let staged = stage(&want, &have, Transition::InPlace, |_| Ok(()));
        let mut fake = Fake { fail: vec!["b".into()], ..Fake::default() };
        assert_eq!(execute(&mut fake, staged.actions), Err("no cgroup for t/b#0".into()));
        assert_eq!(fake.log, vec!["prepare t/a#0", "abandon t/a#0"], "nothing stopped, started or resized");
    }

    #[test]
    fn a_task_with_a_missing_model_is_held_and_the_others_move() {
        let have = vec![running(&desired("t", "a", 1000)), running(&desired("u", "c", 1000))];
        let want = vec![desired("t", "missing", 1000), desired("u", "c", 2000)];
        let staged = stage(&want, &have, Transition::InPlace, |v| {
            if v.model_file == "missing.onnx" {
                Err(format!("{} is not here", v.model_file))
            } else {
                Ok(())
            }
        });
        assert_eq!(staged.held.keys().collect::<Vec<_>>(), vec!["t"]);
        assert!(staged.held["t"].contains("missing.onnx"));
        let mut fake = Fake::default();
        execute(&mut fake, staged.actions).unwrap();
        assert_eq!(fake.log, vec!["resize u/c#0 2000"], "t/a keeps running");
    }

    #[test]
    fn starts_come_first_and_shrinks_and_stops_wait_for_them() {
        let have = vec![running(&desired("t", "a", 2000)), running(&desired("t", "old", 1000))];
        let want = vec![desired("t", "a", 1000), desired("t", "new", 1000)];
        let staged = stage(&want, &have, Transition::InPlace, |_| Ok(()));
        let mut fake = Fake { quotas: [(key("t", "a"), 2000)].into(), ..Fake::default() };
        execute(&mut fake, staged.actions).unwrap();
        assert_eq!(
            fake.log,
            vec![
                "prepare t/new#0",
                "start t/new#0 1000",
                "stop t/old#0 after t/new#0",
                "resize t/a#0 1000 after t/new#0"
            ]
        );
    }

    #[test]
    fn a_shrink_waits_for_its_own_tasks_starts_of_any_plan_and_no_others() {
        // t/new started by an earlier plan is still loading; u starts a worker in this one.
        let have = vec![running(&desired("t", "a", 2000)), running(&desired("u", "c", 2000))];
        let want = vec![desired("t", "a", 1000), desired("u", "c", 1000), desired("u", "d", 1000)];
        let staged = stage(&want, &have, Transition::InPlace, |_| Ok(()));
        let mut fake = Fake {
            quotas: [(key("t", "a"), 2000), (key("u", "c"), 2000)].into(),
            loading: vec![key("t", "new")],
            ..Fake::default()
        };
        execute(&mut fake, staged.actions).unwrap();
        assert_eq!(
            fake.log,
            vec![
                "prepare u/d#0",
                "start u/d#0 1000",
                "resize t/a#0 1000 after t/new#0",
                "resize u/c#0 1000 after u/d#0"
            ]
        );
    }

    #[test]
    fn a_shrink_with_nothing_starting_happens_at_once_and_blue_green_replaces() {
        let have = vec![running(&desired("t", "a", 2000))];
        let mut fake = Fake { quotas: [(key("t", "a"), 2000)].into(), ..Fake::default() };
        let staged = stage(&[desired("t", "a", 1000)], &have, Transition::InPlace, |_| Ok(()));
        execute(&mut fake, staged.actions).unwrap();
        assert_eq!(fake.log, vec!["resize t/a#0 1000"]);
        let mut fake = Fake::default();
        let staged = stage(&[desired("t", "a", 1000)], &have, Transition::BlueGreen, |_| Ok(()));
        execute(&mut fake, staged.actions).unwrap();
        assert_eq!(fake.log, vec!["prepare t/a#0", "start t/a#0 1000"]);
    }
}
