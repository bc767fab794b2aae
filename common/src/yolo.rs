//! ONNX models of the YOLOv5 family (v6.0 and later), generated from their architecture, as
//! the detection stage of IPA's video pipeline.
//!
//! The graph is Ultralytics' YOLOv5: a CSP backbone (a 6×6 stem, C3 blocks, SPPF), a PANet
//! neck and the three-scale detection head, with batch normalisation folded into the
//! convolutions and SiLU activations; the n/s/m/l/x sizes come from the same width and depth
//! multiples, so parameter counts match the published ones. The head's outputs are decoded in
//! the graph, as an exported YOLOv5 does it: one row per anchor and cell, `[cx, cy, w, h,
//! objectness, 80 class scores]`, box coordinates in input pixels. Weights are drawn from a
//! seed: the compute cost is real, the detections are not; the accuracy is the published mAP,
//! carried as metadata.

use tidal_proto::onnx::GraphProto;

use crate::onnx_graph::{int_attr, ints_attr, model_bytes, str_attr, tensor_info, GeneratedModel, GraphBuilder};

/// Name of the model's input: `[batch, 3, resolution, resolution]` float32.
pub const INPUT_NAME: &str = "images";
/// Name of the output: `[batch, boxes, 85]` float32.
pub const OUTPUT_NAME: &str = "detections";
/// COCO classes.
pub const NUM_CLASSES: i64 = 80;
/// Values per detection row: box (4), objectness, class scores.
pub const ROW: i64 = 5 + NUM_CLASSES;
/// Each head level's three anchors, (w, h) in pixels, and its stride.
const ANCHORS: [([f32; 6], i64); 3] = [
    ([10.0, 13.0, 16.0, 30.0, 33.0, 23.0], 8),
    ([30.0, 61.0, 62.0, 45.0, 59.0, 119.0], 16),
    ([116.0, 90.0, 156.0, 198.0, 373.0, 326.0], 32),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum YoloSize {
    N,
    S,
    M,
    L,
    X,
}

impl YoloSize {
    pub const ALL: [YoloSize; 5] = [Self::N, Self::S, Self::M, Self::L, Self::X];

    pub fn name(self) -> &'static str {
        match self {
            Self::N => "yolov5n",
            Self::S => "yolov5s",
            Self::M => "yolov5m",
            Self::L => "yolov5l",
            Self::X => "yolov5x",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }

    /// Published COCO mAP@0.5 (IPA's Table 7, `data/ipa-model-variants.csv`).
    pub fn map(self) -> f64 {
        match self {
            Self::N => 45.7,
            Self::S => 56.8,
            Self::M => 64.1,
            Self::L => 67.3,
            Self::X => 68.9,
        }
    }

    /// (depth multiple, width multiple), as in the models' YAML files.
    fn multiples(self) -> (f64, f64) {
        match self {
            Self::N => (0.33, 0.25),
            Self::S => (0.33, 0.50),
            Self::M => (0.67, 0.75),
            Self::L => (1.0, 1.0),
            Self::X => (1.33, 1.25),
        }
    }
}

/// Rows of detections a model at `resolution` outputs per image.
pub fn boxes(resolution: u32) -> i64 {
    ANCHORS.iter().map(|(_, stride)| 3 * (resolution as i64 / stride).pow(2)).sum()
}

/// Builds the ONNX graph of `size` for square inputs of `resolution` pixels (a multiple of
/// 32), with weights drawn from `seed`.
pub fn generate(size: YoloSize, resolution: u32, seed: u64) -> GeneratedModel {
    let (depth, width) = size.multiples();
    let ch = |c: i64| (((c as f64 * width) / 8.0).ceil() * 8.0) as usize;
    let n = |k: usize| ((k as f64 * depth).round() as usize).max(1);
    let mut g = Yolo { g: GraphBuilder::new(seed) };
    let (c1, c2, c3, c4, c5) = (ch(64), ch(128), ch(256), ch(512), ch(1024));

    // Backbone.
    let x = g.conv(INPUT_NAME, 3, c1, 6, 2, 2);
    let x = g.conv(&x, c1, c2, 3, 2, 1);
    let x = g.c3(&x, c2, c2, n(3), true);
    let x = g.conv(&x, c2, c3, 3, 2, 1);
    let p3 = g.c3(&x, c3, c3, n(6), true);
    let x = g.conv(&p3, c3, c4, 3, 2, 1);
    let p4 = g.c3(&x, c4, c4, n(9), true);
    let x = g.conv(&p4, c4, c5, 3, 2, 1);
    let x = g.c3(&x, c5, c5, n(3), true);
    let x = g.sppf(&x, c5, c5);

    // Neck (PANet) and the three outputs.
    let h5 = g.conv(&x, c5, c4, 1, 1, 0);
    let x = g.upsample(&h5);
    let x = g.g.node("Concat", &[&x, &p4], vec![int_attr("axis", 1)]);
    let x = g.c3(&x, 2 * c4, c4, n(3), false);
    let h4 = g.conv(&x, c4, c3, 1, 1, 0);
    let x = g.upsample(&h4);
    let x = g.g.node("Concat", &[&x, &p3], vec![int_attr("axis", 1)]);
    let out3 = g.c3(&x, 2 * c3, c3, n(3), false);
    let x = g.conv(&out3, c3, c3, 3, 2, 1);
    let x = g.g.node("Concat", &[&x, &h4], vec![int_attr("axis", 1)]);
    let out4 = g.c3(&x, 2 * c3, c4, n(3), false);
    let x = g.conv(&out4, c4, c4, 3, 2, 1);
    let x = g.g.node("Concat", &[&x, &h5], vec![int_attr("axis", 1)]);
    let out5 = g.c3(&x, 2 * c4, c5, n(3), false);

    // Detect: a 1×1 convolution per level to 3 anchors × 85, decoded.
    let mut levels = Vec::new();
    for ((out, cin), (anchors, stride)) in [(out3, c3), (out4, c4), (out5, c5)].iter().zip(ANCHORS) {
        let fan_in = *cin as f32;
        let w = g.g.weight(&[3 * ROW, *cin as i64, 1, 1], fan_in, 1.0);
        let b = g.g.zeros(&[3 * ROW]);
        let raw = g.g.node("Conv", &[out, &w, &b], vec![ints_attr("kernel_shape", &[1, 1])]);
        levels.push(g.decode(&raw, resolution as i64 / stride, stride, &anchors));
    }
    let refs: Vec<&str> = levels.iter().map(String::as_str).collect();
    g.g.node_named("Concat", &refs, OUTPUT_NAME, vec![int_attr("axis", 1)]);

    let parameters = g.g.parameters;
    let r = resolution as i64;
    let graph = GraphProto {
        node: g.g.nodes,
        name: size.name().to_string(),
        initializer: g.g.initializers,
        input: vec![tensor_info(INPUT_NAME, &[None, Some(3), Some(r), Some(r)])],
        output: vec![tensor_info(OUTPUT_NAME, &[None, Some(boxes(resolution)), Some(ROW)])],
    };
    let doc = format!("{} at {r}x{r}, batch norm folded, decoded head, weights from seed {seed}", size.name());
    GeneratedModel { onnx: model_bytes(graph, doc), parameters }
}

/// YOLOv5's modules on the shared graph builder.
struct Yolo {
    g: GraphBuilder,
}

impl Yolo {
    /// The bottleneck's last convolution is scaled down, as for the ResNets, so that
    /// activations stay finite through the residual chain with random weights.
    const RESIDUAL_GAIN: f32 = 0.2;

    /// Conv: convolution (batch norm folded) and SiLU.
    fn conv(&mut self, x: &str, cin: usize, cout: usize, k: i64, stride: i64, pad: i64) -> String {
        self.conv_gain(x, cin, cout, k, stride, pad, 1.0)
    }

    #[allow(clippy::too_many_arguments)]
    fn conv_gain(&mut self, x: &str, cin: usize, cout: usize, k: i64, stride: i64, pad: i64, gain: f32) -> String {
        let y = self.g.conv(x, cin, cout, k, stride, pad, gain);
        let s = self.g.node("Sigmoid", &[&y], vec![]);
        self.g.node("Mul", &[&y, &s], vec![])
    }

    fn bottleneck(&mut self, x: &str, c: usize, shortcut: bool) -> String {
        let y = self.conv(x, c, c, 1, 1, 0);
        let gain = if shortcut { Self::RESIDUAL_GAIN } else { 1.0 };
        let y = self.conv_gain(&y, c, c, 3, 1, 1, gain);
        if shortcut {
            self.g.node("Add", &[x, &y], vec![])
        } else {
            y
        }
    }

    /// C3: two 1×1 branches, one through `n` bottlenecks, concatenated and merged.
    fn c3(&mut self, x: &str, cin: usize, cout: usize, n: usize, shortcut: bool) -> String {
        let c = cout / 2;
        let mut a = self.conv(x, cin, c, 1, 1, 0);
        for _ in 0..n {
            a = self.bottleneck(&a, c, shortcut);
        }
        let b = self.conv(x, cin, c, 1, 1, 0);
        let cat = self.g.node("Concat", &[&a, &b], vec![int_attr("axis", 1)]);
        self.conv(&cat, 2 * c, cout, 1, 1, 0)
    }

    /// SPPF: three chained 5×5 max pools, concatenated with their input.
    fn sppf(&mut self, x: &str, cin: usize, cout: usize) -> String {
        let c = cin / 2;
        let x = self.conv(x, cin, c, 1, 1, 0);
        let pool = |g: &mut GraphBuilder, x: &str| {
            g.node(
                "MaxPool",
                &[x],
                vec![
                    ints_attr("kernel_shape", &[5, 5]),
                    ints_attr("strides", &[1, 1]),
                    ints_attr("pads", &[2, 2, 2, 2]),
                ],
            )
        };
        let y1 = pool(&mut self.g, &x);
        let y2 = pool(&mut self.g, &y1);
        let y3 = pool(&mut self.g, &y2);
        let cat = self.g.node("Concat", &[&x, &y1, &y2, &y3], vec![int_attr("axis", 1)]);
        self.conv(&cat, 4 * c, cout, 1, 1, 0)
    }

    fn upsample(&mut self, x: &str) -> String {
        let scales = self.g.const_f32(&[4], &[1.0, 1.0, 2.0, 2.0]);
        self.g.node("Resize", &[x, "", &scales], vec![str_attr("mode", "nearest")])
    }

    /// One head level's raw `[b, 3·85, n, n]` to `[b, 3·n·n, 85]` rows: sigmoid, then
    /// xy = (2σ − 0.5 + cell)·stride and wh = (2σ)²·anchor.
    fn decode(&mut self, raw: &str, cells: i64, stride: i64, anchors: &[f32; 6]) -> String {
        let g = &mut self.g;
        let shape = g.const_i64(&[-1, 3, ROW, cells, cells]);
        let x = g.node("Reshape", &[raw, &shape], vec![]);
        let x = g.node("Transpose", &[&x], vec![ints_attr("perm", &[0, 1, 3, 4, 2])]);
        let y = g.node("Sigmoid", &[&x], vec![]);
        let axis = g.const_i64(&[4]);
        let slice = |g: &mut GraphBuilder, from: i64, to: i64| {
            let (starts, ends) = (g.const_i64(&[from]), g.const_i64(&[to]));
            g.node("Slice", &[&y, &starts, &ends, &axis], vec![])
        };
        let xy = slice(g, 0, 2);
        let wh = slice(g, 2, 4);
        let rest = slice(g, 4, ROW);
        let s = stride as f32;
        let mut offsets = Vec::with_capacity((3 * cells * cells * 2) as usize);
        for _ in 0..3 {
            for gy in 0..cells {
                for gx in 0..cells {
                    offsets.extend([(gx as f32 - 0.5) * s, (gy as f32 - 0.5) * s]);
                }
            }
        }
        let two_s = g.const_f32(&[1], &[2.0 * s]);
        let offsets = g.const_f32(&[1, 3, cells, cells, 2], &offsets);
        let xy = g.node("Mul", &[&xy, &two_s], vec![]);
        let xy = g.node("Add", &[&xy, &offsets], vec![]);
        let two = g.const_f32(&[1], &[2.0]);
        let wh = g.node("Mul", &[&wh, &two], vec![]);
        let wh = g.node("Mul", &[&wh, &wh], vec![]);
        let anchor = g.const_f32(&[1, 3, 1, 1, 2], anchors);
        let wh = g.node("Mul", &[&wh, &anchor], vec![]);
        let rows = g.node("Concat", &[&xy, &wh, &rest], vec![int_attr("axis", 4)]);
        let flat = g.const_i64(&[-1, 3 * cells * cells, ROW]);
        g.node("Reshape", &[&rows, &flat], vec![])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_counts_match_the_published_sizes_within_three_percent() {
        // Published counts include batch norm's two vectors per channel, folded away here.
        for (size, published) in [(YoloSize::N, 1.9e6), (YoloSize::S, 7.2e6), (YoloSize::M, 21.2e6)] {
            let p = generate(size, 64, 1).parameters as f64;
            assert!((p - published).abs() / published < 0.03, "{}: {p} parameters, published {published}", size.name());
        }
    }

    #[test]
    fn the_output_has_a_row_per_anchor_and_cell() {
        assert_eq!(boxes(64), 3 * (64 + 16 + 4));
        assert_eq!(boxes(640), 25_200, "as YOLOv5 at 640×640");
        assert_eq!(YoloSize::from_name("yolov5m"), Some(YoloSize::M));
        assert_eq!(generate(YoloSize::N, 64, 3).onnx, generate(YoloSize::N, 64, 3).onnx, "deterministic");
    }
}
