//! The Open Inference Protocol (KServe V2) over gRPC (`inference.GRPCInferenceService`).

use std::time::Instant;

use tidal_proto::inference::grpc_inference_service_server::GrpcInferenceService;
use tidal_proto::inference::{
    ModelConfigRequest, ModelConfigResponse, ModelInferRequest, ModelInferResponse, ModelMetadataRequest,
    ModelMetadataResponse, ModelReadyRequest, ModelReadyResponse, ModelStatisticsRequest, ModelStatisticsResponse,
    ServerLiveRequest, ServerLiveResponse, ServerMetadataRequest, ServerMetadataResponse, ServerReadyRequest,
    ServerReadyResponse,
};
use tonic::{Request, Response, Status};

use crate::fronts::{v2, InferencePort};

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
