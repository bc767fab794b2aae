//! Tidal's controller.
//!
//! [`consensus`] drives raft-rs over [`storage`] (sled) and applies committed commands to the
//! [`state`] machine, sending to its peers through the [`transport`] and hearing them through
//! the [`peer_service`] (the transport knows nothing of the driver: no import circle); the
//! driver is tested on its own under seeded schedules of faults (`consensus/schedules.rs`);
//! [`controller`] runs the adaptation loop on the leader — forecast from
//! what is [`observed`], solve with the [`planner`], commit, push to agents (one [`pusher`] per agent); [`service`] is the
//! gRPC API.

pub mod consensus;
pub mod controller;
pub mod local;
pub mod logging;
pub mod metrics;
pub mod model_store;
pub mod observed;
pub mod peer_service;
pub mod planner;
pub mod pusher;
pub mod service;
pub mod state;
pub mod storage;
pub mod transport;
