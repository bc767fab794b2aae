//! The model files a replica sends to agents that lack them (`Controller.FetchModel`): from
//! its own `--model-dir`, laid out as the agents' model directories, only files that a kept
//! version of a task names with the digest asked for, a bounded number at once, in chunks.
//! The replica does not check the digest itself: the agent checks what it received, and
//! refuses a copy that differs (and then asks another replica).

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tidal_proto::v1::ModelChunk;
use tokio::io::AsyncReadExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;

/// Bytes per chunk: a quarter of gRPC's default message limit.
pub const CHUNK_BYTES: usize = 1 << 20;
/// Files sent at once by one replica; more fetches are refused (RESOURCE_EXHAUSTED) and
/// retried by their agents, rather than each getting a slower share of the disk and network.
pub const MAX_SENDING: usize = 16;

pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<ModelChunk, Status>> + Send>>;

pub struct ModelStore {
    dir: PathBuf,
    sending: Arc<Semaphore>,
}

impl ModelStore {
    pub fn new(dir: PathBuf) -> Self {
        Self { dir, sending: Arc::new(Semaphore::new(MAX_SENDING)) }
    }

    /// `model_file` (relative, as a variant names it) as a stream of chunks, the first with
    /// the file's size. NOT_FOUND when this replica has no such file in its directory.
    pub async fn send(&self, model_file: &str) -> Result<ChunkStream, Status> {
        let permit = self.sending.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!("this replica sends {MAX_SENDING} model files already; try again"))
        })?;
        let not_here = || Status::not_found(format!("this replica has no {model_file:?} in {}", self.dir.display()));
        let path = self.dir.join(model_file);
        // A symbolic link may point anywhere: what it leads to must be in the directory too.
        let (real, dir) = match (tokio::fs::canonicalize(&path).await, tokio::fs::canonicalize(&self.dir).await) {
            (Ok(real), Ok(dir)) => (real, dir),
            _ => return Err(not_here()),
        };
        if !real.starts_with(&dir) {
            return Err(Status::not_found(format!("{model_file:?} leads out of {}", self.dir.display())));
        }
        let file = tokio::fs::File::open(&real).await.map_err(|_| not_here())?;
        let meta = file.metadata().await.map_err(|e| Status::internal(format!("{model_file:?}: {e}")))?;
        if !meta.is_file() {
            return Err(not_here());
        }
        Ok(chunks(file, meta.len(), permit))
    }
}

/// The file read a chunk at a time as the stream is polled (nothing read ahead of the
/// client), holding its sending permit until the stream ends or is dropped.
fn chunks(file: tokio::fs::File, total: u64, permit: OwnedSemaphorePermit) -> ChunkStream {
    struct Sending {
        file: tokio::fs::File,
        first: bool,
        _permit: OwnedSemaphorePermit,
    }
    let start = Sending { file, first: true, _permit: permit };
    Box::pin(futures::stream::unfold(Some(start), move |state| async move {
        let mut s = state?;
        let mut data = vec![0u8; CHUNK_BYTES];
        let mut filled = 0;
        while filled < data.len() {
            match s.file.read(&mut data[filled..]).await {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) => return Some((Err(Status::internal(format!("reading the model file: {e}"))), None)),
            }
        }
        if filled == 0 && !s.first {
            return None;
        }
        data.truncate(filled);
        let chunk = ModelChunk { data, total_bytes: if s.first { total } else { 0 } };
        s.first = false;
        // A short read is the end of the file.
        let next = (filled == CHUNK_BYTES).then_some(s);
        Some((Ok(chunk), next))
    }))
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;

    async fn received(store: &ModelStore, file: &str) -> Result<(u64, Vec<u8>, usize), Status> {
        let mut stream = store.send(file).await?;
        let (mut total, mut bytes, mut chunks) = (None, Vec::new(), 0);
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            total.get_or_insert(chunk.total_bytes);
            bytes.extend_from_slice(&chunk.data);
            chunks += 1;
        }
        Ok((total.unwrap_or_default(), bytes, chunks))
    }

    #[tokio::test]
    async fn a_file_is_sent_whole_in_chunks_and_nothing_outside_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModelStore::new(dir.path().join("models"));
        std::fs::create_dir_all(dir.path().join("models/sub")).unwrap();
        let body: Vec<u8> = (0..(2 * CHUNK_BYTES + 5) as u32).map(|i| (i % 253) as u8).collect();
        std::fs::write(dir.path().join("models/sub/m.onnx"), &body).unwrap();
        std::fs::write(dir.path().join("models/exact.onnx"), vec![7u8; CHUNK_BYTES]).unwrap();
        std::fs::write(dir.path().join("models/empty.onnx"), b"").unwrap();
        std::fs::write(dir.path().join("secret"), b"not a model").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), dir.path().join("models/link.onnx")).unwrap();

        let (total, bytes, chunks) = received(&store, "sub/m.onnx").await.unwrap();
        assert_eq!((total, chunks), (body.len() as u64, 3));
        assert!(bytes == body, "the bytes as stored");
        assert_eq!(received(&store, "exact.onnx").await.unwrap().2, 1, "no empty chunk after a full one");
        assert_eq!(received(&store, "empty.onnx").await.unwrap(), (0, Vec::new(), 1));
        for outside in ["link.onnx", "../secret", "missing.onnx", "sub"] {
            let e = received(&store, outside).await.unwrap_err();
            assert_eq!(e.code(), tonic::Code::NotFound, "{outside}: {e}");
        }
    }

    #[tokio::test]
    async fn at_most_max_sending_files_go_at_once() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("m.onnx"), b"model").unwrap();
        let store = ModelStore::new(dir.path().to_path_buf());
        let mut open = Vec::new();
        for _ in 0..MAX_SENDING {
            open.push(store.send("m.onnx").await.unwrap());
        }
        let e = store.send("m.onnx").await.err().expect("one more is refused");
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        drop(open.pop());
        assert!(store.send("m.onnx").await.is_ok(), "a stream dropped frees its place");
    }
}
