//! The Open Inference Protocol (KServe V2) as both of its fronts serve it ([`super::v2_grpc`],
//! [`super::v2_rest`]), with Triton's ModelConfig and ModelStatistics, so that Triton's and
//! KServe's clients and tools call an agent as they are.
//!
//! A Tidal task is a model (a pipeline included), of the version the plan serves (its
//! `TaskSpec.version`; a request naming another gets NOT_FOUND), whose inputs are its first
//! stage's and whose outputs its last stage's, by the names, types and shapes the model files
//! declare (a task registered without a signature: one FP32 input `input`, one output
//! `output`). Which variant serves stays Tidal's choice; it is reported in the response's
//! parameters (`tidal_*`). A request may carry its latency budget as the parameter
//! `budget_ms`. A request to a model that takes batches may hold up to [`MAX_CLIENT_BATCH`]
//! samples; each is queued, batched and deadline-ordered like a request of its own.

use std::collections::HashMap;
use std::time::Instant;

use tidal_common::onnx_signature::ElementType;
use tidal_common::task::MAX_SLO_MS;
use tidal_common::tensor::{Declared, NamedTensor, StageIo};
use tidal_proto::inference::infer_parameter::ParameterChoice;
use tidal_proto::inference::model_infer_response::InferOutputTensor;
use tidal_proto::inference::model_metadata_response::TensorMetadata;
use tidal_proto::inference::{
    DataType as ConfigType, InferParameter, ModelConfig, ModelDynamicBatching, ModelInferRequest, ModelInferResponse,
    ModelInput, ModelMetadataResponse, ModelOutput, ModelStatistics, ModelTransactionPolicy, ServerMetadataResponse,
};
use tidal_proto::v1::{InferRequest, InferResponse, TaskSpec};
use tonic::Status;

use crate::error::ServeError;
use crate::fronts::InferencePort;
use tidal_common::v2_tensor;

/// Most samples one request may carry (Triton's `max_batch_size`).
pub const MAX_CLIENT_BATCH: usize = 64;
/// The request parameter that carries a request's latency budget, in ms.
pub const BUDGET_PARAMETER: &str = "budget_ms";
/// The version of `task` this node serves, as the V2 protocol names versions.
fn served_version(task: &TaskSpec) -> String {
    task.version.max(1).to_string()
}
/// What ServerMetadata lists: the protocol extensions an agent implements (binary tensor data
/// over HTTP/REST, see the `v2_rest` module).
pub const EXTENSIONS: &[&str] =
    &["model_configuration", "statistics", "parameters", "binary_tensor_data", "classification"];
/// The output parameter of Triton's classification extension: how many classes to answer.
pub const CLASSIFICATION_PARAMETER: &str = "classification";
/// The most classes a request may ask of one output.
const MAX_CLASSES: i64 = 1 << 20;

fn invalid(msg: impl Into<String>) -> ServeError {
    ServeError::InvalidInput(msg.into())
}

/// What a task takes (its first stage's inputs and later stages' that no stage feeds) and
/// gives (its last stage's outputs).
pub fn io(task: &TaskSpec) -> Result<(StageIo, StageIo), ServeError> {
    if task.stages.is_empty() {
        return Err(ServeError::NoWorker(task.name.clone()));
    }
    let io = tidal_common::text::task_io(&task.stages)
        .map_err(|why| ServeError::Model(format!("task {}: {why}", task.name)))?;
    let gives = StageIo { inputs: Vec::new(), ..io.clone() };
    Ok((io, gives))
}

/// Checks a V2 request against `task`, which takes `first` and gives `last` ([`io`]), and
/// splits it into one Tidal request per sample, all with the request's one budget and the
/// outputs it asks for.
fn samples(
    mut req: ModelInferRequest,
    task: &TaskSpec,
    (first, last): &(StageIo, StageIo),
) -> Result<Vec<InferRequest>, ServeError> {
    check_version(task, &req.model_version)?;
    let budget_ms = budget(&req.parameters)?;
    let outputs: Vec<String> = req.outputs.iter().map(|o| o.name.clone()).collect();
    last.check_outputs(&outputs).map_err(|e| invalid(e.to_string()))?;
    if req.inputs.is_empty() {
        return Err(invalid(format!("task {} takes inputs; the request has none", task.name)));
    }
    let raw = std::mem::take(&mut req.raw_input_contents);
    if !raw.is_empty() && raw.len() != req.inputs.len() {
        return Err(invalid(format!(
            "{} raw_input_contents for {} inputs (raw contents are given for every input or none)",
            raw.len(),
            req.inputs.len()
        )));
    }
    let mut raw = raw.into_iter();
    // Each input whole, then cut into samples along the batch dimension.
    let mut whole = Vec::with_capacity(req.inputs.len());
    let mut n: Option<usize> = None;
    for input in req.inputs {
        let element = v2_tensor::element(&input.name, &input.datatype).map_err(invalid)?;
        let data = match (raw.next(), &input.contents) {
            (Some(_), Some(_)) => {
                return Err(invalid(format!("input {:?} has both contents and raw_input_contents", input.name)))
            }
            (Some(data), None) => data,
            (None, Some(c)) => {
                v2_tensor::contents_bytes(element, c).map_err(|e| invalid(format!("input {:?}: {e}", input.name)))?
            }
            (None, None) => {
                return Err(invalid(format!(
                    "input {:?} has no data (neither contents nor raw_input_contents)",
                    input.name
                )))
            }
        };
        let t = NamedTensor { name: input.name, element, shape: input.shape, data };
        t.check_length().map_err(|e| invalid(format!("input {:?}: {e}", t.name)))?;
        // A batched model's input leads with the request's batch (one sample may leave it out).
        let declared = first.inputs.iter().find(|d| d.name == t.name);
        let samples = match declared {
            Some(d) if first.batched && t.shape.len() == d.shape.len() => usize::try_from(t.shape[0]).unwrap_or(0),
            _ => 1,
        };
        if !(1..=MAX_CLIENT_BATCH).contains(&samples) {
            return Err(invalid(format!("a request holds 1–{MAX_CLIENT_BATCH} samples, not {}", t.shape[0])));
        }
        if n.is_some_and(|n| n != samples) {
            return Err(invalid(format!("input {:?} holds {samples} samples; the others {}", t.name, n.unwrap_or(0))));
        }
        n = Some(samples);
        whole.push(t);
    }
    let n = n.unwrap_or(1);
    let mut per_sample: Vec<Vec<NamedTensor>> = (0..n).map(|_| Vec::with_capacity(whole.len())).collect();
    for t in whole {
        if n == 1 {
            per_sample[0].push(t);
            continue;
        }
        let name = t.name.clone();
        let parts = t.split_samples(n).map_err(|e| invalid(format!("input {name:?}: {e}")))?;
        for (sample, part) in per_sample.iter_mut().zip(parts) {
            sample.push(part);
        }
    }
    // Each sample checked here, so that a malformed request never reaches the request path.
    per_sample
        .into_iter()
        .map(|tensors| {
            let tensors = first.sample(tensors).map_err(|e| invalid(e.to_string()))?;
            Ok(InferRequest {
                task: task.name.clone(),
                inputs: tensors.into_iter().map(NamedTensor::into_proto).collect(),
                outputs: outputs.clone(),
                budget_ms,
                version: req.model_version.clone(),
                ..Default::default()
            })
        })
        .collect()
}

/// A request may name the version served (or, during a rollout, its canary's) or none (then
/// it gets the one served, or the canary for its share); another version is not served here
/// (NOT_FOUND).
fn check_version(task: &TaskSpec, version: &str) -> Result<(), ServeError> {
    let served = served_version(task);
    let canary = task.canary.as_ref().is_some_and(|c| c.version.to_string() == version);
    if version.is_empty() || version == served || canary {
        Ok(())
    } else {
        Err(ServeError::UnknownTask(format!("{} version {version} (version {served} is served)", task.name)))
    }
}

/// The spec of the version of `task` a request names: the canary's during its rollout,
/// else the task's own.
fn version_spec(port: &InferencePort, task: TaskSpec, version: &str) -> TaskSpec {
    let canary = task.canary.as_ref().filter(|c| !version.is_empty() && c.version.to_string() == version);
    canary.and_then(|c| port.node().task(&c.task)).unwrap_or(task)
}

/// The model name a client knows a task by (a canary's is its task's).
fn model_name(task: &TaskSpec) -> &str {
    tidal_common::task::parse_canary(&task.name).map_or(task.name.as_str(), |(name, _)| name)
}

/// The `budget_ms` parameter, if any (0: the task's SLO).
fn budget(parameters: &HashMap<String, InferParameter>) -> Result<u32, ServeError> {
    let Some(p) = parameters.get(BUDGET_PARAMETER) else { return Ok(0) };
    let ms = match &p.parameter_choice {
        Some(ParameterChoice::Int64Param(v)) => *v as f64,
        Some(ParameterChoice::Uint64Param(v)) => *v as f64,
        Some(ParameterChoice::DoubleParam(v)) => *v,
        _ => return Err(invalid(format!("{BUDGET_PARAMETER} is a number of milliseconds"))),
    };
    if !(1.0..=f64::from(MAX_SLO_MS)).contains(&ms) {
        return Err(invalid(format!("{BUDGET_PARAMETER} must be 1–{MAX_SLO_MS} ms, not {ms}")));
    }
    Ok(ms.round() as u32)
}

/// The V2 response for the samples' answers, in order: each output with the samples stacked
/// along its first dimension (a model's batch dimension), and how they were served in
/// `tidal_*` parameters.
pub fn response(
    req_id: String,
    task: &TaskSpec,
    answers: Vec<InferResponse>,
) -> Result<ModelInferResponse, ServeError> {
    let parameters = served_parameters(&answers);
    // Each sample is served by a version of its own (a canary takes its share of them).
    let mut served: Vec<String> = answers.iter().map(|a| a.version.max(1).to_string()).collect();
    served.sort();
    served.dedup();
    let versions = if served.is_empty() { served_version(task) } else { served.join(",") };
    let n = answers.len();
    let mut per_sample = answers.into_iter().map(|a| a.outputs.into_iter().map(NamedTensor::from_proto));
    let first: Vec<NamedTensor> = per_sample
        .next()
        .ok_or_else(|| ServeError::Model("no answer".into()))?
        .collect::<Result<_, _>>()
        .map_err(|e| ServeError::Model(e.to_string()))?;
    let mut outputs = Vec::with_capacity(first.len());
    let mut raw: Vec<Vec<u8>> = Vec::with_capacity(first.len());
    for t in &first {
        let mut shape = t.shape.clone();
        if n > 1 {
            // Each sample's output leads with its batch dimension of 1.
            match shape.first_mut() {
                Some(d) if *d == 1 => *d = n as i64,
                _ => {
                    return Err(ServeError::Model(format!(
                        "output {:?} of shape {shape:?} has no batch dimension",
                        t.name
                    )))
                }
            }
        }
        outputs.push(InferOutputTensor {
            name: t.name.clone(),
            datatype: t.element.v2_name().into(),
            shape,
            parameters: HashMap::new(),
            contents: None,
        });
        raw.push(Vec::with_capacity(t.data.len() * n));
    }
    for (i, t) in first.into_iter().enumerate() {
        raw[i].extend_from_slice(&t.data);
    }
    for sample in per_sample {
        let sample: Vec<NamedTensor> =
            sample.collect::<Result<_, _>>().map_err(|e| ServeError::Model(e.to_string()))?;
        for (i, t) in sample.into_iter().enumerate() {
            let same = outputs.get(i).is_some_and(|o| o.name == t.name && o.shape.get(1..) == t.shape.get(1..));
            if !same {
                return Err(ServeError::Model(format!(
                    "the samples' outputs {:?} differ in shape (a dynamic output); send one sample per request",
                    t.name
                )));
            }
            raw[i].extend_from_slice(&t.data);
        }
    }
    Ok(ModelInferResponse {
        model_name: model_name(task).to_string(),
        model_version: versions,
        id: req_id,
        parameters,
        outputs,
        raw_output_contents: raw,
    })
}

/// How the samples were served: the variants (one per sample, comma-separated), their mean
/// accuracy, and node, batch and timings of the first sample.
fn served_parameters(answers: &[InferResponse]) -> HashMap<String, InferParameter> {
    let string = |s: String| InferParameter { parameter_choice: Some(ParameterChoice::StringParam(s)) };
    let int = |v: u64| InferParameter { parameter_choice: Some(ParameterChoice::Int64Param(v as i64)) };
    let first = &answers[0];
    let accuracy = answers.iter().map(|a| a.accuracy).sum::<f64>() / answers.len() as f64;
    let variants: Vec<&str> = answers.iter().map(|a| a.variant.as_str()).collect();
    let stages: Vec<String> = first
        .stages
        .iter()
        .map(|s| match s.skipped {
            true => format!("{}=skipped", s.stage),
            false => format!("{}={}@{}/b{}", s.stage, s.variant, s.node, s.batch_size),
        })
        .collect();
    HashMap::from([
        ("tidal_variant".into(), string(variants.join(","))),
        ("tidal_accuracy".into(), InferParameter { parameter_choice: Some(ParameterChoice::DoubleParam(accuracy)) }),
        ("tidal_node".into(), string(first.node.clone())),
        ("tidal_batch_size".into(), int(u64::from(first.batch_size))),
        ("tidal_queue_us".into(), int(first.queue_us)),
        ("tidal_total_us".into(), int(first.total_us)),
        ("tidal_run_us".into(), int(first.stages.iter().map(|s| s.run_us).sum())),
        ("tidal_stages".into(), string(stages.join(";"))),
    ])
}

/// The task's description for ModelMetadata: its inputs and outputs as declared, -1 for a
/// dynamic dimension (the batch dimension included).
pub fn metadata(task: &TaskSpec) -> Result<ModelMetadataResponse, ServeError> {
    let (first, last) = io(task)?;
    let tensors = |ts: &[Declared]| -> Vec<TensorMetadata> {
        ts.iter()
            .map(|t| TensorMetadata {
                name: t.name.clone(),
                datatype: t.element.v2_name().into(),
                shape: t.shape.clone(),
            })
            .collect()
    };
    Ok(ModelMetadataResponse {
        name: model_name(task).to_string(),
        // During a rollout, the canary's version too.
        versions: std::iter::once(served_version(task))
            .chain(task.canary.as_ref().map(|c| c.version.to_string()))
            .collect(),
        platform: "tidal".into(),
        inputs: tensors(&first.inputs),
        outputs: tensors(&last.outputs),
    })
}

/// Triton's name of an element type in a model configuration.
pub fn config_type(element: ElementType) -> ConfigType {
    match element {
        ElementType::Bool => ConfigType::TypeBool,
        ElementType::Uint8 => ConfigType::TypeUint8,
        ElementType::Uint16 => ConfigType::TypeUint16,
        ElementType::Uint32 => ConfigType::TypeUint32,
        ElementType::Uint64 => ConfigType::TypeUint64,
        ElementType::Int8 => ConfigType::TypeInt8,
        ElementType::Int16 => ConfigType::TypeInt16,
        ElementType::Int32 => ConfigType::TypeInt32,
        ElementType::Int64 => ConfigType::TypeInt64,
        ElementType::Fp16 => ConfigType::TypeFp16,
        ElementType::Fp32 => ConfigType::TypeFp32,
        ElementType::Fp64 => ConfigType::TypeFp64,
        ElementType::Bytes => ConfigType::TypeString,
        ElementType::Bf16 => ConfigType::TypeBf16,
    }
}

/// The task as a Triton model configuration: a model that takes batches takes up to
/// [`MAX_CLIENT_BATCH`] samples from a client (its dims then leave the batch dimension out,
/// as Triton's do), one that does not takes one (`max_batch_size` 0); dynamic batching on the
/// server.
pub fn config(task: &TaskSpec) -> Result<ModelConfig, ServeError> {
    let (first, last) = io(task)?;
    let dims = |io: &StageIo, t: &Declared| io.sample_shape(t).to_vec();
    Ok(ModelConfig {
        name: task.name.clone(),
        platform: "tidal".into(),
        backend: "tidal".into(),
        max_batch_size: if first.batched { MAX_CLIENT_BATCH as i32 } else { 0 },
        input: first
            .inputs
            .iter()
            .map(|t| ModelInput {
                name: t.name.clone(),
                data_type: config_type(t.element) as i32,
                dims: dims(&first, t),
            })
            .collect(),
        output: last
            .outputs
            .iter()
            .map(|t| ModelOutput {
                name: t.name.clone(),
                data_type: config_type(t.element) as i32,
                dims: dims(&last, t),
            })
            .collect(),
        dynamic_batching: Some(ModelDynamicBatching::default()),
        model_transaction_policy: Some(ModelTransactionPolicy { decoupled: false }),
    })
}

/// The task a V2 request names (NOT_FOUND for another version or an unknown task).
pub fn task(port: &InferencePort, name: &str, version: &str) -> Result<TaskSpec, Status> {
    let task = port.node().task(name).ok_or_else(|| ServeError::UnknownTask(name.to_string()))?;
    check_version(&task, version)?;
    Ok(version_spec(port, task, version))
}

/// Ready: a plan is applied, every task in it can be served, and the node is not draining.
pub fn server_ready(port: &InferencePort) -> bool {
    let node = port.node();
    // A canary still loading does not hold the node back: its task's version served answers.
    let serves = |t: &String| tidal_common::task::parse_canary(t).is_some() || node.task_ready(t);
    node.applied_epoch() > 0 && !node.draining() && node.task_names().iter().all(serves)
}

/// Serves an admitted V2 request, over gRPC or REST: each sample as a request of its own.
pub async fn infer(
    port: &InferencePort,
    req: ModelInferRequest,
    arrived: Instant,
) -> Result<ModelInferResponse, Status> {
    let task = port.node().task(&req.model_name).ok_or_else(|| ServeError::UnknownTask(req.model_name.clone()))?;
    let task = version_spec(port, task, &req.model_version);
    let id = req.id.clone();
    let checked = io(&task).and_then(|io| {
        let classes = requested_classes(&req, &io.1)?;
        Ok((classes, samples(req, &task, &io)?, io.1.batched))
    });
    let (classes, requests, batched) = checked.inspect_err(|e| port.pipeline.count_refused(&task.name, arrived, e))?;
    let answers = requests.into_iter().map(|r| port.pipeline.infer(r, arrived, None, true));
    let answered = futures::future::try_join_all(answers)
        .await
        .and_then(|answers| response(id, &task, answers))
        .and_then(|answer| classified(answer, &classes, batched));
    port.node().model_stats.record_request(&task.name, arrived, answered.is_ok());
    Ok(answered?)
}

/// The outputs a request asks to be classified (Triton's classification extension: the
/// output parameter `classification`, tritonclient's `class_count`), with how many classes.
fn requested_classes(req: &ModelInferRequest, last: &StageIo) -> Result<Vec<(String, usize)>, ServeError> {
    let mut classes = Vec::new();
    for o in &req.outputs {
        let Some(p) = o.parameters.get(CLASSIFICATION_PARAMETER) else { continue };
        let k = match p.parameter_choice {
            Some(ParameterChoice::Int64Param(k)) => k,
            Some(ParameterChoice::Uint64Param(k)) => i64::try_from(k).unwrap_or(i64::MAX),
            _ => return Err(invalid(format!("output {:?}: {CLASSIFICATION_PARAMETER} is a count of classes", o.name))),
        };
        if !(1..=MAX_CLASSES).contains(&k) {
            return Err(invalid(format!(
                "output {:?}: {CLASSIFICATION_PARAMETER} is 1–{MAX_CLASSES} classes, not {k}",
                o.name
            )));
        }
        if last.outputs.iter().any(|d| d.name == o.name && d.element == ElementType::Bytes) {
            return Err(invalid(format!("output {:?} is text (BYTES): it has no classes to rank", o.name)));
        }
        classes.push((o.name.clone(), k as usize));
    }
    Ok(classes)
}

/// The answer with each output in `classes` replaced by its highest classes per sample, as
/// Triton answers: BYTES `"value:index"`, shape [samples, k] (a `batched` task) or [k].
fn classified(
    mut answer: ModelInferResponse,
    classes: &[(String, usize)],
    batched: bool,
) -> Result<ModelInferResponse, ServeError> {
    for (name, k) in classes {
        let i = answer
            .outputs
            .iter()
            .position(|o| &o.name == name)
            .ok_or_else(|| ServeError::Model(format!("the model gave no output {name:?}")))?;
        let output = &mut answer.outputs[i];
        let element = v2_tensor::element(&output.name, &output.datatype).map_err(ServeError::Model)?;
        let data = answer.raw_output_contents.get_mut(i).ok_or_else(|| ServeError::Model("no output data".into()))?;
        let values = v2_tensor::numbers(element, data)
            .ok_or_else(|| invalid(format!("output {name:?} is text (BYTES): it has no classes to rank")))?;
        let rows = match output.shape.first() {
            Some(&n) if batched => usize::try_from(n).unwrap_or(0).max(1),
            _ => 1,
        };
        let k = (*k).min(values.len() / rows);
        let integer = !matches!(element, ElementType::Fp16 | ElementType::Bf16 | ElementType::Fp32 | ElementType::Fp64);
        let top = v2_tensor::top_classes(&values, rows, k, integer);
        output.datatype = ElementType::Bytes.v2_name().into();
        output.shape = if batched { vec![rows as i64, k as i64] } else { vec![k as i64] };
        *data = tidal_common::tensor::encode_strings(&top);
    }
    Ok(answer)
}

/// Statistics of one task, or of every task when `name` is empty.
pub fn statistics(port: &InferencePort, name: &str, version: &str) -> Result<Vec<ModelStatistics>, Status> {
    Ok(if name.is_empty() {
        port.node().model_stats.snapshot(&port.node().task_names(), true)
    } else {
        port.node().model_stats.snapshot(&[task(port, name, version)?.name], false)
    })
}

/// What ServerMetadata answers.
pub fn server_metadata() -> ServerMetadataResponse {
    ServerMetadataResponse {
        name: "tidal".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        extensions: EXTENSIONS.iter().map(|e| e.to_string()).collect(),
    }
}
