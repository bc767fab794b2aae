//! The Open Inference Protocol (KServe V2) as both of its fronts serve it ([`super::v2_grpc`],
//! [`super::v2_rest`]), with Triton's ModelConfig and ModelStatistics, so that Triton's and
//! KServe's clients and tools call an agent as they are.
//!
//! A Tidal task is a model (a pipeline included), version "1", with one float32 input named
//! `input` and one output named `output`. Which variant serves stays Tidal's choice; it is
//! reported in the response's parameters (`tidal_*`). A request may carry its latency budget
//! as the parameter `budget_ms`. A request may hold up to [`MAX_CLIENT_BATCH`] samples; each
//! is queued, batched and deadline-ordered like a request of its own.

use std::collections::HashMap;
use std::time::Instant;

use tidal_common::task::{input_shape, MAX_SLO_MS};
use tidal_proto::inference::infer_parameter::ParameterChoice;
use tidal_proto::inference::model_infer_response::InferOutputTensor;
use tidal_proto::inference::model_metadata_response::TensorMetadata;
use tidal_proto::inference::{
    DataType as ConfigType, InferParameter, ModelConfig, ModelDynamicBatching, ModelInferRequest, ModelInferResponse,
    ModelInput, ModelMetadataResponse, ModelOutput, ModelStatistics, ModelTransactionPolicy, ServerMetadataResponse,
};
use tidal_proto::v1::{DataType, InferRequest, InferResponse, TaskSpec, Tensor};
use tonic::Status;

use crate::error::ServeError;
use crate::fronts::InferencePort;
use crate::worker_protocol::to_bytes;

/// The name of every task's input and output tensor.
pub const INPUT_NAME: &str = "input";
pub const OUTPUT_NAME: &str = "output";
/// Most samples one request may carry (Triton's `max_batch_size`).
pub const MAX_CLIENT_BATCH: usize = 64;
/// The request parameter that carries a request's latency budget, in ms.
pub const BUDGET_PARAMETER: &str = "budget_ms";
/// The only version a task has.
const VERSION: &str = "1";
/// What ServerMetadata lists: the protocol extensions an agent implements (binary tensor data
/// over HTTP/REST, see the `v2_rest` module).
pub const EXTENSIONS: &[&str] = &["model_configuration", "statistics", "parameters", "binary_tensor_data"];

fn invalid(msg: impl Into<String>) -> ServeError {
    ServeError::InvalidInput(msg.into())
}

/// Checks a V2 request against `task` and splits it into one Tidal request per sample, all
/// with the request's one budget.
pub fn samples(mut req: ModelInferRequest, task: &TaskSpec) -> Result<Vec<InferRequest>, ServeError> {
    check_version(&req.model_name, &req.model_version)?;
    let budget_ms = budget(&req.parameters)?;
    if let Some(o) = req.outputs.iter().find(|o| o.name != OUTPUT_NAME) {
        return Err(invalid(format!("task {} has one output, {OUTPUT_NAME:?}; {:?} was asked for", task.name, o.name)));
    }
    let [input] = <[_; 1]>::try_from(std::mem::take(&mut req.inputs)).map_err(|inputs: Vec<_>| {
        invalid(format!("task {} takes one input, {INPUT_NAME:?}; the request has {}", task.name, inputs.len()))
    })?;
    if input.name != INPUT_NAME {
        return Err(invalid(format!("task {} takes one input, {INPUT_NAME:?}, not {:?}", task.name, input.name)));
    }
    if input.datatype != "FP32" {
        return Err(invalid(format!("input {INPUT_NAME:?} is FP32, not {:?}", input.datatype)));
    }
    let sample = input_shape(task);
    let n = if input.shape == sample {
        1
    } else if input.shape.len() == sample.len() + 1 && input.shape[1..] == *sample {
        usize::try_from(input.shape[0])
            .ok()
            .filter(|n| (1..=MAX_CLIENT_BATCH).contains(n))
            .ok_or_else(|| invalid(format!("a request holds 1–{MAX_CLIENT_BATCH} samples, not {}", input.shape[0])))?
    } else {
        return Err(invalid(format!(
            "input shape {:?} is not [batch, {}] (task {} takes {sample:?})",
            input.shape,
            sample.iter().map(i64::to_string).collect::<Vec<_>>().join(", "),
            task.name
        )));
    };
    let data = match (req.raw_input_contents.len(), input.contents) {
        (0, Some(c)) => to_bytes(&c.fp32_contents),
        (0, None) => return Err(invalid("the input has no data (neither contents nor raw_input_contents)")),
        (1, None) => req.raw_input_contents.pop().unwrap_or_default(),
        (1, Some(_)) => return Err(invalid("the input has both contents and raw_input_contents")),
        (k, _) => return Err(invalid(format!("{k} raw_input_contents for one input"))),
    };
    let per_sample = sample.iter().product::<i64>() as usize * 4;
    if data.len() != n * per_sample {
        return Err(invalid(format!(
            "{} bytes of input data do not make {n} FP32 samples of {sample:?} ({} bytes)",
            data.len(),
            n * per_sample
        )));
    }
    let tensor = |data: Vec<u8>| Tensor { dtype: DataType::Float32 as i32, shape: sample.to_vec(), data };
    let tensors: Vec<Tensor> =
        if n == 1 { vec![tensor(data)] } else { data.chunks_exact(per_sample).map(|c| tensor(c.to_vec())).collect() };
    Ok(tensors.into_iter().map(|t| InferRequest { task: task.name.clone(), input: Some(t), budget_ms }).collect())
}

fn check_version(model: &str, version: &str) -> Result<(), ServeError> {
    if version.is_empty() || version == VERSION {
        Ok(())
    } else {
        Err(ServeError::UnknownTask(format!("{model} version {version} (a task has only version {VERSION})")))
    }
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

/// The V2 response for the samples' answers, in order: one output tensor, samples stacked
/// along a first dimension of `n`, and how they were served in `tidal_*` parameters.
pub fn response(req_id: String, task: &str, answers: Vec<InferResponse>) -> Result<ModelInferResponse, ServeError> {
    let first = answers.first().ok_or_else(|| ServeError::Model("no answer".into()))?;
    let out = first.output.clone().unwrap_or_default();
    let shape = if answers.len() == 1 {
        out.shape.clone()
    } else {
        if answers.iter().any(|a| a.output.as_ref().map(|o| &o.shape) != Some(&out.shape)) {
            return Err(ServeError::Model(
                "the samples' outputs differ in shape (a pipeline with crops); send one sample per request".into(),
            ));
        }
        let per = if out.shape.first() == Some(&1) && out.shape.len() > 1 { &out.shape[1..] } else { &out.shape[..] };
        std::iter::once(answers.len() as i64).chain(per.iter().copied()).collect()
    };
    let parameters = served_parameters(&answers);
    let raw: Vec<u8> = if answers.len() == 1 {
        out.data
    } else {
        answers.into_iter().flat_map(|a| a.output.map(|o| o.data).unwrap_or_default()).collect()
    };
    Ok(ModelInferResponse {
        model_name: task.to_string(),
        model_version: VERSION.into(),
        id: req_id,
        parameters,
        outputs: vec![InferOutputTensor {
            name: OUTPUT_NAME.into(),
            datatype: "FP32".into(),
            shape,
            parameters: HashMap::new(),
            contents: None,
        }],
        raw_output_contents: vec![raw],
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
    let stages: Vec<String> =
        first.stages.iter().map(|s| format!("{}={}@{}/b{}", s.stage, s.variant, s.node, s.batch_size)).collect();
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

/// The task's description for ModelMetadata.
pub fn metadata(task: &TaskSpec) -> ModelMetadataResponse {
    let sample = input_shape(task);
    ModelMetadataResponse {
        name: task.name.clone(),
        versions: vec![VERSION.into()],
        platform: "tidal".into(),
        inputs: vec![TensorMetadata {
            name: INPUT_NAME.into(),
            datatype: "FP32".into(),
            shape: std::iter::once(-1).chain(sample.iter().copied()).collect(),
        }],
        // The output's size depends on the variant (and on crops in a pipeline).
        outputs: vec![TensorMetadata { name: OUTPUT_NAME.into(), datatype: "FP32".into(), shape: vec![-1, -1] }],
    }
}

/// The task as a Triton model configuration: batches of up to [`MAX_CLIENT_BATCH`] from a
/// client, dynamic batching on the server.
pub fn config(task: &TaskSpec) -> ModelConfig {
    ModelConfig {
        name: task.name.clone(),
        platform: "tidal".into(),
        backend: "tidal".into(),
        max_batch_size: MAX_CLIENT_BATCH as i32,
        input: vec![ModelInput {
            name: INPUT_NAME.into(),
            data_type: ConfigType::TypeFp32 as i32,
            dims: input_shape(task).to_vec(),
        }],
        output: vec![ModelOutput { name: OUTPUT_NAME.into(), data_type: ConfigType::TypeFp32 as i32, dims: vec![-1] }],
        dynamic_batching: Some(ModelDynamicBatching::default()),
        model_transaction_policy: Some(ModelTransactionPolicy { decoupled: false }),
    }
}

/// The task a V2 request names (NOT_FOUND for another version or an unknown task).
pub fn task(port: &InferencePort, name: &str, version: &str) -> Result<TaskSpec, Status> {
    check_version(name, version)?;
    port.node().task(name).ok_or_else(|| ServeError::UnknownTask(name.to_string()).into())
}

/// Ready: a plan is applied and every task in it can be served.
pub fn server_ready(port: &InferencePort) -> bool {
    port.node().applied_epoch() > 0 && port.node().task_names().iter().all(|t| port.node().task_ready(t))
}

/// Serves an admitted V2 request, over gRPC or REST: each sample as a request of its own.
pub async fn infer(
    port: &InferencePort,
    req: ModelInferRequest,
    arrived: Instant,
) -> Result<ModelInferResponse, Status> {
    let task = port.node().task(&req.model_name).ok_or_else(|| ServeError::UnknownTask(req.model_name.clone()))?;
    let id = req.id.clone();
    let answers = samples(req, &task)?.into_iter().map(|r| port.pipeline.infer(r, arrived, None, true));
    let answers = futures::future::try_join_all(answers).await?;
    Ok(response(id, &task.name, answers)?)
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
