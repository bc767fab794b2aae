//! The Open Inference Protocol (KServe V2) over HTTP/REST, on the inference port beside gRPC
//! (one port: HTTP/1.1 and HTTP/2). The same tasks, checks, token and request path as
//! [`super::v2_grpc`], in JSON, with Triton's binary tensor data extension, which `tritonclient.http`
//! and `perf_analyzer -i http` use by default:
//!
//! ```text
//! GET  /v2                                              server metadata
//! GET  /v2/health/live, /v2/health/ready
//! GET  /v2/models/{model}[/versions/{version}]          model metadata
//! GET  /v2/models/{model}[/versions/{version}]/ready
//! GET  /v2/models/{model}[/versions/{version}]/config   Triton's model configuration
//! GET  /v2/models[/{model}[/versions/{version}]]/stats  Triton's statistics
//! POST /v2/models/{model}[/versions/{version}]/infer
//! ```
//!
//! Request and response bodies may be gzip- or deflate-compressed (`Content-Encoding`,
//! `Accept-Encoding`).
//!
//! Health and readiness are answered by the status code (200 true, 400 false, as Triton does) and
//! by the protocol's bodies, `{"live": true}`, `{"ready": …}` and `{"name": …, "ready": …}`,
//! which the KServe SDK reads. Errors are `{"error": "…"}` with the HTTP status that matches the
//! gRPC one.

use std::collections::HashMap;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tidal_common::onnx_signature::ElementType;
use tidal_proto::inference::infer_parameter::ParameterChoice;
use tidal_proto::inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use tidal_proto::inference::model_metadata_response::TensorMetadata;
use tidal_proto::inference::{
    DataType as ConfigType, InferParameter, ModelInferRequest, ModelInferResponse, ModelStatistics, StatisticDuration,
};
use tidal_proto::v1::TaskSpec;
use tonic::{Code, Status};
use tower_http::compression::CompressionLayer;
use tower_http::decompression::RequestDecompressionLayer;

use crate::error::ServeError;
use crate::fronts::v2::{self, config, metadata};
use crate::fronts::InferencePort;
use tidal_common::v2_tensor;

/// The header that says how many bytes of a body are JSON; the rest is binary tensor data.
const HEADER_LENGTH: &str = "inference-header-content-length";

/// The REST routes, served with the gRPC services on the inference port. Bodies over
/// `body_limit` bytes are refused (413) before they are read whole.
pub fn router(port: InferencePort, body_limit: usize) -> Router {
    let mut router = Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(|| async { (StatusCode::OK, json_body(json!({ "live": true }))) }))
        .route("/v2/health/ready", get(server_ready))
        .route("/v2/models/stats", get(all_statistics));
    for model in ["/v2/models/{model}", "/v2/models/{model}/versions/{version}"] {
        router = router
            .route(model, get(model_metadata))
            .route(&format!("{model}/ready"), get(model_ready))
            .route(&format!("{model}/config"), get(model_config))
            .route(&format!("{model}/stats"), get(model_statistics))
            .route(&format!("{model}/infer"), post(infer));
    }
    // Bodies may come gzip- or deflate-compressed (`Content-Encoding`; 415 for another coding),
    // and the limit holds for the body as decompressed; answers are compressed when the client
    // accepts it (`Accept-Encoding`), as Triton's HTTP clients ask.
    router
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(RequestDecompressionLayer::new().gzip(true).deflate(true).no_br().no_zstd())
        .layer(axum::middleware::map_response(errors_as_json))
        .layer(CompressionLayer::new().gzip(true).deflate(true).no_br().no_zstd())
        .with_state(port)
}

#[derive(Deserialize)]
struct ModelPath {
    model: String,
    version: Option<String>,
}

impl ModelPath {
    fn version(&self) -> &str {
        self.version.as_deref().unwrap_or("")
    }
}

/// A refusal: the gRPC status's code as HTTP's, its message as `{"error": …}`.
struct RestError(Status);

impl From<Status> for RestError {
    fn from(s: Status) -> Self {
        Self(s)
    }
}

impl IntoResponse for RestError {
    fn into_response(self) -> Response {
        let code = match self.0.code() {
            Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => StatusCode::BAD_REQUEST,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        (code, json_body(json!({ "error": self.0.message() }))).into_response()
    }
}

type Result<T> = std::result::Result<T, RestError>;

fn json_body(v: Value) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], v.to_string())
}

fn invalid(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg)
}

/// The inference token, if the port takes one, and a plan applied (as [`InferencePort::admit`];
/// other agents never call over REST, so a certificate does not stand in for the token).
fn admit(port: &InferencePort, headers: &HeaderMap) -> Result<()> {
    if let Some(token) = &port.node().inference_token {
        token.check_header(headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()))?;
    }
    Ok(port.admit_planned()?)
}

/// [`admit`] for a route that only reads: without the token under `--public-metadata`.
fn admit_read(port: &InferencePort, headers: &HeaderMap) -> Result<()> {
    if port.public_reads() {
        Ok(port.admit_planned()?)
    } else {
        admit(port, headers)
    }
}

/// The task a model route names, for a caller admitted to read it.
fn admitted_task(port: &InferencePort, headers: &HeaderMap, p: &ModelPath) -> Result<TaskSpec> {
    admit_read(port, headers)?;
    Ok(v2::task(port, &p.model, p.version())?)
}

/// Every refusal in the protocol's form, `{"error": …}`: the ones answered before a handler
/// runs (a path that is not UTF-8, a body over the limit or not valid gzip, a
/// `Content-Encoding` not taken, a method a route does not serve) come as plain text or
/// empty from axum and tower-http.
async fn errors_as_json(response: Response) -> Response {
    let status = response.status();
    let json =
        response.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    // Such bodies are a line of text; more is not a message.
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let message = match text.trim() {
        "" => status.canonical_reason().unwrap_or("refused").to_string(),
        t => t.to_string(),
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    Response::from_parts(parts, axum::body::Body::from(json!({ "error": message }).to_string()))
}

/// Unknown paths: gRPC's UNIMPLEMENTED for a gRPC call (as tonic answers), 404 otherwise.
async fn not_found(headers: HeaderMap) -> Response {
    let grpc = headers.get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if grpc {
        Status::unimplemented("").into_http::<axum::body::Body>()
    } else {
        RestError(Status::not_found("no such V2 route")).into_response()
    }
}

async fn server_metadata() -> impl IntoResponse {
    let m = v2::server_metadata();
    json_body(json!({ "name": m.name, "version": m.version, "extensions": m.extensions }))
}

/// 200 when `ready`, else 400 (the protocol's "4xx is false"), with the body saying so.
fn readiness(ready: bool, body: Value) -> impl IntoResponse {
    (if ready { StatusCode::OK } else { StatusCode::BAD_REQUEST }, json_body(body))
}

async fn server_ready(State(port): State<InferencePort>) -> impl IntoResponse {
    let ready = v2::server_ready(&port);
    readiness(ready, json!({ "ready": ready }))
}

async fn model_ready(
    State(port): State<InferencePort>,
    Path(p): Path<ModelPath>,
    headers: HeaderMap,
) -> Result<impl IntoResponse> {
    let task = admitted_task(&port, &headers, &p)?;
    let ready = port.node().task_ready(&task.name);
    Ok(readiness(ready, json!({ "name": p.model, "ready": ready })))
}

async fn model_metadata(
    State(port): State<InferencePort>,
    Path(p): Path<ModelPath>,
    headers: HeaderMap,
) -> Result<impl IntoResponse> {
    let m = metadata(&admitted_task(&port, &headers, &p)?).map_err(Status::from)?;
    let tensors = |t: &[TensorMetadata]| -> Vec<Value> {
        t.iter().map(|t| json!({ "name": t.name, "datatype": t.datatype, "shape": t.shape })).collect()
    };
    Ok(json_body(json!({
        "name": m.name,
        "versions": m.versions,
        "platform": m.platform,
        "inputs": tensors(&m.inputs),
        "outputs": tensors(&m.outputs),
    })))
}

async fn model_config(
    State(port): State<InferencePort>,
    Path(p): Path<ModelPath>,
    headers: HeaderMap,
) -> Result<impl IntoResponse> {
    let c = config(&admitted_task(&port, &headers, &p)?).map_err(Status::from)?;
    let tensor = |name: &str, data_type: i32, dims: &[i64]| {
        let data_type = ConfigType::try_from(data_type).unwrap_or(ConfigType::TypeInvalid);
        json!({ "name": name, "data_type": data_type.as_str_name(), "dims": dims })
    };
    Ok(json_body(json!({
        "name": c.name,
        "platform": c.platform,
        "backend": c.backend,
        "max_batch_size": c.max_batch_size,
        "input": c.input.iter().map(|i| tensor(&i.name, i.data_type, &i.dims)).collect::<Vec<_>>(),
        "output": c.output.iter().map(|o| tensor(&o.name, o.data_type, &o.dims)).collect::<Vec<_>>(),
        "dynamic_batching": {},
        "model_transaction_policy": { "decoupled": false },
    })))
}

async fn all_statistics(State(port): State<InferencePort>, headers: HeaderMap) -> Result<impl IntoResponse> {
    admit_read(&port, &headers)?;
    Ok(json_body(statistics(&v2::statistics(&port, "", "")?)))
}

async fn model_statistics(
    State(port): State<InferencePort>,
    Path(p): Path<ModelPath>,
    headers: HeaderMap,
) -> Result<impl IntoResponse> {
    admit_read(&port, &headers)?;
    Ok(json_body(statistics(&v2::statistics(&port, &p.model, p.version())?)))
}

/// Triton's statistics JSON.
fn statistics(stats: &[ModelStatistics]) -> Value {
    let duration = |d: Option<StatisticDuration>| {
        let d = d.unwrap_or_default();
        json!({ "count": d.count, "ns": d.ns })
    };
    let models: Vec<Value> = stats
        .iter()
        .map(|m| {
            let i = m.inference_stats.unwrap_or_default();
            json!({
                "name": m.name,
                "version": m.version,
                "last_inference": m.last_inference,
                "inference_count": m.inference_count,
                "execution_count": m.execution_count,
                "inference_stats": {
                    "success": duration(i.success),
                    "fail": duration(i.fail),
                    "queue": duration(i.queue),
                    "compute_input": duration(i.compute_input),
                    "compute_infer": duration(i.compute_infer),
                    "compute_output": duration(i.compute_output),
                    "cache_hit": duration(i.cache_hit),
                    "cache_miss": duration(i.cache_miss),
                },
                "batch_stats": m.batch_stats.iter().map(|b| json!({
                    "batch_size": b.batch_size,
                    "compute_input": duration(b.compute_input),
                    "compute_infer": duration(b.compute_infer),
                    "compute_output": duration(b.compute_output),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({ "model_stats": models })
}

/// An inference request's JSON (the part before any binary data).
#[derive(Deserialize)]
struct InferBody {
    #[serde(default)]
    id: String,
    #[serde(default)]
    parameters: Map<String, Value>,
    inputs: Vec<InputBody>,
    #[serde(default)]
    outputs: Vec<OutputBody>,
}

#[derive(Deserialize)]
struct InputBody {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Map<String, Value>,
    data: Option<Value>,
}

#[derive(Deserialize)]
struct OutputBody {
    name: String,
    #[serde(default)]
    parameters: Map<String, Value>,
}

async fn infer(
    State(port): State<InferencePort>,
    Path(p): Path<ModelPath>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response> {
    let arrived = Instant::now();
    admit(&port, &headers)?;
    let model = p.model.clone();
    let (request, binary_output) = infer_request(&headers, &body, p).inspect_err(|refused| {
        port.pipeline.count_refused(&model, arrived, &ServeError::InvalidInput(refused.message().to_string()))
    })?;
    let response = v2::infer(&port, request, arrived).await?;
    Ok(infer_response(response, binary_output))
}

/// The request in V2's gRPC form, and whether the client wants the output as binary data.
fn infer_request(
    headers: &HeaderMap,
    body: &[u8],
    path: ModelPath,
) -> std::result::Result<(ModelInferRequest, bool), Status> {
    let (head, mut binary) = split_body(headers, body)?;
    let b: InferBody =
        serde_json::from_slice(head).map_err(|e| invalid(format!("the request is not V2 inference JSON: {e}")))?;
    let binary_output =
        flag(&b.parameters, "binary_data_output") || b.outputs.iter().any(|o| flag(&o.parameters, "binary_data"));
    // Every input's data as raw bytes (JSON values converted by the input's datatype), so that
    // inputs in JSON and in binary may be mixed, as Triton's clients do.
    let mut raw_input_contents = Vec::with_capacity(b.inputs.len());
    let mut inputs = Vec::with_capacity(b.inputs.len());
    for input in b.inputs {
        let data = match (input.parameters.get("binary_data_size"), &input.data) {
            (Some(size), None) => {
                let size = size
                    .as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| invalid(format!("input {:?}: binary_data_size is a number of bytes", input.name)))?;
                if size > binary.len() {
                    return Err(invalid(format!(
                        "input {:?} claims {size} bytes of binary data; the body has {} left",
                        input.name,
                        binary.len()
                    )));
                }
                let (data, rest) = binary.split_at(size);
                binary = rest;
                data.to_vec()
            }
            (None, Some(data)) => {
                let element = v2_tensor::element(&input.name, &input.datatype).map_err(invalid)?;
                v2_tensor::json_bytes(element, data).map_err(|e| invalid(format!("input {:?}: {e}", input.name)))?
            }
            (Some(_), Some(_)) => {
                return Err(invalid(format!("input {:?} has both data and binary_data_size", input.name)))
            }
            (None, None) => return Err(invalid(format!("input {:?} has no data", input.name))),
        };
        raw_input_contents.push(data);
        inputs.push(InferInputTensor {
            name: input.name,
            datatype: input.datatype,
            shape: input.shape,
            parameters: HashMap::new(),
            contents: None,
        });
    }
    if !binary.is_empty() {
        return Err(invalid(format!("{} bytes of binary data belong to no input", binary.len())));
    }
    let outputs = b
        .outputs
        .into_iter()
        .map(|o| Ok(InferRequestedOutputTensor { parameters: parameters(&o.parameters)?, name: o.name }))
        .collect::<std::result::Result<_, Status>>()?;
    let request = ModelInferRequest {
        model_name: path.model,
        model_version: path.version.unwrap_or_default(),
        id: b.id,
        parameters: parameters(&b.parameters)?,
        inputs,
        outputs,
        raw_input_contents,
    };
    Ok((request, binary_output))
}

/// The JSON part and the binary part of a body.
fn split_body<'a>(headers: &HeaderMap, body: &'a [u8]) -> std::result::Result<(&'a [u8], &'a [u8]), Status> {
    let Some(value) = headers.get(HEADER_LENGTH) else { return Ok((body, &[])) };
    let n = value.to_str().ok().and_then(|v| v.trim().parse::<usize>().ok()).filter(|n| *n <= body.len());
    let n = n.ok_or_else(|| {
        invalid(format!("{HEADER_LENGTH} must be the JSON's length in bytes, at most the body's {}", body.len()))
    })?;
    Ok(body.split_at(n))
}

fn flag(parameters: &Map<String, Value>, name: &str) -> bool {
    parameters.get(name).and_then(Value::as_bool).unwrap_or(false)
}

fn parameters(json: &Map<String, Value>) -> std::result::Result<HashMap<String, InferParameter>, Status> {
    json.iter()
        .map(|(name, v)| {
            let choice = match v {
                Value::Bool(b) => Some(ParameterChoice::BoolParam(*b)),
                Value::String(s) => Some(ParameterChoice::StringParam(s.clone())),
                Value::Number(n) => n
                    .as_i64()
                    .map(ParameterChoice::Int64Param)
                    .or_else(|| n.as_u64().map(ParameterChoice::Uint64Param))
                    .or_else(|| n.as_f64().map(ParameterChoice::DoubleParam)),
                _ => None,
            };
            let choice =
                choice.ok_or_else(|| invalid(format!("parameter {name:?} is a bool, a number or a string")))?;
            Ok((name.clone(), InferParameter { parameter_choice: Some(choice) }))
        })
        .collect()
}

fn parameter_json(p: &InferParameter) -> Value {
    match &p.parameter_choice {
        Some(ParameterChoice::BoolParam(b)) => json!(b),
        Some(ParameterChoice::Int64Param(v)) => json!(v),
        Some(ParameterChoice::Uint64Param(v)) => json!(v),
        Some(ParameterChoice::DoubleParam(v)) => json!(v),
        Some(ParameterChoice::StringParam(s)) => json!(s),
        None => Value::Null,
    }
}

/// The answer: JSON with the outputs' data inline, or JSON followed by the outputs' bytes.
fn infer_response(r: ModelInferResponse, binary: bool) -> Response {
    let mut raw = r.raw_output_contents.into_iter();
    let mut tail = Vec::new();
    let outputs: Vec<Value> = r
        .outputs
        .iter()
        .map(|o| {
            let data = raw.next().unwrap_or_default();
            let mut out = json!({ "name": o.name, "datatype": o.datatype, "shape": o.shape });
            if binary {
                out["parameters"] = json!({ "binary_data_size": data.len() });
                tail.extend_from_slice(&data);
            } else {
                out["data"] = match ElementType::from_v2_name(&o.datatype) {
                    Some(element) => v2_tensor::bytes_json(element, &data),
                    None => Value::Null,
                };
            }
            out
        })
        .collect();
    let parameters: Map<String, Value> = r.parameters.iter().map(|(k, p)| (k.clone(), parameter_json(p))).collect();
    let mut head = json!({
        "model_name": r.model_name,
        "model_version": r.model_version,
        "parameters": parameters,
        "outputs": outputs,
    });
    if !r.id.is_empty() {
        head["id"] = json!(r.id);
    }
    if !binary {
        return json_body(head).into_response();
    }
    let mut body = head.to_string().into_bytes();
    let json_len = body.len();
    body.extend_from_slice(&tail);
    (
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::HeaderName::from_static(HEADER_LENGTH), json_len.to_string()),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(json_len: Option<usize>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(n) = json_len {
            h.insert(HEADER_LENGTH, n.into());
        }
        h
    }

    fn path() -> ModelPath {
        ModelPath { model: "classify".into(), version: None }
    }

    #[test]
    fn json_inputs_flatten_and_parameters_keep_their_types() {
        let body = br#"{"id": "7", "parameters": {"budget_ms": 250, "tag": "a", "binary_data_output": true},
            "inputs": [{"name": "input", "shape": [1, 2, 2], "datatype": "FP32", "data": [[1, 2], [3.5, 4]]}]}"#;
        let (r, binary) = infer_request(&headers(None), body, path()).unwrap();
        assert!(binary);
        assert_eq!((r.model_name.as_str(), r.id.as_str()), ("classify", "7"));
        let want: Vec<u8> = [1.0f32, 2.0, 3.5, 4.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(r.raw_input_contents, vec![want]);
        assert!(r.inputs[0].contents.is_none());
        assert_eq!(r.parameters["budget_ms"].parameter_choice, Some(ParameterChoice::Int64Param(250)));
        assert_eq!(r.parameters["tag"].parameter_choice, Some(ParameterChoice::StringParam("a".into())));
    }

    #[test]
    fn binary_inputs_are_cut_from_the_body_after_the_json() {
        let head = br#"{"inputs": [{"name": "input", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 8}}],
            "outputs": [{"name": "output", "parameters": {"binary_data": true}}]}"#;
        let mut body = head.to_vec();
        body.extend(1.0f32.to_le_bytes().iter().chain(2.0f32.to_le_bytes().iter()));
        let (r, binary) = infer_request(&headers(Some(head.len())), &body, path()).unwrap();
        assert!(binary);
        assert_eq!(r.raw_input_contents, vec![body[head.len()..].to_vec()]);
        assert!(r.inputs[0].contents.is_none());
    }

    #[test]
    fn malformed_bodies_are_invalid_arguments_with_a_reason() {
        let input =
            |rest: &str| format!(r#"{{"inputs": [{{"name": "input", "shape": [2], "datatype": "FP32"{rest}}}]}}"#);
        let claims = input(r#", "parameters": {"binary_data_size": 8}"#);
        let cases: Vec<(&str, String, Option<usize>)> = vec![
            ("not json", "{".into(), None),
            ("no inputs", "{}".into(), None),
            ("no data", input(""), None),
            ("strings as data", input(r#", "data": ["a"]"#), None),
            ("more binary claimed than sent", claims.clone(), Some(claims.len())),
            ("header longer than the body", input(r#", "data": [1, 2]"#), Some(10_000)),
            ("data and binary", input(r#", "data": [1, 2], "parameters": {"binary_data_size": 0}"#), None),
        ];
        for (what, body, len) in cases {
            let err = infer_request(&headers(len), body.as_bytes(), path()).map(|_| ()).expect_err(what);
            assert_eq!(err.code(), Code::InvalidArgument, "{what}");
            assert!(!err.message().is_empty(), "{what}");
        }
        let object_parameter = r#"{"parameters": {"x": {}}, "inputs": []}"#;
        assert_eq!(
            infer_request(&headers(None), object_parameter.as_bytes(), path()).unwrap_err().code(),
            Code::InvalidArgument
        );
        let trailing = br#"{"inputs": []}xyz"#;
        assert_eq!(infer_request(&headers(Some(14)), trailing, path()).unwrap_err().code(), Code::InvalidArgument);
    }
}
