//! The Open Inference Protocol (KServe V2) over gRPC (`inference.GRPCInferenceService`), with
//! Triton's streaming extension.

use std::pin::Pin;
use std::time::Instant;

use futures::future::ready;
use futures::{Stream, StreamExt};

use tidal_proto::inference::grpc_inference_service_server::GrpcInferenceService;
use tidal_proto::inference::{
    ModelConfigRequest, ModelConfigResponse, ModelInferRequest, ModelInferResponse, ModelMetadataRequest,
    ModelMetadataResponse, ModelReadyRequest, ModelReadyResponse, ModelStatisticsRequest, ModelStatisticsResponse,
    ModelStreamInferResponse, ServerLiveRequest, ServerLiveResponse, ServerMetadataRequest, ServerMetadataResponse,
    ServerReadyRequest, ServerReadyResponse,
};
use tonic::{Request, Response, Status, Streaming};

use crate::fronts::{v2, InferencePort};

/// Requests one stream may have in flight at once: enough for the batcher to fill batches
/// from one client, and a bound on what one client holds of the agent. Answers go out in the
/// requests' order whatever order they finish in.
const STREAM_IN_FLIGHT: usize = 64;

type AnswerStream = Pin<Box<dyn Stream<Item = Result<ModelStreamInferResponse, Status>> + Send>>;

/// The V2 gRPC front.
#[derive(Clone)]
pub struct V2Grpc(pub InferencePort);

#[tonic::async_trait]
impl GrpcInferenceService for V2Grpc {
    async fn server_live(&self, _: Request<ServerLiveRequest>) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(&self, _: Request<ServerReadyRequest>) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse { ready: v2::server_ready(&self.0) }))
    }

    async fn model_ready(&self, request: Request<ModelReadyRequest>) -> Result<Response<ModelReadyResponse>, Status> {
        self.0.admit_read(&request)?;
        let req = request.into_inner();
        let task = v2::task(&self.0, &req.name, &req.version)?;
        Ok(Response::new(ModelReadyResponse { ready: self.0.node().task_ready(&task.name) }))
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(v2::server_metadata()))
    }

    async fn model_metadata(
        &self,
        request: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        self.0.admit_read(&request)?;
        let req = request.into_inner();
        Ok(Response::new(v2::metadata(&v2::task(&self.0, &req.name, &req.version)?)?))
    }

    async fn model_infer(&self, request: Request<ModelInferRequest>) -> Result<Response<ModelInferResponse>, Status> {
        let arrived = Instant::now();
        self.0.admit(&request)?;
        Ok(Response::new(v2::infer(&self.0, request.into_inner(), arrived).await?))
    }

    type ModelStreamInferStream = AnswerStream;

    /// Each request of the stream takes the request path of `ModelInfer`; a failed one is
    /// answered with its error in `error_message`, as Triton does, and the stream goes on. The
    /// stream ends when the client ends its side (or breaks it) and every answer is sent.
    async fn model_stream_infer(
        &self,
        request: Request<Streaming<ModelInferRequest>>,
    ) -> Result<Response<AnswerStream>, Status> {
        self.0.admit(&request)?;
        let port = self.0.clone();
        let answers = request
            .into_inner()
            .take_while(|r| ready(r.is_ok()))
            .filter_map(|r| ready(r.ok()))
            .map(move |req| {
                let (port, arrived) = (port.clone(), Instant::now());
                async move { Ok(stream_answer(&port, req, arrived).await) }
            })
            .buffered(STREAM_IN_FLIGHT);
        Ok(Response::new(Box::pin(answers)))
    }

    async fn model_config(
        &self,
        request: Request<ModelConfigRequest>,
    ) -> Result<Response<ModelConfigResponse>, Status> {
        self.0.admit_read(&request)?;
        let req = request.into_inner();
        Ok(Response::new(ModelConfigResponse {
            config: Some(v2::config(&v2::task(&self.0, &req.name, &req.version)?)?),
        }))
    }

    async fn model_statistics(
        &self,
        request: Request<ModelStatisticsRequest>,
    ) -> Result<Response<ModelStatisticsResponse>, Status> {
        self.0.admit_read(&request)?;
        let req = request.into_inner();
        Ok(Response::new(ModelStatisticsResponse { model_stats: v2::statistics(&self.0, &req.name, &req.version)? }))
    }
}

/// One request of a stream, answered or failed.
async fn stream_answer(port: &InferencePort, req: ModelInferRequest, arrived: Instant) -> ModelStreamInferResponse {
    let (model_name, model_version, id) = (req.model_name.clone(), req.model_version.clone(), req.id.clone());
    match v2::infer(port, req, arrived).await {
        Ok(answer) => ModelStreamInferResponse { error_message: String::new(), infer_response: Some(answer) },
        Err(status) => ModelStreamInferResponse {
            error_message: status.message().to_string(),
            // Names the request the error is for: a client may have many in flight.
            infer_response: Some(ModelInferResponse { model_name, model_version, id, ..Default::default() }),
        },
    }
}
