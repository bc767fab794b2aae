//! IPA's speech and text stages served end to end: `deploy/audio-sentiment.toml` as shipped
//! (its variants cut to one each, to keep the test small) registered with `tidalctl`, placed by
//! a controller and served by an agent: audio in, the transcript's sentiment out, as a label
//! (V2 BYTES) beside the logits, every stage's variant and node in the answer. Each answer is
//! checked against ONNX Runtime in this process running the same models on the same audio, with
//! the CTC decoding and the tokenizer between them. And a text task: text in over V2 (raw,
//! typed and JSON contents), bad text refused with the reason.

use std::path::Path;
use std::time::Duration;

use tidal_common::onnx_signature::ElementType;
use tidal_common::tensor::NamedTensor;
use tidal_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use tidal_proto::inference::model_infer_request::InferInputTensor;
use tidal_proto::inference::{InferTensorContents, ModelInferRequest, ModelMetadataRequest};
use tidal_tests::reference::{from_proto, tidal_request, voice, Reference};
use tidal_tests::*;
use tonic::Code;

/// The CTC vocabulary of the deploy file (wav2vec2-base-960h's).
fn vocabulary() -> Vec<String> {
    tidal_common::speech::CTC_VOCABULARY.iter().map(|s| s.to_string()).collect()
}

fn tokens(tokenizer: &Path, text: &str) -> Vec<i64> {
    let t = tokenizers::Tokenizer::from_file(tokenizer).unwrap();
    t.encode(text, true).unwrap().get_ids().iter().map(|&i| i64::from(i)).collect()
}

fn int64(name: &str, values: &[i64]) -> NamedTensor {
    NamedTensor {
        name: name.into(),
        element: ElementType::Int64,
        shape: vec![1, values.len() as i64],
        data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speech_then_sentiment_answers_the_transcript_s_label_with_every_stage_named() {
    let _turn = tidal_tests::file_turn(module_path!());
    let work = tempfile::tempdir().unwrap();
    let models = work.path().join("models");
    let out = std::process::Command::new(bin("tidalctl"))
        .args(["models", "generate", "--variants", "wav2vec2-base,distilbert-sentiment", "--tokens", "32"])
        .args(["--audio-ms", "1000", "--out"])
        .arg(&models)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // The shipped pipeline, one variant per stage.
    let shipped = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/audio-sentiment.toml"))
        .expect("deploy/audio-sentiment.toml");
    // wav2vec2 alone in the speech stage: Speech2Text's group goes with its variants.
    let group = &shipped[shipped.find("[[stages.group]]").expect("the speech stage's group")
        ..shipped.find("[[stages]]\nname = \"sentiment\"").expect("the sentiment stage")];
    let cut = shipped
        .replace(group, "")
        .replace(
            "variants = [\"wav2vec2-base\", \"wav2vec2-large\", \"s2t-small\", \"s2t-medium\", \"s2t-large\"]",
            "variants = [\"wav2vec2-base\"]",
        )
        .replace(
            "variants = [\"distilbert-sentiment\", \"bert-sentiment\", \"roberta-sentiment\"]",
            "variants = [\"distilbert-sentiment\"]",
        );
    assert_ne!(cut, shipped, "the deploy file's variants moved; update this test");
    let file = work.path().join("audio-sentiment.toml");
    std::fs::write(&file, &cut).unwrap();
    // A text task of the same model: text in, at most 16 tokens, nothing cut.
    let text_task = work.path().join("sentiment.toml");
    std::fs::write(
        &text_task,
        "name = \"sentiment\"\nslo_ms = 4000\n[[stages]]\nname = \"sentiment\"\nvariants = [\"distilbert-sentiment\"]\n\
         [stages.tokenize]\ntext = \"text\"\nids = \"input_ids\"\nmask = \"attention_mask\"\nmax_tokens = 16\n\
         [[stages.decode]]\nname = \"label\"\nlabels = { output = \"logits\", labels = [\"negative\", \"neutral\", \"positive\"] }\n",
    )
    .unwrap();

    let (_controller, ctl) = start_controller(work.path(), 1.0, &[]);
    let agent = start_agent(
        work.path(),
        AgentOpts { model_dir: &models, controller: Some(&ctl), extra: &["--worker-threads", "1", "--cores", "4"] },
    );
    // A tokenizer that is not there is refused at registration, by name. Checked before any
    // task uses the file: a worker starting while it is moved away would load no tokenizer
    // (the CI failure of 2026-12-06: "tokenizer …: No such file or directory" at the first
    // request, long after the file was back).
    let broken = work.path().join("broken.toml");
    std::fs::write(&broken, std::fs::read_to_string(&text_task).unwrap().replace("sentiment\"\nslo", "broken\"\nslo"))
        .unwrap();
    let saved = models.join("distilbert-sentiment.tokenizer.json");
    std::fs::rename(&saved, models.join("moved.json")).unwrap();
    let (ok, text) = register_task_file(&ctl, &broken, &models);
    assert!(!ok && text.contains("tokenizer file \"distilbert-sentiment.tokenizer.json\" does not exist"), "{text}");
    std::fs::rename(models.join("moved.json"), &saved).unwrap();
    let (ok, text) = register_task_file(&ctl, &file, &models);
    assert!(ok, "{text}");
    let (ok, text) = register_task_file(&ctl, &text_task, &models);
    assert!(ok, "{text}");

    let mut v2 = GrpcInferenceServiceClient::new(channel(&agent.addr).await);
    wait_model_ready(&v2, "audio-sent", Duration::from_secs(180)).await;
    wait_model_ready(&v2, "sentiment", Duration::from_secs(180)).await;

    // What the pipeline takes and gives on the wire.
    let meta = v2.model_metadata(ModelMetadataRequest { name: "audio-sent".into(), version: String::new() }).await;
    let meta = meta.unwrap().into_inner();
    let described = |ts: &[tidal_proto::inference::model_metadata_response::TensorMetadata]| -> Vec<String> {
        ts.iter().map(|t| format!("{} {} {:?}", t.name, t.datatype, t.shape)).collect()
    };
    assert_eq!(described(&meta.inputs), ["input_values FP32 [-1, -1]"]);
    assert_eq!(described(&meta.outputs), ["logits FP32 [-1, 3]", "label BYTES [-1, 1]"]);

    // The reference: the same models in this process, the transcript decoded and tokenized
    // between them as the deploy file says.
    let waveform = voice(16_000);
    let mut reference = Reference::new(&models, &["wav2vec2-base", "distilbert-sentiment"]);
    let scores = reference.run("wav2vec2-base", &[NamedTensor::f32("input_values", vec![1, 16_000], &waveform)]);
    let frames = scores[0].shape[1] as usize;
    assert_eq!(frames, 49);
    let transcript = tidal_common::text::ctc_best_path(&scores[0].f32_values().unwrap(), &vocabulary(), 0, "|");
    // Random weights still write something: the test would not tell an empty decode otherwise.
    assert!(!transcript.is_empty(), "the reference transcript is empty");
    let ids = tokens(&saved, &transcript);
    let want = reference
        .run("distilbert-sentiment", &[int64("input_ids", &ids), int64("attention_mask", &vec![1; ids.len()])]);
    let want_logits = want[0].f32_values().unwrap();
    let labels = ["negative", "neutral", "positive"];
    let best = (0..3).max_by(|&a, &b| want_logits[a].total_cmp(&want_logits[b])).unwrap();
    eprintln!("transcript {transcript:?} ({} tokens), label {}", ids.len(), labels[best]);

    // Tidal's API: both stages named, with their variant and node.
    let mut infer = inference_client(&agent.addr).await;
    let request = tidal_request("audio-sent", &[NamedTensor::f32("input_values", vec![1, 16_000], &waveform)], &[]);
    let answer = infer.infer(request).await.unwrap().into_inner();
    let served: Vec<(String, String, String)> =
        answer.stages.iter().map(|s| (s.stage.clone(), s.variant.clone(), s.node.clone())).collect();
    assert_eq!(
        served,
        [
            ("asr".to_string(), "wav2vec2-base".to_string(), agent.node.clone()),
            ("sentiment".into(), "distilbert-sentiment".into(), agent.node.clone())
        ]
    );
    let outputs = from_proto(answer.outputs);
    assert_eq!(outputs[0].name, "logits");
    let got = outputs[0].f32_values().unwrap();
    assert!(got.iter().zip(&want_logits).all(|(a, b)| (a - b).abs() < 1e-4), "{got:?} vs {want_logits:?}");
    assert_eq!((outputs[1].name.as_str(), outputs[1].shape.clone()), ("label", vec![1, 1]));
    assert_eq!(outputs[1].string_values().unwrap(), vec![labels[best].as_bytes()]);

    // V2 over gRPC: the label as BYTES in the raw contents.
    let raw = v2_raw_request("audio-sent", &[NamedTensor::f32("input_values", vec![1, 16_000], &waveform)], &["label"]);
    let answer = v2_raw_outputs(v2.model_infer(raw).await.unwrap().into_inner());
    assert_eq!((answer.len(), answer[0].element), (1, ElementType::Bytes));
    assert_eq!(answer[0].string_values().unwrap(), vec![labels[best].as_bytes()]);

    // Bad audio: empty, too short for one frame, longer than 30 s, or text.
    for (samples, why) in
        [(0, "has shape [1, 0]"), (100, "below the task's least of 400"), (480_001, "above the task's bound")]
    {
        let req = v2_raw_request(
            "audio-sent",
            &[NamedTensor::f32("input_values", vec![1, samples], &voice(samples as usize))],
            &[],
        );
        let err = v2.model_infer(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{samples} samples: {}", err.message());
        assert!(err.message().contains(why), "{samples} samples: {}", err.message());
    }
    let as_text = v2_raw_request("audio-sent", &[NamedTensor::strings("input_values", vec![1, 1], &["hello"])], &[]);
    let err = v2.model_infer(as_text).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("is FP32, not BYTES"), "{}", err.message());

    // The text task: two texts in one V2 request (typed contents), each its own label, as
    // the reference gives it.
    let texts = ["the cat sat on the mat", "a wonderful day"];
    let typed = ModelInferRequest {
        model_name: "sentiment".into(),
        inputs: vec![InferInputTensor {
            name: "text".into(),
            datatype: "BYTES".into(),
            shape: vec![2, 1],
            contents: Some(InferTensorContents {
                bytes_contents: texts.iter().map(|t| t.as_bytes().to_vec()).collect(),
                ..Default::default()
            }),
            ..Default::default()
        }],
        ..Default::default()
    };
    let answer = v2_raw_outputs(v2.model_infer(typed).await.unwrap().into_inner());
    let label = answer.iter().find(|t| t.name == "label").expect("a label output");
    assert_eq!(label.shape, vec![2, 1]);
    let want: Vec<&[u8]> = texts
        .iter()
        .map(|text| {
            let ids = tokens(&saved, text);
            let logits = reference
                .run("distilbert-sentiment", &[int64("input_ids", &ids), int64("attention_mask", &vec![1; ids.len()])])
                [0]
            .f32_values()
            .unwrap();
            let best = (0..3).max_by(|&a, &b| logits[a].total_cmp(&logits[b])).unwrap();
            labels[best].as_bytes()
        })
        .collect();
    assert_eq!(label.string_values().unwrap(), want);

    // V2 over REST, JSON: text in as a string, the label out as one.
    let body = serde_json::json!({
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1, 1], "data": [texts[1]]}],
        "outputs": [{"name": "label"}]
    });
    let (status, _, body) = http_exchange(
        &agent.addr,
        "POST",
        "/v2/models/sentiment/infer",
        &[("content-type", "application/json")],
        body.to_string().as_bytes(),
    )
    .await;
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["outputs"][0]["datatype"], "BYTES", "{body}");
    assert_eq!(body["outputs"][0]["data"], serde_json::json!([std::str::from_utf8(want[1]).unwrap()]), "{body}");

    // Bad text: not UTF-8, more tokens than the task takes, or numbers.
    let cases: [(NamedTensor, &str); 3] = [
        (NamedTensor::strings("text", vec![1, 1], &[&b"caf\xe9"[..]]), "not UTF-8"),
        (
            NamedTensor::strings("text", vec![1, 1], &["the cat sat on the mat ".repeat(4)]),
            "the model takes at most 16",
        ),
        (NamedTensor::f32("text", vec![1, 1], &[1.0]), "is BYTES, not FP32"),
    ];
    for (input, why) in cases {
        let err = v2.model_infer(v2_raw_request("sentiment", &[input], &[])).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{why}: {}", err.message());
        assert!(err.message().contains(why), "{why}: {}", err.message());
    }
    // And the agent still answers.
    let again = v2_raw_request("sentiment", &[NamedTensor::strings("text", vec![1, 1], &[texts[0]])], &["label"]);
    let answer = v2_raw_outputs(v2.model_infer(again).await.unwrap().into_inner());
    assert_eq!(answer[0].string_values().unwrap(), vec![want[0]]);

    // Profiled at the user's texts: each sample tokenized as requests are, each length
    // measured and reported by its tokens.
    let samples = work.path().join("samples");
    std::fs::create_dir_all(&samples).unwrap();
    let long = "the cat sat on the mat and the cat sat on the mat";
    for (name, text) in [("a", texts[1]), ("b", long)] {
        let body =
            serde_json::json!({"inputs": [{"name": "text", "shape": [1, 1], "datatype": "BYTES", "data": [text]}]});
        std::fs::write(samples.join(format!("{name}.json")), body.to_string()).unwrap();
    }
    let out = tidal_tests::tls::as_admin(&mut std::process::Command::new(bin("tidalctl")))
        .args(["--controller", &ctl, "profile", "--agent", &agent.control_addr, "--task", "sentiment"])
        .args(["--cores", "1", "--batches", "1,2", "--duration-ms", "300", "--samples"])
        .arg(&samples)
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{printed}{}", String::from_utf8_lossy(&out.stderr));
    let mut sizes: Vec<u64> = printed
        .lines()
        .filter_map(|l| l.split_whitespace().skip_while(|w| *w != "size").nth(1)?.parse().ok())
        .collect();
    sizes.sort_unstable();
    sizes.dedup();
    let want_sizes = vec![tokens(&saved, texts[1]).len() as u64, tokens(&saved, long).len() as u64];
    assert_eq!(sizes, want_sizes, "{printed}");

    // Triton's own Python client sends text as a NumPy array of strings (or bytes), over
    // gRPC and HTTP, binary and JSON, and reads the label back.
    match outside_clients() {
        Err(why) => eprintln!("SKIPPED (not run): tritonclient's text calls: {why}"),
        Ok(tools) => {
            let mut cmd = std::process::Command::new("python3");
            cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/text_check.py"))
                .args(["--url", &agent.addr, "--task", "sentiment"])
                .env("PYTHONPATH", tools.join("py"));
            for (text, label) in texts.iter().zip(&want) {
                cmd.args(["--text", text, "--label", std::str::from_utf8(label).unwrap()]);
            }
            let out = tokio::task::spawn_blocking(move || cmd.output()).await.unwrap().unwrap();
            assert!(out.status.success(), "text_check.py failed:\n{}", String::from_utf8_lossy(&out.stderr));
            let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            eprintln!("tritonclient: {report}");
            let cases = report.as_object().unwrap();
            assert_eq!(cases.len(), 7, "{report}");
            let failed: Vec<_> = cases.iter().filter(|(_, v)| v.as_str() != Some("ok")).collect();
            assert!(failed.is_empty(), "tritonclient's text calls that failed: {failed:?}");
        }
    }
}
