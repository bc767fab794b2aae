//! A task described in a small TOML file, for `tidalctl task register --file`: its name, SLO
//! and stages, each a list of variants found in a model directory.
//!
//! ```toml
//! name = "video"
//! slo_ms = 800
//!
//! [[stages]]
//! name = "detect"
//! variants = ["yolov5n", "yolov5s"]
//!
//! [[stages]]
//! name = "classify"
//! variants = ["resnet18", "resnet50"]
//! crops = 2        # optional: classify the 2 most confident detections of each frame
//! ```
//!
//! A stage may say which output of the stage before it feeds which of its inputs, by name
//! (otherwise outputs feed the inputs of their own name):
//!
//! ```toml
//! [[stages]]
//! name = "recognise"
//! variants = ["crnn"]
//! [stages.connect]
//! output0 = "images"
//! ```
//!
//! and bound the dynamic dimensions of its inputs (one number per dimension, 0: unbounded):
//!
//! ```toml
//! [stages.bounds]
//! images = [0, 3, 1280, 1280]
//! ```
//!
//! and the least they may be (`[stages.least] input_values = [0, 400]`, as the bounds).
//!
//! Requests whose inputs differ only in a sequence's length may share a batch, each padded to
//! the longest (a model with a mask input tells padding from tokens), and outputs that follow
//! that length be cut back to each request's (axes count the batch dimension; `value` is 0
//! unless given):
//!
//! ```toml
//! [stages.pad]
//! input_ids = { axis = 1 }
//! attention_mask = { axis = 1, value = 0 }
//! [stages.trim]
//! last_hidden_state = 1
//! ```
//!
//! A stage may take text in place of its model's token inputs, tokenized by each variant's
//! tokenizer (its `tokenizer_file`), and give text decoded from its model's outputs (see
//! `common/src/text.rs`):
//!
//! ```toml
//! [stages.tokenize]
//! text = "text"              # the stage's BYTES input; `pair = "context"` for a second text
//! ids = "input_ids"
//! mask = "attention_mask"
//! max_tokens = 512           # longer is refused, or cut with `truncate = true`
//! [[stages.decode]]
//! name = "label"
//! labels = { output = "logits", labels = ["negative", "positive"] }
//! # or: ctc = { output = "logits", vocabulary = ["<pad>", "|", "E", …], blank = 0, word_delimiter = "|" }
//! # or: span = { start = "start_logits", end = "end_logits", max_tokens = 30 }
//! ```
//!
//! A stage may be skipped by requests the stage before labelled so (a translation only for
//! text not already in English); a skipped stage gives its inputs as the outputs `pass` names
//! (input = output):
//!
//! ```toml
//! [stages.skip]
//! when = "language"          # the stage before's label output
//! labels = ["en"]
//! pass = { text = "translation" }
//! ```
//!
//! Some of a stage's variants may have models that take and give other tensors (Speech2Text
//! writes the text wav2vec2 decodes from its scores): a group of them gives its own `bounds`,
//! `least`, `pad`, `trim`, `tokenize`, `decode` and `generate` in place of the stage's. On the
//! wire they take what the stage's other variants take; the stage gives what all give.
//!
//! ```toml
//! [[stages.group]]
//! variants = ["s2t-small", "s2t-medium"]
//! generate = { max_tokens = 48, end_token = 3 }
//! decode = [{ name = "text", tokens = { output = "tokens" } }]
//! ```
//!
//! Optional, its share of a shared cluster: `weight = 2.0`, `min_cores = 1`, `max_cores = 8`,
//! and whether it is unloaded when idle: `min_workers = 0`, `idle_s = 300`
//! (see `TaskShare`).

use std::path::Path;

use serde::Deserialize;
use thiserror::Error;
use tidal_proto::v1::{
    decode, Connection, Connector, Ctc, Decode, Generate, Labels, Padding, Skip, Span, TaskShare, TaskSpec,
    TensorSignature, TextIo, Tokenize, Tokens, Trim, VariantIo,
};

use crate::variant::{VariantConfig, VariantError};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskFile {
    pub name: String,
    pub slo_ms: u32,
    pub stages: Vec<StageFile>,
    pub weight: Option<f64>,
    #[serde(default)]
    pub min_cores: u32,
    #[serde(default)]
    pub max_cores: u32,
    /// 0: unloaded when idle for `idle_s` (see `TaskShare.min_workers`); absent: 1.
    pub min_workers: Option<u32>,
    #[serde(default)]
    pub idle_s: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageFile {
    pub name: String,
    /// Names of `<model dir>/<name>.toml`.
    pub variants: Vec<String>,
    /// Take this many objects the previous stage detected, cut out of the request's image
    /// (see `Connector::Crops`); without it, the previous stage's output as is.
    pub crops: Option<u32>,
    /// Which output of the previous stage feeds which input of this one, by name
    /// (`[stages.connect] output0 = "images"`); without it, outputs feed inputs of their name.
    #[serde(default)]
    pub connect: std::collections::BTreeMap<String, String>,
    /// The most each dimension of an input may be, one number per dimension (0: unbounded;
    /// `[stages.bounds] images = [0, 3, 1280, 1280]`); set once the models' signatures are read
    /// ([`TaskFile::apply_io`]).
    #[serde(default)]
    pub bounds: std::collections::BTreeMap<String, Vec<i64>>,
    /// The least each dimension of an input may be, as `bounds` (`[stages.least]
    /// input_values = [0, 400]`: a recording of at least 400 samples).
    #[serde(default)]
    pub least: std::collections::BTreeMap<String, Vec<i64>>,
    /// Inputs padded so that requests of different lengths share a batch
    /// (`[stages.pad] input_ids = { axis = 1 }`); set with the bounds.
    #[serde(default)]
    pub pad: std::collections::BTreeMap<String, PadFile>,
    /// Outputs cut back to each request's length, by axis (`[stages.trim] hidden = 1`).
    #[serde(default)]
    pub trim: std::collections::BTreeMap<String, u32>,
    /// Text tokenized into the model's token inputs; set with the bounds.
    pub tokenize: Option<TokenizeFile>,
    /// Text outputs decoded from the model's; set with the bounds.
    #[serde(default)]
    pub decode: Vec<DecodeFile>,
    /// The model writes tokens within a budget per request (`[stages.generate] max_tokens =
    /// 32, end_token = 3`).
    pub generate: Option<GenerateFile>,
    /// Variants whose models take and give other tensors than the stage's others, with their
    /// own bounds, padding, trims and text (`[[stages.group]] variants = ["s2t-small"]`).
    #[serde(default)]
    pub group: Vec<GroupFile>,
    /// Requests the stage before labelled so skip this one (`[stages.skip] when = "language",
    /// labels = ["en"], pass = { text = "translation" }`).
    pub skip: Option<SkipFile>,
}

/// Some of a stage's variants, with their own settings of what the stage's carry for the rest.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupFile {
    pub variants: Vec<String>,
    #[serde(default)]
    pub bounds: std::collections::BTreeMap<String, Vec<i64>>,
    #[serde(default)]
    pub least: std::collections::BTreeMap<String, Vec<i64>>,
    #[serde(default)]
    pub pad: std::collections::BTreeMap<String, PadFile>,
    #[serde(default)]
    pub trim: std::collections::BTreeMap<String, u32>,
    pub tokenize: Option<TokenizeFile>,
    #[serde(default)]
    pub decode: Vec<DecodeFile>,
    pub generate: Option<GenerateFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SkipFile {
    /// The stage before's label output that decides.
    pub when: String,
    /// The labels that skip this stage.
    pub labels: Vec<String>,
    /// What a skipped stage gives: input = the output it stands for.
    #[serde(default)]
    pub pass: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateFile {
    #[serde(default = "default_budget")]
    pub budget: String,
    #[serde(default = "default_tokens")]
    pub output: String,
    pub max_tokens: u32,
    pub end_token: u32,
    #[serde(default)]
    pub refuse_unfinished: bool,
    #[serde(default)]
    pub pad_token: u32,
}

/// By default, the generated encoder–decoders' names (`seq2seq`).
fn default_budget() -> String {
    crate::seq2seq::MAX_NEW_TOKENS.to_string()
}

fn default_tokens() -> String {
    crate::seq2seq::TOKENS.to_string()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizeFile {
    pub text: String,
    #[serde(default)]
    pub pair: String,
    pub ids: String,
    #[serde(default)]
    pub mask: String,
    #[serde(default)]
    pub type_ids: String,
    pub max_tokens: u32,
    #[serde(default)]
    pub truncate: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecodeFile {
    pub name: String,
    pub labels: Option<LabelsFile>,
    pub ctc: Option<CtcFile>,
    pub span: Option<SpanFile>,
    pub tokens: Option<TokensFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokensFile {
    pub output: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelsFile {
    pub output: String,
    pub labels: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CtcFile {
    pub output: String,
    pub vocabulary: Vec<String>,
    #[serde(default)]
    pub blank: u32,
    #[serde(default)]
    pub word_delimiter: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpanFile {
    pub start: String,
    pub end: String,
    pub max_tokens: u32,
}

/// The padding, trims and text a file gives a model, as the API carries them.
type AroundModel = (Vec<Padding>, Vec<Trim>, Option<TextIo>);

/// What a file says of a model's tensors and the text around them: a stage's, or a group's of
/// its variants (`[[stages.group]]`).
struct IoSettings<'a> {
    /// The stage's name, for errors.
    name: &'a str,
    bounds: &'a std::collections::BTreeMap<String, Vec<i64>>,
    least: &'a std::collections::BTreeMap<String, Vec<i64>>,
    pad: &'a std::collections::BTreeMap<String, PadFile>,
    trim: &'a std::collections::BTreeMap<String, u32>,
    tokenize: &'a Option<TokenizeFile>,
    decode: &'a [DecodeFile],
    generate: &'a Option<GenerateFile>,
}

impl StageFile {
    fn settings(&self) -> IoSettings<'_> {
        IoSettings {
            name: &self.name,
            bounds: &self.bounds,
            least: &self.least,
            pad: &self.pad,
            trim: &self.trim,
            tokenize: &self.tokenize,
            decode: &self.decode,
            generate: &self.generate,
        }
    }
}

impl GroupFile {
    fn settings<'a>(&'a self, stage: &'a str) -> IoSettings<'a> {
        IoSettings {
            name: stage,
            bounds: &self.bounds,
            least: &self.least,
            pad: &self.pad,
            trim: &self.trim,
            tokenize: &self.tokenize,
            decode: &self.decode,
            generate: &self.generate,
        }
    }
}

impl IoSettings<'_> {
    /// Sets the bounds on a model's `inputs` (as its files declare them); the padding, trims
    /// and text, as the API carries them. An input the model does not take is refused.
    fn apply(&self, inputs: &mut [TensorSignature]) -> Result<AroundModel, TaskFileError> {
        for (input, max) in self.bounds {
            let Some(t) = inputs.iter_mut().find(|t| &t.name == input) else {
                let names: Vec<&str> = inputs.iter().map(|t| t.name.as_str()).collect();
                return Err(TaskFileError::Invalid(format!(
                    "stage {}: bounds for {input:?}, which its models do not take (they take {names:?})",
                    self.name
                )));
            };
            t.max_shape = max.clone();
        }
        for (input, min) in self.least {
            let Some(t) = inputs.iter_mut().find(|t| &t.name == input) else {
                return Err(TaskFileError::Invalid(format!(
                    "stage {}: least sizes for {input:?}, which its models do not take",
                    self.name
                )));
            };
            t.min_shape = min.clone();
        }
        let pad =
            self.pad.iter().map(|(input, p)| Padding { input: input.clone(), axis: p.axis, value: p.value }).collect();
        let trim = self.trim.iter().map(|(output, &axis)| Trim { output: output.clone(), axis }).collect();
        Ok((pad, trim, self.text()?))
    }

    /// The text, as the API carries it.
    fn text(&self) -> Result<Option<TextIo>, TaskFileError> {
        if self.tokenize.is_none() && self.decode.is_empty() && self.generate.is_none() {
            return Ok(None);
        }
        let tokenize = self.tokenize.as_ref().map(|t| Tokenize {
            text: t.text.clone(),
            pair: t.pair.clone(),
            ids: t.ids.clone(),
            mask: t.mask.clone(),
            type_ids: t.type_ids.clone(),
            max_tokens: t.max_tokens,
            truncate: t.truncate,
        });
        let decode = self
            .decode
            .iter()
            .map(|d| {
                let how = match (&d.labels, &d.ctc, &d.span) {
                    (None, None, None) if d.tokens.is_some() => decode::How::Tokens(Tokens {
                        output: d.tokens.as_ref().map(|t| t.output.clone()).unwrap_or_default(),
                    }),
                    _ if d.tokens.is_some() => {
                        return Err(TaskFileError::Invalid(format!(
                            "stage {}: decode {} takes one of labels, ctc, span or tokens",
                            self.name, d.name
                        )))
                    }
                    (Some(l), None, None) => {
                        decode::How::Labels(Labels { output: l.output.clone(), labels: l.labels.clone() })
                    }
                    (None, Some(c), None) => decode::How::Ctc(Ctc {
                        output: c.output.clone(),
                        vocabulary: c.vocabulary.clone(),
                        blank: c.blank,
                        word_delimiter: c.word_delimiter.clone(),
                    }),
                    (None, None, Some(sp)) => decode::How::Span(Span {
                        start: sp.start.clone(),
                        end: sp.end.clone(),
                        max_tokens: sp.max_tokens,
                    }),
                    _ => {
                        return Err(TaskFileError::Invalid(format!(
                            "stage {}: decode {} takes one of labels, ctc, span or tokens",
                            self.name, d.name
                        )))
                    }
                };
                Ok(Decode { name: d.name.clone(), how: Some(how) })
            })
            .collect::<Result<_, _>>()?;
        let generate = self.generate.as_ref().map(|g| Generate {
            budget: g.budget.clone(),
            output: g.output.clone(),
            max_tokens: g.max_tokens,
            end_token: g.end_token,
            refuse_unfinished: g.refuse_unfinished,
            pad_token: g.pad_token,
        });
        Ok(Some(TextIo { tokenize, decode, generate }))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PadFile {
    /// The dimension padded, counting the batch dimension.
    pub axis: u32,
    /// What padding is made of (0 by default).
    #[serde(default)]
    pub value: f64,
}

#[derive(Debug, Error)]
pub enum TaskFileError {
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: {source}")]
    Parse { path: String, source: toml::de::Error },
    #[error("stage {stage}: {source}")]
    Variant { stage: String, source: Box<VariantError> },
    #[error("{0}")]
    Invalid(String),
}

impl TaskFile {
    /// Sets the bounds, padding and trims the file gives on the inputs and outputs of
    /// `task`'s stages, whose signatures have been read; an input the stage does not take is
    /// refused.
    pub fn apply_io(&self, task: &mut TaskSpec) -> Result<(), TaskFileError> {
        for file in &self.stages {
            let Some(stage) = task.stages.iter_mut().find(|s| s.name == file.name) else { continue };
            (stage.pad, stage.trim, stage.text) = file.settings().apply(&mut stage.inputs)?;
            for group in &file.group {
                for v in stage.variants.iter_mut().filter(|v| group.variants.contains(&v.name)) {
                    let io = v.io.get_or_insert_with(Default::default);
                    (io.pad, io.trim, io.text) = group.settings(&file.name).apply(&mut io.inputs)?;
                }
            }
        }
        crate::task::validate_task(task).map_err(TaskFileError::Invalid)
    }

    pub fn load(path: &Path) -> Result<Self, TaskFileError> {
        let shown = path.display().to_string();
        let text =
            std::fs::read_to_string(path).map_err(|source| TaskFileError::Read { path: shown.clone(), source })?;
        toml::from_str(&text).map_err(|source| TaskFileError::Parse { path: shown, source })
    }

    /// The task, its variants read from `model_dir`, checked as the controller will.
    pub fn to_spec(&self, model_dir: &Path) -> Result<TaskSpec, TaskFileError> {
        let stages = self
            .stages
            .iter()
            .map(|s| {
                let variants = s
                    .variants
                    .iter()
                    .map(|v| VariantConfig::load(model_dir, v).map(|c| c.spec()))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|source| TaskFileError::Variant { stage: s.name.clone(), source: Box::new(source) })?;
                let mut variants = variants;
                let mut grouped = std::collections::HashSet::new();
                for group in &s.group {
                    for name in &group.variants {
                        if !s.variants.contains(name) {
                            return Err(TaskFileError::Invalid(format!(
                                "stage {}: its group names {name:?}, which is not one of its variants",
                                s.name
                            )));
                        }
                        if !grouped.insert(name.as_str()) {
                            return Err(TaskFileError::Invalid(format!(
                                "stage {}: variant {name:?} is in two groups",
                                s.name
                            )));
                        }
                    }
                }
                // A grouped variant's model has tensors of its own, read with the stage's.
                for v in variants.iter_mut().filter(|v| grouped.contains(v.name.as_str())) {
                    v.io = Some(VariantIo::default());
                }
                let mut stage = crate::task::stage(&s.name, variants);
                if let Some(crops) = s.crops {
                    stage.connector = Connector::Crops as i32;
                    stage.crops = crops;
                }
                stage.connect = s
                    .connect
                    .iter()
                    .map(|(output, input)| Connection { output: output.clone(), input: input.clone() })
                    .collect();
                stage.skip = s.skip.as_ref().map(|k| Skip {
                    when: k.when.clone(),
                    labels: k.labels.clone(),
                    pass: k
                        .pass
                        .iter()
                        .map(|(input, output)| Connection { output: output.clone(), input: input.clone() })
                        .collect(),
                });
                Ok(stage)
            })
            .collect::<Result<Vec<_>, TaskFileError>>()?;
        let share = TaskShare {
            weight: self.weight,
            min_cores: self.min_cores,
            max_cores: self.max_cores,
            min_workers: self.min_workers,
            idle_s: self.idle_s,
        };
        let share = (share != TaskShare::default()).then_some(share);
        let task = TaskSpec { name: self.name.clone(), slo_ms: self.slo_ms, stages, share, ..Default::default() };
        crate::task::validate_task(&task).map_err(TaskFileError::Invalid)?;
        Ok(task)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An ONNX model (with no nodes) whose input is a batch of samples of `shape` ("[c, h, w]"),
    /// with one output.
    fn declaring(shape: &str) -> Vec<u8> {
        let dims: Vec<Option<i64>> = std::iter::once(None)
            .chain(shape.trim_matches(['[', ']']).split(',').map(|d| d.trim().parse().ok()))
            .collect();
        let graph = tidal_proto::onnx::GraphProto {
            name: "g".into(),
            input: vec![crate::onnx_graph::tensor_info("x", &dims)],
            output: vec![crate::onnx_graph::tensor_info("y", &[None, Some(1)])],
            ..Default::default()
        };
        crate::onnx_graph::model_bytes(graph, String::new())
    }

    /// A model directory of two variants: `det` ([3, 64, 64]) and `cls` ([3, 32, 32]).
    fn detector_and_classifier() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, shape) in [("det", "[3, 64, 64]"), ("cls", "[3, 32, 32]")] {
            let toml =
                format!("name = \"{name}\"\nmodel_file = \"{name}.onnx\"\naccuracy = 50.0\ninput_shape = {shape}\n");
            std::fs::write(dir.path().join(format!("{name}.toml")), toml).unwrap();
            std::fs::write(dir.path().join(format!("{name}.onnx")), declaring(shape)).unwrap();
        }
        dir
    }

    #[test]
    fn a_group_names_some_of_its_stage_s_variants_once_each() {
        let dir = detector_and_classifier();
        let file = dir.path().join("t.toml");
        let with_group = |variants: &str, group: &str| {
            format!("name = \"t\"\nslo_ms = 500\n[[stages]]\nname = \"s\"\nvariants = {variants}\n[[stages.group]]\nvariants = {group}\n")
        };
        let spec = |text: String| {
            std::fs::write(&file, text).unwrap();
            TaskFile::load(&file).unwrap().to_spec(dir.path())
        };
        let err = spec(with_group("[\"det\"]", "[\"nope\"]")).unwrap_err().to_string();
        assert!(err.contains("its group names \"nope\", which is not one of its variants"), "{err}");
        let err = spec(with_group("[\"det\"]", "[\"det\"]")).unwrap_err().to_string();
        assert!(err.contains("the stage's own settings must serve at least one"), "{err}");
        let text = with_group("[\"det\", \"cls\"]", "[\"cls\"]") + "[[stages.group]]\nvariants = [\"cls\"]\n";
        let err = spec(text).unwrap_err().to_string();
        assert!(err.contains("variant \"cls\" is in two groups"), "{err}");
    }

    #[test]
    fn a_pipeline_file_reads_its_variants_from_the_model_directory() {
        let dir = detector_and_classifier();
        let file = dir.path().join("video.toml");
        let text = "name = \"video\"\nslo_ms = 500\n[[stages]]\nname = \"detect\"\nvariants = [\"det\"]\n[[stages]]\nname = \"classify\"\nvariants = [\"cls\"]\n";
        std::fs::write(&file, text).unwrap();
        let spec = TaskFile::load(&file).unwrap().to_spec(dir.path()).unwrap();
        assert_eq!(spec.stages.len(), 2);
        assert_eq!(spec.stages[1].variants[0].input_shape, vec![3, 32, 32]);

        std::fs::write(dir.path().join("cls.onnx"), declaring("[3, 64, 64]")).unwrap();
        let err = TaskFile::load(&file).unwrap().to_spec(dir.path()).unwrap_err();
        assert!(err.to_string().contains("the model takes [?, 3, 64, 64]"), "{err}");
        std::fs::write(&file, text.replace("\"cls\"", "\"missing\"")).unwrap();
        let err = TaskFile::load(&file).unwrap().to_spec(dir.path()).unwrap_err();
        assert!(err.to_string().starts_with("stage classify"), "{err}");
        std::fs::write(&file, text.replace("slo_ms = 500", "slo_ms = 0")).unwrap();
        assert!(TaskFile::load(&file).unwrap().to_spec(dir.path()).is_err());
        std::fs::write(&file, format!("{text}colour = 1\n")).unwrap();
        assert!(matches!(TaskFile::load(&file), Err(TaskFileError::Parse { .. })));
    }

    #[test]
    fn connections_and_bounds_are_read_and_checked_against_the_signatures() {
        let dir = detector_and_classifier();
        let text = "name = \"video\"\nslo_ms = 500\n[[stages]]\nname = \"detect\"\nvariants = [\"det\"]\n[stages.bounds]\nx = [0, 3, 64, 64]\n[[stages]]\nname = \"classify\"\nvariants = [\"cls\"]\n[stages.connect]\nboxes = \"x\"\n";
        let file: TaskFile = toml::from_str(text).unwrap();
        let mut task = file.to_spec(dir.path()).unwrap();
        assert_eq!(
            (task.stages[1].connect[0].output.as_str(), task.stages[1].connect[0].input.as_str()),
            ("boxes", "x")
        );
        // As `tidalctl task register` reads them from the files.
        let sig = |name: &str, shape: &[i64]| tidal_proto::v1::TensorSignature {
            name: name.into(),
            datatype: "FP32".into(),
            shape: shape.to_vec(),
            max_shape: vec![],
            min_shape: vec![],
        };
        task.stages[0].inputs = vec![sig("x", &[-1, 3, -1, -1])];
        task.stages[0].outputs = vec![sig("boxes", &[-1, 4])];
        task.stages[1].inputs = vec![sig("x", &[-1, 3, 32, 32])];
        task.stages[1].outputs = vec![sig("logits", &[-1, 10])];
        file.apply_io(&mut task).unwrap();
        assert_eq!(task.stages[0].inputs[0].max_shape, vec![0, 3, 64, 64]);
        // A connection from an output the stage before does not give.
        let mut wrong = task.clone();
        wrong.stages[1].connect[0].output = "scores".into();
        assert!(crate::task::validate_task(&wrong).unwrap_err().contains("no output \"scores\""));
        // Bounds on an input the models do not take.
        let other: TaskFile = toml::from_str(&text.replace("x = [0, 3, 64, 64]", "y = [0, 3]")).unwrap();
        assert!(other.apply_io(&mut task.clone()).unwrap_err().to_string().contains("do not take"));
        // The first stage connects to nothing.
        let first: TaskFile =
            toml::from_str(&text.replace("[stages.bounds]\nx = [0, 3, 64, 64]", "[stages.connect]\na = \"x\""))
                .unwrap();
        assert!(first.to_spec(dir.path()).unwrap_err().to_string().contains("connects to nothing"));
    }

    #[test]
    fn padding_and_trims_are_read_and_checked_against_the_signatures() {
        let dir = detector_and_classifier();
        let text = "name = \"d\"\nslo_ms = 500\n[[stages]]\nname = \"detect\"\nvariants = [\"det\"]\n[stages.pad]\nx = { axis = 3, value = -1.5 }\n[stages.trim]\nboxes = 1\n";
        let file: TaskFile = toml::from_str(text).unwrap();
        let mut task = file.to_spec(dir.path()).unwrap();
        let sig = |name: &str, shape: &[i64]| tidal_proto::v1::TensorSignature {
            name: name.into(),
            datatype: "FP32".into(),
            shape: shape.to_vec(),
            max_shape: vec![],
            min_shape: vec![],
        };
        task.stages[0].inputs = vec![sig("x", &[-1, 3, -1, -1])];
        task.stages[0].outputs = vec![sig("boxes", &[-1, -1, 4])];
        file.apply_io(&mut task).unwrap();
        assert_eq!((task.stages[0].pad[0].axis, task.stages[0].pad[0].value), (3, -1.5));
        assert_eq!((task.stages[0].trim[0].output.as_str(), task.stages[0].trim[0].axis), ("boxes", 1));
        // Along a fixed dimension: refused.
        let fixed: TaskFile = toml::from_str(&text.replace("axis = 3", "axis = 1")).unwrap();
        assert!(fixed.apply_io(&mut task.clone()).unwrap_err().to_string().contains("axis 1"));
        assert!(toml::from_str::<TaskFile>(&text.replace("value = -1.5", "fill = 0")).is_err());
    }
}
