//! CPU cgroups for workers: one cgroup per worker under the agent's subtree, with a CFS quota
//! that is rewritten in place to resize a running worker.
//!
//! Two drivers, chosen at start-up from `/proc/self/mountinfo` (or forced by configuration):
//! - **v2** (production): the unified hierarchy with the `cpu` controller; the agent's own
//!   cgroup (systemd `Delegate=yes`) gets `workers/worker-N` children, limits in `cpu.max`,
//!   usage and throttling in `cpu.stat`.
//! - **v1** (fallback, and the only cpu controller on the development machines): `cpu` and
//!   `cpuacct` hierarchies, limits in `cpu.cfs_quota_us`/`cpu.cfs_period_us`, usage in
//!   `cpuacct.usage`, throttling in `cpu.stat`.
//!
//! The files are written directly: resizing is two small writes on the hot path of
//! adaptation, and the agent touches only the cpu controllers, never the other hierarchies a
//! general-purpose cgroup library would create groups in.

use std::fs;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// The CFS period the agent sets: 10 ms rather than the kernel's 100 ms, so that a worker
/// that spends its quota early in a period waits at most a few ms, not tens, for the next one
/// (throttling otherwise lands straight in the tail latency).
pub const PERIOD_US: u64 = 10_000;

#[derive(Debug, Error)]
pub enum CgroupError {
    #[error("no cgroup cpu controller is mounted (looked for cgroup2 with `cpu` and cgroup v1 `cpu`)")]
    NoCpuController,
    #[error("cgroup driver {0:?} was requested but its cpu controller is not mounted")]
    DriverUnavailable(CgroupDriverChoice),
    #[error("{action} {path}: {source}")]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
    #[error("cannot parse {path}: {content:?}")]
    Parse { path: PathBuf, content: String },
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io { action, path: path.to_path_buf(), source }
}

/// Which hierarchy to use, from configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CgroupDriverChoice {
    /// v2 when the unified hierarchy has the cpu controller, else v1.
    Auto,
    V1,
    V2,
    /// No cgroups: workers run unlimited (for machines where the agent may not write them).
    None,
}

#[derive(Debug, Clone, PartialEq)]
enum Driver {
    V1 { cpu: PathBuf, cpuacct: Option<PathBuf> },
    V2 { dir: PathBuf },
    None,
}

/// The agent's cgroup subtree, in which it creates one cgroup per worker.
#[derive(Debug, Clone)]
pub struct CpuCgroups {
    driver: Driver,
}

/// Where the cpu controllers are mounted, read from `/proc/self/mountinfo`.
#[derive(Debug, Default, PartialEq)]
struct Mounts {
    v2: Option<PathBuf>,
    v1_cpu: Option<PathBuf>,
    v1_cpuacct: Option<PathBuf>,
}

fn parse_mountinfo(text: &str) -> Mounts {
    let mut m = Mounts::default();
    for line in text.lines() {
        // "<id> <parent> <maj:min> <root> <mount point> <opts> [optional…] - <fstype> <source> <super opts>"
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mount_point = left.split_whitespace().nth(4).map(PathBuf::from);
        let mut r = right.split_whitespace();
        let fstype = r.next().unwrap_or("");
        let super_opts: Vec<&str> = r.nth(1).unwrap_or("").split(',').collect();
        match fstype {
            "cgroup2" => {
                let has_cpu = mount_point
                    .as_ref()
                    .and_then(|p| fs::read_to_string(p.join("cgroup.controllers")).ok())
                    .is_some_and(|c| c.split_whitespace().any(|x| x == "cpu"));
                if has_cpu {
                    m.v2 = mount_point;
                }
            }
            "cgroup" => {
                if super_opts.contains(&"cpu") {
                    m.v1_cpu = mount_point.clone();
                }
                if super_opts.contains(&"cpuacct") {
                    m.v1_cpuacct = mount_point;
                }
            }
            _ => {}
        }
    }
    m
}

/// The calling process's cgroup v2 path ("0::/system.slice/tidal-agent.service").
fn own_v2_cgroup() -> Option<String> {
    let text = fs::read_to_string("/proc/self/cgroup").ok()?;
    text.lines().find_map(|l| l.strip_prefix("0::")).map(|p| p.trim_start_matches('/').to_string())
}

impl CpuCgroups {
    /// Detects the driver and creates the agent's subtree `subtree` (v1: under the cpu
    /// hierarchy's root; v2: under the agent's own cgroup unless `subtree` is absolute).
    pub fn setup(choice: CgroupDriverChoice, subtree: &str) -> Result<Self, CgroupError> {
        let mountinfo =
            fs::read_to_string("/proc/self/mountinfo").map_err(io("read", Path::new("/proc/self/mountinfo")))?;
        let mounts = parse_mountinfo(&mountinfo);
        let use_v2 = match choice {
            CgroupDriverChoice::None => return Ok(Self { driver: Driver::None }),
            CgroupDriverChoice::V2 if mounts.v2.is_none() => return Err(CgroupError::DriverUnavailable(choice)),
            CgroupDriverChoice::V1 if mounts.v1_cpu.is_none() => return Err(CgroupError::DriverUnavailable(choice)),
            CgroupDriverChoice::V2 => true,
            CgroupDriverChoice::V1 => false,
            CgroupDriverChoice::Auto => mounts.v2.is_some(),
        };
        let driver = if use_v2 {
            let root = mounts.v2.ok_or(CgroupError::NoCpuController)?;
            Self::setup_v2(&root, subtree)?
        } else {
            let cpu = mounts.v1_cpu.ok_or(CgroupError::NoCpuController)?.join(subtree.trim_start_matches('/'));
            fs::create_dir_all(&cpu).map_err(io("create", &cpu))?;
            let cpuacct = match mounts.v1_cpuacct {
                Some(root) => {
                    let dir = root.join(subtree.trim_start_matches('/'));
                    fs::create_dir_all(&dir).map_err(io("create", &dir))?;
                    Some(dir)
                }
                None => None,
            };
            Driver::V1 { cpu, cpuacct }
        };
        Ok(Self { driver })
    }

    /// v2 forbids processes in inner nodes: the agent moves itself to `<own>/agent` and puts
    /// workers under `<own>/<subtree>` with the cpu controller enabled.
    fn setup_v2(root: &Path, subtree: &str) -> Result<Driver, CgroupError> {
        let base = if subtree.starts_with('/') {
            root.join(subtree.trim_start_matches('/'))
        } else {
            let own = root.join(own_v2_cgroup().unwrap_or_default());
            let agent_leaf = own.join("agent");
            fs::create_dir_all(&agent_leaf).map_err(io("create", &agent_leaf))?;
            let procs = agent_leaf.join("cgroup.procs");
            fs::write(&procs, std::process::id().to_string()).map_err(io("move the agent into", &procs))?;
            enable_cpu(&own)?;
            own.join(subtree)
        };
        fs::create_dir_all(&base).map_err(io("create", &base))?;
        enable_cpu(&base)?;
        Ok(Driver::V2 { dir: base })
    }

    pub fn driver_name(&self) -> &'static str {
        match self.driver {
            Driver::V1 { .. } => "cgroup-v1",
            Driver::V2 { .. } => "cgroup-v2",
            Driver::None => "none",
        }
    }

    /// Creates (or reuses) the cgroup of worker `name`.
    pub fn create(&self, name: &str) -> Result<WorkerCgroup, CgroupError> {
        let driver = match &self.driver {
            Driver::V1 { cpu, cpuacct } => {
                Driver::V1 { cpu: cpu.join(name), cpuacct: cpuacct.as_ref().map(|d| d.join(name)) }
            }
            Driver::V2 { dir } => Driver::V2 { dir: dir.join(name) },
            Driver::None => Driver::None,
        };
        let cg = WorkerCgroup { driver };
        for dir in cg.dirs() {
            fs::create_dir_all(dir).map_err(io("create", dir))?;
        }
        Ok(cg)
    }

    /// Kills whatever still runs in the subtree's worker cgroups and removes them: on start,
    /// what a crashed agent left behind; on exit, what an interrupted operation (a profile)
    /// left running. Returns how many cgroups were removed.
    pub fn sweep(&self) -> usize {
        let roots: Vec<&PathBuf> = match &self.driver {
            Driver::V1 { cpu, cpuacct } => std::iter::once(cpu).chain(cpuacct.iter()).collect(),
            Driver::V2 { dir } => vec![dir],
            Driver::None => vec![],
        };
        let mut removed = 0;
        for root in roots {
            let Ok(entries) = fs::read_dir(root) else { continue };
            for dir in entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()) {
                kill_all(&dir);
                if remove_when_empty(&dir) {
                    removed += 1;
                } else {
                    tracing::warn!(path = %dir.display(), "could not remove a leftover cgroup");
                }
            }
        }
        removed
    }

    /// Removes the (empty) subtree; called on exit after every worker is gone.
    pub fn remove(&self) {
        let dirs: Vec<&PathBuf> = match &self.driver {
            Driver::V1 { cpu, cpuacct } => std::iter::once(cpu).chain(cpuacct.iter()).collect(),
            Driver::V2 { dir } => vec![dir],
            Driver::None => vec![],
        };
        for dir in dirs {
            if let Err(e) = fs::remove_dir(dir) {
                tracing::warn!(path = %dir.display(), error = %e, "could not remove the agent's cgroup");
            }
        }
    }
}

/// SIGKILLs every process in a cgroup.
fn kill_all(dir: &Path) {
    let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) else { return };
    for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    }
}

/// Removes a cgroup once its killed processes are gone (up to a second).
fn remove_when_empty(dir: &Path) -> bool {
    for _ in 0..100 {
        if fs::remove_dir(dir).is_ok() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    false
}

fn enable_cpu(dir: &Path) -> Result<(), CgroupError> {
    let control = dir.join("cgroup.subtree_control");
    fs::write(&control, "+cpu").map_err(io("enable cpu in", &control))
}

/// CPU time used and throttling, cumulative since the cgroup was created.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CpuStats {
    pub usage_us: u64,
    pub nr_throttled: u64,
    pub throttled_us: u64,
}

/// One worker's cgroup.
#[derive(Debug)]
pub struct WorkerCgroup {
    driver: Driver,
}

impl WorkerCgroup {
    fn dirs(&self) -> Vec<&PathBuf> {
        match &self.driver {
            Driver::V1 { cpu, cpuacct } => std::iter::once(cpu).chain(cpuacct.iter()).collect(),
            Driver::V2 { dir } => vec![dir],
            Driver::None => vec![],
        }
    }

    /// The directory whose files hold the quota (for operators and tests).
    pub fn cpu_dir(&self) -> Option<&Path> {
        match &self.driver {
            Driver::V1 { cpu, .. } => Some(cpu),
            Driver::V2 { dir } => Some(dir),
            Driver::None => None,
        }
    }

    /// Moves a process (all its threads) into the cgroup.
    pub fn add_process(&self, pid: u32) -> Result<(), CgroupError> {
        for dir in self.dirs() {
            let procs = dir.join("cgroup.procs");
            fs::write(&procs, pid.to_string()).map_err(io("add a process to", &procs))?;
        }
        Ok(())
    }

    /// Sets the CPU limit to `millicores` (1000 = one core) — in place, effective at the next
    /// CFS period.
    pub fn set_millicores(&self, millicores: u32) -> Result<(), CgroupError> {
        let quota_us = (millicores as u64 * PERIOD_US / 1000).max(1000);
        match &self.driver {
            Driver::V1 { cpu, .. } => {
                let period = cpu.join("cpu.cfs_period_us");
                let current = read_u64(&period)?;
                if current != PERIOD_US {
                    // A quota larger than allowed for the old period is rejected: clear it first.
                    let quota = cpu.join("cpu.cfs_quota_us");
                    fs::write(&quota, "-1").map_err(io("write", &quota))?;
                    fs::write(&period, PERIOD_US.to_string()).map_err(io("write", &period))?;
                }
                let quota = cpu.join("cpu.cfs_quota_us");
                fs::write(&quota, quota_us.to_string()).map_err(io("write", &quota))
            }
            Driver::V2 { dir } => {
                let max = dir.join("cpu.max");
                fs::write(&max, format!("{quota_us} {PERIOD_US}")).map_err(io("write", &max))
            }
            Driver::None => Ok(()),
        }
    }

    /// The limit in force as the kernel reports it, in millicores (`None`: unlimited).
    pub fn millicores(&self) -> Result<Option<u32>, CgroupError> {
        let (quota, period) = match &self.driver {
            Driver::V1 { cpu, .. } => {
                let q = read_i64(&cpu.join("cpu.cfs_quota_us"))?;
                let p = read_u64(&cpu.join("cpu.cfs_period_us"))?;
                if q < 0 {
                    return Ok(None);
                }
                (q as u64, p)
            }
            Driver::V2 { dir } => {
                let path = dir.join("cpu.max");
                let text = fs::read_to_string(&path).map_err(io("read", &path))?;
                let mut parts = text.split_whitespace();
                let q = parts.next().unwrap_or("max");
                if q == "max" {
                    return Ok(None);
                }
                let parse = |s: Option<&str>| s.and_then(|s| s.parse::<u64>().ok());
                match (parse(Some(q)), parse(parts.next())) {
                    (Some(q), Some(p)) => (q, p),
                    _ => return Err(CgroupError::Parse { path, content: text }),
                }
            }
            Driver::None => return Ok(None),
        };
        Ok(Some((quota * 1000 / period.max(1)) as u32))
    }

    pub fn stats(&self) -> Result<CpuStats, CgroupError> {
        match &self.driver {
            Driver::V1 { cpu, cpuacct } => {
                let stat = read_keyed(&cpu.join("cpu.stat"))?;
                let usage_ns = match cpuacct {
                    Some(dir) => read_u64(&dir.join("cpuacct.usage"))?,
                    None => 0,
                };
                Ok(CpuStats {
                    usage_us: usage_ns / 1000,
                    nr_throttled: keyed(&stat, "nr_throttled"),
                    throttled_us: keyed(&stat, "throttled_time") / 1000,
                })
            }
            Driver::V2 { dir } => {
                let stat = read_keyed(&dir.join("cpu.stat"))?;
                Ok(CpuStats {
                    usage_us: keyed(&stat, "usage_usec"),
                    nr_throttled: keyed(&stat, "nr_throttled"),
                    throttled_us: keyed(&stat, "throttled_usec"),
                })
            }
            Driver::None => Ok(CpuStats::default()),
        }
    }

    /// Removes the cgroup; its processes must have exited.
    pub fn remove(&self) {
        for dir in self.dirs() {
            if let Err(e) = fs::remove_dir(dir) {
                tracing::warn!(path = %dir.display(), error = %e, "could not remove a worker cgroup");
            }
        }
    }
}

fn read_u64(path: &Path) -> Result<u64, CgroupError> {
    let text = fs::read_to_string(path).map_err(io("read", path))?;
    text.trim().parse().map_err(|_| CgroupError::Parse { path: path.into(), content: text })
}

fn read_i64(path: &Path) -> Result<i64, CgroupError> {
    let text = fs::read_to_string(path).map_err(io("read", path))?;
    text.trim().parse().map_err(|_| CgroupError::Parse { path: path.into(), content: text })
}

fn read_keyed(path: &Path) -> Result<Vec<(String, u64)>, CgroupError> {
    let text = fs::read_to_string(path).map_err(io("read", path))?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect())
}

fn keyed(pairs: &[(String, u64)], key: &str) -> u64 {
    pairs.iter().find(|(k, _)| k == key).map_or(0, |(_, v)| *v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_finds_v1_cpu_and_cpuacct_mounts() {
        let text = "\
30 25 0:26 / /sys/fs/cgroup/cpu rw,nosuid - cgroup cgroup rw,cpu
31 25 0:27 / /sys/fs/cgroup/cpuacct rw,nosuid - cgroup cgroup rw,cpuacct
32 25 0:28 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory
33 25 0:29 / /nonexistent/unified rw shared:9 - cgroup2 cgroup2 rw";
        let m = parse_mountinfo(text);
        assert_eq!(m.v1_cpu, Some(PathBuf::from("/sys/fs/cgroup/cpu")));
        assert_eq!(m.v1_cpuacct, Some(PathBuf::from("/sys/fs/cgroup/cpuacct")));
        // A cgroup2 mount without the cpu controller is not a v2 cpu hierarchy.
        assert_eq!(m.v2, None);
    }

    #[test]
    fn a_combined_cpu_cpuacct_mount_serves_both() {
        let m = parse_mountinfo("30 25 0:26 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct");
        assert_eq!(m.v1_cpu, m.v1_cpuacct);
        assert!(m.v1_cpu.is_some());
    }
}
