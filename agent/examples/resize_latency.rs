//! Benchmark: how long an in-place resize takes — the write of a new CPU quota to a worker's
//! cgroup — with a process in the cgroup burning CPU. Prints p50/p99/max in µs, and beside it
//! (interleaved, resize by resize) a bare `write(2)` of the same value to the same file: what
//! going through `cgroups-rs` costs over writing cgroupfs by hand.
//!
//! `cargo run --release -p tidal-agent --example resize_latency [-- ITERATIONS]` (as root).

use std::process::Command;
use std::time::Instant;

use tidal_agent::cgroup::{CgroupDriverChoice, CpuCgroups};

fn main() -> anyhow::Result<()> {
    let iterations: usize = std::env::args().nth(1).map(|s| s.parse()).transpose()?.unwrap_or(20_000);
    let cgroups = CpuCgroups::setup(CgroupDriverChoice::Auto, &format!("tidal-bench/{}", std::process::id()))?;
    let cg = cgroups.create("resize")?;
    // A busy process inside, so the kernel applies each quota to a running task.
    let mut busy = Command::new("sh").args(["-c", "while :; do :; done"]).spawn()?;
    cg.add_process(busy.id())?;
    cg.set_millicores(1000)?;
    let dir = cg.cpu_dir().ok_or_else(|| anyhow::anyhow!("no cgroup driver"))?.to_path_buf();
    let v2 = cgroups.driver_name() == "cgroup-v2";
    let (file, period) = if v2 { (dir.join("cpu.max"), " 10000") } else { (dir.join("cpu.cfs_quota_us"), "") };
    let mut micros = Vec::with_capacity(iterations);
    let mut bare = Vec::with_capacity(iterations);
    for i in 0..iterations {
        let millicores = if i % 2 == 0 { 2000 } else { 1000 };
        let t = Instant::now();
        cg.set_millicores(millicores)?;
        micros.push(t.elapsed().as_secs_f64() * 1e6);
        let t = Instant::now();
        std::fs::write(&file, format!("{}{period}", millicores * 10))?;
        bare.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let in_force = cg.millicores()?;
    busy.kill()?;
    busy.wait()?;
    std::thread::sleep(std::time::Duration::from_millis(50));
    cg.remove();
    cgroups.remove();
    let ratios: Vec<f64> = micros.iter().zip(&bare).map(|(a, b)| a / b.max(1e-3)).collect();
    let (micros, bare, ratios) = (sorted(micros), sorted(bare), sorted(ratios));
    println!(
        "cgroup quota rewrite ({}, {iterations} resizes 1↔2 cores): p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs; quota in force at the end: {:?} millicores",
        cgroups.driver_name(),
        quantile(&micros, 0.5),
        quantile(&micros, 0.99),
        micros[micros.len() - 1],
        in_force
    );
    println!(
        "bare write(2) of the same file, interleaved: p50 {:.1} µs, p99 {:.1} µs; cgroups-rs/bare per pair: median {:.2}× (p10 {:.2}, p90 {:.2})",
        quantile(&bare, 0.5),
        quantile(&bare, 0.99),
        quantile(&ratios, 0.5),
        quantile(&ratios, 0.1),
        quantile(&ratios, 0.9)
    );
    Ok(())
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

fn quantile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}
