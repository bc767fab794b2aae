//! `tidalctl load`: replays a rate trace open-loop against agents and records every request.
//!
//! Open loop: each trace line (requests in one second) becomes Poisson arrivals at that rate,
//! times `scale`; with `speedup` K a trace second lasts 1/K of a wall second. Requests are sent
//! at their arrival times whatever the answers do, as real users would; a request still
//! waiting when `max_in_flight` are outstanding is counted as a client-side drop, not delayed.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tidal_common::tensor::f32_tensor;
use tidal_common::tensor::NamedTensor;
use tidal_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use tidal_proto::inference::model_infer_request::InferInputTensor;
use tidal_proto::inference::ModelInferRequest;
use tidal_proto::v1::inference_client::InferenceClient;
use tidal_proto::v1::{InferRequest, InferResponse};
use tokio::sync::{mpsc, Semaphore};

#[derive(clap::Args)]
pub struct LoadOpts {
    /// The agents' inference ports, comma-separated: requests go round-robin, and one an agent
    /// refuses as unavailable (stopping, restarting) is sent to the next, as a client-side
    /// load balancer would.
    #[arg(long, default_value = "127.0.0.1:7100", value_delimiter = ',')]
    pub agent: Vec<String>,
    /// A file with the agent's inference token (`tidal-agent --inference-token-file`).
    #[arg(long, env = "TIDAL_INFERENCE_TOKEN_FILE")]
    pub token_file: Option<std::path::PathBuf>,
    /// The task to send requests for.
    #[arg(long)]
    pub task: String,
    /// Rate trace: one integer per line, the requests in that second.
    #[arg(long)]
    pub trace: PathBuf,
    /// Multiply every rate by this factor.
    #[arg(long, default_value_t = 1.0)]
    pub scale: f64,
    /// Replay this many trace seconds per wall second.
    #[arg(long, default_value_t = 1.0)]
    pub speedup: f64,
    /// First trace line to replay (0-based).
    #[arg(long, default_value_t = 0)]
    pub start: usize,
    /// Trace seconds to replay (default: to the end).
    #[arg(long)]
    pub duration: Option<usize>,
    /// Write one CSV line per request here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Seed of the arrival times and the input tensor.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Requests outstanding at most; beyond it a request is counted as dropped by the client.
    #[arg(long, default_value_t = 4096)]
    pub max_in_flight: usize,
    /// HTTP/2 connections to spread requests over.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Also write the summary (with the cluster's mean cores and plans) as JSON here.
    #[arg(long)]
    pub summary_json: Option<PathBuf>,
    /// The protocol to speak: Tidal's own API, or the Open Inference Protocol (KServe V2) that
    /// Tidal's agents and other servers (Triton, Ray Serve with a V2 servicer...) speak.
    #[arg(long, value_enum, default_value = "tidal")]
    pub protocol: Protocol,
    /// gRPC metadata to send with every request, KEY=VALUE, repeatable (e.g.
    /// `application=classify` for Ray Serve's gRPC proxy).
    #[arg(long = "header", value_parser = parse_header)]
    pub headers: Vec<Header>,
    /// The task's SLO in ms, instead of asking the controller (for a server other than Tidal);
    /// give --input-shape too.
    #[arg(long, requires = "input_shape")]
    pub slo_ms: Option<u32>,
    /// One sample's input shape, comma-separated (e.g. 3,64,64), instead of asking the
    /// controller; give --slo-ms too.
    #[arg(long, value_delimiter = ',', requires = "slo_ms")]
    pub input_shape: Option<Vec<i64>>,
    /// The accuracy (%) to count for answers that do not say which variant served them: a
    /// server other than Tidal serving one variant.
    #[arg(long)]
    pub accuracy: Option<f64>,
    /// Send these requests in turn, for a task that takes text, audio or several inputs: a
    /// directory as `tidalctl profile --samples` reads it (V2 request bodies NAME.json, NumPy
    /// arrays NAME.npy, or directories of INPUT.npy). Without it, every request is one random
    /// FP32 sample of the task's input shape.
    #[arg(long, conflicts_with = "input_shape")]
    pub samples: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    /// tidal.v1.Inference/Infer.
    Tidal,
    /// inference.GRPCInferenceService/ModelInfer (KServe V2).
    V2,
}

/// A `--header`, parsed once into what every request carries.
pub type Header = (tonic::metadata::AsciiMetadataKey, tonic::metadata::AsciiMetadataValue);

fn parse_header(s: &str) -> Result<Header, String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("{s:?} is not KEY=VALUE"))?;
    let key = tonic::metadata::AsciiMetadataKey::from_bytes(k.to_ascii_lowercase().as_bytes())
        .map_err(|_| format!("{k:?} is not a gRPC metadata key"))?;
    let value = v.parse().map_err(|_| format!("{v:?} is not a gRPC metadata value"))?;
    Ok((key, value))
}

/// A client of one connection, in the protocol asked for.
#[derive(Clone)]
enum Client {
    Tidal(InferenceClient<tonic::transport::Channel>),
    V2(GrpcInferenceServiceClient<tonic::transport::Channel>),
}

/// What an answer says of how it was served.
struct Answer {
    variant: String,
    accuracy: f64,
    accuracy_product: f64,
}

/// What every request of a replay carries, in either protocol.
struct Call {
    task: String,
    input: tidal_proto::v1::Tensor,
    /// Requests as the user gave them (`--samples`), sent in turn; empty: `input`.
    samples: Vec<Vec<NamedTensor>>,
    /// The name V2 gives the model's input (its metadata's first input).
    input_name: String,
    token: Option<tidal_auth::Token>,
    headers: Vec<Header>,
    /// The accuracy to count for answers that do not report theirs.
    accuracy: Option<f64>,
}

impl Client {
    fn new(channel: tonic::transport::Channel, protocol: Protocol) -> Self {
        match protocol {
            Protocol::Tidal => Client::Tidal(InferenceClient::new(channel).max_decoding_message_size(64 << 20)),
            Protocol::V2 => Client::V2(GrpcInferenceServiceClient::new(channel).max_decoding_message_size(64 << 20)),
        }
    }

    async fn infer(&mut self, call: &Call, i: usize, counted: bool) -> Result<Answer, tonic::Status> {
        let sample = (!call.samples.is_empty()).then(|| &call.samples[i % call.samples.len()]);
        match self {
            Client::Tidal(c) => {
                let req = match sample {
                    None => InferRequest {
                        task: call.task.to_string(),
                        input: Some(call.input.clone()),
                        ..Default::default()
                    },
                    Some(inputs) => InferRequest {
                        task: call.task.to_string(),
                        inputs: inputs.iter().cloned().map(NamedTensor::into_proto).collect(),
                        ..Default::default()
                    },
                };
                let r = c.infer(call.request(req, counted)).await?.into_inner();
                let (accuracy, accuracy_product) = end_to_end_accuracy(&r);
                Ok(Answer { variant: r.variant, accuracy, accuracy_product })
            }
            Client::V2(c) => {
                let req = match sample {
                    None => ModelInferRequest {
                        model_name: call.task.to_string(),
                        inputs: vec![InferInputTensor {
                            name: call.input_name.clone(),
                            datatype: "FP32".into(),
                            shape: call.input.shape.clone(),
                            ..Default::default()
                        }],
                        raw_input_contents: vec![call.input.data.clone()],
                        ..Default::default()
                    },
                    Some(inputs) => ModelInferRequest {
                        model_name: call.task.to_string(),
                        inputs: inputs
                            .iter()
                            .map(|t| InferInputTensor {
                                name: t.name.clone(),
                                datatype: t.element.v2_name().into(),
                                shape: t.shape.clone(),
                                ..Default::default()
                            })
                            .collect(),
                        raw_input_contents: inputs.iter().map(|t| t.data.clone()).collect(),
                        ..Default::default()
                    },
                };
                let r = c.model_infer(call.request(req, counted)).await?.into_inner();
                Ok(v2_answer(&r, call.accuracy))
            }
        }
    }
}

impl Call {
    /// The request, marked as counted elsewhere when an agent that counted it refused it.
    fn request<T>(&self, message: T, counted: bool) -> tonic::Request<T> {
        let mut req = tonic::Request::new(message);
        if counted {
            req.metadata_mut().insert(tidal_proto::COUNTED_METADATA, tonic::metadata::MetadataValue::from_static("1"));
        }
        if let Some(token) = &self.token {
            token.attach(req.metadata_mut());
        }
        for (k, v) in &self.headers {
            req.metadata_mut().insert(k.clone(), v.clone());
        }
        req
    }
}

/// The name of the model's first input, as V2's ModelMetadata gives it (perf_analyzer asks
/// likewise); `input` where the server does not say.
async fn v2_input_name(mut client: GrpcInferenceServiceClient<tonic::transport::Channel>, call: &Call) -> String {
    let req = tidal_proto::inference::ModelMetadataRequest { name: call.task.clone(), version: String::new() };
    match client.model_metadata(call.request(req, false)).await {
        Ok(m) => match m.into_inner().inputs.into_iter().next() {
            Some(input) => input.name,
            None => "input".into(),
        },
        Err(status) => {
            eprintln!("model metadata of {}: {} (sending the input as \"input\")", call.task, status.message());
            "input".into()
        }
    }
}

/// How a V2 answer was served: Tidal's `tidal_variant` and `tidal_accuracy` parameters, else
/// `accuracy` for a server that serves one variant (NaN when not given).
fn v2_answer(r: &tidal_proto::inference::ModelInferResponse, accuracy: Option<f64>) -> Answer {
    use tidal_proto::inference::infer_parameter::ParameterChoice;
    let param = |name: &str| r.parameters.get(name).and_then(|p| p.parameter_choice.clone());
    let variant = match param("tidal_variant") {
        Some(ParameterChoice::StringParam(v)) => v,
        _ => String::new(),
    };
    let accuracy = match param("tidal_accuracy") {
        Some(ParameterChoice::DoubleParam(a)) => a,
        _ => accuracy.unwrap_or(f64::NAN),
    };
    Answer { variant, accuracy, accuracy_product: accuracy }
}

/// One request's record.
#[derive(Debug, Clone)]
pub struct Record {
    pub sent_s: f64,
    pub latency_ms: f64,
    pub status: tonic::Code,
    pub variant: String,
    /// The mean over stages of the accuracy that served it (see [`end_to_end_accuracy`]).
    pub accuracy: f64,
    /// The product over stages, percent (IPA's second definition).
    pub accuracy_product: f64,
}

#[derive(Debug, serde::Serialize)]
pub struct Summary {
    pub requests: usize,
    pub ok: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub slo_violation_pct: f64,
    pub mean_accuracy: f64,
    /// Mean over served requests of the product of their stages' accuracies, percent.
    pub mean_accuracy_product: f64,
    pub errors: Vec<(String, usize)>,
    pub by_variant: Vec<(String, usize)>,
    /// Cores allocated to the task's workers, sampled every second from the controller; the mean.
    pub mean_cores: Option<f64>,
    /// Plans the controller committed during the replay.
    pub plans: Option<u64>,
}

/// What the task ran while the load was replayed: (millicores of its workers, plan epoch),
/// sampled every second from the controller's status.
pub async fn watch_cluster(controller: String, task: String, samples: Arc<std::sync::Mutex<Vec<(u32, u64)>>>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let Ok(mut client) = crate::controller(&controller).await else { continue };
        let Ok(status) = client.status(tidal_proto::v1::ClusterStatusRequest {}).await else { continue };
        let status = status.into_inner();
        let millicores =
            status.nodes.iter().flat_map(|n| &n.workers).filter(|w| w.task == task).map(|w| w.millicores).sum();
        let epoch = status.plan.map_or(0, |p| p.epoch);
        samples.lock().unwrap_or_else(|p| p.into_inner()).push((millicores, epoch));
    }
}

/// Mean cores and plans committed from the samples of [`watch_cluster`].
pub fn cluster_figures(samples: &[(u32, u64)]) -> (Option<f64>, Option<u64>) {
    if samples.is_empty() {
        return (None, None);
    }
    let mean = samples.iter().map(|(m, _)| *m as f64 / 1000.0).sum::<f64>() / samples.len() as f64;
    let first = samples.iter().map(|(_, e)| *e).min().unwrap_or(0);
    let last = samples.iter().map(|(_, e)| *e).max().unwrap_or(0);
    (Some(mean), Some(last - first))
}

/// Reads a trace: one non-negative integer (requests in that second) per line; a file whose
/// name ends in `.gz` is decompressed first.
pub fn read_trace(path: &Path, start: usize, duration: Option<usize>) -> anyhow::Result<Vec<f64>> {
    let text = read_text(path).with_context(|| format!("reading the trace {}", path.display()))?;
    let mut rates = Vec::new();
    for (i, line) in text.lines().enumerate().skip(start) {
        if duration.is_some_and(|d| rates.len() >= d) {
            break;
        }
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let r: f64 =
            line.parse().with_context(|| format!("{}:{}: {line:?} is not a request count", path.display(), i + 1))?;
        if !r.is_finite() || r < 0.0 {
            anyhow::bail!("{}:{}: {line:?} is not a request count", path.display(), i + 1);
        }
        rates.push(r);
    }
    if rates.is_empty() {
        anyhow::bail!("the trace {} has no lines from line {}", path.display(), start + 1);
    }
    Ok(rates)
}

fn read_text(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let file = std::fs::File::open(path)?;
    let mut text = String::new();
    if path.extension().is_some_and(|e| e == "gz") {
        flate2::read::GzDecoder::new(std::io::BufReader::new(file)).read_to_string(&mut text)?;
    } else {
        std::io::BufReader::new(file).read_to_string(&mut text)?;
    }
    Ok(text)
}

/// Poisson arrival times (seconds from the start, wall clock) for the rates.
pub fn arrivals(rates: &[f64], scale: f64, speedup: f64, seed: u64) -> Vec<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let second = 1.0 / speedup;
    let mut out = Vec::new();
    for (i, &r) in rates.iter().enumerate() {
        let rate = r * scale; // requests per wall second
        if rate <= 0.0 {
            continue;
        }
        let (begin, end) = (i as f64 * second, (i + 1) as f64 * second);
        let mut t = begin;
        loop {
            let u: f64 = rng.gen_range(f64::MIN_POSITIVE..1.0);
            t += -u.ln() / rate;
            if t >= end {
                break;
            }
            out.push(t);
        }
    }
    out
}

pub async fn run(args: LoadOpts, slo_ms: u32, input_shape: Vec<i64>) -> anyhow::Result<Summary> {
    if !(args.scale > 0.0 && args.scale.is_finite() && args.speedup > 0.0 && args.speedup.is_finite()) {
        anyhow::bail!("--scale and --speedup must be positive numbers");
    }
    let token = args.token_file.as_deref().map(tidal_auth::Token::from_file).transpose().map_err(anyhow::Error::msg)?;
    let rates = read_trace(&args.trace, args.start, args.duration)?;
    let times = arrivals(&rates, args.scale, args.speedup, args.seed);
    let wall = rates.len() as f64 / args.speedup;
    eprintln!(
        "replaying {} trace seconds ({} requests, mean {:.1} req/s, peak {:.1} req/s) in {wall:.0} s against {}",
        rates.len(),
        times.len(),
        times.len() as f64 / wall,
        rates.iter().copied().fold(0.0, f64::max) * args.scale,
        args.agent.join(", ")
    );
    anyhow::ensure!(!args.agent.is_empty(), "give at least one --agent");
    // Connections per agent: the first is dialled now (a wrong address fails at once), the
    // rest lazily; all reconnect after an agent restarts.
    let mut pools = Vec::new();
    for agent in &args.agent {
        crate::connect::channel(agent, "agent").await?;
        let mut pool = Vec::new();
        for _ in 0..args.connections.max(1) {
            pool.push(Client::new(crate::connect::lazy_channel(agent)?, args.protocol));
        }
        pools.push(pool);
    }
    let pools = Arc::new(pools);
    // Without samples, one random sample of the task's shape (none needed with them).
    let input = {
        let n: i64 = if args.samples.is_some() { 0 } else { input_shape.iter().product() };
        let mut rng = ChaCha8Rng::seed_from_u64(args.seed ^ 0x5eed);
        let values: Vec<f32> = (0..n).map(|_| rng.gen::<f32>()).collect();
        let mut shape = vec![1];
        shape.extend_from_slice(&input_shape);
        f32_tensor(shape, &values)
    };
    let samples = match &args.samples {
        None => Vec::new(),
        Some(dir) => crate::samples::read_dir(dir)?
            .into_iter()
            .map(|s| s.inputs.into_iter().map(NamedTensor::from_proto).collect::<Result<Vec<_>, _>>())
            .collect::<Result<_, _>>()
            .map_err(|e| anyhow::anyhow!("the samples in {}: {e}", dir.display()))?,
    };
    let mut call = Call {
        task: args.task.clone(),
        input,
        samples,
        input_name: "input".into(),
        token,
        headers: args.headers.clone(),
        accuracy: args.accuracy,
    };
    if let Some(Client::V2(client)) = pools.first().and_then(|p| p.first()) {
        call.input_name = v2_input_name(client.clone(), &call).await;
    }
    let call = Arc::new(call);
    let (tx, mut rx) = mpsc::unbounded_channel::<Record>();
    let limit = Arc::new(Semaphore::new(args.max_in_flight));
    let started = Instant::now();
    let progress = tokio::spawn(report_progress(started, wall));
    // SIGINT or SIGTERM ends the replay early: the requests in flight are awaited and the
    // summary covers what was sent.
    let mut interrupted = std::pin::pin!(tidal_daemon::systemd::shutdown_signal());
    for (i, &t) in times.iter().enumerate() {
        tokio::select! {
            _ = tokio::time::sleep_until((started + Duration::from_secs_f64(t)).into()) => {}
            _ = &mut interrupted => {
                eprintln!("interrupted after {i} requests: waiting for the ones in flight");
                break;
            }
        }
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            let _ = tx.send(Record {
                sent_s: t,
                latency_ms: 0.0,
                status: tonic::Code::Cancelled,
                variant: String::new(),
                accuracy: 0.0,
                accuracy_product: 0.0,
            });
            continue;
        };
        let (tx, pools, call) = (tx.clone(), pools.clone(), call.clone());
        tokio::spawn(async move {
            let sent = Instant::now();
            let result = send_with_failover(&pools, i, &call).await;
            let latency_ms = sent.elapsed().as_secs_f64() * 1000.0;
            let record = match result {
                Ok(a) => Record {
                    sent_s: t,
                    latency_ms,
                    status: tonic::Code::Ok,
                    variant: a.variant,
                    accuracy: a.accuracy,
                    accuracy_product: a.accuracy_product,
                },
                Err(s) => Record {
                    sent_s: t,
                    latency_ms,
                    status: s.code(),
                    variant: String::new(),
                    accuracy: 0.0,
                    accuracy_product: 0.0,
                },
            };
            let _ = tx.send(record);
            drop(permit);
        });
    }
    drop(tx);
    let mut records = Vec::with_capacity(times.len());
    while let Some(r) = rx.recv().await {
        records.push(r);
    }
    progress.abort();
    records.sort_by(|a, b| a.sent_s.total_cmp(&b.sent_s));
    if let Some(out) = &args.out {
        write_records(out, &records)?;
        eprintln!("wrote {} request records to {}", records.len(), out.display());
    }
    Ok(summarise(&records, slo_ms))
}

/// Sends request `i` to agent `i mod n`; when an agent answers UNAVAILABLE (it is stopping,
/// not listening, or has no worker for the task), to the next, each at most once. A request is
/// one unit of demand however many agents it tries: once an agent says it counted it, the
/// retries say so and are not counted again.
async fn send_with_failover(pools: &[Vec<Client>], i: usize, call: &Call) -> Result<Answer, tonic::Status> {
    let mut last = tonic::Status::unavailable("no agent");
    let mut counted = false;
    for k in 0..pools.len() {
        let pool = &pools[(i + k) % pools.len()];
        let mut client = pool[(i / pools.len()) % pool.len()].clone();
        match client.infer(call, i, counted).await {
            Err(s) if s.code() == tonic::Code::Unavailable => {
                counted |= s.metadata().contains_key(tidal_proto::COUNTED_METADATA);
                last = s;
            }
            other => return other,
        }
    }
    Err(last)
}

async fn report_progress(started: Instant, wall: f64) {
    loop {
        tokio::time::sleep(Duration::from_secs(10)).await;
        let done = started.elapsed().as_secs_f64();
        eprintln!("load: {:>5.0} / {wall:.0} s ({:>3.0} %)", done, (done / wall * 100.0).min(100.0));
    }
}

fn write_records(path: &Path, records: &[Record]) -> anyhow::Result<()> {
    let mut f =
        std::io::BufWriter::new(std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?);
    writeln!(f, "sent_s,latency_ms,status,variant,accuracy")?;
    for r in records {
        writeln!(f, "{:.6},{:.3},{:?},{},{}", r.sent_s, r.latency_ms, r.status, r.variant, r.accuracy)?;
    }
    f.flush()?;
    Ok(())
}

/// A request's accuracy, percent, both ways IPA defines a pipeline's: per stage the mean over
/// the inputs it served (crops), then the mean over stages (what the planner maximises, the
/// sum of stage accuracies up to a factor) and their product. One stage: the variant's own.
pub fn end_to_end_accuracy(r: &InferResponse) -> (f64, f64) {
    if r.stages.is_empty() {
        return (r.accuracy, r.accuracy);
    }
    let mut per_stage: Vec<(&str, f64, u32)> = Vec::new();
    // A stage the request skipped served it with no model: it counts for nothing.
    for s in r.stages.iter().filter(|s| !s.skipped) {
        match per_stage.iter_mut().find(|(name, _, _)| *name == s.stage) {
            Some((_, sum, n)) => {
                *sum += s.accuracy;
                *n += 1;
            }
            None => per_stage.push((&s.stage, s.accuracy, 1)),
        }
    }
    let means: Vec<f64> = per_stage.iter().map(|(_, sum, n)| sum / *n as f64).collect();
    let product = 100.0 * means.iter().map(|m| m / 100.0).product::<f64>();
    (means.iter().sum::<f64>() / means.len() as f64, product)
}

/// p50/p99 over answered requests (failures count at their latency), SLO violations (late or
/// failed), mean accuracy over served requests.
pub fn summarise(records: &[Record], slo_ms: u32) -> Summary {
    let mut hist = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds");
    let mut ok = 0;
    let mut violations = 0;
    let (mut acc_sum, mut product_sum) = (0.0, 0.0);
    let mut errors: std::collections::BTreeMap<String, usize> = Default::default();
    let mut by_variant: std::collections::BTreeMap<String, usize> = Default::default();
    for r in records {
        let _ = hist.record(((r.latency_ms * 1000.0) as u64).max(1));
        if r.status == tonic::Code::Ok {
            ok += 1;
            acc_sum += r.accuracy;
            product_sum += r.accuracy_product;
            *by_variant.entry(r.variant.clone()).or_default() += 1;
            if r.latency_ms > slo_ms as f64 {
                violations += 1;
            }
        } else {
            violations += 1;
            *errors.entry(format!("{:?}", r.status)).or_default() += 1;
        }
    }
    let n = records.len().max(1);
    Summary {
        requests: records.len(),
        ok,
        p50_ms: hist.value_at_quantile(0.5) as f64 / 1000.0,
        p99_ms: hist.value_at_quantile(0.99) as f64 / 1000.0,
        slo_violation_pct: violations as f64 * 100.0 / n as f64,
        mean_accuracy: if ok > 0 { acc_sum / ok as f64 } else { 0.0 },
        mean_accuracy_product: if ok > 0 { product_sum / ok as f64 } else { 0.0 },
        errors: errors.into_iter().collect(),
        by_variant: by_variant.into_iter().collect(),
        mean_cores: None,
        plans: None,
    }
}

pub fn print_summary(s: &Summary, slo_ms: u32) {
    println!("┌──────────────────────────────┬──────────────┐");
    println!("│ requests                     │ {:>12} │", s.requests);
    println!("│ served OK                    │ {:>12} │", s.ok);
    println!("│ latency p50 (ms)             │ {:>12.1} │", s.p50_ms);
    println!("│ latency p99 (ms)             │ {:>12.1} │", s.p99_ms);
    println!("│ SLO {:>5} ms violations (%)  │ {:>12.2} │", slo_ms, s.slo_violation_pct);
    println!("│ served accuracy (%)          │ {:>12.2} │", s.mean_accuracy);
    if (s.mean_accuracy_product - s.mean_accuracy).abs() > 1e-9 {
        println!("│   product over stages (%)    │ {:>12.2} │", s.mean_accuracy_product);
    }
    for (code, n) in &s.errors {
        println!("│ error {:<22} │ {:>12} │", code, n);
    }
    for (variant, n) in &s.by_variant {
        // A server that does not say which variant answered (a peer over V2) gets no row.
        if !variant.is_empty() {
            println!("│ served by {:<18} │ {:>12} │", variant, n);
        }
    }
    if let Some(cores) = s.mean_cores {
        println!("│ mean cores (workers)         │ {:>12.2} │", cores);
    }
    if let Some(plans) = s.plans {
        println!("│ plans committed              │ {:>12} │", plans);
    }
    println!("└──────────────────────────────┴──────────────┘");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_v2_answer_reports_tidal_s_variant_else_the_assumed_accuracy() {
        use tidal_proto::inference::infer_parameter::ParameterChoice;
        use tidal_proto::inference::{InferParameter, ModelInferResponse};
        let param = |p| InferParameter { parameter_choice: Some(p) };
        let mut r = ModelInferResponse::default();
        let peer = v2_answer(&r, Some(76.13));
        assert_eq!((peer.variant.as_str(), peer.accuracy), ("", 76.13));
        assert!(v2_answer(&r, None).accuracy.is_nan(), "unknown, not zero");
        r.parameters.insert("tidal_variant".into(), param(ParameterChoice::StringParam("resnet18".into())));
        r.parameters.insert("tidal_accuracy".into(), param(ParameterChoice::DoubleParam(69.76)));
        let tidal = v2_answer(&r, Some(76.13));
        assert_eq!((tidal.variant.as_str(), tidal.accuracy), ("resnet18", 69.76));
        assert!(parse_header("application=classify").is_ok());
        assert!(parse_header("no-equals").is_err());
        assert!(parse_header("bad key=v").is_err());
    }

    #[test]
    fn arrivals_follow_the_scaled_rate_and_are_deterministic() {
        let rates = vec![100.0; 20];
        let a = arrivals(&rates, 0.5, 2.0, 1);
        // 20 trace seconds at 50 req/s, each lasting 0.5 s: about 500 requests in 10 s.
        assert!((a.len() as f64 - 500.0).abs() < 100.0, "{}", a.len());
        assert!(a.windows(2).all(|w| w[0] <= w[1]));
        assert!(a.last().unwrap() < &10.0);
        assert_eq!(a, arrivals(&rates, 0.5, 2.0, 1));
    }

    #[test]
    fn failures_and_late_answers_are_violations() {
        let rec = |latency_ms, status| Record {
            sent_s: 0.0,
            latency_ms,
            status,
            variant: "v".into(),
            accuracy: 70.0,
            accuracy_product: 70.0,
        };
        let s = summarise(
            &[
                rec(10.0, tonic::Code::Ok),
                rec(300.0, tonic::Code::Ok),
                rec(5.0, tonic::Code::DeadlineExceeded),
                rec(10.0, tonic::Code::Ok),
            ],
            100,
        );
        assert_eq!(s.ok, 3);
        assert_eq!(s.slo_violation_pct, 50.0);
        assert_eq!(s.mean_accuracy, 70.0);
    }

    #[test]
    fn the_committed_trace_reads_compressed() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/twitter-trace-rps.txt.gz");
        let day = read_trace(&path, 0, None).unwrap();
        assert_eq!(day.len(), 1_209_600, "14 days of seconds");
        let mean = day.iter().sum::<f64>() / day.len() as f64;
        assert!((mean - 63.6).abs() < 0.1, "mean {mean}");
        assert_eq!(read_trace(&path, 86_400, Some(10)).unwrap(), day[86_400..86_410]);
    }

    #[test]
    fn a_pipeline_request_counts_each_stage_once_and_its_crops_on_average() {
        use tidal_proto::v1::StageServed;
        let served = |stage: &str, accuracy| StageServed { stage: stage.into(), accuracy, ..Default::default() };
        let r = InferResponse {
            accuracy: 70.0,
            stages: vec![served("detect", 50.0), served("classify", 70.0), served("classify", 80.0)],
            ..Default::default()
        };
        assert_eq!(end_to_end_accuracy(&r), ((50.0 + 75.0) / 2.0, 100.0 * 0.5 * 0.75));
        assert_eq!(end_to_end_accuracy(&InferResponse { accuracy: 70.0, ..Default::default() }), (70.0, 70.0));
        let skipped = StageServed { stage: "translate".into(), skipped: true, ..Default::default() };
        let r = InferResponse {
            stages: vec![served("langid", 99.0), skipped, served("summarise", 33.0)],
            ..Default::default()
        };
        assert_eq!(end_to_end_accuracy(&r), ((99.0 + 33.0) / 2.0, 100.0 * 0.99 * 0.33));
    }
}
