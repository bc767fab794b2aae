//! Per-call authorisation: each RPC names the roles that may call it, and [`Guard::require`]
//! answers UNAUTHENTICATED (no verified certificate) or PERMISSION_DENIED (a certificate of
//! another role) before the call does anything.

use tonic::{Request, Status};

use crate::Role;

/// The caller checks of one server; in plaintext everyone passes (nobody is authenticated).
#[derive(Clone, Copy, Debug)]
pub struct Guard {
    plaintext: bool,
}

impl Guard {
    pub fn new(security: &crate::Security) -> Self {
        Self { plaintext: security.is_plaintext() }
    }

    /// A guard that lets every caller through (plaintext, or tests of the logic behind it).
    pub fn open() -> Self {
        Self { plaintext: true }
    }

    /// The verified role of the caller: `None` in plaintext or when the caller sent no
    /// certificate (which only an optional-client-auth port allows).
    pub fn caller<T>(&self, request: &Request<T>) -> Result<Option<Role>, Status> {
        if self.plaintext {
            return Ok(None);
        }
        let Some(certs) = request.peer_certs() else { return Ok(None) };
        let Some(leaf) = certs.first() else { return Ok(None) };
        Role::of_certificate(leaf).map(Some).map_err(Status::unauthenticated)
    }

    /// Lets the call through if its caller's role passes `allowed`; `what` names the call in
    /// the refusal. Returns the role (`None` in plaintext).
    pub fn require<T>(
        &self,
        request: &Request<T>,
        what: &str,
        allowed: impl Fn(&Role) -> bool,
    ) -> Result<Option<Role>, Status> {
        if self.plaintext {
            return Ok(None);
        }
        let peer = request.remote_addr();
        let refused = match self.caller(request) {
            Err(status) => status,
            Ok(None) => Status::unauthenticated(format!("{what} needs a client certificate of the cluster")),
            Ok(Some(role)) if allowed(&role) => return Ok(Some(role)),
            Ok(Some(role)) => Status::permission_denied(format!("{role} may not call {what}")),
        };
        // The audit trail of the doors: every refusal, with who knocked (`target: audit`).
        tracing::warn!(target: "audit", call = what, peer = ?peer, code = ?refused.code(), reason = refused.message(), "call refused");
        Err(refused)
    }
}

/// Role tests for `Guard::require`.
pub fn is_admin(r: &Role) -> bool {
    matches!(r, Role::Admin(_))
}

pub fn is_controller(r: &Role) -> bool {
    matches!(r, Role::Controller(_))
}

/// Who may read status: admins, readers and controllers.
pub fn may_read(r: &Role) -> bool {
    matches!(r, Role::Admin(_) | Role::Reader(_) | Role::Controller(_))
}
