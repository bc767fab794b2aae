//! `tidalctl simulate`: replays a rate trace against policies in the discrete-event simulator
//! (the real forecaster and solver decide every interval) and compares them: a table, a CSV
//! and an SVG plot of load, cores and accuracy over time.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use tidal_common::adapt::AdaptConfig;
use tidal_common::profile::load_tfserving_csv;
use tidal_common::sim::{simulate_pipeline, SimConfig, SimGenerate, SimPlanner, SimReport, SimStage, SimVariant};
use tidal_common::solver::PolicyKind;
use tidal_proto::v1::ProfilePoint;

use crate::profile::SavedGenerate;

#[derive(clap::Args, Clone)]
pub struct SimulateOpts {
    /// Rate trace: one integer per line, the requests in that second.
    #[arg(long, required_unless_present = "tasks")]
    pub trace: Option<PathBuf>,
    /// Several tasks sharing the --cores, each its own trace slice, SLO, share and profiles
    /// (TOML, as results/tasks-48-cores.toml). Policies then are
    /// tidal (planned together), independent (each planned alone on an equal static split of
    /// the cores), fair-share (a static split by weight), or any other policy planned together.
    #[arg(long, conflicts_with_all = ["trace", "tfserving_csv", "profiles", "task"])]
    pub tasks: Option<PathBuf>,
    /// Policies to compare (repeat or comma-separate): tidal, infadapter, ipa, sponge,
    /// vpa-VARIANT (e.g. vpa-18), ms+, fa2-low, fa2-high, static-VARIANT-CORES-BATCH.
    #[arg(long = "policy", value_delimiter = ',', default_value = "tidal,infadapter,vpa-18,vpa-50,vpa-152,ms+")]
    pub policies: Vec<String>,
    /// First trace second (0-based); the seconds before it are the forecaster's history.
    #[arg(long, default_value_t = 0)]
    pub start: usize,
    /// Seconds to replay (default one day).
    #[arg(long, default_value_t = 86_400)]
    pub duration: usize,
    /// Factor applied to the trace's rates.
    #[arg(long, default_value_t = 1.0)]
    pub scale: f64,
    /// Trace seconds per simulated second, as `tidalctl load --speedup` replays it: each run
    /// of this many trace seconds becomes one second at their mean rate. --start and
    /// --duration stay in trace seconds; --interval, --forecast-window-s and load times are simulated
    /// (wall-clock) seconds.
    #[arg(long, default_value_t = 1)]
    pub speedup: usize,
    /// Start as a fresh cluster does: no arrival history before --start (by default the
    /// forecaster sees the --forecast-window-s before it).
    #[arg(long)]
    pub cold_start: bool,
    /// Core budget of the task.
    #[arg(long, default_value_t = 48)]
    pub cores: u32,
    /// Seconds between adaptation rounds.
    #[arg(long, default_value_t = AdaptConfig::default().interval_s as usize)]
    pub interval: usize,
    /// Latency SLO (p99), ms.
    #[arg(long, default_value_t = 750)]
    pub slo_ms: u32,
    /// Profiles from InfAdapter's published TF-Serving runs (infadapter-capacity-tfserving.csv),
    /// the rows measured at --slo-ms.
    #[arg(long, conflicts_with_all = ["task", "profiles"])]
    pub tfserving_csv: Option<PathBuf>,
    /// Profiles saved by `tidalctl profile --save`.
    #[arg(long, conflicts_with = "task")]
    pub profiles: Option<PathBuf>,
    /// Profiles measured by `tidalctl profile` for this task, read from the controller.
    #[arg(long)]
    pub task: Option<String>,
    /// Seconds a new worker takes to load its model (default: InfAdapter's 6.4–8.5 s by
    /// ResNet depth, 5 s for other models).
    #[arg(long)]
    pub load_time_s: Option<f64>,
    /// The round's settings, as the controller takes them (its flags and environment).
    #[command(flatten)]
    pub adapt: tidal_daemon::adapt_args::AdaptArgs,
    /// Dynamic SLOs: Sponge's remaining-SLO fractions per second (sponge-dynamic-slo-fractions.csv).
    #[arg(long)]
    pub dynamic_slo: Option<PathBuf>,
    /// The payload size row of --dynamic-slo to use, KB.
    #[arg(long, default_value_t = 200)]
    pub payload_kb: u32,
    /// Seed of the simulated arrivals (Poisson within each trace second).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// How much slower than their profiles the simulated workers run (1.2: a node that slowed
    /// by a fifth after profiling). The planner is not told; it learns it from the batches
    /// served, unless --no-profile-correction.
    #[arg(long, default_value_t = 1.0)]
    pub slowdown: f64,
    /// The memory the simulated node's workers may take (24G, 512M; 0: none declared, the
    /// node planned by its cores only, the default). A worker takes its profile's resident
    /// peak with the planner's headroom; profiles without one take none. With --tasks, it
    /// overrides the file's `memory`.
    #[arg(long, value_parser = tidal_common::memory::parse_size)]
    pub memory: Option<u64>,
    /// Let make before break hold a leaving worker and its successor both while it loads, past
    /// --memory, as agents started with --overlap-transitions do. By default transitions keep
    /// within --memory too: a worker starts only when the memory holds it beside what runs,
    /// and a switch that cannot be made before it breaks breaks first (its task goes without a
    /// worker while the successor loads).
    #[arg(long)]
    pub overlap_transitions: bool,
    /// Write one row per policy here.
    #[arg(long)]
    pub csv: Option<PathBuf>,
    /// Write one row per policy and interval here.
    #[arg(long)]
    pub intervals_csv: Option<PathBuf>,
    /// Write an SVG plot of load, cores and accuracy over time here.
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

/// Published top-1 accuracies of the torchvision ResNets.
const RESNET_ACCURACY: [(&str, f64); 5] =
    [("resnet18", 69.76), ("resnet34", 73.31), ("resnet50", 76.13), ("resnet101", 77.37), ("resnet152", 78.31)];
/// InfAdapter's measured model load times, 6.4 s (ResNet18) to 8.5 s (ResNet152).
const RESNET_LOAD_S: [(&str, f64); 5] =
    [("resnet18", 6.4), ("resnet34", 6.9), ("resnet50", 7.4), ("resnet101", 8.0), ("resnet152", 8.5)];

/// One task's replay (`--tasks` is `simulate_tasks::run`'s).
pub async fn run(opts: SimulateOpts, controller: &str) -> anyhow::Result<()> {
    let trace = opts.trace.clone().context("give --trace (or --tasks)")?;
    let policies: Vec<PolicyKind> = opts
        .policies
        .iter()
        .map(|p| p.parse::<PolicyKind>().map_err(anyhow::Error::msg))
        .collect::<anyhow::Result<_>>()?;
    if policies.is_empty() {
        bail!("no policy given");
    }
    validate(&opts)?;
    let stages = match (&opts.tfserving_csv, &opts.profiles, &opts.task) {
        (Some(path), _, _) => one_stage(tfserving_variants(path, opts.slo_ms, opts.load_time_s)?),
        (None, Some(path), _) => saved_stages(path, opts.load_time_s)?,
        (None, None, Some(task)) => controller_stages(controller, task, opts.load_time_s).await?,
        (None, None, None) => bail!(
            "give profiles: --tfserving-csv FILE, --profiles FILE (`tidalctl profile --save`) or --task NAME (profiled with `tidalctl profile`)"
        ),
    };
    let all = crate::load::read_trace(&trace, 0, Some(opts.start + opts.duration))?;
    if all.len() <= opts.start {
        bail!("the trace has {} seconds; --start {} is past its end", all.len(), opts.start);
    }
    let rates = compress(&all[opts.start..], opts.speedup, opts.scale);
    // A fresh controller sees no history before a task's first report.
    let warmup = if opts.cold_start {
        Vec::new()
    } else {
        let from = opts.start.saturating_sub(opts.adapt.forecast_window_s * opts.speedup);
        compress(&all[from..opts.start], opts.speedup, opts.scale)
    };
    let cfg = sim_config(&opts)?;
    println!(
        "{} s of {} from second {} ×{}{}, {} cores, SLO {} ms, every {} s; {}",
        rates.len(),
        trace.display(),
        opts.start,
        opts.scale,
        if opts.speedup > 1 { format!(", {}× faster", opts.speedup) } else { String::new() },
        opts.cores,
        opts.slo_ms,
        opts.interval,
        describe(&stages)
    );
    let reports = run_all(&policies, &rates, &warmup, &stages, &cfg)?;
    print_table(&reports);
    if let Some(path) = &opts.csv {
        write_summary_csv(path, &reports)?;
        println!("wrote {}", path.display());
    }
    if let Some(path) = &opts.intervals_csv {
        write_intervals_csv(path, &reports, opts.interval)?;
        println!("wrote {}", path.display());
    }
    if let Some(path) = &opts.plot {
        crate::plot::timeline(path, &reports, opts.interval, opts.scale)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// Trace seconds to simulated seconds: each `speedup` of them averaged into one, × `scale`.
pub(crate) fn compress(trace: &[f64], speedup: usize, scale: f64) -> Vec<f64> {
    trace.chunks(speedup.max(1)).map(|c| scale * c.iter().sum::<f64>() / c.len() as f64).collect()
}

/// "5 variants: a, b, …" for one stage; "2 stages: detect (a, b) → classify (c)" for a pipeline.
fn describe(stages: &[SimStage]) -> String {
    let names = |s: &SimStage| s.variants.iter().map(|v| v.name.as_str()).collect::<Vec<_>>().join(", ");
    match stages {
        [one] => format!("{} variants: {}", one.variants.len(), names(one)),
        _ => {
            let each: Vec<String> = stages.iter().map(|s| format!("{} ({})", s.name, names(s))).collect();
            format!("{} stages: {}", stages.len(), each.join(" → "))
        }
    }
}

pub(crate) fn one_stage(variants: Vec<SimVariant>) -> Vec<SimStage> {
    vec![SimStage::new(SimPlanner::TASK, variants)]
}

/// The saved profiles as stages, in the order their variants were saved; variants saved
/// without a stage (a one-stage task) make one stage.
pub(crate) fn saved_stages(path: &Path, load_time: Option<f64>) -> anyhow::Result<Vec<SimStage>> {
    let saved = crate::profile::read(path)?;
    if saved.variants.is_empty() {
        bail!("{} holds no variant", path.display());
    }
    let mut stages: Vec<SimStage> = Vec::new();
    for v in saved.variants {
        let points = v.points.iter().map(ProfilePoint::from).collect();
        let variant = sim_variant(v.name, v.accuracy, points, load_time, v.generate);
        let name = if v.stage.is_empty() { SimPlanner::TASK.to_string() } else { v.stage };
        match stages.iter_mut().find(|s| s.name == name) {
            Some(s) => s.variants.push(variant),
            None => stages.push(SimStage { crops: v.crops.max(1), ..SimStage::new(&name, vec![variant]) }),
        }
    }
    Ok(stages)
}

pub(crate) fn validate(opts: &SimulateOpts) -> anyhow::Result<()> {
    if opts.cores == 0 || opts.interval == 0 || opts.duration == 0 || opts.slo_ms == 0 || opts.speedup == 0 {
        bail!("--cores, --interval, --duration, --slo-ms and --speedup must be positive");
    }
    if !(opts.scale.is_finite() && opts.scale > 0.0) {
        bail!("--scale must be a positive factor");
    }
    if !(opts.slowdown.is_finite() && (0.1..=10.0).contains(&opts.slowdown)) {
        bail!("--slowdown must be a factor between 0.1 and 10");
    }
    Ok(())
}

pub(crate) fn sim_config(opts: &SimulateOpts) -> anyhow::Result<SimConfig> {
    let slo_fractions = match &opts.dynamic_slo {
        Some(path) => Some(read_slo_fractions(path, opts.payload_kb)?),
        None => None,
    };
    Ok(SimConfig {
        adapt: opts
            .adapt
            .config(
                PolicyKind::Tidal,
                opts.interval as f64,
                opts.load_time_s.unwrap_or(AdaptConfig::default().load_time_s),
            )
            .map_err(anyhow::Error::msg)?,
        slo_ms: opts.slo_ms as f64,
        core_budget: opts.cores,
        seed: opts.seed,
        slo_fractions,
        slowdown: opts.slowdown,
        memory_bytes: opts.memory.unwrap_or(0),
        overlap_transitions: opts.overlap_transitions,
    })
}

/// Runs the policies on all cores, one thread each, printing each as it finishes.
fn run_all(
    policies: &[PolicyKind],
    rates: &[f64],
    warmup: &[f64],
    stages: &[SimStage],
    cfg: &SimConfig,
) -> anyhow::Result<Vec<SimReport>> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut reports: Vec<Option<SimReport>> = vec![None; policies.len()];
    let started = Instant::now();
    for chunk in (0..policies.len()).collect::<Vec<_>>().chunks(threads) {
        std::thread::scope(|s| {
            let handles: Vec<_> = chunk
                .iter()
                .map(|&i| {
                    let cfg = SimConfig {
                        adapt: AdaptConfig { policy: policies[i].clone(), ..cfg.adapt.clone() },
                        ..cfg.clone()
                    };
                    s.spawn(move || (i, simulate_pipeline(rates, warmup, stages, &cfg)))
                })
                .collect();
            for h in handles {
                if let Ok((i, r)) = h.join() {
                    eprintln!("  {:<20} done after {:.1} s", r.policy, started.elapsed().as_secs_f64());
                    reports[i] = Some(r);
                }
            }
        });
    }
    reports.into_iter().map(|r| r.context("a simulation thread panicked")).collect()
}

pub(crate) fn print_table(reports: &[SimReport]) {
    println!(
        "{:<20} {:>10} {:>9} {:>9} {:>8} {:>9} {:>12} {:>10} {:>8} {:>7} {:>10} {:>9}",
        "policy",
        "requests",
        "p99 ms",
        "SLO viol",
        "dropped",
        "accuracy",
        "core-hours",
        "mean cores",
        "reconf",
        "surges",
        "overloaded",
        "rerouted"
    );
    for r in reports {
        let p99 = if r.p99_ms.is_finite() { format!("{:.0}", r.p99_ms) } else { "dropped".into() };
        println!(
            "{:<20} {:>10} {:>9} {:>8.2}% {:>8} {:>8.2}% {:>12.1} {:>10.2} {:>8} {:>7} {:>10} {:>9}",
            r.policy,
            r.requests,
            p99,
            r.violation_pct,
            r.dropped,
            r.accuracy,
            r.core_seconds / 3600.0,
            r.mean_cores,
            r.reconfigurations,
            r.surge_replans,
            r.overloaded_intervals,
            r.slack_reroutes,
        );
    }
    // Memory and cold starts, when the node declared memory or tasks went without workers.
    for r in reports.iter().filter(|r| r.peak_memory_bytes > 0 || r.cold_starts > 0 || r.unloads > 0) {
        let human = tidal_common::memory::human;
        let over = match r.seconds_over_memory {
            0 => String::new(),
            s => format!(", over the node's for {s} s"),
        };
        println!(
            "{}: memory planned at most {}, held at most {} (mean {}){over}; {} unloads, {} cold starts \
             ({} requests waited for a worker)",
            r.policy,
            human(r.peak_planned_memory_bytes),
            human(r.peak_memory_bytes),
            human(r.mean_memory_bytes as u64),
            r.unloads,
            r.cold_starts,
            r.cold_requests,
        );
    }
    // What the planner learned of the workers' speed (--slowdown, or a profile's error).
    for r in reports.iter().filter(|r| !r.profile_factors.is_empty()) {
        let each: Vec<String> = r.profile_factors.iter().map(|(_, v, f)| format!("{v} ×{f:.2}")).collect();
        println!("{}: profiles corrected at the end: {}", r.policy, each.join(", "));
    }
    // A pipeline: IPA's other definitions of its accuracy, the product over stages and the
    // sum of each stage's accuracy normalised between its variants'.
    if reports.iter().any(|r| (r.accuracy_product - r.accuracy).abs() > 1e-9) {
        let each: Vec<String> = reports.iter().map(|r| format!("{} {:.2} %", r.policy, r.accuracy_product)).collect();
        println!("accuracy as the product over stages: {}", each.join(", "));
        let each: Vec<String> = reports.iter().map(|r| format!("{} {:.3}", r.policy, r.accuracy_normalised)).collect();
        println!("IPA's normalised accuracy (sum over stages, 0–1 each): {}", each.join(", "));
    }
}

fn write_summary_csv(path: &Path, reports: &[SimReport]) -> anyhow::Result<()> {
    let mut w = csv::Writer::from_path(path).with_context(|| format!("creating {}", path.display()))?;
    w.write_record([
        "policy",
        "requests",
        "served",
        "dropped",
        "violations",
        "violation_pct",
        "p50_ms",
        "p99_ms",
        "accuracy",
        "core_seconds",
        "mean_cores",
        "reconfigurations",
        "surge_replans",
        "overloaded_intervals",
        "failed_plans",
        "accuracy_product",
        "accuracy_normalised",
        "slack_reroutes",
    ])?;
    for r in reports {
        w.write_record([
            r.policy.clone(),
            r.requests.to_string(),
            r.served.to_string(),
            r.dropped.to_string(),
            r.violations.to_string(),
            format!("{:.4}", r.violation_pct),
            format!("{:.2}", r.p50_ms),
            format!("{:.2}", r.p99_ms),
            format!("{:.4}", r.accuracy),
            format!("{:.1}", r.core_seconds),
            format!("{:.4}", r.mean_cores),
            r.reconfigurations.to_string(),
            r.surge_replans.to_string(),
            r.overloaded_intervals.to_string(),
            r.failed_plans.to_string(),
            format!("{:.4}", r.accuracy_product),
            format!("{:.4}", r.accuracy_normalised),
            r.slack_reroutes.to_string(),
        ])?;
    }
    w.flush()?;
    Ok(())
}

fn write_intervals_csv(path: &Path, reports: &[SimReport], interval: usize) -> anyhow::Result<()> {
    let mut w = csv::Writer::from_path(path).with_context(|| format!("creating {}", path.display()))?;
    w.write_record([
        "policy",
        "start_s",
        "load_rps",
        "forecast_rps",
        "planned_rps",
        "mean_cores",
        "served",
        "violations",
        "accuracy",
    ])?;
    for r in reports {
        for i in &r.intervals {
            w.write_record([
                r.policy.clone(),
                i.start_s.to_string(),
                format!("{:.2}", i.arrivals as f64 / interval as f64),
                format!("{:.2}", i.forecast_rps),
                format!("{:.2}", i.planned_rps),
                format!("{:.3}", i.mean_cores),
                i.served.to_string(),
                i.violations.to_string(),
                format!("{:.3}", i.accuracy),
            ])?;
        }
    }
    w.flush()?;
    Ok(())
}

pub(crate) fn tfserving_variants(path: &Path, slo_ms: u32, load_time: Option<f64>) -> anyhow::Result<Vec<SimVariant>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let profiles = load_tfserving_csv(file, slo_ms).with_context(|| format!("reading {}", path.display()))?;
    profiles
        .into_iter()
        .map(|(name, points)| {
            let accuracy = RESNET_ACCURACY
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, a)| *a)
                .with_context(|| format!("no published accuracy for {name}"))?;
            Ok(sim_variant(name, accuracy, points, load_time, None))
        })
        .collect()
}

fn sim_variant(
    name: String,
    accuracy: f64,
    points: Vec<ProfilePoint>,
    load_time: Option<f64>,
    generate: Option<SavedGenerate>,
) -> SimVariant {
    let load_time_s = load_time.unwrap_or(RESNET_LOAD_S.iter().find(|(n, _)| *n == name).map_or(5.0, |(_, s)| *s));
    let measured_most = points.iter().map(|p| p.output_tokens).max().unwrap_or(0);
    if measured_most == 0 {
        return SimVariant::new(&name, accuracy, points, load_time_s);
    }
    // A stage that writes text is planned for its task's most tokens, as the controller plans
    // it, and served writing what each batch's time affords (the agent's rule); profiles saved
    // without the task's settings are served writing the most tokens measured.
    let Some(g) = generate else {
        let points = tidal_common::profile::points_at_output(&points, measured_most);
        return SimVariant::new(&name, accuracy, points, load_time_s);
    };
    SimVariant {
        points: tidal_common::profile::points_at_output(&points, g.max_tokens),
        generate: Some(SimGenerate {
            max_tokens: g.max_tokens,
            refuse_unfinished: g.refuse_unfinished,
            by_output: points,
        }),
        ..SimVariant::new(&name, accuracy, Vec::new(), load_time_s)
    }
}

async fn controller_stages(controller: &str, task: &str, load_time: Option<f64>) -> anyhow::Result<Vec<SimStage>> {
    let mut client = crate::controller(controller).await?;
    let status = client.status(tidal_proto::v1::ClusterStatusRequest {}).await?.into_inner();
    let t = status
        .tasks
        .into_iter()
        .find(|t| t.spec.as_ref().is_some_and(|s| s.name == task))
        .with_context(|| format!("the controller has no task {task:?}"))?;
    let spec = t.spec.unwrap_or_default();
    let by_variant: BTreeMap<String, Vec<ProfilePoint>> =
        t.profiles.into_iter().map(|p| (p.variant, p.points)).collect();
    let mut stages = Vec::new();
    for stage in &spec.stages {
        let variants: Vec<SimVariant> = stage
            .variants
            .iter()
            .filter_map(|v| {
                let points = by_variant.get(&v.name)?.clone();
                let served = tidal_common::task::as_served(stage, v);
                let generate = served.text.as_ref().and_then(|t| t.generate.as_ref()).map(SavedGenerate::from);
                Some(sim_variant(v.name.clone(), v.accuracy, points, load_time, generate))
            })
            .collect();
        if variants.is_empty() {
            bail!(
                "stage {} of task {task:?} has no profiled variant: run `tidalctl profile --task {task}` first",
                stage.name
            );
        }
        stages.push(SimStage { crops: tidal_common::task::fan_out(stage), ..SimStage::new(&stage.name, variants) });
    }
    if stages.is_empty() {
        bail!("task {task:?} has no stages");
    }
    Ok(stages)
}

/// Sponge's remaining-SLO fractions: rows of `payload_kb, f1, f2, …`, one value per second.
fn read_slo_fractions(path: &Path, payload_kb: u32) -> anyhow::Result<Vec<f64>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    for line in text.lines() {
        let mut fields = line.split(',').map(str::trim);
        if fields.next().and_then(|f| f.parse::<f64>().ok()) != Some(payload_kb as f64) {
            continue;
        }
        let values: Vec<f64> = fields.filter_map(|f| f.parse().ok()).filter(|v: &f64| v.is_finite()).collect();
        if values.is_empty() {
            bail!("{}: the {payload_kb} KB row has no values", path.display());
        }
        return Ok(values);
    }
    bail!("{}: no row for a {payload_kb} KB payload", path.display())
}
