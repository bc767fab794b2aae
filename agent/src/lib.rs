//! Tidal's node agent.
//!
//! Request path: [`service`] (gRPC) → [`router`] (weights of the plan) → a [`worker`]'s
//! [`queue`] (earliest deadline first) → its batcher → the worker process
//! ([`worker_process`], over [`worker_protocol`]) in its own [`cgroup`].
//! Control path: a plan arrives → [`node`] validates it, stages the reconcile diff and executes
//! it all or nothing through the executor contract it shares with the simulator
//! (`tidal_common::executor`): the node starts, resizes (in place, or blue-green as the plan
//! says) and retires workers, make before break; [`link`] reports
//! [`telemetry`] to the controller; [`profiler`] measures variants on demand.

pub mod admission;
pub mod cgroup;
pub mod connector;
pub mod error;
pub mod link;
pub mod metrics;
pub mod model_stats;
pub mod models;
pub mod node;
pub mod profiler;
pub mod queue;
pub mod router;
pub mod service;
pub mod telemetry;
pub mod v2;
pub mod v2_rest;
pub mod worker;
pub mod worker_process;
pub mod worker_protocol;
