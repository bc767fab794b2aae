//! Mutual TLS for every gRPC connection (rustls through tonic), or plaintext when explicitly
//! asked for. One [`Security`] per process serves its ports and dials its peers.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
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
    /// anything. Only for a local demo on loopback. From the environment: 1, true, yes or on
    /// (0, false, no, off or unset: not).
    #[arg(
        long,
        env = "TIDAL_INSECURE_PLAINTEXT",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
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
    #[error(
        "both TLS (--tls-ca, --tls-cert, --tls-key or TIDAL_TLS_*) and plaintext (--insecure-plaintext or \
         TIDAL_INSECURE_PLAINTEXT) were asked for: give one"
    )]
    Both,
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Certificate(String),
    #[error("{0} is not a host:port address")]
    Address(String),
    #[error(
        "the key {key} does not belong to the certificate {cert}: give the key that was issued with it (`tidalctl \
         certs issue` writes the two side by side)"
    )]
    KeyMismatch { cert: PathBuf, key: PathBuf },
}

/// Refuses a private key that is not the certificate's own: otherwise the mismatch shows only
/// at the first handshake, as a bare "transport error" on the far side.
/// Returns the two as rustls takes them.
fn check_key(
    cert: &Path,
    cert_pem: &[u8],
    key: &Path,
    key_pem: &[u8],
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    use rustls::pki_types::pem::PemObject;
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Certificate(format!("{}: {e}", cert.display())))?;
    let private = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| TlsError::Certificate(format!("{}: not a private key in PEM: {e}", key.display())))?;
    let provider = rustls::crypto::ring::default_provider();
    match rustls::sign::CertifiedKey::from_der(chain.clone(), private.clone_key(), &provider) {
        Ok(_) => Ok((chain, private)),
        Err(rustls::Error::InconsistentKeys(_)) => {
            Err(TlsError::KeyMismatch { cert: cert.to_path_buf(), key: key.to_path_buf() })
        }
        Err(e) => Err(TlsError::Certificate(format!("{} with {}: {e}", cert.display(), key.display()))),
    }
}

struct Mtls {
    ca: Certificate,
    /// The identity as rustls takes it, for [`Security::tls_acceptor`].
    chain: Vec<CertificateDer<'static>>,
    private_key: PrivateKeyDer<'static>,
    /// The CA as rustls takes it, for [`Security::endpoint_of`]'s verifier.
    roots: Arc<rustls::RootCertStore>,
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
        let any_tls = args.tls_ca.is_some() || args.tls_cert.is_some() || args.tls_key.is_some();
        if args.insecure_plaintext && any_tls {
            return Err(TlsError::Both);
        }
        if args.insecure_plaintext {
            warn!("plaintext gRPC with no authentication (--insecure-plaintext): for a local demo only");
            return Ok(Self::plaintext());
        }
        let (Some(ca), Some(cert), Some(key)) = (&args.tls_ca, &args.tls_cert, &args.tls_key) else {
            return Err(if any_tls { TlsError::Partial } else { TlsError::Missing });
        };
        let read = |p: &PathBuf| std::fs::read(p).map_err(|source| TlsError::Read { path: p.clone(), source });
        crate::warn_if_exposed(key, "the TLS private key");
        let (ca_pem, cert_pem, key_pem) = (read(ca)?, read(cert)?, read(key)?);
        let role = Role::of_pem(&cert_pem).map_err(|e| TlsError::Certificate(format!("{}: {e}", cert.display())))?;
        let (chain, private_key) = check_key(cert, &cert_pem, key, &key_pem)?;
        let mut roots = rustls::RootCertStore::empty();
        use rustls::pki_types::pem::PemObject;
        for der in rustls::pki_types::CertificateDer::pem_slice_iter(&ca_pem) {
            let der = der.map_err(|e| TlsError::Certificate(format!("{}: {e}", ca.display())))?;
            roots.add(der).map_err(|e| TlsError::Certificate(format!("{}: {e}", ca.display())))?;
        }
        Ok(Self(Some(Arc::new(Mtls {
            roots: Arc::new(roots),
            ca: Certificate::from_pem(ca_pem),
            identity: Identity::from_pem(cert_pem, key_pem),
            chain,
            private_key,
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

    /// The TLS of [`Self::server`] as an acceptor of this process's own, offering HTTP/2 and
    /// HTTP/1.1 by ALPN: for a port that serves REST beside gRPC (tonic's TLS offers `h2`
    /// only, which an HTTP/1.1 client refuses at the handshake). The server built for it has
    /// no TLS of its own and takes the accepted streams (`EdgeListener::incoming_tls`); a
    /// caller's certificate reaches requests as with tonic's TLS. `None` in plaintext.
    pub fn tls_acceptor(&self, auth: ClientAuth) -> Result<Option<tokio_rustls::TlsAcceptor>, TlsError> {
        let Some(m) = &self.0 else { return Ok(None) };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(m.roots.clone(), provider.clone());
        let verifier = match auth {
            ClientAuth::Optional => verifier.allow_unauthenticated(),
            ClientAuth::Required => verifier,
        }
        .build()
        .map_err(|e| TlsError::Certificate(e.to_string()))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Certificate(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(m.chain.clone(), m.private_key.clone_key())
            .map_err(|e| TlsError::Certificate(e.to_string()))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))))
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

impl Security {
    /// As [`Self::endpoint`], for a peer that must be `expected`: besides the CA's signature
    /// and the host, the server's certificate must name that identity and not be revoked. An
    /// agent forwards a stage only to the agent the plan names at that address, never to
    /// whichever holder of a cluster certificate answers there.
    pub fn endpoint_of(
        &self,
        address: &str,
        expected: Role,
        revoked: Option<Arc<dyn crate::Revocations>>,
    ) -> Result<Endpoint, TlsError> {
        let bad = || TlsError::Address(address.to_string());
        let Some(m) = &self.0 else { return self.endpoint(address) };
        let endpoint = Endpoint::from_shared(format!("https://{address}")).map_err(|_| bad())?;
        let host = endpoint.uri().host().ok_or_else(bad)?.trim_matches(['[', ']']).to_string();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(m.roots.clone(), provider)
            .build()
            .map_err(|e| TlsError::Certificate(e.to_string()))?;
        let verifier = Arc::new(PeerVerifier { webpki, expected, revoked });
        let tls = ClientTlsConfig::new().identity(m.identity.clone()).domain_name(host);
        endpoint.tls_config_with_verifier(tls, verifier).map_err(|e| TlsError::Certificate(e.to_string()))
    }
}

/// The CA's verification (chain, validity, host), then: the certificate is the expected
/// identity's and not revoked.
struct PeerVerifier {
    webpki: Arc<rustls::client::WebPkiServerVerifier>,
    expected: Role,
    revoked: Option<Arc<dyn crate::Revocations>>,
}

impl std::fmt::Debug for PeerVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerVerifier").field("expected", &self.expected).finish_non_exhaustive()
    }
}

impl rustls::client::danger::ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let verified = self.webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)?;
        let holder = crate::Holder::of_certificate(end_entity).map_err(|e| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(Arc::new(PeerError(
                e,
            )))))
        })?;
        let refused = |why: String| {
            warn!(target: "audit", expected = %self.expected, shown = %holder.role, serial = %holder.serial, "{why}");
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(Arc::new(PeerError(
                why,
            )))))
        };
        if holder.role != self.expected {
            return Err(refused(format!("the peer is {}, not the {} expected there", holder.role, self.expected)));
        }
        if self.revoked.as_ref().is_some_and(|r| r.is_revoked(&holder.serial)) {
            return Err(refused(format!("the peer's certificate {} is revoked", holder.serial)));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

#[derive(Debug)]
struct PeerError(String);

impl std::fmt::Display for PeerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PeerError {}

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
