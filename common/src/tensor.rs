//! Validation and conversion of the tensors that cross the inference API.

use thiserror::Error;
use tidal_proto::v1::{DataType, Tensor};

#[derive(Debug, Error, PartialEq)]
pub enum TensorError {
    #[error("the request has no input tensor")]
    Missing,
    #[error("the input is empty")]
    Empty,
    #[error("dtype {0} is not supported; this task takes DATA_TYPE_FLOAT32")]
    Dtype(String),
    #[error("shape {got:?} does not match the task's input {want:?} (with or without a leading batch of 1)")]
    Shape { got: Vec<i64>, want: Vec<i64> },
    #[error("{got} bytes of data do not make a float32 tensor of shape {shape:?} ({want} bytes)")]
    Length { got: usize, want: usize, shape: Vec<i64> },
}

/// Checks that `t` is one float32 sample of `sample_shape` (optionally with a leading batch
/// of 1) and returns its values.
pub fn sample_values(t: Option<&Tensor>, sample_shape: &[i64]) -> Result<Vec<f32>, TensorError> {
    let t = t.ok_or(TensorError::Missing)?;
    if t.data.is_empty() && t.shape.is_empty() {
        return Err(TensorError::Empty);
    }
    match DataType::try_from(t.dtype) {
        Ok(DataType::Float32) => {}
        Ok(other) => return Err(TensorError::Dtype(other.as_str_name().to_string())),
        Err(_) => return Err(TensorError::Dtype(format!("code {}", t.dtype))),
    }
    let shape_ok = t.shape == sample_shape || (t.shape.first() == Some(&1) && t.shape[1..] == *sample_shape);
    if !shape_ok {
        return Err(TensorError::Shape { got: t.shape.clone(), want: sample_shape.to_vec() });
    }
    let want = sample_shape.iter().product::<i64>() as usize * 4;
    if t.data.len() != want {
        return Err(TensorError::Length { got: t.data.len(), want, shape: t.shape.clone() });
    }
    Ok(t.data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
}

/// The values of a float32 tensor of any shape (an output), checked against its shape.
pub fn tensor_values(t: &Tensor) -> Result<Vec<f32>, TensorError> {
    if DataType::try_from(t.dtype) != Ok(DataType::Float32) {
        return Err(TensorError::Dtype(format!("code {}", t.dtype)));
    }
    let elements = t.shape.iter().try_fold(1usize, |n, &d| usize::try_from(d).ok().and_then(|d| n.checked_mul(d)));
    let want = elements.and_then(|n| n.checked_mul(4));
    if want != Some(t.data.len()) {
        return Err(TensorError::Length {
            got: t.data.len(),
            want: want.unwrap_or(usize::MAX),
            shape: t.shape.clone(),
        });
    }
    Ok(t.data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
}

/// A float32 tensor of `shape` holding `values`.
pub fn f32_tensor(shape: Vec<i64>, values: &[f32]) -> Tensor {
    let mut data = Vec::with_capacity(values.len() * 4);
    for v in values {
        data.extend_from_slice(&v.to_le_bytes());
    }
    Tensor { dtype: DataType::Float32 as i32, shape, data }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_output_of_any_shape_decodes_when_its_data_fits() {
        let t = f32_tensor(vec![1, 2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert_eq!(tensor_values(&t).unwrap(), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let mut short = t.clone();
        short.data.truncate(8);
        assert!(matches!(tensor_values(&short), Err(TensorError::Length { .. })));
        let huge = Tensor { shape: vec![1 << 62, 4], ..t.clone() };
        assert!(matches!(tensor_values(&huge), Err(TensorError::Length { .. })));
        let negative = Tensor { shape: vec![-1, 6], ..t };
        assert!(tensor_values(&negative).is_err());
    }

    #[test]
    fn one_sample_is_accepted_with_or_without_its_batch_dimension() {
        let t = f32_tensor(vec![1, 2, 2], &[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(sample_values(Some(&t), &[2, 2]).unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
        let t = f32_tensor(vec![2, 2], &[1.0, 2.0, 3.0, 4.0]);
        assert!(sample_values(Some(&t), &[2, 2]).is_ok());
    }

    #[test]
    fn bad_tensors_are_explained() {
        assert_eq!(sample_values(None, &[2]), Err(TensorError::Missing));
        assert_eq!(sample_values(Some(&Tensor::default()), &[2]), Err(TensorError::Empty));
        let mut t = f32_tensor(vec![2], &[1.0, 2.0]);
        t.dtype = DataType::Int64 as i32;
        assert!(matches!(sample_values(Some(&t), &[2]), Err(TensorError::Dtype(_))));
        let t = f32_tensor(vec![3], &[1.0, 2.0, 3.0]);
        assert!(matches!(sample_values(Some(&t), &[2]), Err(TensorError::Shape { .. })));
        let mut t = f32_tensor(vec![2], &[1.0, 2.0]);
        t.data.pop();
        assert!(matches!(sample_values(Some(&t), &[2]), Err(TensorError::Length { .. })));
    }
}
