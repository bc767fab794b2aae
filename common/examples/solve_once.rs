//! Times the exact planner on the benchmark's largest instances, for A/B runs:
//! `solve_once tidal-10 N` (the 10-stage union pipeline) or `solve_once infadapter LOAD N`
//! (the published TF-Serving profiles, 20 cores, at LOAD req/s).
#[path = "../benches/support/mod.rs"]
mod support;
use tidal_common::profile::ProfileGrid;
use tidal_common::solver::{solve, Limits, PolicyKind, Problem, Stage, Variant};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let limits = Limits { max_batch: 64, max_replicas: 32 };
    let (p, policy, n): (Problem, PolicyKind, u32) = match args[1].as_str() {
        "tidal-10" => {
            let cores = [1u32, 2, 4, 8, 16];
            let batches = [1u32, 2, 4, 8, 16, 32, 64];
            let all = (0..10).map(|i| support::stage(&format!("s{i}"), &cores, &batches)).collect();
            (support::problem(all, 100.0, 640, 2500.0), PolicyKind::Tidal, args[2].parse().unwrap())
        }
        _ => {
            let csv = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../data/infadapter-capacity-tfserving.csv"))
                .unwrap();
            let variants = tidal_common::profile::load_tfserving_csv(&csv[..], 750)
                .unwrap()
                .into_iter()
                .map(|(name, points)| {
                    let accuracy = tidal_common::resnet::ResNetDepth::from_name(&name).unwrap().top1_accuracy();
                    Variant {
                        name,
                        accuracy,
                        load_cost: 0.0,
                        grid: ProfileGrid::new(&points),
                        memory: Default::default(),
                    }
                })
                .collect();
            let stage = Stage { name: "s".into(), variants };
            (
                support::problem(vec![stage], args[2].parse().unwrap(), 20, 750.0),
                PolicyKind::InfAdapter,
                args[3].parse().unwrap(),
            )
        }
    };
    let space = policy.space(&limits);
    let t = std::time::Instant::now();
    let mut last = None;
    for _ in 0..n {
        last = Some(std::hint::black_box(solve(&p, &space)));
    }
    let s = last.unwrap().unwrap();
    eprintln!(
        "{:?} per solve; objective {:.6}, carried {:.3}, overloaded {}",
        t.elapsed() / n,
        s.objective,
        s.carried_rps,
        s.overloaded
    );
}
