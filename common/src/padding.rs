//! Padding: requests that differ only in a sequence's length share a batch. A stage declares
//! which inputs are padded along which dynamic dimension and with what value (`StageSpec.pad`;
//! the model's mask input, padded with 0, tells it what is padding), and which outputs follow
//! that length (`StageSpec.trim`), so that each request gets its own length back.
//!
//! Axes here count the batch dimension, as the model declares its tensors; the functions on
//! bytes work on one sample (no batch dimension).

use std::collections::HashSet;

use tidal_proto::v1::StageSpec;

use crate::onnx_signature::ElementType;

/// An input padded along `axis` of one sample (its batch dimension left out) with `fill`, one
/// element's little-endian bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Padded {
    /// Its position among the stage's inputs.
    pub input: usize,
    pub axis: usize,
    pub fill: Vec<u8>,
}

/// An output cut back along `axis` of one sample to its request's length.
#[derive(Debug, Clone, PartialEq)]
pub struct Trimmed {
    pub output: usize,
    pub axis: usize,
}

/// A value as one element of `element`, if it is one exactly.
pub fn element_bytes(element: ElementType, value: f64) -> Result<Vec<u8>, String> {
    use ElementType as E;
    let integral = value.fract() == 0.0;
    let int = |lo: f64, hi: f64| -> Result<i128, String> {
        if integral && (lo..=hi).contains(&value) {
            Ok(value as i128)
        } else {
            Err(format!("{value} is not a value of {}", element.v2_name()))
        }
    };
    if !value.is_finite() {
        return Err(format!("{value} is not a value of {}", element.v2_name()));
    }
    Ok(match element {
        E::Fp32 => (value as f32).to_le_bytes().to_vec(),
        E::Fp64 => value.to_le_bytes().to_vec(),
        E::Fp16 => half::f16::from_f64(value).to_le_bytes().to_vec(),
        E::Bf16 => half::bf16::from_f64(value).to_le_bytes().to_vec(),
        E::Int8 => (int(i8::MIN as f64, i8::MAX as f64)? as i8).to_le_bytes().to_vec(),
        E::Int16 => (int(i16::MIN as f64, i16::MAX as f64)? as i16).to_le_bytes().to_vec(),
        E::Int32 => (int(i32::MIN as f64, i32::MAX as f64)? as i32).to_le_bytes().to_vec(),
        E::Int64 => (int(-(2f64.powi(53)), 2f64.powi(53))? as i64).to_le_bytes().to_vec(),
        E::Uint8 => (int(0.0, u8::MAX as f64)? as u8).to_le_bytes().to_vec(),
        E::Uint16 => (int(0.0, u16::MAX as f64)? as u16).to_le_bytes().to_vec(),
        E::Uint32 => (int(0.0, u32::MAX as f64)? as u32).to_le_bytes().to_vec(),
        E::Uint64 => (int(0.0, 2f64.powi(53))? as u64).to_le_bytes().to_vec(),
        E::Bool => vec![int(0.0, 1.0)? as u8],
        E::Bytes => return Err("BYTES tensors are not padded".into()),
    })
}

/// A stage's padding and trims, checked against its signature: inputs and outputs it has, of a
/// batched stage, each named once, along a dynamic dimension other than the batch's, with a
/// value of the input's type. Empty lists are always valid.
pub fn of_stage(stage: &StageSpec) -> Result<(Vec<Padded>, Vec<Trimmed>), String> {
    if stage.pad.is_empty() && stage.trim.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    let at = |what: &str| format!("stage {}: {what}", stage.name);
    if stage.pad.is_empty() {
        return Err(at("trims outputs but pads no input"));
    }
    if stage.inputs.is_empty() {
        return Err(at("padding needs the models' signature (register the task with tidalctl)"));
    }
    let batched = stage.inputs.iter().chain(&stage.outputs).all(|t| t.shape.first() == Some(&-1));
    if !batched {
        return Err(at("pads inputs, but its models take no batch (no leading dynamic dimension)"));
    }
    let dynamic_axis = |shape: &[i64], axis: u32, name: &str| -> Result<usize, String> {
        let axis = axis as usize;
        if axis == 0 || shape.get(axis) != Some(&-1) {
            return Err(at(&format!(
                "{name:?} is padded or trimmed along axis {axis}, which must be a dynamic dimension of {shape:?} other than the batch's (0)"
            )));
        }
        Ok(axis - 1)
    };
    let mut seen = HashSet::new();
    let mut pads = Vec::with_capacity(stage.pad.len());
    for p in &stage.pad {
        let Some(input) = stage.inputs.iter().position(|t| t.name == p.input) else {
            return Err(at(&format!("pads {:?}, which is not one of its inputs", p.input)));
        };
        if !seen.insert(p.input.as_str()) {
            return Err(at(&format!("pads {:?} twice", p.input)));
        }
        let declared = &stage.inputs[input];
        let axis = dynamic_axis(&declared.shape, p.axis, &p.input)?;
        let element = ElementType::from_v2_name(&declared.datatype)
            .ok_or_else(|| at(&format!("{:?} has the unknown type {:?}", p.input, declared.datatype)))?;
        let fill = element_bytes(element, p.value).map_err(|e| at(&format!("the padding of {:?}: {e}", p.input)))?;
        pads.push(Padded { input, axis, fill });
    }
    let mut seen = HashSet::new();
    let mut trims = Vec::with_capacity(stage.trim.len());
    for t in &stage.trim {
        let Some(output) = stage.outputs.iter().position(|o| o.name == t.output) else {
            return Err(at(&format!("trims {:?}, which is not one of its outputs", t.output)));
        };
        if !seen.insert(t.output.as_str()) {
            return Err(at(&format!("trims {:?} twice", t.output)));
        }
        let axis = dynamic_axis(&stage.outputs[output].shape, t.axis, &t.output)?;
        trims.push(Trimmed { output, axis });
    }
    Ok((pads, trims))
}

/// The bytes of one sample of `shape` (elements of `size` bytes) padded along `axis` to
/// `len` with `fill`.
pub fn pad(data: &[u8], shape: &[i64], size: usize, axis: usize, len: i64, fill: &[u8]) -> Vec<u8> {
    let (outer, have, inner) = split_at_axis(shape, axis, size);
    let want = len.max(0) as usize * inner;
    let mut out = Vec::with_capacity(outer * want);
    for block in data.chunks_exact(have.max(1)).take(outer) {
        out.extend_from_slice(&block[..have]);
        for _ in 0..(want - have.min(want)) / size {
            out.extend_from_slice(fill);
        }
    }
    out
}

/// The bytes of one sample of `shape` cut back along `axis` to `len`.
pub fn cut(data: &[u8], shape: &[i64], size: usize, axis: usize, len: i64) -> Vec<u8> {
    let (outer, have, inner) = split_at_axis(shape, axis, size);
    let keep = (len.max(0) as usize * inner).min(have);
    let mut out = Vec::with_capacity(outer * keep);
    for block in data.chunks_exact(have.max(1)).take(outer) {
        out.extend_from_slice(&block[..keep]);
    }
    out
}

/// For `shape` split at `axis`: how many blocks come before it, the bytes of one block (the
/// axis and everything after it), and the bytes of one step along the axis.
fn split_at_axis(shape: &[i64], axis: usize, size: usize) -> (usize, usize, usize) {
    let product = |dims: &[i64]| dims.iter().map(|&d| d.max(0) as usize).product::<usize>();
    let outer = product(&shape[..axis]);
    let inner = product(&shape[axis + 1..]) * size;
    (outer, shape[axis].max(0) as usize * inner, inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidal_proto::v1::{Padding, Trim};

    use crate::onnx_signature::test_signature as sig;

    fn text_stage() -> StageSpec {
        StageSpec {
            name: "encode".into(),
            inputs: vec![sig("ids", "INT64", &[-1, -1]), sig("mask", "BOOL", &[-1, -1])],
            outputs: vec![sig("hidden", "FP32", &[-1, -1, 8]), sig("pooled", "FP32", &[-1, 8])],
            pad: vec![
                Padding { input: "ids".into(), axis: 1, value: 0.0 },
                Padding { input: "mask".into(), axis: 1, value: 0.0 },
            ],
            trim: vec![Trim { output: "hidden".into(), axis: 1 }],
            ..Default::default()
        }
    }

    #[test]
    fn padding_is_checked_against_the_signature() {
        let (pads, trims) = of_stage(&text_stage()).unwrap();
        assert_eq!(pads[1], Padded { input: 1, axis: 0, fill: vec![0] });
        assert_eq!(trims, vec![Trimmed { output: 0, axis: 0 }]);
        let refused = |change: fn(&mut StageSpec), why: &str| {
            let mut s = text_stage();
            change(&mut s);
            let err = of_stage(&s).unwrap_err();
            assert!(err.contains(why), "{why}: {err}");
        };
        refused(|s| s.pad[0].input = "tokens".into(), "not one of its inputs");
        refused(|s| s.pad[1].input = "ids".into(), "pads \"ids\" twice");
        refused(|s| s.pad[0].axis = 0, "other than the batch's");
        refused(|s| s.pad[0].axis = 2, "axis 2");
        refused(|s| s.outputs[0].shape = vec![-1, 4, 8], "axis 1, which must be a dynamic dimension");
        refused(|s| s.pad[1].value = 2.0, "2 is not a value of BOOL");
        refused(|s| s.pad[0].value = 0.5, "0.5 is not a value of INT64");
        refused(|s| s.trim[0].output = "ids".into(), "not one of its outputs");
        refused(|s| s.pad.clear(), "pads no input");
        refused(|s| s.inputs.iter_mut().for_each(|i| i.shape[0] = 2), "take no batch");
        assert_eq!(element_bytes(ElementType::Fp16, 1.0).unwrap(), half::f16::ONE.to_le_bytes().to_vec());
        assert!(element_bytes(ElementType::Uint8, -1.0).is_err());
        assert!(element_bytes(ElementType::Fp32, f64::NAN).is_err());
    }

    #[test]
    fn a_sample_padded_then_cut_is_itself() {
        // [2, 3] of i16 along axis 1 to 5, filled with -1.
        let values: Vec<i16> = vec![1, 2, 3, 4, 5, 6];
        let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let padded = pad(&data, &[2, 3], 2, 1, 5, &(-1i16).to_le_bytes());
        let back: Vec<i16> = padded.chunks_exact(2).map(|b| i16::from_le_bytes([b[0], b[1]])).collect();
        assert_eq!(back, vec![1, 2, 3, -1, -1, 4, 5, 6, -1, -1]);
        assert_eq!(cut(&padded, &[2, 5], 2, 1, 3), data);
        // Along the first axis of [3, 2]: whole rows appended.
        let padded = pad(&data, &[3, 2], 2, 0, 4, &0i16.to_le_bytes());
        assert_eq!(padded.len(), 16);
        assert_eq!(&padded[..12], &data[..]);
        assert_eq!(cut(&padded, &[4, 2], 2, 0, 3), data);
        // Already as long: unchanged.
        assert_eq!(pad(&data, &[2, 3], 2, 1, 3, &[0, 0]), data);
    }
}
