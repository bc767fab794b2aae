//! Virtual machines for the tests that need a real systemd and cgroup v2 (these development
//! machines have neither): qemu under software emulation boots Debian's kernel with systemd
//! as PID 1 from an image that `scripts/vm-image.sh` builds once. A test copies the image's
//! tree, adds its own files, makes an ext4 image of it and boots one or more machines from it
//! (each with a throw-away overlay), on a bridge of their own when they need a network.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The built image's directory, building it when missing; `Err` says why this machine cannot
/// (the caller reports the test as not run).
pub fn image_dir() -> Result<PathBuf, String> {
    if !crate::netns::available() {
        return Err("building and booting the VM image needs root".into());
    }
    let script = repo().join("scripts/vm-image.sh");
    let status = Command::new(&script).status().map_err(|e| format!("running {}: {e}", script.display()))?;
    match status.code() {
        Some(0) => Ok(repo().join(".tidal/vm")),
        Some(2) => Err("qemu, debootstrap or root are not available (scripts/vm-image.sh said why above)".into()),
        _ => panic!("scripts/vm-image.sh failed: {status}"),
    }
}

/// A copy of the image's tree in `work`, for a test to add its files to.
pub fn copy_tree(image: &Path, work: &Path) -> PathBuf {
    let tree = work.join("rootfs");
    let status = Command::new("cp").args(["-a", "--reflink=auto"]).arg(image.join("rootfs")).arg(&tree).status();
    assert!(status.is_ok_and(|s| s.success()), "copying the VM tree");
    tree
}

pub fn copy(from: &Path, to: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(to.parent().expect("a parent")).expect("a directory");
    std::fs::copy(from, to).unwrap_or_else(|e| panic!("copying {} to {}: {e}", from.display(), to.display()));
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(mode)).expect("permissions");
}

pub fn write(to: &Path, text: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(to.parent().expect("a parent")).expect("a directory");
    std::fs::write(to, text).expect("writing into the VM tree");
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(mode)).expect("permissions");
}

/// Enables `unit` (already in /etc/systemd/system) for the multi-user target.
pub fn enable(tree: &Path, unit: &str) {
    let link = tree.join("etc/systemd/system/multi-user.target.wants").join(unit);
    std::fs::create_dir_all(link.parent().expect("a parent")).expect("a directory");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(format!("/etc/systemd/system/{unit}"), &link).expect("enabling a unit");
}

/// The uid and gid of `user` in the tree's /etc/passwd.
pub fn user(tree: &Path, user: &str) -> (u32, u32) {
    let passwd = std::fs::read_to_string(tree.join("etc/passwd")).expect("the tree's /etc/passwd");
    let line = passwd.lines().find(|l| l.starts_with(&format!("{user}:"))).expect("the user is in the image");
    let fields: Vec<&str> = line.split(':').collect();
    (fields[2].parse().expect("a uid"), fields[3].parse().expect("a gid"))
}

/// An ext4 image of `tree` (sparse, 3 GiB).
pub fn make_image(tree: &Path, image: &Path) {
    let status = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "tidal-vm", "-d"])
        .arg(tree)
        .arg(image)
        .arg("3G")
        .status()
        .expect("mkfs.ext4");
    assert!(status.success(), "mkfs.ext4 -d failed");
}

/// One running VM; killed on drop.
pub struct Vm {
    child: Child,
    pub console: PathBuf,
    pub started: Instant,
}

pub struct Boot<'a> {
    pub image_dir: &'a Path,
    pub disk: &'a Path,
    pub console: PathBuf,
    pub cpus: u32,
    pub memory_mib: u32,
    /// Writes go to a temporary overlay, so several VMs can boot from one disk.
    pub snapshot: bool,
    /// (tap device, MAC address, IPv4/prefix) of the machine's one network interface.
    pub nic: Option<(String, String, String)>,
}

impl Boot<'_> {
    pub fn start(self) -> Vm {
        let mut cmdline = "root=/dev/vda rw console=ttyS0 quiet systemd.show_status=0 panic=-1".to_string();
        let mut qemu = Command::new("qemu-system-x86_64");
        qemu.args(["-accel", "tcg", "-cpu", "max", "-no-reboot", "-display", "none", "-monitor", "none"])
            .args(["-smp", &self.cpus.to_string(), "-m", &self.memory_mib.to_string()])
            .arg("-kernel")
            .arg(self.image_dir.join("vmlinuz"))
            .arg("-initrd")
            .arg(self.image_dir.join("initrd.img"))
            .arg("-drive")
            .arg(format!("file={},format=raw,if=virtio", self.disk.display()))
            .arg("-serial")
            .arg(format!("file:{}", self.console.display()));
        if self.snapshot {
            qemu.arg("-snapshot");
        }
        match &self.nic {
            Some((tap, mac, ip)) => {
                qemu.args(["-netdev", &format!("tap,id=n0,ifname={tap},script=no,downscript=no")])
                    .args(["-device", &format!("virtio-net-pci,netdev=n0,mac={mac}")]);
                cmdline.push_str(&format!(" tidal.ip={ip}"));
            }
            None => {
                qemu.args(["-nic", "none"]);
            }
        }
        qemu.args(["-append", &cmdline]).stdout(Stdio::null()).stderr(Stdio::null());
        let child = qemu.spawn().expect("starting qemu-system-x86_64");
        Vm { child, console: self.console, started: Instant::now() }
    }
}

impl Vm {
    /// Waits until the VM powers itself off; the console's text. Panics after `timeout`.
    pub fn wait_poweroff(&mut self, timeout: Duration) -> String {
        loop {
            if let Some(status) = self.child.try_wait().expect("qemu") {
                let text = self.console_text();
                assert!(status.success(), "qemu failed ({status}); console:\n{}", tail(&text, 80));
                return text;
            }
            if self.started.elapsed() > timeout {
                panic!("the VM did not power off within {timeout:?}; console:\n{}", tail(&self.console_text(), 80));
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    pub fn console_text(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A bridge on the host with one tap device per VM, in a /24 of its own; removed on drop.
pub struct VmNet {
    bridge: String,
    taps: Vec<String>,
    prefix: String,
}

fn ip(args: &[&str]) {
    crate::netns::ip(args).unwrap_or_else(|e| panic!("{e}"));
}

impl VmNet {
    pub fn create(n: usize) -> Self {
        let pid = std::process::id();
        let tag = pid % 100_000;
        let net = Self {
            bridge: format!("tvb{tag}"),
            taps: (1..=n).map(|k| format!("tvt{tag}x{k}")).collect(),
            prefix: format!("10.{}.{}", 150 + (pid / 250) % 50, pid % 250),
        };
        ip(&["link", "add", &net.bridge, "type", "bridge"]);
        ip(&["addr", "add", &format!("{}.254/24", net.prefix), "dev", &net.bridge]);
        ip(&["link", "set", &net.bridge, "up"]);
        for tap in &net.taps {
            ip(&["tuntap", "add", "dev", tap, "mode", "tap"]);
            ip(&["link", "set", tap, "master", &net.bridge]);
            ip(&["link", "set", tap, "up"]);
        }
        net
    }

    /// The address of VM `k` (1-based).
    pub fn host(&self, k: usize) -> String {
        format!("{}.{}", self.prefix, k)
    }

    /// What [`Boot::nic`] takes for VM `k`.
    pub fn nic(&self, k: usize) -> (String, String, String) {
        (self.taps[k - 1].clone(), format!("52:54:00:7d:00:{k:02x}"), format!("{}/24", self.host(k)))
    }

    /// Cuts VM `k` off the network (its link goes down), as if the machine were lost.
    pub fn cut(&self, k: usize) {
        ip(&["link", "set", &self.taps[k - 1], "down"]);
    }

    pub fn heal(&self, k: usize) {
        ip(&["link", "set", &self.taps[k - 1], "up"]);
    }
}

impl Drop for VmNet {
    fn drop(&mut self) {
        for tap in &self.taps {
            let _ = Command::new("ip").args(["link", "del", tap]).status();
        }
        let _ = Command::new("ip").args(["link", "del", &self.bridge]).status();
    }
}

/// Waits until `addr` accepts TCP connections.
pub fn wait_port(addr: &str, timeout: Duration) {
    let started = Instant::now();
    let target: std::net::SocketAddr = addr.parse().expect("an ip:port");
    while std::net::TcpStream::connect_timeout(&target, Duration::from_secs(2)).is_err() {
        assert!(started.elapsed() < timeout, "{addr} did not accept connections within {timeout:?}");
        std::thread::sleep(Duration::from_secs(1));
    }
}
