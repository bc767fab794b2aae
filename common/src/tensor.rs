//! The tensors a request carries, named and typed, and the check of a request's tensors against
//! what a stage takes: one check for every front (Tidal's API, V2 over gRPC and REST) and for
//! the inputs a pipeline's earlier stage makes for a later one.

use thiserror::Error;
use tidal_proto::v1::{DataType, StageSpec, Tensor};

use crate::onnx_signature::ElementType;
use crate::padding::{Padded, Trimmed};

#[derive(Debug, Error, PartialEq)]
pub enum TensorError {
    #[error("the request has no input tensor")]
    Missing,
    #[error("input {0:?} is missing (the model takes {1})")]
    MissingInput(String, String),
    #[error("the model has no input {0:?} (it takes {1})")]
    UnknownInput(String, String),
    #[error("input {0:?} is given twice")]
    Duplicate(String),
    #[error("the model has no output {0:?} (it gives {1})")]
    UnknownOutput(String, String),
    #[error("an unnamed input is only taken by a model of one input (this one takes {0})")]
    Unnamed(String),
    #[error("input {name:?} is {want}, not {got}")]
    Dtype { name: String, got: String, want: String },
    #[error("{0} tensors are not served yet")]
    Unsupported(String),
    #[error("input {name:?} has shape {got:?}; the model takes {want}")]
    Shape { name: String, got: Vec<i64>, want: String },
    #[error("input {name:?}: dimension {dim} is {got}, above the task's bound of {max}")]
    Bound { name: String, dim: usize, got: i64, max: i64 },
    #[error("input {name:?}: dimension {dim} is {got}, below the task's least of {min}")]
    Least { name: String, dim: usize, got: i64, min: i64 },
    #[error("{got} bytes of data do not make a {dtype} tensor of shape {shape:?} ({want} bytes)")]
    Length { got: usize, want: usize, dtype: String, shape: Vec<i64> },
    #[error("the padded inputs differ in length: {0}; they must have one length")]
    PadLengths(String),
    #[error("malformed BYTES data: {0}")]
    Strings(String),
    #[error("{got} BYTES elements do not make a tensor of shape {shape:?}")]
    StringCount { got: usize, shape: Vec<i64> },
}

/// BYTES elements in their raw form: each a 4-byte little-endian length and its bytes.
pub fn encode_strings<S: AsRef<[u8]>>(values: &[S]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.iter().map(|v| 4 + v.as_ref().len()).sum());
    for v in values {
        let v = v.as_ref();
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
        out.extend_from_slice(v);
    }
    out
}

/// The elements of raw BYTES data, one at a time; an error (and the end) where a length runs
/// past the data.
fn strings(mut data: &[u8]) -> impl Iterator<Item = Result<&[u8], String>> {
    std::iter::from_fn(move || {
        if data.is_empty() {
            return None;
        }
        let Some((len, rest)) = data.split_first_chunk::<4>() else {
            let torn = format!("{} bytes left where a 4-byte length was expected", data.len());
            data = &[];
            return Some(Err(torn));
        };
        let len = u32::from_le_bytes(*len) as usize;
        if len > rest.len() {
            let torn = format!("an element of {len} bytes where {} are left", rest.len());
            data = &[];
            return Some(Err(torn));
        }
        let (item, tail) = rest.split_at(len);
        data = tail;
        Some(Ok(item))
    })
}

/// How many elements raw BYTES data holds (without a slice per element: requests may hold
/// many small ones).
pub fn count_strings(data: &[u8]) -> Result<usize, String> {
    strings(data).try_fold(0, |n, item| item.map(|_| n + 1))
}

/// The elements of raw BYTES data, refused when a length runs past the end.
pub fn decode_strings(data: &[u8]) -> Result<Vec<&[u8]>, String> {
    strings(data).collect()
}

/// A tensor's element type as Tidal's API names it.
pub fn data_type(element: ElementType) -> Option<DataType> {
    Some(match element {
        ElementType::Fp32 => DataType::Float32,
        ElementType::Fp16 => DataType::Float16,
        ElementType::Bf16 => DataType::Bfloat16,
        ElementType::Fp64 => DataType::Float64,
        ElementType::Int8 => DataType::Int8,
        ElementType::Int16 => DataType::Int16,
        ElementType::Int32 => DataType::Int32,
        ElementType::Int64 => DataType::Int64,
        ElementType::Uint8 => DataType::Uint8,
        ElementType::Uint16 => DataType::Uint16,
        ElementType::Uint32 => DataType::Uint32,
        ElementType::Uint64 => DataType::Uint64,
        ElementType::Bool => DataType::Bool,
        ElementType::Bytes => DataType::Bytes,
    })
}

/// The element type of Tidal's API's `dtype` code.
pub fn element_type(dtype: i32) -> Option<ElementType> {
    Some(match DataType::try_from(dtype).ok()? {
        DataType::Unspecified => return None,
        DataType::Float32 => ElementType::Fp32,
        DataType::Float16 => ElementType::Fp16,
        DataType::Bfloat16 => ElementType::Bf16,
        DataType::Float64 => ElementType::Fp64,
        DataType::Int8 => ElementType::Int8,
        DataType::Int16 => ElementType::Int16,
        DataType::Int32 => ElementType::Int32,
        DataType::Int64 => ElementType::Int64,
        DataType::Uint8 => ElementType::Uint8,
        DataType::Uint16 => ElementType::Uint16,
        DataType::Uint32 => ElementType::Uint32,
        DataType::Uint64 => ElementType::Uint64,
        DataType::Bool => ElementType::Bool,
        DataType::Bytes => ElementType::Bytes,
    })
}

/// How many elements a shape holds; `None` for a negative dimension or an overflow.
pub fn element_count(shape: &[i64]) -> Option<usize> {
    shape.iter().try_fold(1usize, |n, &d| usize::try_from(d).ok().and_then(|d| n.checked_mul(d)))
}

/// A dense tensor, row-major, little-endian, with the name of the input or output it is.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    pub name: String,
    pub element: ElementType,
    pub shape: Vec<i64>,
    pub data: Vec<u8>,
}

impl NamedTensor {
    /// A float32 tensor.
    pub fn f32(name: impl Into<String>, shape: Vec<i64>, values: &[f32]) -> Self {
        Self { name: name.into(), element: ElementType::Fp32, shape, data: bytemuck::cast_slice(values).to_vec() }
    }

    /// A BYTES tensor of these strings.
    pub fn strings<S: AsRef<[u8]>>(name: impl Into<String>, shape: Vec<i64>, values: &[S]) -> Self {
        Self { name: name.into(), element: ElementType::Bytes, shape, data: encode_strings(values) }
    }

    /// Its elements, if it is a well-formed BYTES tensor.
    pub fn string_values(&self) -> Option<Vec<&[u8]>> {
        if self.element != ElementType::Bytes {
            return None;
        }
        decode_strings(&self.data).ok()
    }

    /// Cut along its first dimension into `n` tensors of one sample each (that dimension
    /// dropped); BYTES by elements, the rest by bytes. Its length is checked first.
    pub fn split_samples(self, n: usize) -> Result<Vec<NamedTensor>, TensorError> {
        self.check_length()?;
        let shape = self.shape.get(1..).unwrap_or_default().to_vec();
        if n == 0 || self.shape.first().and_then(|&d| usize::try_from(d).ok()) != Some(n) {
            return Err(TensorError::Shape {
                name: self.name,
                got: self.shape,
                want: format!("{n} samples along the first dimension"),
            });
        }
        // Its length is checked: the elements (or bytes) divide evenly into its samples.
        let pieces: Vec<Vec<u8>> = if self.element == ElementType::Bytes {
            let items = decode_strings(&self.data).map_err(TensorError::Strings)?;
            let per = items.len() / n;
            (0..n).map(|i| encode_strings(&items[i * per..(i + 1) * per])).collect()
        } else {
            let size = self.data.len() / n;
            (0..n).map(|i| self.data[i * size..(i + 1) * size].to_vec()).collect()
        };
        Ok(pieces
            .into_iter()
            .map(|data| NamedTensor { name: self.name.clone(), element: self.element, shape: shape.clone(), data })
            .collect())
    }

    /// Its values, if it is a float32 tensor.
    pub fn f32_values(&self) -> Option<Vec<f32>> {
        (self.element == ElementType::Fp32).then(|| bytemuck::pod_collect_to_vec(&self.data[..self.data.len() / 4 * 4]))
    }

    /// Its values, if it is an int64 tensor.
    pub fn i64_values(&self) -> Option<Vec<i64>> {
        (self.element == ElementType::Int64)
            .then(|| bytemuck::pod_collect_to_vec(&self.data[..self.data.len() / 8 * 8]))
    }

    /// A tensor of Tidal's API, its type known and its data as long as its shape says.
    pub fn from_proto(t: Tensor) -> Result<Self, TensorError> {
        let element = element_type(t.dtype).ok_or_else(|| TensorError::Dtype {
            name: t.name.clone(),
            got: DataType::try_from(t.dtype).map_or(format!("code {}", t.dtype), |d| d.as_str_name().into()),
            want: "a known type".into(),
        })?;
        let tensor = Self { name: t.name, element, shape: t.shape, data: t.data };
        tensor.check_length()?;
        Ok(tensor)
    }

    /// As Tidal's API carries it.
    pub fn into_proto(self) -> Tensor {
        let dtype = data_type(self.element).unwrap_or(DataType::Unspecified) as i32;
        Tensor { dtype, shape: self.shape, data: self.data, name: self.name }
    }

    /// Checks that its data is as long as its shape and type say (BYTES: that it holds as
    /// many well-formed elements as its shape).
    pub fn check_length(&self) -> Result<(), TensorError> {
        if self.element == ElementType::Bytes {
            let count = count_strings(&self.data).map_err(TensorError::Strings)?;
            if element_count(&self.shape) != Some(count) {
                return Err(TensorError::StringCount { got: count, shape: self.shape.clone() });
            }
            return Ok(());
        }
        let size = self.element.size().ok_or_else(|| TensorError::Unsupported(self.element.v2_name().into()))?;
        let want = element_count(&self.shape).and_then(|n| n.checked_mul(size));
        if want != Some(self.data.len()) {
            return Err(TensorError::Length {
                got: self.data.len(),
                want: want.unwrap_or(usize::MAX),
                dtype: self.element.v2_name().into(),
                shape: self.shape.clone(),
            });
        }
        Ok(())
    }
}

/// An input or output as a stage declares it: -1 for a dynamic dimension.
#[derive(Debug, Clone, PartialEq)]
pub struct Declared {
    pub name: String,
    pub element: ElementType,
    pub shape: Vec<i64>,
    /// The most each dimension may be (0: unbounded), as many as `shape`, or none.
    pub max_shape: Vec<i64>,
    /// The least each dimension may be (0: 1), as many as `shape`, or none.
    pub min_shape: Vec<i64>,
}

impl Declared {
    fn describe(&self) -> String {
        let dims: Vec<String> = self.shape.iter().map(|d| if *d < 0 { "?".into() } else { d.to_string() }).collect();
        format!("{} {} [{}]", self.name, self.element.v2_name(), dims.join(", "))
    }
}

/// What a stage takes and gives, as requests are checked against it.
#[derive(Debug, Clone, PartialEq)]
pub struct StageIo {
    pub inputs: Vec<Declared>,
    pub outputs: Vec<Declared>,
    /// Every input and output leads with a dynamic batch dimension: requests are batched.
    pub batched: bool,
    /// A stage registered before signatures were read: one float32 input of its variants'
    /// sample shape, fed to the model's first input; its first output is the answer.
    pub positional: bool,
    /// Inputs padded to the longest of their batch, and outputs cut back to each request's
    /// length (see [`crate::padding`]).
    pub pad: Vec<Padded>,
    pub trim: Vec<Trimmed>,
}

/// The names of the input and output of a stage registered without a signature.
pub const POSITIONAL_INPUT: &str = "input";
pub const POSITIONAL_OUTPUT: &str = "output";

impl StageIo {
    /// A stage's tensors, from its signature (or, without one, from its variants' sample shape).
    pub fn of(stage: &StageSpec) -> Result<Self, String> {
        if stage.inputs.is_empty() {
            let sample = stage.variants.first().map_or(&[][..], |v| v.input_shape.as_slice());
            return Ok(Self {
                inputs: vec![Declared {
                    name: POSITIONAL_INPUT.into(),
                    element: ElementType::Fp32,
                    shape: std::iter::once(-1).chain(sample.iter().copied()).collect(),
                    max_shape: vec![],
                    min_shape: vec![],
                }],
                outputs: vec![Declared {
                    name: POSITIONAL_OUTPUT.into(),
                    element: ElementType::Fp32,
                    shape: vec![-1, -1],
                    max_shape: vec![],
                    min_shape: vec![],
                }],
                batched: true,
                positional: true,
                pad: vec![],
                trim: vec![],
            });
        }
        let declared = |ts: &[tidal_proto::v1::TensorSignature]| -> Result<Vec<Declared>, String> {
            ts.iter()
                .map(|t| {
                    let element = ElementType::from_v2_name(&t.datatype)
                        .ok_or_else(|| format!("{:?} has the unknown type {:?}", t.name, t.datatype))?;
                    Ok(Declared {
                        name: t.name.clone(),
                        element,
                        shape: t.shape.clone(),
                        max_shape: t.max_shape.clone(),
                        min_shape: t.min_shape.clone(),
                    })
                })
                .collect()
        };
        let inputs = declared(&stage.inputs)?;
        let outputs = declared(&stage.outputs)?;
        let batched = inputs.iter().chain(&outputs).all(|t| t.shape.first() == Some(&-1));
        let (pad, trim) = crate::padding::of_stage(stage)?;
        Ok(Self { inputs, outputs, batched, positional: false, pad, trim })
    }

    /// What requests must share to be batched together: the shapes of all their inputs, but
    /// for the padded dimensions, where their lengths need only round up to the same power of
    /// two (so that padding at most doubles a request).
    pub fn batch_key(&self, sample: &[NamedTensor]) -> Vec<i64> {
        let mut key = shape_key(sample);
        if self.pad.is_empty() {
            return key;
        }
        // Each tensor's entries in the key: its rank, then its dimensions.
        let mut start = 0;
        for (i, t) in sample.iter().enumerate() {
            for p in self.pad.iter().filter(|p| p.input == i) {
                if let Some(d) = key.get_mut(start + 1 + p.axis) {
                    // Negative: never equal to a dimension of an unpadded input.
                    *d = -((((*d).max(1) as u64).next_power_of_two().min(1 << 62)) as i64);
                }
            }
            start += 1 + t.shape.len();
        }
        key
    }

    /// A request's length along the padded dimension (None for a stage without padding).
    pub fn padded_length(&self, sample: &[NamedTensor]) -> Option<i64> {
        let p = self.pad.first()?;
        sample.get(p.input)?.shape.get(p.axis).copied()
    }

    fn input_list(&self) -> String {
        self.inputs.iter().map(Declared::describe).collect::<Vec<_>>().join("; ")
    }

    fn output_list(&self) -> String {
        self.outputs.iter().map(|o| o.name.as_str()).collect::<Vec<_>>().join(", ")
    }

    /// The shape one sample of `input` has: without the batch dimension of a batched stage.
    pub fn sample_shape<'a>(&self, input: &'a Declared) -> &'a [i64] {
        if self.batched {
            &input.shape[1..]
        } else {
            &input.shape
        }
    }

    /// Checks one request's tensors (one sample each) and returns them in the stage's order of
    /// inputs, each of its sample shape (a leading batch dimension of 1 taken off). A tensor
    /// without a name is the input of a stage of one input.
    pub fn sample(&self, tensors: Vec<NamedTensor>) -> Result<Vec<NamedTensor>, TensorError> {
        if tensors.is_empty() {
            return Err(TensorError::Missing);
        }
        let mut slots: Vec<Option<NamedTensor>> = vec![None; self.inputs.len()];
        for mut t in tensors {
            if t.name.is_empty() {
                if self.inputs.len() != 1 {
                    return Err(TensorError::Unnamed(self.input_list()));
                }
                t.name = self.inputs[0].name.clone();
            }
            let i = self
                .inputs
                .iter()
                .position(|d| d.name == t.name)
                .ok_or_else(|| TensorError::UnknownInput(t.name.clone(), self.input_list()))?;
            if slots[i].is_some() {
                return Err(TensorError::Duplicate(t.name));
            }
            slots[i] = Some(self.check(&self.inputs[i], t)?);
        }
        let sample: Vec<NamedTensor> = slots
            .into_iter()
            .zip(&self.inputs)
            .map(|(t, d)| t.ok_or_else(|| TensorError::MissingInput(d.name.clone(), self.input_list())))
            .collect::<Result<_, _>>()?;
        let lengths: Vec<(usize, i64)> =
            self.pad.iter().filter_map(|p| Some((p.input, *sample[p.input].shape.get(p.axis)?))).collect();
        if lengths.windows(2).any(|w| w[0].1 != w[1].1) {
            let shown: Vec<String> = lengths.iter().map(|(i, n)| format!("{} {n}", self.inputs[*i].name)).collect();
            return Err(TensorError::PadLengths(shown.join(", ")));
        }
        Ok(sample)
    }

    /// One input checked against its declaration, as one sample.
    fn check(&self, declared: &Declared, mut t: NamedTensor) -> Result<NamedTensor, TensorError> {
        if t.element != declared.element {
            return Err(TensorError::Dtype {
                name: t.name,
                got: t.element.v2_name().into(),
                want: declared.element.v2_name().into(),
            });
        }
        let sample = self.sample_shape(declared);
        // The shape as sent, for the error: the leading 1 is dropped below.
        let sent = t.shape.clone();
        if self.batched && t.shape.len() == declared.shape.len() && t.shape.first() == Some(&1) {
            t.shape.remove(0);
        }
        let fits = t.shape.len() == sample.len()
            && t.shape.iter().zip(sample).all(|(&got, &want)| if want < 0 { got > 0 } else { got == want });
        if !fits {
            let want = if self.batched {
                format!("{} (one sample, with or without a leading batch dimension of 1)", declared.describe())
            } else {
                declared.describe()
            };
            return Err(TensorError::Shape { name: t.name, got: sent, want });
        }
        let offset = declared.shape.len() - sample.len();
        for (j, &got) in t.shape.iter().enumerate() {
            let max = declared.max_shape.get(j + offset).copied().unwrap_or(0);
            if max > 0 && got > max {
                return Err(TensorError::Bound { name: t.name, dim: j + offset, got, max });
            }
            let min = declared.min_shape.get(j + offset).copied().unwrap_or(0);
            if got < min {
                return Err(TensorError::Least { name: t.name, dim: j + offset, got, min });
            }
        }
        t.check_length()?;
        Ok(t)
    }

    /// Checks that the outputs asked for exist.
    pub fn check_outputs(&self, wanted: &[String]) -> Result<(), TensorError> {
        match wanted.iter().find(|w| !self.outputs.iter().any(|o| &o.name == *w)) {
            Some(w) => Err(TensorError::UnknownOutput(w.clone(), self.output_list())),
            None => Ok(()),
        }
    }
}

/// What requests must share to be batched together: the shapes of all their inputs.
pub fn shape_key(sample: &[NamedTensor]) -> Vec<i64> {
    let mut key = Vec::new();
    for t in sample {
        key.push(t.shape.len() as i64);
        key.extend_from_slice(&t.shape);
    }
    key
}

/// A float32 tensor of `shape` holding `values` (Tidal's API).
pub fn f32_tensor(shape: Vec<i64>, values: &[f32]) -> Tensor {
    NamedTensor::f32("", shape, values).into_proto()
}

/// The values of a float32 tensor of any shape (an output), checked against its shape.
pub fn tensor_values(t: &Tensor) -> Result<Vec<f32>, TensorError> {
    let t = NamedTensor::from_proto(t.clone())?;
    t.f32_values().ok_or_else(|| TensorError::Dtype {
        name: t.name,
        got: t.element.v2_name().into(),
        want: "FP32".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_tensors_hold_as_many_elements_as_their_shape_and_no_torn_one() {
        let t = NamedTensor::strings("text", vec![1, 2], &["ab", ""]);
        assert_eq!(t.data, [2, 0, 0, 0, b'a', b'b', 0, 0, 0, 0]);
        t.check_length().unwrap();
        assert_eq!(t.string_values().unwrap(), vec![&b"ab"[..], b""]);
        let wrong_count = NamedTensor { shape: vec![3], ..t.clone() };
        assert!(matches!(wrong_count.check_length(), Err(TensorError::StringCount { got: 2, .. })));
        let torn = NamedTensor { data: t.data[..5].to_vec(), shape: vec![1], ..t.clone() };
        assert!(matches!(torn.check_length(), Err(TensorError::Strings(_))));
        let short_length = NamedTensor { data: vec![1, 0], shape: vec![1], ..t };
        assert!(matches!(short_length.check_length(), Err(TensorError::Strings(_))));

        // Split into samples by elements, whatever each element's length.
        let two = NamedTensor::strings("text", vec![2, 2], &["a", "bcd", "", "ef"]);
        let parts = two.split_samples(2).unwrap();
        assert_eq!(parts[0].string_values().unwrap(), vec![&b"a"[..], b"bcd"]);
        assert_eq!(parts[1].string_values().unwrap(), vec![&b""[..], b"ef"]);
        assert_eq!(parts[1].shape, vec![2]);
        let floats = NamedTensor::f32("x", vec![3, 1], &[1.0, 2.0, 3.0]).split_samples(3).unwrap();
        assert_eq!(floats[2].f32_values().unwrap(), vec![3.0]);
        assert!(NamedTensor::f32("x", vec![3], &[1.0, 2.0, 3.0]).split_samples(2).is_err());
    }
    use tidal_proto::v1::VariantSpec;

    use crate::onnx_signature::test_signature as sig;

    fn tensor(name: &str, element: ElementType, shape: &[i64]) -> NamedTensor {
        let n = element_count(shape).unwrap() * element.size().unwrap();
        NamedTensor { name: name.into(), element, shape: shape.to_vec(), data: vec![0; n] }
    }

    /// A detector of dynamic height and width with a scalar threshold per sample, three outputs.
    fn detector() -> StageIo {
        StageIo::of(&StageSpec {
            inputs: vec![sig("images", "FP16", &[-1, 3, -1, -1]), sig("threshold", "INT64", &[-1])],
            outputs: vec![
                sig("boxes", "FP32", &[-1, -1, 4]),
                sig("scores", "FP32", &[-1, -1]),
                sig("classes", "INT64", &[-1, -1]),
            ],
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn named_inputs_come_back_in_the_models_order_as_samples() {
        let io = detector();
        assert!(io.batched && !io.positional);
        let got = io
            .sample(vec![
                tensor("threshold", ElementType::Int64, &[1]),
                tensor("images", ElementType::Fp16, &[1, 3, 20, 30]),
            ])
            .unwrap();
        assert_eq!(
            got.iter().map(|t| (t.name.as_str(), t.shape.clone())).collect::<Vec<_>>(),
            [("images", vec![3, 20, 30]), ("threshold", vec![])]
        );
        // Without the batch dimension too, and shapes differ by their dynamic dimensions only.
        let other = io
            .sample(vec![tensor("images", ElementType::Fp16, &[3, 8, 9]), tensor("threshold", ElementType::Int64, &[])])
            .unwrap();
        assert_ne!(shape_key(&got), shape_key(&other));
        assert!(io.check_outputs(&["scores".into()]).is_ok());
        assert!(matches!(io.check_outputs(&["output".into()]), Err(TensorError::UnknownOutput(..))));
    }

    #[test]
    fn bad_inputs_are_refused_with_the_reason() {
        let io = detector();
        let img = || tensor("images", ElementType::Fp16, &[1, 3, 4, 4]);
        let thr = || tensor("threshold", ElementType::Int64, &[1]);
        let cases: Vec<(&str, Vec<NamedTensor>)> = vec![
            ("nothing", vec![]),
            ("missing", vec![img()]),
            ("unknown", vec![img(), thr(), tensor("mask", ElementType::Bool, &[1])]),
            ("twice", vec![img(), thr(), thr()]),
            ("unnamed with two inputs", vec![tensor("", ElementType::Fp16, &[1, 3, 4, 4]), thr()]),
            ("type", vec![tensor("images", ElementType::Fp32, &[1, 3, 4, 4]), thr()]),
            ("fixed dimension", vec![tensor("images", ElementType::Fp16, &[1, 1, 4, 4]), thr()]),
            ("rank", vec![tensor("images", ElementType::Fp16, &[1, 1, 3, 4, 4]), thr()]),
            ("batch of two", vec![tensor("images", ElementType::Fp16, &[2, 3, 4, 4]), thr()]),
            ("empty dynamic dimension", vec![tensor("images", ElementType::Fp16, &[1, 3, 0, 4]), thr()]),
        ];
        for (what, tensors) in cases {
            let e = io.sample(tensors).expect_err(what);
            assert!(!e.to_string().is_empty(), "{what}");
        }
        // The shape is reported as it was sent, leading 1 and all.
        let wrong = io.sample(vec![tensor("images", ElementType::Fp16, &[1, 1, 4, 4]), thr()]).unwrap_err();
        assert!(wrong.to_string().contains("[1, 1, 4, 4]"), "{wrong}");
        let mut short = img();
        short.data.pop();
        assert!(matches!(io.sample(vec![short, thr()]), Err(TensorError::Length { .. })));
        let huge = NamedTensor { shape: vec![1, 3, 1 << 40, 1 << 40], ..img() };
        assert!(io.sample(vec![huge, thr()]).is_err());
    }

    #[test]
    fn a_dynamic_dimension_above_its_bound_is_refused() {
        let mut stage = StageSpec {
            inputs: vec![sig("images", "FP32", &[-1, 3, -1, -1])],
            outputs: vec![sig("out", "FP32", &[-1, 2])],
            ..Default::default()
        };
        stage.inputs[0].max_shape = vec![0, 3, 64, 0];
        let io = StageIo::of(&stage).unwrap();
        assert!(
            io.sample(vec![tensor("images", ElementType::Fp32, &[1, 3, 64, 500])]).is_ok(),
            "at the bound; W unbounded"
        );
        let e = io.sample(vec![tensor("images", ElementType::Fp32, &[3, 65, 8])]).unwrap_err();
        assert_eq!(e, TensorError::Bound { name: "images".into(), dim: 2, got: 65, max: 64 });
        assert!(e.to_string().contains("above the task's bound of 64"), "{e}");
    }

    #[test]
    fn a_model_without_a_batch_dimension_takes_its_tensor_whole() {
        let io = StageIo::of(&StageSpec {
            inputs: vec![sig("state", "FP32", &[2, 8]), sig("step", "INT64", &[])],
            outputs: vec![sig("next", "FP32", &[2, 8])],
            ..Default::default()
        })
        .unwrap();
        assert!(!io.batched);
        let got = io.sample(vec![tensor("state", ElementType::Fp32, &[2, 8]), tensor("step", ElementType::Int64, &[])]);
        assert_eq!(got.unwrap()[0].shape, vec![2, 8]);
        assert!(io
            .sample(vec![tensor("state", ElementType::Fp32, &[1, 2, 8]), tensor("step", ElementType::Int64, &[])])
            .is_err());
    }

    #[test]
    fn a_stage_without_a_signature_takes_one_unnamed_float_sample() {
        let stage = StageSpec {
            variants: vec![VariantSpec { input_shape: vec![3, 2, 2], ..Default::default() }],
            ..Default::default()
        };
        let io = StageIo::of(&stage).unwrap();
        assert!(io.positional && io.batched);
        let t = NamedTensor::from_proto(f32_tensor(vec![1, 3, 2, 2], &[0.5; 12])).unwrap();
        let got = io.sample(vec![t]).unwrap();
        assert_eq!((got[0].name.as_str(), got[0].shape.as_slice()), (POSITIONAL_INPUT, &[3, 2, 2][..]));
        assert_eq!(got[0].f32_values().unwrap(), vec![0.5; 12]);
    }

    #[test]
    fn every_type_crosses_tidals_api_and_back() {
        for code in 1..=13 {
            let element = element_type(code).unwrap();
            assert_eq!(data_type(element).map(|d| d as i32), Some(code));
        }
        assert!(element_type(0).is_none() && element_type(99).is_none());
        let t = f32_tensor(vec![1, 2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert_eq!(tensor_values(&t).unwrap(), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let mut short = t.clone();
        short.data.truncate(8);
        assert!(matches!(tensor_values(&short), Err(TensorError::Length { .. })));
        assert!(tensor_values(&Tensor { shape: vec![-1, 6], ..t }).is_err());
    }
}
