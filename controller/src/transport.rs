//! Raft messages between controller replicas over gRPC.
//!
//! Outbound: one tokio task per peer drains that peer's queue into batches and sends them; a
//! failed send is dropped (Raft retransmits), reported to raft-rs as unreachable (and any
//! snapshot in it or dropped after it as failed), and the task backs off before the next
//! attempt. How a send went reaches the Raft driver through the [`FeedbackSink`] it gives.
//! Inbound: the `peer_service` module.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use protobuf::Message as _;
use raft::prelude::{Message, MessageType};
use tidal_proto::v1::raft_transport_client::RaftTransportClient;
use tidal_proto::v1::RaftBatch;
use tokio::sync::mpsc as tmpsc;
use tokio::task::JoinSet;
use tonic::transport::Channel;
use tonic::Status;
use tracing::{debug, warn};

use tidal_auth::Security;

/// Largest Raft batch or snapshot accepted over the wire.
pub const MAX_MESSAGE_BYTES: usize = 256 << 20;
const MAX_BATCH: usize = 256;
/// Messages that may wait for one peer: four batches. A peer that falls this far behind is
/// down or slow; what does not fit is dropped and the peer reported unreachable (Raft sends
/// again what is still needed), so a dead peer holds a bounded amount of memory.
const PEER_QUEUE: usize = 4 * MAX_BATCH;
const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// A peer that does not answer within this is treated as unreachable (a cut link would
/// otherwise hold its queue for a TCP timeout).
const SEND_TIMEOUT: Duration = Duration::from_secs(2);

/// A replica's addresses as `--peers`, membership changes and the address book write them:
/// `API/PEER`, its API port (agents, tidalctl) and its Raft peer port. A lone address is a
/// replica from before the two were separated, serving Raft on its API port.
pub fn split_address(address: &str) -> (&str, &str) {
    address.split_once('/').unwrap_or((address, address))
}

/// Checks `API/PEER` (both `ip:port`) and returns it as written.
pub fn parse_replica_address(s: &str) -> Result<String, String> {
    let (api, peer) = s.split_once('/').ok_or_else(|| format!("{s:?} is not API_HOST:PORT/PEER_HOST:PORT"))?;
    for a in [api, peer] {
        a.parse::<std::net::SocketAddr>().map_err(|_| format!("{a:?} (in {s:?}) is not an ip:port address"))?;
    }
    Ok(s.to_string())
}

/// Raft id → addresses (`API/PEER`) of every replica this one knows of.
#[derive(Clone, Default)]
pub struct AddressBook(Arc<RwLock<BTreeMap<u64, String>>>);

impl AddressBook {
    pub fn new(entries: impl IntoIterator<Item = (u64, String)>) -> Self {
        Self(Arc::new(RwLock::new(entries.into_iter().collect())))
    }

    pub fn get(&self, id: u64) -> Option<String> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).get(&id).cloned()
    }

    /// Where replica `id` serves the API.
    pub fn api(&self, id: u64) -> Option<String> {
        self.get(id).map(|a| split_address(&a).0.to_string())
    }

    /// Where replica `id` takes Raft messages.
    pub fn peer(&self, id: u64) -> Option<String> {
        self.get(id).map(|a| split_address(&a).1.to_string())
    }

    pub fn set(&self, id: u64, address: &str) {
        let mut book = self.0.write().unwrap_or_else(|p| p.into_inner());
        if book.get(&id).is_none_or(|a| a != address) {
            book.insert(id, address.to_string());
        }
    }

    pub fn all(&self) -> BTreeMap<u64, String> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Raft id → the serial of the certificate that replica last sent a Raft batch with.
#[derive(Clone, Default)]
pub struct SeenCertificates(Arc<RwLock<BTreeMap<u64, String>>>);

impl SeenCertificates {
    pub fn saw(&self, id: u64, serial: &str) {
        let mut seen = self.0.write().unwrap_or_else(|p| p.into_inner());
        if seen.get(&id).is_none_or(|s| s != serial) {
            seen.insert(id, serial.to_string());
        }
    }

    pub fn get(&self, id: u64) -> Option<String> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).get(&id).cloned()
    }
}

/// What a peer task tells the Raft driver about its sends.
pub enum Feedback {
    Unreachable(u64),
    SnapshotSent { to: u64, ok: bool },
}

/// Why a [`FeedbackSink`] did not take a feedback.
pub enum Refused {
    /// The driver's queue is full: the feedback is handed back.
    Full(Feedback),
    /// The driver is gone.
    Closed,
}

/// Where the peers' tasks tell the Raft driver how their sends went (its input queue).
pub type FeedbackSink = Arc<dyn Fn(Feedback) -> Result<(), Refused> + Send + Sync>;

/// The outbound side, owned by the Raft driver.
pub struct Outbound {
    me: u64,
    my_address: String,
    book: AddressBook,
    security: Security,
    runtime: tokio::runtime::Handle,
    feedback: FeedbackSink,
    peers: HashMap<u64, tmpsc::Sender<Message>>,
    /// Each peer's sending task: owned here, so that they end with the driver that owns this
    /// (a task still sending is aborted; Raft sends again).
    tasks: JoinSet<()>,
}

/// Why a batch did not reach its peer.
#[derive(Debug, thiserror::Error)]
enum SendError {
    #[error("no address known for replica {0}")]
    NoAddress(u64),
    #[error("bad peer address: {0}")]
    Address(String),
    #[error("encoding a message: {0}")]
    Encode(#[from] protobuf::ProtobufError),
    /// The peer answered and refused who this replica is (its certificate, role or
    /// membership): not a peer that is down, and worth an operator's eye.
    #[error("the peer refused this replica: {0}")]
    Refused(Status),
    #[error("{0}")]
    Failed(Status),
}

impl From<Status> for SendError {
    fn from(s: Status) -> Self {
        match s.code() {
            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => Self::Refused(s),
            _ => Self::Failed(s),
        }
    }
}

/// Where the Raft driver's messages go: each peer's queue of the gRPC transport
/// ([`Outbound`]), or a test's simulated network.
pub trait Network: Send {
    /// Queues each message for its peer; returns those that found no room.
    fn send(&mut self, messages: Vec<Message>) -> Vec<Dropped>;
}

/// A message that found its peer's queue full.
pub struct Dropped {
    pub to: u64,
    pub snapshot: bool,
}

impl Outbound {
    pub fn new(
        me: u64,
        my_address: String,
        book: AddressBook,
        security: Security,
        runtime: tokio::runtime::Handle,
        feedback: FeedbackSink,
    ) -> Self {
        Self { me, my_address, book, security, runtime, feedback, peers: HashMap::new(), tasks: JoinSet::new() }
    }
}

impl Network for Outbound {
    fn send(&mut self, messages: Vec<Message>) -> Vec<Dropped> {
        // Reaps the peer tasks that ended (their queue closed).
        while self.tasks.try_join_next().is_some() {}
        let mut dropped = Vec::new();
        for m in messages {
            let to = m.to;
            let queue = self.peers.entry(to).or_insert_with(|| {
                let (tx, rx) = tmpsc::channel(PEER_QUEUE);
                let peer = Peer {
                    to,
                    me: self.me,
                    my_address: self.my_address.clone(),
                    book: self.book.clone(),
                    security: self.security.clone(),
                    feedback: self.feedback.clone(),
                };
                self.tasks.spawn_on(peer.run(rx), &self.runtime);
                tx
            });
            match queue.try_send(m) {
                Ok(()) => {}
                Err(tmpsc::error::TrySendError::Full(m)) => {
                    dropped.push(Dropped { to, snapshot: m.get_msg_type() == MessageType::MsgSnapshot });
                }
                Err(tmpsc::error::TrySendError::Closed(_)) => {
                    self.peers.remove(&to);
                }
            }
        }
        dropped
    }
}

struct Peer {
    to: u64,
    me: u64,
    my_address: String,
    book: AddressBook,
    security: Security,
    feedback: FeedbackSink,
}

impl Peer {
    async fn run(self, mut rx: tmpsc::Receiver<Message>) {
        let mut client: Option<(String, RaftTransportClient<Channel>)> = None;
        let mut backoff = MIN_BACKOFF;
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
            }
            let snapshots = batch.iter().any(|m| m.get_msg_type() == MessageType::MsgSnapshot);
            match self.send(&mut client, &batch).await {
                Ok(()) => {
                    backoff = MIN_BACKOFF;
                    if snapshots {
                        self.report(Feedback::SnapshotSent { to: self.to, ok: true }).await;
                    }
                }
                Err(reason) => {
                    if matches!(reason, SendError::Refused(_)) {
                        warn!(to = self.to, %reason, "raft send refused: check this replica's certificate and membership");
                    } else {
                        debug!(to = self.to, %reason, "raft send failed");
                    }
                    self.report(Feedback::Unreachable(self.to)).await;
                    if snapshots {
                        self.report(Feedback::SnapshotSent { to: self.to, ok: false }).await;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    // What queued meanwhile is stale; Raft sends what is still needed again.
                    // A snapshot among it must be reported failed: until raft-rs hears how a
                    // snapshot went, it sends that follower nothing more.
                    let mut dropped_snapshot = false;
                    while let Ok(m) = rx.try_recv() {
                        dropped_snapshot |= m.get_msg_type() == MessageType::MsgSnapshot;
                    }
                    if dropped_snapshot {
                        self.report(Feedback::SnapshotSent { to: self.to, ok: false }).await;
                    }
                }
            }
        }
    }

    async fn send(
        &self,
        client: &mut Option<(String, RaftTransportClient<Channel>)>,
        batch: &[Message],
    ) -> Result<(), SendError> {
        let address = self.book.peer(self.to).ok_or(SendError::NoAddress(self.to))?;
        if client.as_ref().is_none_or(|(a, _)| *a != address) {
            let endpoint = self.security.endpoint(&address).map_err(|e| SendError::Address(e.to_string()))?;
            let channel = endpoint.connect_timeout(SEND_TIMEOUT / 4).timeout(SEND_TIMEOUT).connect_lazy();
            let c = RaftTransportClient::new(channel)
                .max_encoding_message_size(MAX_MESSAGE_BYTES)
                .max_decoding_message_size(MAX_MESSAGE_BYTES);
            *client = Some((address, c));
        }
        let Some((_, c)) = client.as_mut() else { return Err(SendError::NoAddress(self.to)) };
        let messages = batch.iter().map(|m| m.write_to_bytes()).collect::<Result<Vec<_>, _>>()?;
        let req = RaftBatch { from: self.me, from_address: self.my_address.clone(), messages };
        c.send(req).await?;
        Ok(())
    }

    /// Tells the driver how a send went. Unreachability is advice, dropped when the driver's
    /// queue is full (the next failure says it again); how a snapshot went is waited to be
    /// heard, as raft-rs sends that follower nothing more until it hears.
    async fn report(&self, mut f: Feedback) {
        loop {
            match (self.feedback)(f) {
                Ok(()) | Err(Refused::Closed) => return,
                Err(Refused::Full(Feedback::Unreachable(_))) => return,
                Err(Refused::Full(back)) => {
                    f = back;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// A sink into a queue of 16, as the driver's (of 4,096) is.
    fn sink() -> (FeedbackSink, mpsc::Receiver<Feedback>) {
        let (tx, rx) = mpsc::sync_channel(16);
        let sink: FeedbackSink = Arc::new(move |f| match tx.try_send(f) {
            Ok(()) => Ok(()),
            Err(mpsc::TrySendError::Full(f)) => Err(Refused::Full(f)),
            Err(mpsc::TrySendError::Disconnected(_)) => Err(Refused::Closed),
        });
        (sink, rx)
    }

    fn message(kind: MessageType) -> Message {
        let mut m = Message::default();
        m.set_msg_type(kind);
        m.to = 2;
        m
    }

    /// The next transport feedback within 5 s.
    async fn feedback(rx: &mpsc::Receiver<Feedback>) -> Option<Feedback> {
        for _ in 0..5000 {
            if let Ok(f) = rx.try_recv() {
                return Some(f);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        None
    }

    /// A peer's queue holds PEER_QUEUE messages; the rest are handed back to the driver,
    /// which reports the peer unreachable and a snapshot among them failed.
    #[tokio::test]
    async fn a_full_peer_queue_hands_back_what_does_not_fit() {
        let book = AddressBook::new([(2, "127.0.0.1:9/127.0.0.1:9".to_string())]);
        let (tx, _rx) = sink();
        let handle = tokio::runtime::Handle::current();
        let mut out = Outbound::new(1, "127.0.0.1:8/127.0.0.1:8".into(), book, Security::plaintext(), handle, tx);
        // One call, on this test's single thread: the peer's task has not run yet.
        let mut messages: Vec<Message> = (0..PEER_QUEUE + 2).map(|_| message(MessageType::MsgAppend)).collect();
        messages.push(message(MessageType::MsgSnapshot));
        let dropped = out.send(messages);
        assert_eq!(dropped.len(), 3);
        assert!(dropped.iter().all(|d| d.to == 2));
        assert_eq!(dropped.iter().filter(|d| d.snapshot).count(), 1, "the snapshot is named");
    }

    /// raft-rs stops replicating to a follower it sent a snapshot to until it hears how that
    /// went: a snapshot that never reaches the peer must be reported failed, also one dropped
    /// from the queue while the peer's task backs off, or the follower stays behind for good.
    #[tokio::test]
    async fn a_snapshot_dropped_while_backing_off_is_reported_failed() {
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = dead.local_addr().unwrap().to_string();
        drop(dead); // nothing listens there: every send fails at once
        let book = AddressBook::new([(2, format!("{addr}/{addr}"))]);
        let (tx, rx) = sink();
        let handle = tokio::runtime::Handle::current();
        let mut out = Outbound::new(1, "127.0.0.1:9/127.0.0.1:9".into(), book, Security::plaintext(), handle, tx);
        out.send(vec![message(MessageType::MsgAppend)]);
        assert!(matches!(feedback(&rx).await, Some(Feedback::Unreachable(2))));
        // The task now backs off; what queues meanwhile is dropped as stale.
        out.send(vec![message(MessageType::MsgSnapshot), message(MessageType::MsgHeartbeat)]);
        match feedback(&rx).await {
            Some(Feedback::SnapshotSent { to: 2, ok: false }) => {}
            Some(Feedback::Unreachable(_)) => panic!("the snapshot was sent again instead of dropped"),
            Some(Feedback::SnapshotSent { .. }) | None => panic!("the dropped snapshot was not reported"),
        }
    }
}
