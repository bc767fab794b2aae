//! Network namespaces joined by a bridge, so that a test can cut one replica's link while
//! the others, and the test itself (on the bridge, in the root namespace), still talk.
//! Needs root; everything is removed on drop.

use std::process::Command;

pub struct Net {
    bridge: String,
    namespaces: Vec<String>,
    veths: Vec<String>,
    /// The first three octets of the /24 the namespaces live in.
    prefix: String,
}

pub(crate) fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("running ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// True when this process may create namespaces (it runs as root).
pub fn available() -> bool {
    nix_uid() == 0
}

fn nix_uid() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(u32::MAX)
}

impl Net {
    /// `n` namespaces, each with one address on a shared bridge.
    pub fn create(n: usize) -> Result<Self, String> {
        let pid = std::process::id();
        let tag = pid % 100_000;
        let mut net = Self {
            bridge: format!("tb{tag}"),
            namespaces: Vec::new(),
            veths: Vec::new(),
            prefix: format!("10.{}.{}", 200 + (pid / 250) % 50, pid % 250),
        };
        ip(&["link", "add", &net.bridge, "type", "bridge"])?;
        ip(&["addr", "add", &format!("{}.254/24", net.prefix), "dev", &net.bridge])?;
        ip(&["link", "set", &net.bridge, "up"])?;
        for k in 1..=n {
            let ns = format!("tidal-{pid}-{k}");
            let veth = format!("tv{tag}x{k}");
            ip(&["netns", "add", &ns])?;
            net.namespaces.push(ns.clone());
            ip(&["link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
            net.veths.push(veth.clone());
            ip(&["link", "set", &veth, "master", &net.bridge])?;
            ip(&["link", "set", &veth, "up"])?;
            ip(&["-n", &ns, "addr", "add", &format!("{}/24", net.host(k)), "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(net)
    }

    /// The address of namespace `k` (1-based).
    pub fn host(&self, k: usize) -> String {
        format!("{}.{k}", self.prefix)
    }

    /// The command prefix that runs a program inside namespace `k`.
    pub fn wrapper(&self, k: usize) -> Vec<String> {
        vec!["ip".into(), "netns".into(), "exec".into(), self.namespaces[k - 1].clone()]
    }

    /// Cuts namespace `k` off from everyone (its link to the bridge goes down).
    pub fn cut(&self, k: usize) -> Result<(), String> {
        ip(&["link", "set", &self.veths[k - 1], "down"])
    }

    pub fn heal(&self, k: usize) -> Result<(), String> {
        ip(&["link", "set", &self.veths[k - 1], "up"])
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for veth in &self.veths {
            let _ = ip(&["link", "del", veth]);
        }
        for ns in &self.namespaces {
            let _ = ip(&["netns", "del", ns]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}
