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
    /// Reads `<dir>/<name>.toml` and checks that it names an existing ONNX file in `dir`.
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
        if !(0.0..=100.0).contains(&cfg.accuracy) {
            return Err(invalid(format!("accuracy {} is not a percentage", cfg.accuracy)));
        }
        if cfg.input_shape.is_empty() || cfg.input_shape.iter().any(|&d| d <= 0) {
            return Err(invalid(format!("input shape {:?} must be positive dimensions", cfg.input_shape)));
        }
        if !dir.join(&cfg.model_file).is_file() {
            return Err(invalid(format!("model file {:?} does not exist in {}", cfg.model_file, dir.display())));
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
        }
    }
}
