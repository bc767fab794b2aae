//! Building ONNX graphs by hand: nodes, seeded weights and the model envelope, shared by the
//! generators of Tidal's model families (no model hub is reachable from these machines).

use prost::Message;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tidal_proto::onnx::{
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto::dimension,
    tensor_shape_proto::Dimension, type_proto, AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto,
    TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};

/// A generated model: the serialised ONNX bytes and its parameter count.
pub struct GeneratedModel {
    pub onnx: Vec<u8>,
    pub parameters: u64,
}

/// The serialised model around `graph` (opset 17), with `doc` saying what it is.
pub(crate) fn model_bytes(graph: GraphProto, doc: String) -> Vec<u8> {
    let model = ModelProto {
        ir_version: 8,
        producer_name: "tidalctl".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        doc_string: doc,
        graph: Some(graph),
        opset_import: vec![OperatorSetIdProto { domain: String::new(), version: 17 }],
    };
    model.encode_to_vec()
}

/// Accumulates nodes and initialisers with unique names.
pub(crate) struct GraphBuilder {
    rng: ChaCha8Rng,
    pub nodes: Vec<NodeProto>,
    pub initializers: Vec<TensorProto>,
    pub parameters: u64,
    counter: usize,
}

impl GraphBuilder {
    pub(crate) fn new(seed: u64) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
            nodes: Vec::new(),
            initializers: Vec::new(),
            parameters: 0,
            counter: 0,
        }
    }

    pub(crate) fn fresh(&mut self, prefix: &str) -> String {
        self.counter += 1;
        format!("{prefix}_{}", self.counter)
    }

    /// A float initialiser drawn uniformly with He variance (2 / fan_in), times `gain`.
    pub(crate) fn weight(&mut self, dims: &[i64], fan_in: f32, gain: f32) -> String {
        let bound = gain * (6.0 / fan_in).sqrt();
        let len: i64 = dims.iter().product();
        let mut raw = Vec::with_capacity(len as usize * 4);
        for _ in 0..len {
            let v: f32 = self.rng.gen_range(-bound..bound);
            raw.extend_from_slice(&v.to_le_bytes());
        }
        self.initializer(dims, raw)
    }

    pub(crate) fn zeros(&mut self, dims: &[i64]) -> String {
        let len: i64 = dims.iter().product();
        self.initializer(dims, vec![0; len as usize * 4])
    }

    /// A learned float vector or tensor initialised to ones (a normalisation's scale).
    pub(crate) fn ones(&mut self, dims: &[i64]) -> String {
        let len: i64 = dims.iter().product();
        self.initializer(dims, 1.0f32.to_le_bytes().repeat(len as usize))
    }

    /// A learned affine map of the last dimension, `x · W + b` (`W` is `[cin, cout]`).
    pub(crate) fn linear(&mut self, x: &str, cin: usize, cout: usize, gain: f32) -> String {
        let w = self.weight(&[cin as i64, cout as i64], cin as f32, gain);
        let b = self.zeros(&[cout as i64]);
        let y = self.node("MatMul", &[x, &w], vec![]);
        self.node("Add", &[&y, &b], vec![])
    }

    /// Layer normalisation over the last dimension, with a learned scale and shift.
    pub(crate) fn layer_norm(&mut self, x: &str, dim: usize) -> String {
        let scale = self.ones(&[dim as i64]);
        let shift = self.zeros(&[dim as i64]);
        self.node("LayerNormalization", &[x, &scale, &shift], vec![int_attr("axis", -1), float_attr("epsilon", 1e-5)])
    }

    /// GELU in its exact form, `x/2 · (1 + erf(x/√2))` (ONNX has no Gelu before opset 20).
    pub(crate) fn gelu(&mut self, x: &str) -> String {
        let inv_sqrt2 = self.const_f32(&[], &[std::f32::consts::FRAC_1_SQRT_2]);
        let half = self.const_f32(&[], &[0.5]);
        let one = self.const_f32(&[], &[1.0]);
        let scaled = self.node("Mul", &[x, &inv_sqrt2], vec![]);
        let erf = self.node("Erf", &[&scaled], vec![]);
        let shifted = self.node("Add", &[&erf, &one], vec![]);
        let gate = self.node("Mul", &[&shifted, &half], vec![]);
        self.node("Mul", &[x, &gate], vec![])
    }

    pub(crate) fn initializer(&mut self, dims: &[i64], raw_data: Vec<u8>) -> String {
        let name = self.fresh("w");
        self.parameters += dims.iter().product::<i64>() as u64;
        self.initializers.push(TensorProto {
            dims: dims.to_vec(),
            data_type: DataType::Float as i32,
            name: name.clone(),
            raw_data,
        });
        name
    }

    /// A float32 constant (not a learned parameter).
    pub(crate) fn const_f32(&mut self, dims: &[i64], values: &[f32]) -> String {
        let raw_data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.constant(dims, DataType::Float, raw_data)
    }

    /// An int64 constant, such as a shape or slice bounds.
    pub(crate) fn const_i64(&mut self, values: &[i64]) -> String {
        let raw_data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.constant(&[values.len() as i64], DataType::Int64, raw_data)
    }

    /// An int64 scalar constant, such as an axis index or a range bound.
    pub(crate) fn scalar_i64(&mut self, value: i64) -> String {
        self.constant(&[], DataType::Int64, value.to_le_bytes().to_vec())
    }

    /// A boolean scalar constant (a loop's condition).
    pub(crate) fn const_bool(&mut self, value: bool) -> String {
        self.constant(&[], DataType::Bool, vec![u8::from(value)])
    }

    fn constant(&mut self, dims: &[i64], data_type: DataType, raw_data: Vec<u8>) -> String {
        let name = self.fresh("c");
        self.initializers.push(TensorProto {
            dims: dims.to_vec(),
            data_type: data_type as i32,
            name: name.clone(),
            raw_data,
        });
        name
    }

    pub(crate) fn node(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>) -> String {
        let out = self.fresh(&op.to_lowercase());
        self.node_named(op, inputs, &out, attrs);
        out
    }

    /// A node of several outputs, fresh names for each.
    pub(crate) fn node_outputs(
        &mut self,
        op: &str,
        inputs: &[&str],
        outputs: usize,
        attrs: Vec<AttributeProto>,
    ) -> Vec<String> {
        let names: Vec<String> = (0..outputs).map(|_| self.fresh(&op.to_lowercase())).collect();
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: names.clone(),
            name: format!("{op}_{}", self.nodes.len()),
            op_type: op.to_string(),
            attribute: attrs,
        });
        names
    }

    pub(crate) fn node_named(&mut self, op: &str, inputs: &[&str], output: &str, attrs: Vec<AttributeProto>) {
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.to_string()],
            name: format!("{op}_{}", self.nodes.len()),
            op_type: op.to_string(),
            attribute: attrs,
        });
    }

    /// Convolution with folded batch norm (weight + bias); `gain` scales the weights.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn conv(
        &mut self,
        x: &str,
        cin: usize,
        cout: usize,
        k: i64,
        stride: i64,
        pad: i64,
        gain: f32,
    ) -> String {
        let fan_in = (cin as i64 * k * k) as f32;
        let w = self.weight(&[cout as i64, cin as i64, k, k], fan_in, gain);
        let b = self.zeros(&[cout as i64]);
        self.node(
            "Conv",
            &[x, &w, &b],
            vec![
                ints_attr("kernel_shape", &[k, k]),
                ints_attr("strides", &[stride, stride]),
                ints_attr("pads", &[pad, pad, pad, pad]),
            ],
        )
    }

    pub(crate) fn relu(&mut self, x: &str) -> String {
        self.node("Relu", &[x], vec![])
    }

    pub(crate) fn max_pool(&mut self, x: &str) -> String {
        self.node(
            "MaxPool",
            &[x],
            vec![ints_attr("kernel_shape", &[3, 3]), ints_attr("strides", &[2, 2]), ints_attr("pads", &[1, 1, 1, 1])],
        )
    }
}

pub(crate) fn int_attr(name: &str, i: i64) -> AttributeProto {
    AttributeProto { name: name.into(), i, r#type: AttributeType::Int as i32, ..Default::default() }
}

pub(crate) fn float_attr(name: &str, f: f32) -> AttributeProto {
    AttributeProto { name: name.into(), f, r#type: AttributeType::Float as i32, ..Default::default() }
}

pub(crate) fn str_attr(name: &str, value: &str) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        s: value.as_bytes().to_vec(),
        r#type: AttributeType::String as i32,
        ..Default::default()
    }
}

pub(crate) fn graph_attr(name: &str, graph: GraphProto) -> AttributeProto {
    AttributeProto { name: name.into(), g: Some(graph), r#type: AttributeType::Graph as i32, ..Default::default() }
}

pub(crate) fn ints_attr(name: &str, ints: &[i64]) -> AttributeProto {
    AttributeProto { name: name.into(), ints: ints.to_vec(), r#type: AttributeType::Ints as i32, ..Default::default() }
}

/// A float32 tensor value info; `None` marks the dynamic batch dimension.
pub(crate) fn tensor_info(name: &str, dims: &[Option<i64>]) -> ValueInfoProto {
    let dims: Vec<Dim> = dims.iter().map(|d| d.map_or(Dim::Named("batch"), Dim::Fixed)).collect();
    value_info(name, DataType::Float, &dims)
}

/// One dimension of a declared tensor: a size, or dynamic under a name.
#[derive(Clone, Copy)]
pub(crate) enum Dim {
    Fixed(i64),
    Named(&'static str),
}

/// A tensor value info of any element type.
pub(crate) fn value_info(name: &str, elem: DataType, dims: &[Dim]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Dim::Fixed(v) => dimension::Value::DimValue(*v),
                Dim::Named(p) => dimension::Value::DimParam(p.to_string()),
            }),
        })
        .collect();
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: elem as i32,
                shape: Some(TensorShapeProto { dim }),
            })),
        }),
    }
}
