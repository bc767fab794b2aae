use proptest::prelude::*;
use tidal_proto::v1::ProfilePoint;

use super::*;
use crate::profile::ProfileGrid;

/// A variant with batch-1 throughput `per_core` per core on `cores`; a batch > 1 is 1.3× as
/// efficient per request.
fn variant(name: &str, accuracy: f64, per_core: f64, cores: &[u32], batches: &[u32]) -> Variant {
    let batches: Vec<(u32, f64)> = batches.iter().map(|&b| (b, if b == 1 { 1.0 } else { 1.3 })).collect();
    let points = crate::profile::synthetic(per_core, cores, &batches, 1.0);
    Variant { name: name.into(), accuracy, load_cost: 0.0, grid: ProfileGrid::new(&points), memory: Default::default() }
}

fn resnets() -> Vec<Variant> {
    let cores = [1, 2, 3, 4];
    vec![
        variant("resnet18", 69.76, 50.0, &cores, &[1]),
        variant("resnet50", 76.13, 18.75, &cores, &[1]),
        variant("resnet152", 78.31, 5.0, &[2, 4], &[1]),
    ]
}

fn problem(stages: Vec<Vec<Variant>>, load: f64, budget: u32, slo: f64) -> Problem {
    Problem {
        stages: stages.into_iter().enumerate().map(|(i, variants)| Stage { name: format!("s{i}"), variants }).collect(),
        load_rps: load,
        slo_ms: slo,
        comm_latency_ms: 0.0,
        core_budget: budget,
        max_worker_cores: None,
        max_worker_memory: None,
        weights: Weights::default(),
        model: LatencyModel::default(),
    }
}

fn space(p: PolicyKind) -> SearchSpace {
    p.space(&Limits::default())
}

fn names_of<'a>(p: &'a Problem, s: &Solution) -> Vec<&'a str> {
    s.choices.iter().map(|c| p.stages[c.stage].variants[c.variant].name.as_str()).collect()
}

#[test]
fn low_load_gets_the_most_accurate_variant_that_fits() {
    let p = problem(vec![resnets()], 5.0, 8, 1000.0);
    let s = solve(&p, &space(PolicyKind::InfAdapter)).unwrap();
    assert!(!s.overloaded);
    assert_eq!(names_of(&p, &s), ["resnet152"]);
}

#[test]
fn high_load_mixes_variants_and_carries_it_all() {
    let p = problem(vec![resnets()], 120.0, 8, 1000.0);
    let s = solve(&p, &space(PolicyKind::InfAdapter)).unwrap();
    assert!(!s.overloaded);
    assert!((s.carried_rps - 120.0).abs() < 1e-6);
    assert!(s.cores <= 8);
    assert!(s.choices.len() >= 2, "{s:?}");
    assert!(s.choices.iter().all(|c| c.point.cores >= 2), "InfAdapter gives a variant 0 or ≥ 2 cores");
}

#[test]
fn overload_plans_the_most_it_can_carry_and_says_so() {
    let p = problem(vec![resnets()], 1000.0, 4, 1000.0);
    let s = solve(&p, &space(PolicyKind::InfAdapter)).unwrap();
    assert!(s.overloaded);
    // All 4 cores on resnet18: 0.8 × 200 req/s.
    assert!((s.carried_rps - 160.0).abs() < 1e-6, "{s:?}");
    assert_eq!(names_of(&p, &s), ["resnet18"]);
}

#[test]
fn bad_inputs_are_errors_not_plans() {
    let mut p = problem(vec![resnets()], 10.0, 0, 1000.0);
    let sp = space(PolicyKind::Tidal);
    assert_eq!(solve(&p, &sp), Err(SolveError::NoBudget));
    p.core_budget = 4;
    p.load_rps = f64::NAN;
    assert!(matches!(solve(&p, &sp), Err(SolveError::InvalidLoad(_))));
    p.load_rps = 10.0;
    p.comm_latency_ms = 2000.0;
    assert!(matches!(solve(&p, &sp), Err(SolveError::InvalidSlo { .. })));
    p.comm_latency_ms = 0.0;
    p.stages[0].variants.clear();
    assert_eq!(solve(&p, &sp), Err(SolveError::NoCandidates("s0".into())));
    p.stages.clear();
    assert_eq!(solve(&p, &sp), Err(SolveError::NoStages));
    let p = problem(vec![resnets()], 10.0, 1, 1000.0);
    assert_eq!(solve(&p, &space(PolicyKind::Vpa("152".into()))), Err(SolveError::NoOperatingPoint("s0".into())));
    assert_eq!(solve(&p, &space(PolicyKind::Vpa("99".into()))), Err(SolveError::UnknownVariant("99".into())));
    // Latency: 2 × 5 ms at best (resnet18 on 4 cores), over an 8 ms SLO.
    let p = problem(vec![resnets()], 10.0, 4, 8.0);
    assert!(matches!(solve(&p, &sp), Err(SolveError::NoOperatingPoint(_))));
}

#[test]
fn starting_a_variant_costs_its_load_cost() {
    let mut p = problem(vec![resnets()], 5.0, 8, 1000.0);
    p.weights.gamma = 1.0;
    p.stages[0].variants[2].load_cost = 1.0; // resnet152 is not running: too dear to start
    let s = solve(&p, &space(PolicyKind::InfAdapter)).unwrap();
    assert_eq!(names_of(&p, &s), ["resnet50"]);
}

#[test]
fn tidal_scales_out_past_the_largest_measured_worker() {
    // resnet50 alone at 4 cores carries 60 req/s; 3 replicas of 4 cores carry 180.
    let mut p = problem(vec![vec![variant("resnet50", 76.13, 18.75, &[1, 2, 4], &[1])]], 150.0, 12, 1000.0);
    p.weights.beta = 0.0;
    let s = solve(&p, &space(PolicyKind::Tidal)).unwrap();
    assert!(!s.overloaded, "{s:?}");
    assert!(s.choices.iter().map(|c| c.replicas).sum::<u32>() >= 3);
    let vpa = solve(&p, &space(PolicyKind::Vpa("50".into()))).unwrap();
    assert!(vpa.overloaded, "one VPA worker cannot grow past the profile");
}

#[test]
fn a_wide_pipeline_short_of_cores_is_solved_in_seconds() {
    // Shaped like IPA's sum-qa: six summarisers and two readers, each measured on 1 to 8 cores
    // at five batch sizes, with a loose SLO (many operating points each) and 32 cores, at loads
    // from light to past what the budget carries. Searching each stage's whole frontier at once
    // took minutes on such a day.
    let cores: Vec<u32> = (1..=8).collect();
    let batches = [1, 2, 4, 8, 16];
    let summarise: Vec<Variant> = (0..6)
        .map(|i| variant(&format!("sum-{i}"), 32.0 + i as f64, 6.0 / (1.0 + i as f64), &cores, &batches))
        .collect();
    let qa = vec![variant("qa-large", 82.9, 5.0, &cores, &batches), variant("qa-base", 77.1, 9.0, &cores, &batches)];
    let started = std::time::Instant::now();
    for load in [2.0, 10.0, 25.0, 50.0, 75.0, 100.0, 140.0] {
        let p = problem(vec![summarise.clone(), qa.clone()], load, 32, 8000.0);
        let s = solve(&p, &space(PolicyKind::Tidal)).unwrap();
        assert!(s.cores <= 32 && s.latency_bound_ms <= 8000.0, "{s:?}");
        // At most 6 and 9 req/s a core (×1.3 batched, ×0.8 utilised) from the lightest
        // summariser and reader: about 0.27 cores per req/s, so 32 cores carry about 120.
        assert_eq!(s.overloaded, load > 120.0, "at {load} req/s: {s:?}");
    }
    let took = started.elapsed();
    assert!(took < std::time::Duration::from_secs(20), "took {took:?}");
}

#[test]
fn a_plan_on_an_unmeasured_core_count_says_so() {
    // Measured at 1 and 4 cores only; 10 req/s fits 1 core exactly (no headroom: 0.8 × 12.5).
    let p = problem(vec![vec![variant("r", 70.0, 12.5, &[1, 4], &[1])]], 11.0, 4, 1000.0);
    let s = solve(&p, &space(PolicyKind::Vpa("r".into()))).unwrap();
    assert_eq!(s.choices[0].point.cores, 2);
    assert_eq!(s.interpolated().count(), 1);
}

#[test]
fn ipa_meets_the_end_to_end_slo_with_one_variant_per_stage() {
    let detector =
        vec![variant("yolon", 45.7, 40.0, &[1, 2, 4], &[1, 2, 4]), variant("yolox", 68.9, 8.0, &[1, 2, 4], &[1, 2, 4])];
    let classifier = resnets();
    let p = problem(vec![detector, classifier], 30.0, 32, 400.0);
    let s = solve(&p, &space(PolicyKind::Ipa)).unwrap();
    assert!(!s.overloaded);
    assert!(s.latency_bound_ms <= 400.0);
    for stage in 0..2 {
        let chosen: Vec<_> = s.choices.iter().filter(|c| c.stage == stage).collect();
        assert_eq!(chosen.len(), 1, "{s:?}");
        assert!(chosen[0].share_rps >= 30.0 - 1e-9);
    }
    let b = brute_force(&p, &space(PolicyKind::Ipa)).unwrap();
    assert!((s.objective - b.objective).abs() < 1e-9, "{s:?} vs {b:?}");
}

#[test]
fn sponge_takes_the_communication_latency_from_the_slo() {
    let v = vec![variant("yolo", 60.0, 20.0, &[1, 2, 4, 8], &[1, 2, 4, 8])];
    let mut p = problem(vec![v], 10.0, 16, 200.0);
    let relaxed = solve(&p, &space(PolicyKind::Sponge)).unwrap();
    p.comm_latency_ms = 150.0;
    let tight = solve(&p, &space(PolicyKind::Sponge)).unwrap();
    assert!(tight.latency_bound_ms <= 50.0, "{tight:?}");
    assert!(tight.cores > relaxed.cores, "less time left takes more cores: {relaxed:?} vs {tight:?}");
    assert_eq!(tight.choices.len(), 1);
    assert_eq!(tight.choices[0].replicas, 1);
}

#[test]
fn fa2_pins_the_least_or_most_accurate_variant() {
    let p = problem(vec![resnets()], 20.0, 16, 1000.0);
    let low = solve(&p, &space(PolicyKind::Fa2Low)).unwrap();
    let high = solve(&p, &space(PolicyKind::Fa2High)).unwrap();
    assert!(names_of(&p, &low).iter().all(|n| *n == "resnet18"));
    assert!(names_of(&p, &high).iter().all(|n| *n == "resnet152"));
}

#[test]
fn static_keeps_its_worker_whatever_the_load() {
    let p = problem(vec![resnets()], 500.0, 16, 1000.0);
    let s = solve(&p, &space("static-resnet50-2-1".parse().unwrap())).unwrap();
    assert!(s.overloaded);
    assert_eq!(s.cores, 2);
    assert!((s.carried_rps - 30.0).abs() < 1e-6);
}

// ---- properties -----------------------------------------------------------------------------

const POLICIES: usize = 9;

fn policy(i: usize) -> PolicyKind {
    match i {
        0 => PolicyKind::Tidal,
        1 => PolicyKind::InfAdapter,
        2 => PolicyKind::Ipa,
        3 => PolicyKind::Sponge,
        4 => PolicyKind::Vpa("va".into()),
        5 => PolicyKind::MsPlus,
        6 => PolicyKind::Fa2Low,
        7 => PolicyKind::Fa2High,
        _ => PolicyKind::Static { variant: "va".into(), cores: 1, batch: 2 },
    }
}

/// Small limits so that brute force stays quick.
const LIMITS: Limits = Limits { max_batch: 2, max_replicas: 2 };

fn arb_grid() -> impl Strategy<Value = ProfileGrid> {
    // (cores, batch) cells on {1, 2} × {1, 2}, each present or not, latency and throughput
    // loosely tied to the resources.
    prop::collection::vec((any::<bool>(), 5.0f64..200.0, 5.0f64..120.0), 4).prop_map(|cells| {
        let keys = [(1, 1), (1, 2), (2, 1), (2, 2)];
        let points: Vec<ProfilePoint> = cells
            .iter()
            .zip(keys)
            .filter(|(c, _)| c.0)
            .map(|(&(_, latency, tput), (cores, batch))| ProfilePoint {
                cores,
                batch,
                latency_p50_ms: latency,
                latency_p99_ms: latency,
                throughput_rps: tput,
                size: 0,
                output_tokens: 0,
                resident_bytes: 0,
            })
            .collect();
        ProfileGrid::new(&points)
    })
}

fn arb_variant(name: &'static str) -> impl Strategy<Value = Variant> {
    (40.0f64..80.0, prop_oneof![Just(0.0), 0.0f64..1.0], arb_grid()).prop_map(move |(accuracy, load_cost, grid)| {
        Variant { name: name.into(), accuracy, load_cost, grid, memory: Default::default() }
    })
}

fn arb_stage(variants: usize) -> impl Strategy<Value = Vec<Variant>> {
    let names = ["va", "vb", "vc"];
    (1..=variants).prop_flat_map(move |n| names[..n].iter().map(|&name| arb_variant(name)).collect::<Vec<_>>())
}

fn arb_problem() -> impl Strategy<Value = Problem> {
    // Small enough to enumerate: 1 stage of up to 3 variants, 2 of up to 2, or 3 of 1.
    let stages = (1usize..=3).prop_flat_map(|s| prop::collection::vec(arb_stage([3, 2, 1][s - 1]), s));
    let weights = (0.1f64..2.0, 0.0f64..0.5, 0.0f64..0.2, prop_oneof![Just(0.0), 0.0f64..0.01])
        .prop_map(|(alpha, beta, gamma, delta)| Weights { alpha, beta, gamma, delta });
    (stages, 0.0f64..150.0, 1u32..10, 60.0f64..900.0, weights).prop_map(|(stages, load, budget, slo, weights)| {
        Problem {
            stages: stages
                .into_iter()
                .enumerate()
                .map(|(i, variants)| Stage { name: format!("s{i}"), variants })
                .collect(),
            load_rps: load,
            slo_ms: slo,
            comm_latency_ms: 0.0,
            core_budget: budget,
            max_worker_cores: None,
            max_worker_memory: None,
            weights,
            model: LatencyModel::default(),
        }
    })
}

/// Every constraint of the problem and of the policy's space holds.
fn check_constraints(p: &Problem, sp: &SearchSpace, s: &Solution) -> Result<(), TestCaseError> {
    prop_assert!(s.cores <= p.core_budget);
    prop_assert_eq!(s.cores, s.choices.iter().map(|c| c.point.cores * c.replicas).sum::<u32>());
    prop_assert!(s.latency_bound_ms <= p.slo_ms + 1e-9);
    for (i, _) in p.stages.iter().enumerate() {
        let chosen: Vec<&Choice> = s.choices.iter().filter(|c| c.stage == i).collect();
        prop_assert!(!chosen.is_empty());
        prop_assert!(chosen.len() <= sp.max_variants_per_stage);
        let worst = chosen.iter().map(|c| c.point.latency_bound_ms).fold(0.0, f64::max);
        prop_assert!(worst <= p.slo_ms);
        let carried: f64 = chosen.iter().map(|c| c.share_rps).sum();
        prop_assert!(
            (carried - s.carried_rps).abs() <= 1e-6 * s.carried_rps.max(1.0),
            "stage {} carries {}",
            i,
            carried
        );
        for c in chosen {
            prop_assert!(c.share_rps <= c.point.capacity_rps * c.replicas as f64 + 1e-9);
            prop_assert!(c.replicas >= 1 && c.replicas <= sp.max_replicas);
            prop_assert!(sp.batches.sizes().contains(&c.point.batch));
        }
    }
    if !s.overloaded {
        prop_assert!(s.carried_rps >= p.load_rps.max(MIN_PLANNED_RPS) - 1e-6);
    }
    Ok(())
}

fn same_optimum(fast: &Result<Solution, SolveError>, slow: &Result<Solution, SolveError>) -> Result<(), TestCaseError> {
    match (fast, slow) {
        (Ok(f), Ok(s)) => {
            prop_assert_eq!(f.overloaded, s.overloaded, "{:?} vs {:?}", f, s);
            prop_assert!((f.carried_rps - s.carried_rps).abs() <= 1e-6 * s.carried_rps.max(1.0), "{:?} vs {:?}", f, s);
            let tolerance = if f.overloaded { 1e-6 } else { 1e-9 };
            prop_assert!((f.objective - s.objective).abs() <= tolerance, "{:?} vs {:?}", f, s);
        }
        (Err(a), Err(b)) => prop_assert_eq!(a, b),
        _ => prop_assert!(false, "solver {:?} vs brute force {:?}", fast, slow),
    }
    Ok(())
}

#[test]
fn the_random_instances_exercise_plans_not_just_errors() {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let (mut ok, mut overloaded, mut mixed, mut pipelines) = (0, 0, 0, 0);
    for _ in 0..1000 {
        let p = arb_problem().new_tree(&mut runner).unwrap().current();
        if let Ok(s) = solve(&p, &PolicyKind::Tidal.space(&LIMITS)) {
            ok += 1;
            overloaded += s.overloaded as u32;
            mixed += (s.choices.len() > p.stages.len()) as u32;
            pipelines += (p.stages.len() > 1) as u32;
        }
    }
    eprintln!("of 1000: {ok} planned, {overloaded} overloaded, {mixed} mixed, {pipelines} pipelines");
    assert!(ok > 400 && overloaded > 50 && ok - overloaded > 100 && mixed > 20 && pipelines > 100);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    /// Each policy's plan is the optimum that enumeration finds, and satisfies every constraint.
    #[test]
    fn every_policy_finds_the_brute_force_optimum(p in arb_problem(), i in 0..POLICIES) {
        let sp = policy(i).space(&LIMITS);
        let fast = solve(&p, &sp);
        same_optimum(&fast, &brute_force(&p, &sp))?;
        if let Ok(s) = &fast {
            check_constraints(&p, &sp, s)?;
        }
    }

    /// Tidal's space holds every other policy's, so on any policy's objective it is never worse.
    #[test]
    fn tidal_is_never_worse_than_a_policy_on_its_own_objective(p in arb_problem(), i in 1..POLICIES) {
        let other = solve(&p, &policy(i).space(&LIMITS));
        let tidal = solve(&p, &PolicyKind::Tidal.space(&LIMITS));
        if let Ok(o) = other {
            let t = tidal.map_err(|e| TestCaseError::fail(format!("tidal failed where {} planned: {e}", policy(i))))?;
            prop_assert!(t.carried_rps >= o.carried_rps - 1e-6 * o.carried_rps.max(1.0));
            if !o.overloaded {
                prop_assert!(!t.overloaded);
                prop_assert!(t.objective >= o.objective - 1e-9, "{} {:?} beats tidal {:?}", policy(i), o, t);
            }
        }
    }

    /// A deadline-aware plan leaves the communication latency out of its budget.
    #[test]
    fn deadline_aware_plans_fit_the_slo_less_communication(mut p in arb_problem(), comm in 0.0f64..300.0) {
        p.comm_latency_ms = comm;
        if let Ok(s) = solve(&p, &PolicyKind::Tidal.space(&LIMITS)) {
            prop_assert!(s.latency_bound_ms <= p.slo_ms - comm + 1e-9);
        }
    }
}
