//! `tidalctl models generate`: writes ONNX models (ResNets, a downsampling stage) and their
//! variant configs.

use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use tidal_common::variant::VariantConfig;
use tidal_common::zoo::{ModelKind, NAMES};

pub fn generate_models(out: &Path, names: &[String], resolution: u32, seed: u64, force: bool) -> anyhow::Result<()> {
    if !(32..=1024).contains(&resolution) {
        anyhow::bail!("resolution {resolution} is outside 32..=1024 pixels");
    }
    let kinds = names
        .iter()
        .map(|n| ModelKind::from_name(n).with_context(|| format!("unknown variant {n:?}; choose from {NAMES}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if resolution % 2 == 1 && kinds.contains(&ModelKind::Downsample) {
        anyhow::bail!("downsample halves the image: give an even --resolution");
    }
    if !resolution.is_multiple_of(32) && kinds.iter().any(|k| matches!(k, ModelKind::Yolo(_))) {
        anyhow::bail!("YOLOv5 downsamples by 32: give a --resolution that is a multiple of 32");
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    for kind in kinds {
        let cfg = VariantConfig {
            name: kind.name().to_string(),
            model_file: format!("{}.onnx", kind.name()),
            accuracy: kind.accuracy(),
            input_shape: kind.input_shape(resolution),
        };
        let toml_path = out.join(format!("{}.toml", cfg.name));
        let onnx_path = out.join(&cfg.model_file);
        if !force && onnx_path.is_file() && VariantConfig::load(out, &cfg.name).is_ok_and(|c| c == cfg) {
            eprintln!("{:<10} up to date in {}", cfg.name, out.display());
            continue;
        }
        let started = Instant::now();
        let model = kind.generate(resolution, seed);
        // Write to a temporary name, then rename: a partial file is never taken for a model.
        let tmp = onnx_path.with_extension("onnx.tmp");
        std::fs::write(&tmp, &model.onnx).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &onnx_path)?;
        std::fs::write(&toml_path, cfg.to_toml()).with_context(|| format!("writing {}", toml_path.display()))?;
        eprintln!(
            "{:<10} {:>6.1} M parameters, {:>4} MB, {resolution}x{resolution}, accuracy {:.2} %  ({:.1} s)",
            cfg.name,
            model.parameters as f64 / 1e6,
            model.onnx.len() >> 20,
            cfg.accuracy,
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
