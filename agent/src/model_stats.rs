//! Cumulative per-task counters in the shape of Triton's model statistics (the
//! `ModelStatistics` extension of the standard protocol), kept since the agent started, in
//! Triton's sense: `inference_stats.success` and `fail` count a client's requests (one V2
//! request of four samples is one), `inference_count` the samples served, `execution_count`
//! and `batch_stats` the batches the model ran.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tidal_proto::inference::{InferBatchStatistics, InferStatistics, ModelStatistics, StatisticDuration};
use tidal_proto::v1::InferResponse;

/// How many times something happened, and how long it took in all.
#[derive(Default, Clone, Copy)]
struct Total {
    count: u64,
    ns: u64,
}

impl Total {
    fn add(&mut self, ns: u64) {
        self.count += 1;
        self.ns = self.ns.saturating_add(ns);
    }

    fn to_proto(self) -> Option<StatisticDuration> {
        Some(StatisticDuration { count: self.count, ns: self.ns })
    }
}

/// Batches of one size, counted from their samples: each adds 1/size of its batch.
#[derive(Default, Clone, Copy)]
struct Batches {
    executions: f64,
    ns: f64,
}

#[derive(Default, Clone)]
struct Counters {
    /// Clients' requests served, and refused or failed, end to end.
    success: Total,
    fail: Total,
    /// Samples served.
    inferences: u64,
    queue: Total,
    compute: Total,
    /// By the batch size the sample's last stage ran in.
    batches: BTreeMap<u32, Batches>,
    last_inference_ms: u64,
}

#[derive(Default)]
pub struct ModelStats {
    tasks: Mutex<HashMap<String, Counters>>,
}

impl ModelStats {
    fn with(&self, task: &str, f: impl FnOnce(&mut Counters)) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        f(tasks.entry(task.to_string()).or_default());
    }

    /// Counts a client's request of `task` that arrived at `arrived`, however many samples it
    /// held: served, or not.
    pub fn record_request(&self, task: &str, arrived: Instant, served: bool) {
        let took = arrived.elapsed().as_nanos() as u64;
        let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        self.with(task, |c| {
            c.last_inference_ms = now_ms;
            if served {
                c.success.add(took)
            } else {
                c.fail.add(took)
            }
        });
    }

    /// Counts one sample served: its queueing, its time in the model, and its batch.
    pub fn record_inference(&self, task: &str, served: &InferResponse) {
        let queue_us: u64 = served.stages.iter().map(|s| s.queue_us).sum();
        let run_us: u64 = served.stages.iter().map(|s| s.run_us).sum();
        let size = served.batch_size.max(1);
        let last_run_us = served.stages.last().map_or(run_us, |s| s.run_us);
        self.with(task, |c| {
            c.inferences += 1;
            c.queue.add(queue_us * 1000);
            c.compute.add(run_us * 1000);
            let b = c.batches.entry(size).or_default();
            b.executions += 1.0 / f64::from(size);
            b.ns += last_run_us as f64 * 1000.0 / f64::from(size);
        });
    }

    /// The statistics of `tasks` (zero for one not served yet), and of every task served
    /// since the start when `all`; sorted by name.
    pub fn snapshot(&self, tasks: &[String], all: bool) -> Vec<ModelStatistics> {
        let seen = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        let mut names: Vec<&String> = tasks.iter().collect();
        if all {
            names.extend(seen.keys());
        }
        names.sort();
        names.dedup();
        let none = Counters::default();
        names.into_iter().map(|n| to_proto(n, seen.get(n).unwrap_or(&none))).collect()
    }
}

fn to_proto(name: &str, c: &Counters) -> ModelStatistics {
    let zero = Total { count: c.inferences, ns: 0 };
    let batch_stats: Vec<InferBatchStatistics> = c
        .batches
        .iter()
        .map(|(&size, b)| {
            let count = b.executions.round() as u64;
            InferBatchStatistics {
                batch_size: u64::from(size),
                compute_input: Total { count, ns: 0 }.to_proto(),
                compute_infer: Total { count, ns: b.ns.round() as u64 }.to_proto(),
                compute_output: Total { count, ns: 0 }.to_proto(),
            }
        })
        .collect();
    ModelStatistics {
        name: name.to_string(),
        version: "1".into(),
        last_inference: c.last_inference_ms,
        inference_count: c.inferences,
        execution_count: c.batches.values().map(|b| b.executions).sum::<f64>().round() as u64,
        inference_stats: Some(InferStatistics {
            success: c.success.to_proto(),
            fail: c.fail.to_proto(),
            queue: c.queue.to_proto(),
            // Time inside ONNX Runtime; the copies to and from the worker are the "overhead" that
            // Triton's tools derive (success minus queue minus compute).
            compute_input: zero.to_proto(),
            compute_infer: c.compute.to_proto(),
            compute_output: zero.to_proto(),
            cache_hit: None,
            cache_miss: None,
        }),
        batch_stats,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidal_proto::v1::StageServed;

    fn served(batch: u32, queue_us: u64, total_us: u64) -> InferResponse {
        let run_us = total_us - queue_us;
        let stage = StageServed { batch_size: batch, queue_us, total_us, run_us, ..Default::default() };
        InferResponse { batch_size: batch, queue_us, total_us, stages: vec![stage], ..Default::default() }
    }

    #[test]
    fn requests_inferences_and_batches_are_counted_apart() {
        let stats = ModelStats::default();
        let t0 = Instant::now();
        // One client request of four samples, served in one batch of four.
        for _ in 0..4 {
            stats.record_inference("a", &served(4, 100, 1100));
        }
        stats.record_request("a", t0, true);
        // A request refused, and one of one sample served alone.
        stats.record_request("a", t0, false);
        stats.record_inference("a", &served(1, 0, 500));
        stats.record_request("a", t0, true);
        stats.record_inference("b", &served(1, 0, 500));
        stats.record_request("b", t0, true);
        let all = stats.snapshot(&["c".into()], true);
        assert_eq!(all.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(), ["a", "b", "c"]);
        let a = &stats.snapshot(&["a".into()], false)[0];
        let s = a.inference_stats.as_ref().unwrap();
        assert_eq!(s.success.unwrap().count, 2, "requests, not samples");
        assert_eq!(s.fail.unwrap().count, 1);
        assert_eq!(a.inference_count, 5, "samples");
        assert_eq!(a.execution_count, 2, "a batch of four and a batch of one");
        assert_eq!(s.queue.unwrap().ns, 4 * 100_000);
        assert_eq!(s.compute_infer.unwrap().ns, 4 * 1_000_000 + 500_000);
        let batches: Vec<(u64, u64, u64)> = a
            .batch_stats
            .iter()
            .map(|b| (b.batch_size, b.compute_infer.unwrap().count, b.compute_infer.unwrap().ns))
            .collect();
        assert_eq!(batches, [(1, 1, 500_000), (4, 1, 1_000_000)]);
        assert!(a.last_inference > 0);
        let c = &stats.snapshot(&["c".into()], false)[0];
        assert_eq!((c.name.as_str(), c.inference_count), ("c", 0), "a task not served yet has zero counts");
    }
}
