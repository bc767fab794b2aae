//! Cross-check: on medium instances the exact search and a MILP formulation solved by an
//! off-the-shelf solver (good_lp with microlp) reach the same objective.

#[path = "../benches/support/mod.rs"]
mod support;

use tidal_common::solver::{solve, Limits, PolicyKind, Problem};

fn check(name: &str, problem: &Problem, policy: PolicyKind, limits: &Limits) {
    let space = policy.space(limits);
    let mut ours = solve(problem, &space).unwrap_or_else(|e| panic!("{name}: {e}"));
    let mut problem = problem.clone();
    if ours.overloaded {
        // Compare at the most the policy carries, where the MILP is feasible too.
        problem.load_rps = ours.carried_rps;
        ours = solve(&problem, &space).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let problem = &problem;
    let milp = support::solve_milp(problem, &space).unwrap_or_else(|| panic!("{name}: the MILP found no plan"));
    assert!((ours.objective - milp).abs() < 1e-6, "{name} {policy}: search {} vs MILP {milp}", ours.objective);
}

#[test]
fn single_stage_policies_match_the_milp() {
    let limits = Limits { max_batch: 8, max_replicas: 4 };
    for (load, budget) in [(40.0, 16), (150.0, 24), (300.0, 32)] {
        let p = support::problem(vec![support::stage("s", &[1, 2, 4, 8], &[1, 2, 4, 8])], load, budget, 500.0);
        for policy in [PolicyKind::InfAdapter, PolicyKind::Ipa, PolicyKind::MsPlus, PolicyKind::Tidal] {
            check(&format!("1 stage, {load} req/s, {budget} cores"), &p, policy, &limits);
        }
    }
}

#[test]
fn pipelines_match_the_milp() {
    let limits = Limits { max_batch: 2, max_replicas: 2 };
    for (stages, load) in [(2, 30.0), (3, 20.0)] {
        let three = |i: usize| {
            let mut s = support::stage(&format!("s{i}"), &[1, 2, 4], &[1, 2]);
            s.variants.truncate(3);
            s
        };
        let mut p = support::problem((0..stages).map(three).collect(), load, 8 * stages as u32, 300.0 * stages as f64);
        // A shorter utilisation ladder keeps the MILP small enough for a pure-Rust solver.
        p.model.utilisation = 0.2;
        for policy in [PolicyKind::Ipa, PolicyKind::Fa2High, PolicyKind::Tidal] {
            check(&format!("{stages} stages, {load} req/s"), &p, policy, &limits);
        }
    }
}
