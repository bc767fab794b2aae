//! Code shared by Tidal's agent, controller and CLI.
//!
//! Everything here is pure and deterministic — no clocks, threads or I/O — so that the live
//! system, the simulator and the tests call the very same functions.

pub mod forecast;
pub mod latency;
pub mod logging;
pub mod plan;
pub mod resnet;
pub mod solver;
pub mod tensor;
pub mod variant;
