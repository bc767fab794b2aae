//! `tidalctl models generate`: writes ONNX models (ResNets, a downsampling stage) and their
//! variant configs. `tidalctl models signature`: what an ONNX file takes and gives. And the
//! check at registration that a stage's variants take and give the same.

use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use tidal_common::onnx_signature::{check_stage, Signature, TensorSpec};
use tidal_common::variant::VariantConfig;
use tidal_common::zoo::{ModelKind, SampleSize, NAMES};
use tidal_proto::v1::TaskSpec;

/// Writes a WordPiece tokenizer of at most `vocab` entries over the words of `words` (a word
/// list, one per line, as Debian's wamerican installs at /usr/share/dict/words), shortest
/// first; without the list, of characters only (every word spelled in pieces).
fn write_tokenizer(path: &Path, vocab: usize, words: &Path) -> anyhow::Result<()> {
    let mut list: Vec<String> = match std::fs::read_to_string(words) {
        Ok(text) => text.lines().map(str::to_string).collect(),
        Err(e) => {
            eprintln!(
                "no word list at {} ({e}): {} spells every word in characters (install Debian's wamerican, \
                 or give --words)",
                words.display(),
                path.display()
            );
            Vec::new()
        }
    };
    list.sort_by(|a, b| a.len().cmp(&b.len()).then_with(|| a.cmp(b)));
    let json = tidal_common::text::wordpiece_json(&list, vocab);
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, json).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

pub fn generate_models(
    out: &Path,
    names: &[String],
    size: SampleSize,
    words: &Path,
    seed: u64,
    force: bool,
) -> anyhow::Result<()> {
    let resolution = size.resolution;
    let kinds = names
        .iter()
        .map(|n| ModelKind::from_name(n).with_context(|| format!("unknown variant {n:?}; choose from {NAMES}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if kinds.iter().any(|k| k.takes_images()) && !(32..=1024).contains(&resolution) {
        anyhow::bail!("resolution {resolution} is outside 32..=1024 pixels");
    }
    if resolution % 2 == 1 && kinds.contains(&ModelKind::Downsample) {
        anyhow::bail!("downsample halves the image: give an even --resolution");
    }
    if !resolution.is_multiple_of(32) && kinds.iter().any(|k| matches!(k, ModelKind::Yolo(_))) {
        anyhow::bail!("YOLOv5 downsamples by 32: give a --resolution that is a multiple of 32");
    }
    if !(1..=512).contains(&size.tokens) {
        anyhow::bail!("--tokens {} is outside 1..=512", size.tokens);
    }
    // wav2vec2's feature encoder needs 25 ms for one frame.
    if !(25..=600_000).contains(&size.audio_ms) {
        anyhow::bail!("--audio-ms {} is outside 25..=600000 (25 ms to 10 minutes)", size.audio_ms);
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    for kind in kinds {
        let cfg = VariantConfig {
            name: kind.name().to_string(),
            model_file: format!("{}.onnx", kind.name()),
            accuracy: kind.accuracy(),
            input_shape: kind.input_shape(size),
            names: Default::default(),
            tokenizer_file: match kind.vocab() {
                Some(_) => format!("{}.tokenizer.json", kind.name()),
                None => String::new(),
            },
        };
        if let Some(vocab) = kind.vocab() {
            write_tokenizer(&out.join(&cfg.tokenizer_file), vocab, words)?;
        }
        let toml_path = out.join(format!("{}.toml", cfg.name));
        let onnx_path = out.join(&cfg.model_file);
        // The text and speech models do not depend on the size: only their config changes.
        let same_model = |c: &VariantConfig| !kind.takes_images() || c.input_shape == cfg.input_shape;
        if !force && onnx_path.is_file() && VariantConfig::load(out, &cfg.name).is_ok_and(|c| same_model(&c)) {
            if VariantConfig::load(out, &cfg.name).is_ok_and(|c| c == cfg) {
                eprintln!("{:<20} up to date in {}", cfg.name, out.display());
            } else {
                std::fs::write(&toml_path, cfg.to_toml())
                    .with_context(|| format!("writing {}", toml_path.display()))?;
                eprintln!("{:<20} up to date in {}; profiled at {:?} now", cfg.name, out.display(), cfg.input_shape);
            }
            continue;
        }
        let started = Instant::now();
        let model = kind.generate(resolution, seed);
        // Write to a temporary name, then rename: a partial file is never taken for a model.
        let tmp = onnx_path.with_extension("onnx.tmp");
        std::fs::write(&tmp, &model.onnx).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &onnx_path)?;
        std::fs::write(&toml_path, cfg.to_toml()).with_context(|| format!("writing {}", toml_path.display()))?;
        let at = match kind {
            ModelKind::Seq2Seq(m) if !m.takes_audio() => format!("{} tokens", cfg.input_shape[0]),
            ModelKind::Text(_) => format!("{} tokens", cfg.input_shape[0]),
            ModelKind::Speech(_) | ModelKind::Seq2Seq(_) => {
                format!("{:.2} s of audio", cfg.input_shape[0] as f64 / 16_000.0)
            }
            _ => format!("{resolution}x{resolution}"),
        };
        eprintln!(
            "{:<20} {:>6.1} M parameters, {:>5} MB, {at}, accuracy {:.2} %  ({:.1} s)",
            cfg.name,
            model.parameters as f64 / 1e6,
            model.onnx.len() >> 20,
            cfg.accuracy,
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// The signature an ONNX file declares.
pub(crate) fn signature_of(path: &Path) -> anyhow::Result<Signature> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Signature::read(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// Prints each file's inputs and outputs, and whether it takes batches.
pub fn print_signatures(files: &[std::path::PathBuf]) -> anyhow::Result<()> {
    for path in files {
        let s = signature_of(path)?;
        println!("{}", path.display());
        for (what, tensors) in [("input ", &s.inputs), ("output", &s.outputs)] {
            for t in tensors.iter() {
                println!("  {what}  {t}");
            }
        }
        if s.batched() {
            println!("  batched: the leading dynamic dimension of every input and output");
        } else {
            println!("  not batched: a tensor without a leading dynamic dimension (served one sample at a time)");
        }
    }
    Ok(())
}

/// Gives each stage of `task` the signature its variants' files in `model_dir` declare (and
/// each variant its file's SHA-256), or refuses the task if a stage's variants do not take and give the same tensors. A variant
/// with tensors of its own (`VariantSpec.io`, a task file's group) gets its own.
pub fn read_signatures(task: &mut TaskSpec, model_dir: &Path) -> anyhow::Result<()> {
    for stage in &mut task.stages {
        let mut signatures = Vec::new();
        for v in &mut stage.variants {
            let path = model_dir.join(&v.model_file);
            let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            // Recorded so that an agent without the file can fetch it and check what it got.
            v.model_sha256 = tidal_common::digest::sha256_hex(&bytes);
            let signature = Signature::read(&bytes)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
                .renamed(&v.tensor_names)
                .map_err(|e| anyhow::anyhow!("variant {}: {e}", v.name))?;
            match &mut v.io {
                Some(io) => {
                    io.inputs = signature.inputs.iter().map(TensorSpec::to_proto).collect();
                    io.outputs = signature.outputs.iter().map(TensorSpec::to_proto).collect();
                }
                None => signatures.push((v.name.clone(), signature)),
            }
        }
        check_stage(&stage.name, &signatures).map_err(|e| anyhow::anyhow!("task {}: {e}", task.name))?;
        if let Some((_, s)) = signatures.first() {
            stage.inputs = s.inputs.iter().map(TensorSpec::to_proto).collect();
            stage.outputs = s.outputs.iter().map(TensorSpec::to_proto).collect();
        }
    }
    Ok(())
}

/// Reads the tokenizer of each variant of a stage that tokenizes text, as its agents will, so
/// that a missing or malformed file is refused before the task is registered.
pub fn check_tokenizers(task: &TaskSpec, model_dir: &Path) -> anyhow::Result<()> {
    for (stage, v) in tidal_common::task::variants(task) {
        let served = tidal_common::task::as_served(stage, v);
        let Some(tokenize) = served.text.as_ref().and_then(|t| t.tokenize.as_ref()) else { continue };
        tidal_common::text::TextEncoder::load(&model_dir.join(&v.tokenizer_file), tokenize)
            .map_err(|e| anyhow::anyhow!("stage {}, variant {}: {e}", stage.name, v.name))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE_32: SampleSize = SampleSize { resolution: 32, tokens: 16, audio_ms: 1000 };

    #[test]
    fn registration_gives_each_stage_its_variants_signature() {
        let dir = tempfile::tempdir().unwrap();
        generate_models(dir.path(), &["resnet18".into(), "resnet34".into()], SIZE_32, Path::new("/none"), 1, false)
            .unwrap();
        let variants = ["resnet18", "resnet34"].map(|v| VariantConfig::load(dir.path(), v).unwrap().spec()).to_vec();
        let mut task = tidal_common::task::single_stage("t", 100, variants);
        read_signatures(&mut task, dir.path()).unwrap();
        let stage = &task.stages[0];
        assert_eq!((stage.inputs[0].name.as_str(), stage.inputs[0].shape.as_slice()), ("input", &[-1, 3, 32, 32][..]));
        assert_eq!((stage.outputs[0].name.as_str(), stage.outputs[0].datatype.as_str()), ("logits", "FP32"));
        assert_eq!(tidal_common::task::validate_task(&task), Ok(()));
    }
}
