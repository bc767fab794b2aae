//! Tasks as pipelines. A task is one or more stages run in order, each served by one of its
//! variants; a single-model task is a one-stage pipeline. Every crate reads a task through
//! [`normalise`] (which turns the one-stage wire form into a stage) and checks it with
//! [`validate_task`].

use std::collections::HashSet;

use tidal_proto::v1::{Connector, ProfilePoint, SetShareRequest, StageSpec, TaskShare, TaskSpec, VariantSpec};

use crate::variant::validate_variant;

/// Most stages a pipeline may have.
pub const MAX_STAGES: usize = 16;
/// Most variants one stage may offer.
pub const MAX_VARIANTS_PER_STAGE: usize = 32;
/// Most objects of a frame a cropping stage takes.
pub const MAX_CROPS: u32 = 16;
/// Longest SLO a task may have (ten minutes).
pub const MAX_SLO_MS: u32 = 600_000;

/// An SLO in 1..=[`MAX_SLO_MS`] milliseconds.
pub fn validate_slo(slo_ms: u32) -> Result<(), String> {
    if (1..=MAX_SLO_MS).contains(&slo_ms) {
        Ok(())
    } else {
        Err(format!("the SLO must be 1–{MAX_SLO_MS} ms, not {slo_ms}"))
    }
}

/// Largest weight a task may have.
pub const MAX_WEIGHT: f64 = 1000.0;
/// Most cores a task's minimum or maximum may name.
pub const MAX_SHARE_CORES: u32 = 1_000_000;

/// The longest idle time a task may declare before it is unloaded, seconds (a week).
pub const MAX_IDLE_S: u32 = 7 * 24 * 3600;
/// The idle time of a task that may be unloaded and declares none, seconds.
pub const DEFAULT_IDLE_S: u32 = 300;

/// Whether the task may go without a worker, and after how many seconds without a request
/// (see `TaskShare.min_workers`).
pub fn unloads_after_s(spec: &TaskSpec) -> Option<f64> {
    let share = spec.share.as_ref()?;
    (share.min_workers == Some(0)).then_some(if share.idle_s == 0 { DEFAULT_IDLE_S } else { share.idle_s } as f64)
}

/// A task's share of the cluster: a weight in 0..=[`MAX_WEIGHT`], a minimum and a maximum of
/// at most [`MAX_SHARE_CORES`] cores, the minimum no more than a set maximum, a minimum of 0
/// or 1 workers and an idle time of at most [`MAX_IDLE_S`].
pub fn validate_share(share: &TaskShare) -> Result<(), String> {
    if let Some(w) = share.weight {
        if !(0.0..=MAX_WEIGHT).contains(&w) {
            return Err(format!("a task's weight must be 0–{MAX_WEIGHT}, not {w}"));
        }
    }
    for (what, cores) in [("minimum", share.min_cores), ("maximum", share.max_cores)] {
        if cores > MAX_SHARE_CORES {
            return Err(format!("a task's {what} of {cores} cores is over {MAX_SHARE_CORES}"));
        }
    }
    if let Some(n) = share.min_workers.filter(|&n| n > 1) {
        return Err(format!(
            "a task's minimum of workers is 0 (unloaded when idle) or 1 (the default), not {n}: \
             keep more ready with its minimum of cores"
        ));
    }
    if share.idle_s > MAX_IDLE_S {
        return Err(format!("a task's idle time of {} s is over {MAX_IDLE_S} s (a week)", share.idle_s));
    }
    if share.max_cores > 0 && share.min_cores > share.max_cores {
        return Err(format!(
            "a task's minimum of {} cores is above its maximum of {}",
            share.min_cores, share.max_cores
        ));
    }
    Ok(())
}

/// `share` with the parts `change` sets changed, checked.
pub fn changed_share(share: Option<&TaskShare>, change: &SetShareRequest) -> Result<TaskShare, String> {
    let mut share = share.cloned().unwrap_or_default();
    if change.weight.is_some() {
        share.weight = change.weight;
    }
    if let Some(min) = change.min_cores {
        share.min_cores = min;
    }
    if let Some(max) = change.max_cores {
        share.max_cores = max;
    }
    if change.min_workers.is_some() {
        share.min_workers = change.min_workers;
    }
    if let Some(idle_s) = change.idle_s {
        share.idle_s = idle_s;
    }
    validate_share(&share)?;
    Ok(share)
}

/// The task with its stages spelt out: a task written in the one-stage form (`variants`, no
/// `stages`) becomes one stage named after the task. Idempotent.
pub fn normalise(mut task: TaskSpec) -> TaskSpec {
    if task.stages.is_empty() && !task.variants.is_empty() {
        let variants = std::mem::take(&mut task.variants);
        task.stages.push(stage(&task.name, variants));
    }
    task.variants.clear();
    // Entries written before versions are the task's first.
    task.version = task.version.max(1);
    task
}

/// A one-stage task of `variants`, named after it.
pub fn single_stage(name: &str, slo_ms: u32, variants: Vec<VariantSpec>) -> TaskSpec {
    TaskSpec { name: name.into(), slo_ms, stages: vec![stage(name, variants)], ..Default::default() }
}

/// A stage that takes the previous stage's output as is.
pub fn stage(name: &str, variants: Vec<VariantSpec>) -> StageSpec {
    StageSpec { name: name.into(), variants, connector: Connector::Direct as i32, crops: 0, ..Default::default() }
}

/// How many inputs of a stage one input of the previous stage becomes.
pub fn fan_out(stage: &StageSpec) -> u32 {
    if stage.connector == Connector::Crops as i32 {
        stage.crops.clamp(1, MAX_CROPS)
    } else {
        1
    }
}

/// Per stage, how many of its inputs one request of the task makes (the product of the
/// fan-outs up to it).
pub fn load_factors(task: &TaskSpec) -> Vec<f64> {
    let mut factor = 1.0;
    task.stages
        .iter()
        .map(|s| {
            factor *= fan_out(s) as f64;
            factor
        })
        .collect()
}

/// A stage's profile in requests of the task: a stage that sees `factor` inputs per request
/// carries 1/`factor` as many requests, and a request's inputs wait for ⌈factor / batch⌉
/// batches. Planner and simulator see a fan-out stage through this one view.
pub fn per_request(points: &[ProfilePoint], factor: f64) -> Vec<ProfilePoint> {
    if factor <= 1.0 {
        return points.to_vec();
    }
    points
        .iter()
        .map(|p| {
            let batches = (factor / p.batch.max(1) as f64).ceil();
            ProfilePoint {
                throughput_rps: p.throughput_rps / factor,
                latency_p50_ms: p.latency_p50_ms * batches,
                latency_p99_ms: p.latency_p99_ms * batches,
                ..*p
            }
        })
        .collect()
}

/// The stage and variant named `variant` (names are unique within a task).
pub fn find_variant<'a>(task: &'a TaskSpec, variant: &str) -> Option<(&'a StageSpec, &'a VariantSpec)> {
    task.stages.iter().find_map(|s| s.variants.iter().find(|v| v.name == variant).map(|v| (s, v)))
}

/// `stage` as `variant` serves it: with the variant's own model tensors, padding, trims and
/// text (`VariantSpec.io`) in place of the stage's where it has them, and it the only variant.
pub fn as_served<'a>(stage: &'a StageSpec, variant: &VariantSpec) -> std::borrow::Cow<'a, StageSpec> {
    let Some(io) = &variant.io else { return std::borrow::Cow::Borrowed(stage) };
    std::borrow::Cow::Owned(StageSpec {
        name: stage.name.clone(),
        variants: vec![variant.clone()],
        connector: stage.connector,
        crops: stage.crops,
        inputs: io.inputs.clone(),
        outputs: io.outputs.clone(),
        connect: stage.connect.clone(),
        pad: io.pad.clone(),
        trim: io.trim.clone(),
        text: io.text.clone(),
        skip: stage.skip.clone(),
    })
}

/// Every variant of every stage, with its stage.
pub fn variants(task: &TaskSpec) -> impl Iterator<Item = (&StageSpec, &VariantSpec)> {
    task.stages.iter().flat_map(|s| s.variants.iter().map(move |v| (s, v)))
}

/// The input a request to the task carries: the first stage's, one sample.
pub fn input_shape(task: &TaskSpec) -> &[i64] {
    task.stages.first().map_or(&[], stage_input)
}

/// One sample's input shape for a stage (its variants share it).
pub fn stage_input(stage: &StageSpec) -> &[i64] {
    stage.variants.first().map_or(&[], |v| v.input_shape.as_slice())
}

/// A name of tasks, stages, variants and nodes: 1–64 characters of `[A-Za-z0-9-_.]`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        // `.` and `..` name directories in paths and URLs (V2's /v2/models/{name}).
        && name.chars().any(|c| c != '.')
}

/// Checks a stage's connections from the stage before it (`prev`): only after a first stage
/// and with the direct connector, at most [`crate::onnx_signature::MAX_TENSORS`], each input
/// fed once, and (where both stages declare signatures) outputs and inputs that exist.
fn validate_connect(prev: Option<&StageSpec>, stage: &StageSpec) -> Result<(), String> {
    use crate::onnx_signature::{MAX_NAME, MAX_TENSORS};
    if stage.connect.is_empty() {
        return Ok(());
    }
    let Some(prev) = prev else {
        return Err(format!(
            "stage {}: the first stage takes the request's inputs; it connects to nothing",
            stage.name
        ));
    };
    if stage.connector != Connector::Direct as i32 {
        return Err(format!("stage {}: connections are for the direct connector, not crops", stage.name));
    }
    if stage.connect.len() > MAX_TENSORS {
        return Err(format!("stage {}: at most {MAX_TENSORS} connections", stage.name));
    }
    let mut fed = HashSet::new();
    for c in &stage.connect {
        for name in [&c.output, &c.input] {
            if name.is_empty() || name.len() > MAX_NAME || name.chars().any(char::is_control) {
                return Err(format!(
                    "stage {}: connection name {name:?} must be 1–{MAX_NAME} printable characters",
                    stage.name
                ));
            }
        }
        if !fed.insert(c.input.as_str()) {
            return Err(format!("stage {}: input {:?} is connected twice", stage.name, c.input));
        }
        // By the names requests and answers carry (a stage's text in place of its tokens).
        let gives = |s: &StageSpec| crate::text::wire_io(s).map(|io| io.outputs).unwrap_or_default();
        let takes = |s: &StageSpec| crate::text::wire_io(s).map(|io| io.inputs).unwrap_or_default();
        if !prev.outputs.is_empty() && !gives(prev).iter().any(|o| o.name == c.output) {
            return Err(format!("stage {}: stage {} has no output {:?}", stage.name, prev.name, c.output));
        }
        if !stage.inputs.is_empty() && !takes(stage).iter().any(|i| i.name == c.input) {
            return Err(format!("stage {}: it has no input {:?}", stage.name, c.input));
        }
    }
    Ok(())
}

/// Most labels that skip a stage.
pub const MAX_SKIP_LABELS: usize = 64;
/// Longest label that skips a stage, bytes.
pub const MAX_SKIP_LABEL: usize = 128;

/// Checks a stage that requests may skip (`skip`): after a first stage, with the direct
/// connector, 1..=[`MAX_SKIP_LABELS`] labels of 1..=[`MAX_SKIP_LABEL`] bytes; and, where the
/// stages declare signatures, a BYTES label output of the stage before (`prev`), each pass
/// from an input of this stage to its output of the same type, and every output of this stage
/// the stage after it (`next`) is connected to among them, so that a skipped request still
/// feeds it.
fn validate_skip(prev: Option<&StageSpec>, stage: &StageSpec, next: Option<&StageSpec>) -> Result<(), String> {
    use crate::onnx_signature::{ElementType, MAX_NAME, MAX_TENSORS};
    let Some(skip) = &stage.skip else { return Ok(()) };
    let bad = |why: String| Err(format!("stage {}: skip: {why}", stage.name));
    let Some(prev) = prev else {
        return bad("the first stage has no stage before it to label the request".into());
    };
    if stage.connector != Connector::Direct as i32 {
        return bad("a stage that crops is not skipped".into());
    }
    if skip.labels.is_empty() || skip.labels.len() > MAX_SKIP_LABELS {
        return bad(format!("1–{MAX_SKIP_LABELS} labels"));
    }
    if let Some(l) = skip.labels.iter().find(|l| l.is_empty() || l.len() > MAX_SKIP_LABEL) {
        return bad(format!("label {l:?} must be 1–{MAX_SKIP_LABEL} bytes"));
    }
    if skip.pass.len() > MAX_TENSORS {
        return bad(format!("at most {MAX_TENSORS} passes"));
    }
    let names = std::iter::once(&skip.when).chain(skip.pass.iter().flat_map(|c| [&c.input, &c.output]));
    if let Some(name) =
        names.into_iter().find(|n| n.is_empty() || n.len() > MAX_NAME || n.chars().any(char::is_control))
    {
        return bad(format!("name {name:?} must be 1–{MAX_NAME} printable characters"));
    }
    let mut given = HashSet::new();
    if let Some(c) = skip.pass.iter().find(|c| !given.insert(c.output.as_str())) {
        return bad(format!("output {:?} is passed twice", c.output));
    }
    // By the names requests and answers carry (a stage's text in place of its tokens).
    let io = |s: &StageSpec| crate::text::wire_io(s).ok().filter(|_| !s.inputs.is_empty() && !s.outputs.is_empty());
    if let Some(prev_io) = io(prev) {
        match prev_io.outputs.iter().find(|o| o.name == skip.when) {
            None => return bad(format!("stage {} has no output {:?}", prev.name, skip.when)),
            Some(o) if o.element != ElementType::Bytes => {
                return bad(format!("stage {}'s output {:?} is not a label (BYTES)", prev.name, skip.when));
            }
            Some(_) => {}
        }
    }
    if let Some(own) = io(stage) {
        for c in &skip.pass {
            let Some(input) = own.inputs.iter().find(|d| d.name == c.input) else {
                return bad(format!("it has no input {:?}", c.input));
            };
            let Some(output) = own.outputs.iter().find(|d| d.name == c.output) else {
                return bad(format!("it has no output {:?}", c.output));
            };
            if input.element != output.element {
                return bad(format!(
                    "input {:?} ({:?}) cannot stand for output {:?} ({:?})",
                    c.input, input.element, c.output, output.element
                ));
            }
        }
    }
    if let Some(next) = next {
        if let Some(c) = next.connect.iter().find(|c| !given.contains(c.output.as_str())) {
            return bad(format!(
                "stage {} takes output {:?} of it, which a skipped request would not have: pass it",
                next.name, c.output
            ));
        }
    }
    Ok(())
}

/// Checks a (normalised) task wherever one arrives: its name and SLO, 1..=[`MAX_STAGES`]
/// stages of unique valid names, each with 1..=[`MAX_VARIANTS_PER_STAGE`] valid variants that
/// take the same input and a valid signature (or none), and variant names unique across the
/// task.
/// The name a canary of `version` of `task` is planned under: `task@version` (`@` is in no
/// registered name).
pub fn canary_name(task: &str, version: u32) -> String {
    format!("{task}@{version}")
}

/// The task and version a canary's name stands for ([`canary_name`]); `None` for any other
/// name.
pub fn parse_canary(name: &str) -> Option<(&str, u32)> {
    let (task, version) = name.split_once('@')?;
    let version: u32 = version.parse().ok().filter(|&v| v > 0)?;
    (valid_name(task) && canary_name(task, version) == name).then_some((task, version))
}

pub fn validate_task(t: &TaskSpec) -> Result<(), String> {
    if !valid_name(&t.name) && parse_canary(&t.name).is_none() {
        return Err(format!("task name {:?} must be 1–64 characters of [A-Za-z0-9-_.]", t.name));
    }
    validate_slo(t.slo_ms)?;
    if let Some(share) = &t.share {
        validate_share(share)?;
    }
    if !t.variants.is_empty() {
        return Err("a task gives its variants in `variants` (one stage) or in `stages`, not both".into());
    }
    if t.stages.is_empty() || t.stages.len() > MAX_STAGES {
        return Err(format!("a task needs 1–{MAX_STAGES} stages, each with at least one variant"));
    }
    let (mut stage_names, mut variant_names) = (HashSet::new(), HashSet::new());
    for (i, stage) in t.stages.iter().enumerate() {
        match Connector::try_from(stage.connector) {
            Ok(Connector::Direct) => {}
            Ok(Connector::Crops) => {
                if i == 0 {
                    return Err(format!("stage {}: the first stage has no detections to crop", stage.name));
                }
                if !(1..=MAX_CROPS).contains(&stage.crops) {
                    return Err(format!("stage {}: crops must be 1–{MAX_CROPS}", stage.name));
                }
                let (image, crop) = (input_shape(t), stage_input(stage));
                if image.len() != 3 || crop.len() != 3 || image[0] != crop[0] {
                    return Err(format!(
                        "stage {}: crops are cut from the request's image {image:?} into this stage's input {crop:?}: both [channels, height, width] with the same channels",
                        stage.name
                    ));
                }
            }
            Err(_) => return Err(format!("stage {}: unknown connector {}", stage.name, stage.connector)),
        }
        if !valid_name(&stage.name) {
            return Err(format!("stage name {:?} must be 1–64 characters of [A-Za-z0-9-_.]", stage.name));
        }
        if !stage_names.insert(stage.name.as_str()) {
            return Err(format!("stage names must be unique ({:?} twice)", stage.name));
        }
        if stage.variants.is_empty() || stage.variants.len() > MAX_VARIANTS_PER_STAGE {
            return Err(format!("stage {} needs 1–{MAX_VARIANTS_PER_STAGE} variants", stage.name));
        }
        crate::onnx_signature::validate_signature(&stage.inputs, &stage.outputs)
            .map_err(|e| format!("stage {}: {e}", stage.name))?;
        validate_connect(i.checked_sub(1).map(|p| &t.stages[p]), stage)?;
        validate_skip(i.checked_sub(1).map(|p| &t.stages[p]), stage, t.stages.get(i + 1))?;
        crate::padding::of_stage(stage)?;
        // Variants with tensors of their own: each checked as its stage is, and the stage's
        // own settings left to serve at least one of them.
        let own: Vec<&VariantSpec> = stage.variants.iter().filter(|v| v.io.is_some()).collect();
        if !own.is_empty() && own.len() == stage.variants.len() {
            return Err(format!(
                "stage {}: every variant has its own tensors; the stage's own settings must serve at least one",
                stage.name
            ));
        }
        for v in &own {
            let served = as_served(stage, v);
            crate::onnx_signature::validate_signature(&served.inputs, &served.outputs)
                .map_err(|e| format!("stage {}, variant {}: {e}", stage.name, v.name))?;
            crate::padding::of_stage(&served).map_err(|e| format!("variant {}: {e}", v.name))?;
        }
        if stage.text.is_some() || !own.is_empty() {
            crate::text::wire_io(stage).map_err(|e| format!("stage {}: {e}", stage.name))?;
        }
        for v in &stage.variants {
            validate_variant(v)?;
            if !variant_names.insert(v.name.as_str()) {
                return Err(format!("variant names must be unique within a task ({:?} twice)", v.name));
            }
            let first = &stage.variants[0];
            if v.input_shape != first.input_shape {
                return Err(format!(
                    "stage {}: variant {} takes {:?} but {} takes {:?}: the variants of a stage must take the same input",
                    stage.name, v.name, v.input_shape, first.name, first.input_shape
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_may_go_without_a_worker_only_when_it_says_so_within_bounded_idle_times() {
        let spec = |share: Option<TaskShare>| TaskSpec { share, ..Default::default() };
        assert_eq!(unloads_after_s(&spec(None)), None, "keeps one worker by default");
        let set = |min_workers, idle_s| TaskShare { min_workers, idle_s, ..Default::default() };
        assert_eq!(unloads_after_s(&spec(Some(set(Some(1), 60)))), None);
        assert_eq!(unloads_after_s(&spec(Some(set(Some(0), 0)))), Some(DEFAULT_IDLE_S as f64));
        assert_eq!(unloads_after_s(&spec(Some(set(Some(0), 60)))), Some(60.0));
        assert!(validate_share(&set(Some(2), 0)).unwrap_err().contains("0 (unloaded when idle) or 1"));
        assert!(validate_share(&set(Some(0), MAX_IDLE_S + 1)).is_err());
        // Set in parts: the idle time alone keeps the minimum.
        let change =
            |min_workers, idle_s| SetShareRequest { task: "t".into(), min_workers, idle_s, ..Default::default() };
        let share = changed_share(None, &change(Some(0), None)).unwrap();
        let share = changed_share(Some(&share), &change(None, Some(30))).unwrap();
        assert_eq!(unloads_after_s(&spec(Some(share))), Some(30.0));
    }

    fn variant(name: &str, shape: &[i64]) -> VariantSpec {
        VariantSpec {
            name: name.into(),
            model_file: format!("{name}.onnx"),
            accuracy: 70.0,
            input_shape: shape.into(),
            tensor_names: Default::default(),
            tokenizer_file: String::new(),
            io: None,
            model_sha256: String::new(),
        }
    }

    #[test]
    fn the_one_stage_form_becomes_a_stage_named_after_the_task() {
        let t = TaskSpec {
            name: "classify".into(),
            slo_ms: 100,
            variants: vec![variant("a", &[3])],
            stages: vec![],
            ..Default::default()
        };
        let n = normalise(t);
        assert!(n.variants.is_empty());
        assert_eq!(n.stages.len(), 1);
        assert_eq!(n.stages[0].name, "classify");
        assert_eq!(n.stages[0].variants[0].name, "a");
        assert_eq!(normalise(n.clone()), n, "normalising twice changes nothing");
        assert_eq!(validate_task(&n), Ok(()));
        assert_eq!(input_shape(&n), &[3]);
    }

    /// Detection at 64×64, then classification at 32×32.
    fn video() -> TaskSpec {
        TaskSpec {
            name: "video".into(),
            slo_ms: 500,
            variants: vec![],
            stages: vec![
                stage("detect", vec![variant("yolov5n", &[3, 64, 64])]),
                stage("classify", vec![variant("r18", &[3, 32, 32])]),
            ],
            ..Default::default()
        }
    }

    #[test]
    fn names_are_bounded_and_never_a_path_step() {
        for ok in ["a", "resnet-18_v1.2", ".hidden", "a..b", &"x".repeat(64)] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", ".", "..", "...", "a/b", "a b", "é", &"x".repeat(65)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn a_pipeline_is_checked_stage_by_stage() {
        let mut t = video();
        assert_eq!(validate_task(&t), Ok(()));
        assert_eq!(find_variant(&t, "r18").map(|(s, _)| s.name.as_str()), Some("classify"));
        assert_eq!(variants(&t).count(), 2);

        t.stages[1].variants.push(variant("yolov5n", &[3, 32, 32]));
        assert!(validate_task(&t).unwrap_err().contains("unique within a task"));
        t.stages[1].variants[1] = variant("r50", &[3, 64, 64]);
        assert!(validate_task(&t).unwrap_err().contains("must take the same input"));
        t.stages[1].variants.pop();
        t.stages[1].name = "detect".into();
        assert!(validate_task(&t).unwrap_err().contains("stage names must be unique"));
        t.stages[1].name = "classify".into();
        t.stages[1].variants.clear();
        assert!(validate_task(&t).unwrap_err().contains("needs 1–"));
        t.stages.clear();
        assert!(validate_task(&t).is_err());
        let many = (0..=MAX_STAGES).map(|i| stage(&format!("s{i}"), vec![variant(&format!("v{i}"), &[1])])).collect();
        t.stages = many;
        assert!(validate_task(&t).unwrap_err().contains("stages"));
    }

    #[test]
    fn a_skipped_stage_needs_a_stage_before_it_labels_and_passes_for_the_stage_after_it() {
        use tidal_proto::v1::{Connection, Skip};
        let link = |output: &str, input: &str| Connection { output: output.into(), input: input.into() };
        let three = |skip: Skip| {
            let mut t = TaskSpec {
                name: "nlp".into(),
                slo_ms: 1000,
                variants: vec![],
                stages: vec![
                    stage("langid", vec![variant("x", &[8])]),
                    stage("translate", vec![variant("m", &[8])]),
                    stage("summarise", vec![variant("b", &[8])]),
                ],
                ..Default::default()
            };
            t.stages[1].skip = Some(skip);
            t.stages[2].connect = vec![link("translation", "text")];
            t
        };
        let skip = Skip { when: "language".into(), labels: vec!["en".into()], pass: vec![link("translation", "text")] };
        assert_eq!(validate_task(&three(skip.clone())), Ok(()));

        let unpassed = three(Skip { pass: vec![], ..skip.clone() });
        let why = validate_task(&unpassed).unwrap_err();
        assert!(why.contains("stage summarise takes output \"translation\" of it"), "{why}");
        for (labels, why) in [(vec![], "1–64 labels"), (vec![String::new()], "must be 1–128 bytes")] {
            let e = validate_task(&three(Skip { labels, ..skip.clone() })).unwrap_err();
            assert!(e.contains(why), "{e}");
        }
        let twice = Skip { pass: vec![link("translation", "text"), link("translation", "other")], ..skip.clone() };
        assert!(validate_task(&three(twice)).unwrap_err().contains("passed twice"));
        let mut first = three(skip.clone());
        first.stages[0].skip = Some(skip.clone());
        assert!(validate_task(&first).unwrap_err().contains("first stage has no stage before it"));
        let mut crops = video();
        crops.stages[1].connector = Connector::Crops as i32;
        crops.stages[1].crops = 2;
        crops.stages[1].skip = Some(Skip { pass: vec![], ..skip });
        assert!(validate_task(&crops).unwrap_err().contains("a stage that crops is not skipped"));
    }

    #[test]
    fn a_cropping_stage_multiplies_the_load_behind_it() {
        let mut t = video();
        t.stages[1].connector = Connector::Crops as i32;
        t.stages[1].crops = 3;
        assert_eq!(validate_task(&t), Ok(()));
        assert_eq!(load_factors(&t), vec![1.0, 3.0]);
        t.stages[1].crops = 0;
        assert!(validate_task(&t).unwrap_err().contains("crops must be"));
        t.stages[1].crops = 3;
        t.stages[1].variants[0].input_shape = vec![1000];
        assert!(validate_task(&t).unwrap_err().contains("[channels, height, width]"));
        t.stages[0].connector = Connector::Crops as i32;
        assert!(validate_task(&t).unwrap_err().contains("first stage"));

        let p = ProfilePoint {
            cores: 1,
            batch: 2,
            latency_p50_ms: 10.0,
            latency_p99_ms: 20.0,
            throughput_rps: 300.0,
            size: 0,
            output_tokens: 0,
            resident_bytes: 0,
        };
        let seen = per_request(&[p], 3.0)[0];
        assert_eq!((seen.throughput_rps, seen.latency_p99_ms), (100.0, 40.0), "3 crops: 2 batches of 2");
        assert_eq!(per_request(&[p], 1.0), vec![p]);
    }
}
