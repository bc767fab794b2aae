//! The profiler: measures a variant on this node, under the real cgroup quota, for a grid of
//! core counts and batch sizes — batch latency (p50, p99) and saturated throughput.
//!
//! Each core count gets a fresh worker process in its own cgroup; batches run back to back
//! (the worker is never idle, as under saturating load) after two warm-up runs.
//!
//! Inputs are the user's sample requests when the request carries them: every input size among
//! them (elements of one sample of the first input) is measured, and each point says its size.
//! Without samples, one generated sample of the variant's `input_shape`.
//!
//! A stage that writes text (`TextIo.generate`) is measured writing one token and its most, each
//! point saying how many tokens each sample wrote: the planner draws its cost per written
//! token through them (`tidal_common::profile::points_at_output`).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rand::Rng;
use tidal_common::onnx_signature::{Dim, ElementType, Signature, TensorSpec};
use tidal_common::tensor::{shape_key, NamedTensor, StageIo};
use tidal_common::text::TextEncoder;
use tidal_proto::v1::{Generate, ProfilePoint, ProfileRequest, ProfileSample, StageSpec, VariantSpec};
use tonic::Status;
use tracing::info;

use crate::cgroup::WorkerCgroup;
use crate::node::Node;
use crate::worker::WorkerProcess;
use crate::worker_protocol::{BatchResult, FrameTensor};

static PROFILES: AtomicU64 = AtomicU64::new(1);
const MAX_PROFILE_BATCH: u32 = 64;
/// Most core counts, batch sizes and input sizes one request measures.
const MAX_GRID: usize = 16;
/// Most sample requests one profile request carries.
const MAX_SAMPLES: usize = 256;
/// One measurement at a time: two would share the cores and spoil each other's figures (and
/// each starts worker processes).
/// How long a profile waits for its model file to come from the controllers.
const FETCH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

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
    let _slot = ONE_AT_A_TIME.try_acquire().map_err(|_| {
        Status::resource_exhausted("a profile is being measured on this node; one at a time (retry when it ends)")
    })?;
    // The model directory's file, or the cache's, fetched from the controllers if need be.
    let model = match node.models.locate_all(vec![variant.clone()]).await.remove(&variant.name) {
        Some(Ok(path)) => path,
        Some(Err(crate::models::Unusable::Fetch(why))) => {
            let fetched = tokio::time::timeout(FETCH_TIMEOUT, node.model_file(variant)).await;
            match fetched {
                Ok(Ok(path)) => path,
                Ok(Err(e)) => return Err(Status::unavailable(format!("{why}; fetching it failed: {e}"))),
                Err(_) => {
                    return Err(Status::deadline_exceeded(format!("{why}; not fetched within {FETCH_TIMEOUT:?}")))
                }
            }
        }
        Some(Err(crate::models::Unusable::Refused(why))) => {
            return Err(if node.cfg.model_dir.join(&variant.model_file).is_file() {
                Status::invalid_argument(why)
            } else {
                Status::not_found(why)
            })
        }
        None => return Err(Status::internal("the model file could not be checked")),
    };
    if req.samples.len() > MAX_SAMPLES {
        return Err(Status::invalid_argument(format!(
            "at most {MAX_SAMPLES} sample requests, not {}",
            req.samples.len()
        )));
    }
    let bytes = tokio::fs::read(&model).await.map_err(|e| Status::not_found(format!("{}: {e}", model.display())))?;
    let signature =
        Signature::read(&bytes).map_err(|e| Status::invalid_argument(format!("{}: {e}", variant.model_file)))?;
    // A text stage's samples are tokenized by the variant's tokenizer.
    let encoder = match req.text.as_ref().and_then(|t| t.tokenize.as_ref()) {
        Some(t) if !req.samples.is_empty() => {
            let file = node.cfg.model_dir.join(&variant.tokenizer_file);
            let t = t.clone();
            let loaded = tokio::task::spawn_blocking(move || TextEncoder::load(&file, &t))
                .await
                .map_err(|e| Status::internal(e.to_string()))?;
            Some(loaded.map_err(Status::invalid_argument)?)
        }
        _ => None,
    };
    // A stage that writes text is measured writing one token and its most: the line through
    // them is its cost per written token.
    let generate = req.text.as_ref().and_then(|t| t.generate.as_ref());
    if let Some(g) = generate {
        if !(1..=tidal_common::text::MAX_GENERATED).contains(&g.max_tokens) {
            return Err(Status::invalid_argument(format!(
                "text.generate.max_tokens is {}; give 1..={}",
                g.max_tokens,
                tidal_common::text::MAX_GENERATED
            )));
        }
    }
    let sets = sample_sets(&signature, variant, &req.samples, encoder.as_ref(), generate)?;
    let duration = Duration::from_millis(req.duration_ms.clamp(200, 60_000) as u64);
    let mut points = Vec::new();
    for &cores in &req.cores {
        let id = format!("profile-{}", PROFILES.fetch_add(1, Ordering::Relaxed));
        let cgroup = node.cgroups.create(&id).map_err(|e| Status::internal(e.to_string()))?;
        // The cgroup goes whatever happens to the measurement.
        let grid = Grid { cores, batches: &req.batches, sets: &sets, duration, generate };
        let measured = profile_at(node, variant, &model, &signature, &cgroup, grid).await;
        cgroup.remove();
        points.extend(measured?);
    }
    Ok(points)
}

/// The inputs of one input size a profile measures with.
struct SampleSet {
    /// Elements of one sample of the first input.
    size: u64,
    /// Checked samples of one shape, batched by repeating them; none: generated ones.
    samples: Vec<Vec<NamedTensor>>,
}

/// What one worker measures: each batch size at each input size, on `cores`.
struct Grid<'a> {
    cores: u32,
    batches: &'a [u32],
    sets: &'a [SampleSet],
    duration: Duration,
    generate: Option<&'a Generate>,
}

/// The user's samples checked against the model and grouped by size (of each size, the shape
/// most samples have), smallest first; without samples, the variant's own size.
fn sample_sets(
    signature: &Signature,
    variant: &VariantSpec,
    samples: &[ProfileSample],
    text: Option<&TextEncoder>,
    generate: Option<&Generate>,
) -> Result<Vec<SampleSet>, Status> {
    if samples.is_empty() {
        let size = tidal_common::tensor::element_count(&variant.input_shape).unwrap_or(0) as u64;
        return Ok(vec![SampleSet { size, samples: Vec::new() }]);
    }
    let stage = StageSpec {
        inputs: signature.inputs.iter().map(TensorSpec::to_proto).collect(),
        outputs: signature.outputs.iter().map(TensorSpec::to_proto).collect(),
        ..Default::default()
    };
    let io = StageIo::of(&stage).map_err(Status::invalid_argument)?;
    let mut by_shape: std::collections::BTreeMap<Vec<i64>, Vec<Vec<NamedTensor>>> = Default::default();
    for (i, s) in samples.iter().enumerate() {
        let invalid = |e: String| Status::invalid_argument(format!("sample {}: {e}", i + 1));
        let tensors = s
            .inputs
            .iter()
            .cloned()
            .map(NamedTensor::from_proto)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid(e.to_string()))?;
        // A text stage's samples are text, tokenized as its requests are.
        let mut tensors = match text {
            Some(encoder) => encoder.encode(io.batched, tensors).map_err(|e| invalid(e.to_string()))?.0,
            None => tensors,
        };
        // The budget of a stage that writes text is the worker's to give (set per length).
        if let Some(g) = generate {
            tensors.retain(|t| t.name != g.budget);
            tensors.push(NamedTensor {
                name: g.budget.clone(),
                element: ElementType::Int64,
                shape: vec![],
                data: 1i64.to_le_bytes().to_vec(),
            });
        }
        // Samples carry the stage's names; the model is fed by its own.
        let renamed = tensors
            .into_iter()
            .map(|mut t| {
                if let Some(model) = variant.tensor_names.get(&t.name) {
                    t.name = model.clone();
                }
                t
            })
            .collect();
        let tensors = io.sample(renamed).map_err(|e| invalid(e.to_string()))?;
        by_shape.entry(shape_key(&tensors)).or_default().push(tensors);
    }
    let mut by_size: std::collections::BTreeMap<u64, Vec<Vec<NamedTensor>>> = Default::default();
    for group in by_shape.into_values() {
        let size = tidal_common::tensor::element_count(&group[0][0].shape).unwrap_or(0) as u64;
        let kept = by_size.entry(size).or_default();
        if group.len() > kept.len() {
            *kept = group;
        }
    }
    // Texts and recordings come in many lengths: measure at most MAX_GRID of them, spread
    // evenly over the sizes the samples have, smallest and largest among them (the planner
    // interpolates between measured sizes).
    let sizes = by_size.len();
    let kept: Vec<usize> = if sizes <= MAX_GRID {
        (0..sizes).collect()
    } else {
        info!(sizes, kept = MAX_GRID, "the samples come in more input sizes than a profile measures");
        (0..MAX_GRID).map(|k| k * (sizes - 1) / (MAX_GRID - 1)).collect()
    };
    Ok(by_size
        .into_iter()
        .enumerate()
        .filter(|(i, _)| kept.contains(i))
        .map(|(_, (size, samples))| SampleSet { size, samples })
        .collect())
}

/// A batch of `batch` of the set's samples (repeated as needed), one tensor per input, of at
/// most [`MAX_PROFILE_BYTES`] each.
fn stacked(set: &SampleSet, batched: bool, batch: u32) -> Result<Vec<FrameTensor>, Status> {
    let n = if batched { batch as usize } else { 1 };
    (0..set.samples[0].len())
        .map(|i| {
            let first = &set.samples[0][i];
            if first.data.len().saturating_mul(n) > MAX_PROFILE_BYTES {
                return Err(Status::invalid_argument(format!(
                    "a batch of {n} samples of input {} ({} bytes each) is too large to profile",
                    first.name,
                    first.data.len()
                )));
            }
            let mut shape = if batched { vec![i64::from(batch)] } else { Vec::new() };
            shape.extend_from_slice(&first.shape);
            let data = set.samples.iter().cycle().take(n).flat_map(|s| s[i].data.iter().copied()).collect();
            Ok(FrameTensor { name: first.name.clone(), datatype: first.element.v2_name().into(), shape, data })
        })
        .collect()
}

/// Measures every batch size at every input size on `grid.cores` with one fresh worker in
/// `cgroup`.
async fn profile_at(
    node: &Node,
    variant: &VariantSpec,
    model: &Path,
    signature: &Signature,
    cgroup: &WorkerCgroup,
    grid: Grid<'_>,
) -> Result<Vec<ProfilePoint>, Status> {
    let cores = grid.cores;
    let mut proc = WorkerProcess::spawn(&node.cfg.process, model, cgroup, cores * 1000)
        .await
        .map_err(|e| Status::internal(format!("starting a worker for {}: {e}", variant.name)))?;
    // A model without a batch dimension runs one request at a time: batch 1 is all there is.
    let batches = if signature.batched() { grid.batches.to_vec() } else { vec![1] };
    // The model's names of a generating stage's budget input and tokens output.
    let model_name = |stage: &str| variant.tensor_names.get(stage).cloned().unwrap_or_else(|| stage.to_string());
    let lengths: Vec<u32> = match grid.generate {
        Some(g) if g.max_tokens > 1 => vec![1, g.max_tokens],
        Some(_) => vec![1],
        None => vec![0],
    };
    let mut points = Vec::new();
    // Each point's memory is the peak while it ran; the first's also the model's load, which a
    // worker must have room for before it serves anything.
    let mut first = true;
    for set in grid.sets {
        for &batch in &batches {
            for &length in &lengths {
                if !std::mem::take(&mut first) {
                    proc.reset_peak_memory();
                }
                let measured = async {
                    let mut inputs = if set.samples.is_empty() {
                        profile_inputs(signature, variant, batch)?
                    } else {
                        stacked(set, signature.batched(), batch)?
                    };
                    let Some(g) = grid.generate else {
                        return Ok((measure(&mut proc, &inputs, grid.duration, cores * 1000).await?, 0));
                    };
                    let budget = model_name(&g.budget);
                    for t in inputs.iter_mut().filter(|t| t.name == budget) {
                        let n = t.shape.first().copied().unwrap_or(1).max(1) as usize;
                        t.data = i64::from(length).to_le_bytes().repeat(n);
                    }
                    // What it wrote (fewer than asked when every sample ended early).
                    let written = run_batch(&mut proc, &inputs, cores * 1000).await?;
                    let steps = crate::generation::steps_taken(&written.outputs, [&g.output, &model_name(&g.output)]);
                    Ok((measure(&mut proc, &inputs, grid.duration, cores * 1000).await?, steps as u32))
                };
                let ((mut latencies, elapsed), output_tokens) = match measured.await {
                    Ok(measured) => measured,
                    Err(e) => {
                        proc.stop(Duration::from_secs(1)).await;
                        return Err(e);
                    }
                };
                let resident_bytes = proc.peak_memory().unwrap_or(0);
                let point = ProfilePoint {
                    size: set.size,
                    output_tokens,
                    resident_bytes,
                    ..summarise(cores, batch, &mut latencies, elapsed)
                };
                info!(variant = %variant.name, cores, batch, size = set.size, output_tokens, p99_ms = point.latency_p99_ms, rps = point.throughput_rps, resident_mib = resident_bytes >> 20, "profiled");
                points.push(point);
            }
        }
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
    millicores: u32,
) -> Result<(Vec<Duration>, f64), Status> {
    for _ in 0..2 {
        time_batch(proc, inputs, millicores).await?;
    }
    let mut latencies = Vec::new();
    let started = Instant::now();
    while started.elapsed() < duration || latencies.len() < 3 {
        latencies.push(time_batch(proc, inputs, millicores).await?);
    }
    Ok((latencies, started.elapsed().as_secs_f64()))
}

/// A batch of `batch` samples of every input the model takes. The first input's sample has
/// the variant's `input_shape`; the others their declared dimensions, a dynamic one at the
/// first input's size where the model names both dimensions alike (a text model's
/// `attention_mask` follows its `input_ids`' sequence), else 1. Floating-point inputs hold
/// uniform noise in [0, 1); integer and boolean inputs zeros, which are valid indices and token
/// ids for any model.
fn profile_inputs(signature: &Signature, variant: &VariantSpec, batch: u32) -> Result<Vec<FrameTensor>, Status> {
    let batched = signature.batched();
    let mut rng = rand::thread_rng();
    let skip = usize::from(batched);
    // The first input's named dynamic dimensions, at the variant's sizes.
    let named: std::collections::HashMap<&str, i64> = signature
        .inputs
        .first()
        .filter(|first| first.shape.len() == skip + variant.input_shape.len())
        .map(|first| {
            first.shape[skip..]
                .iter()
                .zip(&variant.input_shape)
                .filter_map(|(d, &n)| match d {
                    Dim::Dynamic(Some(name)) => Some((name.as_str(), n)),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    signature
        .inputs
        .iter()
        .enumerate()
        .map(|(i, input)| {
            let declared = &input.shape[skip..];
            let sample: Vec<i64> = if i == 0 && variant.input_shape.len() == declared.len() {
                variant.input_shape.clone()
            } else {
                declared
                    .iter()
                    .map(|d| match d {
                        Dim::Fixed(n) => *n,
                        Dim::Dynamic(Some(name)) => named.get(name.as_str()).copied().unwrap_or(1),
                        Dim::Dynamic(None) => 1,
                    })
                    .collect()
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
/// Most bytes of one input of a profiled batch of the user's samples.
const MAX_PROFILE_BYTES: usize = 1 << 30;

async fn time_batch(p: &mut WorkerProcess, inputs: &[FrameTensor], millicores: u32) -> Result<Duration, Status> {
    let t = Instant::now();
    run_batch(p, inputs, millicores).await?;
    Ok(t.elapsed())
}

/// Runs one batch on a worker held to `millicores` (its threads are that quota's).
async fn run_batch(p: &mut WorkerProcess, inputs: &[FrameTensor], millicores: u32) -> Result<BatchResult, Status> {
    let r = p.run(inputs.to_vec(), millicores).await.map_err(|e| Status::internal(e.to_string()))?;
    if !r.error.is_empty() {
        return Err(Status::internal(r.error));
    }
    Ok(r)
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
        size: 0,
        output_tokens: 0,
        resident_bytes: 0,
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
