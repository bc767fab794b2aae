//! One adaptation round at cluster scale, in process: forecast, the division of the cores, the
//! solves and the placement, as the controller's leader runs it each interval.
//!
//! - 50 tasks of 5 variants on 100 nodes of 48 cores (goal: < 100 ms);
//! - 500 tasks on 1,000 nodes (goal: < 1 s);
//! - 50 tasks whose loads need more than 100 nodes of 8 cores carry (shortage: every task's
//!   claim is worked out and the rule divides the cores).
//!
//! Each task is one stage of five ResNet-like variants profiled on 1–16 cores and batches up to
//! 16, at a load drawn between 20 and 400 req/s (seeded), flat over the last minute. Run with
//! `make bench` (or `cargo bench -p tidal-common --bench round`).

use std::collections::BTreeMap;
use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use rand::{Rng, SeedableRng};
use tidal_common::adapt::{AdaptConfig, Adapter, NodeInput, RoundInput, Serving, TaskInput};
use tidal_proto::v1::{ProfilePoint, TaskSpec, VariantSpec};

static NOTHING_SERVES: Serving = Serving::new();

const FAMILY: [(f64, f64); 5] = [(69.76, 60.0), (73.31, 35.0), (76.13, 28.0), (77.37, 16.0), (78.31, 11.0)];

struct Cluster {
    specs: Vec<TaskSpec>,
    profiles: Vec<Vec<ProfilePoint>>,
    arrivals: Vec<Vec<f64>>,
    nodes: Vec<String>,
    cores: u32,
}

impl Cluster {
    fn new(tasks: usize, nodes: usize, cores: u32, rates: std::ops::Range<f64>) -> Self {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(tasks as u64);
        let profiles = FAMILY
            .iter()
            .map(|&(_, per_core)| {
                tidal_common::profile::synthetic(per_core, &[1, 2, 4, 8, 16], &[(1, 1.0), (4, 1.4), (16, 1.7)], 1.2)
            })
            .collect();
        let specs = (0..tasks)
            .map(|t| {
                let variants = FAMILY
                    .iter()
                    .enumerate()
                    .map(|(i, &(accuracy, _))| VariantSpec {
                        name: format!("v{i}"),
                        model_file: format!("v{i}.onnx"),
                        accuracy,
                        input_shape: vec![3, 224, 224],
                        tensor_names: Default::default(),
                        tokenizer_file: String::new(),
                        io: None,
                        model_sha256: String::new(),
                    })
                    .collect();
                tidal_common::task::single_stage(&format!("task-{t}"), 500, variants)
            })
            .collect();
        let arrivals = (0..tasks).map(|_| vec![rng.gen_range(rates.clone()).round(); 60]).collect();
        Self { specs, profiles, arrivals, nodes: (0..nodes).map(|n| format!("node-{n}")).collect(), cores }
    }

    fn input(&self) -> RoundInput<'_> {
        RoundInput {
            tasks: self
                .specs
                .iter()
                .zip(&self.arrivals)
                .map(|(spec, arrivals)| TaskInput {
                    spec,
                    arrivals,
                    min_budget_ms: None,
                    profiles: (0..FAMILY.len())
                        .map(|i| (["v0", "v1", "v2", "v3", "v4"][i], self.profiles[i].as_slice()))
                        .collect(),
                    profile_indices: BTreeMap::new(),
                    load_s: BTreeMap::new(),
                    sizes: BTreeMap::new(),
                    served: BTreeMap::new(),
                    idle_s: 0.0,
                })
                .collect(),
            nodes: self
                .nodes
                .iter()
                .map(|n| NodeInput { name: n, address: "10.0.0.1:7100", cores: self.cores, memory_bytes: 0 })
                .collect(),
            current: None,
            serving: &NOTHING_SERVES,
        }
    }
}

fn rounds(c: &mut Criterion) {
    let mut group = c.benchmark_group("round");
    group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(5));
    for (name, cluster) in [
        ("50-tasks-100-nodes", Cluster::new(50, 100, 48, 20.0..400.0)),
        ("500-tasks-1000-nodes", Cluster::new(500, 1000, 48, 20.0..400.0)),
        ("50-tasks-short-of-cores", Cluster::new(50, 100, 8, 200.0..800.0)),
    ] {
        let input = cluster.input();
        let cfg = AdaptConfig::default();
        let round = Adapter::new(cfg.clone()).round(&input);
        let workers = round.plan.assignments.len();
        let planned: f64 = round.tasks.values().map(|o| o.planned_rps).sum();
        let served = round.tasks.keys().filter(|t| round.plan.assignments.iter().any(|a| &a.task == *t)).count();
        eprintln!(
            "{name}: {workers} workers, {served} of {} tasks with workers, {planned:.0} req/s planned",
            cluster.specs.len()
        );
        eprintln!("{name}: {}", plan_sizes(&cluster, &round.plan, &cfg));
        group.bench_with_input(BenchmarkId::from_parameter(name), &input, |b, input| {
            b.iter(|| Adapter::new(cfg.clone()).round(black_box(input)))
        });
    }
    group.finish();
}

/// What a plan weighs: whole (as committed), as the Raft log carries the next round's (a tenth
/// of the tasks' loads 30 % higher) and as an agent receives it (median and largest cut).
fn plan_sizes(cluster: &Cluster, first: &tidal_proto::v1::Plan, cfg: &AdaptConfig) -> String {
    use prost::Message;
    let mut busier = Cluster { arrivals: cluster.arrivals.clone(), ..Cluster::new(0, 0, cluster.cores, 0.0..1.0) };
    busier.specs = cluster.specs.clone();
    busier.profiles = cluster.profiles.clone();
    busier.nodes = cluster.nodes.clone();
    for arrivals in busier.arrivals.iter_mut().step_by(10) {
        arrivals.iter_mut().for_each(|r| *r *= 1.3);
    }
    let mut adapter = Adapter::new(cfg.clone());
    adapter.round(&cluster.input());
    let input = RoundInput { current: Some(first), ..busier.input() };
    let next = adapter.round(&input).plan;
    let entry = tidal_common::plan::delta::delta(Some(first), &next);
    let changed = entry.tasks.len();
    let median = |mut sizes: Vec<usize>| {
        sizes.sort_unstable();
        sizes[sizes.len() / 2]
    };
    let cuts = cluster.nodes.iter().map(|n| tidal_common::plan::cut(&next, n).encoded_len()).collect();
    let first = tidal_common::plan::delta::canonical(first.clone());
    let started = std::time::Instant::now();
    let next = tidal_common::plan::delta::canonical(next);
    let deltas = tidal_common::plan::delta::CutDeltas::new(&first, &next);
    let agent_deltas = cluster.nodes.iter().map(|n| deltas.for_node(n).encoded_len()).collect();
    let prepared = started.elapsed();
    format!(
        "plan {} B whole; the next round's Raft entry {} B ({changed} tasks changed); \
         per agent (median) {} B cut, {} B as its change; every agent's change made in {:.0} ms",
        next.encoded_len(),
        entry.encoded_len(),
        median(cuts),
        median(agent_deltas),
        prepared.as_secs_f64() * 1e3,
    )
}

criterion_group!(benches, rounds);
criterion_main!(benches);
