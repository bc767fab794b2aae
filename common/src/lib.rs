//! Code shared by Tidal's agent, controller and CLI.
//!
//! The models (latency, solver, forecasters, placement, the executor contract, the simulator,
//! the model generators, which build bytes and write nothing) are pure and deterministic — no
//! clocks, threads or I/O — so that the live system, the simulator and the tests call the very
//! same functions. Four modules read files, and only at their edges: the task file
//! ([`task_file`]), a model directory's variants and profiles ([`variant`]), the
//! signature of a model file ([`onnx_signature::check_file`]) and its digest
//! ([`digest::sha256_file`]). The daemons' shared edges (logging, the metrics
//! endpoint) live in `tidal-daemon`.

pub mod adapt;
pub mod digest;
pub mod executor;
pub mod forecast;
pub mod generation;
pub mod latency;
pub mod memory;
pub mod onnx_graph;
pub mod onnx_signature;
pub mod padding;
pub mod plan;
pub mod profile;
pub mod profile_correction;
pub mod reconcile;
pub mod resnet;
pub mod seq2seq;
pub mod shed;
pub mod sim;
pub mod slack;
pub mod solver;
pub mod speech;
pub mod task;
pub mod task_file;
pub mod tensor;
pub mod text;
pub mod transformer;
pub mod triton_repo;
pub mod v2_tensor;
pub mod variant;
pub mod yolo;
pub mod zoo;
