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
    /// The samples' float32 values, little-endian, as raw bytes: copied whole, not encoded
    /// value by value.
    #[prost(bytes = "vec", tag = "3")]
    pub data: Vec<u8>,
}

/// The outputs of one batch, or why it failed.
#[derive(Clone, PartialEq, prost::Message)]
pub struct BatchResult {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(int64, repeated, tag = "2")]
    pub shape: Vec<i64>,
    /// float32 values, little-endian.
    #[prost(bytes = "vec", tag = "3")]
    pub data: Vec<u8>,
    #[prost(string, tag = "4")]
    pub error: String,
    /// Time spent inside ONNX Runtime, µs.
    #[prost(uint64, tag = "5")]
    pub run_us: u64,
}

// Frames carry float32 values as the machine holds them, which is little-endian, as the
// protocol says: a copy of memory, not a conversion value by value.
#[cfg(not(target_endian = "little"))]
compile_error!("the worker protocol assumes a little-endian machine");

/// float32 values as the frames carry them.
pub fn to_bytes(values: &[f32]) -> Vec<u8> {
    bytemuck::cast_slice(values).to_vec()
}

/// Appends float32 values to a frame's data.
pub fn extend_bytes(out: &mut Vec<u8>, values: &[f32]) {
    out.extend_from_slice(bytemuck::cast_slice(values));
}

/// A frame's data as float32 values (trailing bytes that make no value are ignored).
pub fn from_bytes(bytes: &[u8]) -> Vec<f32> {
    bytemuck::pod_collect_to_vec(&bytes[..bytes.len() / 4 * 4])
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_cross_as_little_endian_bytes_and_back() {
        let values = [1.5f32, -0.25, f32::MAX, 0.0];
        let bytes = to_bytes(&values);
        assert_eq!(&bytes[..4], &1.5f32.to_le_bytes());
        let mut more = vec![9u8];
        extend_bytes(&mut more, &values[..1]);
        assert_eq!(more, [&[9u8][..], &1.5f32.to_le_bytes()].concat());
        // Unaligned input and a trailing partial value.
        let mut shifted = vec![0u8];
        shifted.extend_from_slice(&bytes);
        shifted.push(7);
        assert_eq!(from_bytes(&shifted[1..]), values);
    }
}
