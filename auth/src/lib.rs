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

pub use guard::Guard;
pub use role::Role;
pub use tls::{Security, TlsArgs};
pub use token::Token;
