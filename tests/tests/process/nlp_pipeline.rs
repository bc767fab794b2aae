//! IPA's NLP pipeline, `deploy/nlp.toml` as shipped (one variant per stage): the language of a
//! text identified, the text translated unless it is in English already (a stage requests
//! skip by the label the stage before gave them), and the English summarised. Served end to
//! end by a controller and an agent and checked against ONNX Runtime run here on the same
//! tokens, once with the translation run and once skipped (the model's weights are random, so
//! which language it names is whatever ONNX Runtime says: a second task skips on the other
//! labels, and each branch is taken by one of the two).

use std::path::Path;
use std::time::Duration;

use tidal_common::onnx_signature::ElementType;
use tidal_common::tensor::NamedTensor;
use tidal_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use tidal_proto::inference::infer_parameter::ParameterChoice;
use tidal_tests::reference::{from_proto, tidal_request, Reference};
use tidal_tests::*;

const TEXT: &str = "the night train left late and the passengers slept through the mountains; at dawn \
                    the valley opened below them and the first town came into view";

const LANGUAGES: [&str; 20] = [
    "ar", "bg", "de", "el", "en", "es", "fr", "hi", "it", "ja", "nl", "pl", "pt", "ru", "sw", "th", "tr", "ur", "vi",
    "zh",
];

fn int64(name: &str, shape: Vec<i64>, values: &[i64]) -> NamedTensor {
    NamedTensor {
        name: name.into(),
        element: ElementType::Int64,
        shape,
        data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

/// ONNX Runtime here, as the agent runs each stage: the text tokenized by the model's own
/// tokenizer, then the model's logits or the tokens it wrote (at most `budget`).
struct Stages {
    models: std::path::PathBuf,
    reference: Reference,
}

impl Stages {
    fn tokens(&self, model: &str, text: &str) -> Vec<i64> {
        let tokenizer = tokenizers::Tokenizer::from_file(self.models.join(format!("{model}.tokenizer.json"))).unwrap();
        tokenizer.encode(text, true).unwrap().get_ids().iter().map(|&i| i64::from(i)).collect()
    }

    fn inputs(&self, model: &str, text: &str) -> Vec<NamedTensor> {
        let ids = self.tokens(model, text);
        let n = ids.len() as i64;
        vec![int64("input_ids", vec![1, n], &ids), int64("attention_mask", vec![1, n], &vec![1; ids.len()])]
    }

    fn language(&mut self, text: &str) -> &'static str {
        let inputs = self.inputs("xlm-roberta-langid", text);
        let logits = self.reference.run("xlm-roberta-langid", &inputs)[0].f32_values().unwrap();
        assert_eq!(logits.len(), LANGUAGES.len());
        let best = (0..logits.len()).max_by(|&a, &b| logits[a].total_cmp(&logits[b])).unwrap();
        LANGUAGES[best]
    }

    fn write(&mut self, model: &str, text: &str, budget: i64) -> String {
        let mut inputs = self.inputs(model, text);
        inputs.push(int64("max_new_tokens", vec![1], &[budget]));
        let written = self.reference.run(model, &inputs);
        let tokens: Vec<u32> = written[0].i64_values().unwrap().iter().map(|&t| t as u32).collect();
        let tokenizer = tokenizers::Tokenizer::from_file(self.models.join(format!("{model}.tokenizer.json"))).unwrap();
        tokenizer.decode(&tokens, true).unwrap()
    }
}

fn output_text(outputs: &[NamedTensor], name: &str) -> String {
    let t = outputs.iter().find(|t| t.name == name).unwrap_or_else(|| panic!("no output {name:?}"));
    String::from_utf8(t.string_values().unwrap()[0].to_vec()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_text_is_translated_unless_in_english_and_summarised() {
    let _turn = tidal_tests::file_turn(module_path!());
    let work = tempfile::tempdir().unwrap();
    let models = work.path().join("models");
    let variants = "xlm-roberta-langid,opus-mt-fr-en,distilbart-xsum-1-1";
    let out = std::process::Command::new(bin("tidalctl"))
        .args(["models", "generate", "--variants", variants, "--tokens", "64", "--out"])
        .arg(&models)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let shipped = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/nlp.toml"))
        .expect("deploy/nlp.toml");
    let cuts = [
        ("variants = [\"opus-mt-fr-en\", \"opus-mt-tc-big-fr-en\"]", "variants = [\"opus-mt-fr-en\"]"),
        (
            "variants = [\"distilbart-xsum-1-1\", \"distilbart-xsum-12-1\", \"distilbart-xsum-6-6\", \"distilbart-xsum-12-3\",\n  \"distilbart-xsum-9-6\", \"distilbart-xsum-12-6\"]",
            "variants = [\"distilbart-xsum-1-1\"]",
        ),
    ];
    let mut cut = shipped.clone();
    for (from, to) in cuts {
        assert!(cut.contains(from), "the deploy file's variants moved; update this test");
        cut = cut.replace(from, to);
    }
    assert!(cut.contains("labels = [\"en\"]"), "the deploy file skips the translation for English");

    // Which language the identifier names for the text, as ONNX Runtime runs it here.
    let mut stages = Stages { models: models.clone(), reference: Reference::new(&models, &["xlm-roberta-langid"]) };
    let language = stages.language(TEXT);
    eprintln!("the identifier names {language:?}");
    // The shipped task translates unless English; the other skips exactly where it does not.
    let other = if language == "en" { "fr" } else { language };
    let flipped = cut
        .replace("name = \"nlp\"", "name = \"nlp-flipped\"")
        .replace("labels = [\"en\"]", &format!("labels = [\"{other}\"]"));
    let (nlp, nlp_flipped) = (work.path().join("nlp.toml"), work.path().join("nlp-flipped.toml"));
    std::fs::write(&nlp, &cut).unwrap();
    std::fs::write(&nlp_flipped, &flipped).unwrap();
    // A skip that leaves the next stage without the output it takes is refused, by name.
    let unpassed = work.path().join("unpassed.toml");
    let without_pass = cut.replace("pass = { text = \"translation\" }\n", "").replace("\"nlp\"", "\"unpassed\"");
    assert_ne!(without_pass, cut);
    std::fs::write(&unpassed, without_pass).unwrap();

    let (_controller, ctl) = start_controller(work.path(), 1.0, &[]);
    let agent = start_agent(
        work.path(),
        AgentOpts { model_dir: &models, controller: Some(&ctl), extra: &["--worker-threads", "1", "--cores", "8"] },
    );
    let (ok, printed) = register_task_file(&ctl, &unpassed, &models);
    assert!(!ok, "a skip without its pass was registered: {printed}");
    assert!(
        printed.contains("stage summarise takes output \"translation\" of it, which a skipped request would not have"),
        "{printed}"
    );
    for f in [&nlp, &nlp_flipped] {
        let (ok, printed) = register_task_file(&ctl, f, &models);
        assert!(ok, "{printed}");
    }
    let mut v2 = GrpcInferenceServiceClient::new(channel(&agent.addr).await);
    for task in ["nlp", "nlp-flipped"] {
        wait_model_ready(&v2, task, Duration::from_secs(300)).await;
    }

    // The references: the summary of the text as it is, and of its translation.
    stages.reference = Reference::new(&models, &["opus-mt-fr-en", "distilbart-xsum-1-1"]);
    let summary_of_text = stages.write("distilbart-xsum-1-1", TEXT, 32);
    let translation = stages.write("opus-mt-fr-en", TEXT, 64);
    let summary_of_translation = stages.write("distilbart-xsum-1-1", &translation, 32);
    assert!(!summary_of_text.is_empty() && !translation.is_empty() && !summary_of_translation.is_empty());
    assert_ne!(summary_of_text, summary_of_translation, "the two branches must be told apart by their answers");

    let mut infer = inference_client(&agent.addr).await;
    let node = agent.node.clone();
    let served = |variant: &str| (variant.to_string(), node.clone(), false);
    let skipped = (String::new(), String::new(), true);
    for task in ["nlp", "nlp-flipped"] {
        let translates = (task == "nlp") == (language != "en");
        let request = tidal_request(task, &[NamedTensor::strings("text", vec![1, 1], &[TEXT])], &[]);
        let answer = infer.infer(request).await.unwrap().into_inner();
        let how: Vec<(&str, (String, String, bool))> =
            answer.stages.iter().map(|s| (s.stage.as_str(), (s.variant.clone(), s.node.clone(), s.skipped))).collect();
        let translate = if translates { served("opus-mt-fr-en") } else { skipped.clone() };
        assert_eq!(
            how,
            [
                ("langid", served("xlm-roberta-langid")),
                ("translate", translate),
                ("summarise", served("distilbart-xsum-1-1"))
            ],
            "{task}"
        );
        let outputs = from_proto(answer.outputs);
        let names: Vec<&str> = outputs.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["tokens", "summary"], "{task}");
        let want = if translates { &summary_of_translation } else { &summary_of_text };
        assert_eq!(&output_text(&outputs, "summary"), want, "{task}");
    }

    // Over V2, the stages say which was skipped.
    let task = if language == "en" { "nlp" } else { "nlp-flipped" };
    let request = v2_raw_request(task, &[NamedTensor::strings("text", vec![1, 1], &[TEXT])], &["summary"]);
    let answer = v2.model_infer(request).await.unwrap().into_inner();
    let stages_param = match answer.parameters.get("tidal_stages").and_then(|p| p.parameter_choice.clone()) {
        Some(ParameterChoice::StringParam(s)) => s,
        other => panic!("tidal_stages: {other:?}"),
    };
    assert!(stages_param.contains(";translate=skipped;summarise=distilbart-xsum-1-1@"), "{stages_param}");
    assert_eq!(output_text(&v2_raw_outputs(answer), "summary"), summary_of_text);

    // `tidalctl load` replays a trace with the user's own requests (V2 bodies; sent over
    // Tidal's API, whose answers name every stage's accuracy), and says what
    // a task of text needs when it is given none.
    let samples = work.path().join("samples");
    std::fs::create_dir(&samples).unwrap();
    let body = serde_json::json!({"inputs": [{"name": "text", "shape": [1, 1], "datatype": "BYTES", "data": [TEXT]}]});
    std::fs::write(samples.join("one.json"), body.to_string()).unwrap();
    let trace = work.path().join("trace.txt");
    std::fs::write(&trace, "2\n2\n").unwrap();
    let summary = work.path().join("summary.json");
    let load = |samples: Option<&Path>| {
        let mut cmd = std::process::Command::new(bin("tidalctl"));
        tidal_tests::tls::as_admin(&mut cmd)
            .args(["--controller", &ctl, "load", "--agent", &agent.addr, "--task", task])
            .arg("--trace")
            .arg(&trace)
            .arg("--summary-json")
            .arg(&summary);
        if let Some(dir) = samples {
            cmd.arg("--samples").arg(dir);
        }
        cmd.output().unwrap()
    };
    let refused = load(None);
    assert!(!refused.status.success());
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(why.contains("takes text BYTES: give it requests with --samples DIR"), "{why}");
    let out = load(Some(&samples));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();
    let requests = got["requests"].as_u64().unwrap();
    assert!(requests >= 1, "{got}");
    assert_eq!(got["ok"].as_u64(), Some(requests), "{got}");
    // The skipped translation counts for nothing in the accuracy: the mean of the other two.
    let accuracy = got["mean_accuracy"].as_f64().unwrap();
    assert!((accuracy - (99.59 + 32.26) / 2.0).abs() < 1e-6, "{got}");
}
