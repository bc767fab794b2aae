//! Text around a stage's model (`StageSpec.text`): what a stage takes and gives on the wire when
//! requests carry text, how a variant's tokenizer turns a request's text into the model's token
//! inputs, and how the model's outputs of one request become text (a label, a CTC
//! transcription, an answer span). One request at a time, in the agent, before its tensors
//! are queued and after its batch is answered; the batching, padding and profiles see tokens.
//!
//! Tokenizers are Hugging Face `tokenizer.json` files, so a model's own tokenizer serves as
//! it is; [`wordpiece_json`] writes one for the generated models (no hub is reachable here).

use std::path::Path;

use thiserror::Error;
use tidal_proto::v1::{decode, Generate, StageSpec, TextIo, Tokenize};
use tokenizers::{Encoding, PostProcessor, Tokenizer, TruncationParams, TruncationStrategy};

use crate::onnx_signature::ElementType;
use crate::tensor::{Declared, NamedTensor, StageIo};

/// Most bytes of one text a request may carry (tokenizing it is the agent's work).
pub const MAX_TEXT_BYTES: usize = 256 << 10;
/// Most tokens a stage may declare.
pub const MAX_TOKENS: u32 = 1 << 16;
/// Most labels or CTC vocabulary entries a stage may declare.
const MAX_LABELS: usize = 1 << 20;
/// Most tokens of an answer span (its search is tokens × this).
pub const MAX_SPAN_TOKENS: u32 = 512;
/// Without truncation, a text of more bytes than this many per allowed token is refused before
/// it is tokenized (no tokenizer makes a token of fewer than a byte; 64 leaves room for any).
const BYTES_PER_TOKEN: usize = 64;
/// The most tokens a generating stage may write per request.
pub const MAX_GENERATED: u32 = 4096;

#[derive(Debug, Error, PartialEq)]
pub enum TextError {
    /// The request's fault: INVALID_ARGUMENT.
    #[error("{0}")]
    Input(String),
    /// The model's or the tokenizer's: INTERNAL.
    #[error("{0}")]
    Model(String),
    /// The request's time ran out before its text ended, and the task refuses unfinished
    /// texts: DEADLINE_EXCEEDED.
    #[error("{0}")]
    Unfinished(String),
}

fn names(t: &Tokenize) -> [&str; 3] {
    [t.ids.as_str(), t.mask.as_str(), t.type_ids.as_str()]
}

/// What `stage` takes and gives on the wire: its model's tensors, with its text inputs (BYTES,
/// one text per sample) in place of the token inputs they are tokenized into, and its decoded
/// text outputs after the model's own. A stage without `text` takes and gives its model's.
/// Where some variants have tensors of their own (`VariantSpec.io`), every variant must take
/// the same inputs on the wire, and the stage gives the outputs all of them give.
pub fn wire_io(stage: &StageSpec) -> Result<StageIo, String> {
    let mut io = served_wire_io(stage)?;
    let takes = |io: &StageIo| -> Vec<String> {
        io.inputs
            .iter()
            .map(|d| format!("{} {} of {} dimensions", d.name, d.element.v2_name(), d.shape.len()))
            .collect()
    };
    for v in stage.variants.iter().filter(|v| v.io.is_some()) {
        let other =
            served_wire_io(&crate::task::as_served(stage, v)).map_err(|e| format!("variant {}: {e}", v.name))?;
        if takes(&other) != takes(&io) || other.batched != io.batched {
            return Err(format!(
                "variant {} takes {:?}{} on the wire where the stage's other variants take {:?}{}",
                v.name,
                takes(&other),
                if other.batched { " in batches" } else { "" },
                takes(&io),
                if io.batched { " in batches" } else { "" },
            ));
        }
        io.outputs.retain(|o| other.outputs.iter().any(|p| p.name == o.name && p.element == o.element));
    }
    Ok(io)
}

/// What `stage` takes and gives on the wire as its own settings serve it (see [`wire_io`]).
fn served_wire_io(stage: &StageSpec) -> Result<StageIo, String> {
    let model = StageIo::of(stage)?;
    let Some(text) = &stage.text else { return Ok(model) };
    check(stage, text, &model)?;
    let one_text = |name: &str| Declared {
        name: name.to_string(),
        element: ElementType::Bytes,
        shape: if model.batched { vec![-1, 1] } else { vec![1] },
        max_shape: vec![],
        min_shape: vec![],
    };
    let mut inputs = Vec::new();
    // The budget of tokens to write is the worker's to give, not the request's.
    let budget = text.generate.as_ref().map(|g| g.budget.as_str());
    let on_wire = |d: &&Declared| Some(d.name.as_str()) != budget;
    if let Some(t) = &text.tokenize {
        inputs.push(one_text(&t.text));
        if !t.pair.is_empty() {
            inputs.push(one_text(&t.pair));
        }
        inputs.extend(model.inputs.iter().filter(|d| !names(t).contains(&d.name.as_str())).filter(on_wire).cloned());
    } else {
        inputs = model.inputs.iter().filter(on_wire).cloned().collect();
    }
    let mut outputs = model.outputs.clone();
    outputs.extend(text.decode.iter().map(|d| one_text(&d.name)));
    Ok(StageIo { inputs, outputs, batched: model.batched, positional: false, pad: Vec::new(), trim: Vec::new() })
}

/// What a task takes on the wire: its first stage's inputs, then the inputs of later stages
/// that no earlier stage feeds (a question asked of the text the first stage wrote). A later
/// stage's input is fed when a connection names it, when the stage before gives an output of
/// its name, or when it is the stage's only input (which takes the one output it is given).
pub fn task_io(stages: &[StageSpec]) -> Result<StageIo, String> {
    let first = stages.first().ok_or("a task has at least one stage")?;
    let mut io = wire_io(first)?;
    let mut prev_outputs = io.outputs.clone();
    for stage in &stages[1..] {
        let stage_io = wire_io(stage)?;
        for d in &stage_io.inputs {
            let fed = stage.connect.iter().any(|c| c.input == d.name)
                || prev_outputs.iter().any(|o| o.name == d.name)
                || stage_io.inputs.len() == 1
                || stage_io.positional;
            if !fed && !io.inputs.iter().any(|i| i.name == d.name) {
                io.inputs.push(d.clone());
            }
        }
        prev_outputs = stage_io.outputs;
    }
    io.outputs = prev_outputs;
    Ok(io)
}

/// Checks a stage's `text` against its model's tensors, each failure named.
fn check(stage: &StageSpec, text: &TextIo, model: &StageIo) -> Result<(), String> {
    if model.positional {
        return Err("a stage with text needs its model's signature (register it with tidalctl)".into());
    }
    let input = |name: &str| model.inputs.iter().find(|d| d.name == name);
    let output = |name: &str| model.outputs.iter().find(|d| d.name == name);
    let mut wire_inputs: Vec<&str> = model.inputs.iter().map(|d| d.name.as_str()).collect();
    if let Some(t) = &text.tokenize {
        if t.ids.is_empty() || t.text.is_empty() {
            return Err("text.tokenize names the text input and the model's token ids input".into());
        }
        for name in names(t).into_iter().filter(|n| !n.is_empty()) {
            let d = input(name).ok_or_else(|| format!("text.tokenize: the model has no input {name:?}"))?;
            if d.element != ElementType::Int64 || model.sample_shape(d) != [-1] {
                return Err(format!(
                    "text.tokenize: input {name:?} is {} {:?}; token inputs are INT64 with one dynamic dimension \
                     per sample",
                    d.element.v2_name(),
                    d.shape
                ));
            }
        }
        wire_inputs.retain(|n| !names(t).contains(n));
        for name in [&t.text, &t.pair].into_iter().filter(|n| !n.is_empty()) {
            if wire_inputs.contains(&name.as_str()) {
                return Err(format!("text.tokenize: text input {name:?} is also another input's name"));
            }
            wire_inputs.push(name);
        }
        if !(1..=MAX_TOKENS).contains(&t.max_tokens) {
            return Err(format!("text.tokenize.max_tokens is {}; give 1..={MAX_TOKENS}", t.max_tokens));
        }
        if let Some(v) = stage.variants.iter().find(|v| v.tokenizer_file.is_empty()) {
            return Err(format!("variant {} has no tokenizer_file, which a stage that tokenizes needs", v.name));
        }
    }
    if let Some(g) = &text.generate {
        let budget = input(&g.budget).ok_or_else(|| format!("text.generate: the model has no input {:?}", g.budget))?;
        if budget.element != ElementType::Int64 || !model.batched || !model.sample_shape(budget).is_empty() {
            return Err(format!(
                "text.generate: budget input {:?} is {} {:?}; it takes INT64 [batch], one number per sample",
                g.budget,
                budget.element.v2_name(),
                budget.shape
            ));
        }
        if wire_inputs.iter().filter(|n| **n != g.budget).count() == 0 {
            return Err("text.generate: the model takes nothing but its budget".into());
        }
        let tokens =
            output(&g.output).ok_or_else(|| format!("text.generate: the model has no output {:?}", g.output))?;
        if tokens.element != ElementType::Int64 || model.sample_shape(tokens).len() != 1 {
            return Err(format!(
                "text.generate: output {:?} is {} {:?}; tokens written are INT64 [batch, steps]",
                g.output,
                tokens.element.v2_name(),
                tokens.shape
            ));
        }
        if !(1..=MAX_GENERATED).contains(&g.max_tokens) {
            return Err(format!("text.generate.max_tokens is {}; give 1..={MAX_GENERATED}", g.max_tokens));
        }
    }
    let mut wire_outputs: Vec<&str> = model.outputs.iter().map(|d| d.name.as_str()).collect();
    for d in &text.decode {
        if d.name.is_empty() || wire_outputs.contains(&d.name.as_str()) {
            return Err(format!("text.decode: output name {:?} is empty or taken", d.name));
        }
        wire_outputs.push(&d.name);
        let fp32 = |name: &str, dims: usize| -> Result<Vec<i64>, String> {
            let o = output(name).ok_or_else(|| format!("text.decode {}: the model has no output {name:?}", d.name))?;
            let sample = model.sample_shape(o);
            if o.element != ElementType::Fp32 || sample.len() != dims {
                return Err(format!(
                    "text.decode {}: output {name:?} is {} {:?}; it takes FP32 of {dims} dimension(s) per sample",
                    d.name,
                    o.element.v2_name(),
                    o.shape
                ));
            }
            Ok(sample.to_vec())
        };
        match &d.how {
            Some(decode::How::Labels(l)) => {
                let shape = fp32(&l.output, 1)?;
                if l.labels.is_empty()
                    || l.labels.len() > MAX_LABELS
                    || (shape[0] >= 0 && shape[0] as usize != l.labels.len())
                {
                    return Err(format!(
                        "text.decode {}: {} labels for output {:?} of {:?} scores",
                        d.name,
                        l.labels.len(),
                        l.output,
                        shape
                    ));
                }
            }
            Some(decode::How::Ctc(c)) => {
                let shape = fp32(&c.output, 2)?;
                let v = c.vocabulary.len();
                if v == 0 || v > MAX_LABELS || (shape[1] >= 0 && shape[1] as usize != v) || c.blank as usize >= v {
                    return Err(format!(
                        "text.decode {}: a vocabulary of {v} (blank {}) for output {:?} of {:?}",
                        d.name, c.blank, c.output, shape
                    ));
                }
            }
            Some(decode::How::Span(s)) => {
                fp32(&s.start, 1)?;
                fp32(&s.end, 1)?;
                if text.tokenize.is_none() || s.max_tokens == 0 || s.max_tokens > MAX_SPAN_TOKENS {
                    return Err(format!(
                        "text.decode {}: a span needs the stage to tokenize its text, and max_tokens 1..={MAX_SPAN_TOKENS}",
                        d.name
                    ));
                }
                // Scores of a padded batch are as long as its longest text: each request's
                // must be cut back to its own tokens.
                let trimmed = |o: &str| stage.trim.iter().any(|t| t.output == o && t.axis == 1);
                let both_trimmed = trimmed(&s.start) && trimmed(&s.end);
                if !stage.pad.is_empty() && !both_trimmed {
                    return Err(format!(
                        "text.decode {}: the stage pads its tokens, so {:?} and {:?} need [stages.trim] on axis 1",
                        d.name, s.start, s.end
                    ));
                }
            }
            Some(decode::How::Tokens(t)) => {
                let o = output(&t.output)
                    .ok_or_else(|| format!("text.decode {}: the model has no output {:?}", d.name, t.output))?;
                if o.element != ElementType::Int64 || model.sample_shape(o).len() != 1 {
                    return Err(format!(
                        "text.decode {}: output {:?} is {} {:?}; tokens are INT64 of one dimension per sample",
                        d.name,
                        t.output,
                        o.element.v2_name(),
                        o.shape
                    ));
                }
                if let Some(v) = stage.variants.iter().find(|v| v.tokenizer_file.is_empty()) {
                    return Err(format!("variant {} has no tokenizer_file, which decoding {} needs", v.name, d.name));
                }
            }
            None => return Err(format!("text.decode {}: say how (labels, ctc, span or tokens)", d.name)),
        }
    }
    Ok(())
}

/// A variant's tokenizer, ready for a stage's requests.
pub struct TextEncoder {
    tokenizer: Tokenizer,
    spec: Tokenize,
}

/// One request's tokenized text, kept for decoding its answer.
pub struct Encoded {
    encoding: Encoding,
    /// The texts, as the encoding's offsets index them: the text, and the pair's if any.
    texts: Vec<String>,
}

impl TextEncoder {
    /// Reads `file`, a Hugging Face tokenizer.json, for a stage that tokenizes as `spec` says.
    pub fn load(file: &Path, spec: &Tokenize) -> Result<Self, String> {
        let mut tokenizer = Tokenizer::from_file(file).map_err(|e| format!("tokenizer {}: {e}", file.display()))?;
        Self::ready(&mut tokenizer, spec)?;
        Ok(Self { tokenizer, spec: spec.clone() })
    }

    fn ready(tokenizer: &mut Tokenizer, spec: &Tokenize) -> Result<(), String> {
        let special = tokenizer.get_post_processor().map_or(0, |p| p.added_tokens(!spec.pair.is_empty()));
        if spec.max_tokens as usize <= special {
            return Err(format!(
                "max_tokens {} leaves no room for text beside the tokenizer's {special} special tokens",
                spec.max_tokens
            ));
        }
        // Tokenizer files may carry padding and truncation of their own; the stage's hold.
        tokenizer.with_padding(None);
        let truncation = spec.truncate.then(|| TruncationParams {
            max_length: spec.max_tokens as usize,
            // A pair's second text (a passage) gives way first; the question stays whole.
            strategy: if spec.pair.is_empty() {
                TruncationStrategy::LongestFirst
            } else {
                TruncationStrategy::OnlySecond
            },
            ..Default::default()
        });
        tokenizer.with_truncation(truncation).map_err(|e| format!("truncation: {e}"))?;
        Ok(())
    }

    /// The model's inputs for one request's wire inputs (one sample each): the text inputs
    /// tokenized, the others as they are.
    pub fn encode(&self, _batched: bool, inputs: Vec<NamedTensor>) -> Result<(Vec<NamedTensor>, Encoded), TextError> {
        let spec = &self.spec;
        let mut texts = Vec::new();
        let mut rest = Vec::with_capacity(inputs.len());
        let mut taken: Vec<(usize, NamedTensor)> = Vec::new();
        for t in inputs {
            if t.name == spec.text {
                taken.push((0, t));
            } else if !spec.pair.is_empty() && t.name == spec.pair {
                taken.push((1, t));
            } else {
                rest.push(t);
            }
        }
        taken.sort_by_key(|(i, _)| *i);
        for (_, t) in &taken {
            let text = one_text(t)?;
            // Too long to fit whatever it tokenizes into: refused before the work.
            if !spec.truncate && text.len() > spec.max_tokens as usize * BYTES_PER_TOKEN {
                return Err(TextError::Input(format!(
                    "input {:?} is {} bytes of text, more than {} tokens can be",
                    t.name,
                    text.len(),
                    spec.max_tokens
                )));
            }
            texts.push(text);
        }
        let want = if spec.pair.is_empty() { 1 } else { 2 };
        if texts.len() != want {
            let named =
                if spec.pair.is_empty() { spec.text.clone() } else { format!("{} and {}", spec.text, spec.pair) };
            return Err(TextError::Input(format!("the request lacks its text input ({named})")));
        }
        let encoding = if let [text, pair] = &texts[..] {
            self.tokenizer.encode((text.as_str(), pair.as_str()), true)
        } else {
            self.tokenizer.encode(texts[0].as_str(), true)
        }
        // With truncation, a tokenizer fails only when the text that must stay whole (a
        // question) does not fit: the request's fault.
        .map_err(|e| {
            if spec.truncate {
                TextError::Input(format!("the text does not fit in {} tokens: {e}", spec.max_tokens))
            } else {
                TextError::Model(format!("tokenizing: {e}"))
            }
        })?;
        let n = encoding.len();
        if n > spec.max_tokens as usize {
            return Err(TextError::Input(format!(
                "the text makes {n} tokens; the model takes at most {} (or register the stage with truncate)",
                spec.max_tokens
            )));
        }
        // One sample: the batch dimension is the worker's to add.
        let shape = vec![n as i64];
        let tensor = |name: &str, values: &[u32]| NamedTensor {
            name: name.to_string(),
            element: ElementType::Int64,
            shape: shape.clone(),
            data: values.iter().flat_map(|&v| i64::from(v).to_le_bytes()).collect(),
        };
        rest.push(tensor(&spec.ids, encoding.get_ids()));
        if !spec.mask.is_empty() {
            rest.push(tensor(&spec.mask, encoding.get_attention_mask()));
        }
        if !spec.type_ids.is_empty() {
            rest.push(tensor(&spec.type_ids, encoding.get_type_ids()));
        }
        Ok((rest, Encoded { encoding, texts }))
    }
}

/// A worker's text around its model: its stage's `text`, and its variant's tokenizer when the
/// stage tokenizes (or why it could not be read, said to every request it would have served).
pub struct StageText {
    pub spec: TextIo,
    encoder: Option<Result<TextEncoder, String>>,
    /// For decoding written tokens when the stage does not tokenize (speech in, text out).
    decoder: Option<Result<Tokenizer, String>>,
}

impl std::fmt::Debug for StageText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StageText")
            .field("spec", &self.spec)
            .field("tokenizer", &self.encoder.as_ref().map(|e| e.as_ref().map(|_| "loaded")))
            .finish()
    }
}

impl StageText {
    /// For a worker of a variant whose tokenizer (when the stage tokenizes) is at `tokenizer`.
    pub fn load(spec: &TextIo, tokenizer: Option<&Path>) -> Self {
        let encoder = spec.tokenize.as_ref().map(|t| match tokenizer {
            Some(file) => TextEncoder::load(file, t),
            None => Err("the variant names no tokenizer_file".to_string()),
        });
        let decodes_tokens = spec.decode.iter().any(|d| matches!(d.how, Some(decode::How::Tokens(_))));
        let decoder = (decodes_tokens && encoder.is_none()).then(|| match tokenizer {
            Some(file) => Tokenizer::from_file(file).map_err(|e| format!("tokenizer {}: {e}", file.display())),
            None => Err("the variant names no tokenizer_file".to_string()),
        });
        Self { spec: spec.clone(), encoder, decoder }
    }

    /// Whether its tokenizer failed to load, and why.
    pub fn load_error(&self) -> Option<&str> {
        let encoder = self.encoder.as_ref().and_then(|e| e.as_ref().err());
        let decoder = self.decoder.as_ref().and_then(|d| d.as_ref().err());
        encoder.or(decoder).map(String::as_str)
    }

    /// The tokenizer that decodes written tokens, or why there is none.
    fn tokenizer(&self) -> Result<&Tokenizer, TextError> {
        match (&self.encoder, &self.decoder) {
            (Some(Ok(e)), _) => Ok(&e.tokenizer),
            (_, Some(Ok(t))) => Ok(t),
            (Some(Err(why)), _) | (_, Some(Err(why))) => Err(TextError::Model(why.clone())),
            (None, None) => Err(TextError::Model("the stage has no tokenizer to decode tokens with".into())),
        }
    }

    /// The model's inputs for one request's wire inputs (unchanged where nothing is tokenized).
    pub fn encode(
        &self,
        batched: bool,
        inputs: Vec<NamedTensor>,
    ) -> Result<(Vec<NamedTensor>, Option<Encoded>), TextError> {
        let (mut tensors, encoded) = match &self.encoder {
            None => (inputs, None),
            Some(Err(why)) => return Err(TextError::Model(why.clone())),
            Some(Ok(e)) => e.encode(batched, inputs).map(|(t, enc)| (t, Some(enc)))?,
        };
        // The most it may write; the worker lowers it to what the request's time affords.
        if let Some(g) = &self.spec.generate {
            tensors.retain(|t| t.name != g.budget);
            tensors.push(NamedTensor {
                name: g.budget.clone(),
                element: ElementType::Int64,
                shape: vec![],
                data: i64::from(g.max_tokens).to_le_bytes().to_vec(),
            });
        }
        Ok((tensors, encoded))
    }

    /// Adds the stage's text outputs to one request's model outputs.
    pub fn decode(
        &self,
        batched: bool,
        encoded: Option<&Encoded>,
        outputs: &mut Vec<NamedTensor>,
    ) -> Result<(), TextError> {
        let tokenizer = self.tokenizer().ok();
        if let Some(g) = &self.spec.generate {
            check_finished(g, outputs)?;
        }
        decode_outputs(&self.spec, batched, encoded, tokenizer, outputs)
    }
}

/// A BYTES input of one UTF-8 text, bounded.
fn one_text(t: &NamedTensor) -> Result<String, TextError> {
    let items = t.string_values().ok_or_else(|| TextError::Input(format!("input {:?} is not BYTES", t.name)))?;
    let [item] = items[..] else {
        return Err(TextError::Input(format!("input {:?} holds {} texts; give one per sample", t.name, items.len())));
    };
    if item.len() > MAX_TEXT_BYTES {
        return Err(TextError::Input(format!(
            "input {:?} is {} bytes of text; at most {MAX_TEXT_BYTES} are taken",
            t.name,
            item.len()
        )));
    }
    let text = std::str::from_utf8(item)
        .map_err(|e| TextError::Input(format!("input {:?} is not UTF-8 text: {e}", t.name)))?;
    // An empty text is a text (a silent recording's transcript): the model sees its special
    // tokens alone.
    Ok(text.to_string())
}

/// Adds the stage's text outputs to one request's model outputs.
pub fn decode_outputs(
    text: &TextIo,
    batched: bool,
    encoded: Option<&Encoded>,
    tokenizer: Option<&Tokenizer>,
    outputs: &mut Vec<NamedTensor>,
) -> Result<(), TextError> {
    let mut made = Vec::with_capacity(text.decode.len());
    for d in &text.decode {
        let values = |name: &str| -> Result<(Vec<f32>, Vec<i64>), TextError> {
            let t = outputs
                .iter()
                .find(|t| t.name == name)
                .ok_or_else(|| TextError::Model(format!("the model gave no output {name:?}")))?;
            let values = t.f32_values().ok_or_else(|| TextError::Model(format!("output {name:?} is not FP32")))?;
            // One sample's output, with its batch dimension of 1 when the model takes batches.
            let shape = if batched && t.shape.first() == Some(&1) { t.shape[1..].to_vec() } else { t.shape.clone() };
            Ok((values, shape))
        };
        let decoded = match &d.how {
            Some(decode::How::Labels(l)) => {
                let (scores, _) = values(&l.output)?;
                let best =
                    argmax(&scores).ok_or_else(|| TextError::Model(format!("output {:?} is empty", l.output)))?;
                l.labels
                    .get(best)
                    .cloned()
                    .ok_or_else(|| TextError::Model(format!("score {best} of {:?} has no label", l.output)))?
            }
            Some(decode::How::Ctc(c)) => {
                let (scores, shape) = values(&c.output)?;
                let v = c.vocabulary.len();
                if shape.len() != 2 || shape[1] as usize != v {
                    return Err(TextError::Model(format!(
                        "output {:?} of shape {shape:?} is not [frames, {v}]",
                        c.output
                    )));
                }
                ctc_best_path(&scores, &c.vocabulary, c.blank as usize, &c.word_delimiter)
            }
            Some(decode::How::Span(s)) => {
                let encoded = encoded.ok_or_else(|| TextError::Model("a span of a text not tokenized here".into()))?;
                let (start, _) = values(&s.start)?;
                let (end, _) = values(&s.end)?;
                answer_span(encoded, &start, &end, s.max_tokens as usize)?
            }
            Some(decode::How::Tokens(t)) => {
                let tokenizer =
                    tokenizer.ok_or_else(|| TextError::Model("no tokenizer to decode tokens with".into()))?;
                let ids = written_ids(outputs, &t.output)?;
                tokenizer.decode(&ids, true).map_err(|e| TextError::Model(format!("decoding {:?}: {e}", t.output)))?
            }
            None => return Err(TextError::Model(format!("text.decode {} says no how", d.name))),
        };
        let shape = if batched { vec![1, 1] } else { vec![1] };
        made.push(NamedTensor::strings(d.name.clone(), shape, &[decoded]));
    }
    outputs.extend(made);
    Ok(())
}

/// The token ids of one sample's `output` (INT64), as the tokenizer takes them.
fn written_ids(outputs: &[NamedTensor], output: &str) -> Result<Vec<u32>, TextError> {
    let t = outputs
        .iter()
        .find(|t| t.name == output)
        .ok_or_else(|| TextError::Model(format!("the model gave no output {output:?}")))?;
    let values = t.i64_values().ok_or_else(|| TextError::Model(format!("output {output:?} is not INT64")))?;
    values
        .into_iter()
        .map(|v| u32::try_from(v).map_err(|_| TextError::Model(format!("output {output:?} holds token id {v}"))))
        .collect()
}

/// Refuses a text the request's time cut short, when the task says so: fewer tokens than its
/// most and no end token.
fn check_finished(g: &Generate, outputs: &[NamedTensor]) -> Result<(), TextError> {
    if !g.refuse_unfinished {
        return Ok(());
    }
    let ids = written_ids(outputs, &g.output)?;
    let end = ids.iter().position(|&id| id == g.end_token);
    let written = end.unwrap_or_else(|| ids.iter().rposition(|&id| id != g.pad_token).map_or(0, |i| i + 1));
    if end.is_none() && written < g.max_tokens as usize {
        return Err(TextError::Unfinished(format!(
            "the request's time ran out after {written} of at most {} tokens, before its text ended (the task \
             refuses unfinished texts)",
            g.max_tokens
        )));
    }
    Ok(())
}

/// The index of the highest score (a NaN never wins; the first of equals).
fn argmax(scores: &[f32]) -> Option<usize> {
    scores
        .iter()
        .enumerate()
        .filter(|(_, s)| !s.is_nan())
        .fold(None, |best: Option<(usize, f32)>, (i, &s)| match best {
            Some((_, b)) if b >= s => best,
            _ => Some((i, s)),
        })
        .map(|(i, _)| i)
}

/// CTC's best path of `[frames, vocabulary]` scores: the top token per frame, repeats merged,
/// blanks dropped; the word delimiter written as a space, `<special>` tokens as nothing.
pub fn ctc_best_path(scores: &[f32], vocabulary: &[String], blank: usize, word_delimiter: &str) -> String {
    let v = vocabulary.len();
    let mut out = String::new();
    let mut previous = None;
    for frame in scores.chunks_exact(v) {
        let best = argmax(frame);
        if best != previous {
            if let Some(i) = best.filter(|&i| i != blank) {
                let token = &vocabulary[i];
                if token == word_delimiter {
                    out.push(' ');
                } else if !(token.starts_with('<') && token.ends_with('>')) {
                    out.push_str(token);
                }
            }
        }
        previous = best;
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The text between the best start and end tokens: within the pair's second text when there
/// is one (the passage), else within the text, special tokens excluded.
fn answer_span(encoded: &Encoded, start: &[f32], end: &[f32], max_tokens: usize) -> Result<String, TextError> {
    let e = &encoded.encoding;
    let n = e.len();
    if start.len() != n || end.len() != n {
        return Err(TextError::Model(format!(
            "span scores of {} and {} tokens for a text of {n}",
            start.len(),
            end.len()
        )));
    }
    let within = encoded.texts.len() - 1;
    let sequence = e.get_sequence_ids();
    let candidates: Vec<usize> = (0..n).filter(|&i| sequence[i] == Some(within)).collect();
    let mut best: Option<(f32, usize, usize)> = None;
    for (a, &i) in candidates.iter().enumerate() {
        for &j in candidates[a..].iter().take(max_tokens) {
            let score = start[i] + end[j];
            if !score.is_nan() && best.is_none_or(|(b, _, _)| score > b) {
                best = Some((score, i, j));
            }
        }
    }
    let Some((_, i, j)) = best else { return Ok(String::new()) };
    let (mut from, mut to) = (e.get_offsets()[i].0, e.get_offsets()[j].1);
    let text = &encoded.texts[within];
    // A byte-level tokenizer may cut inside a character: widen the cut to whole characters.
    to = to.min(text.len());
    from = from.min(to);
    while !text.is_char_boundary(from) {
        from -= 1;
    }
    while !text.is_char_boundary(to) {
        to += 1;
    }
    Ok(text[from..to].to_string())
}

/// A WordPiece tokenizer as BERT's (lower-cased, `[CLS] text [SEP] pair [SEP]`) over a
/// vocabulary of at most `size` entries: the special tokens, every printable ASCII character
/// alone and as a word's continuation (`##c`), then `words` in the order given (a word list,
/// shortest words first). Any text tokenizes: an unknown word falls back to its pieces.
pub fn wordpiece_json(words: &[String], size: usize) -> String {
    const SPECIAL: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];
    let mut vocab: Vec<String> = SPECIAL.iter().map(|s| s.to_string()).collect();
    let chars: Vec<char> = (b'!'..=b'~').map(char::from).filter(|c| !c.is_ascii_uppercase()).collect();
    vocab.extend(chars.iter().map(|c| c.to_string()));
    vocab.extend(chars.iter().map(|c| format!("##{c}")));
    let mut seen: std::collections::HashSet<String> = vocab.iter().cloned().collect();
    for w in words {
        if vocab.len() >= size {
            break;
        }
        let w = w.trim().to_lowercase();
        // Only words the normaliser and pre-tokenizer can give (apostrophes split words, accents
        // are stripped): others would waste entries.
        if !w.is_empty() && w.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()) && seen.insert(w.clone()) {
            vocab.push(w);
        }
    }
    vocab.truncate(size);
    let ids: serde_json::Map<String, serde_json::Value> =
        vocab.iter().enumerate().map(|(i, w)| (w.clone(), serde_json::Value::from(i))).collect();
    let added: Vec<serde_json::Value> = SPECIAL
        .iter()
        .enumerate()
        .map(|(id, content)| {
            serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true,
            "strip_accents": null, "lowercase": true},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {"type": "BertProcessing", "sep": ["[SEP]", 3], "cls": ["[CLS]", 2]},
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
            "max_input_chars_per_word": 100, "vocab": ids}
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidal_proto::v1::{Ctc, Decode, Labels, Span, VariantSpec};

    use crate::onnx_signature::test_signature as sig;

    fn encoder(pair: bool, max_tokens: u32, truncate: bool) -> TextEncoder {
        let words: Vec<String> = ["the", "cat", "sat", "on", "mat", "who"].map(String::from).to_vec();
        let mut tokenizer: Tokenizer = wordpiece_json(&words, 1000).parse().unwrap();
        let spec = Tokenize {
            text: "question".into(),
            pair: if pair { "context".into() } else { String::new() },
            ids: "input_ids".into(),
            mask: "attention_mask".into(),
            max_tokens,
            truncate,
            ..Default::default()
        };
        TextEncoder::ready(&mut tokenizer, &spec).unwrap();
        TextEncoder { tokenizer, spec }
    }

    fn ints(t: &NamedTensor) -> Vec<i64> {
        t.data.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect()
    }

    #[test]
    fn text_becomes_token_ids_and_a_mask_and_unknown_words_fall_back_to_pieces() {
        let e = encoder(false, 32, false);
        let (tensors, _) = e.encode(true, vec![NamedTensor::strings("question", vec![1], &["The cat sat"])]).unwrap();
        let ids = ints(&tensors[0]);
        // [CLS] the cat sat [SEP]
        assert_eq!(ids.len(), 5);
        assert_eq!((ids[0], ids[4]), (2, 3));
        assert_eq!(ints(&tensors[1]), vec![1; 5]);
        assert_eq!(tensors[0].shape, vec![5]);
        // "zebra" is not a word of the vocabulary: it is spelled in pieces, not lost.
        let (tensors, _) = e.encode(true, vec![NamedTensor::strings("question", vec![1], &["zebra"])]).unwrap();
        assert_eq!(ints(&tensors[0]).len(), 2 + 5);
        assert!(!ints(&tensors[0]).contains(&1), "no [UNK]");
    }

    #[test]
    fn bad_text_is_refused_with_its_reason() {
        let e = encoder(false, 4, false);
        let cases: [(NamedTensor, &str); 4] = [
            (NamedTensor::strings("question", vec![1], &[&b"\xff\xfe"[..]]), "not UTF-8"),
            (NamedTensor::strings("question", vec![2], &["a", "b"]), "2 texts"),
            (NamedTensor::strings("question", vec![1], &["the cat sat on the mat"]), "at most 4"),
            (NamedTensor::strings("question", vec![1], &["x".repeat(MAX_TEXT_BYTES + 1)]), "bytes of text"),
        ];
        for (t, why) in cases {
            match e.encode(true, vec![t]) {
                Err(TextError::Input(m)) => assert!(m.contains(why), "{m:?} lacks {why:?}"),
                other => panic!("{why}: {:?}", other.map(|_| ())),
            }
        }
        assert!(matches!(e.encode(true, vec![]), Err(TextError::Input(_))));
        // Too many bytes for the tokens allowed: refused before it is tokenized.
        let err = e.encode(true, vec![NamedTensor::strings("question", vec![1], &["a".repeat(300)])]).err();
        assert!(matches!(err, Some(TextError::Input(m)) if m.contains("more than 4 tokens can be")));
        // A question that alone overflows a truncated pair is the request's fault, not the model's.
        let pair = encoder(true, 5, true);
        let inputs = vec![
            NamedTensor::strings("question", vec![1], &["the cat sat on the mat"]),
            NamedTensor::strings("context", vec![1], &["the mat"]),
        ];
        assert!(matches!(pair.encode(true, inputs), Err(TextError::Input(_))));
        // No room for text beside the special tokens: refused when the tokenizer is readied.
        let mut tokenizer: Tokenizer = wordpiece_json(&[], 100).parse().unwrap();
        let spec = Tokenize { text: "t".into(), ids: "i".into(), max_tokens: 2, ..Default::default() };
        assert!(TextEncoder::ready(&mut tokenizer, &spec).unwrap_err().contains("no room"));
        // An empty text is its special tokens alone.
        let (t, _) = e.encode(true, vec![NamedTensor::strings("question", vec![1], &[""])]).unwrap();
        assert_eq!(ints(&t[0]), vec![2, 3]);
        // With truncate, a long text is cut to fit instead.
        let cut = encoder(false, 4, true);
        let (t, _) =
            cut.encode(true, vec![NamedTensor::strings("question", vec![1], &["the cat sat on the mat"])]).unwrap();
        assert_eq!(t[0].shape, vec![4]);
    }

    #[test]
    fn an_answer_span_is_cut_from_the_passage_by_the_best_scores() {
        let e = encoder(true, 64, false);
        let inputs = vec![
            NamedTensor::strings("context", vec![1], &["The cat sat on the mat"]),
            NamedTensor::strings("question", vec![1], &["who sat"]),
        ];
        let (tensors, encoded) = e.encode(true, inputs).unwrap();
        let n = ints(&tensors[0]).len();
        // [CLS] who sat [SEP] the cat sat on the mat [SEP]
        assert_eq!(n, 11);
        let mut start = vec![0.0; n];
        let mut end = vec![0.0; n];
        start[2] = 9.0; // "sat" of the question: outside the passage, never chosen
        start[5] = 5.0; // "cat"
        end[6] = 4.0; // "sat"
        end[4] = 8.0; // "the", before the start: not a span
        let answer = answer_span(&encoded, &start, &end, 16).unwrap();
        assert_eq!(answer, "cat sat");
        // One token at most: "The" alone (0 + 8) beats "cat" alone (5 + 0); the passage's own
        // spelling comes back, not the lower-cased tokens.
        assert_eq!(answer_span(&encoded, &start, &end, 1).unwrap(), "The");
    }

    #[test]
    fn ctc_merges_repeats_drops_blanks_and_spells_words() {
        let vocabulary: Vec<String> = ["<pad>", "|", "C", "A", "T"].map(String::from).to_vec();
        let frames = [2, 2, 0, 3, 3, 4, 1, 0, 4, 0, 4]; // C C _ A A T | _ T _ T
        let mut scores = vec![0.0f32; frames.len() * 5];
        for (f, &k) in frames.iter().enumerate() {
            scores[f * 5 + k] = 1.0;
        }
        assert_eq!(ctc_best_path(&scores, &vocabulary, 0, "|"), "CAT TT");
        assert_eq!(ctc_best_path(&[], &vocabulary, 0, "|"), "");
    }

    #[test]
    fn a_stage_with_text_takes_text_and_gives_its_decoded_outputs_on_the_wire() {
        let mut stage = StageSpec {
            name: "sentiment".into(),
            variants: vec![VariantSpec { name: "v".into(), tokenizer_file: "v.json".into(), ..Default::default() }],
            inputs: vec![sig("input_ids", "INT64", &[-1, -1]), sig("attention_mask", "INT64", &[-1, -1])],
            outputs: vec![sig("logits", "FP32", &[-1, 2])],
            text: Some(TextIo {
                tokenize: Some(Tokenize {
                    text: "text".into(),
                    ids: "input_ids".into(),
                    mask: "attention_mask".into(),
                    max_tokens: 128,
                    ..Default::default()
                }),
                decode: vec![Decode {
                    name: "label".into(),
                    how: Some(decode::How::Labels(Labels {
                        output: "logits".into(),
                        labels: vec!["negative".into(), "positive".into()],
                    })),
                }],
                generate: None,
            }),
            ..Default::default()
        };
        let io = wire_io(&stage).unwrap();
        let inputs: Vec<_> = io.inputs.iter().map(|d| (d.name.as_str(), d.element, d.shape.clone())).collect();
        assert_eq!(inputs, vec![("text", ElementType::Bytes, vec![-1, 1])]);
        let outputs: Vec<_> = io.outputs.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(outputs, vec!["logits", "label"]);

        let mut outs = vec![NamedTensor::f32("logits", vec![1, 2], &[0.1, 0.7])];
        decode_outputs(stage.text.as_ref().unwrap(), true, None, None, &mut outs).unwrap();
        assert_eq!(outs[1].string_values().unwrap(), vec![&b"positive"[..]]);
        assert_eq!(outs[1].shape, vec![1, 1]);

        // Each mistake is refused by name.
        let text = stage.text.as_mut().unwrap();
        text.decode[0].how = Some(decode::How::Labels(Labels { output: "logits".into(), labels: vec!["one".into()] }));
        assert!(wire_io(&stage).unwrap_err().contains("1 labels"));
        let text = stage.text.as_mut().unwrap();
        text.decode[0].how = Some(decode::How::Ctc(Ctc { output: "logits".into(), ..Default::default() }));
        assert!(wire_io(&stage).unwrap_err().contains("FP32 of 2"));
        let text = stage.text.as_mut().unwrap();
        text.decode[0].how = Some(decode::How::Span(Span { start: "nope".into(), ..Default::default() }));
        assert!(wire_io(&stage).unwrap_err().contains("no output \"nope\""));
        // A padded stage's span scores must be trimmed back to each request's tokens.
        let text = stage.text.as_mut().unwrap();
        text.decode[0].how =
            Some(decode::How::Span(Span { start: "logits".into(), end: "logits".into(), max_tokens: 8 }));
        stage.outputs = vec![sig("logits", "FP32", &[-1, -1])];
        stage.pad = vec![tidal_proto::v1::Padding { input: "input_ids".into(), axis: 1, value: 0.0 }];
        assert!(wire_io(&stage).unwrap_err().contains("need [stages.trim] on axis 1"));
        stage.trim = vec![tidal_proto::v1::Trim { output: "logits".into(), axis: 1 }];
        wire_io(&stage).unwrap();
        let text = stage.text.as_mut().unwrap();
        text.decode.clear();
        text.tokenize.as_mut().unwrap().ids = "missing".into();
        assert!(wire_io(&stage).unwrap_err().contains("no input \"missing\""));
        let text = stage.text.as_mut().unwrap();
        text.tokenize.as_mut().unwrap().ids = "input_ids".into();
        stage.variants[0].tokenizer_file.clear();
        assert!(wire_io(&stage).unwrap_err().contains("no tokenizer_file"));
    }

    #[test]
    fn variants_with_tensors_of_their_own_take_what_the_stage_takes_and_it_gives_what_all_give() {
        use tidal_proto::v1::{Tokens, VariantIo};
        // wav2vec2: per-frame scores decoded by CTC; Speech2Text: a budget in, tokens out.
        let ctc = Decode {
            name: "text".into(),
            how: Some(decode::How::Ctc(Ctc {
                output: "logits".into(),
                vocabulary: vec!["<pad>".into(), "|".into(), "A".into()],
                blank: 0,
                word_delimiter: "|".into(),
            })),
        };
        let writes = VariantIo {
            inputs: vec![sig("input_values", "FP32", &[-1, -1]), sig("max_new_tokens", "INT64", &[-1])],
            outputs: vec![sig("tokens", "INT64", &[-1, -1])],
            text: Some(TextIo {
                tokenize: None,
                decode: vec![Decode {
                    name: "text".into(),
                    how: Some(decode::How::Tokens(Tokens { output: "tokens".into() })),
                }],
                generate: Some(Generate {
                    budget: "max_new_tokens".into(),
                    output: "tokens".into(),
                    max_tokens: 8,
                    end_token: 3,
                    ..Default::default()
                }),
            }),
            ..Default::default()
        };
        let mut stage = StageSpec {
            name: "asr".into(),
            variants: vec![
                VariantSpec { name: "wav2vec2".into(), ..Default::default() },
                VariantSpec {
                    name: "s2t".into(),
                    tokenizer_file: "s2t.json".into(),
                    io: Some(writes),
                    ..Default::default()
                },
            ],
            inputs: vec![sig("input_values", "FP32", &[-1, -1])],
            outputs: vec![sig("logits", "FP32", &[-1, -1, 3])],
            text: Some(TextIo { tokenize: None, decode: vec![ctc], generate: None }),
            ..Default::default()
        };
        let io = wire_io(&stage).unwrap();
        let names = |ds: &[Declared]| ds.iter().map(|d| d.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&io.inputs), ["input_values"], "the budget is the worker's, not the request's");
        assert_eq!(names(&io.outputs), ["text"], "wav2vec2's logits and Speech2Text's tokens are not both given");
        // Each variant as it serves: its own model's tensors.
        let served = crate::task::as_served(&stage, &stage.variants[1]);
        assert_eq!(names(&StageIo::of(&served).unwrap().outputs), ["tokens"]);
        assert!(served.text.as_ref().unwrap().generate.is_some());
        assert!(crate::task::as_served(&stage, &stage.variants[0]).text.as_ref().unwrap().generate.is_none());
        // A variant that takes other inputs on the wire is refused by name.
        stage.variants[1].io.as_mut().unwrap().inputs[0].name = "audio".into();
        let why = wire_io(&stage).unwrap_err();
        assert!(why.contains("variant s2t takes [\"audio FP32 of 2 dimensions\"]"), "{why}");
    }
}
