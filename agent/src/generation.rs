//! Budgets of a stage whose model writes tokens (`TextIo.generate`): each request of a batch
//! may write the task's most, or fewer when its remaining time affords fewer at the cost per
//! token the worker has measured on its own batches (`tidal_common::generation`, the
//! simulator's rule too). The model stops each sample at its budget (common/src/seq2seq.rs),
//! so a request whose time runs out mid-text is answered with what it wrote, or refused when
//! the task says so (common/src/text.rs).

use std::time::Instant;

use tidal_common::generation::TokenCost;
use tidal_common::tensor::StageIo;
use tidal_proto::v1::Generate;

use crate::queue::Pending;
use crate::worker_protocol::FrameTensor;

/// Sets each request's budget input to what its remaining time affords (the task's most
/// before anything is measured).
pub fn fill_budgets(io: &StageIo, generate: &Generate, batch: &mut [Pending], now: Instant, cost: &TokenCost) {
    let Some(i) = io.inputs.iter().position(|d| d.name == generate.budget) else { return };
    for p in batch {
        let tokens = cost.affordable(p.deadline.saturating_duration_since(now), generate.max_tokens);
        if let Some(t) = p.inputs.get_mut(i) {
            t.data = i64::from(tokens).to_le_bytes().to_vec();
        }
    }
}

/// The steps a batch took: its tokens output's length (under the model's name or the stage's).
pub fn steps_taken(outputs: &[FrameTensor], names: [&str; 2]) -> usize {
    outputs
        .iter()
        .find(|o| names.contains(&o.name.as_str()))
        .and_then(|o| o.shape.get(1))
        .map_or(0, |&s| s.max(0) as usize)
}
