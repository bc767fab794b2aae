//! The controller and the simulator drive one adaptation core. Fed the same recorded
//! telemetry — arrivals per second and the budgets requests carried — through each driver,
//! every policy yields the same sequence of plans, surge re-plans included, for a one-stage
//! task and for a two-stage pipeline.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tidal_common::adapt::{AdaptConfig, Adapter};
use tidal_common::profile::synthetic;
use tidal_common::sim::{SimPlanner, SimStage, SimVariant};
use tidal_controller::observed::Observed;
use tidal_controller::planner;
use tidal_controller::state::{ClusterState, NodeInfo};
use tidal_proto::v1::{Plan, TaskTelemetry, TelemetryReport, VariantProfile};

const CORES: u32 = 12;
const SLO_MS: f64 = 400.0;
const WARMUP_S: usize = 60;

fn variant(name: &str, accuracy: f64, per_core: f64) -> SimVariant {
    SimVariant::new(name, accuracy, synthetic(per_core, &[1, 2, 3, 4, 6, 8], &[(1, 1.0), (4, 1.4), (8, 1.6)], 1.3), 2.0)
}

fn one_stage() -> Vec<SimStage> {
    let variants = vec![variant("small", 70.0, 60.0), variant("mid", 74.0, 25.0), variant("big", 78.0, 10.0)];
    vec![SimStage::new(SimPlanner::TASK, variants)]
}

fn two_stages() -> Vec<SimStage> {
    let detect = vec![variant("det-n", 28.0, 90.0), variant("det-s", 37.0, 40.0)];
    let classify = vec![variant("small", 70.0, 60.0), variant("big", 78.0, 10.0)];
    vec![SimStage::new("detect", detect), SimStage::new("classify", classify)]
}

/// Recorded telemetry: per second, the arrivals and the least budget a request carried. A
/// ramp, a burst the forecast misses, a fall, and budgets that tighten for a while.
fn recording() -> Vec<(u32, Option<u32>)> {
    (0..400)
        .map(|s: u32| {
            let rate = match s {
                0..=99 => 20 + s / 2,
                100..=109 => 240,
                110..=249 => 70,
                _ => 15,
            };
            let budget = if (150..220).contains(&s) {
                Some(250)
            } else if s.is_multiple_of(7) {
                Some(380)
            } else {
                None
            };
            (rate + s % 3, budget)
        })
        .collect()
}

/// The plans a driver committed, epochs aside.
fn normalised(plans: Vec<Plan>) -> Vec<Plan> {
    plans.into_iter().map(|p| Plan { epoch: 0, term: 0, ..p }).collect()
}

/// The simulator's driver, as `simulate` runs it: a round every interval before the second's
/// arrivals, a surge check after each second.
fn through_the_simulator(cfg: &AdaptConfig, stages: &[SimStage], rec: &[(u32, Option<u32>)]) -> Vec<Plan> {
    let mut sim = SimPlanner::pipeline(stages, SLO_MS, CORES, Adapter::new(cfg.clone()));
    let interval = cfg.interval_s as usize;
    let mut history = vec![rec[0].0 as f64; WARMUP_S];
    let mut plans = Vec::new();
    let least_budget =
        |to: usize| rec[to.saturating_sub(interval)..to].iter().filter_map(|(_, b)| b.map(f64::from)).reduce(f64::min);
    for (s, &(arrivals, _)) in rec.iter().enumerate() {
        if s.is_multiple_of(interval) && sim.round(&history, least_budget(s)).changed {
            plans.push(sim.plan.clone().expect("a plan"));
        }
        history.push(arrivals as f64);
        if sim.surge((s + 1) as f64, std::slice::from_ref(&history)).is_some()
            && sim.round(&history, least_budget(s + 1)).changed
        {
            plans.push(sim.plan.clone().expect("a plan"));
        }
    }
    plans
}

/// The controller's driver: the replicated state holds the task, the node and the profiles;
/// the observations come from one telemetry report a second.
fn through_the_controller(cfg: &AdaptConfig, stages: &[SimStage], rec: &[(u32, Option<u32>)]) -> Vec<Plan> {
    let mut adapter = Adapter::new(cfg.clone());
    let reference = SimPlanner::pipeline(stages, SLO_MS, CORES, Adapter::new(cfg.clone()));
    let spec = reference.spec().clone();
    let mut state = ClusterState::default();
    state.nodes.insert(
        SimPlanner::NODE.into(),
        NodeInfo {
            address: String::new(),
            control_address: String::new(),
            cores: CORES,
            draining: false,
            cert_serial: String::new(),
            memory_total_bytes: 0,
            memory_bytes: 0,
        },
    );
    state.tasks.insert(spec.name.clone(), spec.clone());
    for v in stages.iter().flat_map(|s| s.variants.clone()) {
        let profile = VariantProfile {
            task: spec.name.clone(),
            variant: v.name.clone(),
            node: "n".into(),
            points: v.points,
            ..Default::default()
        };
        state.profiles.insert((spec.name.clone(), v.name), profile);
    }
    let t0 = Instant::now();
    let at = |s: usize| t0 + Duration::from_secs(s as u64);
    let mut observed = Observed::new(t0);
    let report = |arrivals: u32, budget: Option<u32>| TelemetryReport {
        node: SimPlanner::NODE.into(),
        tasks: vec![TaskTelemetry {
            task: spec.name.clone(),
            arrivals_per_second: vec![arrivals],
            min_budget_ms: budget.map_or(0.0, f64::from),
            ..Default::default()
        }],
        ..Default::default()
    };
    for s in 0..WARMUP_S {
        observed.record(report(rec[0].0, None), at(s + 1));
    }
    let interval = cfg.interval_s as usize;
    let mut plans = Vec::new();
    let mut commit = |state: &mut ClusterState, round: tidal_common::adapt::Round| {
        if round.changed {
            let plan = Plan { epoch: state.plan_epoch() + 1, ..round.plan };
            state.plan = Some(plan.clone());
            plans.push(plan);
        }
    };
    for (s, &(arrivals, budget)) in rec.iter().enumerate() {
        let now = at(WARMUP_S + s);
        if s.is_multiple_of(interval) {
            let round = planner::plan_round(&mut adapter, &state, &mut observed, now, true);
            commit(&mut state, round);
        }
        let now = at(WARMUP_S + s + 1);
        observed.record(report(arrivals, budget), now);
        let tasks: Vec<String> = state.tasks.keys().cloned().collect();
        let surge = planner::surge(&mut adapter, &tasks, &observed, now);
        if surge.is_some() {
            let round = planner::plan_round(&mut adapter, &state, &mut observed, now, true);
            commit(&mut state, round);
        }
    }
    plans
}

/// Each policy's plans through both drivers, checked equal; the number of plans per policy.
fn plan_alike(stages: &[SimStage], policies: &[&'static str]) -> BTreeMap<&'static str, usize> {
    let rec = recording();
    let mut changes = BTreeMap::new();
    for &policy in policies {
        let cfg = AdaptConfig { policy: policy.parse().unwrap(), interval_s: 10.0, ..AdaptConfig::default() };
        // The observer's clock starts at the warm-up; the simulator's at the replay.
        let sim = normalised(through_the_simulator(&cfg, stages, &rec));
        let live = normalised(through_the_controller(&cfg, stages, &rec));
        let fixed = policy.starts_with("static");
        assert!(sim.len() >= if fixed { 1 } else { 2 }, "{policy}: the recording moves every policy: {sim:?}");
        assert!(sim.iter().all(|p| !p.assignments.is_empty()), "{policy}: every plan serves: {sim:?}");
        assert_eq!(sim.len(), live.len(), "{policy}: as many plans");
        for (i, (a, b)) in sim.iter().zip(&live).enumerate() {
            assert_eq!(a, b, "{policy}: plan {i} differs");
        }
        changes.insert(policy, sim.len());
    }
    changes
}

#[test]
fn the_controller_and_the_simulator_plan_alike_for_every_policy() {
    let policies = ["tidal", "infadapter", "ipa", "sponge", "vpa-mid", "ms+", "fa2-low", "fa2-high", "static-mid-2-4"];
    let changes = plan_alike(&one_stage(), &policies);
    eprintln!("plans per policy: {changes:?}");
    // The surge rule is the policy's: only Tidal and Sponge re-plan between rounds, so they
    // see the burst at once and change plans more often than the interval-bound systems.
    assert!(changes["tidal"] > changes["ipa"].min(changes["infadapter"]), "{changes:?}");
}

#[test]
fn the_controller_and_the_simulator_plan_a_pipeline_alike() {
    let changes = plan_alike(&two_stages(), &["tidal", "ipa", "fa2-low", "fa2-high"]);
    eprintln!("pipeline plans per policy: {changes:?}");
    let stages_of = |policy: &str| {
        let cfg = AdaptConfig { policy: policy.parse().unwrap(), interval_s: 10.0, ..AdaptConfig::default() };
        let plans = through_the_simulator(&cfg, &two_stages(), &recording());
        plans
            .iter()
            .flat_map(|p| p.assignments.iter().map(|a| a.stage.clone()))
            .collect::<std::collections::BTreeSet<_>>()
    };
    assert_eq!(stages_of("ipa").into_iter().collect::<Vec<_>>(), ["classify", "detect"], "every stage is staffed");
}

/// A node that stops reporting is planned around from the next round, and planned on again
/// once it reports.
#[test]
fn a_silent_node_is_planned_around_until_it_reports_again() {
    let cfg = AdaptConfig { policy: "tidal".parse().unwrap(), interval_s: 10.0, ..AdaptConfig::default() };
    let stages = two_stages();
    let spec = SimPlanner::pipeline(&stages, SLO_MS, CORES, Adapter::new(cfg.clone())).spec().clone();
    let mut state = ClusterState::default();
    for node in ["a", "b"] {
        state.nodes.insert(
            node.into(),
            NodeInfo {
                address: format!("{node}:1"),
                control_address: format!("{node}:2"),
                cores: 1,
                draining: false,
                cert_serial: String::new(),
                memory_total_bytes: 0,
                memory_bytes: 0,
            },
        );
    }
    state.tasks.insert(spec.name.clone(), spec.clone());
    for v in stages.iter().flat_map(|s| s.variants.clone()) {
        let profile = VariantProfile {
            task: spec.name.clone(),
            variant: v.name.clone(),
            node: "a".into(),
            points: v.points,
            ..Default::default()
        };
        state.profiles.insert((spec.name.clone(), v.name), profile);
    }
    let t0 = Instant::now();
    let at = |s: u64| t0 + Duration::from_secs(s);
    let mut observed = Observed::new(t0);
    let report = |node: &str| TelemetryReport {
        node: node.into(),
        tasks: vec![TaskTelemetry { task: spec.name.clone(), arrivals_per_second: vec![5], ..Default::default() }],
        ..Default::default()
    };
    let mut adapter = Adapter::new(cfg);
    let nodes_of = |plan: &Plan| {
        let mut n: Vec<String> = plan.assignments.iter().map(|a| a.node.clone()).collect();
        n.sort();
        n.dedup();
        n
    };
    for s in 1..=3 {
        observed.record(report("a"), at(s));
        observed.record(report("b"), at(s));
    }
    let round = planner::plan_round(&mut adapter, &state, &mut observed, at(3), true);
    assert_eq!(nodes_of(&round.plan), ["a", "b"], "one core each: a stage on each node");
    state.plan = Some(round.plan);
    assert!(planner::silent_nodes(state.plan.as_ref(), &observed, at(4)).is_empty());

    // b falls silent: past the node timeout it is named and planned around (one core left
    // cannot hold both stages: the task keeps what it had, noted).
    for s in 4..=10 {
        observed.record(report("a"), at(s));
    }
    assert_eq!(planner::silent_nodes(state.plan.as_ref(), &observed, at(10)), ["b"]);
    let round = planner::plan_round(&mut adapter, &state, &mut observed, at(10), true);
    assert!(!round.plan.node_addresses.contains_key("b"), "b is left out: {:?}", round.plan.notes);

    // b reports again: it is planned on again.
    observed.record(report("b"), at(11));
    let round = planner::plan_round(&mut adapter, &state, &mut observed, at(11), true);
    assert_eq!(nodes_of(&round.plan), ["a", "b"]);
}
