//! A Raft group of replicas inside one process, each with its own sled store and the real
//! gRPC transport on loopback: for tests and benchmarks of the consensus layer alone.

use std::net::TcpListener;
use std::path::Path;
use std::time::Duration;

use crate::consensus::{start, RaftConfig, RaftHandle};
use crate::peer_service::RaftService;
use crate::storage::StorageError;
use crate::transport::AddressBook;

/// Starts `n` replicas (ids 1..=n) under `dir` with the default timing, in plaintext, each
/// serving Raft on one loopback port; call within a tokio runtime. The servers run until the
/// runtime stops.
pub fn start_local_group(dir: &Path, n: u64) -> Result<Vec<RaftHandle>, StorageError> {
    // Every port bound first and kept: each replica must know the others' addresses, and a
    // port found free and released could be taken before its replica binds it again.
    let mut listeners = Vec::new();
    for _ in 0..n {
        let l = TcpListener::bind("127.0.0.1:0").map_err(|e| StorageError::Raft(raft::Error::Io(e)))?;
        l.set_nonblocking(true).map_err(|e| StorageError::Raft(raft::Error::Io(e)))?;
        listeners.push(l);
    }
    let peers: Vec<(u64, String)> = listeners
        .iter()
        .zip(1..=n)
        .map(|(l, id)| (id, l.local_addr().map_or_else(|_| "127.0.0.1:0".into(), |a| a.to_string())))
        .collect();
    let mut handles = Vec::new();
    for (listener, (id, _)) in listeners.into_iter().zip(&peers) {
        let cfg = RaftConfig {
            id: *id,
            voters: (1..=n).collect(),
            peers: AddressBook::new(peers.clone()),
            security: tidal_auth::Security::plaintext(),
            tick: Duration::from_millis(50),
            election_ticks: 8,
            heartbeat_ticks: 2,
            snapshot_entries: 1000,
            accept_unverified_store: false,
        };
        let raft = start(cfg, &dir.join(format!("replica-{id}")))?;
        let server = tonic::transport::Server::builder()
            .add_service(RaftService::server(raft.clone(), tidal_auth::Guard::open()));
        let listener =
            tokio::net::TcpListener::from_std(listener).map_err(|e| StorageError::Raft(raft::Error::Io(e)))?;
        tokio::spawn(server.serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)));
        handles.push(raft);
    }
    Ok(handles)
}

/// Waits until one of `group` leads; None after `timeout`.
pub async fn wait_leader(group: &[RaftHandle], timeout: Duration) -> Option<RaftHandle> {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if let Some(l) = group.iter().find(|h| h.status().is_leader) {
            return Some(l.clone());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}
