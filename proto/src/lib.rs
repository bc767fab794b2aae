//! Generated gRPC services and messages.
//!
//! `tidal::v1` is the wire contract between `tidalctl`, controllers and agents; `inference` is
//! the standard inference protocol agents also speak; `onnx` is the small part of the ONNX model
//! format that `tidalctl models generate` needs to write models.

pub mod tidal {
    pub mod v1 {
        tonic::include_proto!("tidal.v1");
    }
}

pub mod onnx {
    tonic::include_proto!("onnx");
}

/// The Open Inference Protocol (KServe V2) with Triton's ModelConfig and ModelStatistics.
pub mod inference {
    tonic::include_proto!("inference");
}

/// Triton's model configuration (`config.pbtxt`), as `tidalctl task import` reads it.
pub mod triton {
    tonic::include_proto!("tidal.triton");
}

/// Encoded descriptors of Tidal's API and of the V2 protocol, for server reflection.
pub const TIDAL_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("tidal_descriptor");
pub const KSERVE_V2_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("kserve_v2_descriptor");
/// The descriptor of [`triton::ModelConfig`], for parsing its text format.
pub const TRITON_MODEL_CONFIG_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("triton_model_config_descriptor");

pub use tidal::v1;

/// Metadata key in which a controller replica that is not the leader names the leader's
/// address, so that a client can go there directly.
pub const LEADER_METADATA: &str = "tidal-leader";

/// The leader's address that a follower named in a refusal, if any.
pub fn leader_hint(status: &tonic::Status) -> Option<String> {
    let hint = status.metadata().get(LEADER_METADATA)?.to_str().ok()?;
    (!hint.is_empty()).then(|| hint.to_string())
}

/// A refusal from a replica that is not the leader, naming the leader when it is known.
pub fn not_leader(leader_address: Option<&str>) -> tonic::Status {
    let mut status = match leader_address {
        Some(a) => tonic::Status::unavailable(format!("this controller replica is not the leader; the leader is {a}")),
        None => tonic::Status::unavailable("no controller leader is elected at the moment; retry shortly"),
    };
    if let Some(value) = leader_address.and_then(|a| a.parse().ok()) {
        status.metadata_mut().insert(LEADER_METADATA, value);
    }
    status
}

/// Metadata key an agent sets on a request it forwards to another agent's workers: the
/// receiver serves it itself and does not count it again.
pub const FORWARDED_METADATA: &str = "tidal-forwarded";

/// Metadata key an agent sets on an UNAVAILABLE answer to a request it counted as an arrival
/// (it had the task but no worker or route for it), and a client sets on its retry of that
/// request at another agent: that agent serves it without counting it again, so that a request
/// is one arrival however many agents it tries.
pub const COUNTED_METADATA: &str = "tidal-counted";

/// Metadata key naming the one pipeline stage a forwarded request asks the receiver to run
/// (its input is that stage's input). Without it, the task's first stage.
pub const STAGE_METADATA: &str = "tidal-stage";
