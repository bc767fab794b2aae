//! How tidalctl dials the cluster: one security setting (mutual TLS under an admin or reader
//! certificate, or explicit plaintext), read from the global flags when a command first
//! connects — commands that work offline need none.

use std::sync::OnceLock;
use std::time::Duration;

use anyhow::Context;
use tidal_auth::{Security, TlsArgs};
use tonic::transport::{Channel, Endpoint};

static ARGS: OnceLock<TlsArgs> = OnceLock::new();
static SECURITY: OnceLock<Security> = OnceLock::new();

/// Remembers the global TLS flags (called once, at start).
pub fn configure(args: TlsArgs) {
    let _ = ARGS.set(args);
}

fn security() -> anyhow::Result<&'static Security> {
    if let Some(s) = SECURITY.get() {
        return Ok(s);
    }
    let s = Security::from_args(ARGS.get().unwrap_or(&TlsArgs::default()))?;
    Ok(SECURITY.get_or_init(|| s))
}

/// How long reaching one address may take, TCP, TLS and HTTP/2 handshakes together: a
/// process that accepts connections but never answers (paused, wedged) costs no more. The
/// TCP connect alone has [`TCP_DEADLINE`].
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(3);
const TCP_DEADLINE: Duration = Duration::from_secs(2);

/// No answer from a server within its deadline, or from none of several addresses.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unreachable(pub String);

/// Connects `endpoint` within [`HANDSHAKE_DEADLINE`].
async fn connect(endpoint: Endpoint, addr: &str, what: &str) -> anyhow::Result<Channel> {
    match tokio::time::timeout(HANDSHAKE_DEADLINE, endpoint.connect_timeout(TCP_DEADLINE).connect()).await {
        Ok(connected) => connected
            .map_err(|e| explain(e.into(), addr))
            .with_context(|| format!("connecting to the {what} at {addr}")),
        Err(_) => Err(Unreachable(format!(
            "connecting to the {what} at {addr}: no answer within {HANDSHAKE_DEADLINE:?} (it accepted the \
             connection but not the TLS and HTTP/2 handshakes: a paused or overloaded process, or not a Tidal port)"
        ))
        .into()),
    }
}

/// One side speaks TLS and the other plaintext: a setting to change, not a server to wait for.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsMismatch(pub String);

/// `error` from a call to `addr`, with what to do when its cause is that one side speaks TLS
/// and the other plaintext (which shows only as a garbled record or a dropped connection).
pub fn explain(error: anyhow::Error, addr: &str) -> anyhow::Error {
    let text = format!("{error:#}");
    let plaintext = SECURITY.get().is_some_and(Security::is_plaintext);
    let hint = if !plaintext && (text.contains("InvalidContentType") || text.contains("corrupt message")) {
        Some(format!(
            "{addr} answers in plaintext and tidalctl speaks TLS: start the server with TLS, or give tidalctl \
             --insecure-plaintext (TIDAL_INSECURE_PLAINTEXT=1) for a local demo"
        ))
    } else if plaintext
        && ["broken pipe", "connection reset", "frame with invalid size", "connection closed", "h2 protocol error"]
            .iter()
            .any(|cue| text.to_lowercase().contains(cue))
    {
        Some(format!(
            "{addr} closed a plaintext connection: it probably takes TLS only; give tidalctl --tls-ca, --tls-cert \
             and --tls-key (TIDAL_TLS_*) instead of --insecure-plaintext"
        ))
    } else {
        None
    };
    match hint {
        Some(hint) => error.context(TlsMismatch(hint)),
        None => error,
    }
}

/// A channel to `addr` (host:port), connected.
pub async fn channel(addr: &str, what: &str) -> anyhow::Result<Channel> {
    connect(security()?.endpoint(addr)?, addr, what).await
}

/// A channel to `addr` that connects on first use and reconnects after a failure (for
/// clients that must outlive a server's restart).
pub fn lazy_channel(addr: &str) -> anyhow::Result<Channel> {
    Ok(security()?.endpoint(addr)?.connect_timeout(TCP_DEADLINE).connect_lazy())
}

/// Like [`channel`], with a timeout for every call.
pub async fn channel_with_timeout(addr: &str, what: &str, timeout: Duration) -> anyhow::Result<Channel> {
    connect(security()?.endpoint(addr)?.timeout(timeout), addr, what).await
}
