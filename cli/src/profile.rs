//! `tidalctl profile`: measures each variant of a task on an agent, several times, and stores
//! the profiles in the controller; or stores profiles saved earlier (`--from`), so that a
//! comparison runs every policy on the very same measurements.
//!
//! Repeated runs make profiles stable on a noisy machine: a point's p50 and throughput are the
//! medians of the runs, its p99 the worst run's, so the planner's latency bound includes the
//! spread that was measured. The spread is printed per point.

use std::path::Path;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use tidal_proto::v1::agent_client::AgentClient;
use tidal_proto::v1::{
    ProfilePoint, ProfileRequest, StageSpec, StoreProfileRequest, TaskSpec, VariantProfile, VariantSpec,
};

/// `tidalctl profile --show`: the task's stored profiles as measured and, where the variant's
/// served batches ran off them, as the planner now uses them.
pub async fn show(controller: &str, task: &str, format: crate::output::Format) -> anyhow::Result<()> {
    use tidal_proto::v1::ClusterStatusRequest;
    let status = super::controller(controller).await?.status(ClusterStatusRequest {}).await?.into_inner();
    let Some(t) = status.tasks.into_iter().find(|t| t.spec.as_ref().is_some_and(|s| s.name == task)) else {
        bail!("no task {task:?} is registered (tidalctl task list shows those that are)");
    };
    let shown = Shown { task: task.to_string(), profiles: t.profiles, corrections: t.corrections };
    crate::output::print(format, &shown, render_profiles)
}

/// What `--show` prints (and writes as JSON or YAML).
#[derive(Serialize)]
struct Shown {
    task: String,
    profiles: Vec<VariantProfile>,
    corrections: Vec<tidal_proto::v1::ProfileCorrection>,
}

fn render_profiles(s: &Shown) -> String {
    let mut out = String::new();
    if s.profiles.is_empty() {
        out += &format!("task {}: no profiles stored yet (tidalctl profile --task {} measures them)\n", s.task, s.task);
        return out;
    }
    let mut rows = Vec::new();
    for p in &s.profiles {
        let correction = s.corrections.iter().find(|c| c.variant == p.variant);
        let factor = correction.map_or(1.0, |c| c.factor);
        let corrected = (factor - 1.0).abs() >= 0.005;
        out += &match correction {
            Some(c) if corrected => format!(
                "{}: served batches run at {:.2}× its profile ({} batches): planned at the corrected points\n",
                p.variant, c.factor, c.batches
            ),
            Some(c) => format!("{}: served batches run as profiled ({} batches)\n", p.variant, c.batches),
            None => format!("{}: no served batches compared yet: planned as profiled\n", p.variant),
        };
        for pt in &p.points {
            let served = |ms: f64| if corrected { format!("{:.1}", ms * factor) } else { "-".into() };
            rows.push(vec![
                p.variant.clone(),
                pt.cores.to_string(),
                pt.batch.to_string(),
                pt.size.to_string(),
                format!("{:.1}", pt.latency_p50_ms),
                format!("{:.1}", pt.latency_p99_ms),
                format!("{:.1}", pt.throughput_rps),
                served(pt.latency_p50_ms),
                served(pt.latency_p99_ms),
                if corrected { format!("{:.1}", pt.throughput_rps / factor) } else { "-".into() },
                resident(pt.resident_bytes),
            ]);
        }
    }
    out += &crate::output::table(
        &[
            "VARIANT",
            "CORES#",
            "BATCH#",
            "SIZE#",
            "P50 ms",
            "P99 ms",
            "RPS/s",
            "CORRECTED P50 ms",
            "CORRECTED P99 ms",
            "CORRECTED RPS/s",
            "PEAK MEMORY",
        ],
        rows,
    );
    out
}

/// What `tidalctl profile` measures.
pub struct Measure<'a> {
    pub agent: &'a str,
    pub cores: Vec<u32>,
    pub batches: Vec<u32>,
    pub duration_ms: u32,
    pub repeat: u32,
    /// Sample requests of the task's first stage (`--samples`): its variants are measured at
    /// every input size among them.
    pub samples: Vec<tidal_proto::v1::ProfileSample>,
}

/// Profiles of a task's variants, as saved to and read from a file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedProfiles {
    pub task: String,
    pub variants: Vec<SavedVariant>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedVariant {
    pub name: String,
    /// Its pipeline stage; absent for a one-stage task.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub stage: String,
    /// Objects of each frame its stage takes from the stage before (absent: its output as is).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub crops: u32,
    pub accuracy: f64,
    pub node: String,
    pub points: Vec<SavedPoint>,
    /// Of a stage that writes tokens, how it writes them (absent: not such a stage), so that
    /// the simulator serves it as the agent does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generate: Option<SavedGenerate>,
}

/// A generating stage's settings the simulator needs (the task's `[stages.generate]`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SavedGenerate {
    pub max_tokens: u32,
    #[serde(default)]
    pub refuse_unfinished: bool,
}

impl From<&tidal_proto::v1::Generate> for SavedGenerate {
    fn from(g: &tidal_proto::v1::Generate) -> Self {
        Self { max_tokens: g.max_tokens, refuse_unfinished: g.refuse_unfinished }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SavedPoint {
    pub cores: u32,
    pub batch: u32,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    pub throughput_rps: f64,
    /// The input size it was measured at (absent: the variant's own).
    #[serde(default, skip_serializing_if = "is_zero_size")]
    pub size: u64,
    /// Of a stage that writes tokens, how many each sample wrote (absent: not such a stage).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub output_tokens: u32,
    /// The worker's peak resident memory once it ran this batch, bytes (absent: not measured).
    #[serde(default, skip_serializing_if = "is_zero_size")]
    pub resident_bytes: u64,
}

fn is_zero_size(n: &u64) -> bool {
    *n == 0
}

impl From<&ProfilePoint> for SavedPoint {
    fn from(p: &ProfilePoint) -> Self {
        Self {
            cores: p.cores,
            batch: p.batch,
            latency_p50_ms: p.latency_p50_ms,
            latency_p99_ms: p.latency_p99_ms,
            throughput_rps: p.throughput_rps,
            size: p.size,
            output_tokens: p.output_tokens,
            resident_bytes: p.resident_bytes,
        }
    }
}

impl From<&SavedPoint> for ProfilePoint {
    fn from(p: &SavedPoint) -> Self {
        Self {
            cores: p.cores,
            batch: p.batch,
            latency_p50_ms: p.latency_p50_ms,
            latency_p99_ms: p.latency_p99_ms,
            throughput_rps: p.throughput_rps,
            size: p.size,
            output_tokens: p.output_tokens,
            resident_bytes: p.resident_bytes,
        }
    }
}

/// A point's peak resident memory ("-": not measured).
fn resident(bytes: u64) -> String {
    if bytes == 0 {
        "-".into()
    } else {
        tidal_common::memory::human(bytes)
    }
}

/// How many tokens each sample wrote, for a stage that writes text.
fn writes(tokens: u32) -> String {
    if tokens == 0 {
        String::new()
    } else {
        format!(" writes {tokens:>4} tokens")
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

pub fn read(path: &Path) -> anyhow::Result<SavedProfiles> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading profiles from {}", path.display()))?;
    let saved: SavedProfiles =
        serde_json::from_str(&text).with_context(|| format!("{} is not a profiles file", path.display()))?;
    for v in &saved.variants {
        if v.points.is_empty() {
            bail!("{}: variant {} has no points", path.display(), v.name);
        }
        if let Some(g) = v.generate.filter(|g| !(1..=tidal_common::text::MAX_GENERATED).contains(&g.max_tokens)) {
            bail!(
                "{}: variant {} writes at most {} tokens: give 1..={}",
                path.display(),
                v.name,
                g.max_tokens,
                tidal_common::text::MAX_GENERATED
            );
        }
        if let Some(p) = v.points.iter().find(|p| {
            p.cores == 0
                || p.batch == 0
                || ![p.latency_p50_ms, p.latency_p99_ms, p.throughput_rps].iter().all(|x| x.is_finite() && *x > 0.0)
        }) {
            bail!("{}: variant {} has an invalid point {p:?}", path.display(), v.name);
        }
    }
    Ok(saved)
}

fn write(path: &Path, saved: &SavedProfiles) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(saved)?;
    std::fs::write(path, text).with_context(|| format!("writing profiles to {}", path.display()))
}

/// Measures every variant of `spec` `repeat` times, stores the combined profiles in the
/// controller and, with `save`, writes them to a file.
pub async fn measure(controller: &str, spec: &TaskSpec, m: Measure<'_>, save: Option<&Path>) -> anyhow::Result<()> {
    let mut agent = AgentClient::new(crate::connect::channel(m.agent, "agent's control port").await?);
    let mut ctl = crate::controller(controller).await?;
    let mut saved = SavedProfiles { task: spec.name.clone(), variants: Vec::new() };
    let repeat = m.repeat.clamp(1, 20);
    let all: Vec<(&StageSpec, &VariantSpec)> = tidal_common::task::variants(spec).collect();
    for (i, &(stage, variant)) in all.iter().enumerate() {
        // The samples are requests of the first stage; later stages take what it gives.
        let samples = if std::ptr::eq(stage, &spec.stages[0]) { m.samples.clone() } else { Vec::new() };
        eprintln!(
            "[{}/{}] profiling {} on {}: {} points × {:.1} s{}, {repeat} times",
            i + 1,
            all.len(),
            variant.name,
            m.agent,
            m.cores.len() * m.batches.len(),
            m.duration_ms as f64 / 1000.0,
            if samples.is_empty() {
                String::new()
            } else {
                format!(" at each input size of {} samples", samples.len())
            }
        );
        let mut runs = Vec::new();
        let mut node = String::new();
        for _ in 0..repeat {
            let req = ProfileRequest {
                variant: Some(variant.clone()),
                cores: m.cores.clone(),
                batches: m.batches.clone(),
                duration_ms: m.duration_ms,
                samples: samples.clone(),
                text: tidal_common::task::as_served(stage, variant).text.clone(),
            };
            let resp = agent.profile(req).await.with_context(|| format!("profiling {}", variant.name))?.into_inner();
            node = resp.node;
            runs.push(resp.points);
        }
        let (points, spreads) = combine(&runs);
        for (p, s) in points.iter().zip(&spreads) {
            println!(
                "{:<10} cores {:>2} batch {:>3} size {:>9}{}  p50 {:>8.1} ms  p99 {:>8.1} ms  {:>8.1} req/s  memory {:>8}  (spread over {repeat}: p50 ±{:.0} %, throughput ±{:.0} %)",
                variant.name, p.cores, p.batch, p.size, writes(p.output_tokens), p.latency_p50_ms, p.latency_p99_ms, p.throughput_rps, resident(p.resident_bytes), 50.0 * s.0, 50.0 * s.1
            );
        }
        let served = tidal_common::task::as_served(stage, variant);
        saved.variants.push(SavedVariant {
            generate: served.text.as_ref().and_then(|t| t.generate.as_ref()).map(SavedGenerate::from),
            name: variant.name.clone(),
            stage: if spec.stages.len() > 1 { stage.name.clone() } else { String::new() },
            crops: if tidal_common::task::fan_out(stage) > 1 { stage.crops } else { 0 },
            accuracy: variant.accuracy,
            node: node.clone(),
            points: points.iter().map(SavedPoint::from).collect(),
        });
        let profile = VariantProfile {
            task: spec.name.clone(),
            variant: variant.name.clone(),
            node,
            points,
            ..Default::default()
        };
        ctl.store_profile(StoreProfileRequest { profile: Some(profile) }).await?;
    }
    if let Some(path) = save {
        write(path, &saved)?;
        eprintln!("saved the profiles to {}", path.display());
    }
    Ok(())
}

/// Stores profiles saved earlier for `spec`'s variants.
pub async fn store_saved(controller: &str, spec: &TaskSpec, path: &Path) -> anyhow::Result<()> {
    let saved = read(path)?;
    let mut ctl = crate::controller(controller).await?;
    let mut stored = 0;
    for (_, variant) in tidal_common::task::variants(spec) {
        let Some(v) = saved.variants.iter().find(|v| v.name == variant.name) else {
            eprintln!("{}: no saved profile for {}; left unprofiled", path.display(), variant.name);
            continue;
        };
        let profile = VariantProfile {
            task: spec.name.clone(),
            variant: v.name.clone(),
            node: v.node.clone(),
            points: v.points.iter().map(ProfilePoint::from).collect(),
            ..Default::default()
        };
        ctl.store_profile(StoreProfileRequest { profile: Some(profile) }).await?;
        stored += 1;
    }
    if stored == 0 {
        bail!("{} holds no profile of task {}'s variants", path.display(), spec.name);
    }
    println!("stored {stored} saved profiles for task {}", spec.name);
    Ok(())
}

/// Per (cores, batch, size, tokens written) point: the median p50 and throughput of the runs and the worst p99; and
/// the relative spread (max − min over the median) of p50 and of throughput.
fn combine(runs: &[Vec<ProfilePoint>]) -> (Vec<ProfilePoint>, Vec<(f64, f64)>) {
    let Some(first) = runs.first() else { return (vec![], vec![]) };
    let mut points = Vec::new();
    let mut spreads = Vec::new();
    for p in first {
        let same: Vec<&ProfilePoint> = runs
            .iter()
            .filter_map(|r| {
                r.iter().find(|q| {
                    (q.cores, q.batch, q.size, q.output_tokens) == (p.cores, p.batch, p.size, p.output_tokens)
                })
            })
            .collect();
        let p50: Vec<f64> = same.iter().map(|q| q.latency_p50_ms).collect();
        let tput: Vec<f64> = same.iter().map(|q| q.throughput_rps).collect();
        let (m50, mt) = (median(&p50), median(&tput));
        points.push(ProfilePoint {
            cores: p.cores,
            batch: p.batch,
            latency_p50_ms: m50,
            latency_p99_ms: same.iter().map(|q| q.latency_p99_ms).fold(0.0, f64::max),
            throughput_rps: mt,
            size: p.size,
            output_tokens: p.output_tokens,
            // The worst run's: memory is planned at its peak.
            resident_bytes: same.iter().map(|q| q.resident_bytes).max().unwrap_or(0),
        });
        spreads.push((range(&p50) / m50.max(1e-9), range(&tput) / mt.max(1e-9)));
    }
    (points, spreads)
}

fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => 0.5 * (v[n / 2 - 1] + v[n / 2]),
    }
}

fn range(xs: &[f64]) -> f64 {
    let max = xs.iter().copied().fold(f64::MIN, f64::max);
    let min = xs.iter().copied().fold(f64::MAX, f64::min);
    if xs.is_empty() {
        0.0
    } else {
        max - min
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(p50: f64, p99: f64, tput: f64) -> ProfilePoint {
        ProfilePoint {
            cores: 1,
            batch: 4,
            latency_p50_ms: p50,
            latency_p99_ms: p99,
            throughput_rps: tput,
            size: 0,
            output_tokens: 0,
            resident_bytes: 0,
        }
    }

    #[test]
    fn repeated_runs_combine_to_medians_and_the_worst_tail() {
        let runs = vec![vec![point(10.0, 14.0, 400.0)], vec![point(12.0, 30.0, 330.0)], vec![point(11.0, 15.0, 360.0)]];
        let (points, spreads) = combine(&runs);
        assert_eq!(points, vec![point(11.0, 30.0, 360.0)]);
        assert!((spreads[0].0 - 2.0 / 11.0).abs() < 1e-9);
        assert!((spreads[0].1 - 70.0 / 360.0).abs() < 1e-9);
    }

    #[test]
    fn saved_profiles_read_back_and_bad_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.json");
        let saved = SavedProfiles {
            task: "t".into(),
            variants: vec![SavedVariant {
                name: "a".into(),
                stage: "detect".into(),
                crops: 0,
                accuracy: 70.0,
                node: "n".into(),
                points: vec![SavedPoint::from(&point(10.0, 14.0, 400.0))],
                generate: Some(SavedGenerate { max_tokens: 32, refuse_unfinished: false }),
            }],
        };
        write(&path, &saved).unwrap();
        assert_eq!(read(&path).unwrap(), saved);
        std::fs::write(&path, r#"{"task":"t","variants":[{"name":"a","accuracy":70,"node":"n","points":[{"cores":0,"batch":1,"latency_p50_ms":1,"latency_p99_ms":1,"throughput_rps":1}]}]}"#).unwrap();
        assert!(read(&path).unwrap_err().to_string().contains("invalid point"));
        std::fs::write(&path, "not json").unwrap();
        assert!(read(&path).is_err());
    }
}
