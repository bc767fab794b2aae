//! The daemons' listening sockets, bounded before any TLS or HTTP is spoken: how many
//! connections a port holds (in all and per peer address), how long one may stay silent, and
//! what happens at a limit (the connection silent the longest is closed to make room, or the
//! new one is refused; logged once per interval, never a busy loop).
//!
//! A connection is *silent* while no byte moves either way. Silence covers what costs an
//! attacker nothing and a server a descriptor: TCP connections that never start TLS, half-sent
//! ClientHellos, partial headers, unfinished bodies, idle HTTP/2 connections. A legitimate
//! HTTP/2 client is never silent for long: the servers ping every connection (see
//! [`HTTP2_KEEPALIVE`]) and its client answers.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use futures::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// How often the servers ping an HTTP/2 connection: well inside the default silence limit, so
/// that an idle but live client is never taken for a silent one.
pub const HTTP2_KEEPALIVE: Duration = Duration::from_secs(20);
/// A connection silent for less than this is never closed to make room: it is in use.
const IN_USE: Duration = Duration::from_secs(1);
/// Pause after an accept error (out of descriptors, say): the error would repeat at once.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// At most one log line per kind of refusal per port in this interval.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// The bounds of one listening port.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct EdgeLimits {
    /// Most connections one port holds at once; beyond it, the one silent the longest is
    /// closed to make room (or, if every one is in use, the new one is refused). Each takes a
    /// file descriptor: keep ports × this well under the process's descriptor limit.
    #[arg(long = "max-connections", env = "TIDAL_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,
    /// Most connections one peer address holds on one port, with the same rule.
    #[arg(long = "max-connections-per-peer", env = "TIDAL_MAX_CONNECTIONS_PER_PEER", default_value_t = 256)]
    pub max_per_peer: usize,
    /// Seconds a connection may stay silent (no byte either way) before it is closed.
    #[arg(long = "silent-timeout-s", env = "TIDAL_SILENT_TIMEOUT_S", default_value_t = 60.0)]
    pub silent_timeout_s: f64,
}

impl Default for EdgeLimits {
    fn default() -> Self {
        Self { max_connections: 1024, max_per_peer: 256, silent_timeout_s: 60.0 }
    }
}

impl EdgeLimits {
    /// Checks the flags: every bound positive and finite.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_connections == 0 || self.max_per_peer == 0 {
            return Err("--max-connections and --max-connections-per-peer must be positive".into());
        }
        if !(self.silent_timeout_s.is_finite() && (0.1..=86_400.0).contains(&self.silent_timeout_s)) {
            return Err("--silent-timeout-s must be within 0.1–86400 seconds".into());
        }
        Ok(())
    }

    fn silent_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.silent_timeout_s)
    }
}

/// What a connection shares with its listener: when it last moved a byte, and a way to close
/// it from outside (to make room).
struct Activity {
    /// Milliseconds from the listener's start to the last byte moved.
    last_ms: AtomicU64,
    closed: AtomicBool,
    waker: AtomicWaker,
}

struct Entry {
    peer: IpAddr,
    activity: Arc<Activity>,
}

/// The connections a port holds: owned by the listener, each removed by its connection's drop.
struct Table {
    started: Instant,
    conns: Mutex<HashMap<u64, Entry>>,
}

impl Table {
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }
}

/// A listening port under [`EdgeLimits`].
pub struct EdgeListener {
    listener: TcpListener,
    limits: EdgeLimits,
    port: &'static str,
    table: Arc<Table>,
    next_id: u64,
    last_log: HashMap<&'static str, Instant>,
}

impl EdgeListener {
    /// Binds `addr` (port 0 picks a free port) for the port named `port` (in logs).
    pub fn bind(addr: SocketAddr, limits: EdgeLimits, port: &'static str) -> io::Result<Self> {
        let std = std::net::TcpListener::bind(addr)?;
        std.set_nonblocking(true)?;
        let listener = TcpListener::from_std(std)?;
        let table = Arc::new(Table { started: Instant::now(), conns: Mutex::new(HashMap::new()) });
        Ok(Self { listener, limits, port, table, next_id: 0, last_log: HashMap::new() })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Connections held now.
    pub fn held(&self) -> usize {
        self.table.conns.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// The next connection admitted. Accept errors are logged and retried after a pause;
    /// connections beyond a limit are closed as the module says.
    pub async fn accept(&mut self) -> Conn {
        loop {
            let (io, peer) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    let port = self.port;
                    self.log_once(
                        "accept",
                        || tracing::warn!(port, error = %e, "accepting a connection failed; pausing"),
                    );
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            if let Some(conn) = self.admit(io, peer.ip()) {
                return conn;
            }
        }
    }

    /// The tonic form: an endless stream of admitted connections.
    pub fn incoming(self) -> impl futures::Stream<Item = io::Result<Conn>> + Send + 'static {
        futures::stream::unfold(self, |mut listener| async move {
            let conn = listener.accept().await;
            Some((Ok(conn), listener))
        })
    }

    /// [`Self::incoming`] behind TLS of this process's own (see
    /// `tidal_auth::Security::tls_acceptor`): handshakes run side by side, each within
    /// `handshake` (and the silence limit), so that a slow or stalled one holds up no other
    /// connection; one that fails is logged once per interval and dropped. No task is
    /// spawned: the handshakes are futures of this stream, which the server polls.
    pub fn incoming_tls(
        self,
        acceptor: TlsAcceptor,
        handshake: Duration,
    ) -> impl futures::Stream<Item = io::Result<TlsStream<Conn>>> + Send + 'static {
        type Handshake = Pin<Box<dyn Future<Output = io::Result<TlsStream<Conn>>> + Send>>;
        let handshakes: FuturesUnordered<Handshake> = FuturesUnordered::new();
        futures::stream::unfold((self, handshakes), move |(mut listener, mut handshakes)| {
            let acceptor = acceptor.clone();
            async move {
                loop {
                    // At most as many handshakes as connections the port holds: the limits
                    // bound this set too.
                    tokio::select! {
                        conn = listener.accept() => {
                            let accept = acceptor.accept(conn);
                            handshakes.push(Box::pin(async move {
                                tokio::time::timeout(handshake, accept)
                                    .await
                                    .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out")))
                            }));
                        }
                        Some(done) = handshakes.next(), if !handshakes.is_empty() => match done {
                            Ok(tls) => return Some((Ok(tls), (listener, handshakes))),
                            Err(e) => {
                                let port = listener.port;
                                listener.log_once("handshake", || {
                                    tracing::info!(port, error = %e, "a TLS handshake failed (logged once per interval)")
                                });
                            }
                        },
                    }
                }
            }
        })
    }

    fn admit(&mut self, io: TcpStream, peer: IpAddr) -> Option<Conn> {
        let now = self.table.now_ms();
        let refused = {
            let mut conns = self.table.conns.lock().unwrap_or_else(|p| p.into_inner());
            let from_peer = conns.values().filter(|e| e.peer == peer).count();
            let full = if from_peer >= self.limits.max_per_peer {
                Some(("per_peer", Some(peer)))
            } else if conns.len() >= self.limits.max_connections {
                Some(("total", None))
            } else {
                None
            };
            match full {
                None => None,
                Some((limit, only)) => match make_room(&mut conns, only, now) {
                    true => None,
                    false => Some(limit),
                },
            }
        };
        if let Some(limit) = refused {
            let (port, max) = (self.port, self.limits);
            self.log_once(limit, || {
                tracing::warn!(port, %peer, limit, max_connections = max.max_connections, max_per_peer = max.max_per_peer,
                    "connection refused: every connection held is in use");
            });
            return None;
        }
        let _ = io.set_nodelay(true);
        let activity = Arc::new(Activity {
            last_ms: AtomicU64::new(now),
            closed: AtomicBool::new(false),
            waker: AtomicWaker::new(),
        });
        self.next_id += 1;
        let id = self.next_id;
        let entry = Entry { peer, activity: activity.clone() };
        self.table.conns.lock().unwrap_or_else(|p| p.into_inner()).insert(id, entry);
        let silent = self.limits.silent_timeout();
        Some(Conn {
            io,
            id,
            activity,
            table: self.table.clone(),
            silent,
            deadline: Box::pin(tokio::time::sleep(silent)),
        })
    }

    fn log_once(&mut self, kind: &'static str, log: impl FnOnce()) {
        let now = Instant::now();
        if self.last_log.get(kind).is_none_or(|t| now.duration_since(*t) >= LOG_EVERY) {
            self.last_log.insert(kind, now);
            log();
        }
    }
}

/// Closes the connection silent the longest (of `only`'s, if given) if it has been silent
/// for [`IN_USE`] at least; true if one was.
fn make_room(conns: &mut HashMap<u64, Entry>, only: Option<IpAddr>, now_ms: u64) -> bool {
    let oldest = conns
        .iter()
        .filter(|(_, e)| only.is_none_or(|p| e.peer == p) && !e.activity.closed.load(Ordering::Relaxed))
        .min_by_key(|(_, e)| e.activity.last_ms.load(Ordering::Relaxed))
        .map(|(id, e)| (*id, e.activity.clone()));
    match oldest {
        Some((id, activity))
            if now_ms.saturating_sub(activity.last_ms.load(Ordering::Relaxed)) >= IN_USE.as_millis() as u64 =>
        {
            activity.closed.store(true, Ordering::Relaxed);
            activity.waker.wake();
            // Out of the count now: its socket closes as soon as its server notices.
            conns.remove(&id);
            true
        }
        _ => false,
    }
}

impl axum::serve::Listener for EdgeListener {
    type Io = Conn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Conn, SocketAddr) {
        let conn = EdgeListener::accept(self).await;
        let peer = conn.io.peer_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        (conn, peer)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// An admitted connection: closed with an error once silent past the limit, or when its
/// listener closes it to make room.
pub struct Conn {
    io: TcpStream,
    id: u64,
    activity: Arc<Activity>,
    table: Arc<Table>,
    silent: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl Conn {
    fn moved(&mut self) {
        self.activity.last_ms.store(self.table.now_ms(), Ordering::Relaxed);
        let next = tokio::time::Instant::now() + self.silent;
        self.deadline.as_mut().reset(next);
    }

    /// An error if the connection must close: closed to make room, or silent too long.
    fn check(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        self.activity.waker.register(cx.waker());
        if self.activity.closed.load(Ordering::Relaxed) {
            return Some(io::Error::new(io::ErrorKind::ConnectionAborted, "closed to make room for a new connection"));
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            return Some(io::Error::new(io::ErrorKind::TimedOut, "connection silent past --silent-timeout-s"));
        }
        None
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.table.conns.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.id);
    }
}

impl AsyncRead for Conn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    self.moved();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match self.check(cx) {
                Some(e) => Poll::Ready(Err(e)),
                None => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        if self.activity.closed.load(Ordering::Relaxed) {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::ConnectionAborted, "closed to make room")));
        }
        match Pin::new(&mut self.io).poll_write(cx, data) {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    self.moved();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Pending => match self.check(cx) {
                Some(e) => Poll::Ready(Err(e)),
                None => Poll::Pending,
            },
            other => other,
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn limits(max_connections: usize, max_per_peer: usize, silent_timeout_s: f64) -> EdgeLimits {
        EdgeLimits { max_connections, max_per_peer, silent_timeout_s }
    }

    /// Echoes every admitted connection until it errs or ends.
    fn echo(mut listener: EdgeListener) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                let mut conn = listener.accept().await;
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while let Ok(n) = conn.read(&mut buf).await {
                        if n == 0 || conn.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        })
    }

    async fn closed(stream: &mut TcpStream, within: Duration) -> bool {
        let mut buf = [0u8; 8];
        matches!(tokio::time::timeout(within, stream.read(&mut buf)).await, Ok(Ok(0)) | Ok(Err(_)))
    }

    async fn echoes(stream: &mut TcpStream) -> bool {
        let mut buf = [0u8; 4];
        stream.write_all(b"ping").await.is_ok()
            && matches!(tokio::time::timeout(Duration::from_secs(2), stream.read_exact(&mut buf)).await, Ok(Ok(_)))
    }

    #[tokio::test]
    async fn a_silent_connection_is_closed_and_a_talking_one_is_not() {
        let listener = EdgeListener::bind("127.0.0.1:0".parse().unwrap(), limits(8, 8, 0.3), "test").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = echo(listener);
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let mut talking = TcpStream::connect(addr).await.unwrap();
        let started = Instant::now();
        while started.elapsed() < Duration::from_millis(600) {
            assert!(echoes(&mut talking).await, "a connection that talks stays open");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(closed(&mut silent, Duration::from_secs(2)).await, "the silent one is closed");
        server.abort();
    }

    #[tokio::test]
    async fn at_the_limit_the_longest_silent_connection_makes_room() {
        let listener = EdgeListener::bind("127.0.0.1:0".parse().unwrap(), limits(3, 3, 60.0), "test").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = echo(listener);
        let mut first = TcpStream::connect(addr).await.unwrap();
        let mut held = Vec::new();
        for _ in 0..2 {
            held.push(TcpStream::connect(addr).await.unwrap());
        }
        // All three silent for more than IN_USE, the first the longest; then a fourth comes.
        tokio::time::sleep(IN_USE + Duration::from_millis(300)).await;
        for h in &mut held {
            assert!(echoes(h).await);
        }
        let mut fourth = TcpStream::connect(addr).await.unwrap();
        assert!(echoes(&mut fourth).await, "the new connection is served");
        assert!(closed(&mut first, Duration::from_secs(2)).await, "the longest silent one was closed");
        for h in &mut held {
            assert!(echoes(h).await, "the others stay");
        }
        server.abort();
    }

    #[tokio::test]
    async fn when_every_connection_is_in_use_a_new_one_is_refused_without_spinning() {
        let listener = EdgeListener::bind("127.0.0.1:0".parse().unwrap(), limits(2, 2, 60.0), "test").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = echo(listener);
        let mut a = TcpStream::connect(addr).await.unwrap();
        let mut b = TcpStream::connect(addr).await.unwrap();
        assert!(echoes(&mut a).await && echoes(&mut b).await);
        let mut refused = TcpStream::connect(addr).await.unwrap();
        assert!(closed(&mut refused, Duration::from_secs(2)).await, "a third is closed at once");
        assert!(echoes(&mut a).await && echoes(&mut b).await, "the two in use are untouched");
        drop(a);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        assert!(echoes(&mut c).await, "a closed connection frees its place");
        server.abort();
    }

    #[tokio::test]
    async fn one_peer_is_held_to_its_own_share() {
        let listener = EdgeListener::bind("127.0.0.1:0".parse().unwrap(), limits(100, 2, 60.0), "test").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = echo(listener);
        let mut a = TcpStream::connect(addr).await.unwrap();
        let mut b = TcpStream::connect(addr).await.unwrap();
        assert!(echoes(&mut a).await && echoes(&mut b).await);
        let mut third = TcpStream::connect(addr).await.unwrap();
        assert!(closed(&mut third, Duration::from_secs(2)).await, "127.0.0.1 holds two at most");
        server.abort();
    }

    #[test]
    fn bounds_are_checked() {
        assert!(limits(0, 1, 1.0).validate().is_err());
        assert!(limits(1, 0, 1.0).validate().is_err());
        assert!(limits(1, 1, f64::NAN).validate().is_err());
        assert!(limits(1, 1, 0.0).validate().is_err());
        assert!(EdgeLimits::default().validate().is_ok());
    }
}
