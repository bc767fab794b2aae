//! Solve time of the exact planner against the MILP reference.
//!
//! - InfAdapter: 5 variants, 8–64 cores (profiled on 1, 2, 4, 8, 16, 32, 64 cores).
//! - InfAdapter on its published TF-Serving profiles (every core count 1–20, SLO 750 ms), a
//!   20-core budget, at loads from idle to several times what 20 cores carry (overload).
//! - IPA and Tidal's union: 2, 3, 5 and 10 stages × 5 variants, batch ≤ 64, replicas ≤ 32.
//! - The MILP (good_lp + microlp) on the instances it finishes in reasonable time.
//!
//! Run with `make bench` (or `cargo bench -p tidal-common --bench solver`); the figures go
//! to the closing notes and the README.

mod support;

use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use tidal_common::profile::ProfileGrid;
use tidal_common::solver::{solve, Limits, PolicyKind, Stage, Variant};

const CORES: [u32; 7] = [1, 2, 4, 8, 16, 32, 64];
const BATCHES: [u32; 7] = [1, 2, 4, 8, 16, 32, 64];
const LIMITS: Limits = Limits { max_batch: 64, max_replicas: 32 };

fn infadapter(c: &mut Criterion) {
    let mut group = c.benchmark_group("infadapter-5-variants");
    for budget in [8u32, 16, 32, 64] {
        let p = support::problem(vec![support::stage("s", &CORES, &[1])], 6.0 * budget as f64, budget, 750.0);
        let space = PolicyKind::InfAdapter.space(&LIMITS);
        group.bench_with_input(BenchmarkId::new("search", budget), &p, |b, p| b.iter(|| solve(black_box(p), &space)));
    }
    group.finish();
}

/// InfAdapter's own setting: the published profiles, 20 cores, loads up to overload (the
/// budget carries about 400 req/s of the fastest variant).
fn infadapter_published(c: &mut Criterion) {
    let csv = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../data/infadapter-capacity-tfserving.csv"))
        .expect("data/infadapter-capacity-tfserving.csv is in the repository");
    let profiles = tidal_common::profile::load_tfserving_csv(&csv[..], 750).expect("the published profiles parse");
    let variants = profiles
        .into_iter()
        .map(|(name, points)| {
            let accuracy = tidal_common::resnet::ResNetDepth::from_name(&name).expect("a ResNet").top1_accuracy();
            Variant { name, accuracy, load_cost: 0.0, grid: ProfileGrid::new(&points), memory: Default::default() }
        })
        .collect();
    let stage = Stage { name: "s".into(), variants };
    let mut group = c.benchmark_group("infadapter-published-20-cores");
    for load in [20.0, 100.0, 200.0, 300.0, 380.0, 500.0, 1000.0] {
        let p = support::problem(vec![stage.clone()], load, 20, 750.0);
        let space = PolicyKind::InfAdapter.space(&LIMITS);
        group.bench_with_input(BenchmarkId::new("search", load), &p, |b, p| b.iter(|| solve(black_box(p), &space)));
    }
    group.finish();
}

fn pipelines(c: &mut Criterion) {
    for policy in [PolicyKind::Ipa, PolicyKind::Tidal] {
        let mut group = c.benchmark_group(format!("{policy}-pipeline-5-variants"));
        group.sample_size(10).measurement_time(Duration::from_secs(10));
        for stages in [2usize, 3, 5, 10] {
            let p = pipeline(stages);
            let space = policy.space(&LIMITS);
            group.bench_with_input(BenchmarkId::new("search", stages), &p, |b, p| {
                b.iter(|| solve(black_box(p), &space))
            });
        }
        group.finish();
    }
}

/// The search and the MILP on the same instances: InfAdapter at 16 and 64 cores, and a small
/// two-stage pipeline (3 variants a stage, batch ≤ 2, replicas ≤ 2, a 4-step utilisation
/// ladder) that the pure-Rust MILP solver finishes in reasonable time.
fn milp(c: &mut Criterion) {
    let mut group = c.benchmark_group("same-instance");
    group.sample_size(10).measurement_time(Duration::from_secs(10));
    let mut cases = Vec::new();
    for budget in [16u32, 64] {
        let p = support::problem(vec![support::stage("s", &CORES, &[1])], 6.0 * budget as f64, budget, 750.0);
        cases.push((format!("infadapter-{budget}-cores"), p, PolicyKind::InfAdapter.space(&LIMITS)));
    }
    let small = Limits { max_batch: 2, max_replicas: 2 };
    for policy in [PolicyKind::Ipa, PolicyKind::Tidal] {
        cases.push((format!("{policy}-2-stages-small"), small_pipeline(), policy.space(&small)));
    }
    for (name, p, space) in &cases {
        group.bench_with_input(BenchmarkId::new("search", name), p, |b, p| b.iter(|| solve(black_box(p), space)));
        group.bench_with_input(BenchmarkId::new("milp", name), p, |b, p| {
            b.iter(|| support::solve_milp(black_box(p), space))
        });
    }
    group.finish();
}

fn small_pipeline() -> tidal_common::solver::Problem {
    let three = |i: usize| {
        let mut s = support::stage(&format!("s{i}"), &[1, 2, 4], &[1, 2]);
        s.variants.truncate(3);
        s
    };
    let mut p = support::problem((0..2).map(three).collect(), 30.0, 16, 600.0);
    p.model.utilisation = 0.2;
    p
}

/// `stages` stages of 5 variants sharing an end-to-end SLO of 250 ms per stage, at 100 req/s.
fn pipeline(stages: usize) -> tidal_common::solver::Problem {
    let all = (0..stages).map(|i| support::stage(&format!("s{i}"), &CORES[..5], &BATCHES)).collect();
    support::problem(all, 100.0, 64 * stages as u32, 250.0 * stages as f64)
}

criterion_group!(benches, infadapter, infadapter_published, pipelines, milp);
criterion_main!(benches);
