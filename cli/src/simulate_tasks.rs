//! `tidalctl simulate --tasks FILE`: several tasks sharing one cluster's cores, each replaying
//! its own slice of a trace, planned by the same adaptation core as the controller's, and
//! compared under three ways of sharing: `tidal` (one problem for all tasks), `independent`
//! (each task planned alone on an equal static split of the cores) and `fair-share` (a static
//! split by weight). Any other policy name plans the tasks together with that policy.
//!
//! Paths are relative to the file's directory (as in `results/tasks-48-cores.toml`).
//!
//! ```toml
//! cores = 4                  # optional; else --cores
//! memory = "64G"             # optional: the node's memory for workers; else --memory (none)
//!
//! [[tasks]]
//! name = "a"
//! copies = 1                 # optional: this many tasks "a-0", "a-1", …, each its own slice
//! offset_step = 0            # seconds between the copies' slices
//! trace = "../data/twitter-trace-rps.txt.gz"
//! offset = 0                 # trace seconds after --start where its slice begins
//! scale = 0.5                # factor on its rates (default 1)
//! slo_ms = 250
//! weight = 1                 # optional: weight, min_cores, max_cores, min_workers, idle_s
//!                            # as `tidalctl task set`
//! profiles = "demo-profiles.json"   # or tfserving_csv = "../data/…csv" (rows at slo_ms)
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use std::time::Instant;

use anyhow::{bail, Context};
use serde::Deserialize;
use tidal_common::adapt::AdaptConfig;
use tidal_common::sim::{simulate_tasks, SimConfig, SimReport, SimTask};
use tidal_common::solver::PolicyKind;
use tidal_proto::v1::TaskShare;

use crate::simulate::{compress, one_stage, saved_stages, sim_config, tfserving_variants, SimulateOpts};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TasksFile {
    cores: Option<u32>,
    memory: Option<String>,
    tasks: Vec<TaskEntry>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct TaskEntry {
    name: String,
    #[serde(default = "one_copy")]
    copies: u32,
    #[serde(default)]
    offset_step: usize,
    trace: PathBuf,
    #[serde(default)]
    offset: usize,
    #[serde(default = "one")]
    scale: f64,
    slo_ms: u32,
    weight: Option<f64>,
    #[serde(default)]
    min_cores: u32,
    #[serde(default)]
    max_cores: u32,
    min_workers: Option<u32>,
    #[serde(default)]
    idle_s: u32,
    profiles: Option<PathBuf>,
    tfserving_csv: Option<PathBuf>,
}

fn one() -> f64 {
    1.0
}

fn one_copy() -> u32 {
    1
}

/// The most tasks a file may describe (copies included): each is a slice of the trace in
/// memory and a task of every round's problem.
const MAX_TASKS: usize = 1000;

/// How the cluster's cores are shared in one row of the comparison.
#[derive(Debug, Clone, PartialEq)]
enum Sharing {
    /// Planned together, each task with its own weight, minimum and maximum.
    Joint(PolicyKind),
    /// Each task capped at an equal split of the cores.
    Independent,
    /// Each task capped at a split of the cores by weight.
    FairShare,
}

impl Sharing {
    fn parse(name: &str) -> anyhow::Result<Self> {
        Ok(match name {
            "independent" => Self::Independent,
            "fair-share" => Self::FairShare,
            other => Self::Joint(other.parse::<PolicyKind>().map_err(anyhow::Error::msg)?),
        })
    }

    fn label(&self) -> String {
        match self {
            Self::Joint(p) => p.to_string(),
            Self::Independent => "independent".into(),
            Self::FairShare => "fair-share".into(),
        }
    }

    /// The tasks with the shares this way of sharing gives them on `cores`: a static split is a
    /// maximum per task, the cores divided by largest remainder (each task one at least).
    fn apply(&self, tasks: &[SimTask], cores: u32) -> Vec<SimTask> {
        let parts: Vec<f64> = match self {
            Self::Joint(_) => return tasks.to_vec(),
            Self::Independent => vec![1.0; tasks.len()],
            Self::FairShare => tasks.iter().map(|t| t.share.and_then(|s| s.weight).unwrap_or(1.0).max(0.0)).collect(),
        };
        let total: f64 = parts.iter().sum();
        let exact: Vec<f64> = parts
            .iter()
            .map(|p| cores as f64 * if total > 0.0 { p / total } else { 1.0 / tasks.len() as f64 })
            .collect();
        let mut split: Vec<u32> = exact.iter().map(|e| e.floor() as u32).collect();
        let mut by_remainder: Vec<usize> = (0..tasks.len()).collect();
        by_remainder.sort_by(|&a, &b| (exact[b] - exact[b].floor()).total_cmp(&(exact[a] - exact[a].floor())));
        let left = cores.saturating_sub(split.iter().sum());
        for &i in by_remainder.iter().take(left as usize) {
            split[i] += 1;
        }
        tasks
            .iter()
            .zip(split)
            .map(|(t, cap)| SimTask {
                share: Some(TaskShare { weight: Some(1.0), max_cores: cap.max(1), ..Default::default() }),
                ..t.clone()
            })
            .collect()
    }
}

pub fn run(path: &Path, opts: &SimulateOpts) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut file: TasksFile = toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    // A relative path in the file is the file's own neighbour, wherever tidalctl runs.
    let dir = path.parent().unwrap_or(Path::new(""));
    for t in &mut file.tasks {
        for p in [Some(&mut t.trace), t.profiles.as_mut(), t.tfserving_csv.as_mut()].into_iter().flatten() {
            *p = dir.join(&*p);
        }
    }
    if file.tasks.is_empty() {
        bail!("{}: no [[tasks]]", path.display());
    }
    let cores = file.cores.unwrap_or(opts.cores);
    let memory = match (opts.memory, &file.memory) {
        (Some(m), _) => Some(m),
        (None, Some(m)) => Some(tidal_common::memory::parse_size(m).map_err(|e| anyhow::anyhow!("memory: {e}"))?),
        (None, None) => None,
    };
    let opts = SimulateOpts { cores, memory, ..opts.clone() };
    crate::simulate::validate(&opts)?;
    let sharings: Vec<Sharing> = opts.policies.iter().map(|p| Sharing::parse(p)).collect::<anyhow::Result<_>>()?;
    let entries = copies(&file.tasks)?;
    // Each trace read once, as far as its last task's slice reaches.
    let mut ends: BTreeMap<&Path, usize> = BTreeMap::new();
    for t in &entries {
        let end = opts.start.saturating_add(t.offset).saturating_add(opts.duration);
        let most = ends.entry(t.trace.as_path()).or_default();
        *most = (*most).max(end);
    }
    let mut traces: BTreeMap<&Path, Vec<f64>> = BTreeMap::new();
    for (path, end) in ends {
        let rates = crate::load::read_trace(path, 0, Some(end)).with_context(|| format!("{}", path.display()))?;
        traces.insert(path, rates);
    }
    let tasks: Vec<SimTask> =
        entries.iter().map(|t| task(t, &traces[t.trace.as_path()], &opts)).collect::<anyhow::Result<_>>()?;
    let cfg = sim_config(&opts)?;
    let described: Vec<String> = file
        .tasks
        .iter()
        .map(|t| {
            let copies =
                if t.copies > 1 { format!(" ×{} every {} s", t.copies, t.offset_step) } else { String::new() };
            format!("{}{copies} (+{} s ×{}, SLO {} ms)", t.name, t.offset, t.scale, t.slo_ms)
        })
        .collect();
    let memory =
        memory.filter(|&m| m > 0).map_or(String::new(), |m| format!(" and {}", tidal_common::memory::human(m)));
    println!(
        "{} tasks on {cores} cores{memory}, {} s each from second {}{}, every {} s: {}",
        tasks.len(),
        tasks.iter().map(|t| t.rates.len()).max().unwrap_or(0),
        opts.start,
        if opts.speedup > 1 { format!(", {}× faster", opts.speedup) } else { String::new() },
        opts.interval,
        described.join(", ")
    );
    let started = Instant::now();
    let reports: Vec<SimReport> = std::thread::scope(|s| -> anyhow::Result<Vec<SimReport>> {
        let handles: Vec<_> = sharings
            .iter()
            .map(|sharing| {
                let (tasks, cfg) = (sharing.apply(&tasks, cores), &cfg);
                s.spawn(move || {
                    let policy = match sharing {
                        Sharing::Joint(p) => p.clone(),
                        _ => PolicyKind::Tidal,
                    };
                    let cfg = SimConfig { adapt: AdaptConfig { policy, ..cfg.adapt.clone() }, ..cfg.clone() };
                    let mut r = simulate_tasks(&tasks, &cfg);
                    r.policy = sharing.label();
                    eprintln!("  {:<20} done after {:.1} s", r.policy, started.elapsed().as_secs_f64());
                    r
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().map_err(|_| anyhow::anyhow!("a simulation thread panicked"))).collect()
    })?;
    crate::simulate::print_table(&reports);
    if tasks.len() <= 20 {
        println!();
        print_tasks(&reports);
    }
    if let Some(path) = &opts.csv {
        write_csv(path, &reports)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// Each entry as the tasks it stands for: its copies, named `NAME-i`, each its slice
/// `offset_step` seconds after the last.
fn copies(entries: &[TaskEntry]) -> anyhow::Result<Vec<TaskEntry>> {
    let total: usize = entries.iter().map(|t| t.copies as usize).sum();
    if total > MAX_TASKS {
        bail!("the file describes {total} tasks; at most {MAX_TASKS}");
    }
    let mut out = Vec::with_capacity(total);
    for t in entries {
        if t.copies == 0 {
            bail!("task {}: copies must be at least 1", t.name);
        }
        if t.copies == 1 {
            out.push(t.clone());
            continue;
        }
        for i in 0..t.copies as usize {
            let offset = t.offset_step.checked_mul(i).and_then(|d| d.checked_add(t.offset));
            let offset = offset.with_context(|| format!("task {}: offset_step × copies overflows", t.name))?;
            out.push(TaskEntry { name: format!("{}-{i}", t.name), copies: 1, offset, ..t.clone() });
        }
    }
    let mut names = std::collections::BTreeSet::new();
    if let Some(twice) = out.iter().find(|t| !names.insert(t.name.as_str())) {
        bail!("two tasks are named {:?} (a copy is named NAME-i)", twice.name);
    }
    Ok(out)
}

fn task(t: &TaskEntry, all: &[f64], opts: &SimulateOpts) -> anyhow::Result<SimTask> {
    if !tidal_common::task::valid_name(&t.name) {
        bail!("task name {:?} must be 1–64 characters of [A-Za-z0-9-_.]", t.name);
    }
    tidal_common::task::validate_slo(t.slo_ms).map_err(anyhow::Error::msg)?;
    if !(t.scale.is_finite() && t.scale > 0.0) {
        bail!("task {}: scale must be a positive factor", t.name);
    }
    let share = TaskShare {
        weight: t.weight,
        min_cores: t.min_cores,
        max_cores: t.max_cores,
        min_workers: t.min_workers,
        idle_s: t.idle_s,
    };
    tidal_common::task::validate_share(&share).map_err(|e| anyhow::anyhow!("task {}: {e}", t.name))?;
    let stages = match (&t.profiles, &t.tfserving_csv) {
        (Some(p), None) => saved_stages(p, opts.load_time_s)?,
        (None, Some(p)) => one_stage(tfserving_variants(p, t.slo_ms, opts.load_time_s)?),
        _ => bail!("task {}: give profiles = FILE or tfserving_csv = FILE (one of them)", t.name),
    };
    let start = opts.start + t.offset;
    if all.len() < start.saturating_add(opts.duration) {
        bail!(
            "task {}: the trace has {} seconds; its slice is seconds {start} to {}",
            t.name,
            all.len(),
            start.saturating_add(opts.duration)
        );
    }
    let rates = compress(&all[start..all.len().min(start.saturating_add(opts.duration))], opts.speedup, t.scale);
    let warmup = if opts.cold_start {
        Vec::new()
    } else {
        let from = start.saturating_sub(opts.adapt.forecast_window_s * opts.speedup);
        compress(&all[from..start], opts.speedup, t.scale)
    };
    Ok(SimTask { name: t.name.clone(), stages, slo_ms: t.slo_ms as f64, rates, warmup, share: Some(share) })
}

fn print_tasks(reports: &[SimReport]) {
    println!(
        "{:<20} {:<12} {:>10} {:>9} {:>9} {:>9} {:>10} {:>12}",
        "policy", "task", "requests", "p99 ms", "SLO viol", "accuracy", "mean cores", "Jain (SLO)"
    );
    for r in reports {
        for (i, t) in r.tasks.iter().enumerate() {
            let p99 = if t.p99_ms.is_finite() { format!("{:.0}", t.p99_ms) } else { "dropped".into() };
            let jain = if i == 0 { format!("{:.4}", r.jain_attainment) } else { String::new() };
            println!(
                "{:<20} {:<12} {:>10} {:>9} {:>8.2}% {:>8.2}% {:>10.2} {:>12}",
                r.policy, t.task, t.requests, p99, t.violation_pct, t.accuracy, t.mean_cores, jain
            );
        }
    }
}

fn write_csv(path: &Path, reports: &[SimReport]) -> anyhow::Result<()> {
    let mut w = csv::Writer::from_path(path).with_context(|| format!("creating {}", path.display()))?;
    w.write_record([
        "policy",
        "task",
        "requests",
        "violations",
        "violation_pct",
        "p99_ms",
        "accuracy",
        "mean_cores",
        "jain_attainment",
        "peak_planned_memory_bytes",
        "peak_memory_bytes",
        "seconds_over_memory",
        "unloads",
        "cold_starts",
    ])?;
    for r in reports {
        let rows = r
            .tasks
            .iter()
            .map(|t| (t.task.clone(), t.requests, t.violations, t.violation_pct, t.p99_ms, t.accuracy, t.mean_cores));
        let all = std::iter::once((
            "(all)".to_string(),
            r.requests,
            r.violations,
            r.violation_pct,
            r.p99_ms,
            r.accuracy,
            r.mean_cores,
        ));
        for (task, requests, violations, pct, p99, accuracy, cores) in rows.chain(all) {
            w.write_record([
                r.policy.clone(),
                task,
                requests.to_string(),
                violations.to_string(),
                format!("{pct:.4}"),
                format!("{p99:.2}"),
                format!("{accuracy:.4}"),
                format!("{cores:.4}"),
                format!("{:.4}", r.jain_attainment),
                r.peak_planned_memory_bytes.to_string(),
                r.peak_memory_bytes.to_string(),
                r.seconds_over_memory.to_string(),
                r.unloads.to_string(),
                r.cold_starts.to_string(),
            ])?;
        }
    }
    w.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(text: &str) -> anyhow::Result<Vec<TaskEntry>> {
        let file: TasksFile = toml::from_str(text)?;
        copies(&file.tasks)
    }

    #[test]
    fn an_entry_with_copies_stands_for_that_many_tasks_each_its_own_slice() {
        let tasks = entries(
            r#"
            memory = "64G"
            [[tasks]]
            name = "one"
            trace = "t"
            slo_ms = 100
            tfserving_csv = "c"
            [[tasks]]
            name = "rare"
            copies = 3
            offset = 10
            offset_step = 100
            trace = "t"
            slo_ms = 100
            min_workers = 0
            tfserving_csv = "c"
            "#,
        )
        .unwrap();
        let named: Vec<(&str, usize)> = tasks.iter().map(|t| (t.name.as_str(), t.offset)).collect();
        assert_eq!(named, [("one", 0), ("rare-0", 10), ("rare-1", 110), ("rare-2", 210)]);
        assert!(tasks[1..].iter().all(|t| t.copies == 1 && t.min_workers == Some(0)));
        let none = entries("[[tasks]]\nname = \"x\"\ncopies = 0\ntrace = \"t\"\nslo_ms = 100\n");
        assert!(none.unwrap_err().to_string().contains("at least 1"));
        let many = entries("[[tasks]]\nname = \"x\"\ncopies = 1001\ntrace = \"t\"\nslo_ms = 100\n");
        assert!(many.unwrap_err().to_string().contains("at most 1000"));
        let entry = |name: &str, copies: u32| {
            format!("[[tasks]]\nname = \"{name}\"\ncopies = {copies}\ntrace = \"t\"\nslo_ms = 100\n")
        };
        let twice = entries(&(entry("a", 2) + &entry("a-1", 1)));
        assert!(twice.unwrap_err().to_string().contains("two tasks are named \"a-1\""));
    }
}
