//! The agent's link to the controller: registers the node, then reports telemetry every
//! interval. It knows every controller replica's address, goes straight to the leader when a
//! follower names it, and moves to the next replica when the one it talks to fails. While no controller answers, the agent keeps serving with its last
//! plan and keeps trying, backing off after each round of the whole list.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tidal_proto::leader_hint;
use tidal_proto::v1::controller_client::ControllerClient;
use tidal_proto::v1::{RegisterNodeRequest, TaskTelemetry, TelemetryReport};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tracing::{debug, info, warn};

use crate::node::Node;
use crate::telemetry::carry_over;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

pub struct Link {
    /// The controller replicas' addresses (host:port), tried in turn.
    pub controllers: Vec<String>,
    /// The address clients and other agents send inference requests to.
    pub advertise: String,
    /// The address the controller pushes plans to (the control port).
    pub advertise_control: String,
    pub interval: Duration,
}

impl Link {
    pub async fn run(self, node: Arc<Node>, stop: CancellationToken) {
        if self.controllers.is_empty() {
            return;
        }
        let mut backoff = MIN_BACKOFF;
        let mut failures_in_round = 0;
        let mut next = 0;
        // The leader's address, when a follower named it; followed before the list.
        let mut hint: Option<String> = None;
        let mut hops = 0;
        // A report whose send failed, carried into the next one.
        let mut unsent = Vec::new();
        loop {
            if stop.is_cancelled() {
                return;
            }
            let controller = hint.take().unwrap_or_else(|| {
                next += 1;
                self.controllers[(next - 1) % self.controllers.len()].clone()
            });
            let mut registered = false;
            let outcome = async {
                let client = self.connect_and_register(&controller, &node).await?;
                registered = true;
                self.report_loop(client, &node, &stop, &mut unsent).await
            }
            .await;
            let Err(status) = outcome else { return };
            if registered {
                (backoff, failures_in_round, hops) = (MIN_BACKOFF, 0, 0);
            }
            // A follower names the leader: go there at once (but do not bounce forever
            // between replicas that disagree during an election).
            if let Some(leader) = leader_hint(&status).filter(|l| *l != controller && hops <= self.controllers.len()) {
                info!(%controller, %leader, "following the controller leader");
                hint = Some(leader);
                hops += 1;
                continue;
            }
            if registered {
                warn!(%controller, error = %status, "telemetry to the controller failed; trying the next replica");
                continue;
            }
            debug!(%controller, error = %status, "controller not reachable or not leading");
            failures_in_round += 1;
            if failures_in_round < self.controllers.len() {
                continue;
            }
            (failures_in_round, hops) = (0, 0);
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.cancelled() => return,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    async fn connect_and_register(
        &self,
        controller: &str,
        node: &Node,
    ) -> Result<ControllerClient<Channel>, tonic::Status> {
        let unavailable = |e: tonic::transport::Error| tonic::Status::unavailable(e.to_string());
        // A replica that is cut off must not hold the agent up: give up on it after a while.
        let channel = node
            .security
            .endpoint(controller)
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(CALL_TIMEOUT)
            .connect()
            .await
            .map_err(unavailable)?;
        let mut client = ControllerClient::new(channel);
        let resp = client
            .register_node(RegisterNodeRequest {
                node: node.cfg.node.clone(),
                address: self.advertise.clone(),
                control_address: self.advertise_control.clone(),
                cores: node.cfg.millicores / 1000,
                memory_bytes: node.cfg.memory_bytes,
                memory_total_bytes: node.cfg.memory_total_bytes,
                // Set by the controller from this agent's certificate.
                cert_serial: String::new(),
            })
            .await?;
        info!(%controller, plan_epoch = resp.get_ref().plan_epoch, "registered with the controller");
        let resp = resp.into_inner();
        node.saw_group(resp.plan_epoch, resp.term, resp.members);
        node.saw_revocations(resp.revocations);
        Ok(client)
    }

    async fn report_loop(
        &self,
        mut client: ControllerClient<Channel>,
        node: &Node,
        stop: &CancellationToken,
        unsent: &mut Vec<TaskTelemetry>,
    ) -> Result<(), tonic::Status> {
        let mut ticker = tokio::time::interval(self.interval);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                // A request waits for a task without a worker: the controller hears of it now.
                _ = node.telemetry.demand() => {}
                _ = stop.cancelled() => return Ok(()),
            }
            let now = Instant::now();
            let tasks = carry_over(std::mem::take(unsent), node.telemetry.drain(now));
            let report = TelemetryReport {
                node: node.cfg.node.clone(),
                second: Some(node.telemetry.second(now)),
                applied_epoch: node.applied_epoch(),
                tasks: tasks.clone(),
                workers: node.worker_report(),
                revocations_seen: node.revocations_version(),
            };
            match client.report_telemetry(report).await {
                Ok(ack) => {
                    let ack = ack.into_inner();
                    node.saw_group(ack.plan_epoch, ack.term, ack.members);
                    node.saw_revocations(ack.revocations);
                    node.saw_draining(ack.draining);
                }
                Err(e) => {
                    *unsent = tasks;
                    return Err(e);
                }
            }
        }
    }
}
