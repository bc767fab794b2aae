//! Finding the controller leader, and `tidalctl controller …`: the membership of the
//! controller's Raft group.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Subcommand;
use futures::stream::{FuturesUnordered, StreamExt};
use tidal_proto::v1::controller_client::ControllerClient;
use tidal_proto::v1::{
    AddReplicaRequest, ListReplicasRequest, RemoveReplicaRequest, ReplicaList, TransferLeaderRequest,
};
use tonic::transport::Channel;

use crate::connect::Unreachable;

/// How long to wait for a leader to be elected before giving up.
const LEADER_WAIT: Duration = Duration::from_secs(10);

#[derive(Subcommand)]
pub enum ControllerCmd {
    /// Show the replicas of the controller group as one replica sees them: ids, addresses,
    /// roles, the leader, and (from the leader) how far each has replicated the log.
    ///
    /// Example: tidalctl --controller 10.0.0.10:7000 controller list
    List,
    /// Add a replica (started beforehand with `tidal-controller --join`): it joins as a
    /// learner, copies the log, and becomes a voter once it has caught up.
    ///
    /// Example: tidalctl controller add --id 4 --address 10.0.0.13:7000/10.0.0.13:7001
    Add {
        /// The new replica's id (its --id).
        #[arg(long)]
        id: u64,
        /// The new replica's addresses: API_HOST:PORT/PEER_HOST:PORT (its --advertise and
        /// --advertise-peer).
        #[arg(long)]
        address: String,
    },
    /// Remove a replica from the group. Removing the leader first hands leadership to another.
    /// Its certificate (as the leader saw it) is revoked: to add it back, issue it a new one, or
    /// give --keep-certificate (a replica rebuilt from an empty store on the same machine).
    ///
    /// Example: tidalctl controller remove --id 1
    Remove {
        /// The replica to remove.
        #[arg(long)]
        id: u64,
        /// Leave its certificate valid.
        #[arg(long)]
        keep_certificate: bool,
    },
    /// Hand leadership to another voter (e.g. before maintenance on the leader's machine).
    ///
    /// Example: tidalctl controller transfer-leader --away-from 2
    TransferLeader {
        /// The replica to lead.
        #[arg(long, required_unless_present = "away_from", conflicts_with = "away_from")]
        to: Option<u64>,
        /// Only if this replica leads, hand over to the most caught-up other voter (nothing
        /// to do otherwise): for restarting machines one by one.
        #[arg(long)]
        away_from: Option<u64>,
    },
    /// Wait until a replica answers, is a voter, follows the leader and has applied all the
    /// leader had committed (e.g. after a restart, before touching the next machine).
    ///
    /// Example: tidalctl controller wait --replica 2 --timeout-s 120
    Wait {
        /// The replica to wait for.
        #[arg(long)]
        replica: u64,
        /// Seconds to wait before giving up (exit code 1).
        #[arg(long, default_value_t = 60.0)]
        timeout_s: f64,
    },
}

/// How long one replica may take to connect and answer a membership read: the others are
/// asked at the same time, so a paused or unreachable replica costs no more than this.
const ADDRESS_DEADLINE: Duration = Duration::from_secs(4);

async fn connect(addr: &str) -> anyhow::Result<ControllerClient<Channel>> {
    let channel = crate::connect::channel_with_timeout(addr, "controller", Duration::from_secs(15)).await?;
    Ok(ControllerClient::new(channel))
}

/// The group as `addr` sees it, within [`ADDRESS_DEADLINE`].
async fn ask(addr: String) -> anyhow::Result<(String, ReplicaList)> {
    let read = async {
        let mut client = connect(&addr).await?;
        let list = client.list_replicas(ListReplicasRequest {}).await.map_err(|status| refused(status, &addr))?;
        anyhow::Ok(list.into_inner())
    };
    match tokio::time::timeout(ADDRESS_DEADLINE, read).await {
        Ok(list) => Ok((addr, list?)),
        Err(_) => Err(no_answer(&addr)),
    }
}

fn no_answer(addr: &str) -> anyhow::Error {
    Unreachable(format!("the controller at {addr} did not answer within {ADDRESS_DEADLINE:?}")).into()
}

/// A refused membership read, with what it means: every tidalctl call starts with one (to
/// find the leader), so a certificate that may not read is refused whatever it asked for.
fn refused(status: tonic::Status, addr: &str) -> anyhow::Error {
    let denied = matches!(status.code(), tonic::Code::PermissionDenied | tonic::Code::Unauthenticated);
    let e = crate::connect::explain(anyhow::Error::new(status), addr);
    if denied {
        e.context(format!(
            "the controller at {addr} refused tidalctl's certificate: tidalctl finds the leader by reading the \
             group's membership (ListReplicas) before every call, which takes an admin's certificate (a \
             reader's for reads); issue one with `tidalctl certs issue --role admin`"
        ))
    } else {
        e.context(format!("asking {addr}"))
    }
}

/// Whether an error is a refusal of this certificate (every replica would refuse it too).
fn is_refusal(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<tonic::Status>()
            .is_some_and(|s| matches!(s.code(), tonic::Code::PermissionDenied | tonic::Code::Unauthenticated))
    })
}

/// A client of the replica at `at` once it answers, within [`ADDRESS_DEADLINE`], that it
/// leads (a leader that was paused or deposed since another replica named it does not).
async fn leading(at: &str) -> anyhow::Result<ControllerClient<Channel>> {
    let check = async {
        let mut client = connect(at).await?;
        let view = client.list_replicas(ListReplicasRequest {}).await.map_err(|status| refused(status, at))?;
        let view = view.into_inner();
        anyhow::ensure!(view.leader == view.answered_by, "{at} (replica {}) does not lead", view.answered_by);
        Ok(client)
    };
    match tokio::time::timeout(ADDRESS_DEADLINE, check).await {
        Ok(client) => client,
        Err(_) => Err(no_answer(at)),
    }
}

/// The group as seen by one of `addrs` (comma-separated), all asked at once: the first answer
/// that knows a leader, else the first answer, else why none answered.
async fn any_replica(addrs: &str) -> anyhow::Result<(String, ReplicaList)> {
    let mut asks: FuturesUnordered<_> =
        addrs.split(',').map(str::trim).filter(|a| !a.is_empty()).map(|a| ask(a.to_string())).collect();
    anyhow::ensure!(!asks.is_empty(), "no controller address given (--controller HOST:PORT[,HOST:PORT…])");
    let (mut leaderless, mut errors) = (None, Vec::new());
    while let Some(answer) = asks.next().await {
        match answer {
            Ok((addr, list)) if list.leader != 0 => return Ok((addr, list)),
            Ok(answer) => {
                leaderless.get_or_insert(answer);
            }
            Err(e) if is_refusal(&e) => return Err(e),
            Err(e) => errors.push(e),
        }
    }
    if let Some(answer) = leaderless {
        return Ok(answer);
    }
    if errors.len() == 1 {
        return Err(errors.remove(0));
    }
    let causes: Vec<String> = errors.iter().map(crate::output::describe).collect();
    Err(Unreachable(format!("no controller replica answered ({})", causes.join("; "))).into())
}

/// A client of the controller leader, found through any of `addrs` (comma-separated),
/// waiting out an election (and a leader that stopped answering until another is elected).
pub async fn leader(addrs: &str) -> anyhow::Result<ControllerClient<Channel>> {
    let deadline = Instant::now() + LEADER_WAIT;
    loop {
        let (addr, list) = any_replica(addrs).await?;
        let at = if !list.leader_address.is_empty() {
            Some(list.leader_address.clone())
        } else {
            (list.leader != 0 && list.leader == list.answered_by).then_some(addr.clone())
        };
        let why = match at {
            Some(at) => match leading(&at).await {
                Ok(client) => return Ok(client),
                Err(e) if is_refusal(&e) => return Err(e),
                Err(e) => e.context(format!("replica {} leads as {addr} sees it", list.leader)),
            },
            None => Unreachable(format!("no controller leader is elected (asked {addr}, term {})", list.term)).into(),
        };
        if Instant::now() > deadline {
            return Err(why.context(format!("no controller leader answered within {LEADER_WAIT:?}")));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub async fn run(addrs: &str, cmd: ControllerCmd, format: crate::output::Format) -> anyhow::Result<()> {
    match cmd {
        ControllerCmd::List => {
            let (addr, list) = any_replica(addrs).await?;
            crate::output::print(format, &list, |l| render_list(&addr, l))?;
        }
        ControllerCmd::Add { id, address } => {
            leader(addrs).await?.add_replica(AddReplicaRequest { id, address: address.clone() }).await?;
            println!("replica {id} ({address}) joined as a learner, caught up and became a voter");
        }
        ControllerCmd::Remove { id, keep_certificate } => remove(addrs, id, keep_certificate).await?,
        ControllerCmd::TransferLeader { to: Some(to), .. } => {
            transfer(addrs, to).await?;
            println!("replica {to} leads");
        }
        ControllerCmd::TransferLeader { away_from, .. } => {
            let from = away_from.context("give --to or --away-from")?;
            let (_, list) = any_replica(addrs).await?;
            if list.leader != from {
                println!("replica {from} does not lead (leader: {}); nothing to do", list.leader);
                return Ok(());
            }
            let to = successor(&list, from)?;
            transfer(addrs, to).await?;
            println!("replica {to} leads");
        }
        ControllerCmd::Wait { replica, timeout_s } => {
            wait_caught_up(addrs, replica, Duration::from_secs_f64(timeout_s.max(0.0))).await?;
            println!("replica {replica} has caught up with the leader");
        }
    }
    Ok(())
}

async fn remove(addrs: &str, id: u64, keep_certificate: bool) -> anyhow::Result<()> {
    let (_, list) = any_replica(addrs).await?;
    if list.leader == id {
        let successor = successor(&list, id)?;
        println!("replica {id} leads: handing leadership to replica {successor} first");
        transfer(addrs, successor).await?;
    }
    let request = RemoveReplicaRequest { id, keep_certificate };
    let removed = leader(addrs).await?.remove_replica(request).await?.into_inner();
    println!("replica {id} removed; stop its process");
    match removed.revoked {
        Some(c) => println!("its certificate ({}) is revoked: issue a new one to add it back", c.serial),
        None if keep_certificate => println!("its certificate stays valid (--keep-certificate)"),
        None => println!(
            "its certificate was never seen by the leader and is not revoked: tidalctl certs revoke --cert FILE"
        ),
    }
    Ok(())
}

/// The most caught-up voter other than `id` (as the answering replica knows it).
fn successor(list: &ReplicaList, id: u64) -> anyhow::Result<u64> {
    Ok(list
        .replicas
        .iter()
        .filter(|r| r.voter && r.id != id)
        .max_by_key(|r| r.matched)
        .with_context(|| format!("replica {id} is the only voter"))?
        .id)
}

/// Waits until a leader is known and has replicated to `replica` everything it had
/// committed when the wait began.
async fn wait_caught_up(addrs: &str, replica: u64, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut target = None;
    loop {
        let why = match caught_up(addrs, replica, &mut target).await {
            Ok(()) => return Ok(()),
            Err(why) => why,
        };
        if Instant::now() > deadline {
            anyhow::bail!("replica {replica} has not caught up within {timeout:?}: {why}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether `replica` answers on its own API, is a voter, follows the current leader and has
/// applied everything the leader had committed when the wait began (`target`). The replica
/// itself is asked: the leader's record of how far a replica got outlives the replica.
async fn caught_up(addrs: &str, replica: u64, target: &mut Option<u64>) -> Result<(), String> {
    let view = leader_view(addrs).await.ok_or("no leader answers")?;
    let target = *target.get_or_insert(view.commit);
    let member = view.replicas.iter().find(|r| r.id == replica).ok_or("it is not a member of the group")?;
    if !member.voter {
        return Err("it is still a learner".into());
    }
    let api = member.address.split('/').next().unwrap_or_default();
    let mut client = connect(api).await.map_err(|e| format!("it does not answer at {api}: {e:#}"))?;
    let own =
        client.list_replicas(ListReplicasRequest {}).await.map_err(|e| format!("{api}: {}", e.message()))?.into_inner();
    if own.answered_by != replica {
        return Err(format!("{api} answers as replica {}", own.answered_by));
    }
    if own.leader != view.leader {
        return Err(format!("it does not follow leader {} yet", view.leader));
    }
    if own.applied < target {
        return Err(format!("it applied {} of {target} entries", own.applied));
    }
    Ok(())
}

/// The group as the leader sees it (with how far each replica has replicated), when a
/// leader is known and answers.
async fn leader_view(addrs: &str) -> Option<ReplicaList> {
    let (_, list) = any_replica(addrs).await.ok()?;
    if list.leader == 0 || list.leader_address.is_empty() {
        return None;
    }
    let mut leader = connect(&list.leader_address).await.ok()?;
    let view = leader.list_replicas(ListReplicasRequest {}).await.ok()?.into_inner();
    (view.leader == view.answered_by).then_some(view)
}

/// Asks the leader to hand over to `to` and waits until `to` leads.
async fn transfer(addrs: &str, to: u64) -> anyhow::Result<()> {
    leader(addrs).await?.transfer_leader(TransferLeaderRequest { id: to }).await?;
    let deadline = Instant::now() + LEADER_WAIT;
    loop {
        let (_, list) = any_replica(addrs).await?;
        if list.leader == to {
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!("replica {to} did not take over within {LEADER_WAIT:?} (leader now: {})", list.leader);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn render_list(addr: &str, list: &ReplicaList) -> String {
    let mut out = format!(
        "as seen by replica {} ({addr}): term {}, leader {}, log to {}, commit {}, applied {}, snapshot at {}\n",
        list.answered_by,
        list.term,
        if list.leader == 0 { "none".to_string() } else { format!("{} ({})", list.leader, list.leader_address) },
        list.last_index,
        list.commit,
        list.applied,
        list.snapshot_index
    );
    let rows = list
        .replicas
        .iter()
        .map(|r| {
            let role = match (r.id == list.leader, r.voter) {
                (true, _) => "leader",
                (false, true) => "voter",
                (false, false) => "learner",
            };
            let matched = if list.leader == list.answered_by { r.matched.to_string() } else { "-".into() };
            vec![r.id.to_string(), r.address.clone(), role.to_string(), matched]
        })
        .collect();
    out += &crate::output::table(&["ID#", "ADDRESS (API/PEER)", "ROLE", "MATCHED#"], rows);
    out
}
