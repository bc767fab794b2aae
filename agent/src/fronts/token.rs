//! The inference token, checked from a gRPC call's headers before its message is read (so a
//! caller without it cannot make the agent buffer a large request). With `--public-metadata`
//! the methods that only read (health of the server and its models, metadata, configuration,
//! statistics) are let through without it: Triton's perf_analyzer and clients read metadata
//! without the headers they send with inference requests.

use std::task::{Context, Poll};

use futures::future::{Either, Ready};
use tonic::codegen::{http, Service};
use tonic::server::NamedService;

use super::InferencePort;

/// V2's read-only methods: open with `--public-metadata`.
pub const V2_READS: &[&str] =
    &["ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelConfig", "ModelStatistics"];

/// A gRPC service behind the inference token. `reads` are the service's methods that
/// `--public-metadata` opens; every other method (and any method it does not know) needs the
/// token.
#[derive(Clone)]
pub struct TokenFirst<S> {
    inner: S,
    port: InferencePort,
    reads: &'static [&'static str],
}

impl<S> TokenFirst<S> {
    pub fn new(inner: S, port: InferencePort, reads: &'static [&'static str]) -> Self {
        Self { inner, port, reads }
    }

    fn open(&self, path: &str) -> bool {
        let method = path.rsplit('/').next().unwrap_or_default();
        self.port.public_reads() && self.reads.contains(&method)
    }
}

impl<S: NamedService> NamedService for TokenFirst<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for TokenFirst<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<S::Future, Ready<Result<Self::Response, Self::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if !self.open(request.uri().path()) {
            // The headers and connection (the caller's certificate) as a tonic request.
            let metadata = tonic::metadata::MetadataMap::from_headers(request.headers().clone());
            let extensions = request.extensions().clone();
            let probe = tonic::Request::from_parts(metadata, extensions, ());
            if let Err(refused) = self.port.admit_token(&probe) {
                return Either::Right(futures::future::ready(Ok(refused.into_http())));
            }
        }
        Either::Left(self.inner.call(request))
    }
}
