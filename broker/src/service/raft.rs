//! The `RaftTransport` entry point: a peer's Raft message (or a control
//! call: ping, quiet, elect, transfer) is decoded and handed to the local
//! replica of its group.

use bytes::Bytes;
use petrel_proto::pb::broker as bpb;
use petrel_proto::pb::broker::raft_transport_server::RaftTransport;
use petrel_proto::PetrelError;
use tonic::{Request, Response as TResponse, Status};

use super::{Service, R};
use crate::network::{
    encode_result, KIND_APPEND, KIND_ELECT, KIND_PING, KIND_QUIET, KIND_SNAPSHOT, KIND_TRANSFER,
    KIND_VOTE,
};

/// How long a Raft message for a group this broker does not (yet) host
/// waits for the group to be started.
const UNKNOWN_GROUP_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

#[tonic::async_trait]
impl RaftTransport for Service {
    async fn raft(&self, req: Request<bpb::RaftRequest>) -> R<bpb::RaftResponse> {
        Ok(TResponse::new(self.raft_one(req.into_inner()).await?))
    }

    async fn raft_batch(&self, req: Request<bpb::RaftBatchRequest>) -> R<bpb::RaftBatchResponse> {
        let reqs = req.into_inner().requests;
        if reqs.len() > 4096 {
            return Err(PetrelError::InvalidArgument("raft batch too large".into()).into());
        }
        let futs = reqs.into_iter().map(|r| async move {
            self.raft_one(r)
                .await
                .unwrap_or_else(|status| bpb::RaftResponse {
                    payload: Bytes::new(),
                    error: Some(PetrelError::from_status(&status).to_detail()),
                })
        });
        let responses = futures::future::join_all(futs).await;
        Ok(TResponse::new(bpb::RaftBatchResponse { responses }))
    }
}

impl Service {
    async fn raft_one(&self, req: bpb::RaftRequest) -> Result<bpb::RaftResponse, Status> {
        if req.from != 0 && self.node.pool.is_blocked(req.from) {
            return Err(PetrelError::Unavailable(format!(
                "fault injection: broker {} is cut off",
                req.from
            ))
            .into());
        }
        if req.from != 0 {
            self.node.pool.heard_in(req.from);
        }
        // A group just created by the meta group may reach a peer before
        // that peer's reconciler has started it: give it a moment rather
        // than failing the vote or append (and logging an error) at once.
        let mut h = self.node.group(req.group_id);
        let waited = std::time::Instant::now();
        while h.is_none() && waited.elapsed() < UNKNOWN_GROUP_GRACE {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            h = self.node.group(req.group_id);
        }
        let Some(h) = h else {
            return Ok(bpb::RaftResponse {
                payload: Bytes::new(),
                error: Some(
                    PetrelError::Unavailable(format!(
                        "broker {} does not host group {}",
                        self.node.id, req.group_id
                    ))
                    .to_detail(),
                ),
            });
        };
        let bad = |e: bincode::Error| {
            PetrelError::InvalidArgument(format!("undecodable raft payload: {e}")).to_status()
        };
        // Any Raft traffic for the group but a ping or a quiet request
        // wakes a quiet replica (quiet.rs).
        if req.kind != KIND_PING && req.kind != KIND_QUIET {
            h.quiet.wake(&h.raft);
        }
        let resp = match req.kind {
            KIND_APPEND => {
                let rpc = bincode::deserialize(&req.payload).map_err(bad)?;
                encode_result(&h.raft.append_entries(rpc).await)
            }
            KIND_VOTE => {
                let rpc = bincode::deserialize(&req.payload).map_err(bad)?;
                encode_result(&h.raft.vote(rpc).await)
            }
            KIND_SNAPSHOT => {
                let rpc = bincode::deserialize(&req.payload).map_err(bad)?;
                encode_result(&h.raft.install_snapshot(rpc).await)
            }
            KIND_PING => encode_control(Ok(())),
            KIND_QUIET => encode_control(self.node.quiet_request(
                req.group_id,
                req.from,
                &req.payload,
            )),
            KIND_ELECT => {
                let r = self.node.elect_now(req.group_id).await;
                encode_control(r)
            }
            KIND_TRANSFER => {
                let to: [u8; 8] = req.payload[..].try_into().map_err(|_| {
                    PetrelError::InvalidArgument("transfer payload must be a u64".into())
                        .to_status()
                })?;
                let r = self
                    .node
                    .transfer_leader(req.group_id, u64::from_be_bytes(to))
                    .await;
                encode_control(r)
            }
            k => {
                return Err(
                    PetrelError::InvalidArgument(format!("unknown raft message kind {k}")).into(),
                )
            }
        };
        Ok(resp)
    }
}

/// Control calls over the Raft transport answer with an empty payload or
/// a typed error.
fn encode_control(r: Result<(), PetrelError>) -> bpb::RaftResponse {
    match r {
        Ok(()) => bpb::RaftResponse {
            payload: Bytes::new(),
            error: None,
        },
        Err(e) => bpb::RaftResponse {
            payload: Bytes::new(),
            error: Some(e.to_detail()),
        },
    }
}
