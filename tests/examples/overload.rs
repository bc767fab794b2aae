//! Goodput under overload, measured: one agent serving resnet18 (64×64) on one core (or what
//! `--variant` and `--millicores` say), offered
//! 1×, 2×, 5× and 10× what that worker carries, open loop. For each factor it reports the
//! requests answered within their deadline per second against the worker's capacity
//! (goodput), the p99 of those answers, how the rest were refused (early, RESOURCE_EXHAUSTED,
//! or DEADLINE_EXCEEDED) and how long a refusal took, and the agent's status latency while
//! overloaded (does the control plane stay responsive?).
//!
//! Capacity is measured first, closed loop (enough requests in flight to keep full batches).
//! The load generator runs on the same machine as the agent: the worker's quota is one core,
//! the agent and the generator share the other.
//!
//! `cargo run --release -p tidal-tests --example overload -- --seconds 10`

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use tidal_proto::v1::{AgentStatusRequest, InferRequest};
use tidal_tests::*;
use tonic::Code;

#[derive(Parser)]
struct Args {
    /// Seconds of load per factor.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Overload factors to offer, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2,5,10")]
    factors: Vec<f64>,
    /// Latency budget of every request, ms.
    #[arg(long, default_value_t = 250)]
    budget_ms: u32,
    /// Largest batch of the worker.
    #[arg(long, default_value_t = 4)]
    batch: u32,
    /// The worker's variant: resnet18 or resnet50.
    #[arg(long, default_value = "resnet18")]
    variant: String,
    /// The worker's CPU quota, millicores.
    #[arg(long, default_value_t = 1000)]
    millicores: u32,
    /// Instead of overloading: N pairs of (the agent's profiler at this quota and batch, the
    /// serving worker's closed-loop capacity), interleaved, each pair's ratio printed.
    #[arg(long)]
    against_profile: Option<u32>,
    /// Seconds the profiler measures a point (with --against-profile).
    #[arg(long, default_value_t = 3.0)]
    profile_seconds: f64,
}

#[derive(Clone, Copy)]
struct Outcome {
    latency: Duration,
    code: Code,
}

async fn call(
    client: &mut tidal_proto::v1::inference_client::InferenceClient<tonic::transport::Channel>,
    req: InferRequest,
) -> Outcome {
    let sent = Instant::now();
    let code = match client.infer(req).await {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    };
    Outcome { latency: sent.elapsed(), code }
}

/// Requests answered per second with `in_flight` requests outstanding at all times.
async fn capacity(addr: &str, req: &InferRequest, in_flight: usize, seconds: f64) -> f64 {
    let until = Instant::now() + Duration::from_secs_f64(seconds);
    let ok = Arc::new(Mutex::new(0u64));
    let tasks: Vec<_> = (0..in_flight)
        .map(|_| {
            let (addr, req, ok) = (addr.to_string(), req.clone(), ok.clone());
            tokio::spawn(async move {
                let mut client = inference_client(&addr).await;
                while Instant::now() < until {
                    if call(&mut client, req.clone()).await.code == Code::Ok {
                        *ok.lock().unwrap() += 1;
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    let n = *ok.lock().unwrap();
    n as f64 / seconds
}

/// Offers `rate` requests per second, evenly spaced, for `seconds`; also times the agent's
/// status call every 200 ms.
async fn offer(addr: &str, control: &str, req: &InferRequest, rate: f64, seconds: f64) -> (Vec<Outcome>, Vec<f64>) {
    let client = inference_client(addr).await;
    let start = Instant::now();
    let n = (rate * seconds) as usize;
    let outcomes = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let mut tasks = Vec::with_capacity(n);
    let status_ms = {
        let control = control.to_string();
        tokio::spawn(async move {
            let mut agent = agent_client(&control).await;
            let mut times = Vec::new();
            while start.elapsed().as_secs_f64() < seconds {
                let t = Instant::now();
                let _ = agent.status(AgentStatusRequest {}).await;
                times.push(t.elapsed().as_secs_f64() * 1000.0);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            times
        })
    };
    for i in 0..n {
        tokio::time::sleep_until((start + Duration::from_secs_f64(i as f64 / rate)).into()).await;
        let (mut client, req, outcomes) = (client.clone(), req.clone(), outcomes.clone());
        tasks.push(tokio::spawn(async move {
            let o = call(&mut client, req).await;
            outcomes.lock().unwrap().push(o);
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let outcomes = std::mem::take(&mut *outcomes.lock().unwrap());
    (outcomes, status_ms.await.unwrap_or_default())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = Args::parse();
    let s = setup(&[]);
    let variant = match args.variant.as_str() {
        "resnet18" => &s.r18,
        "resnet50" => &s.r50,
        other => panic!("--variant {other:?}: resnet18 or resnet50"),
    };
    s.serve(1, args.budget_ms, &[(variant, args.millicores, args.batch)]).await;
    let req = InferRequest {
        task: "classify".into(),
        input: Some(sample(&variant.input_shape)),
        budget_ms: args.budget_ms,
        ..Default::default()
    };
    let budget = Duration::from_millis(args.budget_ms as u64);

    // Warm up, then measure what the worker carries.
    capacity(&s.agent.addr, &req, 2 * args.batch as usize, 2.0).await;
    if let Some(pairs) = args.against_profile {
        return against_profile(&s, variant, &req, &args, pairs).await;
    }
    let carried = capacity(&s.agent.addr, &req, 2 * args.batch as usize, args.seconds.min(8.0)).await;
    println!(
        "{} 64×64, {} millicores, batch ≤ {}, budget {} ms: capacity {:.1} req/s (closed loop, {} in flight)",
        args.variant,
        args.millicores,
        args.batch,
        args.budget_ms,
        carried,
        2 * args.batch
    );
    println!();
    println!("| offered | req/s | goodput (OK in time / capacity) | p99 of OK | refused early | refusal p99 | deadline exceeded | other | status p99 |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for &factor in &args.factors {
        let rate = factor * carried;
        let (outcomes, mut status_ms) = offer(&s.agent.addr, &s.agent.control_addr, &req, rate, args.seconds).await;
        let in_time = |o: &Outcome| o.code == Code::Ok && o.latency <= budget;
        let mut ok_ms: Vec<f64> =
            outcomes.iter().filter(|o| in_time(o)).map(|o| o.latency.as_secs_f64() * 1e3).collect();
        let mut refused_ms: Vec<f64> = outcomes
            .iter()
            .filter(|o| o.code == Code::ResourceExhausted)
            .map(|o| o.latency.as_secs_f64() * 1e3)
            .collect();
        let late = outcomes
            .iter()
            .filter(|o| o.code == Code::DeadlineExceeded || (o.code == Code::Ok && o.latency > budget))
            .count();
        let other = outcomes.len() - ok_ms.len() - refused_ms.len() - late;
        let goodput = ok_ms.len() as f64 / args.seconds;
        println!(
            "| {factor}× | {rate:.0} | {goodput:.1} req/s = {:.0} % | {:.1} ms | {} ({:.0} %) | {:.2} ms | {late} | {other} | {:.1} ms |",
            100.0 * goodput / carried,
            percentile(&mut ok_ms, 0.99),
            refused_ms.len(),
            100.0 * refused_ms.len() as f64 / outcomes.len().max(1) as f64,
            percentile(&mut refused_ms, 0.99),
            percentile(&mut status_ms, 0.99),
        );
        // Let the queue drain before the next factor.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Interleaves the profiler's throughput for the serving worker's quota and batch with that
/// worker's closed-loop capacity, so the two are compared on the same machine state.
async fn against_profile(
    s: &Setup,
    variant: &tidal_common::variant::VariantConfig,
    req: &InferRequest,
    args: &Args,
    pairs: u32,
) {
    let mut agent = agent_client(&s.agent.control_addr).await;
    let mut ratios = Vec::new();
    println!("| pair | profiler req/s | serving req/s | serving / profiler |");
    println!("|---|---|---|---|");
    for pair in 1..=pairs {
        let profiled = agent
            .profile(tidal_proto::v1::ProfileRequest {
                variant: Some(variant.spec()),
                cores: vec![args.millicores / 1000],
                batches: vec![args.batch],
                duration_ms: (args.profile_seconds * 1000.0) as u32,
                samples: vec![],
                text: None,
            })
            .await
            .expect("the profiler runs")
            .into_inner()
            .points[0]
            .throughput_rps;
        let served = capacity(&s.agent.addr, req, 2 * args.batch as usize, args.profile_seconds).await;
        ratios.push(served / profiled);
        println!("| {pair} | {profiled:.1} | {served:.1} | {:.3} |", served / profiled);
    }
    let median = percentile(&mut ratios.clone(), 0.5);
    let (lo, hi) = ratios.iter().fold((f64::MAX, f64::MIN), |(l, h), &r| (l.min(r), h.max(r)));
    println!("serving / profiler: median {median:.3}, range {lo:.3}–{hi:.3} over {pairs} pairs");
}
