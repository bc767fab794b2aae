//! The inbound side of the Raft transport: the peer port's service, which steps what the
//! group's replicas send into this one's driver. (The outbound side, `transport`, knows
//! nothing of the driver but the feedback sink it is given.)

use protobuf::Message as _;
use raft::prelude::Message;
use tidal_auth::{Guard, Role};
use tidal_proto::v1::raft_transport_server::{RaftTransport, RaftTransportServer};
use tidal_proto::v1::{RaftAck, RaftBatch};
use tonic::{Request, Response, Status};
use tracing::warn;

use crate::consensus::RaftHandle;
use crate::transport::{parse_replica_address, MAX_MESSAGE_BYTES};

/// The inbound side: steps every received message into the local replica. Under mutual TLS
/// only a replica of the group may speak, as itself: the certificate must be controller
/// `from`, and `from` a replica this one knows.
pub struct RaftService {
    pub raft: RaftHandle,
    pub guard: Guard,
}

impl RaftService {
    pub fn server(raft: RaftHandle, guard: Guard) -> RaftTransportServer<Self> {
        RaftTransportServer::new(Self { raft, guard })
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

#[tonic::async_trait]
impl RaftTransport for RaftService {
    async fn send(&self, request: Request<RaftBatch>) -> Result<Response<RaftAck>, Status> {
        let from = request.get_ref().from;
        let caller = self.guard.require_holder(&request, "Raft", |r| *r == Role::Controller(from))?;
        if from == self.raft.status().id {
            // Only a copy of this replica's own key could send this: never step it.
            warn!(target: "audit", from, "a Raft batch claiming to come from this replica itself; refused");
            return Err(Status::permission_denied(format!(
                "replica {from} is this replica: it sends nothing to itself"
            )));
        }
        if caller.is_some() && self.raft.peers.get(from).is_none() {
            return Err(Status::permission_denied(format!("replica {from} is not a member this replica knows")));
        }
        if let Some(holder) = &caller {
            self.raft.certificates.saw(from, &holder.serial);
        }
        let batch = request.into_inner();
        let valid = |a: &str| parse_replica_address(a).is_ok() || a.parse::<std::net::SocketAddr>().is_ok();
        if batch.from != 0 && valid(&batch.from_address) {
            self.raft.peers.set(batch.from, &batch.from_address);
        }
        for bytes in &batch.messages {
            let m = Message::parse_from_bytes(bytes)
                .map_err(|e| Status::invalid_argument(format!("undecodable raft message: {e}")))?;
            if m.from != batch.from {
                warn!(from = batch.from, claimed = m.from, "raft message from another sender in a batch; dropped");
                continue;
            }
            self.raft.step(m).map_err(|e| Status::unavailable(e.to_string()))?;
        }
        Ok(Response::new(RaftAck {}))
    }
}
