//! The agent's link to the controller: registers the node, then reports telemetry every
//! interval. While no controller answers, the agent keeps serving with its last plan and keeps
//! trying (with back-off).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tidal_proto::v1::controller_client::ControllerClient;
use tidal_proto::v1::{RegisterNodeRequest, TelemetryReport};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tracing::{debug, info, warn};

use crate::node::Node;

pub struct Link {
    pub controller: String,
    /// The address the controller should use to reach this agent.
    pub advertise: String,
    pub interval: Duration,
}

impl Link {
    pub async fn run(self, node: Arc<Node>, stop: CancellationToken) {
        let mut backoff = Duration::from_millis(200);
        while !stop.is_cancelled() {
            match self.connect_and_register(&node).await {
                Ok(client) => {
                    backoff = Duration::from_millis(200);
                    if let Err(e) = self.report_loop(client, &node, &stop).await {
                        warn!(controller = %self.controller, error = %e, "telemetry to the controller failed; reconnecting");
                    }
                }
                Err(e) => {
                    debug!(controller = %self.controller, error = %e, "controller not reachable");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    async fn connect_and_register(&self, node: &Node) -> Result<ControllerClient<Channel>, tonic::Status> {
        let endpoint = format!("http://{}", self.controller);
        let mut client =
            ControllerClient::connect(endpoint).await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let resp = client
            .register_node(RegisterNodeRequest {
                node: node.cfg.node.clone(),
                address: self.advertise.clone(),
                cores: node.cfg.millicores / 1000,
            })
            .await?;
        info!(controller = %self.controller, plan_epoch = resp.get_ref().plan_epoch, "registered with the controller");
        Ok(client)
    }

    async fn report_loop(
        &self,
        mut client: ControllerClient<Channel>,
        node: &Node,
        stop: &CancellationToken,
    ) -> Result<(), tonic::Status> {
        let mut ticker = tokio::time::interval(self.interval);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = stop.cancelled() => return Ok(()),
            }
            let report = TelemetryReport {
                node: node.cfg.node.clone(),
                applied_epoch: node.applied_epoch(),
                tasks: node.telemetry.drain(Instant::now()),
                workers: node.worker_telemetry().await,
            };
            client.report_telemetry(report).await?;
        }
    }
}
