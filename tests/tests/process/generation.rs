//! A stage that writes text, served end to end: `deploy/sum-qa.toml` as shipped (one variant
//! per stage, to keep the test small) registered with `tidalctl`, placed by a controller and
//! served by an agent. A text and a question in; the summary DistilBART wrote (greedy, with
//! its key–value cache, inside the model) and the answer RoBERTa found in it out, every
//! stage's variant and node in the answer; the summary is checked against ONNX Runtime run
//! here on the same tokens. Then the budget: a request whose time affords fewer tokens than
//! the task's most is answered with the tokens it wrote, or refused when the task says so.

use std::path::Path;
use std::time::{Duration, Instant};

use tidal_common::onnx_signature::ElementType;
use tidal_common::tensor::NamedTensor;
use tidal_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use tidal_proto::inference::ModelMetadataRequest;
use tidal_tests::reference::{from_proto, tidal_request, Reference};
use tidal_tests::*;
use tonic::Code;

const TEXT: &str = "the river rose in the night and the town woke to water in every street; by noon the \
                    bridge was closed and the school opened its doors to families from the low side";

fn text(name: &str, value: &str) -> NamedTensor {
    NamedTensor::strings(name, vec![1, 1], &[value])
}

fn int64(name: &str, shape: Vec<i64>, values: &[i64]) -> NamedTensor {
    NamedTensor {
        name: name.into(),
        element: ElementType::Int64,
        shape,
        data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

/// The summary's text in an answer.
fn summary_of(outputs: &[NamedTensor]) -> String {
    let t = outputs.iter().find(|t| t.name == "summary").expect("a summary output");
    String::from_utf8(t.string_values().unwrap()[0].to_vec()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_summary_is_written_token_by_token_and_a_question_answered_from_it() {
    let _turn = tidal_tests::file_turn(module_path!());
    let work = tempfile::tempdir().unwrap();
    let models = work.path().join("models");
    let out = std::process::Command::new(bin("tidalctl"))
        .args(["models", "generate", "--variants", "distilbart-xsum-1-1,roberta-squad2", "--tokens", "32", "--out"])
        .arg(&models)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let shipped = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/sum-qa.toml"))
        .expect("deploy/sum-qa.toml");
    let stage_variants = |from: &str, to: &str| (from.to_string(), to.to_string());
    let cuts = [
        stage_variants(
            "variants = [\"distilbart-xsum-1-1\", \"distilbart-xsum-12-1\", \"distilbart-xsum-6-6\", \"distilbart-xsum-12-3\",\n  \"distilbart-xsum-9-6\", \"distilbart-xsum-12-6\"]",
            "variants = [\"distilbart-xsum-1-1\"]",
        ),
        stage_variants("variants = [\"roberta-squad2\", \"xlm-roberta-squad2\"]", "variants = [\"roberta-squad2\"]"),
    ];
    let mut cut = shipped.clone();
    for (from, to) in &cuts {
        assert!(cut.contains(from.as_str()), "the deploy file's variants moved; update this test");
        cut = cut.replace(from.as_str(), to);
    }
    let file = work.path().join("sum-qa.toml");
    std::fs::write(&file, &cut).unwrap();
    // The summariser alone, twice: answering with what a request wrote when its time runs
    // out (as shipped), and refusing it.
    let summarise = |name: &str, refuse: bool| {
        let stage = &cut[cut.find("[[stages]]").unwrap()..cut.rfind("[[stages]]").unwrap()];
        let stage = if refuse {
            stage.replace("end_token = 3\n", "end_token = 3\nrefuse_unfinished = true\n")
        } else {
            stage.to_string()
        };
        let path = work.path().join(format!("{name}.toml"));
        std::fs::write(&path, format!("name = \"{name}\"\nslo_ms = 20000\n{stage}")).unwrap();
        path
    };
    let partial = summarise("summarise", false);
    let strict = summarise("summarise-strict", true);

    let (_controller, ctl) = start_controller(work.path(), 1.0, &[]);
    let agent = start_agent(
        work.path(),
        AgentOpts { model_dir: &models, controller: Some(&ctl), extra: &["--worker-threads", "1", "--cores", "4"] },
    );
    for f in [&file, &partial, &strict] {
        let (ok, printed) = register_task_file(&ctl, f, &models);
        assert!(ok, "{printed}");
    }
    let mut v2 = GrpcInferenceServiceClient::new(channel(&agent.addr).await);
    for task in ["sum-qa", "summarise", "summarise-strict"] {
        wait_model_ready(&v2, task, Duration::from_secs(240)).await;
    }

    // On the wire: the text and the question in (the question for the second stage, which
    // no stage before feeds); the span's scores and the answer out.
    let meta = v2.model_metadata(ModelMetadataRequest { name: "sum-qa".into(), version: String::new() }).await;
    let meta = meta.unwrap().into_inner();
    let described = |ts: &[tidal_proto::inference::model_metadata_response::TensorMetadata]| -> Vec<String> {
        ts.iter().map(|t| format!("{} {} {:?}", t.name, t.datatype, t.shape)).collect()
    };
    assert_eq!(described(&meta.inputs), ["text BYTES [-1, 1]", "question BYTES [-1, 1]"]);
    assert_eq!(
        described(&meta.outputs),
        ["start_logits FP32 [-1, -1]", "end_logits FP32 [-1, -1]", "answer BYTES [-1, 1]"]
    );

    // The reference: DistilBART run here on the text's tokens, 32 tokens at most.
    let tokenizer = tokenizers::Tokenizer::from_file(models.join("distilbart-xsum-1-1.tokenizer.json")).unwrap();
    let ids: Vec<i64> = tokenizer.encode(TEXT, true).unwrap().get_ids().iter().map(|&i| i64::from(i)).collect();
    let mut reference = Reference::new(&models, &["distilbart-xsum-1-1"]);
    let n = ids.len() as i64;
    let written = reference.run(
        "distilbart-xsum-1-1",
        &[
            int64("input_ids", vec![1, n], &ids),
            int64("attention_mask", vec![1, n], &vec![1; ids.len()]),
            int64("max_new_tokens", vec![1], &[32]),
        ],
    );
    let tokens: Vec<u32> = written[0].i64_values().unwrap().iter().map(|&t| t as u32).collect();
    assert_eq!(tokens.len(), 32, "random weights never end a text early: {tokens:?}");
    let want_summary = tokenizer.decode(&tokens, true).unwrap();
    assert!(!want_summary.is_empty());
    eprintln!("summary: {want_summary:?}");

    // Tidal's API: both stages named, the summary as ONNX Runtime wrote it, an answer.
    let mut infer = inference_client(&agent.addr).await;
    let request = tidal_request("sum-qa", &[text("text", TEXT), text("question", "what closed at noon")], &[]);
    let answer = infer.infer(request).await.unwrap().into_inner();
    let served: Vec<(String, String, String)> =
        answer.stages.iter().map(|s| (s.stage.clone(), s.variant.clone(), s.node.clone())).collect();
    assert_eq!(
        served,
        [
            ("summarise".to_string(), "distilbart-xsum-1-1".to_string(), agent.node.clone()),
            ("qa".into(), "roberta-squad2".into(), agent.node.clone())
        ]
    );
    let outputs = from_proto(answer.outputs);
    let names: Vec<&str> = outputs.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["start_logits", "end_logits", "answer"]);
    let answer_text = outputs[2].string_values().unwrap()[0].to_vec();
    let answer_text = String::from_utf8(answer_text).unwrap();
    // The span is cut from the summary (the pair's second text), never from the question.
    assert!(want_summary.contains(answer_text.trim()), "answer {answer_text:?} is not in {want_summary:?}");

    // The summariser alone gives the same summary.
    let request = tidal_request("summarise", &[text("text", TEXT)], &["summary"]);
    let full = infer.infer(request.clone()).await.unwrap().into_inner();
    assert_eq!(summary_of(&from_proto(full.outputs)), want_summary);

    // Bad input: text that is not UTF-8, a missing question, numbers for text.
    let cases: [(&str, Vec<NamedTensor>, &str); 3] = [
        (
            "sum-qa",
            vec![NamedTensor::strings("text", vec![1, 1], &[&b"caf\xe9"[..]]), text("question", "why")],
            "not UTF-8",
        ),
        ("sum-qa", vec![text("text", TEXT)], "input \"question\" is missing"),
        ("summarise", vec![NamedTensor::f32("text", vec![1, 1], &[1.0])], "is BYTES, not FP32"),
    ];
    for (task, inputs, why) in cases {
        let err = v2.model_infer(v2_raw_request(task, &inputs, &[])).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{why}: {}", err.message());
        assert!(err.message().contains(why), "{why}: {}", err.message());
    }

    // The budget. A few whole summaries teach the worker what a token costs here; then a
    // request given a third of a whole summary's time writes fewer tokens, and is answered
    // with them, or refused by the task that refuses unfinished texts.
    let mut whole = Vec::new();
    for task in ["summarise", "summarise-strict"] {
        for _ in 0..3 {
            let request = tidal_request(task, &[text("text", TEXT)], &["summary"]);
            let started = Instant::now();
            let answer = infer.infer(request).await.unwrap().into_inner();
            whole.push(started.elapsed());
            assert_eq!(summary_of(&from_proto(answer.outputs)), want_summary);
        }
    }
    whole.sort();
    let budget_ms = (whole[whole.len() / 2].as_millis() as u32 / 3).max(1);
    let short = |task: &str| tidal_proto::v1::InferRequest {
        budget_ms,
        ..tidal_request(task, &[text("text", TEXT)], &["tokens", "summary"])
    };
    let answer = from_proto(infer.infer(short("summarise")).await.unwrap().into_inner().outputs);
    let cut_short: Vec<u32> = answer[0].i64_values().unwrap().iter().map(|&t| t as u32).filter(|&t| t != 0).collect();
    eprintln!(
        "a whole summary took {:?}; in {budget_ms} ms {} tokens: {:?}",
        whole[whole.len() / 2],
        cut_short.len(),
        summary_of(&answer)
    );
    assert!(
        !cut_short.is_empty() && cut_short.len() < tokens.len() && tokens.starts_with(&cut_short),
        "in {budget_ms} ms the summary should be a shorter start of {tokens:?}, not {cut_short:?}"
    );
    assert_eq!(summary_of(&answer), tokenizer.decode(&cut_short, true).unwrap());
    // Refused: up front, as the queue knows a whole text takes longer than the request has, or
    // when its time ran out mid-text.
    let err = infer.infer(short("summarise-strict")).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{}", err.message());
    let why = err.message();
    assert!(
        why.contains("shorter than a batch takes here") || why.contains("of at most 32 tokens, before its text ended"),
        "{why}"
    );

    // Profiled, the stage is measured writing one token and its most: a summary of 32
    // tokens costs many times one of one (the planner draws its cost per token through them).
    let out = tidal_tests::tls::as_admin(&mut std::process::Command::new(bin("tidalctl")))
        .args(["--controller", &ctl, "profile", "--agent", &agent.control_addr, "--task", "summarise"])
        .args(["--cores", "1", "--batches", "1", "--duration-ms", "300"])
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{printed}{}", String::from_utf8_lossy(&out.stderr));
    let p50_writing = |tokens: &str| -> f64 {
        let line = printed
            .lines()
            .find(|l| l.contains(&format!("writes {tokens:>4} tokens")))
            .unwrap_or_else(|| panic!("no point writing {tokens} tokens in\n{printed}"));
        line.split_whitespace().skip_while(|w| *w != "p50").nth(1).unwrap().parse().unwrap()
    };
    let (one, most) = (p50_writing("1"), p50_writing("32"));
    eprintln!("profile: {one:.1} ms writing one token, {most:.1} ms writing 32");
    assert!(most > 5.0 * one, "writing 32 tokens ({most} ms) should cost many times writing one ({one} ms)");
}
