//! Benchmark: how long an in-place resize takes — the write of a new CPU quota to a worker's
//! cgroup — with a process in the cgroup burning CPU. Prints p50/p99/max in µs.
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
    let mut micros = Vec::with_capacity(iterations);
    for i in 0..iterations {
        let millicores = if i % 2 == 0 { 2000 } else { 1000 };
        let t = Instant::now();
        cg.set_millicores(millicores)?;
        micros.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let in_force = cg.millicores()?;
    busy.kill()?;
    busy.wait()?;
    std::thread::sleep(std::time::Duration::from_millis(50));
    cg.remove();
    cgroups.remove();
    micros.sort_by(f64::total_cmp);
    let q = |p: f64| micros[((micros.len() as f64 * p) as usize).min(micros.len() - 1)];
    println!(
        "cgroup quota rewrite ({}, {iterations} resizes 1↔2 cores): p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs; quota in force at the end: {:?} millicores",
        cgroups.driver_name(),
        q(0.5),
        q(0.99),
        micros[micros.len() - 1],
        in_force
    );
    Ok(())
}
