//! `cargo audit`, offline: every crate in `Cargo.lock` against the RustSec advisory database
//! committed in `data/advisory-db.tar.gz` (its date in `data/README.md`; refreshed by
//! `scripts/update-advisory-db.sh`), through the `rustsec` library that `cargo audit` is built
//! on. A vulnerability fails the test unless it is listed below with why it cannot be reached.

use std::path::Path;
use std::process::Command;

use rustsec::{Database, Lockfile};

/// Advisories that apply to `Cargo.lock` and why they are accepted.
const ACCEPTED: &[(&str, &str)] = &[(
    "RUSTSEC-2024-0437",
    "protobuf 2 (uncontrolled recursion parsing unknown groups): raft 0.7, the newest raft-rs on \
     crates.io, depends on it whatever its codec. It parses only Raft messages, which the peer \
     port takes from replicas of the group authenticated by mutual TLS as the sender they claim \
     (tests/tests/process/security.rs), and log entries those replicas wrote.",
)];

#[test]
fn no_dependency_has_an_unaccepted_vulnerability() {
    let _turn = tidal_tests::file_turn(module_path!());
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let db_dir = tempfile::tempdir().unwrap();
    let unpacked = Command::new("tar")
        .arg("-xzf")
        .arg(root.join("data/advisory-db.tar.gz"))
        .arg("-C")
        .arg(db_dir.path())
        .status()
        .expect("running tar");
    assert!(unpacked.success(), "unpacking the advisory database");
    let db = Database::open(db_dir.path()).expect("the advisory database");
    assert!(db.iter().count() > 1000, "the database holds the advisories");
    let lockfile = Lockfile::load(root.join("Cargo.lock")).expect("Cargo.lock");

    let found = db.vulnerabilities(&lockfile);
    let mut unaccepted = Vec::new();
    for v in &found {
        let id = v.advisory.id.as_str();
        match ACCEPTED.iter().find(|(accepted, _)| *accepted == id) {
            Some((_, why)) => eprintln!("accepted {id} in {} {}: {why}", v.package.name, v.package.version),
            None => unaccepted.push(format!("{id} in {} {}: {}", v.package.name, v.package.version, v.advisory.title)),
        }
    }
    assert!(unaccepted.is_empty(), "vulnerable dependencies:\n{}", unaccepted.join("\n"));
    for (id, _) in ACCEPTED {
        assert!(found.iter().any(|v| v.advisory.id.as_str() == *id), "{id} no longer applies: remove it from ACCEPTED");
    }
}
