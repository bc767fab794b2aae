//! Why a request was not served, and the gRPC status each reason maps to.

use std::time::Duration;

use thiserror::Error;
use tonic::Status;

#[derive(Debug, Error)]
pub enum ServeError {
    #[error("unknown task {0:?}")]
    UnknownTask(String),
    #[error("task {0:?} has no worker on this node yet")]
    NoWorker(String),
    #[error("invalid input: {0}")]
    InvalidInput(String),
    #[error("the request is {size} bytes, over the limit of {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error(
        "the agent holds {held_mib} MiB of requests in flight, its limit is {limit_mib} MiB (--max-inflight-bytes); \
         retry later or elsewhere"
    )]
    MemoryFull { held_mib: usize, limit_mib: usize },
    #[error("the worker's queue is full ({0} requests waiting)")]
    QueueFull(usize),
    #[error("{0} requests already wait for tasks without a worker to load; retry later")]
    WaitingFull(u32),
    /// `waiting`: where the request was when its time ran out ("in the queue", "before the
    /// worker answered", …).
    #[error("the deadline passed after {after:?} {waiting}")]
    DeadlineExceeded { after: Duration, waiting: String },
    #[error("overloaded: {ahead} requests are queued ahead; serving this one would take about {needs:?}, its budget is {budget:?}")]
    WouldMiss { ahead: usize, needs: Duration, budget: Duration },
    #[error("the budget left ({budget:?}) is shorter than a batch takes here (about {needs:?})")]
    BudgetTooShort { needs: Duration, budget: Duration },
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("{0}")]
    Unfinished(String),
    #[error("the model failed: {0}")]
    Model(String),
}

impl ServeError {
    /// Whether the serving side failed (its model, its workers, its queues), where another
    /// version of the task could still answer; not the request's own fault or its time.
    pub fn is_the_server_s(&self) -> bool {
        matches!(
            self,
            ServeError::NoWorker(_)
                | ServeError::QueueFull(_)
                | ServeError::WaitingFull(_)
                | ServeError::WouldMiss { .. }
                | ServeError::Unavailable(_)
                | ServeError::Unfinished(_)
                | ServeError::Model(_)
        )
    }
}

impl From<ServeError> for Status {
    fn from(e: ServeError) -> Self {
        let msg = e.to_string();
        match e {
            ServeError::UnknownTask(_) => Status::not_found(msg),
            ServeError::NoWorker(_) | ServeError::Unavailable(_) => Status::unavailable(msg),
            ServeError::InvalidInput(_) => Status::invalid_argument(msg),
            ServeError::QueueFull(_)
            | ServeError::WaitingFull(_)
            | ServeError::TooLarge { .. }
            | ServeError::WouldMiss { .. }
            | ServeError::MemoryFull { .. } => Status::resource_exhausted(msg),
            ServeError::DeadlineExceeded { .. } | ServeError::BudgetTooShort { .. } | ServeError::Unfinished(_) => {
                Status::deadline_exceeded(msg)
            }
            ServeError::Model(_) => Status::internal(msg),
        }
    }
}
