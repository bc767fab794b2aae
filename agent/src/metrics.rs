//! The agent's Prometheus metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tidal_proto::v1::WorkerTelemetry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub task: String,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TaskLabels {
    pub task: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabels {
    pub worker: String,
    pub task: String,
    pub variant: String,
}

pub struct AgentMetrics {
    pub requests: Family<RequestLabels, Counter>,
    pub latency: Family<TaskLabels, Histogram>,
    pub plan_epoch: Gauge,
    pub resizes: Counter,
    worker_millicores: Family<WorkerLabels, Gauge>,
    worker_queue: Family<WorkerLabels, Gauge>,
    worker_cpu_millicores: Family<WorkerLabels, Gauge>,
    worker_throttled: Family<WorkerLabels, Gauge>,
    worker_restarts: Family<WorkerLabels, Gauge>,
}

impl AgentMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            requests: Family::default(),
            latency: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.001, 2.0, 16))),
            plan_epoch: Gauge::default(),
            resizes: Counter::default(),
            worker_millicores: Family::default(),
            worker_queue: Family::default(),
            worker_cpu_millicores: Family::default(),
            worker_throttled: Family::default(),
            worker_restarts: Family::default(),
        };
        let r = registry.sub_registry_with_prefix("tidal_agent");
        r.register("requests", "Inference requests by task and outcome", m.requests.clone());
        r.register("request_duration_seconds", "Latency of served requests", m.latency.clone());
        r.register("plan_epoch", "Epoch of the plan applied", m.plan_epoch.clone());
        r.register("resizes", "In-place CPU quota changes", m.resizes.clone());
        r.register("worker_millicores", "CPU limit of each worker", m.worker_millicores.clone());
        r.register("worker_queue_length", "Requests waiting in each worker's queue", m.worker_queue.clone());
        r.register("worker_cpu_usage_millicores", "CPU each worker used lately", m.worker_cpu_millicores.clone());
        r.register("worker_throttled_periods", "CFS periods each worker was throttled in", m.worker_throttled.clone());
        r.register("worker_restarts", "Times each worker process was restarted", m.worker_restarts.clone());
        m
    }

    /// Replaces the per-worker gauges with the current workers.
    pub fn set_workers(&self, workers: &[WorkerTelemetry]) {
        for family in [
            &self.worker_millicores,
            &self.worker_queue,
            &self.worker_cpu_millicores,
            &self.worker_throttled,
            &self.worker_restarts,
        ] {
            family.clear();
        }
        for w in workers {
            let labels = WorkerLabels { worker: w.id.clone(), task: w.task.clone(), variant: w.variant.clone() };
            self.worker_millicores.get_or_create(&labels).set(w.millicores as i64);
            self.worker_queue.get_or_create(&labels).set(w.queue_len as i64);
            self.worker_cpu_millicores.get_or_create(&labels).set((w.cpu_usage_cores * 1000.0) as i64);
            self.worker_throttled.get_or_create(&labels).set(w.nr_throttled as i64);
            self.worker_restarts.get_or_create(&labels).set(w.restarts as i64);
        }
    }
}
