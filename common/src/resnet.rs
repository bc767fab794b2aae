//! ONNX models of the ResNet family, generated from their architecture.
//!
//! No model hub is reachable, so Tidal builds ResNet18/34/50/101/152 itself: the real layer
//! graph of torchvision's ResNets (v1.5: the stride sits on the 3×3 convolution of a
//! bottleneck), with batch normalisation folded into the convolutions' biases as an inference
//! graph would have it, and weights drawn from a fixed seed. The compute cost of a variant is
//! therefore real; its accuracy is the published top-1 value, carried as metadata.
//! The input resolution is a parameter so that a small machine can serve the models at useful
//! rates.

use tidal_proto::onnx::GraphProto;

use crate::onnx_graph::{int_attr, model_bytes, tensor_info, GraphBuilder};

/// Name of the model's input tensor: `[batch, 3, resolution, resolution]` float32.
pub const INPUT_NAME: &str = "input";
/// Name of the model's output tensor: `[batch, 1000]` float32 logits.
pub const OUTPUT_NAME: &str = "logits";
/// ImageNet classes.
pub const NUM_CLASSES: i64 = 1000;

/// The five depths of the family, with the published ImageNet top-1 accuracy (torchvision).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResNetDepth {
    R18,
    R34,
    R50,
    R101,
    R152,
}

impl ResNetDepth {
    pub const ALL: [ResNetDepth; 5] = [Self::R18, Self::R34, Self::R50, Self::R101, Self::R152];

    pub fn name(self) -> &'static str {
        match self {
            Self::R18 => "resnet18",
            Self::R34 => "resnet34",
            Self::R50 => "resnet50",
            Self::R101 => "resnet101",
            Self::R152 => "resnet152",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.name() == name)
    }

    /// Published ImageNet top-1 accuracy in percent (`shared/data/README.md`).
    pub fn top1_accuracy(self) -> f64 {
        match self {
            Self::R18 => 69.76,
            Self::R34 => 73.31,
            Self::R50 => 76.13,
            Self::R101 => 77.37,
            Self::R152 => 78.31,
        }
    }

    fn blocks_per_stage(self) -> [usize; 4] {
        match self {
            Self::R18 => [2, 2, 2, 2],
            Self::R34 | Self::R50 => [3, 4, 6, 3],
            Self::R101 => [3, 4, 23, 3],
            Self::R152 => [3, 8, 36, 3],
        }
    }

    fn bottleneck(self) -> bool {
        matches!(self, Self::R50 | Self::R101 | Self::R152)
    }
}

pub use crate::onnx_graph::GeneratedModel;

/// Builds the ONNX graph of `depth` for square inputs of `resolution` pixels, with weights
/// drawn from `seed`.
pub fn generate(depth: ResNetDepth, resolution: u32, seed: u64) -> GeneratedModel {
    let mut g = GraphBuilder::new(seed);
    let mut x = INPUT_NAME.to_string();
    x = g.conv(&x, 3, 64, 7, 2, 3, 1.0);
    x = g.relu(&x);
    x = g.max_pool(&x);

    let expansion = if depth.bottleneck() { 4 } else { 1 };
    let mut in_ch = 64;
    for (stage, &blocks) in depth.blocks_per_stage().iter().enumerate() {
        let width = 64 << stage;
        for block in 0..blocks {
            let stride = if stage > 0 && block == 0 { 2 } else { 1 };
            x = if depth.bottleneck() {
                g.bottleneck_block(&x, in_ch, width, stride)
            } else {
                g.basic_block(&x, in_ch, width, stride)
            };
            in_ch = width * expansion;
        }
    }
    x = g.node("GlobalAveragePool", &[&x], vec![]);
    x = g.node("Flatten", &[&x], vec![int_attr("axis", 1)]);
    let fc_w = g.weight(&[NUM_CLASSES, in_ch as i64], in_ch as f32, 1.0);
    let fc_b = g.zeros(&[NUM_CLASSES]);
    g.node_named("Gemm", &[&x, &fc_w, &fc_b], OUTPUT_NAME, vec![int_attr("transB", 1)]);

    let parameters = g.parameters;
    let graph = GraphProto {
        node: g.nodes,
        name: depth.name().to_string(),
        initializer: g.initializers,
        input: vec![tensor_info(INPUT_NAME, &[None, Some(3), Some(resolution as i64), Some(resolution as i64)])],
        output: vec![tensor_info(OUTPUT_NAME, &[None, Some(NUM_CLASSES)])],
    };
    let doc = format!("{} at {resolution}x{resolution}, batch norm folded, weights from seed {seed}", depth.name());
    GeneratedModel { onnx: model_bytes(graph, doc), parameters }
}

/// The ResNet blocks, on the shared graph builder.
impl GraphBuilder {
    fn shortcut(&mut self, x: &str, cin: usize, cout: usize, stride: i64) -> String {
        if stride == 1 && cin == cout {
            x.to_string()
        } else {
            self.conv(x, cin, cout, 1, stride, 0, 1.0)
        }
    }

    /// The residual branch's last convolution is scaled down (as zero-init residuals do) so
    /// that activations stay finite through 150 layers of random weights.
    const RESIDUAL_GAIN: f32 = 0.2;

    fn basic_block(&mut self, x: &str, cin: usize, width: usize, stride: usize) -> String {
        let s = stride as i64;
        let y = self.conv(x, cin, width, 3, s, 1, 1.0);
        let y = self.relu(&y);
        let y = self.conv(&y, width, width, 3, 1, 1, Self::RESIDUAL_GAIN);
        let short = self.shortcut(x, cin, width, s);
        let sum = self.node("Add", &[&y, &short], vec![]);
        self.relu(&sum)
    }

    fn bottleneck_block(&mut self, x: &str, cin: usize, width: usize, stride: usize) -> String {
        let s = stride as i64;
        let out = width * 4;
        let y = self.conv(x, cin, width, 1, 1, 0, 1.0);
        let y = self.relu(&y);
        let y = self.conv(&y, width, width, 3, s, 1, 1.0);
        let y = self.relu(&y);
        let y = self.conv(&y, width, out, 1, 1, 0, Self::RESIDUAL_GAIN);
        let short = self.shortcut(x, cin, out, s);
        let sum = self.node("Add", &[&y, &short], vec![]);
        self.relu(&sum)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use tidal_proto::onnx::{tensor_shape_proto::dimension, type_proto, ModelProto};

    /// torchvision's parameter counts less batch norm's two learned vectors per channel, plus
    /// one folded bias per convolution channel: the same count up to the BN's extra vector.
    fn torchvision_params(depth: ResNetDepth) -> f64 {
        match depth {
            ResNetDepth::R18 => 11_689_512.0,
            ResNetDepth::R34 => 21_797_672.0,
            ResNetDepth::R50 => 25_557_032.0,
            ResNetDepth::R101 => 44_549_160.0,
            ResNetDepth::R152 => 60_192_808.0,
        }
    }

    #[test]
    fn parameter_counts_match_the_published_architectures_within_one_percent() {
        for depth in [ResNetDepth::R18, ResNetDepth::R50] {
            let m = generate(depth, 32, 7);
            let want = torchvision_params(depth);
            let rel = (m.parameters as f64 - want).abs() / want;
            assert!(rel < 0.01, "{}: {} parameters, torchvision {want}", depth.name(), m.parameters);
        }
    }

    #[test]
    fn generation_is_deterministic_for_a_seed_and_differs_across_seeds() {
        let a = generate(ResNetDepth::R18, 32, 1).onnx;
        let b = generate(ResNetDepth::R18, 32, 1).onnx;
        let c = generate(ResNetDepth::R18, 32, 2).onnx;
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn the_graph_declares_a_dynamic_batch_and_the_requested_resolution() {
        let m = ModelProto::decode(generate(ResNetDepth::R18, 48, 1).onnx.as_slice()).unwrap();
        let graph = m.graph.unwrap();
        let Some(type_proto::Value::TensorType(t)) = graph.input[0].r#type.clone().unwrap().value else {
            panic!("input is not a tensor")
        };
        let dims: Vec<_> = t.shape.unwrap().dim.into_iter().map(|d| d.value.unwrap()).collect();
        assert_eq!(dims[0], dimension::Value::DimParam("batch".into()));
        assert_eq!(dims[2], dimension::Value::DimValue(48));
        assert_eq!(graph.output[0].name, OUTPUT_NAME);
    }
}
