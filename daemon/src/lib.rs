//! The edges Tidal's binaries share, kept out of `tidal-common` so that the models there stay
//! pure (no I/O, threads or clocks): log set-up, the Prometheus metrics endpoint, the standard
//! gRPC services (health, reflection), systemd notifications, and the flags of an adaptation
//! round the controller and the simulator share.

pub mod adapt_args;
pub mod edge;
pub mod grpc_std;
pub mod logging;
pub mod metrics_http;
pub mod ready_file;
pub mod reflection;
pub mod stopping;
pub mod systemd;
