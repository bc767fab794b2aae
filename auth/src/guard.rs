//! Per-call authorisation: each RPC names the roles that may call it, and [`Guard::require`]
//! answers UNAUTHENTICATED (no verified certificate) or PERMISSION_DENIED (a certificate of
//! another role) before the call does anything.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};

use tonic::{Request, Status};

use crate::{Holder, Role};

/// The certificates no longer let in, by serial ([`crate::normalise_serial`]'s form).
/// Checked on every call: tonic's TLS takes no custom verifier, so a revoked certificate still
/// completes a handshake (bounded like any connection at the edge) but is refused every call.
pub trait Revocations: Send + Sync + 'static {
    fn is_revoked(&self, serial: &str) -> bool;
}

/// A revocation list replaced whole by whoever learns it (an agent, from its controllers).
#[derive(Debug, Default)]
pub struct RevocationList(RwLock<HashSet<String>>);

impl RevocationList {
    /// Replaces the list; returns whether it changed.
    pub fn replace(&self, serials: impl IntoIterator<Item = String>) -> bool {
        let new: HashSet<String> = serials.into_iter().collect();
        let mut list = self.0.write().unwrap_or_else(|p| p.into_inner());
        let changed = *list != new;
        *list = new;
        changed
    }

    pub fn len(&self) -> usize {
        self.0.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Revocations for RevocationList {
    fn is_revoked(&self, serial: &str) -> bool {
        self.0.read().unwrap_or_else(|p| p.into_inner()).contains(serial)
    }
}

/// The caller checks of one server; in plaintext everyone passes (nobody is authenticated).
#[derive(Clone)]
pub struct Guard {
    plaintext: bool,
    revoked: Option<Arc<dyn Revocations>>,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guard").field("plaintext", &self.plaintext).finish_non_exhaustive()
    }
}

impl Guard {
    pub fn new(security: &crate::Security) -> Self {
        Self { plaintext: security.is_plaintext(), revoked: None }
    }

    /// A guard that lets every caller through (plaintext, or tests of the logic behind it).
    pub fn open() -> Self {
        Self { plaintext: true, revoked: None }
    }

    /// This guard, also refusing every certificate `revoked` names.
    pub fn with_revocations(mut self, revoked: Arc<dyn Revocations>) -> Self {
        self.revoked = Some(revoked);
        self
    }

    /// The verified holder of the caller's certificate: `None` in plaintext or when the caller
    /// sent no certificate (which only an optional-client-auth port allows). A revoked
    /// certificate is UNAUTHENTICATED.
    pub fn holder<T>(&self, request: &Request<T>) -> Result<Option<Holder>, Status> {
        if self.plaintext {
            return Ok(None);
        }
        let Some(certs) = request.peer_certs() else { return Ok(None) };
        let Some(leaf) = certs.first() else { return Ok(None) };
        let holder = Holder::of_certificate(leaf).map_err(Status::unauthenticated)?;
        if self.revoked.as_ref().is_some_and(|r| r.is_revoked(&holder.serial)) {
            return Err(Status::unauthenticated(format!(
                "certificate {} of {} is revoked",
                holder.serial, holder.role
            )));
        }
        Ok(Some(holder))
    }

    /// The verified role of the caller: as [`Self::holder`].
    pub fn caller<T>(&self, request: &Request<T>) -> Result<Option<Role>, Status> {
        Ok(self.holder(request)?.map(|h| h.role))
    }

    /// Lets the call through if its caller's role passes `allowed`; `what` names the call in
    /// the refusal. Returns the role (`None` in plaintext).
    pub fn require<T>(
        &self,
        request: &Request<T>,
        what: &str,
        allowed: impl Fn(&Role) -> bool,
    ) -> Result<Option<Role>, Status> {
        Ok(self.require_holder(request, what, allowed)?.map(|h| h.role))
    }

    /// As [`Self::require`], with the certificate's serial.
    pub fn require_holder<T>(
        &self,
        request: &Request<T>,
        what: &str,
        allowed: impl Fn(&Role) -> bool,
    ) -> Result<Option<Holder>, Status> {
        if self.plaintext {
            return Ok(None);
        }
        let peer = request.remote_addr();
        let refused = match self.holder(request) {
            Err(status) => status,
            Ok(None) => Status::unauthenticated(format!("{what} needs a client certificate of the cluster")),
            Ok(Some(holder)) if allowed(&holder.role) => return Ok(Some(holder)),
            Ok(Some(holder)) => Status::permission_denied(format!("{} may not call {what}", holder.role)),
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
