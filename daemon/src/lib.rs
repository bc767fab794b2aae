//! The edges Tidal's binaries share, kept out of `tidal-common` so that the models there stay
//! pure (no I/O, threads or clocks): log set-up, the Prometheus metrics endpoint, the standard
//! gRPC services (health, reflection) and systemd notifications.

pub mod edge;
pub mod grpc_std;
pub mod logging;
pub mod metrics_http;
pub mod ready_file;
pub mod systemd;
