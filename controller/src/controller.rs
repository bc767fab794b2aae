//! The controller's core: the replicated state (through Raft), what it observes from agents,
//! the adaptation loop and the pushing of plans to agents.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tidal_auth::Security;
use tidal_common::adapt::{AdaptConfig, Adapter};
use tidal_common::plan::delta::CutDeltas;
use tidal_proto::v1::{command::Change, Command, Plan, ProfileCorrection};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, info_span, warn, Instrument};

use crate::consensus::{ProposeError, RaftHandle};
use crate::metrics::{ControllerMetrics, PlanForm, TaskLabels, VariantLabels};
use crate::observed::{Observed, RoundRates};
use crate::planner;
use crate::pusher::{Push, Pushers};
use prost::Message;

pub struct ControllerConfig {
    /// The adaptation round's settings (policy, interval, forecaster, stabiliser, weights).
    pub adapt: AdaptConfig,
    /// Address of this replica's API, shown to clients.
    pub advertise: String,
    /// A node silent for longer is planned around.
    pub node_timeout: Duration,
}

impl ControllerConfig {
    pub fn interval(&self) -> Duration {
        Duration::from_secs_f64(self.adapt.interval_s.max(0.001))
    }
}

pub struct Controller {
    pub raft: RaftHandle,
    pub cfg: ControllerConfig,
    pub observed: Mutex<Observed>,
    pub metrics: ControllerMetrics,
    /// The adaptation core this leader drives; reset when it takes over.
    /// The round's driver: taken by one round at a time, on a blocking thread.
    adapter: Arc<Mutex<Adapter>>,
    /// Wakes the adaptation loop early (a task, profile, SLO or node changed).
    pub replan: Notify,
    /// Wakes it to reconsider the plan without a new forecast (a worker came up, so the
    /// workers it replaces on other nodes may go).
    pub reconsider: Notify,
    /// Wakes it for a surge: planned at once, without `replan`'s wait for changes to settle
    /// (every 100 ms of it is a burst's requests refused).
    surge: Notify,
    last_push: Mutex<HashMap<String, Instant>>,
    /// How plans reach the agents' control ports: one pusher per agent.
    pub pushers: Pushers,
}

impl Controller {
    pub fn new(raft: RaftHandle, cfg: ControllerConfig, metrics: ControllerMetrics, security: Security) -> Arc<Self> {
        let node_timeout = cfg.node_timeout;
        let adapter = Adapter::new(cfg.adapt.clone());
        Arc::new(Self {
            raft,
            cfg,
            observed: Mutex::new(Observed::new(Instant::now()).with_node_timeout(node_timeout)),
            adapter: Arc::new(Mutex::new(adapter)),
            replan: Notify::new(),
            reconsider: Notify::new(),
            surge: Notify::new(),
            last_push: Mutex::new(HashMap::new()),
            pushers: Pushers::new(security, &metrics),
            metrics,
        })
    }

    fn adapter<R>(&self, f: impl FnOnce(&mut Adapter) -> R) -> R {
        f(&mut self.adapter.lock().unwrap_or_else(|p| p.into_inner()))
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
            let forecast = tokio::select! {
                _ = tokio::time::sleep(self.cfg.interval()) => true,
                _ = self.replan.notified() => {
                    // Let a burst of changes (e.g. five profiles) settle into one plan.
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    true
                }
                _ = self.surge.notified() => true,
                _ = self.reconsider.notified() => false,
            };
            self.raise_memory().await;
            if let Err(e) = self.adapt_once(term, forecast).instrument(info_span!("adapt", term, forecast)).await {
                warn!(error = %e, "adaptation round failed");
            }
            self.judge_rollouts().await;
        }
    }

    /// Raises, before the next plan, the memory profile of each variant whose workers the OOM
    /// killer killed over the limit their plan gave them (see
    /// [`tidal_common::memory::raised`]): stored through the log, audited. Every kill is
    /// counted and logged.
    async fn raise_memory(&self) {
        let kills = self.observed(|o| o.take_oom_kills());
        let mut raised = std::collections::BTreeSet::new();
        for k in kills {
            let labels = VariantLabels { task: k.task.clone(), variant: k.variant.clone() };
            self.metrics.worker_oom_kills.get_or_create(&labels).inc_by(k.kills);
            warn!(
                task = %k.task, variant = %k.variant, node = %k.node, worker = %k.worker, kills = k.kills,
                planned_mib = k.memory_bytes >> 20,
                "a worker was killed by the kernel's OOM killer over its memory limit"
            );
            if k.memory_bytes == 0 || !raised.insert((k.task.clone(), k.variant.clone())) {
                continue;
            }
            // A canary's workers (task `T@N`) run T's variants, profiled as T's.
            let task = tidal_common::task::parse_canary(&k.task).map_or(k.task.as_str(), |(task, _)| task);
            let key = (task.to_string(), k.variant.clone());
            let Some(stored) = self.raft.read(|s| s.profiles.get(&key).cloned()) else { continue };
            let raised = tidal_common::memory::raised(&stored.points, k.memory_bytes, k.max_batch);
            let Some(points) = raised else { continue };
            let change = Change::StoreProfile(tidal_proto::v1::VariantProfile { points, ..stored });
            let what = crate::service::describe(&change);
            match self.raft.propose(Command { change: Some(change) }).await {
                Ok(()) => info!(
                    target: "audit", by = "the leader", change = %what,
                    reason = "its worker was killed by the OOM killer: memory profile doubled",
                    "change committed"
                ),
                Err(e) => warn!(task = %k.task, variant = %k.variant, error = %e, "raising the memory profile failed"),
            }
        }
    }

    /// Ends each rollout whose canary the observations have decided on (see
    /// [`Observed::judge`]): promoted or rolled back through the log, audited.
    async fn judge_rollouts(&self) {
        let rollouts: Vec<tidal_proto::v1::Rollout> = self.raft.read(|s| s.rollouts.values().cloned().collect());
        let now = Instant::now();
        let verdicts: Vec<tidal_proto::v1::EndRollout> = self.observed(|o| {
            o.rollouts.retain(|task, _| rollouts.iter().any(|r| &r.task == task));
            rollouts.iter().filter_map(|r| o.judge(r, now)).collect()
        });
        for end in verdicts {
            let task = end.task.clone();
            let change = Change::EndRollout(end);
            let what = crate::service::describe(&change);
            match self.raft.propose(Command { change: Some(change) }).await {
                Ok(()) => {
                    info!(target: "audit", by = "the leader", change = %what, "change committed");
                    self.observed(|o| o.rollouts.remove(&task));
                    self.replan.notify_one();
                }
                Err(e) => warn!(task = %task, error = %e, "ending the rollout failed; judged again next round"),
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
        let corrections = current.as_ref().map(|p| p.corrections.clone()).unwrap_or_default();
        self.observed(|o| {
            *o = Observed::new(Instant::now()).with_node_timeout(self.cfg.node_timeout);
            // Until its first round, a new leader knows the rates the plan was sized for.
            o.round_rates =
                planned.iter().map(|(t, &p)| (t.clone(), RoundRates { forecast_rps: 0.0, planned_rps: p })).collect();
        });
        self.adapter(|a| a.resume(&planned, &corrections));
        let Some(current) = current else {
            info!(term, "leading; no plan committed yet");
            self.adapt_once(term, true).await?;
            return Ok(());
        };
        let id = self.raft.status().id;
        let mut carried = current.clone();
        // A task deleted (or a canary ended) since the plan was made is not carried over:
        // the state would refuse it.
        let (tasks, assignments) = self.raft.read(|s| {
            let tasks: Vec<_> = carried.tasks.iter().filter(|t| s.may_plan(&t.name)).cloned().collect();
            let assignments = carried.assignments.iter().filter(|a| s.may_plan(&a.task)).cloned().collect();
            (tasks, assignments)
        });
        (carried.tasks, carried.assignments) = (tasks, assignments);
        let names: std::collections::HashSet<String> = carried.tasks.iter().map(|t| t.name.clone()).collect();
        for t in &mut carried.tasks {
            if t.canary.as_ref().is_some_and(|c| !names.contains(&c.task)) {
                t.canary = None;
            }
        }
        let plan = Plan {
            epoch: current.epoch + 1,
            term,
            notes: vec![format!(
                "replica {id} took over as leader in term {term}; plan {} carried over",
                current.epoch
            )],
            ..carried
        };
        let proposed = Instant::now();
        let plan = self.commit(Some(&current), &plan).await?;
        info!(term, epoch = plan.epoch, "leading; the current plan is re-committed under this term");
        self.metrics.plans_committed.inc();
        self.push_all(&plan, proposed);
        Ok(())
    }

    /// One adaptation round (without `forecast`: the plan reconsidered at the planned rates);
    /// returns the plan in force afterwards.
    pub async fn adapt_once(&self, term: u64, forecast: bool) -> Result<Option<Plan>, ProposeError> {
        let now = Instant::now();
        let state = self.raft.read(|s| s.clone());
        // The observations are copied out first: the solve (milliseconds to a second for
        // hundreds of tasks) holds no lock a telemetry handler takes, and runs on a blocking
        // thread, off the runtime's workers, on that snapshot of its inputs.
        let observations = self.observed(|o| planner::Observations::gather(&self.cfg.adapt, &state, o, now));
        let adapter = self.adapter.clone();
        let (round, state, corrections) = tokio::task::spawn_blocking(move || {
            let mut adapter = adapter.lock().unwrap_or_else(|p| p.into_inner());
            let round = planner::plan_from(&mut adapter, &state, &observations, forecast);
            let mut corrections: BTreeMap<String, Vec<ProfileCorrection>> = BTreeMap::new();
            for (task, variant, factor, batches) in adapter.corrections().iter() {
                corrections.entry(task.to_string()).or_default().push(ProfileCorrection {
                    variant: variant.to_string(),
                    factor,
                    batches: batches as u32,
                });
            }
            (round, state, corrections)
        })
        .await
        .map_err(|e| ProposeError::Raft(format!("the round's solve did not finish: {e}")))?;
        let rates = round
            .tasks
            .iter()
            .map(|(t, r)| (t.clone(), RoundRates { forecast_rps: r.forecast_rps, planned_rps: r.planned_rps }));
        self.observed(|o| {
            o.round_rates = rates.collect();
            o.corrections = corrections;
        });
        for (task, r) in &round.tasks {
            let labels = TaskLabels { task: task.clone() };
            self.metrics.forecast_rps.get_or_create(&labels).set(r.forecast_rps);
            self.metrics.planned_rps.get_or_create(&labels).set(r.planned_rps);
        }
        self.metrics.adaptation_seconds.observe(now.elapsed().as_secs_f64());
        if !round.changed {
            if let Some(current) = &state.plan {
                self.push_to_lagging(current);
            }
            return Ok(state.plan.clone());
        }
        let plan = Plan { epoch: state.plan_epoch() + 1, term, ..round.plan };
        for note in &plan.notes {
            info!(epoch = plan.epoch, "{note}");
        }
        let proposed = Instant::now();
        let plan = self.commit(state.plan.as_ref(), &plan).await?;
        info!(epoch = plan.epoch, workers = plan.assignments.len(), moved = round.moved, "committed a new plan");
        self.metrics.plans_committed.inc();
        self.metrics.workers_moved.inc_by(round.moved as u64);
        self.push_all(&plan, proposed);
        Ok(Some(plan))
    }

    /// Commits `plan` through Raft as its change from `base` (the plan in force) and returns
    /// the plan committed: the whole plan every replica rebuilds from the entry (`plan` in
    /// canonical order), which is what is pushed.
    async fn commit(&self, base: Option<&Plan>, plan: &Plan) -> Result<Plan, ProposeError> {
        let delta = tidal_common::plan::delta::delta(base, plan);
        self.metrics.plan_bytes.get_or_create(&PlanForm { form: "whole" }).observe(plan.encoded_len() as f64);
        self.metrics.plan_bytes.get_or_create(&PlanForm { form: "log_entry" }).observe(delta.encoded_len() as f64);
        self.raft.propose(Command { change: Some(Change::CommitPlanDelta(delta)) }).await?;
        Ok(tidal_common::plan::delta::canonical(plan.clone()))
    }

    /// Plans at once the tasks among `waiting` (requests wait for a worker of theirs at an
    /// agent) that the plan in force gives no worker: unloaded while idle, they are asked for.
    pub fn wake(&self, waiting: &[String]) {
        if waiting.is_empty() || !self.raft.status().is_leader {
            return;
        }
        let unplanned: Vec<&String> = self.raft.read(|s| {
            let planned = |t: &String| s.plan.as_ref().is_some_and(|p| p.assignments.iter().any(|a| &a.task == t));
            waiting.iter().filter(|t| s.tasks.contains_key(*t) && !planned(t)).collect()
        });
        if !unplanned.is_empty() {
            info!(tasks = ?unplanned, "requests wait for tasks without a worker; planning them now");
            self.replan.notify_one();
        }
    }

    /// Re-plans at once, without waiting for the interval, when a node the plan uses stopped
    /// reporting, or when the policy reacts to surges
    /// and a task's arrivals over the last seconds exceed the rate its plan was sized for: a
    /// burst that the forecast missed should cost seconds of overload, not a whole interval.
    pub fn check_surge(&self, now: Instant) {
        if !self.raft.status().is_leader {
            return;
        }
        let (tasks, plan) = self.raft.read(|s| (s.tasks.keys().cloned().collect::<Vec<String>>(), s.plan.clone()));
        let silent = self.observed(|o| planner::silent_nodes(plan.as_ref(), o, now));
        if !silent.is_empty() {
            warn!(nodes = ?silent, "nodes in the plan stopped reporting; re-planning without them");
            self.replan.notify_one();
            return;
        }
        // While a round is being solved, it answers any surge: the check is skipped rather than
        // made to wait for it.
        let mut adapter = match self.adapter.try_lock() {
            Ok(adapter) => adapter,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return,
        };
        let surge = self.observed(|o| planner::surge(&mut adapter, &tasks, o, now));
        drop(adapter);
        if let Some(s) = surge {
            info!(
                task = s.task,
                rate = s.rate_rps,
                planned = s.planned_rps,
                "arrivals exceed the planned rate; re-planning now"
            );
            self.surge.notify_one();
        }
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

    /// Pushes a plan just committed (proposed at `proposed`) to every node.
    fn push_all(&self, plan: &Plan, proposed: Instant) {
        let nodes = self.raft.read(|s| s.nodes.clone());
        self.pushers.keep_only(&nodes.keys().collect());
        let targets = nodes.into_iter().map(|(name, info)| (name, info.control_address)).collect();
        // Cutting and diffing a plan for each of hundreds of nodes is CPU work.
        let pushes = tokio::task::block_in_place(|| self.prepare(targets, plan));
        for push in pushes {
            self.pushers.offer(push, Some(proposed));
        }
    }

    /// Pushes the current plan to nodes whose last report shows an older epoch.
    fn push_to_lagging(&self, plan: &Plan) {
        let nodes = self.raft.read(|s| s.nodes.clone());
        let lagging: Vec<(String, String)> = self.observed(|o| {
            nodes
                .iter()
                .filter(|(n, _)| o.reports.get(*n).is_none_or(|(_, r)| r.applied_epoch < plan.epoch))
                .filter(|(n, _)| !self.acknowledged(n, plan))
                .map(|(n, info)| (n.clone(), info.control_address.clone()))
                .collect()
        });
        for push in tokio::task::block_in_place(|| self.prepare(lagging, plan)) {
            self.pushers.offer(push, None);
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
        if self.acknowledged(node, &plan) {
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
            for push in self.prepare(vec![(node.to_string(), info.control_address)], &plan) {
                self.pushers.offer(push, None);
            }
        }
    }

    /// Stops the pushers and waits for them.
    pub async fn shutdown(&self) {
        self.pushers.shutdown(Duration::from_secs(5)).await;
    }

    /// Forgets the plan `node` acknowledged (it restarted and holds none).
    pub fn forget_acknowledgement(&self, node: &str) {
        self.pushers.acked.lock().unwrap_or_else(|p| p.into_inner()).remove(node);
    }

    /// Whether `node` answered that it applied `plan` (or a later one): a report that shows an
    /// older epoch was made before.
    fn acknowledged(&self, node: &str, plan: &Plan) -> bool {
        self.pushers.acked.lock().unwrap_or_else(|p| p.into_inner()).get(node) >= Some(&(plan.epoch, plan.term))
    }

    /// What each of `targets` (node, control address) is sent of `plan`: its cut as a change
    /// from the cut of the plan the node last acknowledged, when the history still has that
    /// plan; else the cut, made when it is sent.
    fn prepare(&self, targets: Vec<(String, String)>, plan: &Plan) -> Vec<Push> {
        let acked: HashMap<String, (u64, u64)> = {
            let acked = self.pushers.acked.lock().unwrap_or_else(|p| p.into_inner());
            targets.iter().filter_map(|(n, _)| acked.get(n).map(|&a| (n.clone(), a))).collect()
        };
        let wanted: std::collections::BTreeSet<(u64, u64)> =
            acked.values().copied().filter(|&a| a < (plan.epoch, plan.term)).collect();
        // The few plans the nodes hold (most hold the previous one), read once.
        let bases: Vec<Plan> =
            self.raft.read(|s| s.history.iter().filter(|p| wanted.contains(&(p.epoch, p.term))).cloned().collect());
        let deltas: HashMap<(u64, u64), CutDeltas<'_>> =
            bases.iter().map(|base| ((base.epoch, base.term), CutDeltas::new(base, plan))).collect();
        let whole = Arc::new(plan.clone());
        targets
            .into_iter()
            .map(|(node, address)| {
                let delta = acked.get(&node).and_then(|a| Some((deltas.get(a)?.for_node(&node), *a)));
                Push { node, address, plan: whole.clone(), delta }
            })
            .collect()
    }
}
