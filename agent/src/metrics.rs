//! The agent's Prometheus metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::AtomicU64;
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
pub struct StageLabels {
    pub task: String,
    pub stage: String,
}

/// A request the plan's pick would have refused, sent to another variant of its stage.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RerouteLabels {
    pub task: String,
    pub stage: String,
    pub from: String,
    pub to: String,
}

/// One attempt to fetch a model file from one controller replica.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FetchLabels {
    /// `fetched` (whole, with its recorded digest, kept) or `failed` (unreachable, refused,
    /// truncated, corrupt, or no room in the cache).
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabels {
    pub worker: String,
    pub task: String,
    pub variant: String,
}

pub struct AgentMetrics {
    pub requests: Family<RequestLabels, Counter>,
    pub forwarded_requests: Family<RequestLabels, Counter>,
    pub latency: Family<TaskLabels, Histogram>,
    /// How long requests for a task without a worker waited for one (a cold start).
    pub cold_start: Family<TaskLabels, Histogram>,
    pub stage_skips: Family<StageLabels, Counter>,
    pub slack_reroutes: Family<RerouteLabels, Counter>,
    pub plan_epoch: Gauge,
    pub resizes: Counter,
    pub plan_apply: Histogram,
    pub inflight_bytes: Gauge,
    worker_cpu_limit: Family<WorkerLabels, Gauge<f64, AtomicU64>>,
    worker_queue: Family<WorkerLabels, Gauge>,
    worker_threads: Family<WorkerLabels, Gauge>,
    worker_cpu_usage: Family<WorkerLabels, Gauge<f64, AtomicU64>>,
    worker_throttled_periods: Family<WorkerLabels, Counter>,
    worker_throttled_seconds: Family<WorkerLabels, Counter<f64, AtomicU64>>,
    worker_restarts: Family<WorkerLabels, Counter>,
    pub model_fetches: Family<FetchLabels, Counter>,
    pub model_fetched_bytes: Counter,
}

impl AgentMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            requests: Family::default(),
            forwarded_requests: Family::default(),
            latency: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.001, 2.0, 16))),
            // 50 ms .. ~100 s.
            cold_start: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.05, 2.0, 12))),
            stage_skips: Family::default(),
            slack_reroutes: Family::default(),
            plan_epoch: Gauge::default(),
            resizes: Counter::default(),
            // 10 µs .. ~5 s.
            plan_apply: Histogram::new(exponential_buckets(0.00001, 2.5, 15)),
            inflight_bytes: Gauge::default(),
            worker_cpu_limit: Family::default(),
            worker_queue: Family::default(),
            worker_threads: Family::default(),
            worker_cpu_usage: Family::default(),
            worker_throttled_periods: Family::default(),
            worker_throttled_seconds: Family::default(),
            worker_restarts: Family::default(),
            model_fetches: Family::default(),
            model_fetched_bytes: Counter::default(),
        };
        let r = registry.sub_registry_with_prefix("tidal_agent");
        r.register(
            "requests",
            "Inference requests clients sent to this agent, by task and outcome",
            m.requests.clone(),
        );
        r.register(
            "forwarded_requests",
            "Inference requests other agents forwarded to this one, by task and outcome",
            m.forwarded_requests.clone(),
        );
        r.register_with_unit("request_duration", "Latency of served client requests", Unit::Seconds, m.latency.clone());
        r.register_with_unit(
            "cold_start_wait",
            "How long requests for a task without a worker (unloaded while idle) waited for a ready one",
            Unit::Seconds,
            m.cold_start.clone(),
        );
        r.register(
            "stage_skips",
            "Requests that skipped a stage by the label the stage before gave them (a task's `skip`)",
            m.stage_skips.clone(),
        );
        r.register(
            "slack_reroutes",
            "Requests the plan's pick would have refused (too late by its queue) that another variant of the stage took",
            m.slack_reroutes.clone(),
        );
        r.register("plan_epoch", "Epoch of the plan applied", m.plan_epoch.clone());
        r.register("resizes", "In-place CPU quota changes", m.resizes.clone());
        r.register_with_unit(
            "plan_apply_duration",
            "From a plan's arrival to its changes in place (quotas in the kernel, batching, routes)",
            Unit::Seconds,
            m.plan_apply.clone(),
        );
        r.register_with_unit(
            "inflight_request",
            "Bytes of requests admitted and not yet answered (--max-inflight-bytes bounds them)",
            Unit::Bytes,
            m.inflight_bytes.clone(),
        );
        r.register(
            "model_fetches",
            "Attempts to fetch a model file from a controller replica, by outcome",
            m.model_fetches.clone(),
        );
        r.register_with_unit(
            "model_fetched",
            "Bytes of model files fetched whole, checked and kept in the cache",
            Unit::Bytes,
            m.model_fetched_bytes.clone(),
        );
        r.register("worker_cpu_limit_cores", "CPU limit of each worker, in cores", m.worker_cpu_limit.clone());
        r.register("worker_queue_length", "Requests waiting in each worker's queue", m.worker_queue.clone());
        r.register(
            "worker_threads",
            "ONNX Runtime intra-op threads each worker's last batch ran with (they follow its CPU limit)",
            m.worker_threads.clone(),
        );
        r.register("worker_cpu_usage_cores", "CPU each worker used lately, in cores", m.worker_cpu_usage.clone());
        r.register(
            "worker_cpu_throttled_periods",
            "CFS periods each worker was throttled in",
            m.worker_throttled_periods.clone(),
        );
        r.register_with_unit(
            "worker_cpu_throttled",
            "Time each worker was throttled",
            Unit::Seconds,
            m.worker_throttled_seconds.clone(),
        );
        r.register("worker_restarts", "Times each worker process was restarted", m.worker_restarts.clone());
        m
    }

    /// Replaces the per-worker series with the current workers. The cumulative ones are
    /// counters set to the worker's totals (a series starts afresh with its worker).
    pub fn set_workers(&self, workers: &[WorkerTelemetry]) {
        self.worker_cpu_limit.clear();
        self.worker_queue.clear();
        self.worker_threads.clear();
        self.worker_cpu_usage.clear();
        self.worker_throttled_periods.clear();
        self.worker_throttled_seconds.clear();
        self.worker_restarts.clear();
        for w in workers {
            let labels = WorkerLabels { worker: w.id.clone(), task: w.task.clone(), variant: w.variant.clone() };
            self.worker_cpu_limit.get_or_create(&labels).set(w.millicores as f64 / 1000.0);
            self.worker_queue.get_or_create(&labels).set(w.queue_len as i64);
            self.worker_threads.get_or_create(&labels).set(i64::from(w.threads));
            self.worker_cpu_usage.get_or_create(&labels).set(w.cpu_usage_cores);
            self.worker_throttled_periods.get_or_create(&labels).inc_by(w.nr_throttled);
            self.worker_throttled_seconds.get_or_create(&labels).inc_by(w.throttled_us as f64 / 1e6);
            self.worker_restarts.get_or_create(&labels).inc_by(w.restarts as u64);
        }
    }
}
