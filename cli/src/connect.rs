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

/// Connects `endpoint` within [`HANDSHAKE_DEADLINE`].
async fn connect(endpoint: Endpoint, addr: &str, what: &str) -> anyhow::Result<Channel> {
    match tokio::time::timeout(HANDSHAKE_DEADLINE, endpoint.connect_timeout(TCP_DEADLINE).connect()).await {
        Ok(connected) => connected.with_context(|| format!("connecting to the {what} at {addr}")),
        Err(_) => anyhow::bail!(
            "connecting to the {what} at {addr}: no answer within {HANDSHAKE_DEADLINE:?} (it accepted the \
             connection but not the TLS and HTTP/2 handshakes: a paused or overloaded process, or not a Tidal port)"
        ),
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
