//! ONNX models of the Transformer encoder families of IPA's text stages (BERT, DistilBERT,
//! RoBERTa, XLM-RoBERTa), generated from their published architectures.
//!
//! Each takes batches of token sequences of any length up to its positions, `input_ids` and
//! `attention_mask` (INT64 `[batch, sequence]`, the mask 1 on tokens and 0 on padding, as
//! Hugging Face's exports take them), and gives either class logits (`logits`, FP32
//! `[batch, labels]`, from the first token: sentiment, language identification) or an answer
//! span (`start_logits` and `end_logits`, FP32 `[batch, sequence]`: extractive question
//! answering). Layers, widths, heads, vocabularies and heads are the published ones, so the
//! parameter counts and the compute are real; the weights come from a seed and the quality is
//! the published figure, carried as metadata. Padding is masked out of attention exactly, so
//! a padded sequence gives its unpadded answer.

use tidal_proto::onnx::{tensor_proto::DataType, GraphProto};

use crate::onnx_graph::{int_attr, ints_attr, model_bytes, value_info, Dim, GeneratedModel, GraphBuilder};

/// The token ids, INT64 `[batch, sequence]`.
pub const IDS: &str = "input_ids";
/// 1 on a token, 0 on padding, INT64 `[batch, sequence]`.
pub const MASK: &str = "attention_mask";
/// A classifier's output, FP32 `[batch, labels]`.
pub const LOGITS: &str = "logits";
/// An answer span's scores per token, FP32 `[batch, sequence]`.
pub const START: &str = "start_logits";
pub const END: &str = "end_logits";

/// The text models of IPA's pipelines (`data/ipa-model-variants.csv`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextModel {
    /// distilbert-base-uncased-finetuned-sst-2-english: sentiment, 2 labels.
    DistilbertSst2,
    /// Souvikcmsa/SentimentAnalysisDistillBERT: sentiment, 3 labels.
    DistilbertSentiment,
    /// Souvikcmsa/BERT_sentiment_analysis (BERT base): sentiment, 3 labels.
    BertSentiment,
    /// Souvikcmsa/Roberta_Sentiment_Analysis (RoBERTa large): sentiment, 3 labels.
    RobertaSentiment,
    /// deepset/roberta-base-squad2: extractive question answering.
    RobertaSquad2,
    /// deepset/xlm-roberta-base-squad2: extractive question answering.
    XlmRobertaSquad2,
    /// dinalzein/xlm-roberta-base-finetuned-language-identification: 20 languages.
    XlmRobertaLangid,
}

/// What the encoder's last layer feeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Head {
    /// BERT: a tanh pooler on the first token, then the classifier.
    Pooled { labels: usize },
    /// DistilBERT: a ReLU pre-classifier on the first token, then the classifier.
    PreClassifier { labels: usize },
    /// RoBERTa: a tanh dense layer on the first token, then the output projection.
    Dense { labels: usize },
    /// Start and end scores per token.
    Span,
}

/// An encoder's published shape.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Encoder {
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub ffn: usize,
}

struct Arch {
    encoder: Encoder,
    vocab: usize,
    positions: usize,
    /// RoBERTa's positions start after its padding index (2); BERT's at 0.
    position_offset: usize,
    /// Token type (segment) embeddings: BERT 2, RoBERTa 1, DistilBERT none.
    type_vocab: usize,
    head: Head,
}

const BASE: Encoder = Encoder { layers: 12, hidden: 768, heads: 12, ffn: 3072 };
const BERT_VOCAB: usize = 30522;
const ROBERTA_VOCAB: usize = 50265;
const XLMR_VOCAB: usize = 250002;

impl TextModel {
    pub const ALL: [TextModel; 7] = [
        Self::DistilbertSst2,
        Self::DistilbertSentiment,
        Self::BertSentiment,
        Self::RobertaSentiment,
        Self::RobertaSquad2,
        Self::XlmRobertaSquad2,
        Self::XlmRobertaLangid,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::DistilbertSst2 => "distilbert-sst2",
            Self::DistilbertSentiment => "distilbert-sentiment",
            Self::BertSentiment => "bert-sentiment",
            Self::RobertaSentiment => "roberta-sentiment",
            Self::RobertaSquad2 => "roberta-squad2",
            Self::XlmRobertaSquad2 => "xlm-roberta-squad2",
            Self::XlmRobertaLangid => "xlm-roberta-langid",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }

    /// The published quality in percent (`data/ipa-model-variants.csv`): accuracy for
    /// sentiment and language identification, F1 for question answering.
    pub fn accuracy(self) -> f64 {
        match self {
            Self::DistilbertSst2 => 91.1,
            Self::DistilbertSentiment => 79.63,
            Self::BertSentiment => 79.90,
            Self::RobertaSentiment => 83.03,
            Self::RobertaSquad2 => 82.91,
            Self::XlmRobertaSquad2 => 77.14,
            Self::XlmRobertaLangid => 99.59,
        }
    }

    /// Whether it answers with a span (question answering) rather than class logits.
    pub fn answers_spans(self) -> bool {
        self.arch().head == Head::Span
    }

    /// Its vocabulary's size: token ids run 0..vocab.
    pub fn vocab(self) -> usize {
        self.arch().vocab
    }

    /// Its class names, by logit (none for a span model). The sentiment models' are their
    /// cards'; the language identifier's the twenty languages of papluca's dataset.
    pub fn labels(self) -> Vec<String> {
        let names: &[&str] = match self {
            Self::DistilbertSst2 => &["NEGATIVE", "POSITIVE"],
            Self::DistilbertSentiment | Self::BertSentiment | Self::RobertaSentiment => {
                &["negative", "neutral", "positive"]
            }
            Self::XlmRobertaLangid => &[
                "ar", "bg", "de", "el", "en", "es", "fr", "hi", "it", "ja", "nl", "pl", "pt", "ru", "sw", "th", "tr",
                "ur", "vi", "zh",
            ],
            Self::RobertaSquad2 | Self::XlmRobertaSquad2 => &[],
        };
        names.iter().map(|s| s.to_string()).collect()
    }

    /// The longest sequence it takes, in tokens.
    pub fn max_tokens(self) -> usize {
        let a = self.arch();
        a.positions - a.position_offset
    }

    fn arch(self) -> Arch {
        let bert =
            |head| Arch { encoder: BASE, vocab: BERT_VOCAB, positions: 512, position_offset: 0, type_vocab: 2, head };
        let roberta =
            |encoder, vocab, head| Arch { encoder, vocab, positions: 514, position_offset: 2, type_vocab: 1, head };
        let distil = Encoder { layers: 6, ..BASE };
        let large = Encoder { layers: 24, hidden: 1024, heads: 16, ffn: 4096 };
        match self {
            Self::DistilbertSst2 => Arch { encoder: distil, type_vocab: 0, ..bert(Head::PreClassifier { labels: 2 }) },
            Self::DistilbertSentiment => {
                Arch { encoder: distil, type_vocab: 0, ..bert(Head::PreClassifier { labels: 3 }) }
            }
            Self::BertSentiment => bert(Head::Pooled { labels: 3 }),
            Self::RobertaSentiment => roberta(large, ROBERTA_VOCAB, Head::Dense { labels: 3 }),
            Self::RobertaSquad2 => roberta(BASE, ROBERTA_VOCAB, Head::Span),
            Self::XlmRobertaSquad2 => roberta(BASE, XLMR_VOCAB, Head::Span),
            Self::XlmRobertaLangid => roberta(BASE, XLMR_VOCAB, Head::Dense { labels: 20 }),
        }
    }
}

/// Builds `model`'s graph with weights drawn from `seed`.
pub fn generate(model: TextModel, seed: u64) -> GeneratedModel {
    let a = model.arch();
    let e = a.encoder;
    let mut g = GraphBuilder::new(seed);

    // Embeddings: token, position (0.. or 2.. by the sequence's length), token type 0.
    let word = g.weight(&[a.vocab as i64, e.hidden as i64], e.hidden as f32, 1.0);
    let mut x = g.node("Gather", &[&word, IDS], vec![]);
    let position = g.weight(&[a.positions as i64, e.hidden as i64], e.hidden as f32, 1.0);
    let shape = g.node("Shape", &[IDS], vec![]);
    let one = g.scalar_i64(1);
    let length = g.node("Gather", &[&shape, &one], vec![int_attr("axis", 0)]);
    let start = g.scalar_i64(a.position_offset as i64);
    let end = g.node("Add", &[&length, &start], vec![]);
    let positions = g.node("Range", &[&start, &end, &one], vec![]);
    let position = g.node("Gather", &[&position, &positions], vec![]);
    x = g.node("Add", &[&x, &position], vec![]);
    if a.type_vocab > 0 {
        let types = g.weight(&[a.type_vocab as i64, e.hidden as i64], e.hidden as f32, 1.0);
        let zero = g.scalar_i64(0);
        let first = g.node("Gather", &[&types, &zero], vec![]);
        x = g.node("Add", &[&x, &first], vec![]);
    }
    x = g.layer_norm(&x, e.hidden);

    let bias = g.mask_bias(MASK);
    for _ in 0..e.layers {
        x = g.encoder_layer(&x, Some(&bias), e);
    }

    let h = e.hidden;
    let (outputs, dims): (Vec<&str>, Vec<Dim>) = match a.head {
        Head::Span => {
            let scores = g.linear(&x, h, 2, 1.0);
            for (i, name) in [START, END].into_iter().enumerate() {
                let index = g.scalar_i64(i as i64);
                g.node_named("Gather", &[&scores, &index], name, vec![int_attr("axis", 2)]);
            }
            (vec![START, END], vec![Dim::Named("batch"), Dim::Named("sequence")])
        }
        Head::Pooled { labels } | Head::PreClassifier { labels } | Head::Dense { labels } => {
            let zero = g.scalar_i64(0);
            let first = g.node("Gather", &[&x, &zero], vec![int_attr("axis", 1)]);
            let pooled = g.linear(&first, h, h, 1.0);
            let pooled = match a.head {
                Head::PreClassifier { .. } => g.relu(&pooled),
                _ => g.node("Tanh", &[&pooled], vec![]),
            };
            let w = g.weight(&[h as i64, labels as i64], h as f32, 1.0);
            let b = g.zeros(&[labels as i64]);
            let y = g.node("MatMul", &[&pooled, &w], vec![]);
            g.node_named("Add", &[&y, &b], LOGITS, vec![]);
            (vec![LOGITS], vec![Dim::Named("batch"), Dim::Fixed(labels as i64)])
        }
    };

    let parameters = g.parameters;
    let tokens = [Dim::Named("batch"), Dim::Named("sequence")];
    let graph = GraphProto {
        node: g.nodes,
        name: model.name().to_string(),
        initializer: g.initializers,
        input: vec![value_info(IDS, DataType::Int64, &tokens), value_info(MASK, DataType::Int64, &tokens)],
        output: outputs.iter().map(|o| value_info(o, DataType::Float, &dims)).collect(),
    };
    let doc = format!(
        "{}: {} layers, hidden {}, {} heads, vocabulary {}, up to {} tokens; weights from seed {seed}",
        model.name(),
        e.layers,
        e.hidden,
        e.heads,
        a.vocab,
        model.max_tokens()
    );
    GeneratedModel { onnx: model_bytes(graph, doc), parameters }
}

/// Residual branches' last projections are scaled down (as in the ResNets) so that, with
/// random weights, each token keeps its own representation through the layers instead of all
/// collapsing into one: answers then depend on the input, as a trained model's do.
pub(crate) const RESIDUAL_GAIN: f32 = 0.2;

/// The Transformer blocks, on the shared graph builder (the speech models use them too).
impl GraphBuilder {
    /// `[batch, 1, 1, sequence]`: 0 where `mask` (INT64 `[batch, sequence]`) is 1, −10⁴
    /// where it is 0, added to attention scores so that padding gets no weight.
    pub(crate) fn mask_bias(&mut self, mask: &str) -> String {
        let m = self.node("Cast", &[mask], vec![int_attr("to", DataType::Float as i64)]);
        let one = self.const_f32(&[], &[1.0]);
        let inverted = self.node("Sub", &[&one, &m], vec![]);
        let big = self.const_f32(&[], &[-1e4]);
        let bias = self.node("Mul", &[&inverted, &big], vec![]);
        let axes = self.const_i64(&[1, 2]);
        self.node("Unsqueeze", &[&bias, &axes], vec![])
    }

    /// One post-norm encoder layer (BERT's, wav2vec2-base's): multi-head self-attention and
    /// a GELU feed-forward network, each added back and normalised.
    pub(crate) fn encoder_layer(&mut self, x: &str, mask_bias: Option<&str>, e: Encoder) -> String {
        let attended = self.self_attention(x, mask_bias, e);
        let sum = self.node("Add", &[x, &attended], vec![]);
        let x = self.layer_norm(&sum, e.hidden);
        let up = self.linear(&x, e.hidden, e.ffn, 1.0);
        let up = self.gelu(&up);
        let down = self.linear(&up, e.ffn, e.hidden, RESIDUAL_GAIN);
        let sum = self.node("Add", &[&x, &down], vec![]);
        self.layer_norm(&sum, e.hidden)
    }

    /// Multi-head scaled dot-product self-attention over `[batch, sequence, hidden]`.
    pub(crate) fn self_attention(&mut self, x: &str, mask_bias: Option<&str>, e: Encoder) -> String {
        let d = (e.hidden / e.heads) as i64;
        let split = self.const_i64(&[0, 0, e.heads as i64, d]);
        let heads = |g: &mut Self, perm: &[i64]| {
            let y = g.linear(x, e.hidden, e.hidden, 1.0);
            let y = g.node("Reshape", &[&y, &split], vec![]);
            g.node("Transpose", &[&y], vec![ints_attr("perm", perm)])
        };
        let q = heads(self, &[0, 2, 1, 3]); // [b, h, s, d]
        let k = heads(self, &[0, 2, 3, 1]); // [b, h, d, s]
        let v = heads(self, &[0, 2, 1, 3]);
        let scores = self.node("MatMul", &[&q, &k], vec![]);
        let scale = self.const_f32(&[], &[1.0 / (d as f32).sqrt()]);
        let mut scores = self.node("Mul", &[&scores, &scale], vec![]);
        if let Some(bias) = mask_bias {
            scores = self.node("Add", &[&scores, bias], vec![]);
        }
        let weights = self.node("Softmax", &[&scores], vec![int_attr("axis", -1)]);
        let context = self.node("MatMul", &[&weights, &v], vec![]);
        let context = self.node("Transpose", &[&context], vec![ints_attr("perm", &[0, 2, 1, 3])]);
        let merge = self.const_i64(&[0, 0, e.hidden as i64]);
        let context = self.node("Reshape", &[&context, &merge], vec![]);
        self.linear(&context, e.hidden, e.hidden, RESIDUAL_GAIN)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hugging Face's parameter counts of the fine-tuned models (the CSV's rounded figures
    /// where the model card gives no exact one).
    fn published(model: TextModel) -> f64 {
        match model {
            TextModel::DistilbertSst2 => 66_955_010.0,
            TextModel::DistilbertSentiment => 66.9e6,
            TextModel::BertSentiment => 109.4e6,
            TextModel::RobertaSentiment => 355.3e6,
            TextModel::RobertaSquad2 => 124_056_578.0,
            TextModel::XlmRobertaSquad2 => 277.45e6,
            TextModel::XlmRobertaLangid => 278.0e6,
        }
    }

    #[test]
    fn parameter_counts_match_the_published_models_within_one_percent() {
        for model in [TextModel::DistilbertSst2, TextModel::BertSentiment, TextModel::RobertaSquad2] {
            let m = generate(model, 3);
            let want = published(model);
            let rel = (m.parameters as f64 - want).abs() / want;
            assert!(rel < 0.01, "{}: {} parameters, published {want}", model.name(), m.parameters);
        }
    }

    #[test]
    fn names_round_trip() {
        for m in TextModel::ALL {
            assert_eq!(TextModel::from_name(m.name()), Some(m));
        }
        assert_eq!(TextModel::from_name("gpt2"), None);
        assert_eq!(TextModel::XlmRobertaSquad2.max_tokens(), 512);
        assert!(TextModel::RobertaSquad2.answers_spans() && !TextModel::BertSentiment.answers_spans());
    }
}
