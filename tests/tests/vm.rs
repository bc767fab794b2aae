//! The agent under a real systemd on a real kernel with cgroup v2, which these development
//! machines do not have (their cpu controller is on cgroup v1): a qemu VM (software
//! emulation) boots Debian's kernel with systemd as PID 1 from an image built here, holding
//! this build's binaries, the shipped `deploy/tidal-agent.service` and a model. Inside,
//! `tidal-vm-check` (tests/examples/vm_check.rs) checks readiness, delegation, in-place
//! resizing under load, throttling reports, reload and stop, and prints what it measured.
//!
//! Needs root, qemu and debootstrap: `scripts/vm-image.sh` installs them and builds the image
//! (once, about 80 s). Where that cannot be done, the test says so and does not pass silently.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tidal_auth::Role;
use tidal_tests::{bin, bin_dir, generate_models, ort_lib};

const BOOT_TIMEOUT: Duration = Duration::from_secs(1200);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Builds the image when missing; `None` with the reason when this machine cannot.
fn vm_dir() -> Result<PathBuf, String> {
    let script = repo().join("scripts/vm-image.sh");
    let status = Command::new(&script).status().map_err(|e| format!("running {}: {e}", script.display()))?;
    match status.code() {
        Some(0) => Ok(repo().join(".tidal/vm")),
        Some(2) => Err("qemu, debootstrap or root are not available (scripts/vm-image.sh said why above)".into()),
        _ => panic!("scripts/vm-image.sh failed: {status}"),
    }
}

fn copy(from: &Path, to: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    std::fs::copy(from, to).unwrap_or_else(|e| panic!("copying {} to {}: {e}", from.display(), to.display()));
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn write(to: &Path, text: &str) {
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    std::fs::write(to, text).unwrap();
}

/// The uid and gid of `user` in the image's /etc/passwd.
fn image_user(root: &Path, user: &str) -> (u32, u32) {
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();
    let line = passwd.lines().find(|l| l.starts_with(&format!("{user}:"))).expect("the image has the tidal user");
    let fields: Vec<&str> = line.split(':').collect();
    (fields[2].parse().unwrap(), fields[3].parse().unwrap())
}

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
Description=Tidal VM check (tests/tests/vm.rs)
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

/// Puts this build, the shipped units, certificates and a model into the image's tree.
fn stage(root: &Path, work: &Path) {
    for dir in ["opt/tidal", "etc/tidal", "var/lib/tidal", "usr/local/bin"] {
        let _ = std::fs::remove_dir_all(root.join(dir));
    }
    copy(&bin("tidal-agent"), &root.join("usr/local/bin/tidal-agent"), 0o755);
    copy(&bin_dir().join("examples/vm_check"), &root.join("usr/local/bin/tidal-vm-check"), 0o755);
    copy(&bin_dir().join("examples/resize_latency"), &root.join("usr/local/bin/tidal-resize-latency"), 0o755);
    copy(&std::fs::canonicalize(ort_lib()).unwrap(), &root.join("opt/tidal/lib/libonnxruntime.so"), 0o644);
    let models = work.join("models");
    generate_models(&models, "resnet18", 64);
    for entry in std::fs::read_dir(&models).unwrap().flatten() {
        copy(&entry.path(), &root.join("var/lib/tidal/models").join(entry.file_name()), 0o644);
    }
    let units = root.join("etc/systemd/system");
    for unit in ["tidal-agent.service", "tidal-controller.service"] {
        copy(&repo().join("deploy").join(unit), &units.join(unit), 0o644);
    }
    write(&units.join("tidal-vm-check.service"), CHECK_UNIT);
    for unit in ["tidal-agent.service", "tidal-vm-check.service"] {
        let link = units.join("multi-user.target.wants").join(unit);
        std::fs::create_dir_all(link.parent().unwrap()).unwrap();
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(format!("/etc/systemd/system/{unit}"), &link).unwrap();
    }
    write(&root.join("etc/tidal/agent.env"), AGENT_ENV);
    // Certificates: the agent's key belongs to its user; the CA key stays out of the image.
    let certs = work.join("certs");
    tidal_auth::certs::init(&certs.join("ca"), "vm", 1).unwrap();
    let tls = root.join("etc/tidal/tls");
    copy(&certs.join("ca/ca.pem"), &tls.join("ca/ca.pem"), 0o644);
    let (uid, gid) = image_user(root, "tidal");
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

fn make_image(root: &Path, image: &Path) {
    let status = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "tidal-vm", "-d"])
        .arg(root)
        .arg(image)
        .arg("3G")
        .status()
        .expect("mkfs.ext4");
    assert!(status.success(), "mkfs.ext4 -d failed");
}

/// Boots the image; the console's text once the VM powered itself off.
fn boot(vm: &Path, image: &Path, console: &Path) -> String {
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", "2048", "-no-reboot"])
        .args(["-display", "none", "-monitor", "none", "-nic", "none"])
        .arg("-kernel")
        .arg(vm.join("vmlinuz"))
        .arg("-initrd")
        .arg(vm.join("initrd.img"))
        .args(["-append", "root=/dev/vda rw console=ttyS0 quiet systemd.show_status=0 panic=-1"])
        .arg("-drive")
        .arg(format!("file={},format=raw,if=virtio", image.display()))
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-system-x86_64");
    let started = Instant::now();
    let exited = loop {
        match qemu.try_wait().expect("qemu") {
            Some(status) => break Some(status),
            None if started.elapsed() > BOOT_TIMEOUT => break None,
            None => std::thread::sleep(Duration::from_secs(1)),
        }
    };
    let text = std::fs::read_to_string(console).unwrap_or_default();
    let Some(status) = exited else {
        let _ = qemu.kill();
        let _ = qemu.wait();
        panic!("the VM did not power off within {BOOT_TIMEOUT:?}; console:\n{}", tail(&text, 80));
    };
    let mut stderr = String::new();
    let _ = qemu.stderr.take().map(|mut e| e.read_to_string(&mut stderr));
    assert!(status.success(), "qemu failed ({status}): {stderr}\nconsole:\n{}", tail(&text, 80));
    println!("VM booted, checked and powered off in {:.0} s", started.elapsed().as_secs_f64());
    text
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[test]
fn the_agent_runs_under_systemd_with_a_delegated_cgroup_v2_subtree_and_resizes_in_place() {
    if !nix_is_root() {
        eprintln!("SKIPPED (not run): the systemd VM test needs root to build its image");
        return;
    }
    let vm = match vm_dir() {
        Ok(dir) => dir,
        Err(why) => {
            eprintln!("SKIPPED (not run): the systemd VM test cannot run here: {why}");
            return;
        }
    };
    let work = tempfile::tempdir().unwrap();
    let root = vm.join("rootfs");
    stage(&root, work.path());
    let image = work.path().join("root.img");
    make_image(&root, &image);
    let console = boot(&vm, &image, &work.path().join("console.log"));
    let report: Vec<&str> = console.lines().filter_map(|l| l.trim_end_matches('\r').strip_prefix("TIDAL-VM ")).collect();
    for line in &report {
        println!("  {line}");
    }
    assert!(
        report.iter().any(|l| l.starts_with("PASS")),
        "the checks inside the VM did not pass:\n{}",
        if report.is_empty() { tail(&console, 80) } else { report.join("\n") }
    );
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false)
}
