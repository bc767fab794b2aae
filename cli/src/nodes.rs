//! `tidalctl node`: drain a node (its share moves to the others), take it back, forget it.

use std::time::{Duration, Instant};

use tidal_proto::v1::{ClusterStatus, ClusterStatusRequest, DrainNodeRequest, RemoveNodeRequest};

#[derive(clap::Subcommand)]
pub enum NodeCmd {
    /// Plan the node empty: its workers move to the other nodes at the next round.
    ///
    /// Example: tidalctl node drain --node node-a --wait-s 120
    Drain {
        /// The node's name (its agent's --node).
        #[arg(long)]
        node: String,
        /// Take the node back into planning instead.
        #[arg(long)]
        undrain: bool,
        /// Wait up to this many seconds until the plan in force follows: drained, the node has
        /// no workers and every other planned node has applied the plan with its workers
        /// serving; undrained, the node has applied the current plan. 0: do not wait.
        #[arg(long, default_value_t = 0.0)]
        wait_s: f64,
    },
    /// Forget a drained node and revoke the certificate it registered with (stop its agent
    /// first; to bring it back, issue it a new certificate, or give --keep-certificate).
    ///
    /// Example: tidalctl node remove --node node-a
    Remove {
        /// The node's name.
        #[arg(long)]
        node: String,
        /// Leave its certificate valid (a node taken out for repair that comes back as it was).
        #[arg(long)]
        keep_certificate: bool,
    },
}

pub async fn run(addrs: &str, cmd: NodeCmd) -> anyhow::Result<()> {
    match cmd {
        NodeCmd::Drain { node, undrain, wait_s } => {
            let req = DrainNodeRequest { node: node.clone(), undrain };
            crate::controller(addrs).await?.drain_node(req).await?;
            if undrain {
                println!("node {node} is planned again from the next round");
            } else {
                println!("node {node} is draining: the next plans give it no workers");
            }
            if wait_s > 0.0 {
                let started = Instant::now();
                wait(addrs, &node, undrain, Duration::from_secs_f64(wait_s)).await?;
                println!("the plan in force follows ({:.1} s)", started.elapsed().as_secs_f64());
            }
        }
        NodeCmd::Remove { node, keep_certificate } => {
            let request = RemoveNodeRequest { node: node.clone(), keep_certificate };
            let removed = crate::controller(addrs).await?.remove_node(request).await?;
            match removed.into_inner().revoked {
                Some(c) => {
                    println!("node {node} removed; the certificate it registered with ({}) is revoked", c.serial)
                }
                None if keep_certificate => println!("node {node} removed; its certificate stays valid"),
                None => println!("node {node} removed (it registered with no certificate)"),
            }
        }
    }
    Ok(())
}

async fn wait(addrs: &str, node: &str, undrain: bool, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let why = match crate::controller(addrs).await?.status(ClusterStatusRequest {}).await {
            Ok(status) => match follows(&status.into_inner(), node, undrain) {
                Ok(()) => return Ok(()),
                Err(why) => why,
            },
            Err(e) => e.message().to_string(),
        };
        if Instant::now() > deadline {
            anyhow::bail!("the plan does not follow after {timeout:?}: {why}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Whether the cluster's plan has taken the drain (or undrain) of `node` into effect.
fn follows(status: &ClusterStatus, node: &str, undrain: bool) -> Result<(), String> {
    let Some(plan) = &status.plan else { return Ok(()) };
    let reports = |name: &str| status.nodes.iter().find(|n| n.node == name);
    if undrain {
        let n = reports(node).ok_or_else(|| format!("node {node} has not registered"))?;
        return if n.applied_epoch >= plan.epoch && !n.draining {
            Ok(())
        } else {
            Err(format!("node {node} applied plan {} of {}", n.applied_epoch, plan.epoch))
        };
    }
    if plan.assignments.iter().any(|a| a.node == node) {
        return Err(format!("plan {} still gives {node} workers", plan.epoch));
    }
    let mut planned: Vec<&str> = plan.assignments.iter().map(|a| a.node.as_str()).collect();
    planned.dedup();
    for name in planned {
        let n = reports(name).ok_or_else(|| format!("node {name} does not report"))?;
        if n.applied_epoch < plan.epoch {
            return Err(format!("node {name} applied plan {} of {}", n.applied_epoch, plan.epoch));
        }
        if n.workers.iter().any(|w| !w.ready) {
            return Err(format!("workers on {name} are still loading"));
        }
    }
    Ok(())
}
