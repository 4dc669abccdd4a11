//! Raft transport: one gRPC channel per peer broker, shared by every group;
//! every message carries its group id, and one server-side service looks
//! the group up in the registry.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use petrel_proto::pb::broker::raft_transport_client::RaftTransportClient;
use petrel_proto::pb::broker::{RaftRequest, RaftResponse};
use petrel_proto::PetrelError;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};

use crate::types::TypeConfig;

pub const KIND_APPEND: u32 = 1;
pub const KIND_VOTE: u32 = 2;
pub const KIND_SNAPSHOT: u32 = 3;
/// Leadership hand-off: the leader asks this replica to campaign now.
pub const KIND_ELECT: u32 = 4;
/// Controller → leader: hand the group to the broker in the payload.
pub const KIND_TRANSFER: u32 = 5;

/// Raft RPCs larger than this are refused by the transport. One entry is
/// at most one proxy append (64 MiB), and an AppendEntries carries at most
/// `MAX_PAYLOAD_ENTRIES` of them, but in practice far less is in flight.
pub const MAX_RAFT_MESSAGE: usize = 1 << 30;
/// Entries per AppendEntries RPC (openraft `max_payload_entries`).
pub const MAX_PAYLOAD_ENTRIES: u64 = 16;

/// Lazily connected channels to peer brokers, keyed by broker id.
#[derive(Clone, Default)]
pub struct PeerPool {
    channels: Arc<DashMap<u64, (String, Channel)>>,
    /// When each peer last answered a Raft RPC (any group).
    last_ok: Arc<DashMap<u64, Instant>>,
    /// When each peer last sent us a Raft RPC (any group).
    last_in: Arc<DashMap<u64, Instant>>,
    /// Fault injection for tests: peers whose Raft traffic is dropped.
    blocked: Arc<DashMap<u64, ()>>,
    self_id: Arc<std::sync::atomic::AtomicU64>,
}

impl PeerPool {
    /// Whether `peer` answered a Raft RPC within `within`.
    pub fn heard_from(&self, peer: u64, within: Duration) -> bool {
        self.last_ok
            .get(&peer)
            .is_some_and(|t| t.elapsed() <= within)
    }

    /// Records an inbound Raft RPC from `peer`.
    pub fn heard_in(&self, peer: u64) {
        self.last_in.insert(peer, Instant::now());
    }

    /// When `peer` last sent us a Raft RPC.
    pub fn last_in(&self, peer: u64) -> Option<Instant> {
        self.last_in.get(&peer).map(|t| *t)
    }

    /// Whether any peer exchanged Raft traffic with us within `within`.
    pub fn heard_any(&self, within: Duration) -> bool {
        self.last_in.iter().any(|e| e.elapsed() <= within)
            || self.last_ok.iter().any(|e| e.elapsed() <= within)
    }

    fn answered(&self, peer: u64) {
        self.last_ok.insert(peer, Instant::now());
    }

    /// Fault injection: drop all Raft traffic to and from these peers
    /// (replacing the previous set). Only reachable when the broker runs
    /// with `--fault-injection`.
    pub fn set_blocked(&self, peers: &[u64]) {
        self.blocked.clear();
        for p in peers {
            self.blocked.insert(*p, ());
        }
    }

    pub fn with_self_id(id: u64) -> Self {
        let p = Self::default();
        p.self_id.store(id, std::sync::atomic::Ordering::Relaxed);
        p
    }

    pub fn self_id(&self) -> u64 {
        self.self_id.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn is_blocked(&self, peer: u64) -> bool {
        self.blocked.contains_key(&peer)
    }

    /// The shared channel to `id` at `addr` (re-created if the address changed).
    pub fn channel(&self, id: u64, addr: &str) -> Result<Channel, PetrelError> {
        if let Some(e) = self.channels.get(&id) {
            if e.0 == addr {
                return Ok(e.1.clone());
            }
        }
        let uri = if addr.starts_with("http") {
            addr.to_string()
        } else {
            format!("http://{addr}")
        };
        let ch = Endpoint::from_shared(uri)
            .map_err(|e| PetrelError::InvalidArgument(format!("bad peer address {addr:?}: {e}")))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_while_idle(true)
            .connect_lazy();
        self.channels.insert(id, (addr.to_string(), ch.clone()));
        Ok(ch)
    }
}

/// Creates per-target clients for one group.
pub struct NetworkFactory {
    pub group: u64,
    pub pool: PeerPool,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerClient;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> Self::Network {
        PeerClient {
            group: self.group,
            target,
            channel: self.pool.channel(target, &node.addr),
            pool: self.pool.clone(),
        }
    }
}

pub struct PeerClient {
    group: u64,
    target: u64,
    channel: Result<Channel, PetrelError>,
    pool: PeerPool,
}

type RpcErr<E = openraft::error::Infallible> = RPCError<u64, BasicNode, RaftError<u64, E>>;

impl PeerClient {
    async fn call<Req, Resp, E>(
        &mut self,
        kind: u32,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RpcErr<E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let ch = match &self.channel {
            Ok(c) => c.clone(),
            Err(e) => return Err(RPCError::Unreachable(Unreachable::new(e))),
        };
        if self.pool.is_blocked(self.target) {
            return Err(RPCError::Unreachable(Unreachable::new(
                &PetrelError::Unavailable(format!(
                    "fault injection: broker {} is cut off",
                    self.target
                )),
            )));
        }
        let payload =
            bincode::serialize(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let mut client = RaftTransportClient::new(ch)
            .max_decoding_message_size(MAX_RAFT_MESSAGE)
            .max_encoding_message_size(MAX_RAFT_MESSAGE);
        let fut = client.raft(RaftRequest {
            group_id: self.group,
            kind,
            payload: payload.into(),
            from: self.pool.self_id(),
        });
        let resp = match tokio::time::timeout(option.hard_ttl(), fut).await {
            Err(_) => {
                return Err(RPCError::Network(NetworkError::new(&std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "raft rpc timed out",
                ))))
            }
            Ok(Err(status)) => {
                let e = PetrelError::from_status(&status);
                return Err(RPCError::Unreachable(Unreachable::new(&e)));
            }
            Ok(Ok(r)) => r.into_inner(),
        };
        self.pool.answered(self.target);
        if let Some(err) = resp.error {
            let e = PetrelError::from_detail(&err);
            return Err(RPCError::Network(NetworkError::new(&e)));
        }
        let result: Result<Resp, RaftError<u64, E>> = bincode::deserialize(&resp.payload)
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RpcErr> {
        self.call(KIND_APPEND, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<u64>, RpcErr<InstallSnapshotError>> {
        self.call(KIND_SNAPSHOT, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RpcErr> {
        self.call(KIND_VOTE, &rpc, &option).await
    }
}

/// Encodes a raft call's result for the wire.
pub fn encode_result<T: Serialize, E: Serialize>(r: &Result<T, E>) -> RaftResponse {
    match bincode::serialize(r) {
        Ok(p) => RaftResponse {
            payload: p.into(),
            error: None,
        },
        Err(e) => RaftResponse {
            payload: Default::default(),
            error: Some(PetrelError::Internal(format!("encode raft response: {e}")).to_detail()),
        },
    }
}
