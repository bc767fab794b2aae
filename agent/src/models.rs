//! Where a variant's model file is on this node, as the agent checks it: in the model
//! directory, or else fetched from the controllers into the cache ([`crate::fetch`]) when its
//! digest was recorded at registration. Either way it must be the file registered (its
//! SHA-256, when recorded) and take the input the variant declares. Each file is read once
//! per version (size, modified time); callers on the runtime go through
//! [`ModelDir::locate_all`], which reads on a blocking thread.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tidal_common::onnx_signature::Signature;
use tidal_proto::v1::VariantSpec;

use crate::fetch::ModelCache;

type Version = (u64, Option<SystemTime>);
/// A file's digest and what it declares, or why it cannot be read.
type Declared = Result<(String, Result<Arc<Signature>, String>), String>;

/// Why a file on disk is not a variant's model.
enum CheckError {
    Unreadable(String),
    /// Another file than the one registered (its digest).
    NotRegistered(String),
    /// Not a model, or not one that takes the variant's input.
    Input(String),
}

impl From<CheckError> for String {
    fn from(e: CheckError) -> String {
        match e {
            CheckError::Unreadable(why) | CheckError::NotRegistered(why) | CheckError::Input(why) => why,
        }
    }
}

/// Why a variant's model cannot be served here (yet).
#[derive(Debug, Clone, PartialEq)]
pub enum Unusable {
    /// Not on this node, and the controllers can send it: its digest is recorded and this
    /// agent has a cache and controllers.
    Fetch(String),
    /// Anything else: missing and not fetchable, unreadable, another file than the one
    /// registered, another input than the variant's.
    Refused(String),
}

impl std::fmt::Display for Unusable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unusable::Fetch(why) | Unusable::Refused(why) => f.write_str(why),
        }
    }
}

pub struct ModelDir {
    dir: PathBuf,
    /// Files fetched from the controllers, when this agent fetches.
    cache: Option<Arc<ModelCache>>,
    declared: Mutex<HashMap<PathBuf, (Version, Declared)>>,
}

impl ModelDir {
    pub fn new(dir: PathBuf, cache: Option<Arc<ModelCache>>) -> Arc<Self> {
        Arc::new(Self { dir, cache, declared: Mutex::new(HashMap::new()) })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Where `v`'s model file is, checked (blocking: may read the file).
    pub fn locate(&self, v: &VariantSpec) -> Result<PathBuf, Unusable> {
        if let Some(path) = self.in_dir(v).map_err(Unusable::Refused)? {
            self.check(&path, v).map_err(|e| Unusable::Refused(e.into()))?;
            return Ok(path);
        }
        let missing = format!("model file {:?} is not in the model directory {}", v.model_file, self.dir.display());
        let Some(cache) = &self.cache else { return Err(Unusable::Refused(missing)) };
        if v.model_sha256.is_empty() {
            return Err(Unusable::Refused(format!(
                "{missing}, and no digest was recorded when its task was registered: it is not fetched"
            )));
        }
        let fetched = cache.path_of(&v.model_sha256);
        if !fetched.is_file() {
            return Err(Unusable::Fetch(format!("{missing}; fetching it from the controllers")));
        }
        match self.check(&fetched, v) {
            Ok(()) => {
                cache.used(&fetched);
                Ok(fetched)
            }
            // A copy that changed on disk since it was fetched: fetched again.
            Err(CheckError::NotRegistered(why) | CheckError::Unreadable(why)) => {
                tracing::warn!(file = %fetched.display(), "{why}; removed from the cache, fetching it again");
                let _ = std::fs::remove_file(&fetched);
                Err(Unusable::Fetch(format!("{missing}; its cached copy was damaged, fetching it again")))
            }
            Err(e) => Err(Unusable::Refused(e.into())),
        }
    }

    /// The file in the model directory, if it is there; an error if it leads out of it.
    fn in_dir(&self, v: &VariantSpec) -> Result<Option<PathBuf>, String> {
        let path = self.dir.join(&v.model_file);
        // A symbolic link may point anywhere: the file it leads to must be in the directory too.
        let (Ok(real), Ok(dir)) = (std::fs::canonicalize(&path), std::fs::canonicalize(&self.dir)) else {
            return Ok(None);
        };
        if !real.starts_with(&dir) {
            return Err(format!(
                "model file {:?} leads out of the model directory {} (to {})",
                v.model_file,
                self.dir.display(),
                real.display()
            ));
        }
        Ok(std::fs::metadata(&path).is_ok_and(|m| m.is_file()).then_some(path))
    }

    /// Whether the file at `path` is `v`'s registered file and takes `v`'s input.
    fn check(&self, path: &Path, v: &VariantSpec) -> Result<(), CheckError> {
        let meta = std::fs::metadata(path)
            .map_err(|e| CheckError::Unreadable(format!("cannot read {}: {e}", path.display())))?;
        let version = (meta.len(), meta.modified().ok());
        let cached = self.declared.lock().unwrap_or_else(|p| p.into_inner()).get(path).cloned();
        let declared = match cached {
            Some((seen, declared)) if seen == version => declared,
            _ => {
                let declared = std::fs::read(path)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))
                    .map(|bytes| (tidal_common::digest::sha256_hex(&bytes), Signature::read(&bytes).map(Arc::new)));
                self.declared
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(path.to_path_buf(), (version, declared.clone()));
                declared
            }
        };
        let (digest, signature) = declared.map_err(CheckError::Unreadable)?;
        if !v.model_sha256.is_empty() && digest != v.model_sha256 {
            return Err(CheckError::NotRegistered(format!(
                "model file {:?} ({}) is not the one registered: its SHA-256 is {digest}, the variant's {}",
                v.model_file,
                path.display(),
                v.model_sha256
            )));
        }
        signature
            .and_then(|s| s.takes_sample(&v.input_shape))
            .map_err(|e| CheckError::Input(format!("model file {:?}: {e}", v.model_file)))
    }

    /// [`Self::locate`] for each of `variants` (by name), off the runtime.
    pub async fn locate_all(
        self: &Arc<Self>,
        variants: Vec<VariantSpec>,
    ) -> HashMap<String, Result<PathBuf, Unusable>> {
        let dir = self.clone();
        let located = tokio::task::spawn_blocking(move || {
            variants.into_iter().map(|v| (v.name.clone(), dir.locate(&v))).collect::<HashMap<_, _>>()
        });
        located.await.unwrap_or_default()
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
            model_sha256: String::new(),
        }
    }

    fn refused(e: Unusable) -> String {
        match e {
            Unusable::Refused(why) => why,
            Unusable::Fetch(why) => panic!("fetched, not refused: {why}"),
        }
    }

    #[test]
    fn a_model_must_be_present_and_take_the_declared_input() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("r.onnx"), generate(ResNetDepth::R18, 32, 1).onnx).unwrap();
        let models = ModelDir::new(dir.path().into(), None);
        assert_eq!(models.locate(&variant("r.onnx", &[3, 32, 32])), Ok(dir.path().join("r.onnx")));
        let wrong = refused(models.locate(&variant("r.onnx", &[3, 64, 64])).unwrap_err());
        assert!(wrong.contains("takes [?, 3, 32, 32]"), "{wrong}");
        let gone = refused(models.locate(&variant("gone.onnx", &[3, 32, 32])).unwrap_err());
        assert!(gone.contains("not in the model directory"), "{gone}");
        std::fs::write(dir.path().join("r.onnx"), b"not a model").unwrap();
        assert!(models.locate(&variant("r.onnx", &[3, 32, 32])).is_err(), "a changed file is read again");
    }

    #[test]
    fn a_link_out_of_the_directory_is_refused_and_one_inside_it_is_not() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret.onnx"), generate(ResNetDepth::R18, 32, 1).onnx).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("r.onnx"), generate(ResNetDepth::R18, 32, 1).onnx).unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret.onnx"), dir.path().join("out.onnx")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("r.onnx"), dir.path().join("in.onnx")).unwrap();
        let models = ModelDir::new(dir.path().into(), None);
        let out = refused(models.locate(&variant("out.onnx", &[3, 32, 32])).unwrap_err());
        assert!(out.contains("leads out of the model directory"), "{out}");
        assert!(models.locate(&variant("in.onnx", &[3, 32, 32])).is_ok());
    }

    #[test]
    fn a_recorded_digest_is_checked_and_a_missing_file_is_fetched_into_the_cache() {
        let onnx = generate(ResNetDepth::R18, 32, 1).onnx;
        let digest = tidal_common::digest::sha256_hex(&onnx);
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(ModelCache::open(dir.path().join("cache"), 1 << 30).unwrap());
        std::fs::create_dir(dir.path().join("models")).unwrap();
        let models = ModelDir::new(dir.path().join("models"), Some(cache.clone()));
        let mut v = variant("r.onnx", &[3, 32, 32]);
        // Without a digest, a missing file cannot be fetched.
        let why = refused(models.locate(&v).unwrap_err());
        assert!(why.contains("no digest was recorded"), "{why}");
        v.model_sha256 = digest.clone();
        assert!(matches!(models.locate(&v), Err(Unusable::Fetch(_))));
        // Fetched (the cache's file, named by its digest): served from there.
        std::fs::write(cache.path_of(&digest), &onnx).unwrap();
        assert_eq!(models.locate(&v), Ok(cache.path_of(&digest)));
        // A copy damaged on disk is removed and fetched again.
        let mut damaged = onnx.clone();
        damaged.truncate(onnx.len() - 1);
        std::fs::write(cache.path_of(&digest), &damaged).unwrap();
        assert!(matches!(models.locate(&v), Err(Unusable::Fetch(_))));
        assert!(!cache.path_of(&digest).exists());
        // A file in the model directory is taken first, and must be the registered one.
        std::fs::write(dir.path().join("models/r.onnx"), generate(ResNetDepth::R18, 32, 2).onnx).unwrap();
        let other = refused(models.locate(&v).unwrap_err());
        assert!(other.contains("is not the one registered"), "{other}");
        std::fs::write(dir.path().join("models/r.onnx"), &onnx).unwrap();
        assert_eq!(models.locate(&v), Ok(dir.path().join("models/r.onnx")));
    }
}
