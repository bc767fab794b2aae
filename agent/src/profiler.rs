//! The profiler: measures a variant on this node, under the real cgroup quota, for a grid of
//! core counts and batch sizes — batch latency (p50, p99) and saturated throughput.
//!
//! Each core count gets a fresh worker process in its own cgroup; batches run back to back
//! (the worker is never idle, as under saturating load) after two warm-up runs.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rand::Rng;
use tidal_common::onnx_signature::{Dim, ElementType, Signature};
use tidal_proto::v1::{ProfilePoint, ProfileRequest, VariantSpec};
use tonic::Status;
use tracing::info;

use crate::cgroup::WorkerCgroup;
use crate::node::Node;
use crate::worker::WorkerProcess;
use crate::worker_protocol::FrameTensor;

static PROFILES: AtomicU64 = AtomicU64::new(1);
const MAX_PROFILE_BATCH: u32 = 64;
/// Most core counts, and most batch sizes, one request measures.
const MAX_GRID: usize = 16;
/// One measurement at a time: two would share the cores and spoil each other's figures (and
/// each starts worker processes).
static ONE_AT_A_TIME: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);

pub async fn profile(node: &Node, req: &ProfileRequest) -> Result<Vec<ProfilePoint>, Status> {
    let variant = req.variant.as_ref().ok_or_else(|| Status::invalid_argument("no variant to profile"))?;
    let max_cores = node.cfg.millicores / 1000;
    if req.cores.len() > MAX_GRID || req.batches.len() > MAX_GRID {
        return Err(Status::invalid_argument(format!(
            "a profile measures at most {MAX_GRID} core counts and batch sizes"
        )));
    }
    if req.cores.is_empty() || req.cores.iter().any(|&c| c == 0 || c > max_cores) {
        return Err(Status::invalid_argument(format!("cores {:?} must be within 1..={max_cores}", req.cores)));
    }
    if req.batches.is_empty() || req.batches.iter().any(|&b| b == 0 || b > MAX_PROFILE_BATCH) {
        return Err(Status::invalid_argument(format!(
            "batches {:?} must be within 1..={MAX_PROFILE_BATCH}",
            req.batches
        )));
    }
    tidal_common::variant::validate_variant(variant).map_err(Status::invalid_argument)?;
    let model = node.cfg.model_dir.join(&variant.model_file);
    if let Some(Err(why)) = node.models.check_all(vec![variant.clone()]).await.remove(&variant.name) {
        return Err(if model.is_file() { Status::invalid_argument(why) } else { Status::not_found(why) });
    }
    let _slot = ONE_AT_A_TIME.try_acquire().map_err(|_| {
        Status::resource_exhausted("a profile is being measured on this node; one at a time (retry when it ends)")
    })?;
    let duration = Duration::from_millis(req.duration_ms.clamp(200, 60_000) as u64);
    let mut points = Vec::new();
    for &cores in &req.cores {
        let id = format!("profile-{}", PROFILES.fetch_add(1, Ordering::Relaxed));
        let cgroup = node.cgroups.create(&id).map_err(|e| Status::internal(e.to_string()))?;
        // The cgroup goes whatever happens to the measurement.
        let measured = profile_at(node, variant, &model, &cgroup, cores, &req.batches, duration).await;
        cgroup.remove();
        points.extend(measured?);
    }
    Ok(points)
}

/// Measures every batch size at `cores` with one fresh worker in `cgroup`.
async fn profile_at(
    node: &Node,
    variant: &VariantSpec,
    model: &Path,
    cgroup: &WorkerCgroup,
    cores: u32,
    batches: &[u32],
    duration: Duration,
) -> Result<Vec<ProfilePoint>, Status> {
    let bytes = tokio::fs::read(model).await.map_err(|e| Status::not_found(format!("{}: {e}", model.display())))?;
    let signature =
        Signature::read(&bytes).map_err(|e| Status::invalid_argument(format!("{}: {e}", variant.model_file)))?;
    let mut proc = WorkerProcess::spawn(&node.cfg.process, model, cgroup, cores * 1000)
        .await
        .map_err(|e| Status::internal(format!("starting a worker for {}: {e}", variant.name)))?;
    // A model without a batch dimension runs one request at a time: batch 1 is all there is.
    let batches = if signature.batched() { batches.to_vec() } else { vec![1] };
    let mut points = Vec::new();
    for &batch in &batches {
        let inputs = match profile_inputs(&signature, variant, batch) {
            Ok(inputs) => inputs,
            Err(e) => {
                proc.stop(Duration::from_secs(1)).await;
                return Err(e);
            }
        };
        let (mut latencies, elapsed) = match measure(&mut proc, &inputs, duration).await {
            Ok(measured) => measured,
            Err(e) => {
                proc.stop(Duration::from_secs(1)).await;
                return Err(e);
            }
        };
        let point = summarise(cores, batch, &mut latencies, elapsed);
        info!(variant = %variant.name, cores, batch, p99_ms = point.latency_p99_ms, rps = point.throughput_rps, "profiled");
        points.push(point);
    }
    proc.stop(Duration::from_secs(5)).await;
    Ok(points)
}

/// Runs batches back to back for `duration` (at least 3) after two warm-up runs: their
/// latencies and the seconds they took.
async fn measure(
    proc: &mut WorkerProcess,
    inputs: &[FrameTensor],
    duration: Duration,
) -> Result<(Vec<Duration>, f64), Status> {
    for _ in 0..2 {
        time_batch(proc, inputs).await?;
    }
    let mut latencies = Vec::new();
    let started = Instant::now();
    while started.elapsed() < duration || latencies.len() < 3 {
        latencies.push(time_batch(proc, inputs).await?);
    }
    Ok((latencies, started.elapsed().as_secs_f64()))
}

/// A batch of `batch` samples of every input the model takes. The first input's sample has
/// the variant's `input_shape`; the others their declared dimensions, a dynamic one at 1 (until
/// profiles take the user's sample inputs). Floating-point inputs hold uniform noise in [0, 1);
/// integer and boolean inputs zeros, which are valid indices and token ids for any model.
fn profile_inputs(signature: &Signature, variant: &VariantSpec, batch: u32) -> Result<Vec<FrameTensor>, Status> {
    let batched = signature.batched();
    let mut rng = rand::thread_rng();
    signature
        .inputs
        .iter()
        .enumerate()
        .map(|(i, input)| {
            let declared = if batched { &input.shape[1..] } else { &input.shape[..] };
            let sample: Vec<i64> = if i == 0 && variant.input_shape.len() == declared.len() {
                variant.input_shape.clone()
            } else {
                declared.iter().map(|d| if let Dim::Fixed(n) = d { *n } else { 1 }).collect()
            };
            let mut shape = if batched { vec![i64::from(batch)] } else { Vec::new() };
            shape.extend(sample);
            let count = tidal_common::tensor::element_count(&shape).filter(|&n| n <= MAX_PROFILE_ELEMENTS).ok_or_else(
                || Status::invalid_argument(format!("input {} of shape {shape:?} is too large to profile", input.name)),
            )?;
            let data: Vec<u8> = match input.element {
                ElementType::Fp32 => {
                    bytemuck::cast_slice(&(0..count).map(|_| rng.gen::<f32>()).collect::<Vec<_>>()).to_vec()
                }
                ElementType::Fp64 => {
                    bytemuck::cast_slice(&(0..count).map(|_| rng.gen::<f64>()).collect::<Vec<_>>()).to_vec()
                }
                ElementType::Fp16 => {
                    (0..count).flat_map(|_| half::f16::from_f32(rng.gen::<f32>()).to_le_bytes()).collect()
                }
                ElementType::Bf16 => {
                    (0..count).flat_map(|_| half::bf16::from_f32(rng.gen::<f32>()).to_le_bytes()).collect()
                }
                ElementType::Bytes => {
                    return Err(Status::invalid_argument(format!(
                        "input {}: BYTES tensors are not served yet",
                        input.name
                    )))
                }
                other => vec![0; count * other.size().unwrap_or(1)],
            };
            Ok(FrameTensor { name: input.name.clone(), datatype: input.element.v2_name().into(), shape, data })
        })
        .collect()
}

/// Most elements of one input of a profiled batch (1 GiB of float32).
const MAX_PROFILE_ELEMENTS: usize = 1 << 28;

async fn time_batch(p: &mut WorkerProcess, inputs: &[FrameTensor]) -> Result<Duration, Status> {
    let t = Instant::now();
    let r = p.run(inputs.to_vec()).await.map_err(|e| Status::internal(e.to_string()))?;
    if !r.error.is_empty() {
        return Err(Status::internal(r.error));
    }
    Ok(t.elapsed())
}

/// p50/p99 of the batch latencies and throughput in samples per second.
fn summarise(cores: u32, batch: u32, latencies: &mut [Duration], elapsed_s: f64) -> ProfilePoint {
    latencies.sort();
    let pick = |q: f64| {
        let i = ((latencies.len() as f64 * q).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[i].as_secs_f64() * 1000.0
    };
    ProfilePoint {
        cores,
        batch,
        latency_p50_ms: pick(0.5),
        latency_p99_ms: pick(0.99),
        throughput_rps: batch as f64 * latencies.len() as f64 / elapsed_s.max(1e-9),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_takes_nearest_rank_percentiles_and_samples_per_second() {
        let mut l: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let p = summarise(2, 4, &mut l, 10.0);
        assert_eq!(p.latency_p50_ms, 50.0);
        assert_eq!(p.latency_p99_ms, 99.0);
        assert_eq!(p.throughput_rps, 40.0);
    }
}
