//! `tidalctl status` and `tidalctl history`: the cluster as the controller sees it.

use std::time::Duration;

use tidal_proto::v1::{ClusterStatus, ClusterStatusRequest, Plan, PlanHistoryRequest};

pub async fn run(controller: &str, watch: Option<f64>) -> anyhow::Result<()> {
    loop {
        let status = super::controller(controller).await?.status(ClusterStatusRequest {}).await?.into_inner();
        print!("{}", render(&status));
        match watch {
            Some(s) if s > 0.0 => {
                println!();
                tokio::time::sleep(Duration::from_secs_f64(s)).await;
            }
            _ => return Ok(()),
        }
    }
}

pub async fn history(controller: &str, limit: u32) -> anyhow::Result<()> {
    let history = super::controller(controller).await?.history(PlanHistoryRequest { limit }).await?.into_inner();
    for plan in &history.plans {
        print!("{}", render_plan(plan));
    }
    Ok(())
}

pub fn render(s: &ClusterStatus) -> String {
    let mut out = format!("leader {}  term {}\n", s.leader, s.term);
    out += "TASK        SLO ms   rate/s  forecast/s   p99 ms    served  errors  profiled\n";
    for t in &s.tasks {
        let spec = t.spec.clone().unwrap_or_default();
        out += &format!(
            "{:<10} {:>7} {:>8.1} {:>11.1} {:>8.1} {:>9} {:>7}  {}\n",
            spec.name,
            spec.slo_ms,
            t.rate_rps,
            t.forecast_rps,
            t.latency_p99_ms,
            t.served,
            t.errors,
            t.profiled_variants.join(",")
        );
        if spec.stages.len() > 1 {
            for st in &t.stages {
                out += &format!(
                    "  stage {:<12} {:>8.1}/s  served {:>9}  errors {:>7}  queue p99 {:>7.1} ms  p99 {:>7.1} ms\n",
                    st.stage, st.rate_rps, st.served, st.errors, st.queue_p99_ms, st.latency_p99_ms
                );
            }
        }
    }
    out += "NODE        ADDRESS              CORES  EPOCH  LAST REPORT\n";
    for n in &s.nodes {
        out += &format!(
            "{:<10} {:<20} {:>6} {:>6} {:>9.1} s{}\n",
            n.node,
            n.address,
            n.cores,
            n.applied_epoch,
            n.seconds_since_report,
            if n.draining { "  draining" } else { "" }
        );
        for w in &n.workers {
            out += &format!(
                "  {:<10} {:<18} {:<10} cores {:>4.1}  batch {:>3}  queue {:>4}  cpu {:>4.2}  throttled {:>6}  restarts {}{}\n",
                w.id,
                task_stage(&w.task, &w.stage),
                w.variant,
                w.millicores as f64 / 1000.0,
                w.max_batch,
                w.queue_len,
                w.cpu_usage_cores,
                w.nr_throttled,
                w.restarts,
                if w.ready { "" } else { "  (loading)" }
            );
        }
    }
    if let Some(plan) = &s.plan {
        out += &render_plan(plan);
    }
    out
}

pub fn render_plan(p: &Plan) -> String {
    let mut out = format!("plan epoch {} (term {})\n", p.epoch, p.term);
    for a in &p.assignments {
        let v = a.variant.clone().unwrap_or_default();
        out += &format!(
            "  {:<18} {:<10} on {:<8} cores {:>4.1}  batch {:>3}  delay {:>4} ms  share {:>5.1} %\n",
            task_stage(&a.task, &a.stage),
            v.name,
            a.node,
            a.millicores as f64 / 1000.0,
            a.max_batch,
            a.max_delay_ms,
            a.weight * 100.0
        );
    }
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
