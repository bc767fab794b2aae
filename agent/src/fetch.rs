//! Model files fetched from the controllers, for an agent whose model directory lacks them:
//! a variant's file comes over the controllers' `FetchModel` stream (the agent's own TLS
//! identity, as for every controller call), is checked against the SHA-256 recorded at
//! registration, and is kept in a cache of bounded size under its digest. A truncated or
//! corrupt download is refused and removed; the reconciler, which starts fetches and owns
//! their tasks, tries again later. Files leave the cache least recently used first, never
//! one the plan being applied needs.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tidal_auth::Security;
use tidal_common::digest::Sha256;
use tidal_proto::v1::controller_client::ControllerClient;
use tidal_proto::v1::{FetchModelRequest, ModelChunk};
use tokio::io::AsyncWriteExt;
use tracing::{info, warn};

use crate::metrics::FetchLabels;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait for the next chunk: a replica that stops sending is left for the next.
const CHUNK_TIMEOUT: Duration = Duration::from_secs(30);
/// Files being written start with this; any left by an agent that stopped are removed.
const PARTIAL: &str = ".partial-";

/// The directory of fetched files, each named by its digest, at most `max_bytes` in all.
pub struct ModelCache {
    dir: PathBuf,
    max_bytes: u64,
}

impl ModelCache {
    /// Creates `dir` if needed and removes what an interrupted download left.
    pub fn open(dir: PathBuf, max_bytes: u64) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        for entry in std::fs::read_dir(&dir)?.flatten() {
            if entry.file_name().to_string_lossy().starts_with(PARTIAL) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(Self { dir, max_bytes })
    }

    /// Where the file of digest `sha256` is kept.
    pub fn path_of(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{sha256}.onnx"))
    }

    fn partial_of(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{PARTIAL}{sha256}"))
    }

    /// Marks a file used now: its modified time is the cache's order of use.
    pub fn used(&self, path: &Path) {
        if let Ok(file) = std::fs::File::options().append(true).open(path) {
            let _ = file.set_modified(SystemTime::now());
        }
    }

    /// Removes the least recently used files, none of the digests in `keep`, until `incoming`
    /// more bytes fit; refuses if they cannot.
    pub fn make_room(&self, incoming: u64, keep: &HashSet<String>) -> Result<(), String> {
        let mut files: Vec<(SystemTime, u64, PathBuf, bool)> = std::fs::read_dir(&self.dir)
            .map_err(|e| format!("reading the model cache {}: {e}", self.dir.display()))?
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name().to_string_lossy().into_owned();
                let sha = name.strip_suffix(".onnx")?.to_string();
                let meta = entry.metadata().ok()?;
                Some((meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), meta.len(), entry.path(), keep.contains(&sha)))
            })
            .collect();
        let mut held: u64 = files.iter().map(|f| f.1).sum();
        files.sort_by_key(|f| f.0);
        for (_, len, path, kept) in &files {
            if held.saturating_add(incoming) <= self.max_bytes {
                break;
            }
            if !kept && std::fs::remove_file(path).is_ok() {
                info!(file = %path.display(), bytes = len, "model file removed from the cache (least recently used)");
                held -= len;
            }
        }
        if held.saturating_add(incoming) > self.max_bytes {
            return Err(format!(
                "the model cache {} cannot take {incoming} more bytes: {held} are held by files the plan needs, \
                 of at most {} (--model-cache-bytes)",
                self.dir.display(),
                self.max_bytes
            ));
        }
        Ok(())
    }
}

/// Fetches model files from the controller replicas into the cache.
pub struct Fetcher {
    pub controllers: Vec<String>,
    pub security: Security,
    pub cache: Arc<ModelCache>,
    /// Attempts by outcome, and the bytes kept (`tidal_agent_model_fetches`, `…_fetched_bytes`).
    pub attempts: Family<FetchLabels, Counter>,
    pub fetched_bytes: Counter,
}

impl Fetcher {
    /// Fetches the file of digest `sha256`, named `model_files` by the variants that use it,
    /// from the first replica that sends it whole and right under one of them, making room
    /// for it without removing the digests in `keep`.
    pub async fn fetch(&self, model_files: &[String], sha256: &str, keep: &HashSet<String>) -> Result<PathBuf, String> {
        let mut failures = Vec::new();
        for controller in &self.controllers {
            for model_file in model_files {
                match self.fetch_from(controller, model_file, sha256, keep).await {
                    Ok((path, bytes)) => {
                        self.attempts.get_or_create(&FetchLabels { outcome: "fetched" }).inc();
                        self.fetched_bytes.inc_by(bytes);
                        info!(%controller, %model_file, bytes, "model file fetched and its SHA-256 checked");
                        return Ok(path);
                    }
                    Err(why) => {
                        self.attempts.get_or_create(&FetchLabels { outcome: "failed" }).inc();
                        warn!(%controller, %model_file, "fetching the model file failed: {why}");
                        failures.push(format!("{controller} {model_file:?}: {why}"));
                    }
                }
            }
        }
        Err(failures.join("; "))
    }

    async fn fetch_from(
        &self,
        controller: &str,
        model_file: &str,
        sha256: &str,
        keep: &HashSet<String>,
    ) -> Result<(PathBuf, u64), String> {
        let channel = self
            .security
            .endpoint(controller)
            .map_err(|e| e.to_string())?
            .connect_timeout(CONNECT_TIMEOUT)
            .connect()
            .await
            .map_err(|e| format!("connecting: {e}"))?;
        let request = FetchModelRequest { model_file: model_file.to_string(), sha256: sha256.to_string() };
        let mut stream = ControllerClient::new(channel)
            .fetch_model(request)
            .await
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
            .into_inner();
        let partial = self.cache.partial_of(sha256);
        let received: Result<(PathBuf, u64), String> = async {
            let first = next_chunk(&mut stream).await?.ok_or("the stream ended before any data")?;
            let total = first.total_bytes;
            let (cache, kept) = (self.cache.clone(), keep.clone());
            tokio::task::spawn_blocking(move || cache.make_room(total, &kept)).await.map_err(|e| e.to_string())??;
            let mut file =
                tokio::fs::File::create(&partial).await.map_err(|e| format!("creating {}: {e}", partial.display()))?;
            let (mut got, mut digest) = (0u64, Sha256::default());
            let mut chunk = Some(first);
            while let Some(c) = chunk {
                got += c.data.len() as u64;
                if got > total {
                    return Err(format!("more than the {total} bytes announced"));
                }
                digest.update(&c.data);
                file.write_all(&c.data).await.map_err(|e| format!("writing {}: {e}", partial.display()))?;
                chunk = next_chunk(&mut stream).await?;
            }
            if got < total {
                return Err(format!("truncated: {got} of {total} bytes"));
            }
            let received = digest.finish();
            if received != sha256 {
                return Err(format!(
                    "corrupt: the bytes received have SHA-256 {received}, not the registered {sha256}"
                ));
            }
            file.flush().await.map_err(|e| format!("writing {}: {e}", partial.display()))?;
            file.sync_all().await.map_err(|e| format!("writing {}: {e}", partial.display()))?;
            let path = self.cache.path_of(sha256);
            tokio::fs::rename(&partial, &path).await.map_err(|e| format!("keeping {}: {e}", path.display()))?;
            Ok((path, got))
        }
        .await;
        if received.is_err() {
            let _ = tokio::fs::remove_file(&partial).await;
        }
        received
    }
}

/// The next chunk, or none at the end; an error when the replica fails or stops sending.
async fn next_chunk(stream: &mut tonic::Streaming<ModelChunk>) -> Result<Option<ModelChunk>, String> {
    match tokio::time::timeout(CHUNK_TIMEOUT, stream.message()).await {
        Err(_) => Err(format!("no data for {CHUNK_TIMEOUT:?}")),
        Ok(Err(s)) => Err(format!("{:?}: {}", s.code(), s.message())),
        Ok(Ok(chunk)) => Ok(chunk),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_aged(cache: &ModelCache, sha: &str, len: usize, age_s: u64) {
        let path = cache.path_of(sha);
        std::fs::write(&path, vec![0u8; len]).unwrap();
        let file = std::fs::File::options().append(true).open(&path).unwrap();
        file.set_modified(SystemTime::now() - Duration::from_secs(age_s)).unwrap();
    }

    #[test]
    fn room_is_made_least_recently_used_first_and_never_from_what_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(format!("{PARTIAL}x")), b"left by a stopped agent").unwrap();
        let cache = ModelCache::open(dir.path().to_path_buf(), 100).unwrap();
        assert!(!dir.path().join(format!("{PARTIAL}x")).exists(), "an interrupted download is removed");
        write_aged(&cache, "old", 40, 300);
        write_aged(&cache, "mid", 30, 200);
        write_aged(&cache, "new", 20, 100);
        cache.used(&cache.path_of("old")); // used now: the newest
        cache.make_room(40, &HashSet::new()).unwrap();
        assert!(!cache.path_of("mid").exists(), "the least recently used went");
        assert!(cache.path_of("old").exists() && cache.path_of("new").exists());
        // 60 held; 90 more cannot fit without "old", which is kept.
        let keep: HashSet<String> = ["old".to_string()].into();
        let refused = cache.make_room(90, &keep).unwrap_err();
        assert!(refused.contains("--model-cache-bytes"), "{refused}");
        assert!(cache.path_of("old").exists(), "a kept file stays");
        assert!(!cache.path_of("new").exists(), "what could go went");
        assert!(cache.make_room(101, &HashSet::new()).is_err(), "larger than the whole cache");
    }
}
