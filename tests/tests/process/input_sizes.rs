//! The planner follows the input sizes requests come in: a task whose variant is profiled at
//! two image sizes is planned one core while its requests are small images and two once they
//! are large, at the same request rate. The agent reports each stage's sizes, the controller
//! keeps their mix over the forecast window, and the one adaptation core plans for it.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tidal_common::onnx_signature::{ElementType, Signature};
use tidal_common::tensor::NamedTensor;
use tidal_proto::v1::{
    ClusterStatusRequest, InferRequest, ProfilePoint, RegisterTaskRequest, StageSpec, StoreProfileRequest, TaskSpec,
    VariantProfile, VariantSpec,
};
use tidal_tests::onnx_models;
use tidal_tests::*;

/// The detector's profile: 200 req/s per core on 8×8 images (192 elements), 6 req/s per core
/// on 32×32 ones (3072), on 1 and 2 cores at batches 1, 2 and 4.
fn profile(node: &str) -> VariantProfile {
    let mut points = Vec::new();
    for (size, per_core) in [(192u64, 200.0), (3072, 6.0)] {
        for cores in [1u32, 2] {
            for batch in [1u32, 2, 4] {
                let tput = per_core * cores as f64;
                let ms = 1000.0 * batch as f64 / tput;
                points.push(ProfilePoint {
                    cores,
                    batch,
                    latency_p50_ms: ms,
                    latency_p99_ms: 1.2 * ms,
                    throughput_rps: tput,
                    size,
                    output_tokens: 0,
                    resident_bytes: 0,
                });
            }
        }
    }
    VariantProfile {
        task: "detect".into(),
        variant: "detector".into(),
        node: node.into(),
        points,
        ..Default::default()
    }
}

fn request(h: i64) -> InferRequest {
    let bias: Vec<u8> = [0f32; 4].iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect();
    let inputs = vec![
        NamedTensor::f32("images", vec![1, 3, h, h], &vec![0.5; (3 * h * h) as usize]),
        NamedTensor {
            name: "scale".into(),
            element: ElementType::Int64,
            shape: vec![1],
            data: 1i64.to_le_bytes().to_vec(),
        },
        NamedTensor { name: "bias".into(), element: ElementType::Fp16, shape: vec![1, 4], data: bias },
    ];
    InferRequest {
        task: "detect".into(),
        inputs: inputs.into_iter().map(NamedTensor::into_proto).collect(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plan_follows_the_input_sizes_requests_come_in() {
    let _turn = tidal_tests::file_turn(module_path!());
    let work = tempfile::tempdir().unwrap();
    let models = work.path().join("models");
    std::fs::create_dir_all(&models).unwrap();
    std::fs::write(models.join("detector.onnx"), onnx_models::detector()).unwrap();
    // Its synthetic profiles stand for the truth: not corrected by the batches served.
    let (_controller, ctl_addr) = start_controller(
        work.path(),
        1.0,
        &["--forecast-window-s", "4", "--no-profile-correction", "--no-slack-routing"],
    );
    let agent = start_agent(
        work.path(),
        AgentOpts { model_dir: &models, controller: Some(&ctl_addr), extra: &["--worker-threads", "1"] },
    );
    let mut ctl = controller_client(&ctl_addr).await;
    wait_reporting(&ctl, &agent.node, "the agent reports").await;

    let signature = Signature::read(&onnx_models::detector()).unwrap();
    let variant = VariantSpec {
        name: "detector".into(),
        model_file: "detector.onnx".into(),
        accuracy: 50.0,
        input_shape: vec![3, 8, 8],
        tensor_names: Default::default(),
        tokenizer_file: String::new(),
        io: None,
        model_sha256: String::new(),
    };
    let stage = StageSpec {
        name: "detect".into(),
        variants: vec![variant],
        inputs: signature.inputs.iter().map(|t| t.to_proto()).collect(),
        outputs: signature.outputs.iter().map(|t| t.to_proto()).collect(),
        ..Default::default()
    };
    let task = TaskSpec { name: "detect".into(), slo_ms: 2000, stages: vec![stage], ..Default::default() };
    ctl.register_task(RegisterTaskRequest { task: Some(task), ..Default::default() }).await.unwrap();
    ctl.store_profile(StoreProfileRequest { profile: Some(profile(&agent.node)) }).await.unwrap();

    // About 8 requests a second throughout, of the size `side` says.
    let side = Arc::new(AtomicI64::new(8));
    let running = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let load = {
        let (side, running) = (side.clone(), running.clone());
        let client = inference_client(&agent.addr).await;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(125));
            while running.load(Ordering::Relaxed) {
                tick.tick().await;
                let mut client = client.clone();
                let req = request(side.load(Ordering::Relaxed));
                // Each in its own task: a slow answer does not slow the rate.
                tokio::spawn(async move { client.infer(req).await.is_ok() });
            }
        })
    };
    let planned_cores = || {
        let ctl = ctl.clone();
        async move {
            let status = ctl.clone().status(ClusterStatusRequest {}).await.ok()?.into_inner();
            let plan = status.plan?;
            let cores: u32 = plan.assignments.iter().filter(|a| a.task == "detect").map(|a| a.millicores).sum();
            Some((cores, plan.notes))
        }
    };
    // Small images: one core carries 8 req/s with room to spare.
    let (small, _) = eventually(Duration::from_secs(60), "a plan for small images", || {
        let planned = planned_cores();
        async move { planned.await.filter(|(c, notes)| *c > 0 && notes.iter().any(|n| n.contains("planned"))) }
    })
    .await;
    assert_eq!(small, 1000, "8 req/s of 8×8 images at 200 req/s per core");
    // Large images at the same rate: 6 req/s per core needs two.
    side.store(32, Ordering::Relaxed);
    let (large, notes) = eventually(Duration::from_secs(60), "a plan for large images", || {
        let planned = planned_cores();
        async move { planned.await.filter(|(c, _)| *c >= 2000) }
    })
    .await;
    assert_eq!(large, 2000, "{notes:?}");
    assert!(!notes.iter().any(|n| n.contains("beyond what was measured")), "{notes:?}");
    running.store(false, Ordering::Relaxed);
    load.await.unwrap();
}
