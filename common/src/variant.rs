//! A variant on disk: an ONNX file plus a small TOML that says what it is (as a Triton model
//! repository entry does), e.g. `resnet18.onnx` beside `resnet18.toml`:
//!
//! ```toml
//! name = "resnet18"
//! model_file = "resnet18.onnx"
//! accuracy = 69.76
//! input_shape = [3, 64, 64]
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tidal_proto::v1::VariantSpec;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VariantConfig {
    pub name: String,
    pub model_file: String,
    /// Top-1 accuracy in percent.
    pub accuracy: f64,
    /// One sample's input shape, without the batch dimension.
    pub input_shape: Vec<i64>,
    /// Where the model names a tensor otherwise than the stage it serves:
    /// `[names] images = "input.1"` (the stage's name = the model's).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub names: std::collections::BTreeMap<String, String>,
    /// A text model's tokenizer (a Hugging Face tokenizer.json beside it), for a stage that
    /// tokenizes text.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tokenizer_file: String,
}

/// Most elements one sample's input may have (a 3×2048×2048 image is 12.6 M).
pub const MAX_INPUT_ELEMENTS: i64 = 1 << 26;

/// The one check of a variant, wherever one arrives (a TOML on disk, a registered task, a
/// plan, a profile request): a name, an accuracy in percent, an input shape of positive
/// dimensions whose size is bounded, and a model file that is a plain relative path inside
/// the model directory.
pub fn validate_variant(v: &VariantSpec) -> Result<(), String> {
    if v.name.is_empty() || v.name.len() > 64 || !v.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(format!("variant name {:?} must be 1–64 characters of [A-Za-z0-9-_.]", v.name));
    }
    if !(0.0..=100.0).contains(&v.accuracy) {
        return Err(format!("variant {}: accuracy {} is not a percentage", v.name, v.accuracy));
    }
    let elements = v.input_shape.iter().try_fold(1i64, |n, &d| if d > 0 { n.checked_mul(d) } else { None });
    // Empty: a sample of the first input is a scalar (a model taking a batch of numbers).
    if elements.is_none_or(|n| n > MAX_INPUT_ELEMENTS) {
        return Err(format!(
            "variant {}: input shape {:?} must be positive dimensions of at most {MAX_INPUT_ELEMENTS} elements in all",
            v.name, v.input_shape
        ));
    }
    if v.tensor_names.len() > 2 * crate::onnx_signature::MAX_TENSORS {
        return Err(format!(
            "variant {}: at most {} tensor names are mapped",
            v.name,
            2 * crate::onnx_signature::MAX_TENSORS
        ));
    }
    let printable =
        |n: &str| !n.is_empty() && n.len() <= crate::onnx_signature::MAX_NAME && !n.chars().any(char::is_control);
    if let Some((stage, model)) = v.tensor_names.iter().find(|(s, m)| !printable(s) || !printable(m)) {
        return Err(format!("variant {}: tensor names {stage:?} → {model:?} must be printable", v.name));
    }
    let mut models: Vec<&String> = v.tensor_names.values().collect();
    models.sort();
    if let Some(w) = models.windows(2).find(|w| w[0] == w[1]) {
        return Err(format!("variant {}: two of the stage's tensors are mapped to the model's {:?}", v.name, w[0]));
    }
    let inside = |file: &str| {
        !file.is_empty()
            && !file.starts_with('/')
            && !file.split(['/', '\\']).any(|part| part == ".." || part.is_empty())
    };
    if !inside(&v.model_file) {
        return Err(format!(
            "variant {}: model file {:?} must be a relative path inside the model directory",
            v.name, v.model_file
        ));
    }
    if !v.model_sha256.is_empty() && !crate::digest::is_sha256_hex(&v.model_sha256) {
        return Err(format!(
            "variant {}: model_sha256 {:?} is not a SHA-256 (64 lowercase hex digits)",
            v.name, v.model_sha256
        ));
    }
    if !v.tokenizer_file.is_empty() && !inside(&v.tokenizer_file) {
        return Err(format!(
            "variant {}: tokenizer file {:?} must be a relative path inside the model directory",
            v.name, v.tokenizer_file
        ));
    }
    Ok(())
}

#[derive(Debug, Error)]
pub enum VariantError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a valid variant config: {source}")]
    Parse { path: PathBuf, source: toml::de::Error },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

impl VariantConfig {
    /// Reads `<dir>/<name>.toml` and checks that it names an existing ONNX file in `dir` that
    /// takes the input it declares.
    pub fn load(dir: &Path, name: &str) -> Result<Self, VariantError> {
        let path = dir.join(format!("{name}.toml"));
        let text =
            std::fs::read_to_string(&path).map_err(|source| VariantError::Read { path: path.clone(), source })?;
        let cfg: VariantConfig =
            toml::from_str(&text).map_err(|source| VariantError::Parse { path: path.clone(), source })?;
        let invalid = |reason: String| VariantError::Invalid { path: path.clone(), reason };
        if cfg.name != name {
            return Err(invalid(format!("names variant {:?}, expected {name:?}", cfg.name)));
        }
        validate_variant(&cfg.spec()).map_err(invalid)?;
        let model = dir.join(&cfg.model_file);
        if !model.is_file() {
            return Err(invalid(format!("model file {:?} does not exist in {}", cfg.model_file, dir.display())));
        }
        crate::onnx_signature::check_file(&model, &cfg.input_shape).map_err(invalid)?;
        if !cfg.tokenizer_file.is_empty() && !dir.join(&cfg.tokenizer_file).is_file() {
            return Err(invalid(format!(
                "tokenizer file {:?} does not exist in {}",
                cfg.tokenizer_file,
                dir.display()
            )));
        }
        Ok(cfg)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a variant config always serialises")
    }

    pub fn spec(&self) -> VariantSpec {
        VariantSpec {
            name: self.name.clone(),
            model_file: self.model_file.clone(),
            accuracy: self.accuracy,
            input_shape: self.input_shape.clone(),
            tensor_names: self.names.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            tokenizer_file: self.tokenizer_file.clone(),
            io: None,
            model_sha256: String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, model_file: &str, accuracy: f64, input_shape: Vec<i64>) -> VariantSpec {
        VariantSpec { name: name.into(), model_file: model_file.into(), accuracy, input_shape, ..Default::default() }
    }

    #[test]
    fn a_variant_is_checked_the_same_everywhere() {
        assert_eq!(validate_variant(&spec("resnet18", "resnet18.onnx", 69.76, vec![3, 64, 64])), Ok(()));
        assert_eq!(validate_variant(&spec("r", "sub/r.onnx", 0.0, vec![1])), Ok(()));
        assert_eq!(validate_variant(&spec("r", "r.onnx", 70.0, vec![])), Ok(()), "a scalar sample");
        for bad in [
            spec("", "r.onnx", 70.0, vec![3]),
            spec("bad name!", "r.onnx", 70.0, vec![3]),
            spec("r", "r.onnx", 101.0, vec![3]),
            spec("r", "r.onnx", f64::NAN, vec![3]),
            spec("r", "r.onnx", 70.0, vec![3, 0]),
            spec("r", "r.onnx", 70.0, vec![1 << 62, 4]),
            spec("r", "r.onnx", 70.0, vec![1 << 20, 1 << 20]),
            spec("r", "/etc/shadow", 70.0, vec![3]),
            spec("r", "../r.onnx", 70.0, vec![3]),
            spec("r", "a//r.onnx", 70.0, vec![3]),
            spec("r", "", 70.0, vec![3]),
        ] {
            assert!(validate_variant(&bad).is_err(), "{bad:?}");
        }
        let named = |pairs: &[(&str, &str)]| VariantSpec {
            tensor_names: pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect(),
            ..spec("r", "r.onnx", 70.0, vec![3])
        };
        assert_eq!(validate_variant(&named(&[("images", "input.1")])), Ok(()));
        assert!(validate_variant(&named(&[("a", "x"), ("b", "x")]))
            .unwrap_err()
            .contains("two of the stage's tensors"));
        assert!(validate_variant(&named(&[("a", "")])).is_err());
    }
}
