//! Who is who in a Tidal cluster, and who may call what.
//!
//! Every daemon and `tidalctl` holds a certificate signed by the cluster's CA ([`certs`]);
//! its identity is a role ([`Role`]: a controller replica id, an agent's node name, an admin,
//! a read-only reader) written as a `tidal://…` URI in the certificate's subject alternative
//! names. Connections use mutual TLS ([`tls`]), and each RPC states which roles may call it
//! ([`Guard`]). Plaintext is possible only when explicitly asked for (a local demo); it
//! authenticates nobody.

pub mod certs;
pub mod guard;
pub mod role;
pub mod tls;
pub mod token;

pub use guard::{Guard, RevocationList, Revocations};

/// Warns, loudly, when a secret file (a private key, a token) can be read by its group or by
/// other users (mode beyond 0600): they could then act as this process.
pub fn warn_if_exposed(path: &std::path::Path, what: &str) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{mode:04o}"),
                "{what} is readable by other users; make it 0600 (chmod 600)"
            );
        }
    }
}
pub use role::{normalise_serial, Holder, Role};
pub use tls::{Security, TlsArgs};
pub use token::Token;
