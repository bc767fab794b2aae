//! ONNX models unlike the generator's, built in the tests: several named inputs and outputs of
//! other types (INT64 scalars, FP16), dynamic height and width, a model without a batch
//! dimension. Their graphs are small, so that what is tested is how Tidal carries tensors.

use prost::Message;
use tidal_proto::onnx::{
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto::dimension,
    tensor_shape_proto::Dimension, type_proto, AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto,
    TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};

/// A dimension: a size, or dynamic under a name.
pub enum D {
    N(i64),
    P(&'static str),
}

fn info(name: &str, elem: DataType, dims: &[D]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                D::N(n) => dimension::Value::DimValue(*n),
                D::P(p) => dimension::Value::DimParam(p.to_string()),
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

fn node(op: &str, inputs: &[&str], output: &str, attribute: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        op_type: op.into(),
        name: format!("{op}_{output}"),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        attribute,
    }
}

fn int(name: &str, i: i64) -> AttributeProto {
    AttributeProto { name: name.into(), i, r#type: AttributeType::Int as i32, ..Default::default() }
}

fn ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto { name: name.into(), ints: v.to_vec(), r#type: AttributeType::Ints as i32, ..Default::default() }
}

fn int64s(name: &str, dims: &[i64], values: &[i64]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: DataType::Int64 as i32,
        raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

fn floats(name: &str, dims: &[i64], values: &[f32]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: DataType::Float as i32,
        raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

fn model(
    name: &str,
    nodes: Vec<NodeProto>,
    init: Vec<TensorProto>,
    input: Vec<ValueInfoProto>,
    output: Vec<ValueInfoProto>,
) -> Vec<u8> {
    ModelProto {
        ir_version: 8,
        producer_name: "tidal-tests".into(),
        graph: Some(GraphProto { name: name.into(), node: nodes, initializer: init, input, output }),
        opset_import: vec![OperatorSetIdProto { domain: String::new(), version: 17 }],
        ..Default::default()
    }
    .encode_to_vec()
}

/// A detector-like model that takes batches: `images` FP32 [N, 3, H, W] (H and W dynamic),
/// `scale` INT64 [N] (a scalar per sample) and `bias` FP16 [N, 4]; gives `pooled` FP32 [N, 3]
/// (the image's mean per channel times its scale), `bias2` FP16 [N, 4] (bias + bias) and
/// `next` INT64 [N] (scale + 1).
pub fn detector() -> Vec<u8> {
    let nodes = vec![
        node("ReduceMean", &["images"], "mean", vec![ints("axes", &[2, 3]), int("keepdims", 0)]),
        node("Cast", &["scale"], "scale_f", vec![int("to", DataType::Float as i64)]),
        node("Unsqueeze", &["scale_f", "axis1"], "scale_col", vec![]),
        node("Mul", &["mean", "scale_col"], "pooled", vec![]),
        node("Add", &["bias", "bias"], "bias2", vec![]),
        node("Add", &["scale", "one"], "next", vec![]),
    ];
    let init = vec![int64s("axis1", &[1], &[1]), int64s("one", &[], &[1])];
    let inputs = vec![
        info("images", DataType::Float, &[D::P("N"), D::N(3), D::P("H"), D::P("W")]),
        info("scale", DataType::Int64, &[D::P("N")]),
        info("bias", DataType::Float16, &[D::P("N"), D::N(4)]),
    ];
    let outputs = vec![
        info("pooled", DataType::Float, &[D::P("N"), D::N(3)]),
        info("bias2", DataType::Float16, &[D::P("N"), D::N(4)]),
        info("next", DataType::Int64, &[D::P("N")]),
    ];
    model("detector", nodes, init, inputs, outputs)
}

/// A second stage for [`detector`]: `next` INT64 [N] and `features` FP32 [N, 3] give `logit`
/// FP32 [N, 1] = features · w + next.
pub fn head() -> Vec<u8> {
    let nodes = vec![
        node("MatMul", &["features", "w"], "dot", vec![]),
        node("Cast", &["next"], "next_f", vec![int("to", DataType::Float as i64)]),
        node("Unsqueeze", &["next_f", "axis1"], "next_col", vec![]),
        node("Add", &["dot", "next_col"], "logit", vec![]),
    ];
    let init = vec![floats("w", &[3, 1], &[0.5, -2.0, 0.25]), int64s("axis1", &[1], &[1])];
    // The scalar first: a model whose first input is one number per sample.
    let inputs =
        vec![info("next", DataType::Int64, &[D::P("N")]), info("features", DataType::Float, &[D::P("N"), D::N(3)])];
    let outputs = vec![info("logit", DataType::Float, &[D::P("N"), D::N(1)])];
    model("head", nodes, init, inputs, outputs)
}

/// A recurrent step without a batch dimension: `state` FP32 [2, 8] and `step` INT64 [] (a
/// scalar) give `next_state` FP32 [2, 8] = tanh(state + step) and `next_step` INT64 [] = step + 1.
pub fn recurrent() -> Vec<u8> {
    let nodes = vec![
        node("Cast", &["step"], "step_f", vec![int("to", DataType::Float as i64)]),
        node("Add", &["state", "step_f"], "sum", vec![]),
        node("Tanh", &["sum"], "next_state", vec![]),
        node("Add", &["step", "one"], "next_step", vec![]),
    ];
    let init = vec![int64s("one", &[], &[1])];
    let inputs = vec![info("state", DataType::Float, &[D::N(2), D::N(8)]), info("step", DataType::Int64, &[])];
    let outputs =
        vec![info("next_state", DataType::Float, &[D::N(2), D::N(8)]), info("next_step", DataType::Int64, &[])];
    model("recurrent", nodes, init, inputs, outputs)
}

/// A text model taking batches of token sequences of any length: `input_ids` INT64 [N, L] and
/// `attention_mask` INT64 [N, L] give `kept` INT64 [N, L] (the ids the mask keeps, 0
/// elsewhere) and `total` INT64 [N] (their sum): padding with a mask of 0 changes neither.
pub fn tokens() -> Vec<u8> {
    let nodes = vec![
        node("Mul", &["input_ids", "attention_mask"], "kept", vec![]),
        node("ReduceSum", &["kept", "axis1"], "total", vec![int("keepdims", 0)]),
    ];
    let init = vec![int64s("axis1", &[1], &[1])];
    let inputs = vec![
        info("input_ids", DataType::Int64, &[D::P("N"), D::P("L")]),
        info("attention_mask", DataType::Int64, &[D::P("N"), D::P("L")]),
    ];
    let outputs =
        vec![info("kept", DataType::Int64, &[D::P("N"), D::P("L")]), info("total", DataType::Int64, &[D::P("N")])];
    model("tokens", nodes, init, inputs, outputs)
}

/// `model` with its tensors renamed (`from`, `to`): the graph's inputs and outputs and every
/// node's use of them, as an exporter that named them otherwise would have written it.
pub fn renamed(model: &[u8], names: &[(&str, &str)]) -> Vec<u8> {
    let mut m = ModelProto::decode(model).expect("an ONNX model");
    let graph = m.graph.as_mut().expect("a graph");
    let rename = |n: &mut String| {
        if let Some((_, to)) = names.iter().find(|(from, _)| n == from) {
            *n = to.to_string();
        }
    };
    for v in graph.input.iter_mut().chain(graph.output.iter_mut()) {
        rename(&mut v.name);
    }
    for node in &mut graph.node {
        node.input.iter_mut().chain(node.output.iter_mut()).for_each(rename);
    }
    m.encode_to_vec()
}
