//! How the processes a test starts talk to each other and to the test itself: plaintext by
//! default, mutual TLS when `TIDAL_TEST_TLS=1` — then the whole suite, or an example such as
//! the failover measurement, runs on certificates of a CA made for the test process.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use tidal_auth::{Role, Security, TlsArgs};
use tonic::transport::Endpoint;

/// The controller identity the tests' own clients use on agents' control ports (no replica
/// has it, so it speaks no Raft).
pub const HARNESS_CONTROLLER: u64 = 999;

pub struct TestCa {
    dir: tempfile::TempDir,
    /// (role, host) pairs issued so far.
    issued: Mutex<HashSet<(String, String)>>,
}

static CA: OnceLock<Option<TestCa>> = OnceLock::new();

/// The test process's CA, when the tests run on mutual TLS.
pub fn test_ca() -> Option<&'static TestCa> {
    CA.get_or_init(|| (std::env::var("TIDAL_TEST_TLS").as_deref() == Ok("1")).then(TestCa::new)).as_ref()
}

impl TestCa {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("a directory for the test CA");
        tidal_auth::certs::init(&dir.path().join("ca"), "tests", 1).expect("the test CA");
        Self { dir, issued: Mutex::new(HashSet::new()) }
    }

    /// The files of `role`, issued on first use for 127.0.0.1, localhost and `host` (one
    /// certificate per role and host).
    pub fn files(&self, role: &Role, host: &str) -> TlsArgs {
        let out = self.dir.path().join(if host.is_empty() { "loopback" } else { host });
        let mut issued = self.issued.lock().unwrap_or_else(|p| p.into_inner());
        if issued.insert((role.to_string(), host.to_string())) {
            let mut hosts = vec!["127.0.0.1".to_string(), "localhost".to_string()];
            hosts.extend(Some(host.to_string()).filter(|h| !h.is_empty() && !hosts.contains(h)));
            tidal_auth::certs::issue(&self.dir.path().join("ca"), role, &hosts, &out, 1)
                .unwrap_or_else(|e| panic!("issuing {role}: {e}"));
        }
        TlsArgs { tls_ca: Some(self.dir.path().join("ca/ca.pem")), ..TlsArgs::issued(&out, role) }
    }

    pub fn security(&self, role: &Role) -> Security {
        Security::from_args(&self.files(role, "")).expect("a test identity")
    }
}

fn gives_tls(cmd: &Command) -> bool {
    cmd.get_args().any(|a| a == "--tls-ca")
}

/// Makes `cmd`, a daemon serving at `host`, speak as `role` (unless it was given certificates
/// already): its certificate, or plaintext.
pub fn as_daemon<'a>(cmd: &'a mut Command, role: &Role, host: &str) -> &'a mut Command {
    if gives_tls(cmd) {
        return cmd;
    }
    match test_ca() {
        Some(ca) => cmd.args(ca.files(role, host).to_flags()),
        None => cmd.env("TIDAL_INSECURE_PLAINTEXT", "true"),
    }
}

/// Makes `cmd`, a tidalctl, speak as the tests' admin (unless it was given certificates).
pub fn as_admin(cmd: &mut Command) -> &mut Command {
    if gives_tls(cmd) {
        return cmd;
    }
    match test_ca() {
        Some(ca) => {
            let files = ca.files(&admin(), "");
            let path = |p: Option<PathBuf>| p.unwrap_or_default();
            cmd.env("TIDAL_TLS_CA", path(files.tls_ca))
                .env("TIDAL_TLS_CERT", path(files.tls_cert))
                .env("TIDAL_TLS_KEY", path(files.tls_key))
        }
        None => cmd.env("TIDAL_INSECURE_PLAINTEXT", "true"),
    }
}

fn admin() -> Role {
    Role::Admin("tests".into())
}

/// Who the tests' own gRPC clients are.
#[derive(Clone, Copy)]
pub enum Client {
    /// For controllers' APIs and inference.
    Admin,
    /// For agents' control ports.
    Controller,
}

/// An endpoint to `addr` for the tests' own clients.
pub fn endpoint(addr: &str, client: Client) -> Endpoint {
    let security = match test_ca() {
        None => Security::plaintext(),
        Some(ca) => match client {
            Client::Admin => ca.security(&admin()),
            Client::Controller => ca.security(&Role::Controller(HARNESS_CONTROLLER)),
        },
    };
    security.endpoint(addr).unwrap_or_else(|e| panic!("{addr}: {e}"))
}
