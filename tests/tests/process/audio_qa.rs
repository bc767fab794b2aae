//! IPA's audio + question-answering pipeline, `deploy/audio-qa.toml` as shipped (two speech
//! variants, one answering): a recording and a question in; the transcript Speech2Text wrote
//! (its filterbank front end, encoder and greedy decoder all in its graph) and the answer found
//! in it out, every stage's variant and node in the answer. The speech stage's variants differ
//! in their models' tensors (wav2vec2 gives scores per frame, Speech2Text writes tokens within
//! a budget); both are profiled as they serve. The transcript is checked against ONNX Runtime
//! run here on the same audio; bad audio is refused with the reason.

use std::path::Path;
use std::time::Duration;

use tidal_common::onnx_signature::ElementType;
use tidal_common::tensor::NamedTensor;
use tidal_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use tidal_proto::inference::ModelMetadataRequest;
use tidal_tests::reference::{from_proto, tidal_request, voice, Reference};
use tidal_tests::*;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recording_is_transcribed_token_by_token_and_a_question_answered_from_it() {
    let _turn = tidal_tests::file_turn(module_path!());
    let work = tempfile::tempdir().unwrap();
    let models = work.path().join("models");
    let out = std::process::Command::new(bin("tidalctl"))
        .args(["models", "generate", "--variants", "s2t-small,wav2vec2-base,roberta-squad2", "--audio-ms", "1000"])
        .arg("--out")
        .arg(&models)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let shipped = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/audio-qa.toml"))
        .expect("deploy/audio-qa.toml");
    let cut = shipped
        .replace(
            "variants = [\"wav2vec2-base\", \"wav2vec2-large\", \"s2t-small\", \"s2t-medium\", \"s2t-large\"]",
            "variants = [\"wav2vec2-base\", \"s2t-small\"]",
        )
        .replace("variants = [\"s2t-small\", \"s2t-medium\", \"s2t-large\"]", "variants = [\"s2t-small\"]")
        .replace("variants = [\"roberta-squad2\", \"xlm-roberta-squad2\"]", "variants = [\"roberta-squad2\"]");
    assert!(
        !cut.contains("\"s2t-medium\"")
            && !cut.contains("\"xlm-roberta-squad2\"")
            && !cut.contains("\"wav2vec2-large\""),
        "the deploy file's variants moved"
    );
    let file = work.path().join("audio-qa.toml");
    std::fs::write(&file, &cut).unwrap();
    // Its first stage alone, to see the transcript it writes.
    let asr = work.path().join("asr.toml");
    let first = &cut[cut.find("[[stages]]").unwrap()..cut.rfind("[[stages]]").unwrap()];
    std::fs::write(&asr, format!("name = \"asr\"\nslo_ms = 8000\n{first}")).unwrap();

    let (_controller, ctl) = start_controller(work.path(), 1.0, &[]);
    let agent = start_agent(
        work.path(),
        AgentOpts { model_dir: &models, controller: Some(&ctl), extra: &["--worker-threads", "1", "--cores", "4"] },
    );
    for f in [&file, &asr] {
        let (ok, printed) = register_task_file(&ctl, f, &models);
        assert!(ok, "{printed}");
    }
    let mut v2 = GrpcInferenceServiceClient::new(channel(&agent.addr).await);
    for task in ["audio-qa", "asr"] {
        wait_model_ready(&v2, task, Duration::from_secs(240)).await;
    }

    let meta = v2.model_metadata(ModelMetadataRequest { name: "audio-qa".into(), version: String::new() }).await;
    let meta = meta.unwrap().into_inner();
    let inputs: Vec<String> = meta.inputs.iter().map(|t| format!("{} {} {:?}", t.name, t.datatype, t.shape)).collect();
    assert_eq!(inputs, ["input_values FP32 [-1, -1]", "question BYTES [-1, 1]"]);

    // The reference transcript: Speech2Text run here on the same second of audio.
    let waveform = voice(16_000);
    let mut reference = Reference::new(&models, &["s2t-small"]);
    let budget = NamedTensor {
        name: "max_new_tokens".into(),
        element: ElementType::Int64,
        shape: vec![1],
        data: 48i64.to_le_bytes().to_vec(),
    };
    let written = reference.run("s2t-small", &[NamedTensor::f32("input_values", vec![1, 16_000], &waveform), budget]);
    let tokens: Vec<u32> = written[0].i64_values().unwrap().iter().map(|&t| t as u32).collect();
    let tokenizer = tokenizers::Tokenizer::from_file(models.join("s2t-small.tokenizer.json")).unwrap();
    let transcript = tokenizer.decode(&tokens, true).unwrap();
    assert!(!transcript.is_empty());
    eprintln!("transcript ({} tokens): {transcript:?}", tokens.len());

    let mut infer = inference_client(&agent.addr).await;
    let question = NamedTensor::strings("question", vec![1, 1], &["who spoke"]);
    let request = tidal_request(
        "audio-qa",
        &[NamedTensor::f32("input_values", vec![1, 16_000], &waveform), question.clone()],
        &[],
    );
    let answer = infer.infer(request).await.unwrap().into_inner();
    let served: Vec<(String, String, String)> =
        answer.stages.iter().map(|s| (s.stage.clone(), s.variant.clone(), s.node.clone())).collect();
    assert_eq!(
        served,
        [
            ("asr".to_string(), "s2t-small".to_string(), agent.node.clone()),
            ("qa".into(), "roberta-squad2".into(), agent.node.clone())
        ]
    );
    let outputs = from_proto(answer.outputs);
    let answer = outputs.iter().find(|t| t.name == "answer").expect("an answer");
    let answer = String::from_utf8(answer.string_values().unwrap()[0].to_vec()).unwrap();
    assert!(transcript.contains(answer.trim()), "answer {answer:?} is not in the transcript {transcript:?}");

    // The transcript the stage writes is what ONNX Runtime wrote.
    let request = tidal_request("asr", &[NamedTensor::f32("input_values", vec![1, 16_000], &waveform)], &["text"]);
    let written = from_proto(infer.infer(request).await.unwrap().into_inner().outputs);
    assert_eq!(written[0].string_values().unwrap(), vec![transcript.as_bytes()]);

    // Bad audio: empty, shorter than one window, longer than 30 s; each refused by reason.
    for (samples, why) in
        [(0, "has shape [1, 0]"), (100, "below the task's least of 400"), (480_001, "above the task's bound")]
    {
        let req = v2_raw_request(
            "audio-qa",
            &[NamedTensor::f32("input_values", vec![1, samples], &voice(samples as usize)), question.clone()],
            &[],
        );
        let err = v2.model_infer(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{samples} samples: {}", err.message());
        assert!(err.message().contains(why), "{samples} samples: {}", err.message());
    }

    // Profiled, each speech variant runs as it serves: wav2vec2 once per recording, Speech2Text
    // writing one token and its most.
    let out = tidal_tests::tls::as_admin(&mut std::process::Command::new(bin("tidalctl")))
        .args(["--controller", &ctl, "profile", "--agent", &agent.control_addr, "--task", "asr"])
        .args(["--cores", "1", "--batches", "1", "--duration-ms", "200", "--repeat", "1"])
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{printed}{}", String::from_utf8_lossy(&out.stderr));
    let lines = |variant: &str| printed.lines().filter(|l| l.starts_with(variant)).collect::<Vec<_>>();
    let (wav2vec2, s2t) = (lines("wav2vec2-base"), lines("s2t-small"));
    assert!(wav2vec2.len() == 1 && !wav2vec2[0].contains("writes"), "{printed}");
    assert_eq!(s2t.len(), 2, "{printed}");
    for tokens in ["writes    1 tokens", "writes   48 tokens"] {
        assert!(s2t.iter().any(|l| l.contains(tokens)), "{tokens}: {printed}");
    }
}
