//! A broker node: the registry of Raft groups it hosts, the reconciler that
//! starts and stops queue groups as the cluster map changes, and the
//! controller duties it performs while it leads the meta group.
//!
//! ```text
//!   meta group (0) ──applied map──▶ reconciler ──▶ queue groups (1..)
//!        ▲                                          │
//!   MetaWrite (controller: placement)      client_write / reads
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::DashMap;
use openraft::error::{ClientWriteError, RaftError};
use openraft::BasicNode;
use petrel_proto::pb::broker as bpb;
use petrel_proto::pb::broker::broker_data_client::BrokerDataClient;
use petrel_proto::pb::broker::raft_transport_client::RaftTransportClient;
use petrel_proto::PetrelError;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::config::BrokerConfig;
use crate::log_store::LogStore;
use crate::meta::ClusterMap;
use crate::network::{NetworkFactory, PeerPool, KIND_PING};
use crate::sm::{Kind, QueueShared, StateMachine};
use crate::storage::Store;
use crate::types::{Command, Raft, Response, META_GROUP};

mod controller;
mod leadership;
mod queue_tasks;

pub use leadership::{STOP_HANDOFF_TIMEOUT, TRANSFER_TIMEOUT};
pub use queue_tasks::RETENTION_EVERY;

/// How long a non-preferred replica waits before it initializes a group
/// itself (the preferred leader normally does it at once).
const INIT_GRACE: Duration = Duration::from_secs(3);
/// Upper bound on one replicated write, so a request never hangs forever.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct GroupHandle {
    pub raft: Raft,
    pub queue: Option<Arc<QueueShared>>,
    /// Set while this leader hands the group to another replica: it takes
    /// no new writes, so the target catches up and can win at once.
    pub handoff: Arc<AtomicBool>,
    /// Quiescence (see `quiet.rs`): whether this replica's Raft timers are
    /// off, and when this node last proposed a write to the group.
    pub(crate) quiet: Arc<crate::quiet::QuietState>,
    /// The group's log store (its in-memory tail is dropped when quiet).
    pub(crate) log: Option<LogStore>,
}

impl GroupHandle {
    pub fn new(raft: Raft, queue: Option<Arc<QueueShared>>) -> Self {
        Self {
            raft,
            queue,
            handoff: Arc::new(AtomicBool::new(false)),
            quiet: Arc::default(),
            log: None,
        }
    }
}

pub struct Node {
    pub id: u64,
    pub config: BrokerConfig,
    /// Settings a config reload changes while running.
    pub runtime: crate::config::Runtime,
    pub store: Store,
    pub pool: PeerPool,
    pub groups: DashMap<u64, GroupHandle>,
    pub map_rx: watch::Receiver<Arc<ClusterMap>>,
    raft_config: Arc<openraft::Config>,
    pub shutdown: CancellationToken,
    /// (term, first seen) of each group this node leads: a leader grants a
    /// hand-off vote only once its own election is a lease old.
    leader_since: Arc<DashMap<u64, (u64, Instant)>>,
    /// Groups whose membership change this node is driving.
    changing: DashMap<u64, ()>,
    /// Controller: when each group's leadership was last moved.
    moved_at: DashMap<u64, Instant>,
    /// Controller: leadership moves started and not finished (group → to).
    moves_in_flight: DashMap<u64, u64>,
    /// Campaigns are off because this broker reaches no peer.
    isolated: AtomicBool,
    stopping: AtomicBool,
    rebalance: Notify,
    started: Instant,
    /// Per queue group: appends coalescing into one Raft entry.
    pub(crate) append_lanes: DashMap<u64, Arc<crate::append_lane::Lane>>,
    /// Earliest delivery time of any held record of any queue here (a
    /// hint for the release loop; `i64::MAX`: none), shared with every
    /// queue's state machine.
    earliest_due: Arc<std::sync::atomic::AtomicI64>,
}

impl Node {
    pub async fn start(
        config: BrokerConfig,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Arc<Self>> {
        let store = Store::open(&config.data_dir)?;
        let raft_config = Arc::new(
            openraft::Config {
                cluster_name: "petrel".into(),
                heartbeat_interval: config.heartbeat_ms,
                election_timeout_min: config.election_timeout_ms,
                election_timeout_max: config.election_timeout_ms * 2,
                snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(config.snapshot_every),
                // Keep a little log past each snapshot for followers just behind.
                max_in_snapshot_log_to_keep: config.snapshot_every.min(1000),
                max_payload_entries: crate::network::MAX_PAYLOAD_ENTRIES,
                install_snapshot_timeout: 10_000,
                ..Default::default()
            }
            .validate()?,
        );
        let (map_tx, map_rx) = watch::channel(Arc::new(ClusterMap::default()));
        let tls = match &config.tls {
            Some(f) => {
                Some(petrel_proto::tls::ClientTls::load(f.clone()).map_err(anyhow::Error::msg)?)
            }
            None => None,
        };
        let node = Arc::new(Self {
            id: config.id,
            runtime: crate::config::Runtime::new(&config),
            store: store.clone(),
            pool: PeerPool::with_self_id(config.id, tls),
            groups: DashMap::new(),
            map_rx,
            raft_config,
            shutdown,
            config,
            leader_since: Arc::new(DashMap::new()),
            changing: DashMap::new(),
            moved_at: DashMap::new(),
            moves_in_flight: DashMap::new(),
            isolated: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            rebalance: Notify::new(),
            started: Instant::now(),
            append_lanes: DashMap::new(),
            earliest_due: Arc::new(std::sync::atomic::AtomicI64::new(i64::MAX)),
        });
        let sm = StateMachine::open(META_GROUP, store.clone(), Kind::Meta(map_tx))?;
        let raft = Raft::new(
            node.id,
            node.raft_config.clone(),
            NetworkFactory {
                group: META_GROUP,
                pool: node.pool.clone(),
            },
            LogStore::new(META_GROUP, store),
            sm,
        )
        .await?;
        node.groups
            .insert(META_GROUP, GroupHandle::new(raft.clone(), None));
        node.watch_leadership(META_GROUP, raft.clone());
        let voters = node.meta_voters();
        if node.config.join.is_empty() && voters.contains_key(&node.id) {
            let first = *voters.keys().next().expect("non-empty");
            spawn_initialize(raft, voters, first == node.id);
        }
        if !node.config.join.is_empty() {
            tokio::spawn(node.clone().join_loop());
        }
        tokio::spawn(node.clone().reconcile_loop());
        tokio::spawn(node.clone().controller_loop());
        tokio::spawn(node.clone().failover_loop());
        tokio::spawn(node.clone().ping_loop());
        tokio::spawn(node.clone().retention_loop());
        tokio::spawn(node.clone().release_loop());
        tokio::spawn(node.clone().txn_timeout_loop());
        tokio::spawn(node.clone().gauges_loop());
        tokio::spawn(node.clone().quiet_loop());
        Ok(node)
    }

    pub(crate) fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    pub(crate) fn is_isolated(&self) -> bool {
        self.isolated.load(Ordering::Acquire)
    }

    /// Whether this node is driving a membership change of `group`.
    pub(crate) fn is_changing(&self, group: u64) -> bool {
        self.changing.contains_key(&group)
    }

    /// The leader lease: openraft's `election_timeout_max`.
    pub fn lease(&self) -> Duration {
        Duration::from_millis(self.raft_config.election_timeout_max)
    }

    /// Registers this broker through a seed until the map lists it.
    async fn join_loop(self: Arc<Self>) {
        let mut i = 0usize;
        loop {
            if self.map_rx.borrow().brokers.get(&self.id) == Some(&self.config.advertise) {
                return;
            }
            let seed = self.config.join[i % self.config.join.len()].clone();
            i += 1;
            let req = bpb::MetaWriteRequest {
                op: Some(bpb::meta_write_request::Op::RegisterBroker(
                    bpb::BrokerAddress {
                        id: self.id,
                        address: self.config.advertise.clone(),
                        draining: false,
                        self_register: true,
                    },
                )),
            };
            let r = async {
                let ch = self.pool.channel(u64::MAX - 1, &seed)?;
                let mut r = tonic::Request::new(req);
                r.set_timeout(WRITE_TIMEOUT);
                BrokerDataClient::new(ch)
                    .meta_write(r)
                    .await
                    .map_err(|s| PetrelError::from_status(&s))
            }
            .await;
            match r {
                Ok(_) => tracing::info!(%seed, "joined the cluster"),
                Err(e) => tracing::warn!(%seed, error = %e, "joining the cluster"),
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// Meta voters: the three lowest broker ids among the configured peers.
    fn meta_voters(&self) -> BTreeMap<u64, BasicNode> {
        self.config
            .peers
            .iter()
            .take(3)
            .map(|(id, addr)| (*id, BasicNode { addr: addr.clone() }))
            .collect()
    }

    pub fn meta(&self) -> Raft {
        self.groups
            .get(&META_GROUP)
            .map(|g| g.raft.clone())
            .expect("meta group is created at start")
    }

    pub fn group(&self, id: u64) -> Option<GroupHandle> {
        self.groups.get(&id).map(|g| g.clone())
    }

    pub fn leader_of(raft: &Raft) -> Option<u64> {
        raft.metrics().borrow().current_leader
    }

    /// `Ok` if this node leads `group`, else `NotLeader` with a hint.
    pub fn ensure_leader(&self, group: u64) -> Result<GroupHandle, PetrelError> {
        let Some(h) = self.group(group) else {
            return Err(PetrelError::NotLeader {
                group,
                leader: None,
            });
        };
        let (leader, lost) = {
            let m = h.raft.metrics();
            let m = m.borrow();
            (m.current_leader, self.lost_quorum(&m))
        };
        match leader {
            Some(l) if l == self.id => {
                if h.handoff.load(Ordering::Acquire) {
                    return Err(PetrelError::NotLeader {
                        group,
                        leader: None,
                    });
                }
                if lost {
                    // Cut off from a quorum (a partition): writes could not
                    // commit, and a new leader may already exist elsewhere.
                    return Err(PetrelError::NotLeader {
                        group,
                        leader: None,
                    });
                }
                Ok(h)
            }
            other => Err(PetrelError::NotLeader {
                group,
                leader: other,
            }),
        }
    }

    /// A leader that has not heard from a quorum of its voters for a lease
    /// stops serving (it is cut off; a new leader may exist elsewhere).
    /// Judged per peer from the shared transport: every group's heartbeats
    /// refresh it, so this is cheap and does not go stale when idle.
    /// (openraft 0.9's `millis_since_quorum_ack` is only refreshed when
    /// metrics are reported, so it cannot be used for this.)
    fn lost_quorum(&self, m: &openraft::RaftMetrics<u64, BasicNode>) -> bool {
        let lease = self.lease();
        let mut voters = 0;
        let mut heard = 0;
        for v in m.membership_config.membership().voter_ids() {
            voters += 1;
            if v == self.id || self.pool.heard_from(v, lease) {
                heard += 1;
            }
        }
        heard < voters / 2 + 1
    }

    /// Whether this node leads `h` and may serve it (not handing off, not
    /// cut off from a quorum). Leader claims to proxies use this.
    pub fn serving(&self, h: &GroupHandle) -> Option<u64> {
        let m = h.raft.metrics();
        let m = m.borrow();
        (m.current_leader == Some(self.id)
            && !h.handoff.load(Ordering::Acquire)
            && !self.lost_quorum(&m))
        .then_some(m.current_term)
    }

    /// The term in which this leader may serve `h`'s consumers from memory:
    /// only once it has applied an entry of its own term, which means every
    /// checkpoint its predecessors committed is in its state.
    pub fn consumer_term(&self, group: u64, h: &GroupHandle) -> Result<u64, PetrelError> {
        let m = h.raft.metrics();
        let m = m.borrow();
        if m.current_leader != Some(self.id) {
            return Err(PetrelError::NotLeader {
                group,
                leader: m.current_leader,
            });
        }
        match m.last_applied {
            Some(l) if l.leader_id.term == m.current_term => Ok(m.current_term),
            _ => Err(PetrelError::Unavailable(format!(
                "group {group}: the new leader is still applying its predecessors' log; retry"
            ))),
        }
    }

    /// Replicates `cmd` through `group` and returns its applied response.
    pub async fn write(
        &self,
        group: u64,
        h: &GroupHandle,
        cmd: Command,
    ) -> Result<Response, PetrelError> {
        // A leader that loses its leadership or its quorum while the write
        // waits answers early with a retryable error rather than holding
        // the request for the whole timeout (the outcome is then unknown;
        // producers' retries are de-duplicated).
        let lost = async {
            let mut since: Option<Instant> = None;
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let gone = {
                    let m = h.raft.metrics();
                    let m = m.borrow();
                    m.current_leader != Some(self.id) || self.lost_quorum(&m)
                };
                match (gone, since) {
                    (false, _) => since = None,
                    (true, None) => since = Some(Instant::now()),
                    (true, Some(t)) if t.elapsed() > Duration::from_millis(300) => return,
                    _ => {}
                }
            }
        };
        let start = Instant::now();
        self.note_write(h);
        let write = async {
            tokio::select! {
                r = h.raft.client_write(cmd) => Some(r),
                _ = lost => None,
            }
        };
        match tokio::time::timeout(WRITE_TIMEOUT, write).await {
            Ok(None) => Err(PetrelError::Unavailable(format!(
                "group {group}: this broker lost its leadership or quorum while the write waited"
            ))),
            Ok(Some(r)) => match r {
                Ok(r) => {
                    // Propose → replicated to a quorum → applied here.
                    metrics::histogram!("petrel_broker_raft_append_seconds", "group" => group_kind(group))
                        .record(start.elapsed().as_secs_f64());
                    Ok(r.data)
                }
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                    Err(PetrelError::NotLeader {
                        group,
                        leader: f.leader_id,
                    })
                }
                Err(RaftError::APIError(e)) => Err(PetrelError::Internal(e.to_string())),
                Err(RaftError::Fatal(e)) => Err(PetrelError::Unavailable(format!(
                    "group {group} is stopped: {e}"
                ))),
            },
            Err(_) => Err(PetrelError::Timeout(format!(
                "replicating to group {group} took longer than {WRITE_TIMEOUT:?}"
            ))),
        }
    }

    /// Starts, initializes and stops queue groups to match the cluster map.
    async fn reconcile_loop(self: Arc<Self>) {
        let mut rx = self.map_rx.clone();
        loop {
            let map = rx.borrow_and_update().clone();
            if let Err(e) = self.reconcile(&map).await {
                tracing::error!(error = %e, "reconciling groups with the cluster map");
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                r = rx.changed() => if r.is_err() { return },
            }
        }
    }

    async fn reconcile(&self, map: &ClusterMap) -> anyhow::Result<()> {
        let mut wanted = BTreeSet::new();
        for (_, q) in map.groups_of(self.id) {
            wanted.insert(q.group_id);
            if self.groups.contains_key(&q.group_id) {
                continue;
            }
            let shared = Arc::new(QueueShared::new(q.group_id, self.earliest_due.clone()));
            let log = LogStore::new(q.group_id, self.store.clone());
            let sm =
                StateMachine::open(q.group_id, self.store.clone(), Kind::Queue(shared.clone()))?;
            let raft = Raft::new(
                self.id,
                self.raft_config.clone(),
                NetworkFactory {
                    group: q.group_id,
                    pool: self.pool.clone(),
                },
                log.clone(),
                sm,
            )
            .await?;
            let mut handle = GroupHandle::new(raft.clone(), Some(shared));
            handle.log = Some(log);
            self.groups.insert(q.group_id, handle);
            self.watch_leadership(q.group_id, raft.clone());
            let members: BTreeMap<u64, BasicNode> = q
                .replicas
                .iter()
                .map(|b| {
                    let addr = map.brokers.get(b).cloned().unwrap_or_default();
                    (*b, BasicNode { addr })
                })
                .collect();
            // Only the replicas a group was created with may initialize it;
            // a replica added by a move is brought in by the leader.
            if q.generation == 0 {
                spawn_initialize(raft, members, q.replicas.first() == Some(&self.id));
            }
            tracing::info!(group = q.group_id, queue = q.queue, replicas = ?q.replicas, generation = q.generation, "started queue group");
        }
        let stale: Vec<u64> = self
            .groups
            .iter()
            .map(|e| *e.key())
            .filter(|g| *g != META_GROUP && !wanted.contains(g))
            .collect();
        for g in stale {
            if let Some((_, h)) = self.groups.remove(&g) {
                let _ = h.raft.shutdown().await;
                self.store.delete_group(g)?;
                tracing::info!(group = g, "stopped queue group and deleted its data");
            }
        }
        Ok(())
    }

    /// A broker's address: from the cluster map, else from `--peers`.
    pub fn broker_addr(&self, broker: u64) -> Result<String, PetrelError> {
        self.map_rx
            .borrow()
            .brokers
            .get(&broker)
            .cloned()
            .or_else(|| self.config.peers.get(&broker).cloned())
            .ok_or_else(|| PetrelError::Unavailable(format!("no address for broker {broker}")))
    }

    /// A control call to a peer over the Raft transport.
    pub async fn peer_raft_call(
        &self,
        broker: u64,
        group: u64,
        kind: u32,
        payload: Vec<u8>,
    ) -> Result<Bytes, PetrelError> {
        let addr = self.broker_addr(broker)?;
        if self.pool.is_blocked(broker) {
            return Err(PetrelError::Unavailable(format!(
                "fault injection: broker {broker} is cut off"
            )));
        }
        let ch = self.pool.channel(broker, &addr)?;
        let mut r = tonic::Request::new(bpb::RaftRequest {
            group_id: group,
            kind,
            payload: payload.into(),
            from: self.id,
        });
        r.set_timeout(if kind == KIND_PING {
            Duration::from_millis(500)
        } else {
            TRANSFER_TIMEOUT + Duration::from_secs(1)
        });
        let resp = RaftTransportClient::new(ch)
            .raft(r)
            .await
            .map_err(|s| PetrelError::from_status(&s))?
            .into_inner();
        self.pool.mark_answered(broker);
        match resp.error {
            Some(e) => Err(PetrelError::from_detail(&e)),
            None => Ok(resp.payload),
        }
    }

    /// Ready to serve: this broker is in the meta group (voter or learner)
    /// that has a leader, and runs every queue group the map assigns it,
    /// each with a known leader (so it has replayed its log).
    pub fn readiness(&self) -> Result<(), String> {
        if self.stopping.load(Ordering::Acquire) {
            return Err("stopping".into());
        }
        if self.map_rx.borrow().removed.contains(&self.id) {
            return Err(
                "removed from the cluster (petrel cluster remove-broker); register it again with add-broker to reuse it"
                    .into(),
            );
        }
        let meta = self.meta();
        let m = meta.metrics().borrow().clone();
        let member = m
            .membership_config
            .membership()
            .nodes()
            .any(|(id, _)| *id == self.id);
        if !member {
            return Err("not a member of the meta group yet".into());
        }
        if m.current_leader.is_none() {
            return Err("the meta group has no leader".into());
        }
        let map = self.map_rx.borrow().clone();
        for t in map.topics.values() {
            for q in t.queues.iter().filter(|q| q.hosts(self.id)) {
                let Some(h) = self.group(q.group_id) else {
                    return Err(format!("queue group {} not started", q.group_id));
                };
                if h.raft.metrics().borrow().current_leader.is_none() {
                    return Err(format!("queue group {} has no leader", q.group_id));
                }
            }
        }
        Ok(())
    }

    /// Sends a meta write to the meta leader (possibly this node) over gRPC.
    pub async fn meta_forward(
        &self,
        req: bpb::MetaWriteRequest,
    ) -> Result<bpb::MetaWriteResponse, PetrelError> {
        let l = Self::leader_of(&self.meta()).ok_or(PetrelError::NotLeader {
            group: META_GROUP,
            leader: None,
        })?;
        let addr = self.broker_addr(l)?;
        let ch = self.pool.channel(l, &addr)?;
        let mut r = tonic::Request::new(req);
        r.set_timeout(WRITE_TIMEOUT);
        Ok(BrokerDataClient::new(ch)
            .meta_write(r)
            .await
            .map_err(|s| PetrelError::from_status(&s))?
            .into_inner())
    }

    /// This broker's view for proxies and the controller: the map, and the
    /// groups it leads and may serve.
    pub fn routes_response(&self, map: &ClusterMap) -> bpb::RoutesResponse {
        let mut leading = Vec::new();
        let mut hosting = Vec::new();
        let mut meta_leader = 0;
        let mut meta_voters = Vec::new();
        for e in self.groups.iter() {
            if *e.key() == META_GROUP {
                let m = e.raft.metrics();
                let m = m.borrow();
                meta_leader = m.current_leader.unwrap_or(0);
                meta_voters = m.membership_config.membership().voter_ids().collect();
                continue;
            }
            hosting.push(*e.key());
            if let Some(term) = self.serving(&e) {
                leading.push(bpb::LeaderClaim {
                    group_id: *e.key(),
                    term,
                });
            }
        }
        bpb::RoutesResponse {
            broker_id: self.id,
            map_version: map.version,
            brokers: map
                .brokers
                .iter()
                .map(|(id, a)| bpb::BrokerAddress {
                    id: *id,
                    address: a.clone(),
                    draining: map.draining.contains(id),
                    self_register: false,
                })
                .collect(),
            topics: map.topics.values().map(crate::meta::topic_route).collect(),
            leading,
            meta_leader,
            hosting,
            meta_voters,
            map_unchanged: false,
        }
    }

    /// Stops every group and flushes state (after `hand_off_leaderships`
    /// for a graceful stop).
    pub async fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        let handles: Vec<(u64, GroupHandle)> =
            self.groups.iter().map(|e| (*e.key(), e.clone())).collect();
        self.shutdown.cancel();
        for (_, h) in handles {
            let _ = h.raft.shutdown().await;
        }
        self.groups.clear();
        // Persist applied state so a restart replays nothing it need not.
        if let Err(e) = self.store.flush_state() {
            tracing::warn!(error = %e, "flushing state at shutdown");
        }
    }
}

/// Current voters of a group (joint configs included), as this node sees
/// them.
fn voters<C: FromIterator<u64>>(raft: &Raft) -> C {
    raft.metrics()
        .borrow()
        .membership_config
        .membership()
        .voter_ids()
        .collect()
}

/// Initializes a group if it has never been: at once on its preferred
/// leader, after a grace period elsewhere (initializing the same membership
/// on several nodes is safe in openraft).
fn spawn_initialize(raft: Raft, members: BTreeMap<u64, BasicNode>, preferred: bool) {
    tokio::spawn(async move {
        if !preferred {
            tokio::time::sleep(INIT_GRACE).await;
        }
        match raft.is_initialized().await {
            Ok(false) => {
                if let Err(e) = raft.initialize(members).await {
                    tracing::debug!(error = %e, "initialize");
                }
            }
            Ok(true) => {}
            Err(e) => tracing::debug!(error = %e, "is_initialized"),
        }
    });
}

/// The `group` label of Raft metrics: bounded, unlike group ids.
fn group_kind(group: u64) -> &'static str {
    if group == crate::types::META_GROUP {
        "meta"
    } else {
        "queue"
    }
}
