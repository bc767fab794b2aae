//! The model directory as the agent checks it: a variant's model file must be in it and take
//! the input the variant declares. Each file is read once per version (size, modified time);
//! callers on the runtime go through [`ModelDir::check_all`], which reads on a blocking thread.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tidal_common::onnx_signature::Signature;
use tidal_proto::v1::VariantSpec;

type Version = (u64, Option<SystemTime>);
/// What a file declares, or why it cannot be read.
type Declared = Result<Arc<Signature>, String>;

pub struct ModelDir {
    dir: PathBuf,
    declared: Mutex<HashMap<PathBuf, (Version, Declared)>>,
}

impl ModelDir {
    pub fn new(dir: PathBuf) -> Arc<Self> {
        Arc::new(Self { dir, declared: Mutex::new(HashMap::new()) })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Whether `v`'s model is here and takes `v`'s input (blocking: may read the file).
    pub fn check(&self, v: &VariantSpec) -> Result<(), String> {
        let path = self.dir.join(&v.model_file);
        let missing = || format!("model file {:?} is not in the model directory {}", v.model_file, self.dir.display());
        // A symbolic link may point anywhere: the file it leads to must be in the directory too.
        let real = std::fs::canonicalize(&path).map_err(|_| missing())?;
        let dir = std::fs::canonicalize(&self.dir).map_err(|_| missing())?;
        if !real.starts_with(&dir) {
            return Err(format!(
                "model file {:?} leads out of the model directory {} (to {})",
                v.model_file,
                self.dir.display(),
                real.display()
            ));
        }
        let meta = std::fs::metadata(&path).map_err(|_| missing())?;
        if !meta.is_file() {
            return Err(missing());
        }
        let version = (meta.len(), meta.modified().ok());
        let cached = self.declared.lock().unwrap_or_else(|p| p.into_inner()).get(&path).cloned();
        let declared = match cached {
            Some((seen, declared)) if seen == version => declared,
            _ => {
                let declared = std::fs::read(&path)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))
                    .and_then(|bytes| Signature::read(&bytes).map(Arc::new));
                self.declared.lock().unwrap_or_else(|p| p.into_inner()).insert(path, (version, declared.clone()));
                declared
            }
        };
        declared?.takes_sample(&v.input_shape).map_err(|e| format!("model file {:?}: {e}", v.model_file))
    }

    /// [`Self::check`] for each of `variants` (by name), off the runtime.
    pub async fn check_all(self: &Arc<Self>, variants: Vec<VariantSpec>) -> HashMap<String, Result<(), String>> {
        let dir = self.clone();
        let checked = tokio::task::spawn_blocking(move || {
            variants.into_iter().map(|v| (v.name.clone(), dir.check(&v))).collect::<HashMap<_, _>>()
        });
        checked.await.unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidal_common::resnet::{generate, ResNetDepth};

    fn variant(file: &str, shape: &[i64]) -> VariantSpec {
        VariantSpec {
            name: "r".into(),
            model_file: file.into(),
            accuracy: 70.0,
            input_shape: shape.into(),
            tensor_names: Default::default(),
            tokenizer_file: String::new(),
            io: None,
        }
    }

    #[test]
    fn a_model_must_be_present_and_take_the_declared_input() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("r.onnx"), generate(ResNetDepth::R18, 32, 1).onnx).unwrap();
        let models = ModelDir::new(dir.path().into());
        assert_eq!(models.check(&variant("r.onnx", &[3, 32, 32])), Ok(()));
        let wrong = models.check(&variant("r.onnx", &[3, 64, 64])).unwrap_err();
        assert!(wrong.contains("takes [?, 3, 32, 32]"), "{wrong}");
        assert!(models.check(&variant("gone.onnx", &[3, 32, 32])).unwrap_err().contains("not in the model directory"));
        std::fs::write(dir.path().join("r.onnx"), b"not a model").unwrap();
        assert!(models.check(&variant("r.onnx", &[3, 32, 32])).is_err(), "a changed file is read again");
    }

    #[test]
    fn a_link_out_of_the_directory_is_refused_and_one_inside_it_is_not() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret.onnx"), generate(ResNetDepth::R18, 32, 1).onnx).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("r.onnx"), generate(ResNetDepth::R18, 32, 1).onnx).unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret.onnx"), dir.path().join("out.onnx")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("r.onnx"), dir.path().join("in.onnx")).unwrap();
        let models = ModelDir::new(dir.path().into());
        let refused = models.check(&variant("out.onnx", &[3, 32, 32])).unwrap_err();
        assert!(refused.contains("leads out of the model directory"), "{refused}");
        assert_eq!(models.check(&variant("in.onnx", &[3, 32, 32])), Ok(()));
    }
}
