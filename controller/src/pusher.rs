//! One pusher per agent: a task that alone sends plans to that agent's control port, the
//! latest first. Every way a plan reaches an agent (a new plan, a lagging report, a take-over)
//! offers it to the node's pusher; an offer replaces one not yet sent (a watch channel: only the
//! latest plan matters, so the queue is one deep by construction). A send that gets no answer,
//! or UNAVAILABLE, is tried again, as the whole plan, after a back-off doubling from 100 ms to
//! 5 s, until it is applied or a newer plan is offered; a plan the agent refuses for good
//! (stale, invalid, not a member) is not. Two pushes to one agent are never in flight at once,
//! so they cannot overtake each other.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message;
use tidal_auth::Security;
use tidal_proto::v1::agent_client::AgentClient;
use tidal_proto::v1::{ApplyPlanRequest, ApplyPlanResponse, Plan, PlanDelta, PushAnswer};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::Channel;
use tracing::{info, warn};

use crate::metrics::{ControllerMetrics, PlanForm, PushOutcome};

/// How long an agent has to answer one push.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);
/// The back-off between attempts at an unanswered push.
const FIRST_RETRY: Duration = Duration::from_millis(100);
const LAST_RETRY: Duration = Duration::from_secs(5);

/// One node's share of a push: the plan (cut for the node when it is sent whole) and, when
/// the node's last acknowledged plan is known, its cut as a change from that plan's (with its
/// (epoch, term)).
pub struct Push {
    pub node: String,
    pub address: String,
    pub plan: Arc<Plan>,
    pub delta: Option<(PlanDelta, (u64, u64))>,
}

/// A push offered to a node's pusher, with the time its plan was proposed (to measure the
/// delivery of new plans; none for re-sends).
struct Job {
    plan: Arc<Plan>,
    delta: Option<(PlanDelta, (u64, u64))>,
    proposed: Option<Instant>,
}

/// How a push ended.
enum Delivery {
    Applied,
    /// Refused for a reason a retry does not change.
    Refused,
    /// No answer, or the agent was unavailable: try again.
    Retry,
}

struct Pusher {
    address: String,
    offers: watch::Sender<Option<Arc<Job>>>,
}

/// The pushers of this leader, by node.
pub struct Pushers {
    security: Security,
    metrics: PushMetrics,
    /// The plan (epoch, term) each node last acknowledged applying: the base of its next
    /// push's delta. Written by the node's pusher only.
    pub acked: Arc<Mutex<HashMap<String, (u64, u64)>>>,
    /// How each node's latest push ended (for `tidalctl status`). Written by its pusher only.
    answers: Answers,
    pushers: Mutex<HashMap<String, Pusher>>,
    tasks: TaskTracker,
    stop: CancellationToken,
}

type Answers = Arc<Mutex<HashMap<String, (Instant, PushAnswer)>>>;

#[derive(Clone)]
struct PushMetrics {
    pushes: prometheus_client::metrics::family::Family<PushOutcome, prometheus_client::metrics::counter::Counter>,
    bytes: prometheus_client::metrics::family::Family<PlanForm, prometheus_client::metrics::histogram::Histogram>,
    delivery: prometheus_client::metrics::histogram::Histogram,
}

impl Pushers {
    pub fn new(security: Security, metrics: &ControllerMetrics) -> Self {
        Self {
            security,
            metrics: PushMetrics {
                pushes: metrics.plan_pushes.clone(),
                bytes: metrics.plan_bytes.clone(),
                delivery: metrics.plan_delivery_seconds.clone(),
            },
            acked: Arc::default(),
            answers: Arc::default(),
            pushers: Mutex::default(),
            tasks: TaskTracker::new(),
            stop: CancellationToken::new(),
        }
    }

    /// Offers `push` to its node's pusher (started on first use, or again when the node's
    /// address changed), replacing any push it has not sent yet.
    pub fn offer(&self, push: Push, proposed: Option<Instant>) {
        let Push { node, address, plan, delta } = push;
        let job = Arc::new(Job { plan, delta, proposed });
        let mut pushers = self.pushers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = pushers.get(&node).filter(|p| p.address == address) {
            p.offers.send_replace(Some(job));
            return;
        }
        let client = match self.security.endpoint(&address) {
            Ok(endpoint) => AgentClient::new(endpoint.connect_timeout(Duration::from_secs(2)).connect_lazy()),
            Err(e) => {
                warn!(node, address, error = %e, "bad agent address");
                return;
            }
        };
        let (offers, rx) = watch::channel(None);
        offers.send_replace(Some(job));
        // A pusher replaced here (the node moved) ends when its sender is dropped.
        pushers.insert(node.clone(), Pusher { address, offers });
        let records =
            Records { acked: self.acked.clone(), answers: self.answers.clone(), metrics: self.metrics.clone() };
        let run = run(node, client, rx, records, self.stop.clone());
        self.tasks.spawn(run);
    }

    /// Stops the pushers of nodes not in `nodes` (removed from the cluster).
    pub fn keep_only(&self, nodes: &std::collections::BTreeSet<&String>) {
        self.pushers.lock().unwrap_or_else(|p| p.into_inner()).retain(|n, _| nodes.contains(n));
        self.answers.lock().unwrap_or_else(|p| p.into_inner()).retain(|n, _| nodes.contains(n));
    }

    /// How the latest push to `node` ended, if one was made.
    pub fn last_answer(&self, node: &str) -> Option<PushAnswer> {
        let answers = self.answers.lock().unwrap_or_else(|p| p.into_inner());
        answers.get(node).map(|(at, a)| PushAnswer { seconds_ago: at.elapsed().as_secs_f64(), ..a.clone() })
    }

    /// Stops every pusher and waits for them (at most `within`).
    pub async fn shutdown(&self, within: Duration) {
        self.stop.cancel();
        self.pushers.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.tasks.close();
        if tokio::time::timeout(within, self.tasks.wait()).await.is_err() {
            warn!("plan pushers did not stop within {within:?}");
        }
    }
}

/// What a pusher writes down of each push.
struct Records {
    acked: Arc<Mutex<HashMap<String, (u64, u64)>>>,
    answers: Answers,
    metrics: PushMetrics,
}

impl Records {
    fn answer(&self, node: &str, epoch: u64, outcome: &str, detail: String, held: Vec<String>) {
        let answer = PushAnswer { epoch, outcome: outcome.into(), detail, held, seconds_ago: 0.0 };
        self.answers.lock().unwrap_or_else(|p| p.into_inner()).insert(node.to_string(), (Instant::now(), answer));
    }
}

/// One node's pusher: sends the latest job offered, retrying with back-off until it is
/// applied, refused for good, or replaced by a newer offer.
async fn run(
    node: String,
    mut client: AgentClient<Channel>,
    mut offers: watch::Receiver<Option<Arc<Job>>>,
    records: Records,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            changed = offers.changed() => if changed.is_err() { return },
            _ = stop.cancelled() => return,
        }
        let Some(mut job) = offers.borrow_and_update().clone() else { continue };
        let mut backoff = FIRST_RETRY;
        loop {
            let delivery = tokio::select! {
                d = deliver(&node, &mut client, &job, &records) => d,
                _ = stop.cancelled() => return,
            };
            if !matches!(delivery, Delivery::Retry) {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {
                    backoff = (backoff * 2).min(LAST_RETRY);
                    // The agent may hold another plan by now: the retry sends the whole plan.
                    job = Arc::new(Job { plan: job.plan.clone(), delta: None, proposed: job.proposed });
                }
                changed = offers.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    match offers.borrow_and_update().clone() {
                        Some(newer) => {
                            job = newer;
                            backoff = FIRST_RETRY;
                        }
                        None => break,
                    }
                }
                _ = stop.cancelled() => return,
            }
        }
    }
}

/// One attempt: the delta if there is one (the whole plan when the agent no longer holds its
/// base), else the node's cut of the plan.
async fn deliver(node: &str, client: &mut AgentClient<Channel>, job: &Job, records: &Records) -> Delivery {
    let metrics = &records.metrics;
    let count = |form, answer: &Result<Result<_, tonic::Status>, _>| {
        let outcome = match answer {
            Ok(Ok(_)) => "applied",
            Ok(Err(s)) if s.code() == tonic::Code::FailedPrecondition && form == "delta" => "not_the_base",
            Ok(Err(_)) => "refused",
            Err(_) => "no_answer",
        };
        metrics.pushes.get_or_create(&PushOutcome { form, outcome }).inc();
        outcome
    };
    let (epoch, term) = (job.plan.epoch, job.plan.term);
    let mut answer = None;
    if let Some((delta, (base_epoch, base_term))) = &job.delta {
        metrics.bytes.get_or_create(&PlanForm { form: "agent_delta" }).observe(delta.encoded_len() as f64);
        let req = ApplyPlanRequest {
            delta: Some(delta.clone()),
            base_epoch: *base_epoch,
            base_term: *base_term,
            ..Default::default()
        };
        let a = tokio::time::timeout(ANSWER_WITHIN, client.apply_plan(req)).await;
        // An agent that holds another plan (restarted, or a push lost) is sent the plan.
        if count("delta", &a) != "not_the_base" {
            answer = Some(a);
        }
    }
    let answer: Result<Result<tonic::Response<ApplyPlanResponse>, tonic::Status>, _> = match answer {
        Some(a) => a,
        None => {
            let cut = tidal_common::plan::cut(&job.plan, node);
            metrics.bytes.get_or_create(&PlanForm { form: "agent" }).observe(cut.encoded_len() as f64);
            let req = ApplyPlanRequest { plan: Some(cut), ..Default::default() };
            let a = tokio::time::timeout(ANSWER_WITHIN, client.apply_plan(req)).await;
            count("plan", &a);
            a
        }
    };
    match answer {
        Ok(Ok(r)) => {
            records.acked.lock().unwrap_or_else(|p| p.into_inner()).insert(node.to_string(), (epoch, term));
            if let Some(proposed) = job.proposed {
                metrics.delivery.observe(proposed.elapsed().as_secs_f64());
            }
            let held = r.into_inner().held;
            if held.is_empty() {
                info!(node, epoch, "agent applied the plan");
            } else {
                warn!(node, epoch, ?held, "agent applied the plan but held tasks");
            }
            records.answer(node, epoch, "applied", String::new(), held);
            Delivery::Applied
        }
        Ok(Err(status)) if status.code() == tonic::Code::Unavailable => {
            warn!(node, epoch, %status, "agent unavailable; the plan is sent again");
            records.answer(node, epoch, "unavailable", status.message().to_string(), Vec::new());
            Delivery::Retry
        }
        Ok(Err(status)) => {
            warn!(node, epoch, %status, "agent refused the plan");
            records.answer(node, epoch, "refused", format!("{:?}: {}", status.code(), status.message()), Vec::new());
            Delivery::Refused
        }
        Err(_) => {
            warn!(node, epoch, "agent did not answer the plan within {ANSWER_WITHIN:?}; it is sent again");
            records.answer(node, epoch, "no answer", format!("none within {ANSWER_WITHIN:?}"), Vec::new());
            Delivery::Retry
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tidal_proto::v1::agent_server::{Agent, AgentServer};
    use tidal_proto::v1::{AgentStatus, AgentStatusRequest, ProfileRequest, ProfileResponse};
    use tonic::{Request, Response, Status};

    /// An agent that refuses its first `unavailable` pushes, takes `delay` over each, and
    /// records the epochs it was sent and the most pushes it had in flight at once.
    #[derive(Clone, Default)]
    struct FakeAgent {
        unavailable: Arc<AtomicUsize>,
        delay: Arc<Mutex<Duration>>,
        epochs: Arc<Mutex<Vec<u64>>>,
        in_flight: Arc<AtomicUsize>,
        most_in_flight: Arc<AtomicUsize>,
        /// What it answers it holds; with `refuse`, it refuses the plan for good instead.
        held: Arc<Mutex<Vec<String>>>,
        refuse: Arc<Mutex<Option<Status>>>,
    }

    #[tonic::async_trait]
    impl Agent for FakeAgent {
        async fn apply_plan(&self, request: Request<ApplyPlanRequest>) -> Result<Response<ApplyPlanResponse>, Status> {
            let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.most_in_flight.fetch_max(now, Ordering::SeqCst);
            let epoch = request.into_inner().plan.map_or(0, |p| p.epoch);
            self.epochs.lock().unwrap().push(epoch);
            let delay = *self.delay.lock().unwrap();
            tokio::time::sleep(delay).await;
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            let refuse =
                self.unavailable.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
            if refuse {
                return Err(Status::unavailable("starting"));
            }
            if let Some(status) = self.refuse.lock().unwrap().clone() {
                return Err(status);
            }
            let held = self.held.lock().unwrap().clone();
            Ok(Response::new(ApplyPlanResponse { applied_epoch: epoch, held, ..Default::default() }))
        }
        async fn profile(&self, _: Request<ProfileRequest>) -> Result<Response<ProfileResponse>, Status> {
            Err(Status::unimplemented("fake"))
        }
        async fn status(&self, _: Request<AgentStatusRequest>) -> Result<Response<AgentStatus>, Status> {
            Err(Status::unimplemented("fake"))
        }
    }

    async fn serve(fake: FakeAgent) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        tokio::spawn(
            tonic::transport::Server::builder().add_service(AgentServer::new(fake)).serve_with_incoming(incoming),
        );
        addr
    }

    fn push(address: &str, epoch: u64) -> Push {
        let plan = Plan { epoch, term: 1, ..Default::default() };
        Push { node: "n".into(), address: address.into(), plan: Arc::new(plan), delta: None }
    }

    async fn acked(pushers: &Pushers, epoch: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while pushers.acked.lock().unwrap().get("n") != Some(&(epoch, 1)) {
            assert!(Instant::now() < deadline, "epoch {epoch} never acknowledged");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn one_push_at_a_time_the_latest_first_and_unanswered_ones_again() {
        let fake = FakeAgent::default();
        let address = serve(fake.clone()).await;
        let mut registry = prometheus_client::registry::Registry::default();
        let pushers = Pushers::new(Security::plaintext(), &ControllerMetrics::new(&mut registry));

        // Unavailable twice: sent again after 100 ms, then 200 ms, and applied.
        fake.unavailable.store(2, Ordering::SeqCst);
        let started = Instant::now();
        pushers.offer(push(&address, 1), None);
        acked(&pushers, 1).await;
        assert_eq!(*fake.epochs.lock().unwrap(), vec![1, 1, 1]);
        assert!(started.elapsed() >= Duration::from_millis(300), "backed off: {:?}", started.elapsed());

        // Four plans while the agent takes 300 ms over each: the one in flight, then only the
        // latest; never two at once.
        *fake.delay.lock().unwrap() = Duration::from_millis(300);
        for epoch in 2..=5 {
            pushers.offer(push(&address, epoch), None);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        acked(&pushers, 5).await;
        assert_eq!(*fake.epochs.lock().unwrap(), vec![1, 1, 1, 2, 5], "plans 3 and 4 were superseded");
        assert_eq!(fake.most_in_flight.load(Ordering::SeqCst), 1);

        // Each answer is recorded for the status: applied, applied with a task held, refused.
        let answer = pushers.last_answer("n").expect("an answer recorded");
        assert_eq!((answer.epoch, answer.outcome.as_str(), answer.held.len()), (5, "applied", 0));
        *fake.delay.lock().unwrap() = Duration::ZERO;
        let why = "t: variant \"x\": x.onnx is not in the model directory".to_string();
        *fake.held.lock().unwrap() = vec![why.clone()];
        pushers.offer(push(&address, 6), None);
        acked(&pushers, 6).await;
        assert_eq!(pushers.last_answer("n").unwrap().held, vec![why]);
        *fake.refuse.lock().unwrap() = Some(Status::failed_precondition("plan 7 is older than plan 9"));
        pushers.offer(push(&address, 7), None);
        let deadline = Instant::now() + Duration::from_secs(10);
        let refused = loop {
            match pushers.last_answer("n") {
                Some(a) if a.epoch == 7 => break a,
                _ => assert!(Instant::now() < deadline, "no answer to plan 7 recorded"),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert_eq!(refused.outcome, "refused");
        assert!(refused.detail.contains("older than plan 9"), "{}", refused.detail);
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(fake.epochs.lock().unwrap().iter().filter(|&&e| e == 7).count(), 1, "a refusal is not retried");

        pushers.shutdown(Duration::from_secs(2)).await;
        assert!(pushers.tasks.is_closed() && pushers.tasks.is_empty(), "every pusher stopped");
    }
}
