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
use petrel_proto::pb::broker::{RaftBatchRequest, RaftRequest, RaftResponse};
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
/// Liveness probe between brokers (no group involved).
pub const KIND_PING: u32 = 6;
/// Leader → follower: the group is idle and you hold its last entry, turn
/// your timers off (`quiet.rs`).
pub const KIND_QUIET: u32 = 7;

/// Largest gRPC message a proxy may send to a broker (`BrokerData`).
pub const MAX_DATA_MESSAGE: usize = 64 << 20;
/// Raft RPCs larger than this are refused by the transport: the largest
/// real message is one AppendEntries of a single entry as big as a data
/// call may be (one proxy append, `MAX_DATA_MESSAGE`), plus framing.
/// AppendEntries of several entries are cut at `APPEND_BUDGET` bytes, and
/// snapshots travel in openraft's chunks (3 MiB).
pub const MAX_RAFT_MESSAGE: usize = MAX_DATA_MESSAGE + (8 << 20);
/// Most entry bytes one AppendEntries of several entries carries; the rest
/// follow in the next one (openraft's `PartialSuccess`).
pub const APPEND_BUDGET: u64 = 16 << 20;
/// Entries per AppendEntries RPC (openraft `max_payload_entries`).
pub const MAX_PAYLOAD_ENTRIES: u64 = 16;

/// Coalesced RPCs in flight per peer; heartbeats that come while they are
/// all busy wait and leave together when one returns (self-clocking: no
/// fixed window, a lone heartbeat goes at once).
const COALESCE_IN_FLIGHT: usize = 2;
/// Most messages in one coalesced RPC.
const COALESCE_MAX: usize = 1024;

type Pending = (
    RaftRequest,
    tokio::sync::oneshot::Sender<Result<RaftResponse, tonic::Status>>,
);

/// Lazily connected channels to peer brokers, keyed by broker id.
#[derive(Clone, Default)]
pub struct PeerPool {
    /// Per peer: its address, the TLS generation it was dialed with, and
    /// the channel.
    channels: Arc<DashMap<u64, (String, u64, Channel)>>,
    /// Mutual TLS to peers (the broker's certificate, the cluster CA).
    tls: Option<Arc<petrel_proto::tls::ClientTls>>,
    /// When each peer last answered a Raft RPC (any group).
    last_ok: Arc<DashMap<u64, Instant>>,
    /// When each peer last sent us a Raft RPC (any group).
    last_in: Arc<DashMap<u64, Instant>>,
    /// Fault injection for tests: peers whose Raft traffic is dropped.
    blocked: Arc<DashMap<u64, ()>>,
    self_id: Arc<std::sync::atomic::AtomicU64>,
    /// Per peer: the queue of the task that coalesces heartbeats.
    coalescers: Arc<DashMap<u64, (String, tokio::sync::mpsc::UnboundedSender<Pending>)>>,
    /// Per peer: its current run of failed Raft RPCs, if any, for the log.
    streaks: Arc<DashMap<u64, Option<FailureStreak>>>,
}

/// How long Raft RPCs to a peer must keep failing before the broker logs
/// it: peers that start or stop a few seconds apart (a rolling restart, a
/// whole cluster shutting down) are not worth a warning.
pub const UNREACHABLE_GRACE: Duration = Duration::from_secs(5);

/// One peer's run of failed Raft RPCs. Logged once when it has lasted
/// `UNREACHABLE_GRACE` and once when the peer answers again, with the
/// count, instead of one line per failed call (openraft's own per-call
/// replication errors are off in the default log filter).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureStreak {
    pub since: Instant,
    pub failed: u64,
    pub first_error: String,
    /// Whether the start was logged (so the end is too).
    pub logged: bool,
}

/// What a failure or an answer should log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreakLog {
    /// The peer has failed every call for `UNREACHABLE_GRACE` or more.
    Unreachable { failed: u64, error: String },
    /// It answered after a logged streak.
    Reachable { failed: u64, lasted: Duration },
}

impl FailureStreak {
    /// A call to the peer failed at `now`; `streak` is its current run.
    pub fn on_failure(
        streak: &mut Option<FailureStreak>,
        now: Instant,
        error: &str,
    ) -> Option<StreakLog> {
        let s = streak.get_or_insert_with(|| FailureStreak {
            since: now,
            failed: 0,
            first_error: error.to_string(),
            logged: false,
        });
        s.failed += 1;
        if !s.logged && now.saturating_duration_since(s.since) >= UNREACHABLE_GRACE {
            s.logged = true;
            return Some(StreakLog::Unreachable {
                failed: s.failed,
                error: error.to_string(),
            });
        }
        None
    }

    /// The peer answered at `now`: the run (if any) ends.
    pub fn on_answer(streak: &mut Option<FailureStreak>, now: Instant) -> Option<StreakLog> {
        let s = streak.take()?;
        s.logged.then(|| StreakLog::Reachable {
            failed: s.failed,
            lasted: now.saturating_duration_since(s.since),
        })
    }
}

impl PeerPool {
    /// Sends `req` to `peer` in the next coalesced batch: at once if a
    /// slot is free, else with everything that queued behind the
    /// `COALESCE_IN_FLIGHT` RPCs in flight. With many active groups the
    /// heartbeats between two brokers cost a few RPCs per round trip
    /// instead of one each.
    async fn coalesced(
        &self,
        peer: u64,
        addr: &str,
        channel: Channel,
        req: RaftRequest,
    ) -> Result<RaftResponse, tonic::Status> {
        let tx = {
            let fresh = self
                .coalescers
                .get(&peer)
                .filter(|e| e.0 == addr && !e.1.is_closed())
                .map(|e| e.1.clone());
            match fresh {
                Some(tx) => tx,
                None => {
                    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                    tokio::spawn(coalesce_loop(peer, channel, rx, self.clone()));
                    self.coalescers.insert(peer, (addr.to_string(), tx.clone()));
                    tx
                }
            }
        };
        let (done, wait) = tokio::sync::oneshot::channel();
        tx.send((req, done))
            .map_err(|_| tonic::Status::unavailable("coalescer stopped"))?;
        wait.await
            .map_err(|_| tonic::Status::unavailable("coalescer dropped the request"))?
    }

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

    /// Records an answer from `peer` to a control call.
    pub fn mark_answered(&self, peer: u64) {
        self.answered(peer);
    }

    fn answered(&self, peer: u64) {
        let now = Instant::now();
        self.last_ok.insert(peer, now);
        // Only a peer with a failure run takes the map's write path.
        if self.streaks.get(&peer).is_some_and(|s| s.is_some()) {
            let log = self
                .streaks
                .get_mut(&peer)
                .and_then(|mut s| FailureStreak::on_answer(&mut s, now));
            if let Some(StreakLog::Reachable { failed, lasted }) = log {
                tracing::info!(
                    peer,
                    failed_calls = failed,
                    unreachable_for = ?lasted,
                    "raft peer answers again"
                );
            }
        }
    }

    /// A Raft RPC to `peer` failed (timed out, refused, cut off).
    fn failed(&self, peer: u64, error: &str) {
        let log = FailureStreak::on_failure(
            &mut self.streaks.entry(peer).or_default(),
            Instant::now(),
            error,
        );
        if let Some(StreakLog::Unreachable { failed, error }) = log {
            tracing::warn!(
                peer,
                failed_calls = failed,
                error = %error,
                "raft peer unreachable for {}s; logged again when it answers",
                UNREACHABLE_GRACE.as_secs()
            );
        }
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

    pub fn with_self_id(id: u64, tls: Option<Arc<petrel_proto::tls::ClientTls>>) -> Self {
        let p = Self {
            tls,
            ..Self::default()
        };
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
        let gen = self.tls.as_ref().map_or(0, |t| t.generation());
        if let Some(e) = self.channels.get(&id) {
            if e.0 == addr && e.1 == gen {
                return Ok(e.2.clone());
            }
        }
        let uri = petrel_proto::tls::uri(addr, self.tls.is_some());
        let bad = |e: &dyn std::fmt::Display| {
            PetrelError::InvalidArgument(format!("bad peer address {addr:?}: {e}"))
        };
        let mut ep = Endpoint::from_shared(uri).map_err(|e| bad(&e))?;
        if let Some(t) = &self.tls {
            ep = ep.tls_config(t.config()).map_err(|e| bad(&e))?;
        }
        let ch = ep
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .initial_stream_window_size(petrel_proto::transport::STREAM_WINDOW)
            .initial_connection_window_size(petrel_proto::transport::CONNECTION_WINDOW)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_while_idle(true)
            .connect_lazy();
        self.channels
            .insert(id, (addr.to_string(), gen, ch.clone()));
        Ok(ch)
    }
}

async fn coalesce_loop(
    peer: u64,
    channel: Channel,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Pending>,
    pool: PeerPool,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(COALESCE_IN_FLIGHT));
    while let Some(first) = rx.recv().await {
        // While every slot is busy, later heartbeats queue in `rx`.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < COALESCE_MAX {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        let (reqs, dones): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
        let mut client = RaftTransportClient::new(channel.clone())
            .max_decoding_message_size(MAX_RAFT_MESSAGE)
            .max_encoding_message_size(MAX_RAFT_MESSAGE);
        let pool = pool.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let mut r = tonic::Request::new(RaftBatchRequest { requests: reqs });
            r.set_timeout(Duration::from_secs(2));
            match client.raft_batch(r).await {
                Ok(resp) => {
                    pool.answered(peer);
                    let mut resps = resp.into_inner().responses.into_iter();
                    for d in dones {
                        let r = resps
                            .next()
                            .ok_or_else(|| tonic::Status::internal("short raft batch response"));
                        let _ = d.send(r);
                    }
                }
                Err(status) => {
                    for d in dones {
                        let _ = d.send(Err(status.clone()));
                    }
                }
            }
        });
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
            addr: node.addr.clone(),
            pool: self.pool.clone(),
        }
    }
}

pub struct PeerClient {
    group: u64,
    target: u64,
    channel: Result<Channel, PetrelError>,
    addr: String,
    pool: PeerPool,
}

type RpcErr<E = openraft::error::Infallible> = RPCError<u64, BasicNode, RaftError<u64, E>>;

impl PeerClient {
    async fn call<Req, Resp, E>(
        &mut self,
        kind: u32,
        req: &Req,
        option: &RPCOption,
        coalesce: bool,
    ) -> Result<Resp, RpcErr<E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let ch = match &self.channel {
            Ok(c) => c.clone(),
            Err(e) => {
                self.pool.failed(self.target, &e.to_string());
                return Err(RPCError::Unreachable(Unreachable::new(e)));
            }
        };
        if self.pool.is_blocked(self.target) {
            self.pool.failed(self.target, "fault injection: cut off");
            return Err(RPCError::Unreachable(Unreachable::new(
                &PetrelError::Unavailable(format!(
                    "fault injection: broker {} is cut off",
                    self.target
                )),
            )));
        }
        let payload =
            bincode::serialize(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let request = RaftRequest {
            group_id: self.group,
            kind,
            payload: payload.into(),
            from: self.pool.self_id(),
        };
        let fut = async {
            if coalesce {
                self.pool
                    .coalesced(self.target, &self.addr, ch, request)
                    .await
            } else {
                let mut client = RaftTransportClient::new(ch)
                    .max_decoding_message_size(MAX_RAFT_MESSAGE)
                    .max_encoding_message_size(MAX_RAFT_MESSAGE);
                client.raft(request).await.map(|r| r.into_inner())
            }
        };
        let ttl = option.hard_ttl();
        let resp = match tokio::time::timeout(ttl, fut).await {
            Err(_) => {
                self.pool
                    .failed(self.target, &format!("raft rpc timed out after {ttl:?}"));
                return Err(RPCError::Network(NetworkError::new(&std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "raft rpc timed out",
                ))));
            }
            Ok(Err(status)) => {
                let e = PetrelError::from_status(&status);
                self.pool.failed(self.target, &e.to_string());
                return Err(RPCError::Unreachable(Unreachable::new(&e)));
            }
            Ok(Ok(r)) => r,
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
        // Heartbeats (no entries) are coalesced per peer; data goes at once.
        let heartbeat = rpc.entries.is_empty();
        let mut rpc = rpc;
        // Cut a large batch at APPEND_BUDGET bytes and say how far it got:
        // openraft sends the rest next. The follower commits no further
        // than what it holds, so the leader's commit index may stay whole.
        let keep = entries_within(&rpc.entries, APPEND_BUDGET);
        let cut = (keep < rpc.entries.len()).then(|| {
            metrics::counter!("petrel_broker_raft_appends_cut_total").increment(1);
            tracing::debug!(
                entries = rpc.entries.len(),
                keep,
                "AppendEntries cut at the byte budget"
            );
            rpc.entries.truncate(keep);
            rpc.entries[keep - 1].log_id
        });
        match self.call(KIND_APPEND, &rpc, &option, heartbeat).await? {
            AppendEntriesResponse::Success if cut.is_some() => {
                Ok(AppendEntriesResponse::PartialSuccess(cut))
            }
            other => Ok(other),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<u64>, RpcErr<InstallSnapshotError>> {
        self.call(KIND_SNAPSHOT, &rpc, &option, false).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RpcErr> {
        self.call(KIND_VOTE, &rpc, &option, false).await
    }
}

/// How many of `entries`, from the first, fit in `budget` encoded bytes
/// (always at least one, so a single large entry still goes alone).
pub fn entries_within<T: Serialize>(entries: &[T], budget: u64) -> usize {
    if entries.len() <= 1 {
        return entries.len(); // nothing to cut; skip sizing the hot case
    }
    let mut bytes = 0u64;
    for (i, e) in entries.iter().enumerate() {
        bytes = bytes.saturating_add(bincode::serialized_size(e).unwrap_or(u64::MAX));
        if bytes > budget {
            return i.max(1);
        }
    }
    entries.len()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_run_is_logged_once_when_it_starts_and_once_when_it_ends() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut s = None;
        // A peer that starts late (a cluster coming up): no line at all.
        for ms in [0, 1000, 2000, 4900] {
            assert_eq!(FailureStreak::on_failure(&mut s, at(ms), "refused"), None);
        }
        assert_eq!(FailureStreak::on_answer(&mut s, at(5000)), None);
        assert!(s.is_none());
        // A peer cut off for 20 s: one line at 5 s, none for the next
        // hundreds of calls, one when it answers, with the count.
        let mut n = 0;
        let mut logs = Vec::new();
        for ms in (0..20_000).step_by(40) {
            n += 1;
            logs.extend(FailureStreak::on_failure(
                &mut s,
                at(10_000 + ms),
                "timed out",
            ));
        }
        assert_eq!(
            logs,
            [StreakLog::Unreachable {
                failed: 126,
                error: "timed out".into()
            }]
        );
        assert_eq!(
            FailureStreak::on_answer(&mut s, at(30_000)),
            Some(StreakLog::Reachable {
                failed: n,
                lasted: Duration::from_secs(20)
            })
        );
        // The next run starts afresh.
        assert_eq!(FailureStreak::on_failure(&mut s, at(31_000), "x"), None);
        assert_eq!(s.as_ref().unwrap().failed, 1);
    }

    #[test]
    fn a_batch_is_cut_at_the_budget_but_never_below_one_entry() {
        let entries: Vec<Vec<u8>> = vec![vec![0; 100], vec![0; 100], vec![0; 100]];
        let one = bincode::serialized_size(&entries[0]).unwrap();
        assert_eq!(entries_within(&entries, 3 * one), 3);
        assert_eq!(entries_within(&entries, 3 * one - 1), 2);
        assert_eq!(entries_within(&entries, one), 1);
        assert_eq!(
            entries_within(&entries, 1),
            1,
            "a lone big entry still goes"
        );
        assert_eq!(entries_within::<Vec<u8>>(&[], 1), 0);
    }
}
