//! The cross-process tests: controllers, agents, workers and `tidalctl` as real processes,
//! driven through their ports and by clients' own tools.
//!
//! One test binary with a module per file rather than a binary per file: each binary linked
//! the whole workspace again, and the 33 of them took about 5 of `make test`'s build minutes.
//! Every test takes its file's turn first (`tidal_tests::file_turn`), so tests of one file
//! run beside each other, as before, and never beside another file's.

mod adaptation;
mod advisories;
mod agent_serving;
mod ansible;
mod audio_qa;
mod controller_list;
mod edge;
mod generation;
mod ha;
mod idle;
mod input_sizes;
mod memory;
mod model_fetch;
mod nlp_pipeline;
mod observability;
mod pipeline;
mod policies_live;
mod profile_correction;
mod readme;
mod resize;
mod routing;
mod security;
mod shared_cluster;
mod signatures;
mod simulate;
mod slack_routing;
mod storage;
mod systemd;
mod task_lifecycle;
mod text_pipelines;
mod triton_import;
mod user_models;
mod v2_protocol;
mod vm;
