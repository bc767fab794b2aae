//! CPU (and memory) cgroups for workers: one cgroup per worker under the agent's subtree, with
//! a CFS quota that is rewritten in place to resize a running worker, and a memory limit from
//! the plan whose OOM kills are counted.
//!
//! Two drivers, chosen at start-up from `/proc/self/mountinfo` (or forced by configuration),
//! both through `cgroups-rs` with only the cpu controllers named, so that the agent never
//! creates groups in the other hierarchies:
//! - **v2** (production): the unified hierarchy with the `cpu` controller; the agent's own
//!   cgroup (systemd `Delegate=yes`) gets `workers/worker-N` children, limits in `cpu.max`,
//!   usage and throttling in `cpu.stat`.
//! - **v1** (fallback, and the only cpu controller on the development machines): `cpu` and
//!   `cpuacct` hierarchies, limits in `cpu.cfs_quota_us`/`cpu.cfs_period_us`, usage in
//!   `cpuacct.usage`, throttling in `cpu.stat`.
//!
//! Memory, where the hierarchy offers it (v2: `memory` among the agent's cgroup's controllers;
//! v1: a `memory` mount), is named too: `memory.max` (v1 `memory.limit_in_bytes`) and the OOM
//! kill count of `memory.events` (v1 `memory.oom_control`). Without it, workers' memory is
//! planned but not limited, and the agent says so at start.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cgroups_rs::cpu::CpuController;
use cgroups_rs::cpuacct::CpuAcctController;
use cgroups_rs::hierarchies::{V1, V2};
use cgroups_rs::memory::MemController;
use cgroups_rs::{Cgroup, CgroupPid, Controller, Hierarchy};
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
    #[error("{action} cgroup {path}: {source}")]
    Cgroup { action: &'static str, path: String, source: cgroups_rs::error::Error },
    #[error(
        "the worker already holds {} MiB, over the limit of {} MiB it would be given: it keeps \
         its limit until it is next started",
        .holds >> 20,
        .limit >> 20
    )]
    UnderUsage { holds: u64, limit: u64 },
    #[error("cgroup {0} has no cpu controller")]
    NoCpuIn(String),
    #[error(
        "another agent runs in cgroup subtree {0}; give each agent on a machine its own --node or \
         --cgroup-subtree (this one would have killed that one's workers when it swept the subtree)"
    )]
    InUse(String),
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io { action, path: path.to_path_buf(), source }
}

fn lib<'a>(action: &'static str, cg: &'a Cgroup) -> impl FnOnce(cgroups_rs::error::Error) -> CgroupError + 'a {
    move |source| CgroupError::Cgroup { action, path: cg.path().to_string(), source }
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

#[derive(Debug, Clone, Copy, PartialEq)]
enum Version {
    V1,
    V2,
}

impl Version {
    fn hierarchy(self) -> Box<dyn Hierarchy> {
        match self {
            Version::V1 => Box::new(V1::new()),
            Version::V2 => Box::new(V2::new()),
        }
    }
}

/// A hierarchy and the controllers the agent names in it.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Hier {
    version: Version,
    /// Whether workers' memory is limited (the memory controller is there).
    memory: bool,
}

impl Hier {
    /// The only controllers the agent names: cpu (quota, throttling), on v1 cpuacct (usage;
    /// v2 reports it in cpu.stat), and memory where it limits workers.
    fn controllers(self) -> Vec<String> {
        let mut names: Vec<String> = match self.version {
            Version::V1 => vec!["cpu".into(), "cpuacct".into()],
            Version::V2 => vec!["cpu".into()],
        };
        if self.memory {
            names.push("memory".into());
        }
        names
    }

    /// An existing cgroup.
    fn load(self, path: &str) -> Cgroup {
        Cgroup::load_with_specified_controllers(self.version.hierarchy(), path, self.controllers())
    }

    /// A cgroup, created unless it exists.
    fn cgroup(self, path: &str) -> Result<Cgroup, CgroupError> {
        Cgroup::new_with_specified_controllers(self.version.hierarchy(), path, Some(self.controllers()))
            .map_err(|source| CgroupError::Cgroup { action: "create", path: path.to_string(), source })
    }
}

/// The agent's cgroup subtree, in which it creates one cgroup per worker.
#[derive(Debug, Clone)]
pub struct CpuCgroups {
    /// The hierarchy and the subtree's path in it; `None`: the `none` driver.
    subtree: Option<(Hier, String)>,
    /// An exclusive lock on the subtree's directory, held while the agent lives (the kernel
    /// drops it when the process ends, however it ends): a second agent on the subtree is
    /// refused before it sweeps it.
    _claim: Option<Arc<nix::fcntl::Flock<fs::File>>>,
}

/// Where the cpu controllers are mounted, read from `/proc/self/mountinfo`.
#[derive(Debug, Default, PartialEq)]
struct Mounts {
    v2: Option<PathBuf>,
    v1_cpu: Option<PathBuf>,
    v1_cpuacct: Option<PathBuf>,
    v1_memory: Option<PathBuf>,
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
                    m.v1_cpuacct = mount_point.clone();
                }
                if super_opts.contains(&"memory") {
                    m.v1_memory = mount_point;
                }
            }
            _ => {}
        }
    }
    m
}

/// The calling process's cgroup v2 path ("system.slice/tidal-agent.service").
fn own_v2_cgroup() -> Option<String> {
    let text = fs::read_to_string("/proc/self/cgroup").ok()?;
    text.lines().find_map(|l| l.strip_prefix("0::")).map(|p| p.trim_matches('/').to_string())
}

fn join(parent: &str, child: &str) -> String {
    match (parent.trim_matches('/'), child.trim_matches('/')) {
        ("", c) => c.to_string(),
        (p, c) => format!("{p}/{c}"),
    }
}

impl CpuCgroups {
    /// Detects the driver and creates the agent's subtree `subtree` (v1: under the cpu
    /// hierarchy's root; v2: under the agent's own cgroup unless `subtree` is absolute).
    pub fn setup(choice: CgroupDriverChoice, subtree: &str) -> Result<Self, CgroupError> {
        let mountinfo =
            fs::read_to_string("/proc/self/mountinfo").map_err(io("read", Path::new("/proc/self/mountinfo")))?;
        let mounts = parse_mountinfo(&mountinfo);
        let version = match choice {
            CgroupDriverChoice::None => return Ok(Self { subtree: None, _claim: None }),
            CgroupDriverChoice::V2 if mounts.v2.is_none() => return Err(CgroupError::DriverUnavailable(choice)),
            CgroupDriverChoice::V1 if mounts.v1_cpu.is_none() => return Err(CgroupError::DriverUnavailable(choice)),
            CgroupDriverChoice::V2 => Version::V2,
            CgroupDriverChoice::V1 => Version::V1,
            CgroupDriverChoice::Auto if mounts.v2.is_some() => Version::V2,
            CgroupDriverChoice::Auto if mounts.v1_cpu.is_some() => Version::V1,
            CgroupDriverChoice::Auto => return Err(CgroupError::NoCpuController),
        };
        if version == Version::V2
            && mounts.v2.as_deref() != Some(Path::new(cgroups_rs::hierarchies::UNIFIED_MOUNTPOINT))
        {
            // cgroups-rs addresses the unified hierarchy at its standard mount point only.
            return Err(CgroupError::DriverUnavailable(choice));
        }
        // Memory where the hierarchy has it: v2 delegates controllers to the agent's cgroup
        // (systemd `Delegate=yes`), v1 mounts memory on its own.
        let memory = match version {
            Version::V1 => mounts.v1_memory.is_some(),
            Version::V2 => {
                let own =
                    Path::new(cgroups_rs::hierarchies::UNIFIED_MOUNTPOINT).join(own_v2_cgroup().unwrap_or_default());
                fs::read_to_string(own.join("cgroup.controllers"))
                    .is_ok_and(|c| c.split_whitespace().any(|x| x == "memory"))
            }
        };
        let path = match version {
            Version::V2 if !subtree.starts_with('/') => Self::leave_own_cgroup(subtree)?,
            _ => subtree.trim_matches('/').to_string(),
        };
        let hier = Hier { version, memory };
        let cpu_only = Hier { memory: false, ..hier };
        // cgroups-rs passes over a hierarchy it cannot write (it warns): memory is used only
        // where the subtree's limit file is there afterwards.
        let (hier, cgroup) = match hier.cgroup(&path) {
            Ok(cgroup) if !memory || has_memory_files(&cgroup) => (hier, cgroup),
            outcome => {
                let why = outcome.err().map_or_else(|| "its files are missing".to_string(), |e| e.to_string());
                tracing::warn!(error = %why, "the memory controller cannot be used: workers' memory is planned, not limited");
                (cpu_only, cpu_only.cgroup(&path)?)
            }
        };
        let dir = controller_dirs(&cgroup).into_iter().next().ok_or_else(|| CgroupError::NoCpuIn(path.clone()))?;
        let file = fs::File::open(&dir).map_err(io("open", &dir))?;
        let claim = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(
            |(_, errno)| match errno {
                nix::errno::Errno::EWOULDBLOCK => CgroupError::InUse(dir.display().to_string()),
                other => CgroupError::Io { action: "lock", path: dir.clone(), source: other.into() },
            },
        )?;
        Ok(Self { subtree: Some((hier, path)), _claim: Some(Arc::new(claim)) })
    }

    /// v2 forbids processes in inner nodes: the agent moves itself to `<own>/agent`, so that
    /// its own cgroup (delegated by systemd) can hold `<own>/<subtree>`. Returns that path.
    fn leave_own_cgroup(subtree: &str) -> Result<String, CgroupError> {
        let own = own_v2_cgroup().unwrap_or_default();
        // Created by hand: cgroups-rs would first enable cpu in <own>, and a cgroup with
        // processes and a threaded controller enabled becomes a thread root whose children
        // refuse processes (EOPNOTSUPP).
        let leaf = join(&own, "agent");
        let dir = Path::new(cgroups_rs::hierarchies::UNIFIED_MOUNTPOINT).join(&leaf);
        fs::create_dir_all(&dir).map_err(io("create", &dir))?;
        let agent_leaf = Hier { version: Version::V2, memory: false }.load(&leaf);
        agent_leaf
            .add_task_by_tgid(CgroupPid::from(std::process::id() as u64))
            .map_err(lib("move the agent into", &agent_leaf))?;
        Ok(join(&own, subtree))
    }

    pub fn driver_name(&self) -> &'static str {
        match self.subtree {
            Some((Hier { version: Version::V1, .. }, _)) => "cgroup-v1",
            Some((Hier { version: Version::V2, .. }, _)) => "cgroup-v2",
            None => "none",
        }
    }

    /// Whether workers' memory is limited (the hierarchy has the memory controller).
    pub fn limits_memory(&self) -> bool {
        self.subtree.as_ref().is_some_and(|(h, _)| h.memory)
    }

    /// Creates (or reuses) the cgroup of worker `name`.
    pub fn create(&self, name: &str) -> Result<WorkerCgroup, CgroupError> {
        let cgroup = match &self.subtree {
            Some((hier, base)) => Some(hier.cgroup(&join(base, name))?),
            None => None,
        };
        Ok(WorkerCgroup { cgroup })
    }

    /// Kills whatever still runs in the subtree's worker cgroups and removes them: on start,
    /// what a crashed agent left behind; on exit, what an interrupted operation (a profile)
    /// left running. Returns how many cgroups were removed.
    pub fn sweep(&self) -> usize {
        let Some((hier, base)) = &self.subtree else { return 0 };
        let mut names: Vec<String> = Vec::new();
        for dir in controller_dirs(&hier.load(base)) {
            let Ok(entries) = fs::read_dir(&dir) else { continue };
            for entry in entries.flatten().filter(|e| e.path().is_dir()) {
                let name = entry.file_name().to_string_lossy().into_owned();
                if !names.contains(&name) {
                    names.push(name);
                }
            }
        }
        let mut removed = 0;
        for name in names {
            let path = join(base, &name);
            let cg = hier.load(&path);
            kill_all(&cg);
            if remove_when_empty(&cg) {
                removed += 1;
            } else {
                tracing::warn!(path, "could not remove a leftover cgroup");
            }
        }
        removed
    }

    /// Removes the (empty) subtree; called on exit after every worker is gone.
    pub fn remove(&self) {
        if let Some((hier, base)) = &self.subtree {
            if let Err(e) = hier.load(base).delete() {
                tracing::warn!(path = base, error = %e, "could not remove the agent's cgroup");
            }
        }
    }
}

/// Whether a cgroup's memory limit file is there (v2 `memory.max`, v1 `memory.limit_in_bytes`).
fn has_memory_files(cg: &Cgroup) -> bool {
    cg.controller_of::<MemController>().is_some_and(|m| {
        let dir = m.path();
        dir.join("memory.max").exists() || dir.join("memory.limit_in_bytes").exists()
    })
}

/// The directories of a cgroup, one per hierarchy it lives in (v1: cpu, cpuacct, memory).
fn controller_dirs(cg: &Cgroup) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = cg.subsystems().iter().map(|s| s.to_controller().path().to_path_buf()).collect();
    dirs.dedup();
    dirs
}

/// SIGKILLs every process in a cgroup.
fn kill_all(cg: &Cgroup) {
    for pid in cg.procs() {
        let Ok(pid) = i32::try_from(pid.pid) else { continue };
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    }
}

/// Removes a cgroup once its killed processes are gone (up to a second).
fn remove_when_empty(cg: &Cgroup) -> bool {
    for _ in 0..100 {
        if cg.procs().is_empty() && cg.delete().is_ok() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    false
}

/// CPU time used and throttling, cumulative since the cgroup was created.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CpuStats {
    pub usage_us: u64,
    pub nr_throttled: u64,
    pub throttled_us: u64,
}

/// One worker's cgroup (`None`: the `none` driver).
#[derive(Debug)]
pub struct WorkerCgroup {
    cgroup: Option<Cgroup>,
}

impl WorkerCgroup {
    fn cpu(&self) -> Result<Option<&CpuController>, CgroupError> {
        match &self.cgroup {
            None => Ok(None),
            Some(cg) => {
                cg.controller_of::<CpuController>().map(Some).ok_or_else(|| CgroupError::NoCpuIn(cg.path().into()))
            }
        }
    }

    /// The directory whose files hold the quota (for operators and tests).
    pub fn cpu_dir(&self) -> Option<&Path> {
        self.cpu().ok().flatten().map(|c| c.path())
    }

    /// Moves a process (all its threads) into the cgroup.
    pub fn add_process(&self, pid: u32) -> Result<(), CgroupError> {
        match &self.cgroup {
            Some(cg) => cg.add_task_by_tgid(CgroupPid::from(pid as u64)).map_err(lib("add a process to", cg)),
            None => Ok(()),
        }
    }

    /// Sets the CPU limit to `millicores` (1000 = one core) — in place, effective at the next
    /// CFS period.
    pub fn set_millicores(&self, millicores: u32) -> Result<(), CgroupError> {
        let (Some(cg), Some(cpu)) = (&self.cgroup, self.cpu()?) else { return Ok(()) };
        let quota_us = (millicores as u64 * PERIOD_US / 1000).max(1000) as i64;
        if cpu.v2() {
            return cpu.set_cfs_quota_and_period(Some(quota_us), Some(PERIOD_US)).map_err(lib("resize", cg));
        }
        if cpu.cfs_period().map_err(lib("read the period of", cg))? != PERIOD_US {
            // v1 rejects a quota larger than allowed for the old period: clear it first.
            cpu.set_cfs_quota(-1).map_err(lib("clear the quota of", cg))?;
            cpu.set_cfs_period(PERIOD_US).map_err(lib("set the period of", cg))?;
        }
        cpu.set_cfs_quota(quota_us).map_err(lib("resize", cg))
    }

    /// The limit in force as the kernel reports it, in millicores (`None`: unlimited).
    pub fn millicores(&self) -> Result<Option<u32>, CgroupError> {
        let (Some(cg), Some(cpu)) = (&self.cgroup, self.cpu()?) else { return Ok(None) };
        let quota = cpu.cfs_quota().map_err(lib("read the quota of", cg))?;
        if quota < 0 {
            return Ok(None);
        }
        let period = cpu.cfs_period().map_err(lib("read the period of", cg))?;
        Ok(Some((quota as u64 * 1000 / period.max(1)) as u32))
    }

    pub fn stats(&self) -> Result<CpuStats, CgroupError> {
        let (Some(cg), Some(cpu)) = (&self.cgroup, self.cpu()?) else { return Ok(CpuStats::default()) };
        let stat = parse_keyed(&cpu.cpu().stat);
        if cpu.v2() {
            return Ok(CpuStats {
                usage_us: keyed(&stat, "usage_usec"),
                nr_throttled: keyed(&stat, "nr_throttled"),
                throttled_us: keyed(&stat, "throttled_usec"),
            });
        }
        let usage_ns = cg.controller_of::<CpuAcctController>().map_or(0, |acct| acct.cpuacct().usage);
        Ok(CpuStats {
            usage_us: usage_ns / 1000,
            nr_throttled: keyed(&stat, "nr_throttled"),
            throttled_us: keyed(&stat, "throttled_time") / 1000,
        })
    }

    /// Limits the memory of the worker's processes to `bytes` (0: unlimited); a process that
    /// goes over it is killed by the kernel's OOM killer, which [`WorkerCgroup::oom_kills`]
    /// counts. Nothing without the memory controller.
    pub fn set_memory_limit(&self, bytes: u64) -> Result<(), CgroupError> {
        let Some(cg) = &self.cgroup else { return Ok(()) };
        let Some(memory) = cg.controller_of::<MemController>() else { return Ok(()) };
        let limit = if bytes == 0 { -1 } else { i64::try_from(bytes).unwrap_or(i64::MAX) };
        // A worker over its memory is killed, not swapped: swapped, it would miss every
        // deadline. v2 keeps swap apart (memory.swap.max); v1 counts memory and swap together
        // and needs memsw ≥ memory at every step, so memsw is written on both sides of the
        // limit. Where swap is not accounted the files are missing: nothing to do.
        if memory.v2() {
            let _ = memory.set_memswap_limit(if bytes == 0 { -1 } else { 0 });
            return memory.set_limit(limit).map_err(lib("limit the memory of", cg));
        }
        let _ = memory.set_memswap_limit(limit);
        memory.set_limit(limit).map_err(lib("limit the memory of", cg))?;
        let _ = memory.set_memswap_limit(limit);
        Ok(())
    }

    /// The memory the cgroup's processes hold now, bytes (v2 `memory.current`, v1
    /// `memory.usage_in_bytes`); `None` without the memory controller.
    pub fn memory_usage(&self) -> Option<u64> {
        let memory = self.cgroup.as_ref()?.controller_of::<MemController>()?;
        let file = if memory.v2() { "memory.current" } else { "memory.usage_in_bytes" };
        fs::read_to_string(memory.path().join(file)).ok()?.trim().parse().ok()
    }

    /// The file that holds the cgroup's memory limit (v2 `memory.max`, v1
    /// `memory.limit_in_bytes`), which [`memory_limit_in`] reads; `None` without the memory
    /// controller.
    pub fn memory_limit_file(&self) -> Option<PathBuf> {
        let memory = self.cgroup.as_ref()?.controller_of::<MemController>()?;
        Some(memory.path().join(if memory.v2() { "memory.max" } else { "memory.limit_in_bytes" }))
    }

    /// How many of the cgroup's processes the kernel's OOM killer has killed (v2
    /// `memory.events`, v1 `memory.oom_control`; 0 without the memory controller).
    pub fn oom_kills(&self) -> u64 {
        let Some(memory) = self.cgroup.as_ref().and_then(|cg| cg.controller_of::<MemController>()) else { return 0 };
        let file = if memory.v2() { "memory.events" } else { "memory.oom_control" };
        let text = fs::read_to_string(memory.path().join(file)).unwrap_or_default();
        keyed(&parse_keyed(&text), "oom_kill")
    }

    /// Removes the cgroup; its processes must have exited.
    pub fn remove(&self) {
        if let Some(cg) = &self.cgroup {
            if let Err(e) = cg.delete() {
                tracing::warn!(path = cg.path(), error = %e, "could not remove a worker cgroup");
            }
        }
    }
}

fn parse_keyed(text: &str) -> Vec<(String, u64)> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

fn keyed(pairs: &[(String, u64)], key: &str) -> u64 {
    pairs.iter().find(|(k, _)| k == key).map_or(0, |(_, v)| *v)
}

/// The memory limit in a cgroup's limit file ([`WorkerCgroup::memory_limit_file`]), bytes; 0
/// when there is none (v2 "max", v1's page-rounded "unlimited") or the file cannot be read.
pub fn memory_limit_in(file: &Path) -> u64 {
    let text = fs::read_to_string(file).unwrap_or_default();
    match text.trim().parse::<u64>() {
        // v1 writes "no limit" as the largest page-aligned i64.
        Ok(bytes) if bytes < 1 << 62 => bytes,
        _ => 0,
    }
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
