//! The ports under attack, tried from outside: silent and half-open connections on every port
//! of an agent and a controller (plain TCP that never starts TLS, half a ClientHello, half a
//! request line), a flood of connections past the cap, and large uploads without the token.
//! Each port closes what stays silent past `--silent-timeout-s`, makes room by closing the
//! connection silent the longest, and keeps serving legitimate requests meanwhile.

use std::time::{Duration, Instant};

use tidal_proto::v1::{ClusterStatusRequest, InferRequest};
use tidal_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::Code;

const TOKEN: &str = "edge-token-0123456789abcdef";

/// What an attacker leaves on a connection: nothing, the start of a TLS ClientHello, or the
/// start of an HTTP/1.1 request.
const OPENINGS: [&[u8]; 3] =
    [b"", b"\x16\x03\x01\x02\x00\x01", b"POST /v2/models/classify/infer HTTP/1.1\r\nHost: x\r\n"];

async fn open_silent(addr: &str, n: usize) -> Vec<TcpStream> {
    let mut held = Vec::new();
    for i in 0..n {
        if let Ok(mut s) = TcpStream::connect(addr).await {
            let _ = s.write_all(OPENINGS[i % OPENINGS.len()]).await;
            held.push(s);
        }
    }
    held
}

/// How many of `conns` the server has closed (EOF or reset) within `within`.
async fn closed(conns: &mut [TcpStream], within: Duration) -> usize {
    let deadline = tokio::time::Instant::now() + within;
    let mut n = 0;
    for c in conns.iter_mut() {
        let mut buf = [0u8; 256];
        loop {
            match tokio::time::timeout_at(deadline, c.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    n += 1;
                    break;
                }
                Ok(Ok(_)) => continue, // an answer (an HTTP error, a TLS alert): read on to the close
                Err(_) => break,
            }
        }
    }
    n
}

fn token_request(input: tidal_proto::v1::Tensor) -> tonic::Request<InferRequest> {
    let mut r = tonic::Request::new(InferRequest {
        task: "classify".into(),
        input: Some(input),
        budget_ms: 0,
        ..Default::default()
    });
    tidal_auth::Token::new(TOKEN).unwrap().attach(r.metadata_mut());
    r
}

/// Latencies (ms) of `n` sequential requests with the token.
async fn latencies(
    client: &mut tidal_proto::v1::inference_client::InferenceClient<tonic::transport::Channel>,
    shape: &[i64],
    n: usize,
) -> Vec<f64> {
    let mut out = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        client.infer(token_request(sample(shape))).await.expect("a legitimate request is served");
        out.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    out
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_floods_and_unauthenticated_uploads_leave_legitimate_requests_served() {
    let _turn = tidal_tests::file_turn(module_path!());
    let work = tempfile::tempdir().unwrap();
    let models = work.path().join("models");
    generate_models(&models, "resnet18", 32);
    let r18 = tidal_common::variant::VariantConfig::load(&models, "resnet18").unwrap();
    let token_file = work.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let token_flag = token_file.display().to_string();
    let limits = ["--silent-timeout-s", "4", "--max-connections", "64", "--max-connections-per-peer", "48"];
    let controller =
        start_controller_ready(work.path(), 3600.0, &[&limits[..], &["--metrics-listen", "127.0.0.1:0"]].concat());
    let agent_extra =
        [&limits[..], &["--metrics-listen", "127.0.0.1:0", "--inference-token-file", &token_flag]].concat();
    let agent = start_agent(work.path(), AgentOpts { model_dir: &models, controller: None, extra: &agent_extra });
    let plan = plan_for(1, &agent.node, "classify", 2000, &[(&r18, 1000, 1)]);
    let request = tidal_proto::v1::ApplyPlanRequest { plan: Some(plan), ..Default::default() };
    agent_client(&agent.control_addr).await.apply_plan(request).await.unwrap();
    wait_ready(&agent.control_addr, 1).await;
    let mut infer = inference_client(&agent.addr).await;
    let mut ctl = controller_client(&controller.addr).await;
    latencies(&mut infer, &r18.input_shape, 10).await; // warm up
    let mut quiet = latencies(&mut infer, &r18.input_shape, 60).await;

    // Every port: more silent connections than one peer may hold. The legitimate clients'
    // connections are in use and stay; the silent ones make room for each other.
    let ports = [
        agent.addr.clone(),
        agent.control_addr.clone(),
        agent.metrics_addr.clone().unwrap(),
        controller.addr.clone(),
        controller.peer.clone(),
        controller.metrics.clone().unwrap(),
    ];
    let attack = Instant::now();
    let mut held = Vec::new();
    for port in &ports {
        held.push(open_silent(port, 80).await);
    }
    let mut attacked = latencies(&mut infer, &r18.input_shape, 60).await;
    ctl.status(ClusterStatusRequest {}).await.expect("the controller answers during the attack");
    // A fresh legitimate connection gets in too once the silent ones have been silent a
    // moment (a connection younger than a second counts as in use): the longest silent one
    // makes room.
    tokio::time::sleep(Duration::from_millis(1500).saturating_sub(attack.elapsed())).await;
    let mut fresh = inference_client(&agent.addr).await;
    fresh.infer(token_request(sample(&r18.input_shape))).await.expect("a new client is served during the flood");

    // Past the silence limit, every silent connection is closed.
    for (port, conns) in ports.iter().zip(held.iter_mut()) {
        let n = closed(conns, Duration::from_secs(10)).await;
        assert_eq!(n, conns.len(), "{port}: {n} of {} silent connections closed", conns.len());
    }

    let (q, a) = (percentile(&mut quiet, 0.99), percentile(&mut attacked, 0.99));
    eprintln!("p99 quiet {q:.1} ms, under silent connections {a:.1} ms");
    assert!(a <= 2.0 * q + 10.0, "p99 {a:.1} ms under attack against {q:.1} ms quiet");

    // Large uploads without the token: refused from the headers, before the message is read,
    // so the agent's memory does not grow with them.
    let pid = agent.proc.child.id();
    let before = rss_bytes(pid);
    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let sampling = sampling.clone();
        tokio::spawn(async move {
            let mut peak = 0;
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(rss_bytes(pid));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            peak
        })
    };
    let big = sample(&[3, 2048, 2048]); // 48 MiB of f32
    let mut uploads = Vec::new();
    for _ in 0..8 {
        let mut client = inference_client(&agent.addr).await;
        let input = big.clone();
        uploads.push(tokio::spawn(async move {
            let r = tonic::Request::new(InferRequest {
                task: "classify".into(),
                input: Some(input),
                budget_ms: 0,
                ..Default::default()
            });
            client.infer(r).await.map(|_| ()).map_err(|s| s.code())
        }));
    }
    for u in uploads {
        let code = u.await.unwrap().expect_err("no token, no service");
        assert!(matches!(code, Code::Unauthenticated | Code::Unavailable | Code::Cancelled), "{code:?}");
    }
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.await.unwrap().max(before);
    eprintln!("agent RSS {} MiB before the uploads, {} MiB at most after", before >> 20, peak >> 20);
    assert!(
        peak < before + (100 << 20),
        "8 unauthenticated 48 MiB uploads grew the agent from {before} to {peak} bytes"
    );
    infer.infer(token_request(sample(&r18.input_shape))).await.expect("still served");
}

/// Memory admitted per request: with room for two requests in flight, a burst of 32 at once
/// has the ones beyond it refused at once (RESOURCE_EXHAUSTED, naming the limit) instead of
/// held, the rest served; once answered, the bytes are given back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_hold_at_most_the_memory_admitted_to_them() {
    let _turn = tidal_tests::file_turn(module_path!());
    let work = tempfile::tempdir().unwrap();
    let models = work.path().join("models");
    generate_models(&models, "resnet18", 64);
    let r18 = tidal_common::variant::VariantConfig::load(&models, "resnet18").unwrap();
    // A 3×64×64 float request is 48 KiB and a little: two fit in 100 KiB, three do not.
    let extra = ["--max-request-bytes", "51200", "--max-inflight-bytes", "102400", "--metrics-listen", "127.0.0.1:0"];
    let agent = start_agent(work.path(), AgentOpts { model_dir: &models, controller: None, extra: &extra });
    let plan = plan_for(1, &agent.node, "classify", 5000, &[(&r18, 1000, 1)]);
    let request = tidal_proto::v1::ApplyPlanRequest { plan: Some(plan), ..Default::default() };
    agent_client(&agent.control_addr).await.apply_plan(request).await.unwrap();
    wait_ready(&agent.control_addr, 1).await;
    let infer = inference_client(&agent.addr).await;
    let one = || {
        let mut infer = infer.clone();
        let input = sample(&r18.input_shape);
        async move {
            infer
                .infer(InferRequest { task: "classify".into(), input: Some(input), budget_ms: 0, ..Default::default() })
                .await
        }
    };
    one().await.expect("one request alone is served");
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..32 {
        tasks.spawn(one());
    }
    let burst = tasks.join_all().await;
    let served = burst.iter().filter(|r| r.is_ok()).count();
    let refused: Vec<&tonic::Status> = burst.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(served >= 2, "{served} served");
    assert!(!refused.is_empty(), "32 requests of 48 KiB at once in 100 KiB: some must be refused");
    for status in &refused {
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(status.message().contains("--max-inflight-bytes"), "{status:?}");
    }
    let metrics = agent.metrics_addr.clone().unwrap();
    let text = http_exchange(&metrics, "GET", "/metrics", &[], b"").await.2;
    let text = String::from_utf8_lossy(&text);
    let held = text.lines().find(|l| l.starts_with("tidal_agent_inflight_request_bytes ")).expect("the gauge");
    assert_eq!(held, "tidal_agent_inflight_request_bytes 0", "every admitted byte given back");
    one().await.expect("served again once the burst is answered");
    eprintln!("a burst of 32: {served} served, {} refused for memory", refused.len());
}
