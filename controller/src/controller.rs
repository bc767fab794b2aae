//! The controller's core: the replicated state (through Raft), what it observes from agents,
//! the adaptation loop and the pushing of plans to agents.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tidal_common::forecast::{Forecaster, ScaleDownStabiliser};
use tidal_proto::v1::agent_client::AgentClient;
use tidal_proto::v1::{command::Change, ApplyPlanRequest, Command, Plan};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tracing::{info, info_span, warn, Instrument};

use crate::consensus::{ProposeError, RaftHandle};
use crate::metrics::{ControllerMetrics, TaskLabels};
use crate::observed::Observed;
use crate::planner::{next_plan, same_assignments, PlannerConfig};

pub struct ControllerConfig {
    pub interval: Duration,
    pub planner: PlannerConfig,
    /// Seconds of arrival history the forecaster sees.
    pub forecast_window_s: u64,
    /// Adaptation rounds the forecast must stay lower before a plan is sized down.
    pub scale_down_after: u32,
    /// Address of this replica's API, shown to clients.
    pub advertise: String,
}

pub struct Controller {
    pub raft: RaftHandle,
    pub cfg: ControllerConfig,
    pub observed: Mutex<Observed>,
    pub metrics: ControllerMetrics,
    forecaster: Box<dyn Forecaster>,
    /// Wakes the adaptation loop early (a task, profile, SLO or node changed).
    pub replan: Notify,
    clients: Mutex<HashMap<String, AgentClient<Channel>>>,
    last_push: Mutex<HashMap<String, Instant>>,
    last_surge: Mutex<Option<Instant>>,
    /// Per task: the hysteresis between forecasts and the rate planned for.
    stabilisers: Mutex<BTreeMap<String, ScaleDownStabiliser>>,
}

/// Seconds of arrivals a surge is judged on, and the least time between two surge re-plans.
const SURGE_WINDOW_S: u64 = tidal_common::forecast::SURGE_WINDOW_S as u64;
const SURGE_COOLDOWN: Duration = Duration::from_secs(3);

impl Controller {
    pub fn new(
        raft: RaftHandle,
        cfg: ControllerConfig,
        forecaster: Box<dyn Forecaster>,
        metrics: ControllerMetrics,
    ) -> Arc<Self> {
        Arc::new(Self {
            raft,
            cfg,
            observed: Mutex::new(Observed::new(Instant::now())),
            metrics,
            forecaster,
            replan: Notify::new(),
            clients: Mutex::new(HashMap::new()),
            last_push: Mutex::new(HashMap::new()),
            last_surge: Mutex::new(None),
            stabilisers: Mutex::new(BTreeMap::new()),
        })
    }

    pub fn observed<R>(&self, f: impl FnOnce(&mut Observed) -> R) -> R {
        f(&mut self.observed.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The adaptation loop. A follower waits to lead; a leader takes over and then, every
    /// interval (or sooner when something changed), forecasts, solves, commits and pushes. It
    /// stops at once, mid-round if need be, when this replica loses leadership: a deposed
    /// leader's proposals cannot commit anyway, and agents refuse its older plans.
    pub async fn run_adaptation(self: Arc<Self>, stop: CancellationToken) {
        let mut status = self.raft.watch();
        loop {
            let term = tokio::select! {
                s = status.wait_for(|s| s.is_leader) => match s {
                    Ok(s) => s.term,
                    Err(_) => return,
                },
                _ = stop.cancelled() => return,
            };
            let mut watch = self.raft.watch();
            let lost = async move {
                let _ = watch.wait_for(|s| !(s.is_leader && s.term == term)).await;
            };
            tokio::select! {
                _ = self.lead(term) => {}
                _ = lost => info!(term, "lost leadership; adaptation stopped"),
                _ = stop.cancelled() => return,
            }
        }
    }

    /// What the leader of `term` does until it is deposed.
    async fn lead(&self, term: u64) {
        let span = info_span!("lead", term);
        while let Err(e) = self.take_over(term).instrument(span.clone()).await {
            warn!(term, error = %e, "taking over as leader failed; retrying");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.cfg.interval) => {}
                _ = self.replan.notified() => {
                    // Let a burst of changes (e.g. five profiles) settle into one plan.
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
            if let Err(e) = self.adapt_once(term).instrument(info_span!("adapt", term)).await {
                warn!(error = %e, "adaptation round failed");
            }
        }
    }

    /// A new leader's first steps: catch up with everything committed before its term (read
    /// index), start observing afresh from the last plan's rates, and commit and push that
    /// plan again under its own term, which fences off plans of the deposed leader.
    async fn take_over(&self, term: u64) -> Result<(), ProposeError> {
        self.raft.read_index().await?;
        let current = self.raft.read(|s| s.plan.clone());
        let planned: BTreeMap<String, f64> =
            current.as_ref().map(|p| p.planned_rps.clone().into_iter().collect()).unwrap_or_default();
        self.observed(|o| {
            *o = Observed::new(Instant::now());
            o.forecasts = planned.clone();
        });
        {
            let mut stabilisers = self.stabilisers.lock().unwrap_or_else(|p| p.into_inner());
            stabilisers.clear();
            for (task, rate) in &planned {
                let mut s = ScaleDownStabiliser::new(self.cfg.scale_down_after);
                s.next(*rate);
                stabilisers.insert(task.clone(), s);
            }
        }
        let Some(current) = current else {
            info!(term, "leading; no plan committed yet");
            self.adapt_once(term).await?;
            return Ok(());
        };
        let id = self.raft.status().id;
        let plan = Plan {
            epoch: current.epoch + 1,
            term,
            notes: vec![format!(
                "replica {id} took over as leader in term {term}; plan {} carried over",
                current.epoch
            )],
            ..current
        };
        self.raft.propose(Command { change: Some(Change::CommitPlan(plan.clone())) }).await?;
        info!(term, epoch = plan.epoch, "leading; the current plan is re-committed under this term");
        self.metrics.plans_committed.inc();
        self.push_all(&plan);
        Ok(())
    }

    /// One adaptation round; returns the plan in force afterwards.
    pub async fn adapt_once(&self, term: u64) -> Result<Option<Plan>, ProposeError> {
        let now = Instant::now();
        let state = self.raft.read(|s| s.clone());
        let forecasts: BTreeMap<String, f64> = self.observed(|o| {
            let mut stabilisers = self.stabilisers.lock().unwrap_or_else(|p| p.into_inner());
            stabilisers.retain(|t, _| state.tasks.contains_key(t));
            let f: BTreeMap<String, f64> = state
                .tasks
                .keys()
                .map(|t| {
                    let history = o.history(t, now, self.cfg.forecast_window_s);
                    let forecast = self.forecaster.forecast(&history, self.cfg.interval.as_secs() as usize);
                    let stabiliser = stabilisers
                        .entry(t.clone())
                        .or_insert_with(|| ScaleDownStabiliser::new(self.cfg.scale_down_after));
                    (t.clone(), stabiliser.next(forecast))
                })
                .collect();
            o.forecasts = f.clone();
            f
        });
        for (task, f) in &forecasts {
            self.metrics.forecast_rps.get_or_create(&TaskLabels { task: task.clone() }).set(*f);
        }
        let mut plan = next_plan(&state, &forecasts, &self.cfg.planner, state.plan_epoch() + 1, term);
        plan.planned_rps = forecasts.clone().into_iter().collect();
        self.metrics.adaptation_seconds.observe(now.elapsed().as_secs_f64());
        if let Some(current) = &state.plan {
            // A plan with the same workers is not committed again, unless an agent moved (the
            // agents route to each other by these addresses).
            if same_assignments(current, &plan) && current.node_addresses == plan.node_addresses {
                self.push_to_lagging(current);
                return Ok(state.plan.clone());
            }
        }
        for note in &plan.notes {
            info!(epoch = plan.epoch, "{note}");
        }
        self.raft.propose(Command { change: Some(Change::CommitPlan(plan.clone())) }).await?;
        info!(epoch = plan.epoch, workers = plan.assignments.len(), "committed a new plan");
        self.metrics.plans_committed.inc();
        self.push_all(&plan);
        Ok(Some(plan))
    }

    /// Re-plans at once, without waiting for the interval, when a task's arrivals over the
    /// last seconds exceed the rate its plan was sized for: a burst that the forecast missed
    /// should cost seconds of overload, not a whole interval.
    pub fn check_surge(&self, now: Instant) {
        if !self.raft.status().is_leader {
            return;
        }
        let surging = self.observed(|o| o.surge(now, SURGE_WINDOW_S));
        let Some((task, rate, planned)) = surging else { return };
        let mut last = self.last_surge.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| now.duration_since(t) < SURGE_COOLDOWN) {
            return;
        }
        *last = Some(now);
        info!(task, rate, planned, "arrivals exceed the planned rate; re-planning now");
        self.replan.notify_one();
    }

    /// Refreshes the gauges that follow state rather than events.
    pub fn refresh_gauges(&self) {
        let raft = self.raft.status();
        self.metrics.raft_term.set(raft.term as i64);
        self.metrics.is_leader.set(raft.is_leader as i64);
        self.metrics.raft_commit_index.set(raft.commit as i64);
        self.metrics.raft_applied_index.set(raft.applied as i64);
        self.metrics.raft_snapshot_index.set(raft.snapshot_index as i64);
        self.metrics.raft_voters.set(raft.voters.len() as i64);
        self.metrics.plan_epoch.set(self.raft.read(|s| s.plan_epoch()) as i64);
        let tasks: Vec<String> = self.raft.read(|s| s.tasks.keys().cloned().collect());
        let now = Instant::now();
        self.observed(|o| {
            for task in tasks {
                let rate = o.rate(&task, now, 5);
                self.metrics.observed_rps.get_or_create(&TaskLabels { task }).set(rate);
            }
        });
    }

    fn push_all(&self, plan: &Plan) {
        let nodes = self.raft.read(|s| s.nodes.clone());
        for (name, info) in nodes {
            self.push(&name, &info.address, plan.clone());
        }
    }

    /// Pushes the current plan to nodes whose last report shows an older epoch.
    fn push_to_lagging(&self, plan: &Plan) {
        let nodes = self.raft.read(|s| s.nodes.clone());
        let lagging: Vec<String> = self.observed(|o| {
            nodes
                .keys()
                .filter(|n| o.reports.get(*n).is_none_or(|(_, r)| r.applied_epoch < plan.epoch))
                .cloned()
                .collect()
        });
        for name in lagging {
            if let Some(info) = nodes.get(&name) {
                self.push(&name, &info.address, plan.clone());
            }
        }
    }

    /// Pushes the current plan to one node if it is behind (at most every 2 s per node).
    pub fn push_if_behind(&self, node: &str, applied_epoch: u64) {
        let Some(plan) = self.raft.read(|s| s.plan.clone()) else {
            return;
        };
        if applied_epoch >= plan.epoch || !self.raft.status().is_leader {
            return;
        }
        {
            let mut last = self.last_push.lock().unwrap_or_else(|p| p.into_inner());
            if last.get(node).is_some_and(|t| t.elapsed() < Duration::from_secs(2)) {
                return;
            }
            last.insert(node.to_string(), Instant::now());
        }
        if let Some(info) = self.raft.read(|s| s.nodes.get(node).cloned()) {
            self.push(node, &info.address, plan);
        }
    }

    fn push(&self, node: &str, address: &str, plan: Plan) {
        let client = {
            let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
            match clients.get(address) {
                Some(c) => c.clone(),
                None => match Channel::from_shared(format!("http://{address}")) {
                    Ok(endpoint) => {
                        let c = AgentClient::new(endpoint.connect_timeout(Duration::from_secs(2)).connect_lazy());
                        clients.insert(address.to_string(), c.clone());
                        c
                    }
                    Err(e) => {
                        warn!(node, address, error = %e, "bad agent address");
                        return;
                    }
                },
            }
        };
        let node = node.to_string();
        let epoch = plan.epoch;
        tokio::spawn(async move {
            let mut client = client;
            let req = tonic::Request::new(ApplyPlanRequest { plan: Some(plan) });
            match tokio::time::timeout(Duration::from_secs(10), client.apply_plan(req)).await {
                Ok(Ok(_)) => info!(node, epoch, "agent applied the plan"),
                Ok(Err(status)) => warn!(node, epoch, %status, "agent refused the plan"),
                Err(_) => warn!(node, epoch, "agent did not answer the plan within 10 s"),
            }
        });
    }
}
