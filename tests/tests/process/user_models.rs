//! Models a user brings, unlike the generator's — several named inputs and outputs, an INT64
//! scalar per sample, FP16, dynamic height and width, a model without a batch dimension, a
//! two-stage pipeline joined by a named connection — served through an agent on Tidal's API,
//! V2 over gRPC (raw and typed contents) and V2 over REST (JSON and binary), each answer
//! compared with ONNX Runtime's own in-process answer for the same input (same library, one
//! intra-op thread, as the agent's workers run here); bad input refused with the reason while
//! the requests beside it are answered.

use std::path::Path;

use tidal_common::onnx_signature::{ElementType, Signature};
use tidal_common::tensor::NamedTensor;
use tidal_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use tidal_proto::inference::model_infer_request::InferInputTensor;
use tidal_proto::inference::{InferTensorContents, ModelConfigRequest, ModelInferRequest, ModelMetadataRequest};
use tidal_proto::v1::{
    ApplyPlanRequest, Assignment, Connection, InferRequest, Plan, ProfileRequest, StageSpec, TaskSpec, VariantSpec,
};
use tidal_tests::onnx_models;
use tidal_tests::reference::{floats, from_proto, halves, int64s, tidal_request, Reference};
use tidal_tests::*;
use tonic::Code;

/// The model files, their signatures and the agent.
struct Served {
    agent: Agent,
    models: std::path::PathBuf,
    _work: tempfile::TempDir,
}

fn variant(name: &str, input_shape: &[i64]) -> VariantSpec {
    VariantSpec {
        name: name.into(),
        model_file: format!("{name}.onnx"),
        accuracy: 50.0,
        input_shape: input_shape.to_vec(),
        tensor_names: Default::default(),
        tokenizer_file: String::new(),
        io: None,
        model_sha256: String::new(),
    }
}

fn stage(name: &str, models: &Path, v: VariantSpec) -> StageSpec {
    let sig = Signature::read(&std::fs::read(models.join(&v.model_file)).unwrap()).unwrap();
    StageSpec {
        name: name.into(),
        variants: vec![v],
        inputs: sig.inputs.iter().map(|t| t.to_proto()).collect(),
        outputs: sig.outputs.iter().map(|t| t.to_proto()).collect(),
        ..Default::default()
    }
}

fn assignment(task: &str, stage: &str, v: &VariantSpec, node: &str, batch: u32) -> Assignment {
    Assignment {
        task: task.into(),
        stage: stage.into(),
        variant: Some(v.clone()),
        node: node.into(),
        millicores: 400,
        max_batch: batch,
        max_delay_ms: if batch > 1 { 20 } else { 0 },
        weight: 1.0,
        replica: 0,
        memory_bytes: 0,
    }
}

/// An agent serving three tasks: `detect` (the detector alone), `step` (the recurrent model)
/// and `chain` (detector, then the head fed `pooled` as its `features`).
async fn serve() -> Served {
    let work = tempfile::tempdir().unwrap();
    let models = work.path().join("models");
    std::fs::create_dir_all(&models).unwrap();
    for (name, bytes) in
        [("detector", onnx_models::detector()), ("head", onnx_models::head()), ("recurrent", onnx_models::recurrent())]
    {
        std::fs::write(models.join(format!("{name}.onnx")), bytes).unwrap();
    }
    let agent =
        start_agent(work.path(), AgentOpts { model_dir: &models, controller: None, extra: &["--worker-threads", "1"] });
    let (det, head, rec) = (variant("detector", &[3, 8, 8]), variant("head", &[]), variant("recurrent", &[2, 8]));
    let mut head_stage = stage("head", &models, head.clone());
    head_stage.connect = vec![Connection { output: "pooled".into(), input: "features".into() }];
    // The task bounds the image's height and width (the pipeline's first stage does not).
    let mut detect_stage = stage("detect", &models, det.clone());
    detect_stage.inputs[0].max_shape = vec![0, 3, 16, 16];
    let tasks = vec![
        TaskSpec { name: "detect".into(), slo_ms: 5000, stages: vec![detect_stage], ..Default::default() },
        TaskSpec {
            name: "step".into(),
            slo_ms: 5000,
            stages: vec![stage("step", &models, rec.clone())],
            ..Default::default()
        },
        TaskSpec {
            name: "chain".into(),
            slo_ms: 5000,
            stages: vec![stage("detect", &models, det.clone()), head_stage],
            ..Default::default()
        },
    ];
    let node = agent.node.clone();
    let plan = Plan {
        epoch: 1,
        term: 1,
        tasks,
        assignments: vec![
            assignment("detect", "detect", &det, &node, 4),
            assignment("step", "step", &rec, &node, 4),
            assignment("chain", "detect", &det, &node, 4),
            assignment("chain", "head", &head, &node, 4),
        ],
        ..Default::default()
    };
    let mut control = agent_client(&agent.control_addr).await;
    control.apply_plan(ApplyPlanRequest { plan: Some(plan), ..Default::default() }).await.expect("the plan is applied");
    wait_ready(&agent.control_addr, 4).await;
    Served { agent, models, _work: work }
}

/// Deterministic values in [-1, 1).
fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// One detector request: an image of `h`×`w`, a scale and a bias, with batch dimensions of 1.
fn detector_inputs(h: i64, w: i64, seed: u64) -> Vec<NamedTensor> {
    let bias: Vec<u8> = noise(4, seed + 1).iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect();
    vec![
        NamedTensor::f32("images", vec![1, 3, h, w], &noise((3 * h * w) as usize, seed)),
        NamedTensor {
            name: "scale".into(),
            element: ElementType::Int64,
            shape: vec![1],
            data: (seed as i64 % 7 + 1).to_le_bytes().to_vec(),
        },
        NamedTensor { name: "bias".into(), element: ElementType::Fp16, shape: vec![1, 4], data: bias },
    ]
}

/// Samples stacked along their batch dimension of 1.
fn stacked(samples: &[Vec<NamedTensor>]) -> Vec<NamedTensor> {
    (0..samples[0].len())
        .map(|i| {
            let mut t = samples[0][i].clone();
            t.shape[0] = samples.len() as i64;
            t.data = samples.iter().flat_map(|s| s[i].data.clone()).collect();
            t
        })
        .collect()
}

/// Equal to the reference: the same names, types and shapes; FP32 within 1e-5 relative (the
/// batch a request joins may change the last bits), every other type exactly.
fn assert_same(got: &[NamedTensor], want: &[NamedTensor], what: &str) {
    let names =
        |ts: &[NamedTensor]| ts.iter().map(|t| (t.name.clone(), t.element, t.shape.clone())).collect::<Vec<_>>();
    assert_eq!(names(got), names(want), "{what}: outputs");
    for (g, w) in got.iter().zip(want) {
        if g.element == ElementType::Fp32 {
            let worst = floats(&g.data)
                .iter()
                .zip(floats(&w.data))
                .map(|(a, b)| (a - b).abs() / b.abs().max(1e-6))
                .fold(0.0f32, f32::max);
            assert!(worst <= 1e-5, "{what}: {} differs by {worst} (relative)", g.name);
        } else {
            assert_eq!(g.data, w.data, "{what}: {}", g.name);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_unlike_the_generator_s_answer_as_onnx_runtime_does_on_every_front() {
    let _turn = tidal_tests::file_turn(module_path!());
    let s = serve().await;
    let mut reference = Reference::new(&s.models, &["detector", "head", "recurrent"]);
    let mut infer = inference_client(&s.agent.addr).await;
    let mut v2 = GrpcInferenceServiceClient::new(channel(&s.agent.addr).await);

    // Tidal's API: requests of two image sizes at once, on one worker that batches up to 4:
    // requests batch only with requests of their own shapes, and each gets its own answer.
    let requests: Vec<Vec<NamedTensor>> =
        (0..8).map(|i| if i % 2 == 0 { detector_inputs(4, 6, i) } else { detector_inputs(5, 5, i) }).collect();
    let calls = requests.iter().map(|inputs| {
        let mut client = infer.clone();
        let req = tidal_request("detect", inputs, &[]);
        async move { client.infer(req).await }
    });
    let answers = futures::future::join_all(calls).await;
    for (i, (inputs, answer)) in requests.iter().zip(answers).enumerate() {
        let answer = answer.unwrap_or_else(|e| panic!("request {i}: {e}")).into_inner();
        assert!(answer.output.is_none(), "named inputs are answered with named outputs");
        assert_same(
            &from_proto(answer.outputs),
            &reference.run("detector", inputs),
            &format!("Tidal API, request {i}"),
        );
    }
    // Only the outputs asked for.
    let one = infer.infer(tidal_request("detect", &requests[0], &["next"])).await.unwrap().into_inner();
    let want: Vec<NamedTensor> =
        reference.run("detector", &requests[0]).into_iter().filter(|t| t.name == "next").collect();
    assert_same(&from_proto(one.outputs), &want, "Tidal API, the output asked for");

    // A model without a batch dimension: its tensors whole, a scalar among them.
    let state = NamedTensor::f32("state", vec![2, 8], &noise(16, 99));
    let step = NamedTensor {
        name: "step".into(),
        element: ElementType::Int64,
        shape: vec![],
        data: 3i64.to_le_bytes().to_vec(),
    };
    let step_inputs = vec![state.clone(), step.clone()];
    let got = infer.infer(tidal_request("step", &step_inputs, &[])).await.unwrap().into_inner();
    assert_same(&from_proto(got.outputs), &reference.run("recurrent", &step_inputs), "Tidal API, recurrent step");

    // The pipeline: the head takes the detector's `pooled` as its `features` (the task's
    // connection) and its `next` by name.
    let chain = infer.infer(tidal_request("chain", &requests[1], &[])).await.unwrap().into_inner();
    let first = reference.run("detector", &requests[1]);
    let mut head_in: Vec<NamedTensor> = first.into_iter().filter(|t| t.name == "pooled" || t.name == "next").collect();
    head_in[0].name = "features".into();
    assert_same(&from_proto(chain.outputs), &reference.run("head", &head_in), "the pipeline");
    assert_eq!(chain.stages.len(), 2);

    // V2 over gRPC: two samples in one request (raw contents), stacked as the model's batch.
    let pair = stacked(&[detector_inputs(4, 6, 20), detector_inputs(4, 6, 21)]);
    let got = v2.model_infer(v2_raw_request("detect", &pair, &[])).await.unwrap().into_inner();
    assert_same(&v2_raw_outputs(got), &reference.run("detector", &pair), "V2 gRPC, two samples");
    let got = v2.model_infer(v2_raw_request("detect", &pair, &["bias2"])).await.unwrap().into_inner();
    assert_eq!(got.outputs.iter().map(|o| o.name.as_str()).collect::<Vec<_>>(), ["bias2"]);
    // Typed contents: FP32 and INT64 values in their own fields.
    let typed = ModelInferRequest {
        model_name: "step".into(),
        inputs: vec![
            InferInputTensor {
                name: "state".into(),
                datatype: "FP32".into(),
                shape: vec![2, 8],
                contents: Some(InferTensorContents { fp32_contents: floats(&state.data), ..Default::default() }),
                ..Default::default()
            },
            InferInputTensor {
                name: "step".into(),
                datatype: "INT64".into(),
                shape: vec![],
                contents: Some(InferTensorContents { int64_contents: vec![3], ..Default::default() }),
                ..Default::default()
            },
        ],
        ..Default::default()
    };
    let got = v2.model_infer(typed).await.unwrap().into_inner();
    assert_same(&v2_raw_outputs(got), &reference.run("recurrent", &step_inputs), "V2 gRPC, typed contents");

    // V2's description of the models, as the files declare them.
    let meta = v2.model_metadata(ModelMetadataRequest { name: "detect".into(), version: String::new() }).await;
    let meta = meta.unwrap().into_inner();
    let described: Vec<(String, String, Vec<i64>)> =
        meta.inputs.iter().map(|t| (t.name.clone(), t.datatype.clone(), t.shape.clone())).collect();
    assert_eq!(
        described,
        [
            ("images".to_string(), "FP32".to_string(), vec![-1, 3, -1, -1]),
            ("scale".into(), "INT64".into(), vec![-1]),
            ("bias".into(), "FP16".into(), vec![-1, 4]),
        ]
    );
    assert_eq!(meta.outputs.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), ["pooled", "bias2", "next"]);
    let config = v2.model_config(ModelConfigRequest { name: "detect".into(), version: String::new() }).await;
    let config = config.unwrap().into_inner().config.unwrap();
    assert_eq!((config.max_batch_size, config.input[0].dims.clone()), (64, vec![3, -1, -1]));
    let config = v2.model_config(ModelConfigRequest { name: "step".into(), version: String::new() }).await;
    let config = config.unwrap().into_inner().config.unwrap();
    assert_eq!((config.max_batch_size, config.input[1].dims.clone()), (0, vec![]), "no batch dimension");

    // V2 over REST: JSON for every type (FP16 as numbers), then binary for one input beside
    // JSON for the others.
    let json_of = |t: &NamedTensor| -> serde_json::Value {
        match t.element {
            ElementType::Fp32 => serde_json::json!(floats(&t.data)),
            ElementType::Int64 => serde_json::json!(int64s(&t.data)),
            ElementType::Fp16 => serde_json::json!(halves(&t.data).iter().map(|h| h.to_f32()).collect::<Vec<_>>()),
            _ => unreachable!(),
        }
    };
    let inputs = &requests[2];
    let body = serde_json::json!({
        "inputs": inputs.iter().map(|t| serde_json::json!({
            "name": t.name, "datatype": t.element.v2_name(), "shape": t.shape, "data": json_of(t)
        })).collect::<Vec<_>>(),
    });
    let (code, _, body) =
        http_exchange(&s.agent.addr, "POST", "/v2/models/detect/infer", &[], body.to_string().as_bytes()).await;
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    let got: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let want = reference.run("detector", inputs);
    for (o, w) in got["outputs"].as_array().unwrap().iter().zip(&want) {
        assert_eq!((o["name"].as_str(), o["datatype"].as_str()), (Some(w.name.as_str()), Some(w.element.v2_name())));
        assert_eq!(o["shape"], serde_json::json!(w.shape));
        let values: Vec<f64> = o["data"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        let expected: Vec<f64> = json_of(w).as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        for (g, e) in values.iter().zip(&expected) {
            assert!((g - e).abs() <= 1e-5 * e.abs().max(1e-6), "REST JSON {}: {g} against {e}", w.name);
        }
    }
    let head = serde_json::json!({
        "inputs": [
            {"name": "images", "datatype": "FP32", "shape": inputs[0].shape, "data": json_of(&inputs[0])},
            {"name": "scale", "datatype": "INT64", "shape": inputs[1].shape, "data": json_of(&inputs[1])},
            {"name": "bias", "datatype": "FP16", "shape": inputs[2].shape, "parameters": {"binary_data_size": inputs[2].data.len()}},
        ],
        "outputs": [{"name": "bias2", "parameters": {"binary_data": true}}],
    })
    .to_string();
    let mut body = head.clone().into_bytes();
    body.extend_from_slice(&inputs[2].data);
    let header = head.len().to_string();
    let (code, headers, body) = http_exchange(
        &s.agent.addr,
        "POST",
        "/v2/models/detect/infer",
        &[("inference-header-content-length", header.as_str())],
        &body,
    )
    .await;
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    let json_len: usize = headers["inference-header-content-length"].parse().unwrap();
    let bias2 = want.iter().find(|t| t.name == "bias2").unwrap();
    assert_eq!(&body[json_len..], &bias2.data[..], "REST binary: bias2 bit for bit");

    // Bad input, refused with the reason, while good requests beside it are answered.
    let good = requests[0].clone();
    let mut bad: Vec<(&str, InferRequest)> = Vec::new();
    let with = |f: &dyn Fn(&mut Vec<NamedTensor>)| {
        let mut inputs = good.clone();
        f(&mut inputs);
        tidal_request("detect", &inputs, &[])
    };
    bad.push(("an unknown input", with(&|t| t[0].name = "image".into())));
    bad.push(("a missing input", with(&|t| drop(t.remove(1)))));
    bad.push(("a wrong type", with(&|t| t[1].element = ElementType::Fp64)));
    bad.push(("a wrong rank", with(&|t| t[0].shape = vec![1, 3, 24])));
    bad.push(("a wrong fixed dimension", with(&|t| t[0].shape = vec![1, 2, 6, 6])));
    bad.push(("a batch of two", with(&|t| t[2].shape = vec![2, 2])));
    bad.push(("a height above the task's bound", tidal_request("detect", &detector_inputs(17, 6, 3), &[])));
    bad.push(("data of the wrong length", with(&|t| t[0].data.truncate(10))));
    bad.push(("an unknown output", tidal_request("detect", &good, &["boxes"])));
    bad.push(("an unnamed input to a model of three", {
        let mut r = tidal_request("detect", &[], &[]);
        r.input = Some(good[0].clone().into_proto());
        r
    }));
    let goods = (0..6).map(|_| {
        let mut client = infer.clone();
        let req = tidal_request("detect", &good, &[]);
        async move { client.infer(req).await.map(|r| r.into_inner()) }
    });
    let bads = bad.into_iter().map(|(what, req)| {
        let mut client = infer.clone();
        async move { (what, client.infer(req).await) }
    });
    let (goods, bads) = futures::future::join(futures::future::join_all(goods), futures::future::join_all(bads)).await;
    for (what, r) in bads {
        let status = r.expect_err(what);
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        assert!(!status.message().is_empty(), "{what}");
    }
    let want = reference.run("detector", &good);
    for g in goods {
        assert_same(&from_proto(g.expect("a good request beside bad ones").outputs), &want, "beside bad requests");
    }
    // V2's own ways to go wrong.
    let mut fewer = v2_raw_request("detect", &pair, &[]);
    fewer.raw_input_contents.pop();
    let mut fp16_typed = v2_raw_request("detect", &requests[0], &[]);
    fp16_typed.raw_input_contents.clear();
    for input in &mut fp16_typed.inputs {
        input.contents = Some(InferTensorContents { fp32_contents: vec![0.0], ..Default::default() });
    }
    let mut ragged = v2_raw_request("detect", &pair, &[]);
    ragged.inputs[1].shape = vec![1];
    ragged.raw_input_contents[1].truncate(8);
    for (what, req) in [
        ("raw contents for two of three inputs", fewer),
        ("typed contents of the wrong type", fp16_typed),
        ("inputs of different batches", ragged),
    ] {
        let status = v2.model_infer(req).await.expect_err(what);
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
    }
    // The agent still serves.
    let again = infer.infer(tidal_request("detect", &good, &[])).await.unwrap().into_inner();
    assert_same(&from_proto(again.outputs), &want, "after the bad requests");

    // The profiler feeds every input the model takes: the first at the variant's sample
    // shape, the others as declared; with a batch dimension and without.
    let mut control = agent_client(&s.agent.control_addr).await;
    let profiled =
        [(variant("detector", &[3, 8, 8]), 2), (variant("recurrent", &[2, 8]), 1), (variant("head", &[]), 2)];
    for (v, measured) in profiled {
        let request = ProfileRequest {
            variant: Some(v.clone()),
            cores: vec![1],
            batches: vec![1, 2],
            duration_ms: 200,
            samples: vec![],
            text: None,
        };
        let points = control.profile(request).await.unwrap_or_else(|e| panic!("profiling {}: {e}", v.name));
        let points = points.into_inner().points;
        assert_eq!(points.len(), measured, "{}: a model without a batch dimension is measured at batch 1", v.name);
        assert!(points.iter().all(|p| p.throughput_rps > 0.0 && p.latency_p50_ms > 0.0), "{}: {points:?}", v.name);
        let own: i64 = v.input_shape.iter().product();
        assert!(points.iter().all(|p| p.size == own as u64), "{}: measured at its own size: {points:?}", v.name);
    }

    // With the user's own requests: each input size among them is measured (three samples of
    // 8×8 and 32×32 images: sizes 192 and 3072), and each point says its size.
    let sample = |h: i64, seed: u64| tidal_proto::v1::ProfileSample {
        inputs: detector_inputs(h, h, seed).into_iter().map(NamedTensor::into_proto).collect(),
    };
    let mut request = ProfileRequest {
        variant: Some(variant("detector", &[3, 8, 8])),
        cores: vec![1],
        batches: vec![1, 2],
        duration_ms: 300,
        samples: vec![sample(8, 1), sample(32, 2), sample(8, 3)],
        text: None,
    };
    let points = control.profile(request.clone()).await.expect("profiled with samples").into_inner().points;
    let grid: Vec<(u32, u64)> = points.iter().map(|p| (p.batch, p.size)).collect();
    assert_eq!(grid, vec![(1, 192), (2, 192), (1, 3072), (2, 3072)]);
    let time =
        |batch: u32, size: u64| points.iter().find(|p| (p.batch, p.size) == (batch, size)).unwrap().latency_p50_ms;
    eprintln!(
        "detector p50 by size: batch 1 {:.3} → {:.3} ms, batch 2 {:.3} → {:.3} ms",
        time(1, 192),
        time(1, 3072),
        time(2, 192),
        time(2, 3072)
    );
    // A sample the model does not take is refused with which one and why.
    let mut bad = sample(8, 4);
    bad.inputs.truncate(2);
    request.samples = vec![sample(8, 1), bad];
    let err = control.profile(request).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("sample 2") && err.message().contains("\"bias\" is missing"), "{}", err.message());
}

/// Triton's own Python client, over gRPC and HTTP (binary and JSON), with NumPy arrays of
/// several types, checked in the script against ONNX Runtime's Python API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tritonclient_sends_typed_numpy_inputs_and_gets_onnx_runtime_s_answers() {
    let _turn = tidal_tests::file_turn(module_path!());
    let tools = match outside_clients() {
        Ok(d) => d,
        Err(why) => return eprintln!("SKIPPED (not run): {why}"),
    };
    let ort_py = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tidal/ort-py");
    if !ort_py.join("onnxruntime").exists() {
        return eprintln!("SKIPPED (not run): ONNX Runtime's Python package is not in .tidal/ort-py (make setup)");
    }
    let s = serve().await;
    let mut cmd = std::process::Command::new("python3");
    cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/user_models_check.py"))
        .args(["--url", &s.agent.addr])
        .arg("--models")
        .arg(&s.models)
        .env("PYTHONPATH", format!("{}:{}", tools.join("py").display(), ort_py.display()));
    let out = tokio::task::spawn_blocking(move || cmd.output()).await.unwrap().unwrap();
    assert!(out.status.success(), "user_models_check.py failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let cases = report.as_object().unwrap();
    assert_eq!(cases.len(), 9, "{report}");
    eprintln!("tritonclient: {report}");
    let failed: Vec<_> = cases.iter().filter(|(_, v)| v.as_str() != Some("ok")).collect();
    assert!(failed.is_empty(), "tritonclient cases that failed: {failed:?}");
}

/// A text model's requests of different lengths share a batch: the task pads `input_ids` and
/// `attention_mask` to the longest of the batch (the mask padded with 0) and cuts `kept` back
/// to each request's length; every answer is the model's answer for the request alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_of_different_lengths_are_padded_into_one_batch_and_answered_as_alone() {
    let _turn = tidal_tests::file_turn(module_path!());
    use tidal_proto::v1::{Padding, Trim};
    let work = tempfile::tempdir().unwrap();
    let models = work.path().join("models");
    std::fs::create_dir_all(&models).unwrap();
    std::fs::write(models.join("tokens.onnx"), onnx_models::tokens()).unwrap();
    let agent =
        start_agent(work.path(), AgentOpts { model_dir: &models, controller: None, extra: &["--worker-threads", "1"] });
    let v = variant("tokens", &[16]);
    let mut encode = stage("encode", &models, v.clone());
    encode.pad =
        ["input_ids", "attention_mask"].map(|input| Padding { input: input.into(), axis: 1, value: 0.0 }).to_vec();
    encode.trim = vec![Trim { output: "kept".into(), axis: 1 }];
    let task = TaskSpec { name: "text".into(), slo_ms: 5000, stages: vec![encode], ..Default::default() };
    tidal_common::task::validate_task(&task).unwrap();
    // Batches of up to 4, gathered for up to 300 ms: the three requests below meet.
    let mut batching = assignment("text", "encode", &v, &agent.node, 4);
    batching.max_delay_ms = 300;
    let plan = Plan { epoch: 1, term: 1, tasks: vec![task], assignments: vec![batching], ..Default::default() };
    let mut control = agent_client(&agent.control_addr).await;
    control.apply_plan(ApplyPlanRequest { plan: Some(plan), ..Default::default() }).await.expect("the plan is applied");
    wait_ready(&agent.control_addr, 1).await;

    let int64 = |name: &str, values: &[i64]| NamedTensor {
        name: name.into(),
        element: ElementType::Int64,
        shape: vec![1, values.len() as i64],
        data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    };
    // Ids 1..=len, the last one masked out.
    let request = |len: i64| {
        let ids: Vec<i64> = (1..=len).collect();
        let mask: Vec<i64> = (1..=len).map(|i| i64::from(i < len)).collect();
        vec![int64("input_ids", &ids), int64("attention_mask", &mask)]
    };
    let infer = inference_client(&agent.addr).await;
    // Lengths 5, 7 and 6 round up to 8: one batch.
    let calls = [5, 7, 6].map(|len| {
        let mut client = infer.clone();
        let req = tidal_request("text", &request(len), &[]);
        async move { client.infer(req).await }
    });
    let answers = futures::future::join_all(calls).await;
    for (len, answer) in [5i64, 7, 6].into_iter().zip(answers) {
        let answer = answer.unwrap().into_inner();
        assert_eq!(answer.batch_size, 3, "the three lengths shared one batch");
        let outputs = from_proto(answer.outputs);
        let kept: Vec<i64> = (1..=len).map(|i| if i < len { i } else { 0 }).collect();
        assert_eq!((outputs[0].name.as_str(), outputs[0].shape.clone()), ("kept", vec![1, len]));
        assert_eq!(int64s(&outputs[0].data), kept, "length {len}");
        assert_eq!(int64s(&outputs[1].data), vec![kept.iter().sum::<i64>()], "length {len}");
    }
    // Ids and mask of different lengths: refused with the reason.
    let mut infer = infer;
    let uneven = vec![int64("input_ids", &[1, 2, 3]), int64("attention_mask", &[1, 1])];
    let err = infer.infer(tidal_request("text", &uneven, &[])).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("input_ids 3, attention_mask 2"), "{}", err.message());
}

/// Two variants of one stage whose models name their tensors otherwise: the second variant's
/// config maps the stage's names to its model's (`[names]`), `tidalctl task register` checks
/// them under the stage's names (and refuses the stage without the map), and the agent feeds
/// and reads the second model by its own names while requests and answers carry the stage's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_variant_whose_model_names_its_tensors_otherwise_serves_under_the_stage_s_names() {
    let _turn = tidal_tests::file_turn(module_path!());
    let work = tempfile::tempdir().unwrap();
    let models = work.path().join("models");
    std::fs::create_dir_all(&models).unwrap();
    let theirs = [
        ("images", "pixels"),
        ("scale", "k"),
        ("bias", "offset"),
        ("pooled", "means"),
        ("bias2", "offset2"),
        ("next", "k1"),
    ];
    std::fs::write(models.join("detector.onnx"), onnx_models::detector()).unwrap();
    std::fs::write(models.join("other.onnx"), onnx_models::renamed(&onnx_models::detector(), &theirs)).unwrap();
    let config = |name: &str, names: &str| {
        format!("name = \"{name}\"\nmodel_file = \"{name}.onnx\"\naccuracy = 50.0\ninput_shape = [3, 8, 8]\n{names}")
    };
    std::fs::write(models.join("detector.toml"), config("detector", "")).unwrap();
    let map: String = theirs.iter().map(|(stage, model)| format!("{stage} = \"{model}\"\n")).collect();
    std::fs::write(models.join("other.toml"), config("other", "")).unwrap();
    let (_controller, ctl_addr) = start_controller(work.path(), 60.0, &[]);
    let register = || {
        let out = as_admin(&mut std::process::Command::new(bin("tidalctl")))
            .args(["--controller", &ctl_addr, "task", "register", "--name", "detect", "--slo-ms", "2000"])
            .arg("--model-dir")
            .arg(&models)
            .args(["--variants", "detector,other"])
            .output()
            .unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (ok, err) = register();
    assert!(!ok && err.contains("variant \"other\" does not take and give what \"detector\" does"), "{err}");
    std::fs::write(models.join("other.toml"), config("other", &format!("[names]\n{map}"))).unwrap();
    let (ok, err) = register();
    assert!(ok, "{err}");
    // A map naming a tensor the model does not have is refused.
    std::fs::write(models.join("other.toml"), config("other", "[names]\nimages = \"picture\"\n")).unwrap();
    let (ok, err) = register();
    assert!(!ok && err.contains("the model has no \"picture\""), "{err}");

    // Served by the renamed model alone, under the stage's names.
    let status = controller_client(&ctl_addr).await.status(tidal_proto::v1::ClusterStatusRequest {}).await;
    let task = status.unwrap().into_inner().tasks[0].spec.clone().unwrap();
    assert_eq!(task.stages[0].inputs[0].name, "images");
    let other = task.stages[0].variants.iter().find(|v| v.name == "other").unwrap().clone();
    assert_eq!(other.tensor_names.get("images").map(String::as_str), Some("pixels"));
    let agent =
        start_agent(work.path(), AgentOpts { model_dir: &models, controller: None, extra: &["--worker-threads", "1"] });
    let plan = Plan {
        epoch: 1,
        term: 1,
        tasks: vec![task],
        assignments: vec![assignment("detect", "detect", &other, &agent.node, 2)],
        ..Default::default()
    };
    let mut control = agent_client(&agent.control_addr).await;
    control.apply_plan(ApplyPlanRequest { plan: Some(plan), ..Default::default() }).await.expect("the plan is applied");
    wait_ready(&agent.control_addr, 1).await;
    let inputs = detector_inputs(8, 8, 5);
    let mut reference = Reference::new(&models, &["detector"]);
    let want = reference.run("detector", &inputs);
    let mut infer = inference_client(&agent.addr).await;
    let got = infer.infer(tidal_request("detect", &inputs, &[])).await.unwrap().into_inner();
    assert_same(&from_proto(got.outputs), &want, "the renamed model");
    let mut v2 = GrpcInferenceServiceClient::new(channel(&agent.addr).await);
    let got = v2.model_infer(v2_raw_request("detect", &inputs, &["pooled"])).await.unwrap().into_inner();
    assert_same(&v2_raw_outputs(got), &want[..1], "V2, one output by the stage's name");
}
