//! Tidal's own inference API (`tidal.v1.Inference`): one request, one sample, its stages
//! reported; a request another agent forwards names the stage to run here.

use std::time::Instant;

use tidal_proto::v1::inference_server::Inference;
use tidal_proto::v1::{InferRequest, InferResponse};
use tidal_proto::{FORWARDED_METADATA, STAGE_METADATA};
use tonic::{Request, Response, Status};

use crate::fronts::InferencePort;
use crate::pipeline::Forwarded;

/// The front of Tidal's own API.
#[derive(Clone)]
pub struct TidalApi(pub InferencePort);

#[tonic::async_trait]
impl Inference for TidalApi {
    async fn infer(&self, request: Request<InferRequest>) -> Result<Response<InferResponse>, Status> {
        let arrived = Instant::now();
        self.0.admit(&request)?;
        let (metadata, _, req) = request.into_parts();
        let forwarded = request_forwarded(&metadata);
        let count = forwarded.is_none() && !metadata.contains_key(tidal_proto::COUNTED_METADATA);
        let task = req.task.clone();
        let is_forwarded = forwarded.is_some();
        let served = self.0.pipeline.infer(req, arrived, forwarded, count).await;
        if !is_forwarded && self.0.node().task(&task).is_some() {
            // A client's request; one forwarded from another agent is counted where it arrived.
            self.0.node().model_stats.record_request(&task, arrived, served.is_ok());
        }
        served.map(Response::new).map_err(|e| {
            let mut status = Status::from(e);
            if count && status.code() == tonic::Code::Unavailable {
                status
                    .metadata_mut()
                    .insert(tidal_proto::COUNTED_METADATA, tonic::metadata::MetadataValue::from_static("1"));
            }
            status
        })
    }
}

fn request_forwarded(metadata: &tonic::metadata::MetadataMap) -> Option<Forwarded> {
    metadata.get(FORWARDED_METADATA)?;
    let stage = metadata.get(STAGE_METADATA).and_then(|v| v.to_str().ok()).unwrap_or_default();
    Some(Forwarded { stage: stage.to_string() })
}
