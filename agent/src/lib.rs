//! Tidal's node agent.
//!
//! Request path: one of three sibling [`fronts`] (Tidal's API, V2 over gRPC, V2 over REST) →
//! the [`pipeline`] (stages in order, one deadline) → [`router`] (weights of the plan) → a [`worker`]'s
//! [`queue`] (earliest deadline first) → its batcher (which gives a generating stage's
//! requests their [`generation`] budgets) → the worker process
//! ([`worker_process`], over [`worker_protocol`]) in its own [`cgroup`].
//! Control path: a plan arrives → the [`reconciler`], the one task that owns the workers,
//! checks it, stages the reconcile diff and executes it all or nothing through the executor
//! contract it shares with the simulator (`tidal_common::executor`): it starts, resizes (in
//! place, or blue-green as the plan says) and retires workers, make before break, and
//! publishes the routes and a [`reconciler::View`] that the request path reads. [`control`] takes
//! plans, profiling and status calls; [`node`] is what the services share; [`link`] reports [`telemetry`] to the controller; [`profiler`]
//! measures variants on demand.

pub mod admission;
pub mod cgroup;
pub mod connector;
pub mod control;
pub mod error;
pub mod fetch;
pub mod fronts;
pub mod generation;
pub mod link;
pub mod metrics;
pub mod model_stats;
pub mod models;
pub mod node;
pub mod pipeline;
pub mod profiler;
pub mod queue;
pub mod reconciler;
pub mod router;
pub mod telemetry;
pub mod worker;
pub mod worker_process;
pub mod worker_protocol;
