//! A Triton model repository moved over as it lies: `tidalctl task import` reads each model's
//! `config.pbtxt` and ONNX file, refuses what Tidal cannot serve with the reason, registers the
//! rest, and an agent started with `--model-dir <repository>` serves them over V2 under the
//! configuration's names, types and shapes.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tidal_common::onnx_signature::ElementType;
use tidal_common::tensor::NamedTensor;
use tidal_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use tidal_proto::inference::ModelMetadataRequest;
use tidal_proto::v1::ClusterStatusRequest;
use tidal_tests::onnx_models;
use tidal_tests::*;

/// The detector as Triton users configure it: batched, the image's channels fixed and its
/// height and width dynamic, dynamic batching, two CPU instances, an accuracy parameter.
const DETECTOR: &str = r#"
name: "detector"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [
  { name: "images", data_type: TYPE_FP32, format: FORMAT_NCHW, dims: [ 3, -1, -1 ] },
  { name: "scale", data_type: TYPE_INT64, dims: [ ] },
  { name: "bias", data_type: TYPE_FP16, dims: [ 4 ] }
]
output [
  { name: "pooled", data_type: TYPE_FP32, dims: [ 3 ] },
  { name: "bias2", data_type: TYPE_FP16, dims: [ 4 ] },
  { name: "next", data_type: TYPE_INT64, dims: [ ] }
]
instance_group [ { count: 2, kind: KIND_CPU } ]
dynamic_batching { preferred_batch_size: [ 4 ], max_queue_delay_microseconds: 500 }
parameters { key: "accuracy" value: { string_value: "37.5" } }
"#;

/// The recurrent step: no batch dimension (max_batch_size 0), its dimensions as the model's.
const RECURRENT: &str = r#"
backend: "onnxruntime"
max_batch_size: 0
input [
  { name: "state", data_type: TYPE_FP32, dims: [ 2, 8 ] },
  { name: "step", data_type: TYPE_INT64, dims: [ ] }
]
output [ { name: "next_state", data_type: TYPE_FP32, dims: [ 2, 8 ] } ]
"#;

/// A stateful model: Triton routes its requests by correlation id, which Tidal does not.
const STATEFUL: &str = r#"
max_batch_size: 0
sequence_batching { max_sequence_idle_microseconds: 5000000 }
"#;

fn model(repo: &Path, name: &str, versions: &[u32], onnx: &[u8], config: &str) {
    for v in versions {
        let dir = repo.join(name).join(v.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("model.onnx"), onnx).unwrap();
    }
    std::fs::write(repo.join(name).join("config.pbtxt"), config).unwrap();
}

fn import(controller: &str, repo: &Path, extra: &[&str]) -> (bool, String) {
    let out = as_admin(&mut Command::new(bin("tidalctl")))
        .args(["--controller", controller, "task", "import", "--triton-repository"])
        .arg(repo)
        .args(["--slo-ms", "5000"])
        .args(extra)
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_triton_repository_is_imported_and_served_where_it_lies() {
    let _turn = tidal_tests::file_turn(module_path!());
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repository");
    // Versions 1 and 2 of the detector: the highest is served, read where it lies.
    model(&repo, "detector", &[1, 2], &onnx_models::detector(), DETECTOR);
    model(&repo, "recurrent", &[1], &onnx_models::recurrent(), RECURRENT);
    model(&repo, "stateful", &[1], &onnx_models::recurrent(), STATEFUL);
    let (_controller, ctl_addr) = start_controller(work.path(), 1.0, &[]);
    let agent = start_agent(
        work.path(),
        AgentOpts { model_dir: &repo, controller: Some(&ctl_addr), extra: &["--worker-threads", "1"] },
    );
    let mut ctl = controller_client(&ctl_addr).await;

    // Checked without registering: the stateful model is refused with the reason, and the
    // detector's dynamic image needs a size to be profiled at.
    let (ok, text) = import(&ctl_addr, &repo, &["--dry-run"]);
    assert!(!ok, "{text}");
    assert!(text.contains("stateful: refused: sequence batching"), "{text}");
    assert!(text.contains("detector: refused: input \"images\" has dynamic dimensions"), "{text}");
    assert!(text.contains("recurrent: recurrent/1/model.onnx"), "{text}");
    let tasks = ctl.status(ClusterStatusRequest {}).await.unwrap().into_inner().tasks;
    assert!(tasks.is_empty(), "a dry run registered {tasks:?}");
    let (ok, text) = import(&ctl_addr, &repo, &["--models", "nothing"]);
    assert!(!ok && text.contains("has no model \"nothing\""), "{text}");

    // The two it can serve.
    let (ok, text) = import(&ctl_addr, &repo, &["--models", "detector,recurrent", "--sample-shape", "detector=3,8,8"]);
    assert!(ok, "{text}");
    assert!(text.contains("detector: detector/2/model.onnx (profiled at [3, 8, 8])"), "{text}");
    assert!(text.contains("note: dynamic batching (preferred sizes [4], queue delay 500 µs)"), "{text}");
    assert!(text.contains("registered task detector") && text.contains("registered task recurrent"), "{text}");
    let tasks = ctl.status(ClusterStatusRequest {}).await.unwrap().into_inner().tasks;
    let spec = |t: &tidal_proto::v1::TaskStatus| t.spec.clone().unwrap_or_default();
    let detector = tasks.iter().map(spec).find(|t| t.name == "detector").expect("the detector's task");
    assert_eq!(detector.stages[0].variants[0].accuracy, 37.5);

    // The controller places both (unprofiled: a core each); V2 serves them by their names.
    let mut v2 = GrpcInferenceServiceClient::new(channel(&agent.addr).await);
    for name in ["detector", "recurrent"] {
        wait_model_ready(&v2, name, Duration::from_secs(90)).await;
    }
    let meta = v2.model_metadata(ModelMetadataRequest { name: "detector".into(), version: String::new() }).await;
    let described: Vec<(String, String, Vec<i64>)> = meta
        .unwrap()
        .into_inner()
        .inputs
        .iter()
        .map(|t| (t.name.clone(), t.datatype.clone(), t.shape.clone()))
        .collect();
    assert_eq!(
        described,
        [
            ("images".to_string(), "FP32".to_string(), vec![-1, 3, -1, -1]),
            ("scale".into(), "INT64".into(), vec![-1]),
            ("bias".into(), "FP16".into(), vec![-1, 4])
        ]
    );

    // A 5×7 image of 1s, 2s and 3s by channel, scale 2: pooled is [2, 4, 6], next 3.
    let image: Vec<f32> = (1..=3).flat_map(|c| std::iter::repeat_n(c as f32, 35)).collect();
    let bias: Vec<u8> = [0.5f32, -1.0, 2.0, 0.25].iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect();
    let inputs = vec![
        NamedTensor::f32("images", vec![1, 3, 5, 7], &image),
        NamedTensor {
            name: "scale".into(),
            element: ElementType::Int64,
            shape: vec![1],
            data: 2i64.to_le_bytes().to_vec(),
        },
        NamedTensor { name: "bias".into(), element: ElementType::Fp16, shape: vec![1, 4], data: bias },
    ];
    let answer = v2.model_infer(v2_raw_request("detector", &inputs, &[])).await.unwrap().into_inner();
    let outputs = v2_raw_outputs(answer);
    let names: Vec<&str> = outputs.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["pooled", "bias2", "next"]);
    assert_eq!(outputs[0].f32_values().unwrap(), vec![2.0, 4.0, 6.0]);
    let doubled: Vec<f32> =
        outputs[1].data.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect();
    assert_eq!(doubled, vec![1.0, -2.0, 4.0, 0.5]);
    assert_eq!(outputs[2].data, 3i64.to_le_bytes().to_vec());

    // The recurrent step, whole tensors (no batch dimension): tanh(0 + 4) and 5.
    let inputs = vec![
        NamedTensor::f32("state", vec![2, 8], &[0.0; 16]),
        NamedTensor {
            name: "step".into(),
            element: ElementType::Int64,
            shape: vec![],
            data: 4i64.to_le_bytes().to_vec(),
        },
    ];
    let answer = v2.model_infer(v2_raw_request("recurrent", &inputs, &["next_step"])).await.unwrap().into_inner();
    let outputs = v2_raw_outputs(answer);
    assert_eq!((outputs.len(), outputs[0].name.as_str()), (1, "next_step"));
    assert_eq!(outputs[0].data, 5i64.to_le_bytes().to_vec());
    let answer = v2.model_infer(v2_raw_request("recurrent", &inputs, &["next_state"])).await.unwrap().into_inner();
    let state = v2_raw_outputs(answer)[0].f32_values().unwrap();
    assert!(state.iter().all(|v| (v - 4f32.tanh()).abs() < 1e-6), "{state:?}");
}
