//! The README is a contract: the blocks it marks `<!-- readme-test: cluster -->` (Using it,
//! and the standard protocol's clients) run as written, in one shell, in a scratch directory
//! that holds the repository's build (`target`, `.tidal`, `data`, `results` linked in), against
//! the cluster of one controller and one agent over mutual TLS that they start on the ports
//! they name (127.0.0.1:7000, 7001, 7100, 7101).

use std::io::Read;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const MARK: &str = "<!-- readme-test: cluster -->";
const PORTS: [u16; 4] = [7000, 7001, 7100, 7101];

/// The `sh` blocks that follow the mark, in order.
fn marked_blocks(readme: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut rest = readme;
    while let Some(at) = rest.find(MARK) {
        let after = rest[at + MARK.len()..].trim_start();
        let body = after.strip_prefix("```sh\n").expect("a marked block is a ```sh block right after the mark");
        let end = body.find("\n```").expect("the block ends");
        blocks.push(body[..end].to_string());
        rest = &body[end..];
    }
    blocks
}

#[test]
fn the_readme_s_cluster_and_client_examples_run_as_written() {
    let _turn = tidal_tests::file_turn(module_path!());
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize().unwrap();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let blocks = marked_blocks(&readme);
    assert!(blocks.len() >= 2, "the README marks its cluster and client blocks");
    // The blocks use perf_analyzer and tritonclient as `make test` installs them.
    tidal_tests::client_tools().unwrap_or_else(|why| panic!("the README's clients cannot be installed: {why}"));
    for port in PORTS {
        if let Err(e) = TcpListener::bind(("127.0.0.1", port)) {
            panic!(
                "the README's cluster listens on 127.0.0.1:{port}, which is taken here ({e}): free it to run this test"
            );
        }
    }
    let dir = tempfile::tempdir().unwrap();
    for linked in ["target", ".tidal", "data", "results"] {
        std::os::unix::fs::symlink(root.join(linked), dir.path().join(linked)).unwrap();
    }
    let script = format!("set -e\n{}\n", blocks.join("\n"));
    let mut shell = Command::new("bash");
    shell.arg("-c").arg(&script).current_dir(dir.path()).stdout(Stdio::piped()).stderr(Stdio::piped());
    // The shell and the daemons it starts in the background, one group: stopped together.
    std::os::unix::process::CommandExt::process_group(&mut shell, 0);
    for var in ["TIDAL_INSECURE_PLAINTEXT", "TIDAL_CONTROLLER", "TIDAL_TLS_CA", "TIDAL_TLS_CERT", "TIDAL_TLS_KEY"] {
        shell.env_remove(var);
    }
    let mut child = shell.spawn().expect("bash runs");
    let group = child.id();
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(600);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    // The daemons outlive the shell: stop the group (and so close the pipes).
    let _ = Command::new("kill").arg("--").arg(format!("-{group}")).status();
    let _ = child.wait();
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    let logs = ["controller.log", "agent.log"]
        .map(|f| std::fs::read_to_string(dir.path().join("my-cluster").join(f)).unwrap_or_default());
    let tail = |s: &str| s.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
    let report = format!(
        "stdout:\n{}\nstderr:\n{}\ncontroller.log:\n{}\nagent.log:\n{}",
        tail(&out),
        tail(&err),
        tail(&logs[0]),
        tail(&logs[1])
    );
    let status = status.unwrap_or_else(|| panic!("the README's blocks did not finish within 600 s\n{report}"));
    assert!(status.success(), "the README's blocks failed ({status})\n{report}");
    // What each client printed: the Python client's answer and its variant, REST's JSON, the
    // replays' summaries, perf_analyzer's measurement.
    for expected in [
        "(1, 1000) string_param: \"resnet",
        "{\"model_name\":\"resnet\"",
        "served OK",
        "Throughput:",
        "policy               task",
        "version 2 of task scratch",
        "task scratch serves version 1 again (was version 2)",
        "version 3 (staged, not served) of task scratch",
        "task scratch: version 3 serves 10 % of the requests",
        "task scratch deleted",
    ] {
        assert!(out.contains(expected), "{expected:?} missing\n{report}");
    }
    // And the files the block says it writes.
    let cluster = dir.path().join("my-cluster");
    let records = std::fs::read_to_string(cluster.join("requests.csv")).unwrap_or_default();
    assert!(records.lines().count() > 100, "requests.csv has a record per request\n{report}");
    for written in ["profiles.json", "out.csv", "out.svg"] {
        assert!(cluster.join(written).metadata().is_ok_and(|m| m.len() > 0), "{written} missing\n{report}");
    }
}
