//! What the edge's limits cost on the request path (issue 22): the agent built before them
//! (`TIDAL_BASELINE_AGENT`, e.g. commit 2e51307) against this one, both on mutual TLS with an
//! inference token, serving the same resnet18 worker (32×32, one core). One client sends
//! sequential requests (its certificate and the token) in alternating blocks, baseline then
//! current; per pair the ratio current / baseline of p50 and p99, then their median and spread.
//! The current agent pays for the connection wrapper (caps, silence), the token read from the
//! headers before the message and the revocation lookup of the caller's certificate.
//!
//! `TIDAL_BASELINE_AGENT=/path/to/old/tidal-agent cargo run --release -p tidal-tests --example limits_cost -- [blocks] [requests per block]`

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tidal_auth::{Role, Security, TlsArgs, Token};
use tidal_common::variant::VariantConfig;
use tidal_proto::v1::agent_client::AgentClient;
use tidal_proto::v1::inference_client::InferenceClient;
use tidal_proto::v1::{AgentStatusRequest, ApplyPlanRequest, InferRequest};
use tidal_tests::*;
use tonic::transport::Channel;

const TOKEN: &str = "limits-cost-token-0123456789";

async fn connect(security: &Security, addr: &str) -> Channel {
    let endpoint = security.endpoint(addr).expect("endpoint");
    loop {
        if let Ok(c) = endpoint.connect().await {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// p50 and p99 (ms) of `n` sequential requests carrying the token.
async fn block(client: &mut InferenceClient<Channel>, shape: &[i64], n: usize) -> (f64, f64) {
    let mut h = hdrhistogram::Histogram::<u64>::new(3).expect("histogram");
    let token = Token::new(TOKEN).expect("token");
    for _ in 0..n {
        let mut request = tonic::Request::new(InferRequest {
            task: "t".into(),
            input: Some(sample(shape)),
            budget_ms: 0,
            ..Default::default()
        });
        token.attach(request.metadata_mut());
        let started = Instant::now();
        client.infer(request).await.expect("served");
        h.record(started.elapsed().as_micros() as u64).expect("recorded");
    }
    (h.value_at_quantile(0.5) as f64 / 1000.0, h.value_at_quantile(0.99) as f64 / 1000.0)
}

fn median_and_range(mut v: Vec<f64>) -> String {
    v.sort_by(f64::total_cmp);
    format!("{:.3} ({:.3}–{:.3})", v[v.len() / 2], v[0], v[v.len() - 1])
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let baseline = PathBuf::from(
        std::env::var_os("TIDAL_BASELINE_AGENT").expect("TIDAL_BASELINE_AGENT: the agent binary to compare against"),
    );
    let mut args = std::env::args().skip(1).map(|s| s.parse::<usize>().ok());
    let blocks = args.next().flatten().unwrap_or(10).max(2);
    let per_block = args.next().flatten().unwrap_or(200).max(10);
    assert!(tidal_tests::tls::test_ca().is_none(), "run without TIDAL_TEST_TLS: this sets up its own CA");
    let work = tempfile::tempdir().expect("a work directory");
    let models = work.path().join("models");
    generate_models(&models, "resnet18", 32);
    let r18 = VariantConfig::load(&models, "resnet18").expect("resnet18");
    let token_file = work.path().join("token");
    std::fs::write(&token_file, TOKEN).expect("token file");

    let certs = work.path().join("certs");
    let ca = certs.join("ca");
    tidal_auth::certs::init(&ca, "limits-cost", 1).expect("a CA");
    let (old_node, new_node) = (unique_node(), unique_node());
    let roles = [
        Role::Agent(old_node.clone()),
        Role::Agent(new_node.clone()),
        Role::Admin("bench".into()),
        Role::Controller(1),
    ];
    for role in &roles {
        tidal_auth::certs::issue(&ca, role, &["127.0.0.1".into()], &certs, 1).expect("a certificate");
    }
    let args_of = |role: &Role| TlsArgs { tls_ca: Some(ca.join("ca.pem")), ..TlsArgs::issued(&certs, role) };
    let start = |binary: &std::path::Path, role: &Role, node: &str| {
        let mut flags = args_of(role).to_flags();
        flags.extend(["--inference-token-file".to_string(), token_file.display().to_string()]);
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        start_agent_binary(
            binary,
            work.path(),
            node,
            AgentOpts { model_dir: &models, controller: None, extra: &flags },
            &[],
        )
    };
    let old = start(&baseline, &roles[0], &old_node);
    let new = start(&bin("tidal-agent"), &roles[1], &new_node);

    let controller = Security::from_args(&args_of(&roles[3])).expect("controller identity");
    for agent in [&old, &new] {
        let mut control = AgentClient::new(connect(&controller, &agent.control_addr).await);
        let plan = plan_for(1, &agent.node, "t", 5000, &[(&r18, 1000, 1)]);
        control.apply_plan(ApplyPlanRequest { plan: Some(plan), ..Default::default() }).await.expect("plan");
        loop {
            let s = control.status(AgentStatusRequest {}).await.expect("status").into_inner();
            if s.workers.len() == 1 && s.workers[0].ready {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    let client = Security::from_args(&args_of(&roles[2])).expect("client identity");
    let mut clients = [
        InferenceClient::new(connect(&client, &old.addr).await),
        InferenceClient::new(connect(&client, &new.addr).await),
    ];
    for c in clients.iter_mut() {
        block(c, &r18.input_shape, 50).await; // warm up
    }
    let (mut p50s, mut p99s, mut rows) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..blocks {
        let a = block(&mut clients[0], &r18.input_shape, per_block).await;
        let b = block(&mut clients[1], &r18.input_shape, per_block).await;
        p50s.push(b.0 / a.0);
        p99s.push(b.1 / a.1);
        rows.push((a, b));
    }
    println!(
        "resnet18 32×32, one core, mutual TLS and a token; {blocks} pairs of blocks of {per_block} sequential \
         requests, baseline ({}) then current",
        baseline.display()
    );
    println!("| pair | baseline p50 | current p50 | baseline p99 | current p99 |");
    println!("|---|---|---|---|---|");
    for (i, (a, b)) in rows.iter().enumerate() {
        println!("| {} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms |", i + 1, a.0, b.0, a.1, b.1);
    }
    println!(
        "current / baseline, median (min–max) over pairs: p50 {}, p99 {}",
        median_and_range(p50s),
        median_and_range(p99s)
    );
}
