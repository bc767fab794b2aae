//! What an ONNX file says it takes: the shape of its first graph input, read without decoding
//! the weights, so that a variant whose declared input differs from its model is refused
//! where it arrives instead of failing every request later.

use std::path::Path;

use prost::Message;
use tidal_proto::onnx::{tensor_shape_proto::dimension, type_proto, ValueInfoProto};

/// `ModelProto` with only its graph (field 7), and of the graph only its inputs (field 11):
/// prost skips every other field (the initializers) without copying it.
#[derive(Clone, PartialEq, Message)]
struct ModelInputs {
    #[prost(message, optional, tag = "7")]
    graph: Option<GraphInputs>,
}

#[derive(Clone, PartialEq, Message)]
struct GraphInputs {
    #[prost(message, repeated, tag = "11")]
    input: Vec<ValueInfoProto>,
}

/// The dimensions of the model's first input; `None` is a dynamic one (a named or unknown
/// dimension, as the batch is).
pub fn declared_input(model: &[u8]) -> Result<Vec<Option<i64>>, String> {
    let m = ModelInputs::decode(model).map_err(|e| format!("not an ONNX model: {e}"))?;
    let input = m.graph.and_then(|g| g.input.into_iter().next()).ok_or("the model declares no input")?;
    let Some(type_proto::Value::TensorType(t)) = input.r#type.and_then(|t| t.value) else {
        return Err(format!("input {:?} is not a tensor", input.name));
    };
    let shape = t.shape.ok_or_else(|| format!("input {:?} declares no shape", input.name))?;
    Ok(shape
        .dim
        .iter()
        .map(|d| match d.value {
            Some(dimension::Value::DimValue(v)) if v > 0 => Some(v),
            _ => None,
        })
        .collect())
}

/// Checks that a model declaring `declared` takes samples of `sample` shape: in batches (one
/// more dimension, dynamic, the batch), or whole (a model without a batch dimension); every
/// fixed dimension equal.
pub fn check_input(declared: &[Option<i64>], sample: &[i64]) -> Result<(), String> {
    let agree = |declared: &[Option<i64>]| declared.iter().zip(sample).all(|(d, s)| d.is_none_or(|d| d == *s));
    let batched = declared.len() == sample.len() + 1 && declared[0].is_none() && agree(&declared[1..]);
    let whole = declared.len() == sample.len() && agree(declared);
    if batched || whole {
        return Ok(());
    }
    let shown: Vec<String> = declared.iter().map(|d| d.map_or("?".to_string(), |d| d.to_string())).collect();
    Err(format!(
        "the model takes [{}] but the variant declares samples of {sample:?} (after a batch dimension, or whole)",
        shown.join(", ")
    ))
}

/// [`declared_input`] and [`check_input`] for a file.
pub fn check_file(path: &Path, sample: &[i64]) -> Result<(), String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    check_input(&declared_input(&bytes).map_err(|e| format!("{}: {e}", path.display()))?, sample)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resnet::{generate, ResNetDepth};

    #[test]
    fn a_generated_model_declares_its_input() {
        let m = generate(ResNetDepth::R18, 32, 1);
        let declared = declared_input(&m.onnx).unwrap();
        assert_eq!(declared, vec![None, Some(3), Some(32), Some(32)]);
        assert_eq!(check_input(&declared, &[3, 32, 32]), Ok(()));
        let wrong = check_input(&declared, &[3, 64, 64]).unwrap_err();
        assert!(wrong.contains("[?, 3, 32, 32]"), "{wrong}");
        assert!(check_input(&declared, &[3, 32]).is_err(), "rank");
        assert!(check_input(&[None, None], &[7]).is_ok(), "dynamic dimensions take anything");
        assert!(check_input(&[Some(2), Some(8)], &[2, 8]).is_ok(), "a model without a batch dimension");
        assert!(check_input(&[Some(2), Some(8)], &[8]).is_err(), "a fixed first dimension is no batch");
        assert!(check_input(&[None], &[]).is_ok(), "a batch of scalars");
    }

    #[test]
    fn bytes_that_are_not_a_model_are_refused() {
        assert!(declared_input(b"\xff\xff\xff").is_err());
        assert!(declared_input(&[]).is_err(), "no graph, no input");
    }
}
