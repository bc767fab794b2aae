//! Cumulative per-task counters in the shape of Triton's model statistics (the
//! `ModelStatistics` extension of the standard protocol), kept since the agent started.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tidal_proto::inference::{InferStatistics, ModelStatistics, StatisticDuration};
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

#[derive(Default, Clone, Copy)]
struct Counters {
    success: Total,
    fail: Total,
    queue: Total,
    compute: Total,
    /// Batches run: each request adds 1/batch of the batch its last stage ran in.
    executions: f64,
    last_inference_ms: u64,
}

#[derive(Default)]
pub struct ModelStats {
    tasks: Mutex<HashMap<String, Counters>>,
}

impl ModelStats {
    /// Counts a request of `task` that arrived at `arrived` and was served (`Some`) or not.
    pub fn record(&self, task: &str, arrived: Instant, served: Option<&InferResponse>) {
        let took = arrived.elapsed().as_nanos() as u64;
        let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        let c = tasks.entry(task.to_string()).or_default();
        c.last_inference_ms = now_ms;
        let Some(r) = served else {
            c.fail.add(took);
            return;
        };
        c.success.add(took);
        let queue_us: u64 = r.stages.iter().map(|s| s.queue_us).sum();
        let run_us: u64 = r.stages.iter().map(|s| s.run_us).sum();
        c.queue.add(queue_us * 1000);
        c.compute.add(run_us * 1000);
        c.executions += 1.0 / f64::from(r.batch_size.max(1));
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
        names.into_iter().map(|n| to_proto(n, &seen.get(n).copied().unwrap_or_default())).collect()
    }
}

fn to_proto(name: &str, c: &Counters) -> ModelStatistics {
    let zero = Total { count: c.success.count, ns: 0 };
    ModelStatistics {
        name: name.to_string(),
        version: "1".into(),
        last_inference: c.last_inference_ms,
        inference_count: c.success.count,
        execution_count: c.executions.round() as u64,
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
    fn successes_failures_queueing_and_batches_add_up() {
        let stats = ModelStats::default();
        let t0 = Instant::now();
        for _ in 0..4 {
            stats.record("a", t0, Some(&served(4, 100, 1100)));
        }
        stats.record("a", t0, None);
        stats.record("b", t0, Some(&served(1, 0, 500)));
        let all = stats.snapshot(&["c".into()], true);
        assert_eq!(all.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(), ["a", "b", "c"]);
        let a = &stats.snapshot(&["a".into()], false)[0];
        let s = a.inference_stats.as_ref().unwrap();
        assert_eq!(a.inference_count, 4);
        assert_eq!(a.execution_count, 1, "four requests served in one batch of four");
        assert_eq!(s.success.unwrap().count, 4);
        assert_eq!(s.fail.unwrap().count, 1);
        assert_eq!(s.queue.unwrap().ns, 4 * 100_000);
        assert_eq!(s.compute_infer.unwrap().ns, 4 * 1_000_000);
        assert!(a.last_inference > 0);
        let c = &stats.snapshot(&["c".into()], false)[0];
        assert_eq!((c.name.as_str(), c.inference_count), ("c", 0), "a task not served yet has zero counts");
    }
}
