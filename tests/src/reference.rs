//! ONNX Runtime in the test process, as a user would run a model themselves: the answers
//! Tidal's must equal.

use std::collections::HashMap;
use std::path::Path;

use ort::session::{builder::GraphOptimizationLevel, Session};
use ort::value::{DynValue, Tensor as OrtTensor};
use tidal_common::onnx_signature::ElementType;
use tidal_common::tensor::NamedTensor;

use crate::ort_lib;

/// ONNX Runtime in this process, as a user would run the model themselves.
pub struct Reference {
    sessions: HashMap<String, Session>,
}

impl Reference {
    pub fn new(models: &Path, names: &[&str]) -> Self {
        // ONNX Runtime allows one environment per process: the tests share it.
        static ENV: std::sync::OnceLock<ort::environment::Environment> = std::sync::OnceLock::new();
        let env = ENV.get_or_init(|| ort::init_from(ort_lib()).unwrap().with_name("reference").build().unwrap());
        let sessions = names
            .iter()
            .map(|name| {
                let session = Session::builder(env)
                    .unwrap()
                    .with_optimization_level(GraphOptimizationLevel::Level3)
                    .unwrap()
                    .with_intra_threads(1)
                    .unwrap()
                    .with_inter_threads(1)
                    .unwrap()
                    .commit_from_file(models.join(format!("{name}.onnx")))
                    .unwrap();
                (name.to_string(), session)
            })
            .collect();
        Self { sessions }
    }

    /// The model's outputs for `inputs`, in its order.
    pub fn run(&mut self, model: &str, inputs: &[NamedTensor]) -> Vec<NamedTensor> {
        let session = self.sessions.get_mut(model).unwrap();
        let values: Vec<(String, DynValue)> = inputs
            .iter()
            .map(|t| {
                let shape = t.shape.clone();
                let v: DynValue = match t.element {
                    ElementType::Fp32 => OrtTensor::from_array((shape, floats(&t.data))).unwrap().into_dyn(),
                    ElementType::Int64 => OrtTensor::from_array((shape, int64s(&t.data))).unwrap().into_dyn(),
                    ElementType::Fp16 => OrtTensor::from_array((shape, halves(&t.data))).unwrap().into_dyn(),
                    other => panic!("no reference input of {other:?}"),
                };
                (t.name.clone(), v)
            })
            .collect();
        let names: Vec<String> = session.outputs().iter().map(|o| o.name().to_string()).collect();
        let outputs = session.run(values).unwrap();
        names
            .iter()
            .map(|name| {
                let v = &outputs[name.as_str()];
                if let Ok((shape, data)) = v.try_extract_tensor::<f32>() {
                    NamedTensor::f32(name.clone(), shape.to_vec(), data)
                } else if let Ok((shape, data)) = v.try_extract_tensor::<i64>() {
                    let data = data.iter().flat_map(|x| x.to_le_bytes()).collect();
                    NamedTensor { name: name.clone(), element: ElementType::Int64, shape: shape.to_vec(), data }
                } else {
                    let (shape, data) = v.try_extract_tensor::<half::f16>().unwrap();
                    let data = data.iter().flat_map(|x| x.to_le_bytes()).collect();
                    NamedTensor { name: name.clone(), element: ElementType::Fp16, shape: shape.to_vec(), data }
                }
            })
            .collect()
    }
}

pub fn floats(data: &[u8]) -> Vec<f32> {
    data.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
}

pub fn int64s(data: &[u8]) -> Vec<i64> {
    data.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect()
}

pub fn halves(data: &[u8]) -> Vec<half::f16> {
    data.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]])).collect()
}

/// Tidal's API's tensors, each checked.
pub fn from_proto(ts: Vec<tidal_proto::v1::Tensor>) -> Vec<NamedTensor> {
    ts.into_iter().map(|t| NamedTensor::from_proto(t).unwrap()).collect()
}

/// A request of Tidal's API for `task` with these inputs, asking for `outputs` (all if none).
pub fn tidal_request(task: &str, inputs: &[NamedTensor], outputs: &[&str]) -> tidal_proto::v1::InferRequest {
    tidal_proto::v1::InferRequest {
        task: task.into(),
        inputs: inputs.iter().cloned().map(NamedTensor::into_proto).collect(),
        outputs: outputs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// `samples` of a deterministic "voice" at 16 kHz: two harmonics that glide, and a little
/// noise (the speech tests' recordings).
pub fn voice(samples: usize) -> Vec<f32> {
    let mut state = 7u32;
    (0..samples)
        .map(|i| {
            let t = i as f32 / 16_000.0;
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let noise = (state >> 8) as f32 / (1u32 << 24) as f32 - 0.5;
            let f = 140.0 + 60.0 * t;
            0.3 * (2.0 * std::f32::consts::PI * f * t).sin()
                + 0.2 * (2.0 * std::f32::consts::PI * 2.0 * f * t).sin()
                + 0.05 * noise
        })
        .collect()
}
