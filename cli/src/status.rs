//! `tidalctl status` and `tidalctl history`: the cluster as the controller sees it.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use crate::output::{self, Format};

use tidal_proto::v1::{ClusterStatus, ClusterStatusRequest, Plan, PlanHistoryRequest};

pub async fn run(controller: &str, watch: Option<f64>, format: Format) -> anyhow::Result<()> {
    if let Some(s) = watch {
        anyhow::ensure!(
            s > 0.0 && s <= 86_400.0,
            "--watch takes a number of seconds above 0 and at most 86400, not {s}"
        );
    }
    let Some(every) = watch else {
        let status = super::controller(controller).await?.status(ClusterStatusRequest {}).await?.into_inner();
        output::print(format, &status, render)?;
        return Ok(());
    };
    // On a terminal, --watch redraws in place on the alternate screen (the scrollback keeps
    // what was there before) until Ctrl-C; into a pipe or file it appends timestamped frames.
    let redraw = format == Format::Table && std::io::stdout().is_terminal();
    if redraw {
        print!("\x1b[?1049h");
    }
    let watched = tokio::select! {
        r = frames(controller, every, format, redraw) => r,
        _ = tokio::signal::ctrl_c() => Ok(()),
    };
    if redraw {
        print!("\x1b[?1049l");
        std::io::stdout().flush()?;
    }
    watched
}

/// Every `every` seconds, the cluster's status under the time it was read.
async fn frames(controller: &str, every: f64, format: Format, redraw: bool) -> anyhow::Result<()> {
    loop {
        let status = super::controller(controller).await?.status(ClusterStatusRequest {}).await?.into_inner();
        let now = jiff::Zoned::now().strftime("%Y-%m-%d %H:%M:%S %Z");
        if redraw {
            print!("\x1b[H\x1b[2J");
        }
        if format == Format::Table {
            println!("{now}, every {every} s (Ctrl-C to stop)");
        }
        output::print(format, &status, render)?;
        if !redraw {
            println!();
        }
        std::io::stdout().flush()?;
        tokio::time::sleep(Duration::from_secs_f64(every)).await;
    }
}

pub async fn history(controller: &str, limit: u32, format: Format) -> anyhow::Result<()> {
    let history = super::controller(controller).await?.history(PlanHistoryRequest { limit }).await?.into_inner();
    output::print(format, &history, |h| h.plans.iter().map(render_plan).collect())
}

/// A node's memory: what the plan gives its workers of what it declared ("-": none declared).
fn node_memory(n: &tidal_proto::v1::NodeStatus) -> String {
    use tidal_common::memory::human;
    match n.memory_bytes {
        0 => "-".into(),
        declared => format!("{} of {}", human(n.memory_planned_bytes), human(declared)),
    }
}

/// A task's share of the cluster: its weight, its minimum and maximum cores when set, and
/// its idle time when it is unloaded when idle ("w1", "w2 1–8c", "w0 ≥1c", "w1 idle→0 300s").
fn share(share: Option<&tidal_proto::v1::TaskShare>) -> String {
    let s = share.cloned().unwrap_or_default();
    let w = s.weight.unwrap_or(1.0);
    let cores = match (s.min_cores, s.max_cores) {
        (0, 0) => format!("w{w}"),
        (min, 0) => format!("w{w} ≥{min}c"),
        (min, max) => format!("w{w} {min}–{max}c"),
    };
    let spec = tidal_proto::v1::TaskSpec { share: Some(s), ..Default::default() };
    match tidal_common::task::unloads_after_s(&spec) {
        Some(after_s) => format!("{cores} idle→0 {after_s:.0}s"),
        None => cores,
    }
}

/// The profiled variants, each with the factor its served batches correct it by, when they
/// do ("small×1.21,big").
fn profiled(t: &tidal_proto::v1::TaskStatus) -> String {
    let with_factor = |v: &String| match t.corrections.iter().find(|c| &c.variant == v) {
        Some(c) if (c.factor - 1.0).abs() >= 0.005 => format!("{v}×{:.2}", c.factor),
        _ => v.clone(),
    };
    t.profiled_variants.iter().map(with_factor).collect::<Vec<_>>().join(",")
}

pub fn render(s: &ClusterStatus) -> String {
    let mut out = format!("leader {}  term {}\n", s.leader, s.term);
    let (mut tasks, mut rollouts) = (Vec::new(), Vec::new());
    for t in &s.tasks {
        let spec = t.spec.clone().unwrap_or_default();
        let version = match t.earlier_versions.as_slice() {
            [] => spec.version.max(1).to_string(),
            kept => format!(
                "{} (kept {})",
                spec.version.max(1),
                kept.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
            ),
        };
        tasks.push(vec![
            spec.name.clone(),
            version,
            spec.slo_ms.to_string(),
            share(spec.share.as_ref()),
            format!("{:.1}", t.rate_rps),
            format!("{:.1}", t.forecast_rps),
            format!("{:.1}", t.planned_rps),
            format!("{:.1}", t.latency_p99_ms),
            t.served.to_string(),
            t.errors.to_string(),
            profiled(t),
        ]);
        if t.rollout.is_some() {
            let progress = if t.rollout_progress.is_empty() { "starting" } else { t.rollout_progress.as_str() };
            rollouts.push(format!("rollout of {}: {progress}\n", spec.name));
        }
        if spec.stages.len() > 1 {
            for st in &t.stages {
                tasks.push(vec![
                    format!("  {}/{}", spec.name, st.stage),
                    String::new(),
                    String::new(),
                    String::new(),
                    format!("{:.1}", st.rate_rps),
                    String::new(),
                    String::new(),
                    format!("{:.1}", st.latency_p99_ms),
                    st.served.to_string(),
                    st.errors.to_string(),
                    format!("queue p99 {:.1} ms", st.queue_p99_ms),
                ]);
            }
        }
    }
    out += &output::table(
        &[
            "TASK",
            "VERSION",
            "SLO ms",
            "SHARE",
            "RATE/s",
            "FORECAST/s",
            "PLANNED/s",
            "P99 ms",
            "SERVED#",
            "ERRORS#",
            "PROFILED",
        ],
        tasks,
    );
    out.extend(rollouts);
    let nodes = s
        .nodes
        .iter()
        .map(|n| {
            vec![
                n.node.clone(),
                n.address.clone(),
                n.cores.to_string(),
                node_memory(n),
                n.applied_epoch.to_string(),
                format!("{:.1} s", n.seconds_since_report),
                n.last_push.as_ref().map_or_else(String::new, |p| match p.held.len() {
                    0 => format!("{} {}", p.outcome, p.epoch),
                    held => format!("{} {}, {held} held", p.outcome, p.epoch),
                }),
                if n.draining { "draining".into() } else { String::new() },
            ]
        })
        .collect();
    out +=
        &output::table(&["NODE", "ADDRESS", "CORES#", "MEMORY", "EPOCH#", "LAST REPORT", "LAST PUSH", "STATE"], nodes);
    // What the last push left undone, and why, under the table.
    for n in &s.nodes {
        let Some(p) = &n.last_push else { continue };
        if !p.detail.is_empty() {
            out += &format!("  {}: plan {} {} {:.0} s ago: {}\n", n.node, p.epoch, p.outcome, p.seconds_ago, p.detail);
        }
        for held in &p.held {
            out += &format!("  {} holds {held}\n", n.node);
        }
    }
    let workers = s
        .nodes
        .iter()
        .flat_map(|n| n.workers.iter().map(move |w| (n, w)))
        .map(|(n, w)| {
            vec![
                n.node.clone(),
                w.id.clone(),
                task_stage(&w.task, &w.stage),
                w.variant.clone(),
                format!("{:.1}", w.millicores as f64 / 1000.0),
                w.max_batch.to_string(),
                w.queue_len.to_string(),
                format!("{:.2}", w.cpu_usage_cores),
                w.nr_throttled.to_string(),
                w.restarts.to_string(),
                match w.memory_bytes {
                    0 => "-".into(),
                    m => tidal_common::memory::human(m),
                },
                match (w.ready, w.oom_kills) {
                    (true, 0) => "ready".into(),
                    (false, 0) => "loading".into(),
                    (ready, kills) => {
                        format!("{}, {kills} OOM-killed", if ready { "ready" } else { "loading" })
                    }
                },
            ]
        })
        .collect::<Vec<_>>();
    if !workers.is_empty() {
        out += &output::table(
            &[
                "NODE",
                "WORKER",
                "TASK",
                "VARIANT",
                "CORES#",
                "BATCH#",
                "QUEUE#",
                "CPU#",
                "THROTTLED#",
                "RESTARTS#",
                "MEMORY",
                "STATE",
            ],
            workers,
        );
    }
    if let Some(plan) = &s.plan {
        out += &render_plan(plan);
    }
    out
}

pub fn render_plan(p: &Plan) -> String {
    let mut out = format!("plan epoch {} (term {})\n", p.epoch, p.term);
    let rows = p
        .assignments
        .iter()
        .map(|a| {
            vec![
                format!("  {}", task_stage(&a.task, &a.stage)),
                a.variant.as_ref().map(|v| v.name.clone()).unwrap_or_default(),
                a.node.clone(),
                format!("{:.1}", a.millicores as f64 / 1000.0),
                a.max_batch.to_string(),
                a.max_delay_ms.to_string(),
                format!("{:.1} %", a.weight * 100.0),
            ]
        })
        .collect();
    out += &output::table(&["  TASK", "VARIANT", "NODE", "CORES#", "BATCH#", "DELAY ms", "SHARE#"], rows);
    for n in &p.notes {
        out += &format!("  note: {n}\n");
    }
    out
}

/// A task, or a task's stage when it has several (a one-stage task's stage bears its name).
fn task_stage(task: &str, stage: &str) -> String {
    if stage.is_empty() || stage == task {
        task.to_string()
    } else {
        format!("{task}/{stage}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidal_proto::v1::{NodeStatus, PushAnswer};

    #[test]
    fn the_status_says_how_each_node_answered_its_last_push() {
        let node = |name: &str, last_push: Option<PushAnswer>| NodeStatus {
            node: name.into(),
            address: format!("{name}:7100"),
            cores: 2,
            applied_epoch: 4,
            last_push,
            ..Default::default()
        };
        let held = PushAnswer {
            epoch: 5,
            outcome: "applied".into(),
            held: vec!["t: variant \"x\": x.onnx is missing".into()],
            seconds_ago: 1.0,
            ..Default::default()
        };
        let refused = PushAnswer {
            epoch: 5,
            outcome: "refused".into(),
            detail: "NotAMember".into(),
            seconds_ago: 2.0,
            ..Default::default()
        };
        let s = ClusterStatus {
            nodes: vec![node("n1", Some(held)), node("n2", Some(refused)), node("n3", None)],
            ..Default::default()
        };
        let out = render(&s);
        assert!(out.contains("applied 5, 1 held"), "{out}");
        assert!(out.contains("  n1 holds t: variant \"x\": x.onnx is missing"), "{out}");
        assert!(out.contains("  n2: plan 5 refused 2 s ago: NotAMember"), "{out}");
        assert!(!out.contains("n3 holds") && !out.contains("n3: plan"), "{out}");
    }
}
