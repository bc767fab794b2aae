//! Serves one variant on a local agent under a fixed plan until interrupted: Tidal as the
//! peer benchmark (`scripts/peers.sh`) measures it beside Triton and Ray Serve, with the same
//! cores and batch limit and no controller re-planning. Prints `serving` once the worker is
//! ready; the agent's inference port is 127.0.0.1:7199 (KServe V2 and Tidal's own API).
//!
//! `cargo run --release -p tidal-agent --example static_plan -- MODEL_DIR VARIANT MILLICORES MAX_BATCH`

use std::path::PathBuf;

use anyhow::Context;
use tidal_common::variant::VariantConfig;
use tidal_proto::v1::agent_client::AgentClient;

mod support;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let model_dir = PathBuf::from(args.next().unwrap_or_else(|| "models".into()));
    let variant = args.next().unwrap_or_else(|| "resnet18".into());
    let millicores: u32 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(2000);
    let max_batch: u32 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(8);
    let ort_lib = PathBuf::from(std::env::var("TIDAL_ORT_LIB").context("set TIDAL_ORT_LIB")?);
    let cfg = VariantConfig::load(&model_dir, &variant)?;
    let _agent = support::BenchAgent::start(&model_dir, &ort_lib)?;
    let mut control = AgentClient::new(support::channel(support::CONTROL_LISTEN).await?);
    support::apply(&mut control, support::plan(&cfg, 1, millicores, max_batch)).await?;
    println!(
        "serving {} as task {} on {} ({millicores} millicores, batches up to {max_batch})",
        variant,
        support::TASK,
        support::LISTEN
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    Ok(())
}
