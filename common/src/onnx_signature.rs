//! A model's signature as its ONNX file declares it: every graph input (initialisers, which
//! older exporters also list as inputs, left out) and every output, each with its name,
//! element type and shape, dynamic dimensions included. Read from the file's bytes without
//! decoding the weights.
//!
//! A leading dynamic dimension on every input and output is the batch dimension: such a model
//! takes batches. A model without one is served a sample at a time.

use std::collections::HashSet;
use std::fmt;

use prost::Message;
use tidal_proto::onnx::{tensor_shape_proto::dimension, type_proto, ValueInfoProto};
use tidal_proto::v1::TensorSignature;

/// `ModelProto` with only its graph (field 7).
#[derive(Clone, PartialEq, Message)]
struct ModelSignature {
    #[prost(message, optional, tag = "7")]
    graph: Option<GraphSignature>,
}

/// `GraphProto` with only the names of its initialisers (5), its inputs (11) and outputs (12):
/// prost skips every other field, the weights included, without copying it.
#[derive(Clone, PartialEq, Message)]
struct GraphSignature {
    #[prost(message, repeated, tag = "5")]
    initializer: Vec<TensorName>,
    #[prost(message, repeated, tag = "11")]
    input: Vec<ValueInfoProto>,
    #[prost(message, repeated, tag = "12")]
    output: Vec<ValueInfoProto>,
}

/// `TensorProto` with only its name (field 8).
#[derive(Clone, PartialEq, Message)]
struct TensorName {
    #[prost(string, tag = "8")]
    name: String,
}

/// The element types a tensor may have, by the names the Open Inference Protocol gives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ElementType {
    Fp32,
    Fp16,
    Bf16,
    Fp64,
    Int8,
    Int16,
    Int32,
    Int64,
    Uint8,
    Uint16,
    Uint32,
    Uint64,
    Bool,
    /// ONNX `STRING`: V2's BYTES.
    Bytes,
}

impl ElementType {
    /// From ONNX's `TensorProto.DataType` code; `None` for a type Tidal does not serve
    /// (complex numbers, 8-bit and 4-bit floats).
    pub fn from_onnx(code: i32) -> Option<Self> {
        Some(match code {
            1 => Self::Fp32,
            2 => Self::Uint8,
            3 => Self::Int8,
            4 => Self::Uint16,
            5 => Self::Int16,
            6 => Self::Int32,
            7 => Self::Int64,
            8 => Self::Bytes,
            9 => Self::Bool,
            10 => Self::Fp16,
            11 => Self::Fp64,
            12 => Self::Uint32,
            13 => Self::Uint64,
            16 => Self::Bf16,
            _ => return None,
        })
    }

    /// The Open Inference Protocol's name for it ("FP32", "INT64", …).
    pub fn v2_name(self) -> &'static str {
        match self {
            Self::Fp32 => "FP32",
            Self::Fp16 => "FP16",
            Self::Bf16 => "BF16",
            Self::Fp64 => "FP64",
            Self::Int8 => "INT8",
            Self::Int16 => "INT16",
            Self::Int32 => "INT32",
            Self::Int64 => "INT64",
            Self::Uint8 => "UINT8",
            Self::Uint16 => "UINT16",
            Self::Uint32 => "UINT32",
            Self::Uint64 => "UINT64",
            Self::Bool => "BOOL",
            Self::Bytes => "BYTES",
        }
    }

    /// From the Open Inference Protocol's name.
    pub fn from_v2_name(name: &str) -> Option<Self> {
        ALL.iter().copied().find(|t| t.v2_name() == name)
    }

    /// Bytes per element; `None` for BYTES, whose elements have their own lengths.
    pub fn size(self) -> Option<usize> {
        Some(match self {
            Self::Int8 | Self::Uint8 | Self::Bool => 1,
            Self::Fp16 | Self::Bf16 | Self::Int16 | Self::Uint16 => 2,
            Self::Fp32 | Self::Int32 | Self::Uint32 => 4,
            Self::Fp64 | Self::Int64 | Self::Uint64 => 8,
            Self::Bytes => return None,
        })
    }
}

const ALL: [ElementType; 14] = [
    ElementType::Fp32,
    ElementType::Fp16,
    ElementType::Bf16,
    ElementType::Fp64,
    ElementType::Int8,
    ElementType::Int16,
    ElementType::Int32,
    ElementType::Int64,
    ElementType::Uint8,
    ElementType::Uint16,
    ElementType::Uint32,
    ElementType::Uint64,
    ElementType::Bool,
    ElementType::Bytes,
];

/// One dimension of a declared shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dim {
    Fixed(i64),
    /// Any size: named (`"batch"`, `"height"`) or not.
    Dynamic(Option<String>),
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Dynamic(Some(name)) => write!(f, "{name}?"),
            Dim::Dynamic(None) => write!(f, "?"),
        }
    }
}

/// A named tensor as a model declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub element: ElementType,
    pub shape: Vec<Dim>,
}

impl TensorSpec {
    /// As the replicated task keeps it: -1 for a dynamic dimension.
    pub fn to_proto(&self) -> TensorSignature {
        let shape = self.shape.iter().map(|d| if let Dim::Fixed(n) = d { *n } else { -1 }).collect();
        TensorSignature {
            name: self.name.clone(),
            datatype: self.element.v2_name().into(),
            shape,
            max_shape: vec![],
            min_shape: vec![],
        }
    }
}

/// The most inputs, and the most outputs, a stage's signature may have.
pub const MAX_TENSORS: usize = 64;
/// The highest rank a tensor of a signature may have.
pub const MAX_RANK: usize = 16;
/// The longest tensor name.
pub const MAX_NAME: usize = 256;

/// Checks a stage's signature wherever it arrives: inputs and outputs both given or both
/// absent, 1..=[`MAX_TENSORS`] of each with unique names of 1..=[`MAX_NAME`] printable
/// characters, known element types, ranks up to [`MAX_RANK`], dimensions -1 (dynamic) or
/// positive.
pub fn validate_signature(inputs: &[TensorSignature], outputs: &[TensorSignature]) -> Result<(), String> {
    if inputs.is_empty() != outputs.is_empty() {
        return Err("a signature gives both inputs and outputs, or neither".into());
    }
    for (what, tensors) in [("input", inputs), ("output", outputs)] {
        if tensors.len() > MAX_TENSORS {
            return Err(format!("{} {what}s: at most {MAX_TENSORS}", tensors.len()));
        }
        let mut seen = HashSet::new();
        for t in tensors {
            let printable = !t.name.is_empty() && t.name.len() <= MAX_NAME && !t.name.chars().any(char::is_control);
            if !printable {
                return Err(format!("{what} name {:?} must be 1–{MAX_NAME} printable characters", t.name));
            }
            if !seen.insert(t.name.as_str()) {
                return Err(format!("two {what}s are named {:?}", t.name));
            }
            match ElementType::from_v2_name(&t.datatype) {
                None => return Err(format!("{what} {:?}: unknown element type {:?}", t.name, t.datatype)),
                // ONNX Runtime's string tensors are not fed to workers; text reaches a model as
                // token ids (a stage's [stages.tokenize]).
                Some(ElementType::Bytes) => {
                    return Err(format!(
                        "{what} {:?}: the model's STRING tensors are not served (a stage may tokenize text into token ids instead)",
                        t.name
                    ))
                }
                Some(_) => {}
            }
            if t.shape.len() > MAX_RANK || t.shape.iter().any(|&d| d < -1 || d == 0) {
                return Err(format!(
                    "{what} {:?}: shape {:?} must have at most {MAX_RANK} dimensions, each -1 (dynamic) or positive",
                    t.name, t.shape
                ));
            }
            let bounds_fit = t.max_shape.is_empty()
                || (what == "input"
                    && t.max_shape.len() == t.shape.len()
                    && t.max_shape.iter().zip(&t.shape).all(|(&m, &d)| m == 0 || (d == -1 && m > 0) || m == d));
            if !bounds_fit {
                return Err(format!(
                    "{what} {:?}: bounds {:?} must give, for an input, one number per dimension of {:?}: the most a dynamic one may be (0: unbounded), 0 or the size for a fixed one",
                    t.name, t.max_shape, t.shape
                ));
            }
            let least_fit = t.min_shape.is_empty()
                || (what == "input"
                    && t.min_shape.len() == t.shape.len()
                    && t.min_shape.iter().zip(&t.shape).all(|(&m, &d)| m == 0 || (d == -1 && m > 0) || m == d)
                    && t.min_shape.iter().zip(&t.max_shape).all(|(&lo, &hi)| hi == 0 || lo <= hi));
            if !least_fit {
                return Err(format!(
                    "{what} {:?}: least sizes {:?} must give, for an input, one number per dimension of {:?}: the least a dynamic one may be (0: 1), 0 or the size for a fixed one, no more than its bound",
                    t.name, t.min_shape, t.shape
                ));
            }
        }
    }
    Ok(())
}

impl fmt::Display for TensorSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dims: Vec<String> = self.shape.iter().map(ToString::to_string).collect();
        write!(f, "{} {} [{}]", self.name, self.element.v2_name(), dims.join(", "))
    }
}

/// Every input and output of a model, in the file's order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |ts: &[TensorSpec]| ts.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
        write!(f, "inputs: {}; outputs: {}", list(&self.inputs), list(&self.outputs))
    }
}

/// Reads one input or output's declaration.
fn tensor(v: &ValueInfoProto, what: &str) -> Result<TensorSpec, String> {
    let Some(type_proto::Value::TensorType(t)) = v.r#type.as_ref().and_then(|t| t.value.as_ref()) else {
        return Err(format!("{what} {:?} is not a tensor (sequences and maps are not served)", v.name));
    };
    let element = ElementType::from_onnx(t.elem_type).ok_or_else(|| {
        format!("{what} {:?} has element type {} (ONNX code), which is not served", v.name, t.elem_type)
    })?;
    // No shape at all: a tensor of any rank, which cannot be batched or checked.
    let shape = t.shape.as_ref().ok_or_else(|| format!("{what} {:?} declares no shape", v.name))?;
    let shape = shape
        .dim
        .iter()
        .map(|d| match &d.value {
            Some(dimension::Value::DimValue(n)) if *n > 0 => Dim::Fixed(*n),
            Some(dimension::Value::DimParam(p)) if !p.is_empty() => Dim::Dynamic(Some(p.clone())),
            _ => Dim::Dynamic(None),
        })
        .collect();
    Ok(TensorSpec { name: v.name.clone(), element, shape })
}

impl Signature {
    /// The signature an ONNX file's bytes declare.
    pub fn read(model: &[u8]) -> Result<Self, String> {
        let m = ModelSignature::decode(model).map_err(|e| format!("not an ONNX model: {e}"))?;
        let g = m.graph.ok_or("the model has no graph")?;
        let weights: HashSet<&str> = g.initializer.iter().map(|t| t.name.as_str()).collect();
        let inputs = g
            .input
            .iter()
            .filter(|i| !weights.contains(i.name.as_str()))
            .map(|i| tensor(i, "input"))
            .collect::<Result<Vec<_>, _>>()?;
        let outputs = g.output.iter().map(|o| tensor(o, "output")).collect::<Result<Vec<_>, _>>()?;
        if inputs.is_empty() {
            return Err("the model declares no input".into());
        }
        if outputs.is_empty() {
            return Err("the model declares no output".into());
        }
        for (what, tensors) in [("input", &inputs), ("output", &outputs)] {
            let mut seen = HashSet::new();
            if let Some(t) = tensors.iter().find(|t| !seen.insert(t.name.as_str())) {
                return Err(format!("two {what}s are named {:?}", t.name));
            }
        }
        Ok(Self { inputs, outputs })
    }

    /// Whether the model takes batches: every input and output leads with a dynamic dimension.
    pub fn batched(&self) -> bool {
        self.inputs.iter().chain(&self.outputs).all(|t| matches!(t.shape.first(), Some(Dim::Dynamic(_))))
    }

    /// Why a model of signature `other` cannot serve in place of this one (another variant of
    /// the same stage): the same inputs and outputs by name, each of the same element type and
    /// rank, and each dimension fixed to the same size or dynamic in both.
    pub fn agrees_with(&self, other: &Signature) -> Result<(), String> {
        for (what, mine, theirs) in [("input", &self.inputs, &other.inputs), ("output", &self.outputs, &other.outputs)]
        {
            let names = |ts: &[TensorSpec]| ts.iter().map(|t| t.name.clone()).collect::<Vec<_>>();
            if mine.len() != theirs.len() {
                return Err(format!("{what}s {:?} against {:?}", names(mine), names(theirs)));
            }
            for t in mine {
                let Some(o) = theirs.iter().find(|o| o.name == t.name) else {
                    return Err(format!("{what} {:?} is missing (it has {:?})", t.name, names(theirs)));
                };
                let dims_agree = t.shape.len() == o.shape.len()
                    && t.shape.iter().zip(&o.shape).all(|(a, b)| match (a, b) {
                        (Dim::Fixed(x), Dim::Fixed(y)) => x == y,
                        (Dim::Dynamic(_), Dim::Dynamic(_)) => true,
                        _ => false,
                    });
                if t.element != o.element || !dims_agree {
                    return Err(format!("{what} {t} against {o}"));
                }
            }
        }
        Ok(())
    }
}

impl Signature {
    /// The signature under its stage's names: each model tensor that `names` (the stage's
    /// name → the model's) maps is given the stage's name; a name the model does not have is
    /// refused.
    pub fn renamed(&self, names: &std::collections::HashMap<String, String>) -> Result<Signature, String> {
        // Each tensor renamed once, from its own name (a map may swap two names).
        let stage_of: std::collections::HashMap<&str, &str> =
            names.iter().map(|(stage, model)| (model.as_str(), stage.as_str())).collect();
        for (stage, model) in names {
            if !self.inputs.iter().chain(&self.outputs).any(|t| &t.name == model) {
                return Err(format!("names {model:?} as the stage's {stage:?}, but the model has no {model:?}"));
            }
        }
        let mut out = self.clone();
        for t in out.inputs.iter_mut().chain(out.outputs.iter_mut()) {
            if let Some(stage) = stage_of.get(t.name.as_str()) {
                t.name = stage.to_string();
            }
        }
        for (what, tensors) in [("input", &out.inputs), ("output", &out.outputs)] {
            let mut seen = HashSet::new();
            if let Some(t) = tensors.iter().find(|t| !seen.insert(t.name.as_str())) {
                return Err(format!("renamed, two {what}s are named {:?}", t.name));
            }
        }
        Ok(out)
    }

    /// Checks that samples of `sample` shape fit the model's first input: in batches (one
    /// more dimension, dynamic, leading: the batch) or whole (a model without a batch
    /// dimension), every fixed dimension equal. A variant declares this shape as the size its
    /// profiles measure.
    pub fn takes_sample(&self, sample: &[i64]) -> Result<(), String> {
        let Some(first) = self.inputs.first() else { return Err("the model declares no input".into()) };
        let agree = |dims: &[Dim]| {
            dims.len() == sample.len() && dims.iter().zip(sample).all(|(d, s)| !matches!(d, Dim::Fixed(n) if n != s))
        };
        let batched = matches!(first.shape.first(), Some(Dim::Dynamic(_))) && agree(&first.shape[1..]);
        if batched || agree(&first.shape) {
            return Ok(());
        }
        let shown: Vec<String> =
            first.shape.iter().map(|d| if let Dim::Fixed(n) = d { n.to_string() } else { "?".into() }).collect();
        Err(format!(
            "the model takes [{}] but the variant declares samples of {sample:?} (after a batch dimension, or whole)",
            shown.join(", ")
        ))
    }
}

/// [`Signature::read`] and [`Signature::takes_sample`] for a file.
pub fn check_file(path: &std::path::Path, sample: &[i64]) -> Result<(), String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Signature::read(&bytes).map_err(|e| format!("{}: {e}", path.display()))?.takes_sample(sample)
}

/// Checks that the variants of one stage, (name, signature) each, can stand in for each other:
/// every one agrees with the first.
pub fn check_stage(stage: &str, variants: &[(String, Signature)]) -> Result<(), String> {
    let Some((first, signature)) = variants.first() else { return Ok(()) };
    for (name, other) in &variants[1..] {
        signature.agrees_with(other).map_err(|why| {
            format!("stage {stage:?}: variant {name:?} does not take and give what {first:?} does: {why}")
        })?;
    }
    Ok(())
}

/// A declared tensor without bounds, for the tests of the modules that check requests.
#[cfg(test)]
pub(crate) fn test_signature(name: &str, datatype: &str, shape: &[i64]) -> TensorSignature {
    TensorSignature {
        name: name.into(),
        datatype: datatype.into(),
        shape: shape.to_vec(),
        max_shape: vec![],
        min_shape: vec![],
    }
}

#[cfg(test)]
mod tests {
    use tidal_proto::onnx::{
        tensor_shape_proto::Dimension, GraphProto, ModelProto, TensorProto, TensorShapeProto, TypeProto,
    };

    use super::*;
    use crate::resnet::{generate, ResNetDepth};

    fn dim(d: &str) -> Dimension {
        let value = match d.parse::<i64>() {
            Ok(n) => dimension::Value::DimValue(n),
            Err(_) if d.is_empty() => return Dimension { value: None },
            Err(_) => dimension::Value::DimParam(d.into()),
        };
        Dimension { value: Some(value) }
    }

    /// A tensor declaration: dims as numbers, names (dynamic) or "" (unknown).
    fn info(name: &str, elem_type: i32, dims: &[&str]) -> ValueInfoProto {
        let tensor = type_proto::Tensor {
            elem_type,
            shape: Some(TensorShapeProto { dim: dims.iter().map(|d| dim(d)).collect() }),
        };
        ValueInfoProto {
            name: name.into(),
            r#type: Some(TypeProto { value: Some(type_proto::Value::TensorType(tensor)) }),
        }
    }

    fn model(inputs: Vec<ValueInfoProto>, outputs: Vec<ValueInfoProto>, weights: &[&str]) -> Vec<u8> {
        let initializer = weights
            .iter()
            .map(|w| TensorProto { name: w.to_string(), data_type: 1, dims: vec![4], raw_data: vec![0; 16] })
            .collect();
        let graph = GraphProto { input: inputs, output: outputs, initializer, ..Default::default() };
        ModelProto { graph: Some(graph), ..Default::default() }.encode_to_vec()
    }

    #[test]
    fn every_input_and_output_is_read_with_its_type_and_dynamic_dimensions() {
        // A recurrent model: a token batch of any length, an INT64 scalar, a state in and out,
        // FP16 logits; its weights listed among the inputs, as older exporters do.
        let bytes = model(
            vec![
                info("input_ids", 7, &["batch", "sequence"]),
                info("step", 7, &[]),
                info("state_in", 10, &["batch", "256"]),
                info("w", 1, &["4"]),
            ],
            vec![info("logits", 10, &["batch", "sequence", "1000"]), info("state_out", 10, &["batch", "256"])],
            &["w"],
        );
        let s = Signature::read(&bytes).unwrap();
        let names: Vec<&str> = s.inputs.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["input_ids", "step", "state_in"], "the weight w is no input");
        assert_eq!(s.inputs[1], TensorSpec { name: "step".into(), element: ElementType::Int64, shape: vec![] });
        assert_eq!(s.inputs[2].shape, [Dim::Dynamic(Some("batch".into())), Dim::Fixed(256)]);
        assert_eq!(s.outputs[0].element, ElementType::Fp16);
        assert!(!s.batched(), "the scalar step has no batch dimension");
        assert_eq!(
            s.to_string(),
            "inputs: input_ids INT64 [batch?, sequence?]; step INT64 []; state_in FP16 [batch?, 256]; \
             outputs: logits FP16 [batch?, sequence?, 1000]; state_out FP16 [batch?, 256]"
        );
    }

    #[test]
    fn a_detector_with_dynamic_height_and_width_takes_batches() {
        let bytes = model(
            vec![info("images", 1, &["", "3", "height", "width"])],
            vec![info("boxes", 1, &["", "", "4"]), info("scores", 1, &["", ""]), info("classes", 7, &["", ""])],
            &[],
        );
        let s = Signature::read(&bytes).unwrap();
        assert!(s.batched());
        assert_eq!(s.outputs.len(), 3);
        assert_eq!(s.inputs[0].to_string(), "images FP32 [?, 3, height?, width?]");
    }

    #[test]
    fn the_generated_models_declare_one_batched_float_input_and_output() {
        let s = Signature::read(&generate(ResNetDepth::R18, 32, 1).onnx).unwrap();
        assert_eq!(s.inputs.len(), 1);
        assert_eq!(s.outputs.len(), 1);
        assert_eq!(s.inputs[0].element, ElementType::Fp32);
        assert_eq!(s.inputs[0].shape[1..], [Dim::Fixed(3), Dim::Fixed(32), Dim::Fixed(32)]);
        assert!(s.batched());
        let bigger = Signature::read(&generate(ResNetDepth::R34, 32, 1).onnx).unwrap();
        assert_eq!(s.agrees_with(&bigger), Ok(()), "two variants of one stage");
    }

    #[test]
    fn variants_of_a_stage_must_agree_and_say_why_not() {
        let base = || vec![info("input_ids", 7, &["b", "s"]), info("attention_mask", 7, &["b", "s"])];
        let out = || vec![info("logits", 1, &["b", "2"])];
        let s = Signature::read(&model(base(), out(), &[])).unwrap();
        let renamed = Signature::read(&model(vec![base()[0].clone(), info("mask", 7, &["b", "s"])], out(), &[]));
        let renamed = renamed.unwrap();
        let why = s.agrees_with(&renamed).unwrap_err();
        assert!(why.contains("\"attention_mask\" is missing"), "{why}");
        // Under the stage's names (the variant's map: the stage's name → its model's), it agrees.
        let map = |pairs: &[(&str, &str)]| pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        assert_eq!(s.agrees_with(&renamed.renamed(&map(&[("attention_mask", "mask")])).unwrap()), Ok(()));
        let why = renamed.renamed(&map(&[("attention_mask", "masks")])).unwrap_err();
        assert!(why.contains("the model has no \"masks\""), "{why}");
        assert!(renamed
            .renamed(&map(&[("input_ids", "mask")]))
            .unwrap_err()
            .contains("two inputs are named \"input_ids\""));
        let int32 =
            Signature::read(&model(vec![base()[0].clone(), info("attention_mask", 6, &["b", "s"])], out(), &[]));
        let why = s.agrees_with(&int32.unwrap()).unwrap_err();
        assert!(why.contains("INT64") && why.contains("INT32"), "{why}");
        let three = Signature::read(&model(base(), vec![info("logits", 1, &["b", "3"])], &[])).unwrap();
        assert!(s.agrees_with(&three).unwrap_err().contains("output logits FP32 [b?, 2]"));
        let renamed_dims = Signature::read(&model(
            vec![info("input_ids", 7, &["n", "t"]), info("attention_mask", 7, &["n", "t"])],
            out(),
            &[],
        ))
        .unwrap();
        assert_eq!(s.agrees_with(&renamed_dims), Ok(()), "dynamic dimensions agree whatever their names");
        let stage = [("bert".to_string(), s.clone()), ("tiny".to_string(), renamed_dims), ("big".to_string(), three)];
        let why = check_stage("classify", &stage).unwrap_err();
        assert!(
            why.starts_with("stage \"classify\": variant \"big\" does not take and give what \"bert\" does"),
            "{why}"
        );
        assert_eq!(check_stage("classify", &stage[..2]), Ok(()));
    }

    #[test]
    fn a_signature_is_kept_as_the_task_holds_it_and_checked_where_it_arrives() {
        let bytes = model(vec![info("images", 1, &["", "3", "h", "w"])], vec![info("out", 7, &["", "4"])], &[]);
        let s = Signature::read(&bytes).unwrap();
        let (inputs, outputs): (Vec<_>, Vec<_>) =
            (s.inputs.iter().map(TensorSpec::to_proto).collect(), s.outputs.iter().map(TensorSpec::to_proto).collect());
        assert_eq!(
            inputs[0],
            TensorSignature {
                name: "images".into(),
                datatype: "FP32".into(),
                shape: vec![-1, 3, -1, -1],
                max_shape: vec![],
                min_shape: vec![],
            }
        );
        assert_eq!(outputs[0].datatype, "INT64");
        assert_eq!(validate_signature(&inputs, &outputs), Ok(()));
        assert_eq!(validate_signature(&[], &[]), Ok(()), "a task registered before signatures");
        let bad = |f: &dyn Fn(&mut TensorSignature)| {
            let mut t = inputs[0].clone();
            f(&mut t);
            validate_signature(&[t], &outputs).unwrap_err()
        };
        assert!(bad(&|t| t.datatype = "FLOAT".into()).contains("unknown element type"));
        assert!(bad(&|t| t.shape = vec![-2]).contains("-1 (dynamic) or positive"));
        assert!(bad(&|t| t.shape = vec![1; MAX_RANK + 1]).contains("at most 16 dimensions"));
        assert!(bad(&|t| t.name = "a\nb".into()).contains("printable"));
        let bounded = |max: &[i64]| {
            let mut t = inputs[0].clone();
            t.max_shape = max.to_vec();
            validate_signature(&[t], &outputs)
        };
        assert_eq!(bounded(&[0, 3, 1280, 1280]), Ok(()));
        assert_eq!(bounded(&[0, 0, 640, 0]), Ok(()), "0: unbounded");
        assert!(bounded(&[0, 4, 1280, 1280]).unwrap_err().contains("bounds"), "a fixed dimension is its size");
        assert!(bounded(&[0, 3, 1280]).unwrap_err().contains("bounds"), "one per dimension");
        assert!(bounded(&[0, 3, -5, 0]).unwrap_err().contains("bounds"));
        let mut out = outputs[0].clone();
        out.max_shape = vec![0, 4];
        assert!(validate_signature(&inputs, &[out]).unwrap_err().contains("for an input"));
        assert!(validate_signature(&inputs, &[]).unwrap_err().contains("both"));
        assert!(validate_signature(&vec![inputs[0].clone(); MAX_TENSORS + 1], &outputs)
            .unwrap_err()
            .contains("at most 64"));
    }

    #[test]
    fn what_cannot_be_served_is_refused_with_the_reason() {
        let no_shape = ValueInfoProto {
            name: "x".into(),
            r#type: Some(TypeProto {
                value: Some(type_proto::Value::TensorType(type_proto::Tensor { elem_type: 1, shape: None })),
            }),
        };
        let out = || vec![info("y", 1, &["1"])];
        let cases = [
            (model(vec![no_shape], out(), &[]), "declares no shape"),
            (model(vec![info("x", 14, &["1"])], out(), &[]), "not served"),
            (model(vec![], out(), &[]), "no input"),
            (model(vec![info("x", 1, &["1"])], vec![], &[]), "no output"),
            (model(vec![info("x", 1, &["1"]), info("x", 1, &["2"])], out(), &[]), "two inputs are named \"x\""),
            (b"not a model".to_vec(), "not an ONNX model"),
        ];
        for (bytes, why) in cases {
            let refused = Signature::read(&bytes).unwrap_err();
            assert!(refused.contains(why), "{refused} (wanted: {why})");
        }
    }

    #[test]
    fn a_variant_s_sample_must_fit_the_model_s_first_input() {
        let m = crate::resnet::generate(crate::resnet::ResNetDepth::R18, 32, 1);
        let s = Signature::read(&m.onnx).unwrap();
        assert_eq!(s.takes_sample(&[3, 32, 32]), Ok(()));
        let wrong = s.takes_sample(&[3, 64, 64]).unwrap_err();
        assert!(wrong.contains("[?, 3, 32, 32]"), "{wrong}");
        assert!(s.takes_sample(&[3, 32]).is_err(), "rank");
        let of = |dims: &[&str]| {
            Signature::read(&model(vec![info("x", 1, dims)], vec![info("y", 1, &["", "1"])], &[])).unwrap()
        };
        assert!(of(&["", ""]).takes_sample(&[7]).is_ok(), "dynamic dimensions take anything");
        assert!(of(&["2", "8"]).takes_sample(&[2, 8]).is_ok(), "a model without a batch dimension");
        assert!(of(&["2", "8"]).takes_sample(&[8]).is_err(), "a fixed first dimension is no batch");
        assert!(of(&[""]).takes_sample(&[]).is_ok(), "a batch of scalars");
        // The first input that is not a weight (older exporters list weights as inputs).
        let listed = model(vec![info("w", 1, &["4"]), info("x", 1, &["", "3"])], vec![info("y", 1, &[""])], &["w"]);
        assert!(Signature::read(&listed).unwrap().takes_sample(&[3]).is_ok());
    }
}
