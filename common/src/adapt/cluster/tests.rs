//! Several tasks on one cluster, through the adaptation round as the controller runs it.

use std::collections::BTreeMap;

use proptest::prelude::*;
use tidal_proto::v1::{Plan, ProfilePoint, TaskShare, TaskSpec};

use crate::adapt::{
    AdaptConfig, Adapter, NodeInput, RoundInput, Serving, ShareRule, TaskInput, TaskPlans, WorkerLimit,
};

static NOTHING_SERVES: Serving = Serving::new();

use crate::adapt::tests::{points_up_to as points, variant};

/// Tasks as the issue tried them: each with a 70 % variant at 100 req/s per core and a 78 %
/// variant at 20 req/s per core (80 and 16 planned, at the default utilisation of 0.8).
struct Cluster {
    tasks: Vec<(TaskSpec, Vec<f64>)>,
    nodes: Vec<(String, u32)>,
    /// Per node, the memory it declares (0: none).
    memory: Vec<u64>,
    /// Per task, seconds since its last request.
    idle: Vec<f64>,
    small: Vec<ProfilePoint>,
    big: Vec<ProfilePoint>,
}

impl Cluster {
    fn new(rates: &[f64], nodes: &[u32]) -> Self {
        let max = nodes.iter().copied().max().unwrap_or(1);
        Self {
            tasks: rates
                .iter()
                .enumerate()
                .map(|(i, &r)| {
                    let name = ["a", "b", "c", "d"][i];
                    let spec = crate::task::single_stage(
                        name,
                        500,
                        vec![variant(&format!("{name}-small"), 70.0), variant(&format!("{name}-big"), 78.0)],
                    );
                    (spec, vec![r])
                })
                .collect(),
            nodes: nodes.iter().enumerate().map(|(i, &c)| (format!("n{}", i + 1), c)).collect(),
            memory: vec![0; nodes.len()],
            idle: vec![0.0; rates.len()],
            small: points(100.0, max),
            big: points(20.0, max),
        }
    }

    /// Every node declares `node` bytes; the variants' workers measured `small` and `big`.
    fn memory(mut self, node: u64, small: u64, big: u64) -> Self {
        self.memory = vec![node; self.nodes.len()];
        self.small.iter_mut().for_each(|p| p.resident_bytes = small);
        self.big.iter_mut().for_each(|p| p.resident_bytes = big);
        self
    }

    fn share(mut self, task: usize, weight: f64, min_cores: u32, max_cores: u32) -> Self {
        self.tasks[task].0.share = Some(TaskShare { weight: Some(weight), min_cores, max_cores, ..Default::default() });
        self
    }

    /// Task `task` may be unloaded after `idle_s` without a request (`min_workers` 0), and had
    /// none for `since_s`.
    fn unloads(mut self, task: usize, idle_s: u32, since_s: f64) -> Self {
        self.tasks[task].0.share = Some(TaskShare { min_workers: Some(0), idle_s, ..Default::default() });
        self.idle[task] = since_s;
        self
    }

    fn input(&self) -> RoundInput<'_> {
        RoundInput {
            tasks: self
                .tasks
                .iter()
                .zip(&self.idle)
                .map(|((spec, arrivals), &idle_s)| {
                    let mut profiles = BTreeMap::new();
                    for v in &spec.stages[0].variants {
                        let points = if v.name.ends_with("small") { &self.small } else { &self.big };
                        profiles.insert(v.name.as_str(), points.as_slice());
                    }
                    TaskInput {
                        spec,
                        arrivals,
                        min_budget_ms: None,
                        profiles,
                        profile_indices: BTreeMap::new(),
                        load_s: BTreeMap::new(),
                        sizes: BTreeMap::new(),
                        served: BTreeMap::new(),
                        idle_s,
                    }
                })
                .collect(),
            nodes: self
                .nodes
                .iter()
                .zip(&self.memory)
                .map(|((n, c), &memory_bytes)| NodeInput { name: n, address: "127.0.0.1:1", cores: *c, memory_bytes })
                .collect(),
            current: None,
            serving: &NOTHING_SERVES,
        }
    }
}

fn config(share: ShareRule) -> AdaptConfig {
    AdaptConfig { lookback_s: 1, headroom: 1.0, share, ..AdaptConfig::default() }
}

fn round(c: &Cluster, share: ShareRule) -> Plan {
    Adapter::new(config(share)).round(&c.input()).plan
}

/// What a task's workers carry (planned capacity) and the cores they hold.
fn carried(plan: &Plan, task: &str) -> (f64, u32) {
    let workers = plan.assignments.iter().filter(|a| a.task == task);
    workers.fold((0.0, 0), |(rps, cores), a| {
        let per_core = if a.variant.as_ref().unwrap().name.ends_with("small") { 80.0 } else { 16.0 };
        (rps + per_core * a.millicores as f64 / 1000.0, cores + a.millicores / 1000)
    })
}

/// Every node's workers within its cores and the memory it declared.
fn fits(plan: &Plan, c: &Cluster) {
    for ((node, cores), &memory_bytes) in c.nodes.iter().zip(&c.memory) {
        let capacity = crate::plan::Capacity { millicores: cores * 1000, memory_bytes };
        assert_eq!(crate::plan::validate_for_node(plan, node, capacity), Ok(()), "{:?}", plan.notes);
    }
}

#[test]
fn memory_binds_before_cores_and_the_plan_keeps_within_every_node_s() {
    const GIB: u64 = 1 << 30;
    // Three tasks of 20 req/s on two nodes of 8 cores: the cores hold each task's accurate
    // variant (2 cores each), but its workers measured 3 GiB (3.75 planned) and a node offers 5.
    let c = Cluster::new(&[20.0, 20.0, 20.0], &[8, 8]).memory(5 * GIB, GIB, 3 * GIB);
    let plan = round(&c, ShareRule::Weighted);
    fits(&plan, &c);
    let memory_on =
        |node: &str| plan.assignments.iter().filter(|a| a.node == node).map(|a| a.memory_bytes).sum::<u64>();
    assert!(memory_on("n1") <= 5 * GIB && memory_on("n2") <= 5 * GIB, "{:?}", plan.assignments);
    for task in ["a", "b", "c"] {
        let (rps, _) = carried(&plan, task);
        assert!(rps >= 20.0, "task {task} carries {rps} req/s: {:?}", plan.notes);
    }
    let big: Vec<_> = plan.assignments.iter().filter(|a| a.variant.as_ref().unwrap().name.ends_with("big")).collect();
    assert!(
        big.iter().all(|a| a.memory_bytes == 3 * GIB + 3 * GIB / 4),
        "planned at the measured peak × 1.25: {big:?}"
    );
    let nodes: std::collections::BTreeSet<&str> = big.iter().map(|a| a.node.as_str()).collect();
    assert_eq!(nodes.len(), 2, "the accurate workers are spread over both nodes: {:?}", plan.assignments);
    assert!(plan.notes.iter().any(|n| n.contains("GiB")), "a note says memory was short: {:?}", plan.notes);
    // Undeclared memory: the same cluster plans every task on its accurate variant.
    let unbounded = Cluster::new(&[20.0, 20.0, 20.0], &[8, 8]).memory(0, GIB, 3 * GIB);
    let plan = round(&unbounded, ShareRule::Weighted);
    // (Standbys of the cheapest variant, weight 0, aside.)
    let serving = |t: &'static str| plan.assignments.iter().filter(move |a| a.task == t && a.weight > 0.0);
    let accurate = |t: &'static str| serving(t).all(|a| a.variant.as_ref().unwrap().name.ends_with("big"));
    assert!(["a", "b", "c"].into_iter().all(accurate), "{:?}", plan.assignments);
}

#[test]
fn a_task_that_may_go_without_a_worker_is_unloaded_once_idle_for_its_idle_time() {
    let workers = |plan: &Plan, task: &str| plan.assignments.iter().filter(|a| a.task == task).count();
    // No request for 61 s, of an idle time of 60: unloaded; the others keep theirs.
    let c = Cluster::new(&[0.0, 0.0, 5.0], &[8]).unloads(0, 60, 61.0);
    let plan = round(&c, ShareRule::Weighted);
    assert_eq!(workers(&plan, "a"), 0, "{:?}", plan.assignments);
    assert!(plan.notes.iter().any(|n| n.starts_with("a: unloaded: no request for 61 s")), "{:?}", plan.notes);
    assert!(workers(&plan, "b") >= 1 && workers(&plan, "c") >= 1, "{:?}", plan.assignments);
    // Within its idle time it keeps a worker, as a task that keeps one (the default) always does.
    let plan = round(&Cluster::new(&[0.0, 0.0, 5.0], &[8]).unloads(0, 60, 59.0), ShareRule::Weighted);
    assert!(workers(&plan, "a") >= 1, "{:?}", plan.notes);
    let mut c = Cluster::new(&[0.0, 0.0, 5.0], &[8]);
    c.idle[1] = 1e6;
    assert!(workers(&round(&c, ShareRule::Weighted), "b") >= 1);
    // Asked for again (a request waits: idle 0): planned at once, without a forecast of load.
    let plan = round(&Cluster::new(&[0.0, 0.0, 5.0], &[8]).unloads(0, 60, 0.0), ShareRule::Weighted);
    assert!(workers(&plan, "a") >= 1, "{:?}", plan.notes);
}

#[test]
fn short_of_memory_the_least_recently_used_idle_task_is_unloaded_first() {
    const GIB: u64 = 1 << 30;
    // Four quiet tasks on one node of 8 cores and 3 GiB: a worker takes 1.25 GiB planned (1
    // GiB measured; the accurate variant's 3 GiB, 3.75 planned, fits nowhere), so two fit.
    // `a` and `b` keep a worker whatever; `c` and `d` may be unloaded and are idle, `d` for
    // longest. Unloaded only for a task that would otherwise go without.
    let c = Cluster::new(&[5.0, 5.0, 5.0, 5.0], &[8])
        .memory(3 * GIB, GIB, 3 * GIB)
        .unloads(2, 600, 100.0)
        .unloads(3, 600, 500.0);
    let plan = round(&c, ShareRule::Weighted);
    fits(&plan, &c);
    let workers = |task: &str| plan.assignments.iter().filter(|a| a.task == task && a.weight > 0.0).count();
    assert_eq!([workers("a"), workers("b"), workers("c"), workers("d")], [1, 1, 0, 0], "{:?}", plan.notes);
    assert!(
        plan.notes.iter().any(|n| n.starts_with("d: unloaded to free memory") && n.contains("no request for 500 s")),
        "{:?}",
        plan.notes
    );
    // Room for three (4 GiB; the accurate variant's 5 fits nowhere): only the least recently
    // used goes.
    let c = Cluster::new(&[5.0, 5.0, 5.0, 5.0], &[8])
        .memory(4 * GIB, GIB, 5 * GIB)
        .unloads(2, 600, 100.0)
        .unloads(3, 600, 500.0);
    let plan = round(&c, ShareRule::Weighted);
    fits(&plan, &c);
    let workers = |task: &str| plan.assignments.iter().filter(|a| a.task == task && a.weight > 0.0).count();
    assert_eq!([workers("a"), workers("b"), workers("c"), workers("d")], [1, 1, 1, 0], "{:?}", plan.notes);
    // A task asked for within the last round is not idle: it is never unloaded for memory.
    let c = Cluster::new(&[5.0, 5.0, 5.0, 5.0], &[8])
        .memory(3 * GIB, GIB, 3 * GIB)
        .unloads(2, 600, 1.0)
        .unloads(3, 600, 2.0);
    let plan = round(&c, ShareRule::Weighted);
    fits(&plan, &c);
    assert!(!plan.notes.iter().any(|n| n.contains("unloaded")), "{:?}", plan.notes);
}

#[test]
fn short_of_memory_the_largest_workers_shrink_before_any_task_goes_without() {
    const GIB: u64 = 1 << 30;
    // Four tasks of 5 req/s on one node of 8 cores and 6 GiB: each would take its accurate
    // variant (2 GiB measured, 2.5 planned), but four of those need 10 GiB. Before a task goes
    // without (none may be unloaded), the others give up their accurate workers: all four run
    // the small variant (1.25 GiB planned each).
    let c = Cluster::new(&[5.0, 5.0, 5.0, 5.0], &[8]).memory(6 * GIB, GIB, 2 * GIB);
    let plan = round(&c, ShareRule::Weighted);
    fits(&plan, &c);
    for task in ["a", "b", "c", "d"] {
        let (rps, _) = carried(&plan, task);
        assert!(rps >= 5.0, "task {task} carries {rps} req/s: {:?}", plan.notes);
    }
    assert!(plan.notes.iter().any(|n| n.contains("to leave memory for")), "{:?}", plan.notes);
    // A task of weight 4 keeps its accurate worker longest: with room for one (7 GiB: 2.5 +
    // 3 × 1.25 = 6.25), it is that one.
    let c = Cluster::new(&[5.0, 5.0, 5.0, 5.0], &[8]).memory(7 * GIB, GIB, 2 * GIB).share(2, 4.0, 0, 0);
    let plan = round(&c, ShareRule::Weighted);
    fits(&plan, &c);
    let accurate: Vec<&str> = plan
        .assignments
        .iter()
        .filter(|a| a.weight > 0.0 && a.variant.as_ref().unwrap().name.ends_with("big"))
        .map(|a| a.task.as_str())
        .collect();
    assert_eq!(accurate, ["c"], "{:?}", plan.notes);
    for task in ["a", "b", "c", "d"] {
        assert!(carried(&plan, task).0 >= 5.0, "task {task}: {:?}", plan.notes);
    }
}

#[test]
fn shrinking_that_cannot_make_the_room_is_undone() {
    const GIB: u64 = 1 << 30;
    // One node of 3 GiB: two accurate workers (1.2 GiB measured, 1.5 planned) fill it. A third
    // task's smallest worker (1.25 GiB planned) would not fit even if both shrank (0.5 GiB
    // freed): it goes without, and the others keep their accurate workers.
    let c = Cluster::new(&[5.0, 5.0, 5.0], &[8]).memory(3 * GIB, GIB, GIB * 6 / 5);
    let plan = round(&c, ShareRule::Weighted);
    fits(&plan, &c);
    let serving = |task: &str| {
        plan.assignments
            .iter()
            .filter(|a| a.task == task && a.weight > 0.0)
            .map(|a| a.variant.as_ref().unwrap().name.clone())
            .collect::<Vec<_>>()
    };
    let without: Vec<&str> = ["a", "b", "c"].into_iter().filter(|t| serving(t).is_empty()).collect();
    assert_eq!(without.len(), 1, "{:?}", plan.notes);
    for task in ["a", "b", "c"].into_iter().filter(|t| !without.contains(t)) {
        assert_eq!(serving(task), [format!("{task}-big")], "{:?}", plan.notes);
    }
    // Their notes say nothing of shrinks that were undone.
    let kept_notes = |t: &&str| !plan.notes.iter().any(|n| n.starts_with(&format!("{t}: planned again")));
    assert!(["a", "b", "c"].iter().filter(|t| !without.contains(t)).all(kept_notes), "{:?}", plan.notes);
}

#[test]
fn a_busy_task_leaves_a_quiet_one_the_core_it_needs() {
    // The first two cases on two nodes of 2 cores: 300 and 60 req/s need 3.75 and 0.75
    // cores, more than 4 in all; the quiet task's whole load is carried on one core.
    for (rates, quiet, busy) in [([300.0, 60.0], "b", "a"), ([60.0, 300.0], "a", "b")] {
        let c = Cluster::new(&rates, &[2, 2]);
        let plan = round(&c, ShareRule::Weighted);
        fits(&plan, &c);
        assert_eq!(carried(&plan, quiet), (80.0, 1), "{quiet}: {:?}", plan.notes);
        assert_eq!(carried(&plan, busy), (240.0, 3), "{busy}: {:?}", plan.notes);
        assert!(
            plan.notes.iter().any(|n| n.starts_with(&format!("{busy}: SHORTAGE: 3 of the 4 cores"))),
            "{:?}",
            plan.notes
        );
    }
}

#[test]
fn equal_tasks_beyond_the_cluster_share_it_about_equally() {
    let c = Cluster::new(&[390.0, 390.0], &[2, 2]);
    for rule in [ShareRule::Weighted, ShareRule::MaxMin] {
        let plan = round(&c, rule);
        fits(&plan, &c);
        assert_eq!(carried(&plan, "a"), (160.0, 2), "{rule}: {:?}", plan.notes);
        assert_eq!(carried(&plan, "b"), (160.0, 2), "{rule}: {:?}", plan.notes);
    }
}

#[test]
fn where_the_cores_suffice_each_task_carries_its_load_and_the_weights_choose_the_accuracy() {
    // 30 req/s each: the small variant carries either on one core; big needs 2 cores (32 req/s)
    // each, 4 in all, which fits, so both run it.
    let c = Cluster::new(&[30.0, 30.0], &[4]);
    let plan = round(&c, ShareRule::Weighted);
    assert!(plan.assignments.iter().all(|a| a.variant.as_ref().unwrap().name.ends_with("big")), "{:?}", plan.notes);
    // 60 req/s each: big for both would take 8 cores. Only one can have it; the heavier.
    for heavy in [0, 1] {
        let c = Cluster::new(&[60.0, 60.0], &[4]).share(heavy, 3.0, 0, 0);
        let plan = round(&c, ShareRule::Weighted);
        fits(&plan, &c);
        let (heavy, light) = (["a", "b"][heavy], ["a", "b"][1 - heavy]);
        assert!(carried(&plan, heavy).0 >= 60.0 && carried(&plan, light).0 >= 60.0, "{:?}", plan.notes);
        assert!(carried(&plan, heavy).1 > carried(&plan, light).1, "{:?}", plan.notes);
        assert!(!plan.notes.iter().any(|n| n.contains("SHORTAGE")), "{:?}", plan.notes);
    }
}

#[test]
fn minimums_and_maximums_hold() {
    // A heavy task would take nearly everything; the light one is guaranteed 2 cores.
    let c = Cluster::new(&[390.0, 390.0], &[2, 2]).share(0, 10.0, 0, 0).share(1, 1.0, 2, 0);
    let plan = round(&c, ShareRule::Weighted);
    assert_eq!(carried(&plan, "b").1, 2, "{:?}", plan.notes);
    // A maximum caps a task with the cluster to itself.
    let c = Cluster::new(&[390.0, 10.0], &[2, 2]).share(0, 1.0, 0, 1);
    let plan = round(&c, ShareRule::Weighted);
    assert_eq!(carried(&plan, "a").1, 1, "{:?}", plan.notes);
    assert!(carried(&plan, "b").0 >= 10.0);
}

#[test]
fn weight_zero_is_best_effort_and_no_weighted_task_goes_without() {
    let c = Cluster::new(&[390.0, 390.0], &[2, 2]).share(0, 0.0, 0, 0);
    let plan = round(&c, ShareRule::Weighted);
    assert_eq!(carried(&plan, "b").1, 4, "{:?}", plan.notes);
    assert_eq!(carried(&plan, "a").1, 0, "{:?}", plan.notes);
    assert!(plan.notes.iter().any(|n| n.starts_with("a: no cores are left for it")), "{:?}", plan.notes);
    // Four weighted tasks, very unequal, on four cores: each gets one.
    let c = Cluster::new(&[390.0, 390.0, 390.0, 390.0], &[2, 2]).share(0, 100.0, 0, 0);
    let plan = round(&c, ShareRule::Weighted);
    for t in ["a", "b", "c", "d"] {
        assert_eq!(carried(&plan, t).1, 1, "{t}: {:?}", plan.notes);
    }
}

#[test]
fn workers_too_large_for_any_node_are_planned_again_smaller() {
    // Two nodes of one core, profiles up to two: the best plan for 30 req/s is "big" on two
    // cores (32 req/s), which no node holds. The task is planned again with 1-core workers.
    let mut c = Cluster::new(&[30.0], &[1, 1]);
    (c.small, c.big) = (points(100.0, 2), points(20.0, 2));
    let plan = round(&c, ShareRule::Weighted);
    fits(&plan, &c);
    assert_eq!(plan.assignments.len(), 2, "{:?}", plan.notes);
    assert!(carried(&plan, "a").0 >= 30.0, "{:?}", plan.notes);
    assert!(plan.notes.iter().any(|n| n.contains("planned again with workers of at most 1 cores")), "{:?}", plan.notes);
}

#[test]
fn workers_moved_to_another_node_are_counted() {
    let c = Cluster::new(&[60.0, 10.0], &[2, 2]);
    let mut adapter = Adapter::new(config(ShareRule::Weighted));
    let first = adapter.round(&c.input()).plan;
    let again = {
        let mut input = c.input();
        input.current = Some(&first);
        adapter.round(&input)
    };
    assert_eq!(again.moved, 0, "{:?}", again.plan.notes);
    // One node gone: what ran there moves to the other.
    let on_n2 = first.assignments.iter().filter(|a| a.node == "n2").count() as u32;
    assert!(on_n2 > 0, "{:?}", first.assignments);
    let mut smaller = Cluster::new(&[60.0, 10.0], &[2, 2]);
    smaller.nodes.truncate(1);
    let mut input = smaller.input();
    input.current = Some(&first);
    let round = adapter.round(&input);
    assert_eq!(round.moved, on_n2, "{:?}", round.plan.notes);
    assert!(round.plan.notes.iter().any(|n| n.ends_with("workers moved to another node")), "{:?}", round.plan.notes);
}

/// One task alone is planned as the task is planned by itself within the cluster's cores.
#[test]
fn one_task_alone_is_planned_as_before() {
    for rate in [10.0, 60.0, 200.0, 1000.0] {
        let c = Cluster::new(&[rate], &[4]);
        let cfg = config(ShareRule::Weighted);
        let input = c.input();
        let mut alone = TaskPlans::new(&cfg, &input.tasks[0], None, rate, 4, &Default::default());
        let expected = alone.within(4, WorkerLimit::ANY).unwrap().choice.workers.clone();
        let plan = round(&c, ShareRule::Weighted);
        // Standbys (weight 0, on cores no task was planned on) aside.
        let planned = plan.assignments.iter().filter(|a| a.weight > 0.0);
        let got: Vec<_> = planned.map(|a| (a.variant.clone(), a.millicores, a.max_batch)).collect();
        let want: Vec<_> = expected.iter().map(|a| (a.variant.clone(), a.millicores, a.max_batch)).collect();
        assert_eq!(got, want, "{rate} req/s");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Where the cores suffice, the round's division is worth as much as the best of every
    /// division of the cores among up to four tasks (each solved at its budget).
    #[test]
    fn where_the_cores_suffice_the_division_matches_brute_force(
        rates in prop::collection::vec(1.0f64..75.0, 2..=4),
        weights in prop::collection::vec(0.0f64..3.0, 4),
        cores in 4u32..=8,
    ) {
        let mut c = Cluster::new(&rates, &[cores]);
        for (i, w) in weights.iter().enumerate().take(rates.len()) {
            c = c.share(i, *w, 0, 0);
        }
        let cfg = config(ShareRule::Weighted);
        let input = c.input();
        let mut plans: Vec<TaskPlans> =
            input.tasks.iter().zip(&rates).map(|(t, &r)| TaskPlans::new(&cfg, t, None, r, cores, &Default::default())).collect();
        // value[i][b]: task i's value within b cores, if that carries its load.
        let value: Vec<Vec<Option<f64>>> = plans
            .iter_mut()
            .map(|p| (0..=cores).map(|b| p.within(b, WorkerLimit::ANY).ok().filter(|s| !s.choice.overloaded).map(|s| s.value)).collect())
            .collect();
        let mut best: Option<f64> = None;
        let n = rates.len();
        let mut budget = vec![0u32; n];
        loop {
            if budget.iter().sum::<u32>() <= cores {
                let total: Option<f64> = (0..n).map(|i| value[i][budget[i] as usize].map(|v| weights[i] * v)).sum();
                if let Some(t) = total {
                    best = Some(best.map_or(t, |b: f64| b.max(t)));
                }
            }
            let Some(i) = (0..n).find(|&i| budget[i] < cores) else { break };
            budget[i] += 1;
            for b in &mut budget[..i] {
                *b = 0;
            }
        }
        // Up to 75 req/s each, one core of "small" carries any of them: a division exists.
        let best = best.expect("a division that carries every load");
        let plan = Adapter::new(cfg.clone()).round(&input).plan;
        let mut got = 0.0;
        let mut used = 0;
        for (i, p) in plans.iter_mut().enumerate() {
            let held = carried(&plan, p.name()).1;
            used += held;
            let v = p.within(held, WorkerLimit::ANY).ok().filter(|s| !s.choice.overloaded).map(|s| s.value);
            prop_assert!(v.is_some(), "{} does not carry its load on {held} cores: {:?}", p.name(), plan.notes);
            got += weights[i] * v.unwrap();
        }
        prop_assert!(used <= cores);
        prop_assert!(got >= best - 1e-9, "the round's division is worth {got}, the best {best}: {:?}", plan.notes);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Any loads, shares and node sizes, round after round with the plan fed back (so that
    /// running variants are priced): every plan fits its nodes, and no task of positive weight
    /// is left without a worker while another holds more than its guaranteed minimum.
    #[test]
    fn rounds_fit_their_nodes_and_leave_no_weighted_task_without_a_worker(
        rates in prop::collection::vec(prop::collection::vec(0.0f64..600.0, 3), 2..=4),
        shares in prop::collection::vec((0.0f64..4.0, 0u32..3, 0u32..4), 4),
        nodes in prop::collection::vec(1u32..=4, 1..=3),
        rule in prop_oneof![Just(ShareRule::Weighted), Just(ShareRule::MaxMin)],
    ) {
        let n = rates.len();
        let mut c = Cluster::new(&vec![0.0; n], &nodes);
        (c.small, c.big) = (points(100.0, 4), points(20.0, 4));
        for (i, &(w, min, max)) in shares.iter().enumerate().take(n) {
            c = c.share(i, w, min, if max > 0 { max.max(min) } else { 0 });
        }
        let mut adapter = Adapter::new(config(rule));
        let mut plan: Option<Plan> = None;
        for round in 0..3 {
            for (t, r) in c.tasks.iter_mut().zip(&rates) {
                t.1 = vec![r[round]];
            }
            let mut input = c.input();
            input.current = plan.as_ref();
            let next = adapter.round(&input).plan;
            for (node, cores) in &c.nodes {
                prop_assert_eq!(crate::plan::validate_for_node(&next, node, cores * 1000), Ok(()), "{:?}", next.notes);
            }
            // A task held above its minimum (a first step here is one core) while a weighted one
            // goes without breaks the rule.
            let above_minimum = c.tasks.iter().any(|(spec, _)| {
                carried(&next, &spec.name).1 > spec.share.map_or(0, |s| s.min_cores).max(1)
            });
            let weighted = c.tasks.iter().filter(|t| t.0.share.and_then(|s| s.weight).unwrap_or(1.0) > 0.0);
            if above_minimum {
                for (spec, _) in weighted {
                    prop_assert!(carried(&next, &spec.name).1 >= 1, "{} has no worker: {:?}", spec.name, next.notes);
                }
            }
            plan = Some(next);
        }
    }
}

#[test]
fn tasks_shrunk_for_memory_grow_back_only_after_rounds_without_a_shortage() {
    const GIB: u64 = 1 << 30;
    let big = |plan: &Plan| {
        let accurate = plan.assignments.iter().filter(|a| a.variant.as_ref().unwrap().name.ends_with("big"));
        accurate.count()
    };
    // Four tasks on 6 GiB: all run the small variant (see the test above).
    let four = Cluster::new(&[5.0, 5.0, 5.0, 5.0], &[8]).memory(6 * GIB, GIB, 2 * GIB);
    let mut adapter = Adapter::new(config(ShareRule::Weighted));
    assert_eq!(big(&adapter.round(&four.input()).plan), 0);
    // One task leaves: there is room for one accurate worker (2.5 + 2 × 1.25 GiB), which a
    // fresh planner takes at once ...
    let mut three = Cluster::new(&[5.0, 5.0, 5.0], &[8]).memory(6 * GIB, GIB, 2 * GIB);
    three.tasks.truncate(3);
    assert_eq!(big(&round(&three, ShareRule::Weighted)), 1);
    // ... and one that was short of memory takes after `scale_down_after` rounds without a
    // shortage, not before: a woken task would take the room again.
    let rounds = AdaptConfig::default().scale_down_after;
    for r in 0..rounds {
        assert_eq!(big(&adapter.round(&three.input()).plan), 0, "round {r} after the shortage");
    }
    assert_eq!(big(&adapter.round(&three.input()).plan), 1);
}
