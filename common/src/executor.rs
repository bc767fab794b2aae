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
//!
//! Unless memory forbids it. A plan keeps within the node's memory, but make before break
//! holds a leaving worker beside its successor: on a node that declares its memory, a start
//! that does not fit beside what its workers hold waits until leaving workers have stopped
//! ([`order_for_memory`]), and the workers of its own task that leave stop at once (break
//! before make: they could not wait for a successor that waits for them).

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
    /// Starts a worker once every worker of `after_gone` (stopped by this plan) has drained
    /// and stopped, at once when it is empty; if one runs under its key, it is replaced: it
    /// serves until this one does, then retires.
    fn start(&mut self, worker: DesiredWorker, prepared: Self::Prepared, after_gone: &[WorkerKey]);
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
    /// The memory the node's workers may hold together, bytes (`None`: not declared).
    fn memory_budget(&self) -> Option<u64>;
    /// The memory the node's workers hold, each at what its plan gives it: those in the
    /// plan, loading or waiting to load, retiring and draining.
    fn memory_held(&self) -> u64;
    /// The memory the plan gives a running worker (0: not planned).
    fn memory_of(&self, key: &WorkerKey) -> u64;
    /// The workers earlier plans stopped that still hold memory (retiring or draining), with
    /// what they hold: a start may wait for them too.
    fn leaving(&self) -> Vec<(WorkerKey, u64)>;
}

/// Which starts wait for memory, and for which stops; which stops break before make.
#[derive(Debug, Default, PartialEq)]
struct MemoryOrder {
    /// The starts (by key) that wait, each for the workers of `gate` to stop.
    waiting: BTreeSet<WorkerKey>,
    gate: Vec<WorkerKey>,
    /// Stops that go at once, not after their task's starts.
    at_once: BTreeSet<WorkerKey>,
}

/// On a node that declares its memory: the starts that fit beside what its workers hold start
/// at once (those of tasks that also stop a worker first, so that a switch is made before it
/// breaks); the others wait until enough of this plan's leaving workers have stopped to make
/// their room. They wait first for the largest workers of other tasks (which leave make
/// before break, or at once), and only when those are not enough for the workers of their
/// own tasks, which then stop at once (break before make: they could not wait for a successor
/// that waits for them). A replacement (same key) is never held: its predecessor could not
/// stop before it.
fn order_for_memory<E: Executor>(exec: &E, actions: &[Action]) -> MemoryOrder {
    let Some(budget) = exec.memory_budget() else { return MemoryOrder::default() };
    let stops: Vec<&WorkerKey> =
        actions.iter().filter_map(|a| if let Action::Stop(k) = a { Some(k) } else { None }).collect();
    let stopping_task = |task: &str| stops.iter().any(|k| k.task == task);
    let mut starts: Vec<(&DesiredWorker, bool)> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Start(d) => Some((d, false)),
            Action::Replace(d) => Some((d, true)),
            _ => None,
        })
        .collect();
    starts.sort_by_key(|(d, _)| !stopping_task(&d.key.task));
    let mut free = budget.saturating_sub(exec.memory_held());
    let mut order = MemoryOrder::default();
    let mut wanted = 0u64;
    for (d, replace) in starts {
        let bytes = d.shape.memory_bytes;
        if replace || bytes <= free {
            free = free.saturating_sub(bytes);
        } else {
            wanted = wanted.saturating_add(bytes);
            order.waiting.insert(d.key.clone());
        }
    }
    if order.waiting.is_empty() {
        return order;
    }
    let waits = |task: &str| order.waiting.iter().any(|k| k.task == task);
    let (own, others): (Vec<&WorkerKey>, Vec<&WorkerKey>) = stops.into_iter().partition(|k| waits(&k.task));
    // Other tasks' workers leaving, this plan's and earlier plans' alike.
    let mut others: Vec<(u64, WorkerKey)> = others.into_iter().map(|k| (exec.memory_of(k), k.clone())).collect();
    others.extend(exec.leaving().into_iter().map(|(k, bytes)| (bytes, k)));
    others.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    let mut freed = 0u64;
    for (bytes, k) in others {
        if free.saturating_add(freed) >= wanted {
            return order;
        }
        freed = freed.saturating_add(bytes);
        order.gate.push(k);
    }
    if free.saturating_add(freed) < wanted {
        order.at_once = own.into_iter().cloned().collect();
        order.gate.extend(order.at_once.iter().cloned());
    }
    order
}

/// Carries out `actions`: prepares every new worker first and, if one preparation fails,
/// abandons the others and changes nothing. Then starts, rebatches, and resizes and stops,
/// make before break, unless the node's memory forbids it ([`order_for_memory`]).
pub fn execute<E: Executor>(exec: &mut E, actions: Vec<Action>) -> Result<(), E::Error> {
    let memory = order_for_memory(exec, &actions);
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
    let (waiting, now): (Vec<_>, Vec<_>) = prepared.into_iter().partition(|(d, _)| memory.waiting.contains(&d.key));
    for (d, p) in now {
        exec.start(d, p, &[]);
    }
    // The stops that make room come before the starts that wait for them; each other stop
    // waits for its task's starts, those that wait for room included.
    for key in &memory.at_once {
        exec.stop(key, &[]);
    }
    let (own, others): (Vec<&WorkerKey>, Vec<&WorkerKey>) = actions
        .iter()
        .filter_map(|a| match a {
            Action::Stop(k) if !memory.at_once.contains(k) => Some(k),
            _ => None,
        })
        .partition(|k| memory.waiting.iter().any(|w| w.task == k.task));
    for key in others {
        exec.stop(key, &exec.starting(&key.task));
    }
    for (d, p) in waiting {
        exec.start(d, p, &memory.gate);
    }
    for key in own {
        exec.stop(key, &exec.starting(&key.task));
    }
    // What each task's shrinks wait for, read once all starts are under way.
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
            Action::Stop(_) | Action::Start(_) | Action::Replace(_) => {}
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
        /// The node's memory, what its workers hold and what each running one was given.
        budget: Option<u64>,
        held: u64,
        memory: HashMap<WorkerKey, u64>,
        /// Workers earlier plans stopped, still holding memory.
        leaving: Vec<(WorkerKey, u64)>,
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
        fn start(&mut self, w: DesiredWorker, _: String, after_gone: &[WorkerKey]) {
            let gate = if after_gone.is_empty() { String::new() } else { format!(" once gone{}", keys(after_gone)) };
            self.log.push(format!("start {} {}{gate}", w.key, w.shape.millicores));
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
        fn memory_budget(&self) -> Option<u64> {
            self.budget
        }
        fn memory_held(&self) -> u64 {
            self.held
        }
        fn memory_of(&self, key: &WorkerKey) -> u64 {
            self.memory.get(key).copied().unwrap_or(0)
        }
        fn leaving(&self) -> Vec<(WorkerKey, u64)> {
            self.leaving.clone()
        }
    }

    fn with_memory(mut d: DesiredWorker, bytes: u64) -> DesiredWorker {
        d.shape.memory_bytes = bytes;
        d
    }

    #[test]
    fn a_switch_that_fits_beside_what_runs_is_made_before_it_breaks() {
        let have = vec![running(&with_memory(desired("t", "big", 1000), 4))];
        let want = vec![with_memory(desired("t", "small", 1000), 2)];
        let staged = stage(&want, &have, Transition::InPlace, |_| Ok(()));
        // 4 held, 6 declared: the successor fits beside its predecessor.
        let memory = [(key("t", "big"), 4)].into();
        let mut fake = Fake { budget: Some(6), held: 4, memory, ..Fake::default() };
        execute(&mut fake, staged.actions).unwrap();
        assert_eq!(fake.log, vec!["prepare t/small#0", "start t/small#0 1000", "stop t/big#0 after t/small#0"]);
    }

    #[test]
    fn short_of_memory_a_switch_breaks_before_it_makes_and_a_woken_task_waits_for_the_room() {
        // t switches big (4) -> small (2); u wakes with 3; w keeps 1 and loses a replica of 1.
        let have = vec![
            running(&with_memory(desired("t", "big", 1000), 4)),
            running(&with_memory(desired("w", "a", 1000), 1)),
            running(&with_memory(desired("w", "b", 1000), 1)),
        ];
        let want = vec![
            with_memory(desired("t", "small", 1000), 2),
            with_memory(desired("u", "c", 1000), 3),
            with_memory(desired("w", "a", 1000), 1),
        ];
        let staged = stage(&want, &have, Transition::InPlace, |_| Ok(()));
        let memory: HashMap<WorkerKey, u64> = [(key("t", "big"), 4), (key("w", "a"), 1), (key("w", "b"), 1)].into();
        // 6 declared, all held: the plan (6) fits, the transition (t's switch beside u's start) not.
        let mut fake = Fake { budget: Some(6), held: 6, memory: memory.clone(), ..Fake::default() };
        execute(&mut fake, staged.actions.clone()).unwrap();
        assert_eq!(
            fake.log,
            vec![
                "prepare t/small#0",
                "prepare u/c#0",
                "stop t/big#0",
                "stop w/b#0",
                "start t/small#0 1000 once gone after w/b#0,t/big#0",
                "start u/c#0 1000 once gone after w/b#0,t/big#0",
            ],
            "w's leaving worker is not room enough: t's own stops at once"
        );
        // With 2 free, t's successor is made before its predecessor breaks, and u waits for
        // the room the predecessor leaves.
        let mut fake = Fake { budget: Some(8), held: 6, memory, ..Fake::default() };
        execute(&mut fake, staged.actions).unwrap();
        assert_eq!(
            fake.log,
            vec![
                "prepare t/small#0",
                "prepare u/c#0",
                "start t/small#0 1000",
                "stop t/big#0 after t/small#0",
                "stop w/b#0",
                "start u/c#0 1000 once gone after t/big#0",
            ]
        );
    }

    #[test]
    fn a_switch_waits_for_other_tasks_leaving_workers_before_it_breaks() {
        // t switches big (4) -> small (2); w drops b (3); 7 declared, 7 held.
        let have = vec![
            running(&with_memory(desired("t", "big", 1000), 4)),
            running(&with_memory(desired("w", "b", 1000), 3)),
        ];
        let want = vec![with_memory(desired("t", "small", 1000), 2)];
        let staged = stage(&want, &have, Transition::InPlace, |_| Ok(()));
        let memory = [(key("t", "big"), 4), (key("w", "b"), 3)].into();
        let mut fake = Fake { budget: Some(7), held: 7, memory, ..Fake::default() };
        execute(&mut fake, staged.actions).unwrap();
        assert_eq!(
            fake.log,
            vec![
                "prepare t/small#0",
                "stop w/b#0",
                "start t/small#0 1000 once gone after w/b#0",
                "stop t/big#0 after t/small#0"
            ],
            "t keeps serving on big until small, which loads in the room b leaves"
        );
    }

    #[test]
    fn a_start_waits_for_workers_an_earlier_plan_stopped() {
        // u wakes with 3 on a full node of 6, where t's old worker (4) still drains from the
        // last plan: u waits for it, and nothing of this plan breaks.
        let want = vec![with_memory(desired("u", "c", 1000), 3)];
        let staged = stage(&want, &[], Transition::InPlace, |_| Ok(()));
        let mut fake = Fake { budget: Some(6), held: 6, leaving: vec![(key("t", "old"), 4)], ..Fake::default() };
        execute(&mut fake, staged.actions).unwrap();
        assert_eq!(fake.log, vec!["prepare u/c#0", "start u/c#0 1000 once gone after t/old#0"]);
    }

    #[test]
    fn with_no_memory_declared_nothing_waits_for_it() {
        let have = vec![running(&with_memory(desired("t", "big", 1000), 4))];
        let want = vec![with_memory(desired("t", "small", 1000), 2), with_memory(desired("u", "c", 1000), 3)];
        let staged = stage(&want, &have, Transition::InPlace, |_| Ok(()));
        let mut fake = Fake { held: 4, memory: [(key("t", "big"), 4)].into(), ..Fake::default() };
        execute(&mut fake, staged.actions).unwrap();
        assert_eq!(
            fake.log,
            vec![
                "prepare t/small#0",
                "prepare u/c#0",
                "start t/small#0 1000",
                "start u/c#0 1000",
                "stop t/big#0 after t/small#0",
            ]
        );
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
