//! What operators scrape and read: both daemons' metrics pass `promtool check metrics` in
//! the classic text format (OpenMetrics when asked for), include `process_*` and
//! `tidal_build_info`; `/healthz` and `/readyz` answer; the shipped Prometheus configuration
//! and rules pass `promtool check`; every metric the Grafana dashboard draws exists; JSON logs
//! are one JSON object per line.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use tidal_proto::v1::InferRequest;
use tidal_tests::*;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// promtool from PATH or where scripts/test-deps.sh unpacked it.
fn promtool() -> Option<PathBuf> {
    let local = repo().join(".tidal/tools/bin/promtool");
    if local.exists() {
        return Some(local);
    }
    Command::new("promtool").arg("--version").output().ok().map(|_| PathBuf::from("promtool"))
}

/// `GET path` over HTTP/1.0: (status code, content type, body).
fn get(addr: &str, path: &str, accept: Option<&str>) -> Option<(u16, String, String)> {
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let accept = accept.map(|a| format!("Accept: {a}\r\n")).unwrap_or_default();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n{accept}\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let content_type = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-type:").map(|v| v.trim().to_string()))
        .unwrap_or_default();
    Some((status, content_type, body.to_string()))
}

async fn wait_status(addr: &str, path: &str, status: u16) {
    eventually(Duration::from_secs(30), &format!("{path} on {addr} answers {status}"), || async {
        get(addr, path, None).filter(|(s, _, _)| *s == status).map(|_| ())
    })
    .await;
}

fn check_with_promtool(promtool: &Path, what: &str, body: &str) {
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    child.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics fails on the {what}'s metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Metric family names in a text exposition (from its TYPE lines).
fn families(text: &str) -> Vec<String> {
    text.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next().map(str::to_string)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_health_and_logs_follow_the_conventions_operators_expect() {
    let _turn = tidal_tests::file_turn(module_path!());
    let s = setup(&[]);
    let work = s.work.path();
    let agent = start_agent(
        work,
        AgentOpts {
            model_dir: &work.join("models"),
            controller: None,
            extra: &["--metrics-listen", "127.0.0.1:0", "--log-format", "json"],
        },
    );
    let agent_metrics = agent.metrics_addr.clone().expect("the agent's metrics port");
    let controller = start_controller_ready(work, 1.0, &["--metrics-listen", "127.0.0.1:0"]);
    let controller_metrics = controller.metrics.clone().expect("the controller's metrics port");

    // Health and readiness: the agent without a controller is ready once it listens; the
    // controller once it knows a leader (itself, alone).
    wait_status(&agent_metrics, "/healthz", 200).await;
    wait_status(&agent_metrics, "/readyz", 200).await;
    wait_status(&controller_metrics, "/readyz", 200).await;
    assert_eq!(get(&controller_metrics, "/healthz", None).map(|r| r.0), Some(200));

    // A worker serving a few requests, so that every agent series has a sample.
    let mut control = agent_client(&agent.control_addr).await;
    let plan = plan_for(1, &agent.node, "classify", 10_000, &[(&s.r18, 1000, 1)]);
    control.apply_plan(tidal_proto::v1::ApplyPlanRequest { plan: Some(plan), ..Default::default() }).await.unwrap();
    wait_ready(&agent.control_addr, 1).await;
    let mut client = inference_client(&agent.addr).await;
    for _ in 0..5 {
        let req = InferRequest {
            task: "classify".into(),
            input: Some(sample(&s.r18.input_shape)),
            budget_ms: 10_000,
            ..Default::default()
        };
        client.infer(req).await.expect("served");
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let (status, content_type, agent_text) = get(&agent_metrics, "/metrics", None).expect("agent metrics");
    assert_eq!(status, 200);
    assert!(content_type.starts_with("text/plain; version=0.0.4"), "{content_type}");
    let (_, _, controller_text) = get(&controller_metrics, "/metrics", None).expect("controller metrics");
    for text in [&agent_text, &controller_text] {
        for name in
            ["process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds", "tidal_build_info"]
        {
            assert!(text.contains(&format!("\n{name}")), "{name} is missing:\n{text}");
        }
    }
    assert!(agent_text.contains("tidal_agent_requests_total{task=\"classify\",outcome=\"ok\"} 5"), "{agent_text}");
    assert!(agent_text.contains("# TYPE tidal_agent_worker_cpu_throttled_periods_total counter"), "{agent_text}");
    assert!(agent_text.contains("tidal_agent_worker_cpu_limit_cores{"), "{agent_text}");
    let (_, om_type, om) = get(&agent_metrics, "/metrics", Some("application/openmetrics-text")).unwrap();
    assert!(om_type.starts_with("application/openmetrics-text") && om.ends_with("# EOF\n"), "{om_type}");

    // The dashboard draws only metrics that exist.
    let mut known = families(&agent_text);
    known.extend(families(&controller_text));
    let dashboard = std::fs::read_to_string(repo().join("deploy/grafana/tidal-dashboard.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    let mut drawn = 0;
    for panel in json["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("an expression");
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("tidal_") || word.starts_with("process_") {
                    let family = word.trim_end_matches("_bucket");
                    assert!(known.iter().any(|k| k == family), "the dashboard draws {word}, which no daemon exports");
                    drawn += 1;
                }
            }
        }
    }
    assert!(drawn >= 10, "the dashboard draws {drawn} metrics");

    // JSON logs: every line an object with a level and a message.
    let log = std::fs::read_dir(work)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            name.starts_with(&format!("{}-", agent.node)) && name.ends_with(".log")
        })
        .expect("the agent's log");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.lines().count() > 2, "{text}");
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["level"].is_string() && v["fields"]["message"].is_string(), "{line}");
    }

    let Some(promtool) = promtool() else {
        eprintln!("SKIPPED (not run): promtool is missing (scripts/test-deps.sh unpacks it); the formats were not checked by it");
        return;
    };
    check_with_promtool(&promtool, "agent", &agent_text);
    check_with_promtool(&promtool, "controller", &controller_text);
    for (what, file) in [("config", "deploy/prometheus/prometheus.yml"), ("rules", "deploy/prometheus/tidal-rules.yml")]
    {
        let out = Command::new(&promtool).args(["check", what]).arg(repo().join(file)).output().unwrap();
        assert!(out.status.success(), "promtool check {what} {file}:\n{}", String::from_utf8_lossy(&out.stdout));
    }
}
