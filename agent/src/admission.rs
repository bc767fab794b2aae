//! The memory requests may hold while they are served: each request is admitted for its size
//! (bytes, counted in KiB) against `--max-inflight-bytes`, and holds it until it is answered.
//! The queues then hold at most that much of clients' tensors whatever they send; a request
//! beyond it is refused at once (RESOURCE_EXHAUSTED) rather than held. What a request makes on
//! the way (a stage's outputs, a detector's crops) is not counted: it is bounded by the models.

use std::sync::Arc;

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ServeError;

pub struct InflightBytes {
    permits: Arc<Semaphore>,
    limit_kib: usize,
    /// Bytes admitted now (`tidal_agent_inflight_request_bytes`).
    held: Gauge,
}

/// One admitted request's share; given back when dropped.
pub struct Admitted {
    _permit: OwnedSemaphorePermit,
    bytes: i64,
    held: Gauge,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.held.dec_by(self.bytes);
    }
}

impl InflightBytes {
    pub fn new(limit_bytes: usize, held: Gauge) -> Self {
        let limit_kib = limit_bytes.div_ceil(1024).clamp(1, Semaphore::MAX_PERMITS);
        Self { permits: Arc::new(Semaphore::new(limit_kib)), limit_kib, held }
    }

    /// Admits a request of `bytes`, or refuses it when the requests in flight hold too much.
    pub fn admit(&self, bytes: usize) -> Result<Admitted, ServeError> {
        let kib = bytes.div_ceil(1024).max(1);
        let refused = || ServeError::MemoryFull {
            held_mib: (self.limit_kib - self.permits.available_permits().min(self.limit_kib)) / 1024,
            limit_mib: self.limit_kib / 1024,
        };
        let kib = u32::try_from(kib).map_err(|_| refused())?;
        let permit = self.permits.clone().try_acquire_many_owned(kib).map_err(|_| refused())?;
        let bytes = i64::from(kib) * 1024;
        self.held.inc_by(bytes);
        Ok(Admitted { _permit: permit, bytes, held: self.held.clone() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_hold_their_bytes_until_answered_and_no_more_is_admitted() {
        let gauge = Gauge::default();
        let inflight = InflightBytes::new(4 << 20, gauge.clone());
        let a = inflight.admit(3 << 20).expect("3 MiB of 4");
        assert_eq!(gauge.get(), 3 << 20);
        assert!(matches!(inflight.admit(2 << 20), Err(ServeError::MemoryFull { held_mib: 3, limit_mib: 4 })));
        let b = inflight.admit(1 << 20).expect("the last MiB");
        drop(a);
        assert_eq!(gauge.get(), 1 << 20);
        inflight.admit(3 << 20).expect("given back when answered");
        drop(b);
        assert!(inflight.admit(usize::MAX).is_err(), "beyond any limit");
        assert!(inflight.admit(0).is_ok(), "an empty request still counts a KiB, and fits");
    }
}
