//! Generated gRPC services and messages.
//!
//! `tidal::v1` is the wire contract between `tidalctl`, controllers and agents; `onnx` is the
//! small part of the ONNX model format that `tidalctl models generate` needs to write models.

pub mod tidal {
    pub mod v1 {
        tonic::include_proto!("tidal.v1");
    }
}

pub mod onnx {
    tonic::include_proto!("onnx");
}

pub use tidal::v1;
