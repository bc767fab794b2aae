//! A Triton Inference Server model repository read as Tidal tasks, for `tidalctl task import`:
//! a Triton user moves over without rewriting their layout.
//!
//! A repository holds one directory per model: `config.pbtxt` (Triton's model configuration,
//! in protobuf text format) and one numbered directory per version holding the model file
//! (`<model>/<version>/model.onnx` by default). Each ONNX Runtime model becomes a task of one
//! stage and one variant, named after the model, whose file is the chosen version's, relative
//! to the repository: agents started with `--model-dir <repository>` serve it where it is.
//!
//! The configuration is checked against the ONNX file's own signature, as Triton's ONNX
//! Runtime backend does: every input named and typed as the model declares it, dimensions the
//! model can take (a configuration may fix a dimension the model leaves dynamic, and Tidal then
//! holds requests to it), and a batch dimension when `max_batch_size` is positive. What Tidal
//! serves differently is said in the model's notes; what it cannot serve (sequence batching,
//! ensembles, reshapes, ragged or shape-tensor inputs, decoupled models, other backends) is
//! refused with the reason.

use std::path::{Path, PathBuf};

use prost_reflect::{DescriptorPool, DynamicMessage};
use tidal_proto::triton::{
    model_config::SchedulingChoice, model_instance_group, model_version_policy, DataType, ModelConfig,
};
use tidal_proto::v1::{TaskSpec, VariantSpec};

use crate::onnx_signature::{Dim, ElementType, Signature, TensorSpec};

/// The file of a model's configuration in its directory.
pub const CONFIG_FILE: &str = "config.pbtxt";
/// The model file Triton's ONNX Runtime backend looks for without `default_model_filename`.
pub const DEFAULT_MODEL_FILE: &str = "model.onnx";
/// The largest `config.pbtxt` read (Triton's are a few kB; warm-up and label maps stay small).
const MAX_CONFIG_BYTES: u64 = 4 << 20;
/// The parameter whose `string_value` gives the model's accuracy in percent (Triton has none).
pub const ACCURACY_PARAMETER: &str = "accuracy";

/// Parses the text of a `config.pbtxt`.
pub fn parse_config(text: &str) -> Result<ModelConfig, String> {
    let pool = DescriptorPool::decode(tidal_proto::TRITON_MODEL_CONFIG_DESCRIPTOR_SET)
        .map_err(|e| format!("the model configuration schema does not decode: {e}"))?;
    let desc = pool.get_message_by_name("tidal.triton.ModelConfig").ok_or("ModelConfig is missing from the schema")?;
    // The schema's package is Tidal's; the user knows the message by Triton's name.
    let message = DynamicMessage::parse_text_format(desc, &colon_before_lists(text)).map_err(|e| {
        format!(
            "{} (Triton's documented model configuration fields are read)",
            e.to_string().replace("tidal.triton.", "")
        )
    })?;
    message.transcode_to::<ModelConfig>().map_err(|e| format!("not a model configuration: {e}"))
}

/// The text with a `:` between a field's name and a list of messages (`input [ { … } ]`, as
/// every Triton configuration writes it). The text format allows the colon to be left out
/// there, but prost-reflect's parser requires it; nothing else in the format puts `[` right
/// after a name, and strings and comments are left as they are.
fn colon_before_lists(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    let mut chars = text.chars().peekable();
    // The last significant character outside strings and comments.
    let mut last = ' ';
    while let Some(c) = chars.next() {
        match c {
            '"' | '\'' => {
                out.push(c);
                while let Some(s) = chars.next() {
                    out.push(s);
                    if s == '\\' {
                        if let Some(escaped) = chars.next() {
                            out.push(escaped);
                        }
                    } else if s == c || s == '\n' {
                        break;
                    }
                }
                last = c;
            }
            '#' => {
                out.push(c);
                for s in chars.by_ref() {
                    out.push(s);
                    if s == '\n' {
                        break;
                    }
                }
            }
            '[' if last.is_ascii_alphanumeric() || last == '_' => {
                out.push_str(": [");
                last = '[';
            }
            c => {
                out.push(c);
                if !c.is_whitespace() {
                    last = c;
                }
            }
        }
    }
    out
}

/// One model of a repository, at the version Tidal will serve.
#[derive(Debug, Clone)]
pub struct RepositoryModel {
    /// The model's (and the imported task's) name: its directory's.
    pub name: String,
    pub version: i64,
    /// The model file, relative to the repository (`<model>/<version>/model.onnx`).
    pub model_file: String,
    pub config: ModelConfig,
    /// What Tidal does otherwise than Triton would with this configuration.
    pub notes: Vec<String>,
}

/// The model directories of a repository (every directory in it, as Triton loads them), sorted.
pub fn model_dirs(repository: &Path) -> Result<Vec<PathBuf>, String> {
    let entries = std::fs::read_dir(repository).map_err(|e| format!("reading {}: {e}", repository.display()))?;
    let mut dirs = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| format!("reading {}: {e}", repository.display()))?;
        let hidden = entry.file_name().to_string_lossy().starts_with('.');
        if entry.path().is_dir() && !hidden {
            dirs.push(entry.path());
        }
    }
    dirs.sort();
    if dirs.is_empty() {
        return Err(format!("{} holds no model directory", repository.display()));
    }
    Ok(dirs)
}

/// Reads one model directory: its configuration (none: Triton's defaults, the signature from
/// the file) and the version its policy serves (the highest it allows).
pub fn read_model(dir: &Path) -> Result<RepositoryModel, String> {
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).ok_or("a model directory has no name")?;
    let config_path = dir.join(CONFIG_FILE);
    let mut notes = Vec::new();
    let config = if config_path.is_file() {
        let size = std::fs::metadata(&config_path).map(|m| m.len()).unwrap_or(0);
        if size > MAX_CONFIG_BYTES {
            return Err(format!("{CONFIG_FILE} is {size} bytes; at most {MAX_CONFIG_BYTES} are read"));
        }
        let text = std::fs::read_to_string(&config_path).map_err(|e| format!("reading {CONFIG_FILE}: {e}"))?;
        parse_config(&text).map_err(|e| format!("{CONFIG_FILE}: {e}"))?
    } else {
        notes.push(format!("no {CONFIG_FILE}: inputs, outputs and batching are the model file's"));
        ModelConfig { name: name.clone(), ..Default::default() }
    };
    if !config.name.is_empty() && config.name != name {
        return Err(format!("{CONFIG_FILE} names the model {:?}, but its directory is {name:?}", config.name));
    }
    let version = choose_version(dir, &config, &mut notes)?;
    let file = if config.default_model_filename.is_empty() {
        DEFAULT_MODEL_FILE.to_string()
    } else {
        config.default_model_filename.clone()
    };
    let model_file = format!("{name}/{version}/{file}");
    if !dir.join(version.to_string()).join(&file).is_file() {
        return Err(format!("version {version} has no model file {file:?} (a directory of external data is not read)"));
    }
    Ok(RepositoryModel { name, version, model_file, config, notes })
}

/// The highest version present that the model's version policy serves; Tidal serves one.
fn choose_version(dir: &Path, config: &ModelConfig, notes: &mut Vec<String>) -> Result<i64, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("reading {}: {e}", dir.display()))?;
    let mut present: Vec<i64> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i64>().ok()))
        .filter(|&v| v > 0)
        .collect();
    present.sort_unstable();
    let policy = config.version_policy.as_ref().and_then(|p| p.policy_choice.as_ref());
    let allowed: Vec<i64> = match policy {
        None => present.iter().rev().take(1).copied().collect(),
        Some(model_version_policy::PolicyChoice::Latest(latest)) => {
            let n = latest.num_versions.max(1) as usize;
            if n > 1 && present.len() > 1 {
                notes.push(format!("version policy latest {n}: Tidal serves one version, the highest"));
            }
            present.iter().rev().take(n).copied().collect()
        }
        Some(model_version_policy::PolicyChoice::All(_)) => {
            if present.len() > 1 {
                notes.push("version policy all: Tidal serves one version, the highest".into());
            }
            present.clone()
        }
        Some(model_version_policy::PolicyChoice::Specific(specific)) => {
            if specific.versions.len() > 1 {
                notes.push(format!(
                    "version policy specific {:?}: Tidal serves one version, the highest present",
                    specific.versions
                ));
            }
            present.iter().filter(|v| specific.versions.contains(v)).copied().collect()
        }
    };
    allowed.into_iter().max().ok_or_else(|| match policy {
        Some(model_version_policy::PolicyChoice::Specific(s)) => {
            format!("none of the versions its policy names ({:?}) is present (found {present:?})", s.versions)
        }
        _ => "no version directory (a positive number) holds the model".to_string(),
    })
}

/// The element type a configuration's `data_type` names.
fn element(data_type: i32) -> Result<ElementType, String> {
    use ElementType as E;
    Ok(match DataType::try_from(data_type).unwrap_or(DataType::TypeInvalid) {
        DataType::TypeBool => E::Bool,
        DataType::TypeUint8 => E::Uint8,
        DataType::TypeUint16 => E::Uint16,
        DataType::TypeUint32 => E::Uint32,
        DataType::TypeUint64 => E::Uint64,
        DataType::TypeInt8 => E::Int8,
        DataType::TypeInt16 => E::Int16,
        DataType::TypeInt32 => E::Int32,
        DataType::TypeInt64 => E::Int64,
        DataType::TypeFp16 => E::Fp16,
        DataType::TypeFp32 => E::Fp32,
        DataType::TypeFp64 => E::Fp64,
        DataType::TypeBf16 => E::Bf16,
        DataType::TypeString => E::Bytes,
        DataType::TypeInvalid => return Err("data_type is missing or unknown".into()),
    })
}

/// The model's dimensions as its configuration narrows them: each configured dimension must
/// be one the model takes (`-1`, or the model's own size where it fixes one), and fixes a
/// dimension the model leaves dynamic.
fn narrow(model: &TensorSpec, dims: &[i64], batched: bool, what: &str) -> Result<Vec<Dim>, String> {
    let full: Vec<i64> =
        if batched { std::iter::once(-1).chain(dims.iter().copied()).collect() } else { dims.to_vec() };
    let shown = |shape: &[Dim]| shape.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
    if full.len() != model.shape.len() {
        return Err(format!(
            "{what} {:?}: dims {dims:?}{} give rank {}, but the model's is [{}]",
            model.name,
            if batched { " after the batch dimension" } else { "" },
            full.len(),
            shown(&model.shape)
        ));
    }
    full.iter()
        .zip(&model.shape)
        .map(|(&configured, declared)| match (configured, declared) {
            (-1, d) => Ok(d.clone()),
            (n, Dim::Dynamic(_)) if n > 0 => Ok(Dim::Fixed(n)),
            (n, Dim::Fixed(m)) if n == *m => Ok(Dim::Fixed(n)),
            _ => {
                Err(format!("{what} {:?}: dims {dims:?} do not fit the model's [{}]", model.name, shown(&model.shape)))
            }
        })
        .collect()
}

/// What a task imported from a model needs beyond the repository.
pub struct ImportOptions<'a> {
    pub slo_ms: u32,
    /// The size to profile the first input at, for a model whose first input has dynamic
    /// dimensions (one sample, no batch dimension).
    pub sample_shape: Option<&'a [i64]>,
}

/// The task that serves `model`, whose file declares `signature`: its stage takes the inputs
/// and gives the outputs as the configuration narrows them.
pub fn to_task(model: &RepositoryModel, signature: &Signature, opts: &ImportOptions) -> Result<Imported, String> {
    let c = &model.config;
    let mut notes = Vec::new();
    let onnx_platform = c.platform.is_empty() || c.platform == "onnxruntime_onnx";
    let onnx_backend = c.backend.is_empty() || c.backend == "onnxruntime";
    if !onnx_platform || !onnx_backend {
        return Err(format!(
            "platform {:?} / backend {:?}: Tidal serves ONNX models with ONNX Runtime (onnxruntime_onnx / onnxruntime)",
            c.platform, c.backend
        ));
    }
    match &c.scheduling_choice {
        Some(SchedulingChoice::SequenceBatching(_)) => {
            return Err("sequence batching (stateful models, requests routed by correlation id) is not served".into())
        }
        Some(SchedulingChoice::EnsembleScheduling(_)) => {
            return Err(
                "an ensemble is not imported; register it as a pipeline from a task file with [stages.connect]".into()
            )
        }
        Some(SchedulingChoice::DynamicBatching(d))
            if !d.preferred_batch_size.is_empty() || d.max_queue_delay_microseconds > 0 =>
        {
            notes.push(format!(
                "dynamic batching (preferred sizes {:?}, queue delay {} µs): Tidal forms each batch by the requests' deadlines, up to the batch size its plan sets",
                d.preferred_batch_size, d.max_queue_delay_microseconds
            ));
        }
        Some(SchedulingChoice::DynamicBatching(_)) => {}
        None => {}
    }
    if c.model_transaction_policy.as_ref().is_some_and(|p| p.decoupled) {
        return Err("a decoupled model (several responses per request) is not served".into());
    }
    if !c.batch_input.is_empty() || !c.batch_output.is_empty() {
        return Err("batch_input / batch_output (ragged batching) are not served".into());
    }
    if c.instance_group.iter().any(|g| g.kind == model_instance_group::Kind::Gpu as i32 || !g.gpus.is_empty()) {
        notes.push("instance group on GPUs: Tidal runs ONNX Runtime on CPU cores".into());
    }
    if c.instance_group.iter().any(|g| g.count > 0) {
        notes.push("instance counts: Tidal's planner sets the workers and their cores".into());
    }
    if c.max_batch_size < 0 {
        return Err(format!("max_batch_size {} is negative", c.max_batch_size));
    }
    let batched = c.max_batch_size > 0;
    if batched && !signature.batched() {
        return Err(format!(
            "max_batch_size {} needs a leading dynamic (batch) dimension on every input and output of the model, which declares {signature}",
            c.max_batch_size
        ));
    }
    if batched {
        notes.push(format!(
            "max_batch_size {}: Tidal's plan sets the batch size (V2 model config reports 64)",
            c.max_batch_size
        ));
    }
    // Inputs: the configuration's, when it gives them, must be the model's, every one.
    let mut inputs = signature.inputs.clone();
    if !c.input.is_empty() {
        for configured in &c.input {
            let Some(spec) = inputs.iter_mut().find(|t| t.name == configured.name) else {
                let names: Vec<&str> = signature.inputs.iter().map(|t| t.name.as_str()).collect();
                return Err(format!("input {:?}: the model has no such input (it takes {names:?})", configured.name));
            };
            if configured.reshape.is_some() || configured.is_shape_tensor || configured.allow_ragged_batch {
                return Err(format!(
                    "input {:?}: reshape, shape tensors and ragged batches are not served",
                    configured.name
                ));
            }
            check_type(spec, configured.data_type, "input")?;
            spec.shape = narrow(spec, &configured.dims, batched, "input")?;
        }
        let missing: Vec<&str> =
            inputs.iter().filter(|t| !c.input.iter().any(|i| i.name == t.name)).map(|t| t.name.as_str()).collect();
        if !missing.is_empty() {
            return Err(format!("the configuration omits the model's inputs {missing:?}"));
        }
    }
    let mut outputs = signature.outputs.clone();
    for configured in &c.output {
        let Some(spec) = outputs.iter_mut().find(|t| t.name == configured.name) else {
            let names: Vec<&str> = signature.outputs.iter().map(|t| t.name.as_str()).collect();
            return Err(format!("output {:?}: the model has no such output (it gives {names:?})", configured.name));
        };
        if configured.reshape.is_some() || configured.is_shape_tensor {
            return Err(format!("output {:?}: reshape and shape tensors are not served", configured.name));
        }
        check_type(spec, configured.data_type, "output")?;
        spec.shape = narrow(spec, &configured.dims, batched, "output")?;
    }
    if !c.output.is_empty() && c.output.len() < outputs.len() {
        notes.push(
            "the configuration lists some of the model's outputs: Tidal serves them all (V2 requests may ask for some)"
                .into(),
        );
    }
    // The size the first input is profiled at: its fixed dimensions, or the one given (as
    // served: a configuration may fix the model's leading dimension, which is then no batch).
    let narrowed = Signature { inputs, outputs };
    let first = &narrowed.inputs[0];
    let sample_dims = if narrowed.batched() { &first.shape[1..] } else { &first.shape[..] };
    let fixed: Option<Vec<i64>> =
        sample_dims.iter().map(|d| if let Dim::Fixed(n) = d { Some(*n) } else { None }).collect();
    let input_shape = match (opts.sample_shape, fixed) {
        (Some(given), _) => given.to_vec(),
        (None, Some(fixed)) => fixed,
        (None, None) => {
            let shown: Vec<String> = sample_dims.iter().map(ToString::to_string).collect();
            return Err(format!(
                "input {:?} has dynamic dimensions [{}]: give the size to profile it at (--sample-shape {}=…)",
                first.name,
                shown.join(", "),
                model.name
            ));
        }
    };
    if !batched && narrowed.batched() {
        notes.push(
            "max_batch_size 0 on a model with a batch dimension: Tidal batches it; requests still give the full shape"
                .into(),
        );
    }
    let accuracy =
        match c.parameters.get(ACCURACY_PARAMETER) {
            Some(p) => p.string_value.trim().parse::<f64>().map_err(|_| {
                format!("parameter {ACCURACY_PARAMETER:?} is {:?}, not a number (percent)", p.string_value)
            })?,
            None => {
                notes.push(format!("no {ACCURACY_PARAMETER:?} parameter: accuracy 0"));
                0.0
            }
        };
    let variant = VariantSpec {
        name: model.name.clone(),
        model_file: model.model_file.clone(),
        accuracy,
        input_shape,
        tensor_names: Default::default(),
        tokenizer_file: String::new(),
        io: None,
        model_sha256: String::new(),
    };
    crate::variant::validate_variant(&variant)?;
    let mut task = crate::task::single_stage(&model.name, opts.slo_ms, vec![variant]);
    narrowed.takes_sample(&task.stages[0].variants[0].input_shape)?;
    task.stages[0].inputs = narrowed.inputs.iter().map(TensorSpec::to_proto).collect();
    task.stages[0].outputs = narrowed.outputs.iter().map(TensorSpec::to_proto).collect();
    crate::task::validate_task(&task)?;
    Ok(Imported { task, notes: model.notes.iter().cloned().chain(notes).collect() })
}

/// A model's task, and what Tidal does otherwise than Triton would with its configuration.
#[derive(Debug, Clone)]
pub struct Imported {
    pub task: TaskSpec,
    pub notes: Vec<String>,
}

fn check_type(spec: &TensorSpec, data_type: i32, what: &str) -> Result<(), String> {
    let configured = element(data_type).map_err(|e| format!("{what} {:?}: {e}", spec.name))?;
    if configured != spec.element {
        return Err(format!(
            "{what} {:?}: the configuration says {}, the model declares {}",
            spec.name,
            configured.v2_name(),
            spec.element.v2_name()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx_graph::{model_bytes, tensor_info};
    use tidal_proto::onnx::{type_proto, GraphProto, ValueInfoProto};

    /// A value info of ONNX element type `elem` (1 FP32, 7 INT64) and `dims` (None: dynamic).
    fn info(name: &str, elem: i32, dims: &[Option<i64>]) -> ValueInfoProto {
        let mut v = tensor_info(name, dims);
        if let Some(type_proto::Value::TensorType(t)) = v.r#type.as_mut().and_then(|t| t.value.as_mut()) {
            t.elem_type = elem;
        }
        v
    }

    /// A model (no nodes) of two batched inputs, `images` FP32 [N, 3, H, W] and `scale` INT64
    /// [N], and two outputs, `boxes` FP32 [N, 4] and `count` INT64 [N].
    fn detector() -> Vec<u8> {
        let graph = GraphProto {
            name: "g".into(),
            input: vec![info("images", 1, &[None, Some(3), None, None]), info("scale", 7, &[None])],
            output: vec![info("boxes", 1, &[None, Some(4)]), info("count", 7, &[None])],
            ..Default::default()
        };
        model_bytes(graph, String::new())
    }

    const DETECTOR_CONFIG: &str = r#"
# As Triton users write them: comments, list syntax, fields Tidal does not act on.
name: "detector"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [
  {
    name: "images"
    data_type: TYPE_FP32
    format: FORMAT_NCHW
    dims: [ 3, -1, -1 ]
  },
  {
    name: "scale"
    data_type: TYPE_INT64
    dims: [ ]
  }
]
output [
  { name: "boxes", data_type: TYPE_FP32, dims: [ 4 ] },
  { name: "count", data_type: TYPE_INT64, dims: [ ] }
]
instance_group [ { count: 2, kind: KIND_CPU } ]
dynamic_batching {
  preferred_batch_size: [ 4, 8 ]
  max_queue_delay_microseconds: 100
  default_queue_policy { timeout_action: REJECT, max_queue_size: 32 }
}
version_policy: { latest: { num_versions: 1 } }
parameters { key: "accuracy" value: { string_value: "41.5" } }
optimization { graph { level: 1 } execution_accelerators { cpu_execution_accelerator [ { name: "openvino" } ] } }
model_warmup [ { name: "zeros", batch_size: 1, inputs { key: "scale" value: { data_type: TYPE_INT64, dims: [ 1 ], zero_data: true } } } ]
"#;

    /// A repository holding the detector at versions 1 and 3, with `config`.
    fn repository(config: Option<&str>) -> tempfile::TempDir {
        let repo = tempfile::tempdir().unwrap();
        for version in ["1", "3"] {
            let dir = repo.path().join("detector").join(version);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("model.onnx"), detector()).unwrap();
        }
        if let Some(config) = config {
            std::fs::write(repo.path().join("detector").join(CONFIG_FILE), config).unwrap();
        }
        repo
    }

    fn import(repo: &Path, sample: Option<&[i64]>) -> Result<Imported, String> {
        let model = read_model(&repo.join("detector"))?;
        let signature = Signature::read(&std::fs::read(repo.join(&model.model_file)).unwrap()).unwrap();
        to_task(&model, &signature, &ImportOptions { slo_ms: 200, sample_shape: sample })
    }

    #[test]
    fn a_triton_configuration_parses_with_the_fields_tidal_does_not_act_on() {
        let c = parse_config(DETECTOR_CONFIG).unwrap();
        assert_eq!((c.name.as_str(), c.max_batch_size, c.input.len(), c.output.len()), ("detector", 8, 2, 2));
        assert_eq!(c.input[0].dims, vec![3, -1, -1]);
        assert_eq!(c.input[1].data_type, DataType::TypeInt64 as i32);
        assert_eq!(c.parameters["accuracy"].string_value, "41.5");
        let Some(SchedulingChoice::DynamicBatching(d)) = &c.scheduling_choice else { panic!("dynamic batching") };
        assert_eq!((d.preferred_batch_size.as_slice(), d.max_queue_delay_microseconds), (&[4, 8][..], 100));
        // A field Triton does not document is refused by name.
        let err = parse_config("name: \"x\"\nmax_batch: 4\n").unwrap_err();
        assert!(err.contains("'max_batch' not found for message 'ModelConfig'"), "{err}");
        assert!(parse_config("input [ { name: \"x\" data_type: TYPE_FLOAT } ]").unwrap_err().contains("TYPE_FLOAT"));
    }

    #[test]
    fn a_model_becomes_a_task_of_its_highest_version_narrowed_by_its_configuration() {
        let repo = repository(Some(DETECTOR_CONFIG));
        let err = import(repo.path(), None).unwrap_err();
        assert!(
            err.contains("dynamic dimensions [3, batch?, batch?]") && err.contains("--sample-shape detector="),
            "{err}"
        );
        let imported = import(repo.path(), Some(&[3, 32, 32])).unwrap();
        let stage = &imported.task.stages[0];
        assert_eq!(stage.variants[0].model_file, "detector/3/model.onnx");
        assert_eq!((stage.variants[0].accuracy, imported.task.slo_ms), (41.5, 200));
        assert_eq!(stage.inputs[0].shape, vec![-1, 3, -1, -1]);
        assert_eq!((stage.inputs[1].name.as_str(), stage.inputs[1].datatype.as_str()), ("scale", "INT64"));
        assert_eq!(stage.outputs.iter().map(|o| o.name.as_str()).collect::<Vec<_>>(), ["boxes", "count"]);
        assert!(imported.notes.iter().any(|n| n.contains("preferred sizes [4, 8]")), "{:?}", imported.notes);

        // A configuration may fix what the model leaves dynamic; then the task holds to it.
        let fixed = DETECTOR_CONFIG.replace("dims: [ 3, -1, -1 ]", "dims: [ 3, 64, 48 ]");
        let repo = repository(Some(&fixed));
        let imported = import(repo.path(), None).unwrap();
        assert_eq!(imported.task.stages[0].inputs[0].shape, vec![-1, 3, 64, 48]);
        assert_eq!(imported.task.stages[0].variants[0].input_shape, vec![3, 64, 48]);

        // max_batch_size 0 with the leading dimension fixed at 1: served whole, not batched.
        let whole = DETECTOR_CONFIG
            .replace("max_batch_size: 8", "max_batch_size: 0")
            .replace("dims: [ 3, -1, -1 ]", "dims: [ 1, 3, 16, 16 ]")
            .replace("TYPE_INT64\n    dims: [ ]", "TYPE_INT64\n    dims: [ 1 ]")
            .replace("TYPE_FP32, dims: [ 4 ]", "TYPE_FP32, dims: [ 1, 4 ]")
            .replace("TYPE_INT64, dims: [ ] }", "TYPE_INT64, dims: [ 1 ] }");
        let imported = import(repository(Some(&whole)).path(), None).unwrap();
        assert_eq!(imported.task.stages[0].inputs[0].shape, vec![1, 3, 16, 16]);
        assert_eq!(imported.task.stages[0].variants[0].input_shape, vec![1, 3, 16, 16]);
        assert!(!imported.notes.iter().any(|n| n.contains("Tidal batches it")), "{:?}", imported.notes);

        // No configuration: the file's signature, Triton's defaults.
        let repo = repository(None);
        let imported = import(repo.path(), Some(&[3, 16, 16])).unwrap();
        assert_eq!(imported.task.stages[0].inputs[0].shape, vec![-1, 3, -1, -1]);
        assert!(imported.notes.iter().any(|n| n.contains("no config.pbtxt")));

        // A specific version.
        let repo = repository(Some(
            &format!("{DETECTOR_CONFIG}\nversion_policy: {{ specific: {{ versions: [1] }} }}")
                .replace("version_policy: { latest: { num_versions: 1 } }\n", ""),
        ));
        assert_eq!(
            import(repo.path(), Some(&[3, 8, 8])).unwrap().task.stages[0].variants[0].model_file,
            "detector/1/model.onnx"
        );
    }

    #[test]
    fn a_configuration_the_model_does_not_fit_or_tidal_cannot_serve_is_refused_with_the_reason() {
        let cases: &[(&str, &str, &str)] = &[
            ("TYPE_INT64\n    dims: [ ]", "TYPE_INT32\n    dims: [ ]", "says INT32, the model declares INT64"),
            ("name: \"scale\"", "name: \"ratio\"", "no such input"),
            ("dims: [ 3, -1, -1 ]", "dims: [ 3, -1 ]", "give rank 3"),
            ("dims: [ 3, -1, -1 ]", "dims: [ 4, -1, -1 ]", "do not fit the model's"),
            (
                "{ name: \"count\", data_type: TYPE_INT64, dims: [ ] }",
                "{ name: \"counts\", data_type: TYPE_INT64, dims: [ ] }",
                "no such output",
            ),
            ("platform: \"onnxruntime_onnx\"", "platform: \"tensorrt_plan\"", "Tidal serves ONNX models"),
            ("name: \"detector\"", "name: \"other\"", "its directory is \"detector\""),
            ("max_batch_size: 8", "max_batch_size: -1", "negative"),
            (
                "version_policy: { latest: { num_versions: 1 } }",
                "version_policy: { specific: { versions: [2] } }",
                "none of the versions",
            ),
            (
                "parameters { key: \"accuracy\" value: { string_value: \"41.5\" } }",
                "parameters { key: \"accuracy\" value: { string_value: \"high\" } }",
                "not a number",
            ),
            (
                "dynamic_batching {",
                "sequence_batching { max_sequence_idle_microseconds: 5 }\nxdynamic_batching {",
                "field 'xdynamic_batching'",
            ),
        ];
        for (from, to, reason) in cases {
            assert!(DETECTOR_CONFIG.contains(from), "{from}");
            let repo = repository(Some(&DETECTOR_CONFIG.replace(from, to)));
            let err = import(repo.path(), Some(&[3, 8, 8])).unwrap_err();
            assert!(err.contains(reason), "{to}: {err}");
        }
        // An input left out of the configuration.
        let start = DETECTOR_CONFIG.find("  {\n    name: \"scale\"").unwrap();
        let end = DETECTOR_CONFIG[start..].find("}\n").unwrap() + start + 2;
        let omitted =
            DETECTOR_CONFIG[..start].trim_end().trim_end_matches(',').to_string() + "\n" + &DETECTOR_CONFIG[end..];
        let err = import(repository(Some(&omitted)).path(), Some(&[3, 8, 8])).unwrap_err();
        assert!(err.contains("omits the model's inputs [\"scale\"]"), "{err}");
        // Sequence batching, by itself.
        let sequence = DETECTOR_CONFIG.replace("dynamic_batching {", "sequence_batching {").replace("  preferred_batch_size: [ 4, 8 ]\n  max_queue_delay_microseconds: 100\n  default_queue_policy { timeout_action: REJECT, max_queue_size: 32 }\n", "");
        assert!(import(repository(Some(&sequence)).path(), Some(&[3, 8, 8]))
            .unwrap_err()
            .contains("sequence batching"));
    }
}
