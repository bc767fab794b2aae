//! The agent under a real systemd on a real kernel with cgroup v2, which these development
//! machines do not have (their cpu controller is on cgroup v1): a qemu VM (software
//! emulation) boots Debian's kernel with systemd as PID 1 from an image built here, holding
//! this build's binaries, the shipped `deploy/tidal-agent.service` and a model. Inside,
//! `tidal-vm-check` (tests/examples/vm_check.rs) checks readiness, delegation, in-place
//! resizing under load, throttling reports, a worker's memory limit and its OOM kill, reload
//! and stop, and prints what it measured.
//!
//! Needs root, qemu and debootstrap: `scripts/vm-image.sh` installs them and builds the image
//! (once, about 80 s). Where that cannot be done, the test says so and does not pass silently.

use std::path::Path;
use std::time::Duration;

use tidal_auth::Role;
use tidal_tests::vm::{self, copy, enable, write, Boot};
use tidal_tests::{bin, bin_dir, generate_models, ort_lib};

const BOOT_TIMEOUT: Duration = Duration::from_secs(1200);

const AGENT_ENV: &str = "\
TIDAL_NODE=vm
TIDAL_LISTEN=127.0.0.1:7100
TIDAL_CONTROL_LISTEN=127.0.0.1:7101
TIDAL_MODEL_DIR=/var/lib/tidal/models
TIDAL_ORT_LIB=/opt/tidal/lib/libonnxruntime.so
TIDAL_CGROUP_DRIVER=v2
TIDAL_CGROUP_SUBTREE=workers
TIDAL_CORES=2
TIDAL_LOAD_TIMEOUT_S=600
TIDAL_TLS_CA=/etc/tidal/tls/ca/ca.pem
TIDAL_TLS_CERT=/etc/tidal/tls/agent-vm.pem
TIDAL_TLS_KEY=/etc/tidal/tls/agent-vm.key
";

const CHECK_UNIT: &str = "\
[Unit]
Description=Tidal VM check (tests/tests/process/vm.rs)
After=tidal-agent.service
SuccessAction=poweroff-force
FailureAction=poweroff-force

[Service]
Type=oneshot
Delegate=yes
ExecStart=/usr/local/bin/tidal-vm-check
StandardOutput=tty
StandardError=tty
TTYPath=/dev/ttyS0
TimeoutStartSec=1100

[Install]
WantedBy=multi-user.target
";

/// Puts this build, the shipped units, certificates and a model into the VM's tree.
fn stage(tree: &Path, work: &Path) {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    copy(&bin("tidal-agent"), &tree.join("usr/local/bin/tidal-agent"), 0o755);
    copy(&bin_dir().join("examples/vm_check"), &tree.join("usr/local/bin/tidal-vm-check"), 0o755);
    copy(&bin_dir().join("examples/resize_latency"), &tree.join("usr/local/bin/tidal-resize-latency"), 0o755);
    copy(&std::fs::canonicalize(ort_lib()).unwrap(), &tree.join("opt/tidal/lib/libonnxruntime.so"), 0o644);
    let models = work.join("models");
    generate_models(&models, "resnet18", 64);
    for entry in std::fs::read_dir(&models).unwrap().flatten() {
        copy(&entry.path(), &tree.join("var/lib/tidal/models").join(entry.file_name()), 0o644);
    }
    let units = tree.join("etc/systemd/system");
    for unit in ["tidal-agent.service", "tidal-controller.service"] {
        copy(&repo.join("deploy").join(unit), &units.join(unit), 0o644);
    }
    write(&units.join("tidal-vm-check.service"), CHECK_UNIT, 0o644);
    enable(tree, "tidal-agent.service");
    enable(tree, "tidal-vm-check.service");
    write(&tree.join("etc/tidal/agent.env"), AGENT_ENV, 0o644);
    // Certificates: the agent's key belongs to its user; the CA key stays out of the VM.
    let certs = work.join("certs");
    tidal_auth::certs::init(&certs.join("ca"), "vm", 1).unwrap();
    let tls = tree.join("etc/tidal/tls");
    copy(&certs.join("ca/ca.pem"), &tls.join("ca/ca.pem"), 0o644);
    let (uid, gid) = vm::user(tree, "tidal");
    for (role, owner) in [(Role::Agent("vm".into()), Some((uid, gid))), (Role::Controller(1), None)] {
        let hosts = vec!["127.0.0.1".to_string(), "localhost".to_string()];
        let (cert, key) = tidal_auth::certs::issue(&certs.join("ca"), &role, &hosts, &certs, 1).unwrap();
        copy(&cert, &tls.join(cert.file_name().unwrap()), 0o644);
        let key_to = tls.join(key.file_name().unwrap());
        copy(&key, &key_to, 0o600);
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&key_to, Some(uid), Some(gid)).unwrap();
        }
    }
}

#[test]
fn the_agent_runs_under_systemd_with_a_delegated_cgroup_v2_subtree_and_resizes_in_place() {
    let _turn = tidal_tests::file_turn(module_path!());
    let image = match vm::image_dir() {
        Ok(dir) => dir,
        Err(why) => {
            eprintln!("SKIPPED (not run): the systemd VM test cannot run here: {why}");
            return;
        }
    };
    let work = tempfile::tempdir().unwrap();
    let tree = vm::copy_tree(&image, work.path());
    stage(&tree, work.path());
    let disk = work.path().join("root.img");
    vm::make_image(&tree, &disk);
    let boot = Boot {
        image_dir: &image,
        disk: &disk,
        console: work.path().join("console.log"),
        cpus: 2,
        memory_mib: 2048,
        snapshot: false,
        nic: None,
    };
    let mut machine = boot.start();
    let console = machine.wait_poweroff(BOOT_TIMEOUT);
    println!("VM booted, checked and powered off in {:.0} s", machine.started.elapsed().as_secs_f64());
    let report: Vec<&str> =
        console.lines().filter_map(|l| l.trim_end_matches('\r').strip_prefix("TIDAL-VM ")).collect();
    for line in &report {
        println!("  {line}");
    }
    assert!(
        report.iter().any(|l| l.starts_with("PASS")),
        "the checks inside the VM did not pass:\n{}",
        if report.is_empty() { vm::tail(&console, 80) } else { report.join("\n") }
    );
}
