//! Frames between the agent and a worker process, over the child's stdin and stdout: a 4-byte
//! big-endian length, then a protobuf message (the framing of `tokio_util`'s
//! `LengthDelimitedCodec`, which the agent's side uses).

use std::io::{Read, Write};

/// Largest frame either side accepts (a batch of 256 samples of 3×224×224 floats is ~154 MB).
pub const MAX_FRAME: usize = 256 << 20;

/// Sent by the worker once its ONNX Runtime session is ready, or why it is not.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Ready {
    #[prost(string, tag = "3")]
    pub error: String,
}

/// A tensor in a frame: its name, the Open Inference Protocol's name of its element type, its
/// shape, and its values as raw little-endian bytes (copied whole, not encoded value by value).
#[derive(Clone, PartialEq, prost::Message)]
pub struct FrameTensor {
    /// Empty in a batch: the model's first input.
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub datatype: String,
    #[prost(int64, repeated, tag = "3")]
    pub shape: Vec<i64>,
    #[prost(bytes = "vec", tag = "4")]
    pub data: Vec<u8>,
}

/// A batch to run: each input's samples stacked along a leading batch dimension (a model
/// without one gets one sample as it is).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Batch {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(message, repeated, tag = "4")]
    pub inputs: Vec<FrameTensor>,
    /// The outputs to return, by name; empty: all, in the model's order.
    #[prost(string, repeated, tag = "5")]
    pub outputs: Vec<String>,
    /// The intra-op threads the worker is to run with (its quota's cores; 0: as it runs). A
    /// new count is built beside the running session and swapped in once ready (see
    /// `memory_limit`). A batch with
    /// no inputs says only this, and is answered at once.
    #[prost(uint32, tag = "6")]
    pub threads: u32,
    /// The worker's memory limit, bytes (0: none): a new session is built beside the running
    /// one only when the limit has room for both, else in its place.
    #[prost(uint64, tag = "7")]
    pub memory_limit: u64,
}

/// The outputs of one batch, or why it failed.
#[derive(Clone, PartialEq, prost::Message)]
pub struct BatchResult {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(string, tag = "4")]
    pub error: String,
    /// Time spent inside ONNX Runtime, µs.
    #[prost(uint64, tag = "5")]
    pub run_us: u64,
    #[prost(message, repeated, tag = "6")]
    pub outputs: Vec<FrameTensor>,
    /// The intra-op threads of the session that ran the batch.
    #[prost(uint32, tag = "7")]
    pub threads: u32,
    /// Time the batch waited before it ran for the process's sessions: a build swapped in
    /// (the old session dropped, its memory given back) or a session rebuilt in place (see
    /// `Batch::memory_limit`), µs; not the model's service time.
    #[prost(uint64, tag = "8")]
    pub setup_us: u64,
}

// Frames carry values as the machine holds them, which is little-endian, as the protocol
// says: a copy of memory, not a conversion value by value.
#[cfg(not(target_endian = "little"))]
compile_error!("the worker protocol assumes a little-endian machine");

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
