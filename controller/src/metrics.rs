//! The controller's Prometheus metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TaskLabels {
    pub task: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VariantLabels {
    pub task: String,
    pub variant: String,
}

/// Which form of a plan a size is of: `whole` (as committed), `log_entry` (the Raft entry:
/// its change from the plan in force), `agent` (cut for one agent, as pushed).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PlanForm {
    pub form: &'static str,
}

/// A push of a plan to an agent: sent as a change (`delta`) or whole (`plan`), and what came
/// of it (`applied`, `not_the_base`: the agent held another plan and was sent it whole,
/// `refused`, `no_answer`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PushOutcome {
    pub form: &'static str,
    pub outcome: &'static str,
}

pub struct ControllerMetrics {
    pub plan_pushes: Family<PushOutcome, Counter>,
    pub plan_bytes: Family<PlanForm, Histogram>,
    pub plan_delivery_seconds: Histogram,
    pub plan_epoch: Gauge,
    pub plans_committed: Counter,
    pub workers_moved: Counter,
    pub adaptation_seconds: Histogram,
    pub forecast_rps: Family<TaskLabels, Gauge<f64, AtomicU64>>,
    pub planned_rps: Family<TaskLabels, Gauge<f64, AtomicU64>>,
    pub observed_rps: Family<TaskLabels, Gauge<f64, AtomicU64>>,
    pub raft_term: Gauge,
    pub is_leader: Gauge,
    pub raft_commit_index: Gauge,
    pub raft_applied_index: Gauge,
    pub raft_snapshot_index: Gauge,
    pub raft_voters: Gauge,
    pub worker_oom_kills: Family<VariantLabels, Counter>,
}

impl ControllerMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            plan_pushes: Family::default(),
            plan_bytes: Family::new_with_constructor(|| Histogram::new(exponential_buckets(256.0, 4.0, 10))),
            plan_delivery_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            plan_epoch: Gauge::default(),
            plans_committed: Counter::default(),
            workers_moved: Counter::default(),
            adaptation_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 18)),
            forecast_rps: Family::default(),
            planned_rps: Family::default(),
            observed_rps: Family::default(),
            raft_term: Gauge::default(),
            is_leader: Gauge::default(),
            raft_commit_index: Gauge::default(),
            raft_applied_index: Gauge::default(),
            raft_snapshot_index: Gauge::default(),
            raft_voters: Gauge::default(),
            worker_oom_kills: Family::default(),
        };
        let r = registry.sub_registry_with_prefix("tidal_controller");
        r.register("plan_epoch", "Epoch of the committed plan", m.plan_epoch.clone());
        r.register("plans_committed", "Plans this replica committed as leader", m.plans_committed.clone());
        r.register(
            "workers_moved",
            "Workers the plans this replica committed moved to another node (a model load each)",
            m.workers_moved.clone(),
        );
        r.register(
            "adaptation_seconds",
            "Time to forecast and solve one adaptation round",
            m.adaptation_seconds.clone(),
        );
        r.register("plan_pushes", "Plans pushed to agents, by form and outcome", m.plan_pushes.clone());
        r.register("plan_bytes", "Encoded size of each plan, by form", m.plan_bytes.clone());
        r.register(
            "plan_delivery_seconds",
            "From a new plan's proposal to an agent's answer that it applied it, per agent",
            m.plan_delivery_seconds.clone(),
        );
        r.register("forecast_requests_per_second", "Forecast peak arrival rate per task", m.forecast_rps.clone());
        r.register(
            "planned_requests_per_second",
            "Arrival rate the plan is sized for per task (the forecast as the scale-down stabiliser holds it)",
            m.planned_rps.clone(),
        );
        r.register("observed_requests_per_second", "Arrival rate per task over the last 5 s", m.observed_rps.clone());
        r.register("raft_term", "Current Raft term", m.raft_term.clone());
        r.register("is_leader", "1 on the leader", m.is_leader.clone());
        r.register("raft_commit_index", "Highest log index known committed", m.raft_commit_index.clone());
        r.register("raft_applied_index", "Highest log index applied to the state", m.raft_applied_index.clone());
        r.register("raft_snapshot_index", "Log index of the latest snapshot", m.raft_snapshot_index.clone());
        r.register("raft_voters", "Voting replicas in the group, as this replica sees it", m.raft_voters.clone());
        r.register(
            "worker_oom_kills",
            "Workers the kernel's OOM killer killed over their memory limit, as the agents reported them to this \
             replica while it led",
            m.worker_oom_kills.clone(),
        );
        m
    }
}
