//! `tidalctl models generate`: writes ONNX ResNets and their variant configs.

use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use tidal_common::resnet::{generate, ResNetDepth};
use tidal_common::variant::VariantConfig;

pub fn generate_models(out: &Path, names: &[String], resolution: u32, seed: u64, force: bool) -> anyhow::Result<()> {
    if !(32..=1024).contains(&resolution) {
        anyhow::bail!("resolution {resolution} is outside 32..=1024 pixels");
    }
    let depths = names
        .iter()
        .map(|n| {
            ResNetDepth::from_name(n).with_context(|| {
                format!("unknown variant {n:?}; choose from resnet18, resnet34, resnet50, resnet101, resnet152")
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    for depth in depths {
        let cfg = VariantConfig {
            name: depth.name().to_string(),
            model_file: format!("{}.onnx", depth.name()),
            accuracy: depth.top1_accuracy(),
            input_shape: vec![3, resolution as i64, resolution as i64],
        };
        let toml_path = out.join(format!("{}.toml", cfg.name));
        let onnx_path = out.join(&cfg.model_file);
        if !force && onnx_path.is_file() && VariantConfig::load(out, &cfg.name).is_ok_and(|c| c == cfg) {
            eprintln!("{:<10} up to date in {}", cfg.name, out.display());
            continue;
        }
        let started = Instant::now();
        let model = generate(depth, resolution, seed);
        // Write to a temporary name, then rename: a partial file is never taken for a model.
        let tmp = onnx_path.with_extension("onnx.tmp");
        std::fs::write(&tmp, &model.onnx).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &onnx_path)?;
        std::fs::write(&toml_path, cfg.to_toml()).with_context(|| format!("writing {}", toml_path.display()))?;
        eprintln!(
            "{:<10} {:>6.1} M parameters, {:>4} MB, {resolution}x{resolution}, top-1 {:.2} %  ({:.1} s)",
            cfg.name,
            model.parameters as f64 / 1e6,
            model.onnx.len() >> 20,
            cfg.accuracy,
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
