//! The models `tidalctl models generate` can make, by variant name: the ResNet family
//! (classifiers), the YOLOv5 family (detectors, IPA's video pipeline), a downsampling stage
//! (a pipeline's preprocessing: 2×2 average pooling, `[3, r, r]` → `[3, r/2, r/2]`, so that a
//! classifier at half the resolution can follow it), and the text and speech models of IPA's
//! other pipelines (Transformer encoders, wav2vec2).

use tidal_proto::onnx::GraphProto;

use crate::onnx_graph::{ints_attr, model_bytes, tensor_info, GeneratedModel, GraphBuilder};
use crate::resnet::{self, ResNetDepth};
use crate::seq2seq::{self, Seq2SeqModel};
use crate::speech::{self, SpeechModel};
use crate::transformer::{self, TextModel};
use crate::yolo::{self, YoloSize};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    ResNet(ResNetDepth),
    Yolo(YoloSize),
    Downsample,
    Text(TextModel),
    Speech(SpeechModel),
    Seq2Seq(Seq2SeqModel),
}

/// Every name `from_name` knows, for help and error messages.
pub const NAMES: &str = "resnet18, resnet34, resnet50, resnet101, resnet152, yolov5n, yolov5s, yolov5m, yolov5l, \
yolov5x, downsample, distilbert-sst2, distilbert-sentiment, bert-sentiment, roberta-sentiment, roberta-squad2, \
xlm-roberta-squad2, xlm-roberta-langid, wav2vec2-base, wav2vec2-large, distilbart-xsum-1-1, distilbart-xsum-12-1, \
distilbart-xsum-6-6, distilbart-xsum-12-3, distilbart-xsum-9-6, distilbart-xsum-12-6, opus-mt-fr-en, \
opus-mt-tc-big-fr-en, s2t-small, s2t-medium, s2t-large";

/// The size of one sample each kind of model is profiled at, by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SampleSize {
    /// An image's side, pixels.
    pub resolution: u32,
    /// A text's length, tokens.
    pub tokens: u32,
    /// A recording's length, milliseconds (at 16 kHz).
    pub audio_ms: u32,
}

impl ModelKind {
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "downsample" => Some(Self::Downsample),
            _ => ResNetDepth::from_name(name)
                .map(Self::ResNet)
                .or_else(|| YoloSize::from_name(name).map(Self::Yolo))
                .or_else(|| TextModel::from_name(name).map(Self::Text))
                .or_else(|| SpeechModel::from_name(name).map(Self::Speech))
                .or_else(|| Seq2SeqModel::from_name(name).map(Self::Seq2Seq)),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::ResNet(d) => d.name(),
            Self::Yolo(s) => s.name(),
            Self::Downsample => "downsample",
            Self::Text(m) => m.name(),
            Self::Speech(m) => m.name(),
            Self::Seq2Seq(m) => m.name(),
        }
    }

    /// The quality metadata the variant carries, percent: a classifier's published top-1, a
    /// detector's published mAP, a text model's accuracy or F1, a speech model's 100 − WER;
    /// 100 for a stage that loses nothing a later stage needs.
    pub fn accuracy(self) -> f64 {
        match self {
            Self::ResNet(d) => d.top1_accuracy(),
            Self::Yolo(s) => s.map(),
            Self::Downsample => 100.0,
            Self::Text(m) => m.accuracy(),
            Self::Speech(m) => m.accuracy(),
            Self::Seq2Seq(m) => m.accuracy(),
        }
    }

    /// The size of the vocabulary its tokenizer needs: a model that reads or writes text.
    pub fn vocab(self) -> Option<usize> {
        match self {
            Self::Text(m) => Some(m.vocab()),
            Self::Seq2Seq(m) => Some(m.vocab()),
            _ => None,
        }
    }

    /// Whether its input is an image (whose side `--resolution` sets in the graph).
    pub fn takes_images(self) -> bool {
        matches!(self, Self::ResNet(_) | Self::Yolo(_) | Self::Downsample)
    }

    /// One sample of its first input at `size`: `[3, r, r]` pixels, `[tokens]` token ids,
    /// `[samples]` of audio.
    pub fn input_shape(self, size: SampleSize) -> Vec<i64> {
        match self {
            Self::Text(m) => vec![i64::from(size.tokens).min(m.max_tokens() as i64)],
            Self::Speech(_) => vec![i64::from(size.audio_ms) * i64::from(speech::SAMPLE_RATE) / 1000],
            Self::Seq2Seq(m) if m.takes_audio() => {
                vec![i64::from(size.audio_ms) * i64::from(speech::SAMPLE_RATE) / 1000]
            }
            Self::Seq2Seq(m) => vec![i64::from(size.tokens).min(m.max_tokens() as i64)],
            _ => vec![3, i64::from(size.resolution), i64::from(size.resolution)],
        }
    }

    /// The model, images at `resolution` pixels (the text and speech models take any length).
    pub fn generate(self, resolution: u32, seed: u64) -> GeneratedModel {
        match self {
            Self::ResNet(d) => resnet::generate(d, resolution, seed),
            Self::Yolo(s) => yolo::generate(s, resolution, seed),
            Self::Downsample => downsample(resolution),
            Self::Text(m) => transformer::generate(m, seed),
            Self::Speech(m) => speech::generate(m, seed),
            Self::Seq2Seq(m) => seq2seq::generate(m, seed),
        }
    }
}

/// 2×2 average pooling of a `[batch, 3, r, r]` image (r even).
fn downsample(resolution: u32) -> GeneratedModel {
    let r = resolution as i64;
    let mut g = GraphBuilder::new(0);
    g.node_named(
        "AveragePool",
        &[resnet::INPUT_NAME],
        "output",
        vec![ints_attr("kernel_shape", &[2, 2]), ints_attr("strides", &[2, 2])],
    );
    let graph = GraphProto {
        node: g.nodes,
        name: "downsample".into(),
        input: vec![tensor_info(resnet::INPUT_NAME, &[None, Some(3), Some(r), Some(r)])],
        output: vec![tensor_info("output", &[None, Some(3), Some(r / 2), Some(r / 2)])],
        ..Default::default()
    };
    GeneratedModel { onnx: model_bytes(graph, format!("2x2 average pooling of {r}x{r} images")), parameters: 0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn names_round_trip_and_the_downsampler_halves_the_image() {
        for name in NAMES.split(", ") {
            let name = name.trim();
            assert_eq!(ModelKind::from_name(name).map(|k| k.name()), Some(name));
        }
        assert_eq!(ModelKind::from_name("yolov9"), None);
        let m = ModelKind::Downsample.generate(64, 1);
        let model = tidal_proto::onnx::ModelProto::decode(&m.onnx[..]).unwrap();
        let graph = model.graph.unwrap();
        assert_eq!(graph.node[0].op_type, "AveragePool");
        let dims = |v: &tidal_proto::onnx::ValueInfoProto| match &v.r#type.as_ref().unwrap().value {
            Some(tidal_proto::onnx::type_proto::Value::TensorType(t)) => t.shape.as_ref().unwrap().dim.len(),
            _ => 0,
        };
        assert_eq!(dims(&graph.output[0]), 4);
    }
}
