//! Frames between the agent and a worker process, over the child's stdin and stdout: a 4-byte
//! big-endian length, then a protobuf message (the framing of `tokio_util`'s
//! `LengthDelimitedCodec`, which the agent's side uses).

use std::io::{Read, Write};

/// Largest frame either side accepts (a batch of 256 samples of 3×224×224 floats is ~154 MB).
pub const MAX_FRAME: usize = 256 << 20;

/// Sent by the worker once its ONNX Runtime session is ready.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Ready {
    #[prost(string, tag = "1")]
    pub input_name: String,
    #[prost(string, tag = "2")]
    pub output_name: String,
    #[prost(string, tag = "3")]
    pub error: String,
}

/// A batch to run: `shape[0]` samples.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Batch {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(int64, repeated, tag = "2")]
    pub shape: Vec<i64>,
    #[prost(float, repeated, tag = "3")]
    pub data: Vec<f32>,
}

/// The outputs of one batch, or why it failed.
#[derive(Clone, PartialEq, prost::Message)]
pub struct BatchResult {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(int64, repeated, tag = "2")]
    pub shape: Vec<i64>,
    #[prost(float, repeated, tag = "3")]
    pub data: Vec<f32>,
    #[prost(string, tag = "4")]
    pub error: String,
    /// Time spent inside ONNX Runtime, µs.
    #[prost(uint64, tag = "5")]
    pub run_us: u64,
}

/// Reads one frame (blocking); `None` at end of stream.
pub fn read_frame<M: prost::Message + Default>(r: &mut impl Read) -> std::io::Result<Option<M>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("frame of {len} bytes")));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf)?;
    M::decode(buf.as_slice()).map(Some).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Writes one frame (blocking) and flushes it.
pub fn write_frame(w: &mut impl Write, m: &impl prost::Message) -> std::io::Result<()> {
    let body = m.encode_to_vec();
    w.write_all(&(body.len() as u32).to_be_bytes())?;
    w.write_all(&body)?;
    w.flush()
}
