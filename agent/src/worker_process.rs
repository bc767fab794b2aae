//! The worker process: one ONNX Runtime session, running the batches the agent sends.
//!
//! It is the agent's own binary started as `tidal-agent worker`, placed in its own cgroup by
//! the agent. It does one thing at a time — read a batch from stdin, run it, write the result
//! to stdout — so its CPU use is exactly what the cgroup quota allows, and it exits when the
//! agent closes its stdin (or dies).

use std::io::{BufReader, BufWriter};
use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use ort::session::{builder::GraphOptimizationLevel, Session};
use ort::value::Tensor;

use crate::worker_protocol::{from_bytes, read_frame, to_bytes, write_frame, Batch, BatchResult, Ready};

/// Loads ONNX Runtime from `ort_lib` and opens a session for `model` with `threads` intra-op
/// threads (spinning off, so that idle threads do not burn the worker's quota).
pub fn open_session(ort_lib: &Path, model: &Path, threads: usize) -> anyhow::Result<Session> {
    let env = ort::init_from(ort_lib)
        .with_context(|| format!("loading ONNX Runtime from {}", ort_lib.display()))?
        .with_name("tidal-worker")
        .build()
        .context("creating the ONNX Runtime environment")?;
    let session = Session::builder(&env)?
        .with_optimization_level(GraphOptimizationLevel::Level3)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .with_intra_threads(threads.max(1))
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .with_inter_threads(1)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .with_intra_op_spinning(false)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .commit_from_file(model)
        .with_context(|| format!("loading the model {}", model.display()))?;
    Ok(session)
}

/// Runs one batch through the session: returns the first output's shape and values (as the
/// frames carry them).
pub fn run_batch(session: &mut Session, input: &str, batch: Batch) -> anyhow::Result<(Vec<i64>, Vec<u8>)> {
    let tensor = Tensor::from_array((batch.shape, from_bytes(&batch.data))).context("building the input tensor")?;
    let outputs = session.run(ort::inputs![input => tensor]).context("running the model")?;
    let (shape, data) = outputs[0].try_extract_tensor::<f32>().context("reading the output tensor")?;
    Ok((shape.iter().copied().collect(), to_bytes(data)))
}

/// The worker's main loop.
pub fn serve(ort_lib: &Path, model: &Path, threads: usize) -> anyhow::Result<()> {
    let mut out = BufWriter::new(std::io::stdout().lock());
    let mut input = BufReader::new(std::io::stdin().lock());
    let mut session = match open_session(ort_lib, model, threads) {
        Ok(s) => s,
        Err(e) => {
            write_frame(&mut out, &Ready { error: format!("{e:#}"), ..Default::default() })?;
            return Err(e);
        }
    };
    let input_name = session.inputs()[0].name().to_string();
    let output_name = session.outputs()[0].name().to_string();
    write_frame(&mut out, &Ready { input_name: input_name.clone(), output_name, error: String::new() })?;
    while let Some(batch) = read_frame::<Batch>(&mut input)? {
        let started = Instant::now();
        let id = batch.id;
        let result = match run_batch(&mut session, &input_name, batch) {
            Ok((shape, data)) => BatchResult { id, shape, data, ..Default::default() },
            Err(e) => BatchResult { id, error: format!("{e:#}"), ..Default::default() },
        };
        let result = BatchResult { run_us: started.elapsed().as_micros() as u64, ..result };
        write_frame(&mut out, &result)?;
    }
    Ok(())
}
