//! ONNX models of wav2vec2 (speech to text with a CTC head), generated from the published
//! architecture of facebook/wav2vec2-base-960h and -large-960h.
//!
//! The graph takes a float waveform at 16 kHz, `input_values` (FP32 `[batch, samples]`), and
//! gives per-frame character scores, `logits` (FP32 `[batch, frames, 32]`, one frame per 20 ms:
//! 320 samples) over wav2vec2's character vocabulary (`CTC_VOCABULARY`), which a CTC decoder
//! (best path: the top character per frame, repeats merged, blanks dropped) turns into text.
//! The layers are the published ones: a seven-layer convolutional feature encoder (512
//! channels, group-normalised first layer), a feature projection, a grouped convolutional
//! position embedding and a post-norm Transformer encoder; weights come from a seed, the word
//! error rate is the published one, carried as metadata.

use tidal_proto::onnx::{tensor_proto::DataType, GraphProto};

use crate::onnx_graph::{int_attr, ints_attr, model_bytes, value_info, Dim, GeneratedModel, GraphBuilder};
use crate::transformer::Encoder;

/// The waveform, FP32 `[batch, samples]` at `SAMPLE_RATE`.
pub const INPUT: &str = "input_values";
/// Per-frame character scores, FP32 `[batch, frames, 32]`.
pub const OUTPUT: &str = "logits";
/// Samples per second of the waveform the models take.
pub const SAMPLE_RATE: u32 = 16_000;
/// wav2vec2-base-960h's vocabulary, by index: index 0 (`<pad>`) is CTC's blank, `|` separates
/// words.
pub const CTC_VOCABULARY: [&str; 32] = [
    "<pad>", "<s>", "</s>", "<unk>", "|", "E", "T", "A", "O", "N", "I", "H", "S", "R", "D", "L", "U", "M", "W", "C",
    "F", "G", "Y", "P", "B", "V", "K", "'", "X", "J", "Q", "Z",
];
/// The feature encoder's layers: (kernel, stride), 512 channels each.
const CONV_LAYERS: [(i64, i64); 7] = [(10, 5), (3, 2), (3, 2), (3, 2), (3, 2), (2, 2), (2, 2)];
const CONV_CHANNELS: usize = 512;
/// The position embedding's convolution: kernel and groups.
const POSITION_KERNEL: i64 = 128;
const POSITION_GROUPS: i64 = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpeechModel {
    Wav2Vec2Base,
    Wav2Vec2Large,
}

impl SpeechModel {
    pub const ALL: [SpeechModel; 2] = [Self::Wav2Vec2Base, Self::Wav2Vec2Large];

    pub fn name(self) -> &'static str {
        match self {
            Self::Wav2Vec2Base => "wav2vec2-base",
            Self::Wav2Vec2Large => "wav2vec2-large",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }

    /// Published word error rate on LibriSpeech test-clean, percent (IPA's Table 9).
    pub fn word_error_rate(self) -> f64 {
        match self {
            Self::Wav2Vec2Base => 33.85,
            Self::Wav2Vec2Large => 27.65,
        }
    }

    /// Its quality as Tidal's accuracy (higher is better, in percent): 100 − WER, as IPA's
    /// revised artifact scores speech recognition.
    pub fn accuracy(self) -> f64 {
        100.0 - self.word_error_rate()
    }

    fn encoder(self) -> Encoder {
        match self {
            Self::Wav2Vec2Base => Encoder { layers: 12, hidden: 768, heads: 12, ffn: 3072 },
            Self::Wav2Vec2Large => Encoder { layers: 24, hidden: 1024, heads: 16, ffn: 4096 },
        }
    }
}

/// Frames the feature encoder makes of `samples` (0 when too short for one).
pub fn frames(samples: u64) -> u64 {
    CONV_LAYERS.iter().fold(samples, |n, &(k, s)| if n < k as u64 { 0 } else { (n - k as u64) / s as u64 + 1 })
}

/// Builds `model`'s graph with weights drawn from `seed`.
pub fn generate(model: SpeechModel, seed: u64) -> GeneratedModel {
    let e = model.encoder();
    let mut g = GraphBuilder::new(seed);

    // Feature encoder over [batch, 1, samples]: bias-free convolutions, GELU, the first
    // group-normalised with one group per channel.
    let channel_axis = g.const_i64(&[1]);
    let mut x = g.node("Unsqueeze", &[INPUT, &channel_axis], vec![]);
    let mut cin = 1;
    for (i, &(k, s)) in CONV_LAYERS.iter().enumerate() {
        let w = g.weight(&[CONV_CHANNELS as i64, cin, k], (cin * k) as f32, 1.0);
        x = g.node("Conv", &[&x, &w], vec![ints_attr("kernel_shape", &[k]), ints_attr("strides", &[s])]);
        if i == 0 {
            let scale = g.ones(&[CONV_CHANNELS as i64]);
            let shift = g.zeros(&[CONV_CHANNELS as i64]);
            x = g.node("InstanceNormalization", &[&x, &scale, &shift], vec![]);
        }
        x = g.gelu(&x);
        cin = CONV_CHANNELS as i64;
    }
    // [batch, frames, 512], projected to the encoder's width.
    x = g.node("Transpose", &[&x], vec![ints_attr("perm", &[0, 2, 1])]);
    x = g.layer_norm(&x, CONV_CHANNELS);
    x = g.linear(&x, CONV_CHANNELS, e.hidden, 1.0);

    // Position embedding: a grouped convolution over time, its extra last frame dropped.
    let h = e.hidden as i64;
    let t = g.node("Transpose", &[&x], vec![ints_attr("perm", &[0, 2, 1])]);
    let w = g.weight(&[h, h / POSITION_GROUPS, POSITION_KERNEL], (h / POSITION_GROUPS * POSITION_KERNEL) as f32, 0.5);
    let b = g.zeros(&[h]);
    let p = g.node(
        "Conv",
        &[&t, &w, &b],
        vec![
            ints_attr("kernel_shape", &[POSITION_KERNEL]),
            ints_attr("pads", &[POSITION_KERNEL / 2, POSITION_KERNEL / 2]),
            int_attr("group", POSITION_GROUPS),
        ],
    );
    let (start, end, axis) = (g.const_i64(&[0]), g.const_i64(&[-1]), g.const_i64(&[2]));
    let p = g.node("Slice", &[&p, &start, &end, &axis], vec![]);
    let p = g.gelu(&p);
    let p = g.node("Transpose", &[&p], vec![ints_attr("perm", &[0, 2, 1])]);
    x = g.node("Add", &[&x, &p], vec![]);
    x = g.layer_norm(&x, e.hidden);

    // wav2vec2-base-960h takes no attention mask: padding is silence.
    for _ in 0..e.layers {
        x = g.encoder_layer(&x, None, e);
    }
    let vocab = CTC_VOCABULARY.len();
    let w = g.weight(&[h, vocab as i64], h as f32, 1.0);
    let b = g.zeros(&[vocab as i64]);
    let y = g.node("MatMul", &[&x, &w], vec![]);
    g.node_named("Add", &[&y, &b], OUTPUT, vec![]);

    let parameters = g.parameters;
    let graph = GraphProto {
        node: g.nodes,
        name: model.name().to_string(),
        initializer: g.initializers,
        input: vec![value_info(INPUT, DataType::Float, &[Dim::Named("batch"), Dim::Named("samples")])],
        output: vec![value_info(
            OUTPUT,
            DataType::Float,
            &[Dim::Named("batch"), Dim::Named("frames"), Dim::Fixed(vocab as i64)],
        )],
    };
    let doc = format!(
        "{}: CTC speech recognition of 16 kHz audio, {} layers, hidden {}; weights from seed {seed}",
        model.name(),
        e.layers,
        e.hidden
    );
    GeneratedModel { onnx: model_bytes(graph, doc), parameters }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_base_model_has_the_published_parameter_count() {
        // Wav2Vec2ForCTC, facebook/wav2vec2-base-960h: 94,396,320 (IPA's table: 94.4 M).
        let m = generate(SpeechModel::Wav2Vec2Base, 1);
        let rel = (m.parameters as f64 - 94_396_320.0).abs() / 94_396_320.0;
        assert!(rel < 0.01, "{} parameters", m.parameters);
    }

    #[test]
    fn one_second_makes_49_frames_of_20_ms() {
        assert_eq!(frames(16_000), 49);
        assert_eq!(frames(400), 1);
        assert_eq!(frames(399), 0);
        assert_eq!(frames(0), 0);
        assert_eq!(SpeechModel::Wav2Vec2Large.accuracy(), 100.0 - 27.65);
    }
}
