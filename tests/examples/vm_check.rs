//! Runs inside the systemd VM that `tests/tests/process/vm.rs` boots (not on the host): checks the
//! agent under its shipped unit on a real kernel with cgroup v2 and systemd as PID 1.
//!
//! Started by `tidal-vm-check.service` after `tidal-agent.service` is up; prints
//! `TIDAL-VM <key> <value>` lines to the serial console and ends with `TIDAL-VM PASS` or
//! `TIDAL-VM FAIL <reason>` (then the unit powers the VM off). Every figure is measured under
//! software emulation (TCG) and is only an upper bound of what real hardware does.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use tidal_auth::{Role, Security, TlsArgs};
use tidal_common::variant::VariantConfig;
use tidal_proto::v1::agent_client::AgentClient;
use tidal_proto::v1::inference_client::InferenceClient;
use tidal_proto::v1::{AgentStatusRequest, ApplyPlanRequest, InferRequest, WorkerTelemetry};
use tidal_tests::{plan_for, sample};
use tonic::transport::Channel;

const CONTROL: &str = "127.0.0.1:7101";
const INFERENCE: &str = "127.0.0.1:7100";
const UNIT: &str = "tidal-agent.service";
const MODELS: &str = "/var/lib/tidal/models";
const TOGGLES: usize = 40;
const CHECK_DEADLINE: Duration = Duration::from_secs(840);

fn say(key: &str, value: impl std::fmt::Display) {
    println!("TIDAL-VM {key} {value}");
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build();
    // A deadline of its own, well inside the unit's TimeoutStartSec (1100 s) and the host's wait
    // (1200 s from boot): a check that hangs ends as FAIL with the agent's journal.
    let bounded = async {
        tokio::time::timeout(CHECK_DEADLINE, check())
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the checks did not finish within {CHECK_DEADLINE:?}")))
    };
    let outcome = runtime.map_err(anyhow::Error::from).and_then(|rt| rt.block_on(bounded));
    match outcome {
        Ok(()) => say("PASS", "all checks held"),
        Err(e) => {
            if let Ok(out) = Command::new("journalctl").args(["-u", UNIT, "--no-pager", "-n", "60"]).output() {
                for line in String::from_utf8_lossy(&out.stdout).lines() {
                    say("journal", line);
                }
            }
            say("FAIL", format!("{e:#}").replace('\n', " | "));
            std::process::exit(1);
        }
    }
}

/// `systemctl show UNIT -p …` as (key, value) pairs.
fn unit_properties(props: &[&str]) -> anyhow::Result<Vec<(String, String)>> {
    let mut cmd = Command::new("systemctl");
    cmd.args(["show", UNIT]);
    for p in props {
        cmd.args(["-p", p]);
    }
    let out = cmd.output().context("systemctl show")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect())
}

fn property(props: &[(String, String)], key: &str) -> String {
    props.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone()).unwrap_or_default()
}

fn systemctl(args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new("systemctl").args(args).status().context("systemctl")?;
    ensure!(status.success(), "systemctl {} failed: {status}", args.join(" "));
    Ok(())
}

fn uid_of(pid: u32) -> anyhow::Result<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("Uid:")).context("no Uid line")?;
    line.split_whitespace().nth(1).and_then(|u| u.parse().ok()).context("unparsable Uid line")
}

fn cgroup_of(pid: u32) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    text.lines().find_map(|l| l.strip_prefix("0::")).map(str::to_string).context("no cgroup v2 line")
}

async fn check() -> anyhow::Result<()> {
    let security = Security::from_args(&TlsArgs::issued(Path::new("/etc/tidal/tls"), &Role::Controller(1)))?;
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    say("kernel", kernel.trim());
    let controllers =
        std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers").context("no cgroup2 at /sys/fs/cgroup")?;
    say("cgroup2-controllers", controllers.trim());

    // 1. Readiness reached systemd: this unit is ordered after the agent's, which only
    //    becomes active on READY=1 (Type=notify).
    let props = unit_properties(&["ActiveState", "SubState", "Type", "MainPID", "ControlGroup", "User", "Delegate"])?;
    for (k, v) in &props {
        say(&format!("unit.{k}"), v);
    }
    ensure!(property(&props, "ActiveState") == "active", "the agent unit is not active");
    ensure!(property(&props, "Type") == "notify", "the agent unit is not Type=notify");
    let main_pid: u32 = property(&props, "MainPID").parse().context("MainPID")?;
    let unit_cgroup = property(&props, "ControlGroup");
    let agent_uid = uid_of(main_pid)?;
    say("agent.uid", agent_uid);
    ensure!(agent_uid != 0, "the agent runs as root");
    let agent_cgroup = cgroup_of(main_pid)?;
    say("agent.cgroup", &agent_cgroup);
    ensure!(agent_cgroup == format!("{unit_cgroup}/agent"), "the agent did not move to its leaf cgroup");

    // 2. A plan: one resnet18 worker at one core; its cgroup is under the agent's subtree.
    let mut control = AgentClient::new(connect(&security, CONTROL).await.context("connecting to the agent")?);
    say("agent.connected", CONTROL);
    let r18 = VariantConfig::load(Path::new(MODELS), "resnet18")?;
    let plan = |epoch: u64, millicores: u32| plan_for(epoch, "vm", "classify", 60_000, &[(&r18, millicores, 1)]);
    control
        .apply_plan(ApplyPlanRequest { plan: Some(plan(1, 1000)), ..Default::default() })
        .await
        .context("applying the first plan")?;
    say("plan.applied", "one resnet18 worker at one core");
    let worker = wait_worker(&mut control).await?;
    let dir = PathBuf::from(&worker.cgroup);
    say("worker.cgroup", dir.display());
    say("worker.load_ms", worker.load_ms);
    ensure!(
        dir.starts_with(format!("/sys/fs/cgroup{unit_cgroup}/workers")),
        "the worker's cgroup is not under the agent's delegated subtree"
    );
    let procs = std::fs::read_to_string(dir.join("cgroup.procs"))?;
    let worker_pid: u32 =
        procs.lines().next().and_then(|l| l.trim().parse().ok()).context("no process in the worker's cgroup")?;
    ensure!(
        format!("/sys/fs/cgroup{}", cgroup_of(worker_pid)?) == dir.display().to_string(),
        "the worker process is elsewhere"
    );
    ensure!(uid_of(worker_pid)? == agent_uid, "the worker does not run as the agent's user");
    ensure!(read_cpu_max(&dir)? == "10000 10000", "cpu.max is {:?}, not one core", read_cpu_max(&dir)?);

    // 3. Under load, resize in place: from sending ApplyPlan to the new cpu.max in force.
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let mut load = Vec::new();
    for _ in 0..2 {
        let mut client = InferenceClient::new(connect(&security, INFERENCE).await?);
        let (stop, served, input) = (stop.clone(), served.clone(), sample(&r18.input_shape));
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let req = InferRequest {
                    task: "classify".into(),
                    input: Some(input.clone()),
                    budget_ms: 60_000,
                    ..Default::default()
                };
                if client.infer(req).await.is_ok() {
                    served.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut to_kernel = Vec::new();
    for i in 0..TOGGLES {
        let millicores = if i % 2 == 0 { 2000 } else { 1000 };
        let expected = format!("{} 10000", millicores * 10);
        let sent = Instant::now();
        control
            .apply_plan(ApplyPlanRequest { plan: Some(plan(2 + i as u64, millicores)), ..Default::default() })
            .await
            .context("resizing")?;
        while read_cpu_max(&dir)? != expected {
            ensure!(sent.elapsed() < Duration::from_secs(5), "cpu.max never became {expected}");
        }
        to_kernel.push(sent.elapsed().as_secs_f64() * 1e3);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    to_kernel.sort_by(f64::total_cmp);
    say(
        "resize.plan-to-cpu.max-ms",
        format!(
            "p50 {:.2} p99 {:.2} max {:.2} over {TOGGLES} resizes under load (emulated: TCG)",
            quantile(&to_kernel, 0.5),
            quantile(&to_kernel, 0.99),
            to_kernel[to_kernel.len() - 1]
        ),
    );

    // 4. Throttling at one core under load is in cpu.stat and in what the agent reports.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let reported = status(&mut control).await?.into_iter().next().context("the worker is gone")?;
    let in_kernel = nr_throttled(&dir)?;
    say("throttled.reported", reported.nr_throttled);
    say("throttled.cpu.stat", in_kernel);
    ensure!(reported.nr_throttled > 0, "the agent reports no throttling at one core under load");
    ensure!(reported.nr_throttled <= in_kernel, "the agent reports more throttling than the kernel");
    ensure!(reported.id == worker.id && reported.restarts == 0, "the worker was restarted by a resize");
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await?;
    }
    say("load.served", served.load(Ordering::Relaxed));
    ensure!(served.load(Ordering::Relaxed) > 0, "no request was served");

    // 5. Memory: a worker planned 8 MiB is limited to twice that (memory.max, in its own
    //    cgroup) and killed by the kernel's OOM killer as it loads its model; the agent counts
    //    the kill in what it reports (the controller raises the profile from that).
    const PLANNED: u64 = 8 << 20;
    let mut tight = plan_for(2 + TOGGLES as u64, "vm", "tight", 60_000, &[(&r18, 1000, 1)]);
    tight.assignments[0].memory_bytes = PLANNED;
    control
        .apply_plan(ApplyPlanRequest { plan: Some(tight), ..Default::default() })
        .await
        .context("applying the plan of 8 MiB")?;
    let deadline = Instant::now() + Duration::from_secs(300);
    let killed = loop {
        let workers = status(&mut control).await?;
        if let Some(w) = workers.iter().find(|w| w.task == "tight" && w.oom_kills > 0) {
            break w.clone();
        }
        ensure!(Instant::now() < deadline, "no OOM kill of the worker planned 8 MiB within 300 s: {workers:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    say("oom.kills", format!("{} (restarts {})", killed.oom_kills, killed.restarts));
    ensure!(killed.memory_bytes == PLANNED, "the worker reports {} bytes planned", killed.memory_bytes);
    let limit = Path::new(&killed.cgroup).join("memory.max");
    match std::fs::read_to_string(&limit) {
        Ok(max) => {
            say("oom.memory.max", max.trim());
            ensure!(max.trim() == (2 * PLANNED).to_string(), "memory.max is {max:?}, not twice the plan");
        }
        // Between a kill and the restart, the worker's cgroup may be gone.
        Err(e) => say("oom.memory.max", format!("not read ({e})")),
    }

    // 6. The quota write itself, through cgroups-rs, in this kernel.
    // In a unit of its own with a delegated cgroup, as the agent has; bounded in time.
    let out = Command::new("timeout")
        .args(["120", "systemd-run", "--wait", "--pipe", "--quiet", "-p", "Delegate=yes"])
        .args(["/usr/local/bin/tidal-resize-latency", "500"])
        .output()
        .context("resize_latency")?;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        say("resize.write", format!("{line} (emulated: TCG)"));
    }
    ensure!(out.status.success(), "resize_latency failed: {}", String::from_utf8_lossy(&out.stderr));

    // 7. Reload keeps the process; stop is clean and leaves no cgroup behind.
    systemctl(&["reload", UNIT])?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = unit_properties(&["ActiveState", "MainPID"])?;
    ensure!(property(&after, "ActiveState") == "active", "the agent is not active after a reload");
    ensure!(property(&after, "MainPID") == main_pid.to_string(), "reload restarted the agent");
    say("reload", "same process, still active");
    systemctl(&["stop", UNIT])?;
    let stopped = unit_properties(&["Result", "ExecMainStatus", "ActiveState"])?;
    for (k, v) in &stopped {
        say(&format!("stopped.{k}"), v);
    }
    ensure!(property(&stopped, "Result") == "success", "the agent did not stop cleanly");
    ensure!(!dir.exists(), "the worker's cgroup outlived the agent");

    // 8. How exposed the shipped units are, by systemd's own measure.
    for unit in ["tidal-agent.service", "tidal-controller.service"] {
        let out = Command::new("systemd-analyze").args(["security", unit]).output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        if let Some(line) = text.lines().find(|l| l.contains("Overall exposure level")) {
            say("security", line.trim_start_matches('→').trim());
        }
    }
    Ok(())
}

async fn connect(security: &Security, addr: &str) -> anyhow::Result<Channel> {
    // Both bounded: a TLS handshake that never completes is a failure with a reason, not a hang.
    let endpoint = security.endpoint(addr)?.connect_timeout(Duration::from_secs(60)).timeout(Duration::from_secs(60));
    Ok(endpoint.connect().await?)
}

async fn status(control: &mut AgentClient<Channel>) -> anyhow::Result<Vec<WorkerTelemetry>> {
    Ok(control.status(AgentStatusRequest {}).await?.into_inner().workers)
}

/// Waits (model loads are slow under emulation) until the plan's one worker serves.
async fn wait_worker(control: &mut AgentClient<Channel>) -> anyhow::Result<WorkerTelemetry> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let workers = status(control).await?;
        if let [w] = workers.as_slice() {
            if w.ready {
                return Ok(w.clone());
            }
        }
        if Instant::now() > deadline {
            bail!("the worker was not ready within 300 s: {workers:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn read_cpu_max(dir: &Path) -> anyhow::Result<String> {
    Ok(std::fs::read_to_string(dir.join("cpu.max"))?.trim().to_string())
}

fn nr_throttled(dir: &Path) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(dir.join("cpu.stat"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("nr_throttled "))
        .and_then(|v| v.trim().parse().ok())
        .context("cpu.stat has no nr_throttled")
}

fn quantile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}
