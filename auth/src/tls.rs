//! Mutual TLS for every gRPC connection (rustls through tonic), or plaintext when explicitly
//! asked for. One [`Security`] per process serves its ports and dials its peers.

use std::path::PathBuf;
use std::sync::Arc;

use thiserror::Error;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};
use tracing::warn;

use crate::Role;

/// How long a server lets a client take over the TLS handshake before it closes the
/// connection (a half-sent ClientHello otherwise holds a descriptor indefinitely).
pub const TLS_HANDSHAKE: std::time::Duration = std::time::Duration::from_secs(10);

/// The flags every daemon and `tidalctl` take (also from the environment).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// The cluster CA's certificate (PEM): peers must present certificates it signed.
    #[arg(long, env = "TIDAL_TLS_CA", requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,
    /// This process's certificate (PEM), issued by `tidalctl certs issue`.
    #[arg(long, env = "TIDAL_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "TIDAL_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Use plaintext gRPC with no authentication at all: anyone who reaches a port may call
    /// anything. Only for a local demo on loopback.
    #[arg(long, env = "TIDAL_INSECURE_PLAINTEXT", conflicts_with_all = ["tls_ca", "tls_cert", "tls_key"])]
    pub insecure_plaintext: bool,
}

#[derive(Debug, Error)]
pub enum TlsError {
    #[error(
        "no TLS configured: give --tls-ca, --tls-cert and --tls-key (see `tidalctl certs --help`), or \
         --insecure-plaintext for a local demo"
    )]
    Missing,
    #[error("--tls-ca, --tls-cert and --tls-key go together")]
    Partial,
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Certificate(String),
    #[error("{0} is not a host:port address")]
    Address(String),
}

struct Mtls {
    ca: Certificate,
    identity: Identity,
    role: Role,
}

/// How this process talks: mutual TLS under its own identity, or explicitly plaintext.
#[derive(Clone)]
pub struct Security(Option<Arc<Mtls>>);

/// Whether a server port insists on a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// Control ports: every caller is someone.
    Required,
    /// The inference port: anyone may ask for a prediction; a caller with a certificate (an
    /// agent forwarding a stage) is still verified.
    Optional,
}

impl Security {
    pub fn from_args(args: &TlsArgs) -> Result<Self, TlsError> {
        if args.insecure_plaintext {
            warn!("plaintext gRPC with no authentication (--insecure-plaintext): for a local demo only");
            return Ok(Self::plaintext());
        }
        let (Some(ca), Some(cert), Some(key)) = (&args.tls_ca, &args.tls_cert, &args.tls_key) else {
            return Err(if args.tls_ca.is_some() || args.tls_cert.is_some() || args.tls_key.is_some() {
                TlsError::Partial
            } else {
                TlsError::Missing
            });
        };
        let read = |p: &PathBuf| std::fs::read(p).map_err(|source| TlsError::Read { path: p.clone(), source });
        crate::warn_if_exposed(key, "the TLS private key");
        let (ca_pem, cert_pem, key_pem) = (read(ca)?, read(cert)?, read(key)?);
        let role = Role::of_pem(&cert_pem).map_err(|e| TlsError::Certificate(format!("{}: {e}", cert.display())))?;
        Ok(Self(Some(Arc::new(Mtls {
            ca: Certificate::from_pem(ca_pem),
            identity: Identity::from_pem(cert_pem, key_pem),
            role,
        }))))
    }

    pub fn plaintext() -> Self {
        Self(None)
    }

    pub fn is_plaintext(&self) -> bool {
        self.0.is_none()
    }

    /// This process's own identity (none in plaintext).
    pub fn role(&self) -> Option<&Role> {
        self.0.as_ref().map(|m| &m.role)
    }

    /// The TLS a server port uses (none in plaintext).
    pub fn server(&self, auth: ClientAuth) -> Option<ServerTlsConfig> {
        self.0.as_ref().map(|m| {
            ServerTlsConfig::new()
                .timeout(TLS_HANDSHAKE)
                .identity(m.identity.clone())
                .client_ca_root(m.ca.clone())
                .client_auth_optional(auth == ClientAuth::Optional)
        })
    }

    /// A server builder for a port: TLS with client certificates as `auth` says, or plaintext.
    pub fn server_builder(&self, auth: ClientAuth) -> Result<tonic::transport::Server, TlsError> {
        let builder = tonic::transport::Server::builder();
        match self.server(auth) {
            Some(tls) => builder.tls_config(tls).map_err(|e| TlsError::Certificate(e.to_string())),
            None => Ok(builder),
        }
    }

    /// An endpoint for `address` (`host:port`): `https` with this identity and the cluster
    /// CA, or `http` in plaintext. The server's certificate must name the host.
    pub fn endpoint(&self, address: &str) -> Result<Endpoint, TlsError> {
        let bad = || TlsError::Address(address.to_string());
        let Some(m) = &self.0 else {
            return Endpoint::from_shared(format!("http://{address}")).map_err(|_| bad());
        };
        let endpoint = Endpoint::from_shared(format!("https://{address}")).map_err(|_| bad())?;
        let host = endpoint.uri().host().ok_or_else(bad)?.trim_matches(['[', ']']).to_string();
        let tls = ClientTlsConfig::new().ca_certificate(m.ca.clone()).identity(m.identity.clone()).domain_name(host);
        endpoint.tls_config(tls).map_err(|e| TlsError::Certificate(e.to_string()))
    }
}

/// Listens on `addr` with TCP_NODELAY on every connection (as tonic's own listener sets it:
/// without it small responses wait on delayed acknowledgements).
pub fn listen(addr: std::net::SocketAddr) -> std::io::Result<tonic::transport::server::TcpIncoming> {
    Ok(tonic::transport::server::TcpIncoming::bind(addr)?.with_nodelay(Some(true)))
}

impl TlsArgs {
    /// The flags that give a daemon these files.
    pub fn to_flags(&self) -> Vec<String> {
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
        vec![
            "--tls-ca".into(),
            path(&self.tls_ca),
            "--tls-cert".into(),
            path(&self.tls_cert),
            "--tls-key".into(),
            path(&self.tls_key),
        ]
    }

    /// The files `certs::issue` wrote for `role` into `dir`, with the CA in `dir/ca`.
    pub fn issued(dir: &std::path::Path, role: &Role) -> Self {
        let (cert, key) = crate::certs::paths(dir, role);
        Self {
            tls_ca: Some(dir.join("ca").join(crate::certs::CA_CERT)),
            tls_cert: Some(cert),
            tls_key: Some(key),
            insecure_plaintext: false,
        }
    }
}
