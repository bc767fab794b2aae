//! A small certificate authority for one cluster: `init` makes the CA's key and certificate,
//! `issue` a key and certificate for one identity, signed by it. Keys are written readable
//! by their owner only. (`tidalctl certs init|issue` call these.)

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use thiserror::Error;
use time::{Duration, OffsetDateTime};

use crate::Role;

pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";
/// Longest validity `issue` grants.
pub const MAX_DAYS: u32 = 3650;

#[derive(Debug, Error)]
pub enum CertError {
    #[error("{0} exists; refusing to overwrite it")]
    Exists(PathBuf),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Invalid(String),
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CertError + '_ {
    move |source| CertError::Io { path: path.to_path_buf(), source }
}

/// Writes `contents` to a new file (never over an existing one), with `mode`.
fn write_new(path: &Path, contents: &str, mode: u32) -> Result<(), CertError> {
    let mut f = OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            CertError::Exists(path.to_path_buf())
        } else {
            CertError::Io { path: path.to_path_buf(), source: e }
        }
    })?;
    f.write_all(contents.as_bytes()).and_then(|()| f.sync_all()).map_err(io(path))
}

fn validity(params: &mut CertificateParams, days: u32) -> Result<(), CertError> {
    if !(1..=MAX_DAYS).contains(&days) {
        return Err(CertError::Invalid(format!("validity must be 1–{MAX_DAYS} days")));
    }
    let now = OffsetDateTime::now_utc();
    // A little slack for clocks that disagree.
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(days as i64);
    Ok(())
}

/// Makes the CA in `dir` (created if missing): `ca.pem` and `ca.key`.
pub fn init(dir: &Path, cluster: &str, days: u32) -> Result<PathBuf, CertError> {
    fs::create_dir_all(dir).map_err(io(dir))?;
    let (cert_path, key_path) = (dir.join(CA_CERT), dir.join(CA_KEY));
    for p in [&cert_path, &key_path] {
        if p.exists() {
            return Err(CertError::Exists(p.clone()));
        }
    }
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, format!("Tidal cluster CA {cluster}"));
    params.distinguished_name = name;
    validity(&mut params, days)?;
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    write_new(&key_path, &key.serialize_pem(), 0o600)?;
    write_new(&cert_path, &cert.pem(), 0o644)?;
    Ok(cert_path)
}

/// The certificate and key files `issue` writes for `role` into `out`.
pub fn paths(out: &Path, role: &Role) -> (PathBuf, PathBuf) {
    let stem = role.file_stem();
    (out.join(format!("{stem}.pem")), out.join(format!("{stem}.key")))
}

/// Issues a key and certificate for `role`, valid as a client and, for `hosts` (DNS names or
/// IP addresses it serves at), as a server; signed by the CA in `ca_dir`, written to `out`.
pub fn issue(
    ca_dir: &Path,
    role: &Role,
    hosts: &[String],
    out: &Path,
    days: u32,
) -> Result<(PathBuf, PathBuf), CertError> {
    let read = |p: PathBuf| fs::read_to_string(&p).map_err(|e| CertError::Io { path: p, source: e });
    let ca_key = KeyPair::from_pem(&read(ca_dir.join(CA_KEY))?)?;
    let issuer = Issuer::from_ca_cert_pem(&read(ca_dir.join(CA_CERT))?, ca_key)?;
    let mut params =
        CertificateParams::new(hosts.to_vec()).map_err(|e| CertError::Invalid(format!("hosts {hosts:?}: {e}")))?;
    let uri = role.uri().try_into().map_err(|e| CertError::Invalid(format!("{role}: {e}")))?;
    params.subject_alt_names.push(SanType::URI(uri));
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, role.to_string());
    params.distinguished_name = name;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth, ExtendedKeyUsagePurpose::ServerAuth];
    validity(&mut params, days)?;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    fs::create_dir_all(out).map_err(io(out))?;
    let (cert_path, key_path) = paths(out, role);
    write_new(&key_path, &key.serialize_pem(), 0o600)?;
    write_new(&cert_path, &cert.pem(), 0o644)?;
    Ok((cert_path, key_path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_issued_certificate_carries_its_role_and_nothing_is_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        init(&ca, "test", 30).unwrap();
        assert!(matches!(init(&ca, "test", 30), Err(CertError::Exists(_))));
        let role = Role::Agent("node-a".into());
        let (cert, key) = issue(&ca, &role, &["127.0.0.1".into(), "localhost".into()], dir.path(), 30).unwrap();
        assert_eq!(Role::of_pem(&fs::read(&cert).unwrap()).unwrap(), role);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(matches!(issue(&ca, &role, &[], dir.path(), 30), Err(CertError::Exists(_))));
        assert!(issue(&ca, &Role::Admin("a".into()), &[], dir.path(), 0).is_err(), "validity bounded");
    }

    #[test]
    fn a_key_that_is_not_the_certificates_own_is_refused_when_read() {
        use crate::tls::TlsError;
        use crate::{Security, TlsArgs};
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        init(&ca, "test", 30).unwrap();
        let (admin_cert, admin_key) = issue(&ca, &Role::Admin("a".into()), &[], &dir.path().join("a"), 30).unwrap();
        let (_, other_key) = issue(&ca, &Role::Admin("b".into()), &[], &dir.path().join("b"), 30).unwrap();
        let args = |key: &Path| TlsArgs {
            tls_ca: Some(ca.join(CA_CERT)),
            tls_cert: Some(admin_cert.clone()),
            tls_key: Some(key.to_path_buf()),
            ..TlsArgs::default()
        };
        assert!(Security::from_args(&args(&admin_key)).is_ok());
        match Security::from_args(&args(&other_key)) {
            Err(e @ TlsError::KeyMismatch { .. }) => assert!(e.to_string().contains("does not belong"), "{e}"),
            Err(e) => panic!("expected a key mismatch, got {e}"),
            Ok(_) => panic!("a key of another certificate was taken"),
        }
    }
}
