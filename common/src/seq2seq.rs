//! ONNX models of IPA's encoder–decoder stages (summarisation with DistilBART, translation
//! with Marian, speech recognition with Speech2Text), generated from their published
//! architectures, each decoding greedily inside its own graph.
//!
//! A model takes its source (token ids and mask, INT64 `[batch, sequence]`, or a 16 kHz
//! waveform, FP32 `[batch, samples]`) and `max_new_tokens` (INT64 `[batch]`: how many tokens
//! each sample may write) and gives `tokens` (INT64 `[batch, steps]`): the tokens each sample
//! wrote, ending with `EOS` when it finished, then `PAD`. The encoder runs once; an ONNX `Loop`
//! then runs one decoder step per token with a key–value cache (each layer's keys and values
//! of the tokens so far, grown by one per step, and the encoder's projected once), picks the
//! most likely token that the sample has not written yet (Hugging Face's
//! `no_repeat_ngram_size` at 1: with random weights, a greedy decoder would otherwise repeat
//! its last token for ever), and stops when every sample has ended or reached its budget. So the
//! cost grows with the tokens written, as a served generator's does, and the serving worker
//! stays one `run` per batch. Layers, widths, heads and vocabularies are the published ones
//! (parameter counts within 1 %); weights come from a seed and the quality (ROUGE-L, BLEU,
//! 100 − WER) is the published figure, carried as metadata.

use tidal_proto::onnx::{tensor_proto::DataType, GraphProto, ValueInfoProto};

use crate::onnx_graph::{graph_attr, int_attr, ints_attr, model_bytes, value_info, Dim, GeneratedModel, GraphBuilder};
use crate::transformer::{Encoder, IDS, MASK, RESIDUAL_GAIN};

/// How many tokens each sample may write, INT64 `[batch]` (0: none).
pub const MAX_NEW_TOKENS: &str = "max_new_tokens";
/// The tokens written, INT64 `[batch, steps]`.
pub const TOKENS: &str = "tokens";
/// The waveform a speech model takes, FP32 `[batch, samples]` at 16 kHz.
pub const AUDIO: &str = "input_values";
/// Token ids shared with the generated tokenizers (`text::wordpiece_json`: `[PAD]`, `[UNK]`,
/// `[CLS]`, `[SEP]`): decoding starts from `[CLS]`, ends at `[SEP]`, pads with `[PAD]`.
pub const PAD: i64 = 0;
pub const START: i64 = 2;
pub const EOS: i64 = 3;
const UNK: i64 = 1;
const MASK_TOKEN: i64 = 4;
/// Added to the score of a token a sample may not write.
const BANNED: f32 = -1e9;
/// The most steps one run takes, whatever `max_new_tokens` asks (its decoder's positions).
pub const MAX_STEPS: i64 = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seq2SeqModel {
    /// sshleifer/distilbart-xsum-E-D: E encoder and D decoder layers of BART large.
    DistilbartXsum {
        encoder: u8,
        decoder: u8,
    },
    /// Helsinki-NLP/opus-mt-fr-en (Marian, transformer base).
    OpusMtFrEn,
    /// Helsinki-NLP/opus-mt-tc-big-fr-en (Marian, transformer big).
    OpusMtTcBigFrEn,
    /// facebook/s2t-{small,medium,large}-librispeech-asr.
    S2tSmall,
    S2tMedium,
    S2tLarge,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Activation {
    Gelu,
    Swish,
    Relu,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Positions {
    /// BART's learned table, offset by 2.
    Learned { count: usize, offset: i64 },
    /// Sines and cosines (Marian from 0, Speech2Text from its padding index + 1).
    Sinusoidal { offset: i64 },
}

struct Arch {
    shape: Encoder,
    encoder_layers: usize,
    decoder_layers: usize,
    vocab: usize,
    positions: Positions,
    /// Embeddings times √hidden (Marian, Speech2Text).
    scale_embedding: bool,
    /// A layer norm on the embeddings (BART).
    embedding_norm: bool,
    /// Pre-norm layers and a final norm (Speech2Text); else post-norm (BART, Marian).
    pre_norm: bool,
    activation: Activation,
    audio: bool,
}

const DISTILBART: [(u8, u8); 6] = [(1, 1), (12, 1), (6, 6), (12, 3), (9, 6), (12, 6)];
/// Speech2Text's front end: 80 log-mel filterbanks of 25 ms windows every 10 ms, then two
/// convolutions (kernel 5, stride 2, gated linear units) of 1024 channels.
const MEL_BINS: i64 = 80;
const WINDOW: i64 = 400;
const HOP: i64 = 160;
const CONV_CHANNELS: i64 = 1024;
const CONV_KERNEL: i64 = 5;

impl Seq2SeqModel {
    pub const ALL: [Seq2SeqModel; 11] = [
        Self::DistilbartXsum { encoder: 1, decoder: 1 },
        Self::DistilbartXsum { encoder: 12, decoder: 1 },
        Self::DistilbartXsum { encoder: 6, decoder: 6 },
        Self::DistilbartXsum { encoder: 12, decoder: 3 },
        Self::DistilbartXsum { encoder: 9, decoder: 6 },
        Self::DistilbartXsum { encoder: 12, decoder: 6 },
        Self::OpusMtFrEn,
        Self::OpusMtTcBigFrEn,
        Self::S2tSmall,
        Self::S2tMedium,
        Self::S2tLarge,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::DistilbartXsum { encoder, decoder } => {
                match DISTILBART.iter().position(|&p| p == (encoder, decoder)) {
                    Some(0) => "distilbart-xsum-1-1",
                    Some(1) => "distilbart-xsum-12-1",
                    Some(2) => "distilbart-xsum-6-6",
                    Some(3) => "distilbart-xsum-12-3",
                    Some(4) => "distilbart-xsum-9-6",
                    _ => "distilbart-xsum-12-6",
                }
            }
            Self::OpusMtFrEn => "opus-mt-fr-en",
            Self::OpusMtTcBigFrEn => "opus-mt-tc-big-fr-en",
            Self::S2tSmall => "s2t-small",
            Self::S2tMedium => "s2t-medium",
            Self::S2tLarge => "s2t-large",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }

    /// The published quality, percent, higher is better (`data/ipa-model-variants.csv`):
    /// ROUGE-L on XSum, BLEU on newstest, 100 − WER on LibriSpeech test-clean.
    pub fn accuracy(self) -> f64 {
        match self {
            Self::DistilbartXsum { encoder: 1, decoder: 1 } => 32.26,
            Self::DistilbartXsum { encoder: 12, decoder: 1 } => 33.37,
            Self::DistilbartXsum { encoder: 6, decoder: 6 } => 35.73,
            Self::DistilbartXsum { encoder: 12, decoder: 3 } => 36.39,
            Self::DistilbartXsum { encoder: 9, decoder: 6 } => 36.61,
            Self::DistilbartXsum { .. } => 36.99,
            Self::OpusMtFrEn => 33.1,
            Self::OpusMtTcBigFrEn => 34.4,
            Self::S2tSmall => 100.0 - 41.28,
            Self::S2tMedium => 100.0 - 35.12,
            Self::S2tLarge => 100.0 - 33.26,
        }
    }

    /// Whether it takes audio (a waveform) rather than token ids.
    pub fn takes_audio(self) -> bool {
        self.arch().audio
    }

    /// Its vocabulary's size: the token ids it writes run 0..vocab.
    pub fn vocab(self) -> usize {
        self.arch().vocab
    }

    /// The longest source it takes, in tokens (a text model's positions).
    pub fn max_tokens(self) -> usize {
        match self.arch().positions {
            Positions::Learned { count, offset } => count - offset as usize,
            Positions::Sinusoidal { .. } => 512,
        }
    }

    fn arch(self) -> Arch {
        let large = Encoder { layers: 0, hidden: 1024, heads: 16, ffn: 4096 };
        let marian = |shape, vocab, activation| Arch {
            shape,
            encoder_layers: 6,
            decoder_layers: 6,
            vocab,
            positions: Positions::Sinusoidal { offset: 0 },
            scale_embedding: true,
            embedding_norm: false,
            pre_norm: false,
            activation,
            audio: false,
        };
        let s2t = |shape| Arch {
            shape,
            encoder_layers: 12,
            decoder_layers: 6,
            vocab: 10_000,
            positions: Positions::Sinusoidal { offset: 2 },
            scale_embedding: true,
            embedding_norm: false,
            pre_norm: true,
            activation: Activation::Relu,
            audio: true,
        };
        match self {
            Self::DistilbartXsum { encoder, decoder } => Arch {
                shape: large,
                encoder_layers: encoder as usize,
                decoder_layers: decoder as usize,
                vocab: 50_264,
                positions: Positions::Learned { count: 1026, offset: 2 },
                scale_embedding: false,
                embedding_norm: true,
                pre_norm: false,
                activation: Activation::Gelu,
                audio: false,
            },
            Self::OpusMtFrEn => {
                marian(Encoder { layers: 0, hidden: 512, heads: 8, ffn: 2048 }, 59_514, Activation::Swish)
            }
            Self::OpusMtTcBigFrEn => marian(large, 53_017, Activation::Relu),
            Self::S2tSmall => s2t(Encoder { layers: 0, hidden: 256, heads: 4, ffn: 2048 }),
            Self::S2tMedium => s2t(Encoder { layers: 0, hidden: 512, heads: 8, ffn: 2048 }),
            Self::S2tLarge => s2t(large),
        }
    }
}

/// One layer's weights for attention over a source: queries from the decoder, keys and
/// values projected once from the encoder's output.
struct CrossKeys {
    keys: String,
    values: String,
}

/// What every decoder step reads from outside the loop.
struct Decoder<'a> {
    embedding: &'a str,
    scale: &'a str,
    /// The learned position table (BART), or none (sinusoids).
    positions: Option<&'a str>,
    cross: &'a [CrossKeys],
    /// The source's padding mask as attention bias (text), or none (audio).
    source_bias: Option<&'a str>,
    /// Scores added to tokens never written (the special ones but the end).
    never: &'a str,
}

/// Builds `model`'s graph with weights drawn from `seed`.
pub fn generate(model: Seq2SeqModel, seed: u64) -> GeneratedModel {
    let a = model.arch();
    let d = a.shape.hidden;
    let mut g = GraphBuilder::new(seed);
    let embedding = g.weight(&[a.vocab as i64, d as i64], d as f32, 1.0);
    let scale = g.const_f32(&[], &[if a.scale_embedding { (d as f32).sqrt() } else { 1.0 }]);
    let encoder_positions = match a.positions {
        Positions::Learned { count, .. } => Some(g.weight(&[count as i64, d as i64], d as f32, 1.0)),
        Positions::Sinusoidal { .. } => None,
    };
    let decoder_positions = match a.positions {
        Positions::Learned { count, .. } => Some(g.weight(&[count as i64, d as i64], d as f32, 1.0)),
        Positions::Sinusoidal { .. } => None,
    };

    // The encoder, once per batch.
    let (mut x, source_bias, inputs) = if a.audio {
        let x = g.speech_front_end(d);
        (x, None, vec![value_info(AUDIO, DataType::Float, &[Dim::Named("batch"), Dim::Named("samples")])])
    } else {
        let x = g.node("Gather", &[&embedding, IDS], vec![]);
        let tokens = [Dim::Named("batch"), Dim::Named("sequence")];
        let bias = g.mask_bias(MASK);
        (x, Some(bias), vec![value_info(IDS, DataType::Int64, &tokens), value_info(MASK, DataType::Int64, &tokens)])
    };
    x = g.node("Mul", &[&x, &scale], vec![]);
    let shape = g.node("Shape", &[&x], vec![]);
    let one = g.scalar_i64(1);
    let length = g.node("Gather", &[&shape, &one], vec![int_attr("axis", 0)]);
    let positions = g.positions(a.positions, encoder_positions.as_deref(), &length, d);
    x = g.node("Add", &[&x, &positions], vec![]);
    if a.embedding_norm {
        x = g.layer_norm(&x, d);
    }
    for _ in 0..a.encoder_layers {
        x = g.seq2seq_layer(&x, source_bias.as_deref(), &a);
    }
    if a.pre_norm {
        x = g.layer_norm(&x, d);
    }
    let heads = a.shape.heads as i64;
    let head = (d / a.shape.heads) as i64;
    let cross: Vec<CrossKeys> = (0..a.decoder_layers)
        .map(|_| {
            let keys = g.split_heads(&x, d, heads, &[0, 2, 3, 1]); // [b, h, dh, s]
            let values = g.split_heads(&x, d, heads, &[0, 2, 1, 3]); // [b, h, s, dh]
            CrossKeys { keys, values }
        })
        .collect();

    // The decoder's state: the last token, whether each sample has ended, each layer's keys
    // ([b, h, dh, t]) and values ([b, h, t, dh]) of the tokens so far (none at first).
    let batch = g.node("Shape", &[MAX_NEW_TOKENS], vec![]);
    let start = g.const_i64(&[START]);
    let start_shape = g.const_i64(&[1, 1]);
    let start_one = g.node("Reshape", &[&start, &start_shape], vec![]);
    let column = g.const_i64(&[1]);
    let first_shape = g.concat(&[&batch, &column]);
    let first = g.node("Expand", &[&start_one, &first_shape], vec![]);
    let one_token = g.const_i64(&[1]);
    let done = g.node("Less", &[MAX_NEW_TOKENS, &one_token], vec![]);
    let key_rest = g.const_i64(&[heads, head, 0]);
    let value_rest = g.const_i64(&[heads, 0, head]);
    let key_shape = g.concat(&[&batch, &key_rest]);
    let value_shape = g.concat(&[&batch, &value_rest]);
    let no_keys = g.node("ConstantOfShape", &[&key_shape], vec![]);
    let no_values = g.node("ConstantOfShape", &[&value_shape], vec![]);
    let most = g.node("ReduceMax", &[MAX_NEW_TOKENS], vec![int_attr("keepdims", 0)]);
    let (low, high) = (g.scalar_i64(1), g.scalar_i64(MAX_STEPS));
    let most = g.node("Max", &[&most, &low], vec![]);
    let trips = g.node("Min", &[&most, &high], vec![]);
    let go = g.const_bool(true);

    // Tokens a sample may not write: the special ones but the end, and those it wrote before.
    let mut banned = vec![0.0f32; a.vocab];
    for id in [PAD, UNK, START, MASK_TOKEN] {
        banned[id as usize] = BANNED;
    }
    let never = g.const_f32(&[a.vocab as i64], &banned);
    let vocab_rest = g.const_i64(&[a.vocab as i64]);
    let written_shape = g.concat(&[&batch, &vocab_rest]);
    let none_written = g.node("ConstantOfShape", &[&written_shape], vec![]);
    let decoder = Decoder {
        embedding: &embedding,
        scale: &scale,
        positions: decoder_positions.as_deref(),
        cross: &cross,
        source_bias: source_bias.as_deref(),
        never: &never,
    };
    let body = g.decoder_step(&a, &decoder);
    let carried = 3 + 2 * a.decoder_layers;
    let mut loop_inputs: Vec<String> = vec![trips, go, first, done, none_written];
    for _ in 0..a.decoder_layers {
        loop_inputs.push(no_keys.clone());
        loop_inputs.push(no_values.clone());
    }
    let loop_refs: Vec<&str> = loop_inputs.iter().map(String::as_str).collect();
    let outs = g.node_outputs("Loop", &loop_refs, carried + 1, vec![graph_attr("body", body)]);
    // The scan output is [steps, batch].
    g.node_named("Transpose", &[&outs[carried]], TOKENS, vec![ints_attr("perm", &[1, 0])]);

    let parameters = g.parameters;
    let mut inputs = inputs;
    inputs.push(value_info(MAX_NEW_TOKENS, DataType::Int64, &[Dim::Named("batch")]));
    let graph = GraphProto {
        node: g.nodes,
        name: model.name().to_string(),
        initializer: g.initializers,
        input: inputs,
        output: vec![value_info(TOKENS, DataType::Int64, &[Dim::Named("batch"), Dim::Named("steps")])],
    };
    let doc = format!(
        "{}: encoder–decoder, {} + {} layers, hidden {}, {} heads, vocabulary {}; greedy decoding with a \
         key–value cache, at most {MAX_STEPS} steps; weights from seed {seed}",
        model.name(),
        a.encoder_layers,
        a.decoder_layers,
        d,
        a.shape.heads,
        a.vocab
    );
    GeneratedModel { onnx: model_bytes(graph, doc), parameters }
}

impl GraphBuilder {
    fn concat(&mut self, parts: &[&str]) -> String {
        self.node("Concat", parts, vec![int_attr("axis", 0)])
    }

    /// Positions `offset..offset + length` (`length` an INT64 scalar) as `[length, hidden]`,
    /// from the learned `table` or as sines and cosines.
    fn positions(&mut self, kind: Positions, table: Option<&str>, length: &str, d: usize) -> String {
        let offset = match kind {
            Positions::Learned { offset, .. } | Positions::Sinusoidal { offset } => offset,
        };
        let start = self.scalar_i64(offset);
        let end = self.node("Add", &[length, &start], vec![]);
        let one = self.scalar_i64(1);
        let indices = self.node("Range", &[&start, &end, &one], vec![]);
        match table {
            Some(table) => self.node("Gather", &[table, &indices], vec![]),
            None => self.sinusoid(&indices, d),
        }
    }

    /// `[n, hidden]`: sin(p·ω) then cos(p·ω) for positions `p` (INT64 `[n]`), ω = 10000^(−2i/d).
    fn sinusoid(&mut self, positions: &str, d: usize) -> String {
        let half = d / 2;
        let step = (10_000f32).ln() / (half as f32 - 1.0).max(1.0);
        let frequencies: Vec<f32> = (0..half).map(|i| (-(i as f32) * step).exp()).collect();
        let frequencies = self.const_f32(&[1, half as i64], &frequencies);
        let p = self.node("Cast", &[positions], vec![int_attr("to", DataType::Float as i64)]);
        let axes = self.const_i64(&[1]);
        let p = self.node("Unsqueeze", &[&p, &axes], vec![]);
        let angles = self.node("Mul", &[&p, &frequencies], vec![]);
        let sin = self.node("Sin", &[&angles], vec![]);
        let cos = self.node("Cos", &[&angles], vec![]);
        self.node("Concat", &[&sin, &cos], vec![int_attr("axis", 1)])
    }

    /// `x` (`[b, s, hidden]`) projected and split into heads, transposed by `perm`.
    fn split_heads(&mut self, x: &str, d: usize, heads: i64, perm: &[i64]) -> String {
        let y = self.linear(x, d, d, 1.0);
        let split = self.const_i64(&[0, 0, heads, d as i64 / heads]);
        let y = self.node("Reshape", &[&y, &split], vec![]);
        self.node("Transpose", &[&y], vec![ints_attr("perm", perm)])
    }

    /// Attention of queries `q` (`[b, h, s, dh]`) over keys (`[b, h, dh, t]`) and values
    /// (`[b, h, t, dh]`), merged and projected back to `[b, s, hidden]`.
    fn attend(&mut self, q: &str, keys: &str, values: &str, bias: Option<&str>, d: usize, heads: i64) -> String {
        let scores = self.node("MatMul", &[q, keys], vec![]);
        let scale = self.const_f32(&[], &[1.0 / ((d as i64 / heads) as f32).sqrt()]);
        let mut scores = self.node("Mul", &[&scores, &scale], vec![]);
        if let Some(bias) = bias {
            scores = self.node("Add", &[&scores, bias], vec![]);
        }
        let weights = self.node("Softmax", &[&scores], vec![int_attr("axis", -1)]);
        let context = self.node("MatMul", &[&weights, values], vec![]);
        let context = self.node("Transpose", &[&context], vec![ints_attr("perm", &[0, 2, 1, 3])]);
        let merge = self.const_i64(&[0, 0, d as i64]);
        let context = self.node("Reshape", &[&context, &merge], vec![]);
        self.linear(&context, d, d, RESIDUAL_GAIN)
    }

    fn feed_forward(&mut self, x: &str, a: &Arch) -> String {
        let up = self.linear(x, a.shape.hidden, a.shape.ffn, 1.0);
        let up = match a.activation {
            Activation::Gelu => self.gelu(&up),
            Activation::Relu => self.relu(&up),
            Activation::Swish => {
                let gate = self.node("Sigmoid", &[&up], vec![]);
                self.node("Mul", &[&up, &gate], vec![])
            }
        };
        self.linear(&up, a.shape.ffn, a.shape.hidden, RESIDUAL_GAIN)
    }

    /// A residual block: `x + f(x)` normalised after (post-norm) or `x + f(norm(x))` (pre-norm).
    fn residual(&mut self, x: &str, a: &Arch, f: impl FnOnce(&mut Self, &str) -> String) -> String {
        if a.pre_norm {
            let normed = self.layer_norm(x, a.shape.hidden);
            let y = f(self, &normed);
            self.node("Add", &[x, &y], vec![])
        } else {
            let y = f(self, x);
            let sum = self.node("Add", &[x, &y], vec![]);
            self.layer_norm(&sum, a.shape.hidden)
        }
    }

    /// One encoder layer: self-attention (masked by `bias`), then the feed-forward network.
    fn seq2seq_layer(&mut self, x: &str, bias: Option<&str>, a: &Arch) -> String {
        let e = Encoder { layers: 0, ..a.shape };
        let x = self.residual(x, a, |g, x| g.self_attention(x, bias, e));
        self.residual(&x, a, |g, x| g.feed_forward(x, a))
    }

    /// Speech2Text's front end over `AUDIO`: log-mel filterbanks normalised per recording,
    /// two strided convolutions with gated linear units, `[b, frames / 4, hidden]`.
    fn speech_front_end(&mut self, d: usize) -> String {
        let axes = self.const_i64(&[2]);
        let signal = self.node("Unsqueeze", &[AUDIO, &axes], vec![]);
        let step = self.scalar_i64(HOP);
        let hann: Vec<f32> =
            (0..WINDOW).map(|i| 0.5 - 0.5 * (2.0 * std::f32::consts::PI * i as f32 / WINDOW as f32).cos()).collect();
        let window = self.const_f32(&[WINDOW], &hann);
        let length = self.scalar_i64(WINDOW);
        // [b, frames, 201, 2]: real and imaginary parts.
        let spectrum = self.node("STFT", &[&signal, &step, &window, &length], vec![int_attr("onesided", 1)]);
        let squared = self.node("Mul", &[&spectrum, &spectrum], vec![]);
        let last = self.const_i64(&[-1]);
        let power = self.node("ReduceSum", &[&squared, &last], vec![int_attr("keepdims", 0)]);
        let bins = self.scalar_i64(MEL_BINS);
        let rate = self.scalar_i64(16_000);
        let (low, high) = (self.const_f32(&[], &[20.0]), self.const_f32(&[], &[8000.0]));
        let mel = self.node("MelWeightMatrix", &[&bins, &length, &rate, &low, &high], vec![]);
        let mel = self.node("MatMul", &[&power, &mel], vec![]);
        let floor = self.const_f32(&[], &[1e-6]);
        let mel = self.node("Add", &[&mel, &floor], vec![]);
        let mel = self.node("Log", &[&mel], vec![]);
        // Per-recording mean and variance normalisation over frames.
        let over_frames = || vec![ints_attr("axes", &[1]), int_attr("keepdims", 1)];
        let mean = self.node("ReduceMean", &[&mel], over_frames());
        let centred = self.node("Sub", &[&mel, &mean], vec![]);
        let squared = self.node("Mul", &[&centred, &centred], vec![]);
        let variance = self.node("ReduceMean", &[&squared], over_frames());
        let variance = self.node("Add", &[&variance, &floor], vec![]);
        let deviation = self.node("Sqrt", &[&variance], vec![]);
        let features = self.node("Div", &[&centred, &deviation], vec![]);
        // [b, 80, frames] through the two convolutions.
        let mut x = self.node("Transpose", &[&features], vec![ints_attr("perm", &[0, 2, 1])]);
        let mut cin = MEL_BINS;
        for cout in [CONV_CHANNELS, 2 * d as i64] {
            let w = self.weight(&[cout, cin, CONV_KERNEL], (cin * CONV_KERNEL) as f32, 1.0);
            let b = self.zeros(&[cout]);
            x = self.node(
                "Conv",
                &[&x, &w, &b],
                vec![
                    ints_attr("kernel_shape", &[CONV_KERNEL]),
                    ints_attr("strides", &[2]),
                    ints_attr("pads", &[CONV_KERNEL / 2, CONV_KERNEL / 2]),
                ],
            );
            let halves = self.node_outputs("Split", &[&x], 2, vec![int_attr("axis", 1)]);
            let gate = self.node("Sigmoid", &[&halves[1]], vec![]);
            x = self.node("Mul", &[&halves[0], &gate], vec![]);
            cin = cout / 2;
        }
        self.node("Transpose", &[&x], vec![ints_attr("perm", &[0, 2, 1])])
    }

    /// The Loop's body: one decoder step. Its inputs are the step number, the condition, the
    /// last tokens `[b, 1]`, the ended flags `[b]` and each layer's cache; its outputs the
    /// condition (some sample still writing), the new state and the token each sample wrote.
    fn decoder_step(
        &mut self,
        a: &Arch,
        &Decoder { embedding, scale, positions, cross, source_bias, never }: &Decoder,
    ) -> GraphProto {
        let outer = std::mem::take(&mut self.nodes);
        let d = a.shape.hidden;
        let heads = a.shape.heads as i64;
        let step = self.fresh("step");
        let condition = self.fresh("condition");
        let last = self.fresh("last");
        let ended = self.fresh("ended");
        let written_before = self.fresh("written_before");
        let caches: Vec<(String, String)> =
            (0..a.decoder_layers).map(|_| (self.fresh("past_keys"), self.fresh("past_values"))).collect();

        let x = self.node("Gather", &[embedding, &last], vec![]); // [b, 1, d]
        let mut x = self.node("Mul", &[&x, scale], vec![]);
        let one = self.scalar_i64(1);
        let position = self.positions_at(a.positions, positions, &step, d);
        x = self.node("Add", &[&x, &position], vec![]);
        if a.embedding_norm {
            x = self.layer_norm(&x, d);
        }
        let mut presents = Vec::new();
        for (layer, (past_keys, past_values)) in cross.iter().zip(&caches) {
            let mut present = (String::new(), String::new());
            x = self.residual(&x, a, |g, x| {
                let q = g.split_heads(x, d, heads, &[0, 2, 1, 3]);
                let k = g.split_heads(x, d, heads, &[0, 2, 3, 1]);
                let v = g.split_heads(x, d, heads, &[0, 2, 1, 3]);
                let keys = g.node("Concat", &[past_keys, &k], vec![int_attr("axis", 3)]);
                let values = g.node("Concat", &[past_values, &v], vec![int_attr("axis", 2)]);
                let out = g.attend(&q, &keys, &values, None, d, heads);
                present = (keys, values);
                out
            });
            presents.push(present);
            x = self.residual(&x, a, |g, x| {
                let q = g.split_heads(x, d, heads, &[0, 2, 1, 3]);
                g.attend(&q, &layer.keys, &layer.values, source_bias, d, heads)
            });
            x = self.residual(&x, a, |g, x| g.feed_forward(x, a));
        }
        if a.pre_norm {
            x = self.layer_norm(&x, d);
        }
        // The most likely next token, over the embedding (tied output projection).
        let flat = self.const_i64(&[-1, d as i64]);
        let x = self.node("Reshape", &[&x, &flat], vec![]);
        let logits = self.node("Gemm", &[&x, embedding], vec![int_attr("transB", 1)]);
        let logits = self.node("Add", &[&logits, &written_before], vec![]);
        let logits = self.node("Add", &[&logits, never], vec![]);
        let best = self.node("ArgMax", &[&logits], vec![int_attr("axis", 1), int_attr("keepdims", 1)]);
        let column = self.const_i64(&[1]);
        let ended_column = self.node("Unsqueeze", &[&ended, &column], vec![]);
        let pad = self.scalar_i64(PAD);
        let token = self.node("Where", &[&ended_column, &pad, &best], vec![]); // [b, 1]
        let written = self.node("Squeeze", &[&token, &column], vec![]); // [b]
        let eos = self.scalar_i64(EOS);
        let finished = self.node("Equal", &[&written, &eos], vec![]);
        let depth = self.scalar_i64(a.vocab as i64);
        let marks = self.const_f32(&[2], &[0.0, BANNED]);
        let this_one = self.node("OneHot", &[&written, &depth, &marks], vec![int_attr("axis", -1)]);
        let written_now = self.node("Min", &[&written_before, &this_one], vec![]);
        let count = self.node("Add", &[&step, &one], vec![]);
        let spent = self.node("GreaterOrEqual", &[&count, MAX_NEW_TOKENS], vec![]);
        let stop = self.node("Or", &[&finished, &spent], vec![]);
        let ended_now = self.node("Or", &[&ended, &stop], vec![]);
        let as_int = self.node("Cast", &[&ended_now], vec![int_attr("to", DataType::Int64 as i64)]);
        let all = self.node("ReduceMin", &[&as_int], vec![int_attr("keepdims", 0)]);
        let zero = self.scalar_i64(0);
        let more = self.node("Equal", &[&all, &zero], vec![]);

        let body_nodes = std::mem::replace(&mut self.nodes, outer);
        let cache_info = |keys: &str, values: &str| -> [ValueInfoProto; 2] {
            [
                value_info(
                    keys,
                    DataType::Float,
                    &[Dim::Named("batch"), Dim::Fixed(heads), Dim::Fixed(d as i64 / heads), Dim::Named("past")],
                ),
                value_info(
                    values,
                    DataType::Float,
                    &[Dim::Named("batch"), Dim::Fixed(heads), Dim::Named("past"), Dim::Fixed(d as i64 / heads)],
                ),
            ]
        };
        let mut input = vec![
            value_info(&step, DataType::Int64, &[]),
            value_info(&condition, DataType::Bool, &[]),
            value_info(&last, DataType::Int64, &[Dim::Named("batch"), Dim::Fixed(1)]),
            value_info(&ended, DataType::Bool, &[Dim::Named("batch")]),
            value_info(&written_before, DataType::Float, &[Dim::Named("batch"), Dim::Fixed(a.vocab as i64)]),
        ];
        for (k, v) in &caches {
            input.extend(cache_info(k, v));
        }
        let mut output = vec![
            value_info(&more, DataType::Bool, &[]),
            value_info(&token, DataType::Int64, &[Dim::Named("batch"), Dim::Fixed(1)]),
            value_info(&ended_now, DataType::Bool, &[Dim::Named("batch")]),
            value_info(&written_now, DataType::Float, &[Dim::Named("batch"), Dim::Fixed(a.vocab as i64)]),
        ];
        for (k, v) in &presents {
            output.extend(cache_info(k, v));
        }
        output.push(value_info(&written, DataType::Int64, &[Dim::Named("batch")]));
        GraphProto { node: body_nodes, name: "decoder_step".into(), initializer: Vec::new(), input, output }
    }

    /// The decoder's position embedding at `step` (an INT64 scalar), `[hidden]`.
    fn positions_at(&mut self, kind: Positions, table: Option<&str>, step: &str, d: usize) -> String {
        let offset = match kind {
            Positions::Learned { offset, .. } | Positions::Sinusoidal { offset } => offset,
        };
        let shift = self.scalar_i64(offset);
        let index = self.node("Add", &[step, &shift], vec![]);
        match table {
            Some(table) => self.node("Gather", &[table, &index], vec![]),
            None => {
                let axes = self.const_i64(&[0]);
                let index = self.node("Unsqueeze", &[&index, &axes], vec![]);
                self.sinusoid(&index, d)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `data/ipa-model-variants.csv`'s parameter counts, millions.
    fn published(model: Seq2SeqModel) -> f64 {
        match model.name() {
            "distilbart-xsum-1-1" => 82.9,
            "distilbart-xsum-12-1" => 221.5,
            "distilbart-xsum-6-6" => 229.9,
            "distilbart-xsum-12-3" => 255.1,
            "distilbart-xsum-9-6" => 267.7,
            "distilbart-xsum-12-6" => 305.5,
            "opus-mt-fr-en" => 74.6,
            "opus-mt-tc-big-fr-en" => 230.6,
            "s2t-small" => 29.5,
            "s2t-medium" => 71.2,
            _ => 267.8,
        }
    }

    #[test]
    fn parameter_counts_match_the_published_models_within_one_percent() {
        for model in Seq2SeqModel::ALL {
            let m = generate(model, 3);
            let want = published(model) * 1e6;
            let rel = (m.parameters as f64 - want).abs() / want;
            assert!(rel < 0.01, "{}: {} parameters, published {want}", model.name(), m.parameters);
        }
    }

    #[test]
    fn names_round_trip() {
        for m in Seq2SeqModel::ALL {
            assert_eq!(Seq2SeqModel::from_name(m.name()), Some(m));
        }
        assert_eq!(Seq2SeqModel::from_name("t5-small"), None);
        assert!(Seq2SeqModel::S2tLarge.takes_audio() && !Seq2SeqModel::OpusMtFrEn.takes_audio());
    }
}
