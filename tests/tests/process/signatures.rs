//! `tidalctl models signature` reads what an ONNX file takes and gives; `tidalctl task register`
//! refuses a stage whose variants do not take and give the same tensors, before it calls the
//! controller.

use std::process::Command;

use tidal_tests::bin;

fn tidalctl(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(bin("tidalctl")).current_dir(dir).args(args).output().unwrap()
}

#[test]
fn signatures_are_read_and_a_stage_of_unlike_variants_is_refused() {
    let _turn = tidal_tests::file_turn(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let made = tidalctl(
        dir.path(),
        &["models", "generate", "--out", ".", "--resolution", "32", "--variants", "resnet18,resnet34,downsample"],
    );
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));

    let shown = tidalctl(dir.path(), &["models", "signature", "resnet18.onnx", "downsample.onnx"]);
    assert!(shown.status.success(), "{}", String::from_utf8_lossy(&shown.stderr));
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.contains("input   input FP32 [batch?, 3, 32, 32]"), "{shown}");
    assert!(shown.contains("output  logits FP32 [batch?, 1000]"), "{shown}");
    assert!(shown.contains("output  output FP32 [batch?, 3, 16, 16]"), "{shown}");
    assert_eq!(shown.matches("batched: the leading dynamic dimension").count(), 2, "{shown}");

    std::fs::write(dir.path().join("broken.onnx"), b"not a model").unwrap();
    let refused = tidalctl(dir.path(), &["models", "signature", "broken.onnx"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("broken.onnx: not an ONNX model"));

    // No controller listens at port 9: the refusal comes before any call.
    let register = |variants: &str| {
        let args = ["--controller", "127.0.0.1:9", "task", "register", "--name", "t", "--slo-ms", "100"];
        tidalctl(dir.path(), &[&args[..], &["--model-dir", ".", "--variants", variants]].concat())
    };
    let unlike = register("resnet18,downsample");
    assert!(!unlike.status.success());
    let why = String::from_utf8_lossy(&unlike.stderr);
    assert!(
        why.contains(
            r#"stage "t": variant "downsample" does not take and give what "resnet18" does: output "logits" is missing"#
        ),
        "{why}"
    );
    // Variants that agree get as far as the controller (which is not there).
    let alike = register("resnet18,resnet34");
    let why = String::from_utf8_lossy(&alike.stderr);
    assert!(!alike.status.success() && !why.contains("does not take and give"), "{why}");
}
