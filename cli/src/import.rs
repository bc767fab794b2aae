//! `tidalctl task import`: the ONNX models of a Triton model repository registered as tasks,
//! served from the repository as it is (see `tidal_common::triton_repo`).

use std::path::Path;

use tidal_common::onnx_signature::Signature;
use tidal_common::triton_repo::{model_dirs, read_model, to_task, ImportOptions, Imported};
use tidal_proto::v1::{RegisterTaskRequest, TensorSignature};

pub struct Import<'a> {
    pub repository: &'a Path,
    pub slo_ms: u32,
    /// Only these models; empty: every model directory.
    pub models: &'a [String],
    pub sample_shapes: &'a [(String, Vec<i64>)],
    pub dry_run: bool,
}

/// Reads every model, prints what it becomes (or why it cannot), registers the ones that can
/// be served, and fails if any model was refused.
pub async fn run(controller: &str, opts: Import<'_>) -> anyhow::Result<()> {
    let dirs = model_dirs(opts.repository).map_err(anyhow::Error::msg)?;
    let names: Vec<String> =
        dirs.iter().filter_map(|d| d.file_name()).map(|n| n.to_string_lossy().into_owned()).collect();
    for wanted in opts.models.iter().chain(opts.sample_shapes.iter().map(|(m, _)| m)) {
        anyhow::ensure!(
            names.contains(wanted),
            "{} has no model {wanted:?} (it has {names:?})",
            opts.repository.display()
        );
    }
    let mut imported = Vec::new();
    let mut refused = Vec::new();
    for (dir, name) in dirs.iter().zip(&names) {
        if !opts.models.is_empty() && !opts.models.contains(name) {
            continue;
        }
        match import_one(opts.repository, dir, name, &opts) {
            Ok(model) => {
                print_model(&model);
                imported.push(model);
            }
            Err(reason) => {
                println!("{name}: refused: {reason}");
                refused.push(name.clone());
            }
        }
    }
    if !opts.dry_run && !imported.is_empty() {
        let mut client = crate::controller(controller).await?;
        for model in imported.iter() {
            let name = model.task.name.clone();
            client.register_task(RegisterTaskRequest { task: Some(model.task.clone()), ..Default::default() }).await?;
            println!("registered task {name} (SLO {} ms)", model.task.slo_ms);
        }
        println!(
            "agents serve these tasks from the repository: start them with --model-dir {}",
            opts.repository.display()
        );
    }
    anyhow::ensure!(
        refused.is_empty(),
        "{} of {} models refused ({}){}",
        refused.len(),
        refused.len() + imported.len(),
        refused.join(", "),
        if opts.dry_run || imported.is_empty() { "" } else { "; the others are registered" }
    );
    Ok(())
}

fn import_one(repository: &Path, dir: &Path, name: &str, opts: &Import) -> Result<Imported, String> {
    let model = read_model(dir)?;
    let path = repository.join(&model.model_file);
    let bytes = std::fs::read(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let signature = Signature::read(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    let sample_shape = opts.sample_shapes.iter().find(|(m, _)| m == name).map(|(_, s)| s.as_slice());
    let mut imported = to_task(&model, &signature, &ImportOptions { slo_ms: opts.slo_ms, sample_shape })?;
    // Recorded so that an agent without the repository can fetch the file and check it.
    let digest = tidal_common::digest::sha256_hex(&bytes);
    for v in imported.task.stages.iter_mut().flat_map(|s| s.variants.iter_mut()) {
        v.model_sha256 = digest.clone();
    }
    Ok(imported)
}

fn print_model(model: &Imported) {
    let shown = |ts: &[TensorSignature]| {
        ts.iter().map(|t| format!("{} {} {:?}", t.name, t.datatype, t.shape)).collect::<Vec<_>>().join(", ")
    };
    let stage = &model.task.stages[0];
    let variant = &stage.variants[0];
    println!("{}: {} (profiled at {:?})", model.task.name, variant.model_file, variant.input_shape);
    println!("  inputs:  {}", shown(&stage.inputs));
    println!("  outputs: {}", shown(&stage.outputs));
    for note in &model.notes {
        println!("  note: {note}");
    }
}

/// `MODEL=3,640,640`.
pub fn parse_sample_shape(text: &str) -> Result<(String, Vec<i64>), String> {
    let (model, dims) = text.split_once('=').ok_or("expected MODEL=DIMS, e.g. yolo=3,640,640")?;
    let dims = if dims.trim().is_empty() {
        Vec::new()
    } else {
        dims.split(',')
            .map(|d| d.trim().parse::<i64>().map_err(|_| format!("{d:?} is not a dimension")))
            .collect::<Result<Vec<_>, _>>()?
    };
    Ok((model.to_string(), dims))
}
