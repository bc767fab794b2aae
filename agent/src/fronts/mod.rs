//! The inference port's protocol fronts, siblings over the one request path
//! ([`crate::pipeline`]):
//!
//! - [`tidal`]: Tidal's own API (`tidal.v1.Inference`, gRPC);
//! - [`v2_grpc`]: the Open Inference Protocol (KServe V2) over gRPC, with Triton's extensions;
//! - [`v2_rest`]: the same protocol over HTTP/REST, with Triton's binary tensor data.
//!
//! [`v2`] holds what the two V2 fronts share (tasks as models, requests split per sample,
//! metadata, configuration). Each front admits a call through [`InferencePort`] (token, a plan
//! applied), translates it to the pipeline's requests and its answers back, and nothing else.

pub mod tidal;
pub mod token;
pub mod v2;
pub mod v2_grpc;
pub mod v2_rest;

use std::sync::Arc;

use tidal_auth::Guard;
use tonic::{Request, Status};
use tracing::warn;

use crate::node::Node;
use crate::pipeline::Pipeline;

/// What every front of the inference port shares: who is let in, and the request path.
#[derive(Clone)]
pub struct InferencePort {
    pub pipeline: Pipeline,
    guard: Guard,
    /// `--public-metadata`: reads (health, metadata, configuration, statistics) need no token.
    public_reads: bool,
}

impl InferencePort {
    pub fn new(node: Arc<Node>, guard: Guard, public_reads: bool) -> Self {
        Self { pipeline: Pipeline::new(node), guard, public_reads }
    }

    pub fn public_reads(&self) -> bool {
        self.public_reads
    }

    pub fn node(&self) -> &Arc<Node> {
        self.pipeline.node()
    }

    /// Whether the inference port takes this request at all: its token (another agent
    /// forwarding a stage shows its certificate instead), and a plan applied here.
    pub fn admit<T>(&self, request: &Request<T>) -> Result<(), Status> {
        self.admit_token(request)?;
        self.admit_planned()
    }

    /// [`Self::admit`] for a call that only reads (metadata, configuration, readiness,
    /// statistics): without the token under `--public-metadata`.
    pub fn admit_read<T>(&self, request: &Request<T>) -> Result<(), Status> {
        if self.public_reads {
            self.admit_planned()
        } else {
            self.admit(request)
        }
    }

    /// The token part of [`Self::admit`]: headers only, so the gRPC fronts check it before
    /// reading the message.
    pub fn admit_token<T>(&self, request: &Request<T>) -> Result<(), Status> {
        if let Some(token) = &self.node().inference_token {
            let from_agent = matches!(self.guard.caller(request)?, Some(tidal_auth::Role::Agent(_)));
            if !from_agent {
                if let Err(refused) = token.check(request.metadata()) {
                    let peer = request.remote_addr();
                    warn!(target: "audit", call = "inference", peer = ?peer, reason = refused.message(), "call refused");
                    return Err(refused);
                }
            }
        }
        Ok(())
    }

    /// A plan applied here: what [`Self::admit`] asks once the caller is let in.
    pub fn admit_planned(&self) -> Result<(), Status> {
        if self.node().applied_epoch() == 0 {
            // Starting (or restarted) and not yet told what to serve: not "unknown task", which
            // a client would take as final, but unavailable, which it retries elsewhere.
            return Err(Status::unavailable("this agent has no plan yet (it is starting); try another agent"));
        }
        Ok(())
    }
}
