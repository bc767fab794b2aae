//! Roles and their place in a certificate: a URI subject alternative name,
//! `tidal://controller/1`, `tidal://agent/node-a`, `tidal://admin/alice`, `tidal://reader/bob`.

use std::fmt;
use std::str::FromStr;

const SCHEME: &str = "tidal://";

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Role {
    /// A controller replica, by Raft id.
    Controller(u64),
    /// A node agent, by node name.
    Agent(String),
    /// An operator: may change tasks, profiles, nodes and membership.
    Admin(String),
    /// May read status and history, nothing else.
    Reader(String),
}

impl Role {
    pub fn uri(&self) -> String {
        format!("{SCHEME}{self}")
    }

    /// The role a URI names, if it is a Tidal identity.
    pub fn from_uri(uri: &str) -> Option<Self> {
        uri.strip_prefix(SCHEME)?.parse().ok()
    }

    /// The role in a DER certificate: its one `tidal://` URI name (none, or more than one, is
    /// an error: a certificate is one identity).
    pub fn of_certificate(der: &[u8]) -> Result<Self, String> {
        Ok(Holder::of_certificate(der)?.role)
    }

    fn of_parsed(cert: &x509_parser::certificate::X509Certificate<'_>) -> Result<Self, String> {
        let names = cert
            .subject_alternative_name()
            .map_err(|e| format!("unreadable subject alternative names: {e}"))?
            .map(|san| san.value.general_names.clone())
            .unwrap_or_default();
        let mut roles = names.iter().filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(uri) => Role::from_uri(uri),
            _ => None,
        });
        match (roles.next(), roles.next()) {
            (Some(role), None) => Ok(role),
            (None, _) => Err("the certificate names no tidal:// identity".into()),
            (Some(_), Some(_)) => Err("the certificate names more than one tidal:// identity".into()),
        }
    }

    /// The role in a PEM file's first certificate (a chain starts with its own).
    pub fn of_pem(pem: &[u8]) -> Result<Self, String> {
        Ok(Holder::of_pem(pem)?.role)
    }

    /// A short file stem for this identity's certificate and key.
    pub fn file_stem(&self) -> String {
        self.to_string().replace('/', "-")
    }
}

/// One certificate: whose it is and its serial number (what revocation names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub role: Role,
    /// The serial in the form [`normalise_serial`] gives.
    pub serial: String,
}

impl Holder {
    pub fn of_certificate(der: &[u8]) -> Result<Self, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| format!("unreadable certificate: {e}"))?;
        let serial = hex_serial(cert.raw_serial());
        Ok(Self { role: Role::of_parsed(&cert)?, serial })
    }

    /// The holder of a PEM file's first certificate (a chain starts with its own).
    pub fn of_pem(pem: &[u8]) -> Result<Self, String> {
        let first =
            x509_parser::pem::Pem::iter_from_buffer(pem).find(|p| p.as_ref().is_ok_and(|p| p.label == "CERTIFICATE"));
        match first {
            Some(Ok(p)) => Self::of_certificate(&p.contents),
            _ => Err("no certificate in the file".into()),
        }
    }
}

/// A certificate serial (at most 20 bytes, RFC 5280) as lowercase hex without leading zeros.
fn hex_serial(raw: &[u8]) -> String {
    let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    let trimmed = hex.trim_start_matches('0');
    if trimmed.is_empty() {
        "0".into()
    } else {
        trimmed.into()
    }
}

/// A serial as a user writes it (`0A:1B:…`, `0a1b…`, any case) in the one form revocation
/// compares: lowercase hex without separators or leading zeros.
pub fn normalise_serial(serial: &str) -> Result<String, String> {
    let digits: String = serial.chars().filter(|c| *c != ':').collect::<String>().to_ascii_lowercase();
    if digits.is_empty() || digits.len() > 40 || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!("{serial:?} is not a certificate serial (1–40 hex digits, colons allowed)"));
    }
    let trimmed = digits.trim_start_matches('0');
    Ok(if trimmed.is_empty() { "0".into() } else { trimmed.into() })
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Role::Controller(id) => write!(f, "controller/{id}"),
            Role::Agent(name) => write!(f, "agent/{name}"),
            Role::Admin(name) => write!(f, "admin/{name}"),
            Role::Reader(name) => write!(f, "reader/{name}"),
        }
    }
}

/// Names within identities: 1–64 characters of `[A-Za-z0-9-_.]` (the node names' alphabet).
fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

impl FromStr for Role {
    type Err = String;

    /// `controller/ID`, `agent/NODE`, `admin/NAME` or `reader/NAME`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (kind, name) = s.split_once('/').ok_or_else(|| format!("{s:?} is not KIND/NAME"))?;
        if kind == "controller" {
            return match name.parse::<u64>() {
                Ok(id) if id > 0 => Ok(Role::Controller(id)),
                _ => Err(format!("{name:?} is not a controller replica id (a positive integer)")),
            };
        }
        if !valid_name(name) {
            return Err(format!("{name:?} must be 1–64 characters of [A-Za-z0-9-_.]"));
        }
        match kind {
            "agent" => Ok(Role::Agent(name.into())),
            "admin" => Ok(Role::Admin(name.into())),
            "reader" => Ok(Role::Reader(name.into())),
            _ => Err(format!("{kind:?} is not a role (controller, agent, admin, reader)")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_round_trip_through_their_uri() {
        for role in [
            Role::Controller(3),
            Role::Agent("node-a".into()),
            Role::Admin("alice".into()),
            Role::Reader("grafana".into()),
        ] {
            assert_eq!(Role::from_uri(&role.uri()), Some(role.clone()));
        }
        for bad in ["controller/0", "controller/x", "agent/", "agent/a/b", "root/x", "admin", "agent/../x"] {
            assert!(bad.parse::<Role>().is_err(), "{bad}");
        }
        assert_eq!(Role::from_uri("https://agent/x"), None);
    }

    #[test]
    fn serials_compare_in_one_form() {
        assert_eq!(normalise_serial("00:0A:1b").unwrap(), "a1b");
        assert_eq!(normalise_serial("0a1B").unwrap(), "a1b");
        assert_eq!(hex_serial(&[0, 0x0a, 0x1b]), "a1b");
        assert_eq!(normalise_serial("00").unwrap(), "0");
        for bad in ["", ":", "xyz", &"f".repeat(41)] {
            assert!(normalise_serial(bad).is_err(), "{bad}");
        }
    }
}
