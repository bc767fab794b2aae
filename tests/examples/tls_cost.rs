//! What mutual TLS costs on the request path: two agents serving the same resnet18 worker
//! (32×32, one core), one in plaintext and one on mutual TLS, driven by one client with
//! sequential requests in alternating blocks (plaintext, TLS, plaintext, …). Per pair of
//! blocks the ratio TLS / plaintext of p50 and p99; the median and spread of the ratios.
//!
//! `cargo run --release -p tidal-tests --example tls_cost -- [blocks] [requests per block]`

use tidal_auth::{Role, Security, TlsArgs};
use tidal_common::variant::VariantConfig;
use tidal_proto::v1::inference_client::InferenceClient;
use tidal_proto::v1::ApplyPlanRequest;
use tidal_tests::*;
use tonic::transport::Channel;

async fn block(client: &mut InferenceClient<Channel>, shape: &[i64], n: usize) -> (f64, f64) {
    let h = sequential_latencies(client, "t", shape, n).await;
    (h.value_at_quantile(0.5) as f64 / 1000.0, h.value_at_quantile(0.99) as f64 / 1000.0)
}

fn median_and_range(mut v: Vec<f64>) -> String {
    v.sort_by(f64::total_cmp);
    format!("{:.3} ({:.3}–{:.3})", v[v.len() / 2], v[0], v[v.len() - 1])
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1).map(|s| s.parse::<usize>().ok());
    let blocks = args.next().flatten().unwrap_or(10).max(2);
    let per_block = args.next().flatten().unwrap_or(200).max(10);
    assert!(tidal_tests::tls::test_ca().is_none(), "run without TIDAL_TEST_TLS: this compares both itself");
    let work = tempfile::tempdir().expect("a work directory");
    let models = work.path().join("models");
    generate_models(&models, "resnet18", 32);
    let r18 = VariantConfig::load(&models, "resnet18").expect("resnet18");

    let certs = work.path().join("certs");
    let ca = certs.join("ca");
    tidal_auth::certs::init(&ca, "tls-cost", 1).expect("a CA");
    let node = unique_node();
    let (agent_role, client_role) = (Role::Agent(node.clone()), Role::Admin("bench".into()));
    let mut files = Vec::new();
    for role in [&agent_role, &client_role] {
        tidal_auth::certs::issue(&ca, role, &["127.0.0.1".into()], &certs, 1).expect("a certificate");
        let (cert, key) = tidal_auth::certs::paths(&certs, role);
        files.push(TlsArgs {
            tls_ca: Some(ca.join("ca.pem")),
            tls_cert: Some(cert),
            tls_key: Some(key),
            ..Default::default()
        });
    }
    let flags: Vec<String> =
        [("--tls-ca", &files[0].tls_ca), ("--tls-cert", &files[0].tls_cert), ("--tls-key", &files[0].tls_key)]
            .iter()
            .flat_map(|(f, p)| [f.to_string(), p.as_ref().map(|p| p.display().to_string()).unwrap_or_default()])
            .collect();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let plain = start_agent(work.path(), AgentOpts { model_dir: &models, controller: None, extra: &[] });
    let tls = start_agent_named(work.path(), &node, AgentOpts { model_dir: &models, controller: None, extra: &flags });

    // The plan goes to the TLS agent as a controller would send it.
    tidal_auth::certs::issue(&ca, &Role::Controller(1), &["127.0.0.1".into()], &certs, 1).expect("a certificate");
    let (cert, key) = tidal_auth::certs::paths(&certs, &Role::Controller(1));
    let controller = Security::from_args(&TlsArgs {
        tls_ca: Some(ca.join("ca.pem")),
        tls_cert: Some(cert),
        tls_key: Some(key),
        ..Default::default()
    })
    .expect("controller identity");
    let connect = |security: &Security, addr: &str| {
        let endpoint = security.endpoint(addr).expect("endpoint");
        async move {
            loop {
                if let Ok(c) = endpoint.connect().await {
                    return c;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    };
    let plain_plan = plan_for(1, &plain.node, "t", 5000, &[(&r18, 1000, 1)]);
    agent_client(&plain.control_addr)
        .await
        .apply_plan(ApplyPlanRequest { plan: Some(plain_plan), ..Default::default() })
        .await
        .expect("plan");
    let tls_plan = plan_for(1, &tls.node, "t", 5000, &[(&r18, 1000, 1)]);
    let mut tls_control =
        tidal_proto::v1::agent_client::AgentClient::new(connect(&controller, &tls.control_addr).await);
    tls_control.apply_plan(ApplyPlanRequest { plan: Some(tls_plan), ..Default::default() }).await.expect("plan");
    wait_ready(&plain.control_addr, 1).await;
    loop {
        let s = tls_control.status(tidal_proto::v1::AgentStatusRequest {}).await.expect("status").into_inner();
        if s.workers.len() == 1 && s.workers[0].ready {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    let client_security = Security::from_args(&files[1]).expect("client identity");
    let mut clients =
        [inference_client(&plain.addr).await, InferenceClient::new(connect(&client_security, &tls.addr).await)];
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
    println!("resnet18 32×32, one core; {blocks} pairs of blocks of {per_block} sequential requests, plaintext then mutual TLS");
    println!("| pair | plaintext p50 | TLS p50 | plaintext p99 | TLS p99 |");
    println!("|---|---|---|---|---|");
    for (i, (a, b)) in rows.iter().enumerate() {
        println!("| {} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms |", i + 1, a.0, b.0, a.1, b.1);
    }
    println!(
        "TLS / plaintext, median (min–max) over pairs: p50 {}, p99 {}",
        median_and_range(p50s),
        median_and_range(p99s)
    );
}
