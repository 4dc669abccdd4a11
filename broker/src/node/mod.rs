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
use openraft::{BasicNode, ChangeMembers};
use petrel_proto::pb::broker as bpb;
use petrel_proto::pb::broker::broker_data_client::BrokerDataClient;
use petrel_proto::pb::broker::raft_transport_client::RaftTransportClient;
use petrel_proto::PetrelError;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::config::BrokerConfig;
use crate::log_store::LogStore;
use crate::meta::{plan_leader_moves, ClusterMap, GroupLeadership};
use crate::network::{NetworkFactory, PeerPool, KIND_ELECT, KIND_PING, KIND_TRANSFER};
use crate::sm::{Kind, QueueShared, StateMachine};
use crate::storage::Store;
use crate::types::{Command, Raft, Response, META_GROUP};

/// How long a non-preferred replica waits before it initializes a group
/// itself (the preferred leader normally does it at once).
const INIT_GRACE: Duration = Duration::from_secs(3);
/// Upper bound on one replicated write, so a request never hangs forever.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the controller plans leadership and replica moves.
const BALANCE_EVERY: Duration = Duration::from_secs(2);
/// A group whose leadership was moved is left alone this long.
const MOVE_DAMPING: Duration = Duration::from_secs(10);
/// Leadership or replica moves started per controller round.
const MOVES_PER_ROUND: usize = 64;
/// Replica moves in flight at once (groups with retiring replicas).
const REPLICA_MOVES_IN_FLIGHT: usize = 8;
/// How often each queue leader checks retention.
pub const RETENTION_EVERY: Duration = Duration::from_secs(2);
/// How often the broker's gauges (lag, leaders, RocksDB) are refreshed.
const GAUGES_EVERY: Duration = Duration::from_secs(2);
/// How often queue leaders release due delayed records (their accuracy).
const RELEASE_EVERY: Duration = Duration::from_millis(50);
/// Delayed records released per command.
const RELEASE_BATCH: u32 = 10_000;
/// Records examined per queue per retention round.
const RETENTION_SCAN: usize = 100_000;
/// Bound on one leadership hand-off.
pub const TRANSFER_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on handing every leadership away at shutdown.
pub const STOP_HANDOFF_TIMEOUT: Duration = Duration::from_secs(10);

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

    /// Wakes every quiet group this node leads that has one of `peers` as
    /// a voter.
    fn wake_led_groups_with(&self, peers: &[u64]) {
        for e in self.groups.iter() {
            if !e.quiet.is_quiet() {
                continue;
            }
            let ours = {
                let m = e.raft.metrics();
                let m = m.borrow();
                m.current_leader == Some(self.id)
                    && m.membership_config
                        .membership()
                        .voter_ids()
                        .any(|v| peers.contains(&v))
            };
            if ours {
                e.quiet.wake(&e.raft);
            }
        }
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

    /// Fast failover. openraft's own election timers fire at a random point
    /// in [min, max) after the last heartbeat, but voters refuse any vote
    /// until their leader lease (= max) has run out, so the first campaign
    /// usually fails and the next one comes a whole timeout later. Here the
    /// leader's silence is judged per peer from the shared transport, and
    /// one designated follower per group (the first other voter in replica
    /// order) campaigns right after the lease, up to three times 300 ms
    /// apart (another follower's own timer may have taken the term's vote).
    /// If that fails (say its log is behind), openraft's randomized timers
    /// elect someone else; a designated follower that kept campaigning with
    /// ever higher terms would starve them, so it then waits `RETRY`.
    async fn failover_loop(self: Arc<Self>) {
        const RETRY: Duration = Duration::from_secs(10);
        const ATTEMPTS: u32 = 3;
        const GAP: Duration = Duration::from_millis(300);
        // Every group is examined only while some peer is silent (its
        // groups may need a campaign), and otherwise once per
        // `FULL_SCAN_EVERY` ticks for groups that lost their leader some
        // other way; with a thousand idle groups a scan every 100 ms was
        // most of an idle broker's CPU.
        const FULL_SCAN_EVERY: u32 = 10;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut no_leader_since: BTreeMap<u64, Instant> = BTreeMap::new();
        // group → (attempts, first, last)
        let mut tried: BTreeMap<u64, (u32, Instant, Instant)> = BTreeMap::new();
        let mut was_silent: BTreeSet<u64> = BTreeSet::new();
        let mut ticks: u32 = 0;
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            // Counts down to the next full scan.
            ticks = match ticks {
                0 => FULL_SCAN_EVERY - 1,
                t => t - 1,
            };
            if self.stopping.load(Ordering::Acquire) {
                continue;
            }
            let silence = self.lease() + Duration::from_millis(100);
            if !self.pool.heard_any(silence) {
                continue; // cut off from everyone: campaigning cannot win
            }
            let map = self.map_rx.borrow().clone();
            let now = Instant::now();
            let silent: BTreeSet<u64> = map
                .brokers
                .keys()
                .chain(self.config.peers.keys())
                .copied()
                .filter(|b| *b != self.id)
                .filter(|b| {
                    let last = self
                        .pool
                        .last_in(*b)
                        .unwrap_or(self.started)
                        .max(self.started);
                    now.duration_since(last) > silence
                })
                .collect();
            // A peer that is back (restarted, healed) may hold replicas
            // that know no leader: wake the quiet groups led here that it
            // is a voter of, so their heartbeats reach it before its own
            // election timer fires.
            let back: Vec<u64> = was_silent.difference(&silent).copied().collect();
            if !back.is_empty() {
                self.wake_led_groups_with(&back);
            }
            was_silent = silent.clone();
            if silent.is_empty() && tried.is_empty() && no_leader_since.is_empty() && ticks != 0 {
                continue;
            }
            let groups: Vec<(u64, Raft)> = self
                .groups
                .iter()
                .map(|e| (*e.key(), e.raft.clone()))
                .collect();
            for (g, raft) in groups {
                // Cheap checks first: this runs over every group 10 times a
                // second, and nearly always finds a live leader.
                let (leader, is_voter) = {
                    let m = raft.metrics();
                    let m = m.borrow();
                    let mem = m.membership_config.membership();
                    let voter = mem.get_joint_config().iter().any(|c| c.contains(&self.id));
                    (m.current_leader, voter)
                };
                if !is_voter || leader == Some(self.id) {
                    no_leader_since.remove(&g);
                    continue;
                }
                let silent = match leader {
                    Some(l) => {
                        no_leader_since.remove(&g);
                        let last = self
                            .pool
                            .last_in(l)
                            .unwrap_or(self.started)
                            .max(self.started);
                        now.duration_since(last) > silence
                    }
                    None => {
                        let since = *no_leader_since.entry(g).or_insert(now);
                        now.duration_since(since) > silence
                    }
                };
                if !silent {
                    // A healthy leader ends the episode: the next silence
                    // gets fresh attempts.
                    tried.remove(&g);
                    continue;
                }
                // A quiet group's timers are off: its leader's broker went
                // silent, so turn them back on (openraft's own elections are
                // the fallback below) on every replica that notices.
                if let Some(h) = self.group(g) {
                    h.quiet.wake(&h.raft);
                }
                let voters: Vec<u64> = voters(&raft);
                if voters.len() < 2 {
                    continue;
                }
                let order: Vec<u64> = match map.assignment(g) {
                    Some((_, q)) => q.replicas.clone(),
                    None => voters.clone(),
                };
                let designated = order
                    .iter()
                    .find(|b| voters.contains(b) && Some(**b) != leader)
                    .copied();
                if designated != Some(self.id) {
                    continue;
                }
                // Up to ATTEMPTS campaigns GAP apart (a follower whose own
                // timer fired first may hold this term's vote), then quiet
                // until RETRY has passed since the first.
                let e = tried.entry(g).or_insert((0, now, now - GAP));
                if now.duration_since(e.1) >= RETRY {
                    *e = (0, now, now - GAP);
                }
                if e.0 >= ATTEMPTS || now.duration_since(e.2) < GAP {
                    continue;
                }
                e.0 += 1;
                e.2 = now;
                tracing::info!(group = g, old_leader = ?leader, "leader silent past its lease: campaigning");
                let _ = raft.trigger().elect().await;
            }
            tried.retain(|_, t| now.duration_since(t.1) < RETRY);
        }
    }

    /// Retention, on each queue's leader every `RETENTION_EVERY`: finds the
    /// first record to keep (younger than `retention_ms` and within
    /// `retention_bytes` of the end) and replicates `Truncate`, so every
    /// replica range-deletes the same prefix. At most
    /// `RETENTION_SCAN` records are examined per queue per round.
    async fn retention_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(RETENTION_EVERY);
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let map = self.map_rx.borrow().clone();
            for t in map.topics.values() {
                let (age_ms, max_bytes) = (t.spec.retention_ms, t.spec.retention_bytes);
                if age_ms == 0 && max_bytes == 0 {
                    continue;
                }
                for q in &t.queues {
                    let Some(h) = self.group(q.group_id) else {
                        continue;
                    };
                    if self.serving(&h).is_none() {
                        continue;
                    }
                    let Some(shared) = h.queue.clone() else {
                        continue;
                    };
                    let header = shared.read().header;
                    let Some((before, freed)) =
                        self.retention_cut(q.group_id, header, age_ms, max_bytes)
                    else {
                        continue;
                    };
                    let cmd = Command::Truncate {
                        before,
                        freed_bytes: freed,
                    };
                    match self.write(q.group_id, &h, cmd).await {
                        Ok(_) => tracing::info!(
                            group = q.group_id,
                            removed = before - header.start_offset,
                            freed_bytes = freed,
                            "retention removed records"
                        ),
                        Err(e) => tracing::warn!(group = q.group_id, error = %e, "retention"),
                    }
                }
            }
        }
    }

    /// Delayed delivery, on each queue's leader every `RELEASE_EVERY`:
    /// replicates `Release` for queues whose earliest held record is due,
    /// so every replica hands the same records to the consumer groups. A
    /// new leader picks up where the old one stopped: the held set is
    /// replicated state.
    async fn release_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(RELEASE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now = petrel_proto::now_ms();
            // Nothing held anywhere is due yet: no need to look at every
            // queue. The hint only ever moves down between scans (every
            // apply lowers it to its queue's earliest), and a scan resets
            // it to the earliest it finds.
            if self.earliest_due.load(Ordering::Acquire) > now {
                continue;
            }
            self.earliest_due.store(i64::MAX, Ordering::Release);
            let mut earliest = i64::MAX;
            let due: Vec<(u64, GroupHandle)> = self
                .groups
                .iter()
                .filter(|e| {
                    let next = e.queue.as_ref().and_then(|q| q.next_due());
                    if let Some(t) = next {
                        earliest = earliest.min(t);
                    }
                    next.is_some_and(|t| t <= now)
                })
                .map(|e| (*e.key(), e.clone()))
                .filter(|(_, h)| self.serving(h).is_some())
                .collect();
            let writes = due.into_iter().map(|(g, h)| {
                let node = self.clone();
                async move {
                    let cmd = Command::Release {
                        now_ms: now,
                        max: RELEASE_BATCH,
                    };
                    if let Err(e) = node.write(g, &h, cmd).await {
                        tracing::debug!(group = g, error = %e, "release delayed records");
                    }
                }
            });
            futures::future::join_all(writes).await;
            // Released queues lowered the hint again as they applied.
            self.earliest_due
                .fetch_min(earliest.max(now + 1), Ordering::AcqRel);
        }
    }

    /// Every `GAUGES_EVERY`: this broker's leader count, and for the queues
    /// it leads, per topic and consumer group, lag in records and in time
    /// (age of the oldest record not done), in-flight leases; RocksDB write
    /// stalls and pending compaction. Series this broker no longer
    /// reports (e.g. a leadership moved) are set to 0.
    async fn gauges_loop(self: Arc<Self>) {
        let broker = self.id.to_string();
        let mut tick = tokio::time::interval(GAUGES_EVERY);
        let mut last: BTreeSet<(String, String)> = BTreeSet::new();
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let map = self.map_rx.borrow().clone();
            let now = petrel_proto::now_ms();
            let mut leaders = 0u64;
            // (topic, group) -> (lag records, oldest age ms, inflight)
            let mut per: BTreeMap<(String, String), (u64, u64, u64)> = BTreeMap::new();
            for t in map.topics.values() {
                // The groups consuming this topic, as every replica hosted
                // here knows them: a group that never popped a queue this
                // broker leads still lags on it (from the queue's start).
                let consuming: BTreeSet<String> = t
                    .queues
                    .iter()
                    .filter_map(|q| self.group(q.group_id))
                    .filter_map(|h| h.queue.clone())
                    .flat_map(|q| q.read().consumers.keys().cloned().collect::<Vec<_>>())
                    .collect();
                for q in &t.queues {
                    let Some(h) = self.group(q.group_id) else {
                        continue;
                    };
                    if self.serving(&h).is_none() {
                        continue;
                    }
                    leaders += 1;
                    let Some(shared) = h.queue.as_ref() else {
                        continue;
                    };
                    let st = shared.read();
                    let (start, end) = (st.header.start_offset, st.header.next_offset);
                    for name in &consuming {
                        let (committed, inflight) = match st.served().get(name) {
                            Some(c) => (c.committed.max(start), c.inflight_at(now)),
                            None => (start, 0),
                        };
                        let lag = end.saturating_sub(committed);
                        let age = if committed < end {
                            self.record_age_ms(q.group_id, committed, now)
                        } else {
                            0
                        };
                        let e = per.entry((t.spec.name.clone(), name.clone())).or_default();
                        e.0 += lag;
                        e.1 = e.1.max(age);
                        e.2 += inflight;
                    }
                }
            }
            metrics::gauge!("petrel_broker_leader_count", "broker" => broker.clone())
                .set(leaders as f64);
            let keys: BTreeSet<(String, String)> = per.keys().cloned().collect();
            for (topic, group) in last.difference(&keys) {
                per.insert((topic.clone(), group.clone()), (0, 0, 0));
            }
            for ((topic, group), (lag, age, inflight)) in &per {
                let l = [
                    ("topic", topic.clone()),
                    ("group", group.clone()),
                    ("broker", broker.clone()),
                ];
                metrics::gauge!("petrel_consumer_lag_records", &l).set(*lag as f64);
                metrics::gauge!("petrel_consumer_lag_seconds", &l).set(*age as f64 / 1000.0);
                metrics::gauge!("petrel_inflight_leases", &l).set(*inflight as f64);
            }
            last = keys;
            let db = self.store.db();
            let prop = |p: &str| db.property_int_value(p).ok().flatten().unwrap_or(0) as f64;
            metrics::gauge!("petrel_broker_rocksdb_write_stopped", "broker" => broker.clone())
                .set(prop("rocksdb.is-write-stopped"));
            metrics::gauge!("petrel_broker_rocksdb_delayed_write_rate", "broker" => broker.clone())
                .set(prop("rocksdb.actual-delayed-write-rate"));
            metrics::gauge!("petrel_broker_rocksdb_pending_compaction_bytes", "broker" => broker.clone())
                .set(prop("rocksdb.estimate-pending-compaction-bytes"));
        }
    }

    /// Transactions nobody resolves: on each queue's leader, a transaction
    /// still open after `TRANSACTION_MAX_CHECKS` check intervals past its
    /// last check is rolled back (its records are discarded).
    async fn txn_timeout_loop(self: Arc<Self>) {
        loop {
            // Re-read each round: a config reload may change it.
            let interval = self.runtime.transaction_check_ms();
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(interval.clamp(100, 1000))) => {}
            }
            let now = petrel_proto::now_ms();
            let expired: Vec<(u64, GroupHandle, String)> = self
                .groups
                .iter()
                .filter(|e| self.serving(e).is_some())
                .flat_map(|e| {
                    let (g, h) = (*e.key(), e.clone());
                    let ids: Vec<String> = e
                        .queue
                        .as_ref()
                        .map(|q| {
                            q.read()
                                .stale_txns(now)
                                .into_iter()
                                .filter(|(_, t)| {
                                    t.checks >= crate::config::TRANSACTION_MAX_CHECKS
                                        || now - t.opened_ms
                                            > (interval as i64)
                                                * (crate::config::TRANSACTION_MAX_CHECKS as i64 + 2)
                                })
                                .map(|(id, _)| id)
                                .collect()
                        })
                        .unwrap_or_default();
                    ids.into_iter().map(move |id| (g, h.clone(), id))
                })
                .collect();
            for (g, h, id) in expired {
                let cmd = Command::EndTxn {
                    id: id.clone(),
                    commit: false,
                };
                match self.write(g, &h, cmd).await {
                    Ok(_) => {
                        tracing::info!(group = g, txn = %id, "rolled back an unresolved transaction")
                    }
                    Err(e) => tracing::debug!(group = g, error = %e, "rolling back a transaction"),
                }
            }
        }
    }

    /// `(first offset to keep, bytes before it)` if anything is due.
    fn retention_cut(
        &self,
        group: u64,
        header: crate::queue::QueueHeader,
        age_ms: u64,
        max_bytes: u64,
    ) -> Option<(u64, u64)> {
        let cutoff = petrel_proto::now_ms().saturating_sub(age_ms as i64);
        let excess = if max_bytes > 0 {
            header.bytes.saturating_sub(max_bytes)
        } else {
            0
        };
        let cf = self.store.cf(crate::storage::CF_RECORDS);
        let from = crate::keys::record_key(group, header.start_offset);
        let iter = self.store.db().iterator_cf(
            cf,
            rocksdb::IteratorMode::From(&from, rocksdb::Direction::Forward),
        );
        let mut before = header.start_offset;
        let mut freed = 0u64;
        for item in iter.take(RETENTION_SCAN) {
            let Ok((k, v)) = item else { break };
            let Some((g, off)) = crate::keys::decode_group_u64(&k) else {
                break;
            };
            if g != group || off >= header.next_offset {
                break;
            }
            let expired = age_ms > 0
                && petrel_proto::record::store_timestamp_ms(&v).is_some_and(|ts| ts < cutoff);
            if !expired && freed >= excess {
                break;
            }
            before = off + 1;
            freed += v.len() as u64;
        }
        (before > header.start_offset).then_some((before, freed))
    }

    /// Pings every other broker every 200 ms (node-level liveness on the
    /// Raft transport, whatever groups they share), and turns this broker's
    /// own election timers off while it reaches none of them: openraft 0.9
    /// has no pre-vote, so a cut-off broker that kept campaigning would
    /// come back with a higher term and depose healthy leaders on healing.
    async fn ping_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let peers: BTreeSet<u64> = {
                let map = self.map_rx.borrow();
                map.brokers
                    .keys()
                    .chain(self.config.peers.keys())
                    .copied()
                    .filter(|b| *b != self.id && !map.removed.contains(b))
                    .collect()
            };
            for b in &peers {
                let node = self.clone();
                let b = *b;
                tokio::spawn(async move {
                    let _ = node
                        .peer_raft_call(b, META_GROUP, KIND_PING, Vec::new())
                        .await;
                });
            }
            let lease = self.lease();
            let isolated = !peers.is_empty()
                && self.started.elapsed() > lease
                && !self.pool.heard_any(lease)
                && !self.stopping.load(Ordering::Acquire);
            if isolated != self.isolated.swap(isolated, Ordering::AcqRel) {
                if isolated {
                    tracing::warn!("no peer reachable: pausing elections on this broker");
                } else {
                    tracing::info!("peers reachable again: elections resumed");
                }
                for e in self.groups.iter() {
                    e.raft.runtime_config().elect(!isolated);
                }
            }
        }
    }

    /// How long ago the record at `offset` of `group` was stored (0 when it
    /// cannot be read): the lag in time of a consumer waiting on it.
    pub fn record_age_ms(&self, group: u64, offset: u64, now_ms: i64) -> u64 {
        self.store
            .get(
                crate::storage::CF_RECORDS,
                &crate::keys::record_key(group, offset),
            )
            .ok()
            .flatten()
            .and_then(|v| petrel_proto::record::store_timestamp_ms(&v))
            .map_or(0, |ts| (now_ms - ts).max(0) as u64)
    }

    /// Records when this node was first seen leading each group (term), and
    /// counts elections: every new term a replica here sees is one
    /// (`petrel_broker_raft_elections_total`, the term a group is in when
    /// first seen included), and every term this broker
    /// starts leading is one it won (`petrel_broker_raft_leaderships_won_total`).
    fn watch_leadership(&self, group: u64, raft: Raft) {
        // Event-driven: openraft's server metrics change only with the
        // vote, the state or the leader, so an idle group costs nothing
        // here (a 200 ms poll over every group was an idle broker's
        // largest CPU cost with a thousand queues).
        let leader_since = self.leader_since.clone();
        let mut rx = raft.server_metrics();
        let stop = self.shutdown.clone();
        tokio::spawn(async move {
            let kind = group_kind(group);
            let mut seen_term: Option<u64> = None;
            loop {
                let (leader, term, me) = {
                    let m = rx.borrow_and_update();
                    (m.current_leader, m.vote.leader_id().get_term(), m.id)
                };
                // Terms this replica saw begin; the one it finds a group
                // in when it first looks (start-up, new replica) counts.
                let new_terms = match seen_term.replace(term) {
                    Some(t) => term.saturating_sub(t),
                    None => u64::from(term > 0),
                };
                if new_terms > 0 {
                    metrics::counter!("petrel_broker_raft_elections_total", "group" => kind)
                        .increment(new_terms);
                }
                if leader == Some(me) {
                    let fresh = leader_since.get(&group).is_none_or(|v| v.0 != term);
                    if fresh {
                        leader_since.insert(group, (term, Instant::now()));
                        metrics::counter!("petrel_broker_raft_leaderships_won_total", "group" => kind)
                            .increment(1);
                    }
                } else {
                    leader_since.remove(&group);
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    r = rx.changed() => if r.is_err() { return },
                }
            }
        });
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

    /// Controller duties while this node leads the meta group: register
    /// brokers and keep them in the meta group, keep three healthy meta
    /// voters, move replicas off draining brokers and balance leaderships.
    /// On every node: drive membership changes of the groups it leads.
    async fn controller_loop(self: Arc<Self>) {
        // Memberships are reconciled when the map changes, and otherwise
        // every `RECONCILE_EVERY` (a new leader of a group being moved picks
        // the move up): a pass looks at every group this broker hosts.
        const RECONCILE_EVERY: Duration = Duration::from_secs(2);
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        let mut last_balance = Instant::now();
        let mut reconciled: Option<(u64, Instant)> = None;
        loop {
            let kicked = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tick.tick() => false,
                _ = self.rebalance.notified() => true,
            };
            if self.stopping.load(Ordering::Acquire) {
                continue;
            }
            let version = self.map_rx.borrow().version;
            if reconciled.is_none_or(|(v, at)| v != version || at.elapsed() >= RECONCILE_EVERY) {
                reconciled = Some((version, Instant::now()));
                self.reconcile_memberships();
            }
            let meta = self.meta();
            // Not while cut off from the other meta voters (fenced).
            match self.group(META_GROUP) {
                Some(h) if self.serving(&h).is_some() => {}
                _ => continue,
            }
            self.meta_membership(&meta).await;
            if kicked || last_balance.elapsed() >= BALANCE_EVERY {
                last_balance = Instant::now();
                let n = self.balance_round().await;
                if n > 0 {
                    tracing::info!(moves = n, "controller started leadership/replica moves");
                }
            }
        }
    }

    async fn meta_write_local(&self, cmd: Command) -> Result<Response, PetrelError> {
        let h = self.ensure_leader(META_GROUP)?;
        self.write(META_GROUP, &h, cmd).await
    }

    /// Registration and meta-group membership (meta leader only).
    async fn meta_membership(&self, meta: &Raft) {
        let map = self.map_rx.borrow().clone();
        // Only brokers the map does not know: a registered broker's address
        // is changed by the broker itself (--join), never from --peers.
        for (id, addr) in &self.config.peers {
            if !map.brokers.contains_key(id) && !map.removed.contains(id) {
                let cmd = Command::RegisterBroker {
                    id: *id,
                    address: addr.clone(),
                };
                match self.meta_write_local(cmd).await {
                    Ok(_) => tracing::info!(broker = id, %addr, "registered broker"),
                    Err(e) => tracing::warn!(broker = id, error = %e, "registering broker"),
                }
            }
        }
        let (voters, nodes, joint) = {
            let m = meta.metrics();
            let m = m.borrow();
            let mem = m.membership_config.membership();
            let voters: BTreeSet<u64> = mem.voter_ids().collect();
            let nodes: BTreeSet<u64> = mem.nodes().map(|(id, _)| *id).collect();
            (voters, nodes, mem.get_joint_config().len() > 1)
        };
        if joint {
            return;
        }
        // Every registered broker follows the meta group (as a learner).
        for (id, addr) in &map.brokers {
            if !nodes.contains(id) {
                let node = BasicNode { addr: addr.clone() };
                match meta.add_learner(*id, node, false).await {
                    Ok(_) => tracing::info!(broker = id, "added broker as meta learner"),
                    Err(e) => tracing::warn!(broker = id, error = %e, "adding meta learner"),
                }
            }
        }
        // Replace voters that are draining or removed by active brokers.
        let bad = |b: &u64| map.draining.contains(b) || map.removed.contains(b);
        if voters.iter().any(bad) {
            let mut desired: BTreeSet<u64> = voters.iter().copied().filter(|b| !bad(b)).collect();
            for b in map.active_brokers() {
                if desired.len() >= 3 {
                    break;
                }
                desired.insert(b);
            }
            if bad(&self.id) {
                // Hand the meta leadership to a healthy voter first.
                if let Some(to) = voters.iter().find(|b| !bad(b) && **b != self.id) {
                    let _ = self.transfer_leader(META_GROUP, *to).await;
                }
                return;
            }
            if !desired.is_empty() {
                match meta.change_membership(desired.clone(), true).await {
                    Ok(_) => tracing::info!(voters = ?desired, "meta voters changed"),
                    Err(e) => tracing::warn!(error = %e, "changing meta voters"),
                }
            }
            return;
        }
        // Removed brokers leave the meta group entirely.
        let gone: BTreeSet<u64> = nodes
            .iter()
            .copied()
            .filter(|b| map.removed.contains(b) && !voters.contains(b))
            .collect();
        if !gone.is_empty() {
            match meta
                .change_membership(ChangeMembers::RemoveNodes(gone.clone()), false)
                .await
            {
                Ok(_) => tracing::info!(brokers = ?gone, "removed brokers from the meta group"),
                Err(e) => tracing::warn!(error = %e, "removing meta learners"),
            }
        }
    }

    /// Asks the controller for a balance round now.
    pub fn kick_rebalance(&self) {
        self.rebalance.notify_one();
    }

    /// One controller round: replica moves off draining brokers, then
    /// leadership moves towards the fair share. Returns the moves started.
    pub async fn balance_round(self: &Arc<Self>) -> usize {
        let map = self.map_rx.borrow().clone();
        let mut started = 0;
        // Replica moves, a bounded number in flight.
        let in_flight = map
            .topics
            .values()
            .flat_map(|t| &t.queues)
            .filter(|q| !q.retiring.is_empty())
            .count();
        if in_flight < REPLICA_MOVES_IN_FLIGHT {
            // Off draining brokers first; else spread replicas evenly (a
            // broker that joined receives its share).
            let mut moves = map.plan_drain(REPLICA_MOVES_IN_FLIGHT - in_flight);
            if moves.is_empty() && map.draining.is_empty() {
                moves = map.plan_replica_balance(REPLICA_MOVES_IN_FLIGHT - in_flight);
            }
            // Only onto brokers that answer (a registered broker that is
            // not running yet would hold the move until its timeout).
            let lease = self.lease();
            moves.retain(|(_, _, to)| *to == self.id || self.pool.heard_from(*to, lease));
            for (group, from, to) in moves {
                match self
                    .meta_write_local(Command::MoveReplica { group, from, to })
                    .await
                {
                    Ok(_) => {
                        started += 1;
                        tracing::info!(group, from, to, "moving replica");
                    }
                    Err(e) => tracing::warn!(group, from, to, error = %e, "moving replica"),
                }
            }
        }
        // Leader claims from every broker (highest term wins per group).
        let mut alive = BTreeSet::new();
        let mut claims: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
        let version = map.version;
        let futs = map.brokers.iter().map(|(id, addr)| {
            let id = *id;
            let addr = addr.clone();
            async move {
                if id == self.id {
                    return Some((id, self.routes_response(&self.map_rx.borrow().clone())));
                }
                let ch = self.pool.channel(id, &addr).ok()?;
                // Only the leader claims are used: a broker on our map
                // version leaves the map out.
                let mut r = tonic::Request::new(bpb::RoutesRequest {
                    known_map_version: version,
                });
                r.set_timeout(Duration::from_secs(1));
                let resp = BrokerDataClient::new(ch).routes(r).await.ok()?;
                Some((id, resp.into_inner()))
            }
        });
        for (id, r) in futures::future::join_all(futs).await.into_iter().flatten() {
            alive.insert(id);
            for c in r.leading {
                let e = claims.entry(c.group_id).or_insert((c.term, id));
                if c.term > e.0 {
                    *e = (c.term, id);
                }
            }
        }
        let groups: Vec<GroupLeadership> = map
            .topics
            .values()
            .flat_map(|t| &t.queues)
            .filter(|q| q.retiring.is_empty() && q.replicas.len() > 1)
            .map(|q| GroupLeadership {
                group: q.group_id,
                replicas: q.replicas.clone(),
                // A move still in flight counts as done, so two rounds (or
                // a round and `cluster rebalance`) do not both plan it.
                leader: self
                    .moves_in_flight
                    .get(&q.group_id)
                    .map(|to| *to)
                    .or_else(|| claims.get(&q.group_id).map(|c| c.1)),
            })
            .collect();
        if groups.iter().any(|g| g.leader.is_none()) {
            // Elections in progress: the counts are not stable yet.
            return started;
        }
        // Eligible: answers Routes *and* exchanges Raft traffic with us (a
        // broker cut off from its peers may still answer gRPC).
        let lease = self.lease();
        let eligible: BTreeSet<u64> = alive
            .iter()
            .copied()
            .filter(|b| !map.draining.contains(b))
            .filter(|b| *b == self.id || self.pool.heard_from(*b, lease))
            .collect();
        let now = Instant::now();
        let groups: Vec<GroupLeadership> = groups
            .into_iter()
            .map(|mut g| {
                // A recently moved group counts where it is but does not move.
                if self
                    .moved_at
                    .get(&g.group)
                    .is_some_and(|t| now.duration_since(*t) < MOVE_DAMPING)
                {
                    g.replicas = g.leader.into_iter().collect();
                }
                g
            })
            .collect();
        for (group, from, to) in plan_leader_moves(&groups, &eligible, MOVES_PER_ROUND) {
            self.moved_at.insert(group, now);
            self.moves_in_flight.insert(group, to);
            started += 1;
            let node = self.clone();
            tokio::spawn(async move {
                let r = if from == node.id {
                    node.transfer_leader(group, to).await
                } else {
                    node.peer_raft_call(from, group, KIND_TRANSFER, to.to_be_bytes().to_vec())
                        .await
                        .map(|_| ())
                };
                node.moves_in_flight.remove(&group);
                match r {
                    Ok(()) => tracing::info!(group, from, to, "moved leadership"),
                    Err(e) => tracing::info!(group, from, to, error = %e, "leadership move"),
                }
            });
        }
        started
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

    /// Hands this node's leadership of `group` to replica `to`: stop taking
    /// writes, let `to` catch up to the last entry, then ask it to campaign.
    /// The old leader grants the vote (its lease counts from its own
    /// election, which must be a lease old), so `to` wins at once.
    pub async fn transfer_leader(&self, group: u64, to: u64) -> Result<(), PetrelError> {
        let h = self.ensure_leader(group)?;
        h.quiet.wake(&h.raft);
        let voters: BTreeSet<u64> = voters(&h.raft);
        if to == self.id || !voters.contains(&to) {
            return Err(PetrelError::InvalidArgument(format!(
                "broker {to} is not another voter of group {group}"
            )));
        }
        if !self.pool.heard_from(to, self.lease()) {
            return Err(PetrelError::Unavailable(format!(
                "broker {to} is not reachable over Raft; not handing group {group} to it"
            )));
        }
        let deadline = Instant::now() + TRANSFER_TIMEOUT;
        // Our own lease must have run out, or we would refuse the vote.
        // Wait for that while still taking writes.
        let since = self.leader_since.get(&group).map(|v| v.1);
        if let Some(since) = since {
            let ready = since + self.lease() + Duration::from_millis(50);
            if ready > deadline {
                return Err(PetrelError::Unavailable(format!(
                    "group {group}: leader elected too recently to hand off"
                )));
            }
            tokio::time::sleep_until(ready.into()).await;
            self.ensure_leader(group)?;
        }
        h.handoff.store(true, Ordering::Release);
        let r = self.transfer_inner(group, &h, to, deadline).await;
        h.handoff.store(false, Ordering::Release);
        r
    }

    async fn transfer_inner(
        &self,
        group: u64,
        h: &GroupHandle,
        to: u64,
        deadline: Instant,
    ) -> Result<(), PetrelError> {
        let timeout = || {
            PetrelError::Timeout(format!(
                "handing group {group} to broker {to} took longer than {TRANSFER_TIMEOUT:?}"
            ))
        };
        // The target must hold every entry we have (writes are held back).
        loop {
            let caught_up = {
                let m = h.raft.metrics();
                let m = m.borrow();
                if m.current_leader != Some(self.id) {
                    return Ok(());
                }
                let last = m.last_log_index;
                let matched = m
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(&to).cloned().flatten())
                    .map(|l| l.index);
                last.is_some() && matched == last
            };
            if caught_up {
                break;
            }
            if Instant::now() > deadline {
                return Err(timeout());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.peer_raft_call(to, group, KIND_ELECT, Vec::new())
            .await?;
        let mut rx = h.raft.metrics();
        loop {
            if rx.borrow().current_leader != Some(self.id) {
                return Ok(());
            }
            match tokio::time::timeout_at(deadline.into(), rx.changed()).await {
                Ok(Ok(())) => {}
                _ => return Err(timeout()),
            }
        }
    }

    /// Campaign now for `group` (the leader is handing it to us).
    pub async fn elect_now(&self, group: u64) -> Result<(), PetrelError> {
        if self.stopping.load(Ordering::Acquire) {
            return Err(PetrelError::Unavailable(format!(
                "broker {} is stopping",
                self.id
            )));
        }
        let h = self.group(group).ok_or_else(|| {
            PetrelError::NotFound(format!("broker {} does not host group {group}", self.id))
        })?;
        h.quiet.wake(&h.raft);
        h.raft
            .trigger()
            .elect()
            .await
            .map_err(|e| PetrelError::Unavailable(format!("group {group}: {e}")))
    }

    /// For each group this node leads whose Raft voters differ from the
    /// map's target replicas: start the membership change (once).
    fn reconcile_memberships(self: &Arc<Self>) {
        let map = self.map_rx.borrow().clone();
        for t in map.topics.values() {
            for q in &t.queues {
                if self.changing.contains_key(&q.group_id) {
                    continue;
                }
                let Some(h) = self.group(q.group_id) else {
                    continue;
                };
                if self.serving(&h).is_none() {
                    continue;
                }
                let voters: BTreeSet<u64> = voters(&h.raft);
                let target: BTreeSet<u64> = q.replicas.iter().copied().collect();
                if voters == target && q.retiring.is_empty() {
                    continue;
                }
                self.changing.insert(q.group_id, ());
                let node = self.clone();
                let q = q.clone();
                let addrs = map.brokers.clone();
                tokio::spawn(async move {
                    if let Err(e) = node.change_replicas(&h, &q, voters, target, &addrs).await {
                        tracing::warn!(group = q.group_id, error = %e, "changing replicas");
                    }
                    node.changing.remove(&q.group_id);
                });
            }
        }
    }

    async fn change_replicas(
        &self,
        h: &GroupHandle,
        q: &crate::meta::QueueAssignment,
        voters: BTreeSet<u64>,
        target: BTreeSet<u64>,
        addrs: &BTreeMap<u64, String>,
    ) -> Result<(), PetrelError> {
        let group = q.group_id;
        h.quiet.wake(&h.raft);
        if !target.contains(&self.id) {
            // A leader being moved off hands over to a staying voter first.
            let to = target
                .iter()
                .find(|b| voters.contains(b))
                .copied()
                .ok_or_else(|| {
                    PetrelError::Unavailable(format!("group {group}: no staying voter"))
                })?;
            return self.transfer_leader(group, to).await;
        }
        if voters != target {
            for b in target.difference(&voters) {
                let addr = addrs.get(b).cloned().ok_or_else(|| {
                    PetrelError::Unavailable(format!("no address for broker {b}"))
                })?;
                tracing::info!(group, broker = b, "adding learner");
                tokio::time::timeout(
                    Duration::from_secs(120),
                    h.raft.add_learner(*b, BasicNode { addr }, true),
                )
                .await
                .map_err(|_| PetrelError::Timeout(format!("group {group}: learner {b} catch-up")))?
                .map_err(|e| PetrelError::Unavailable(format!("group {group}: {e}")))?;
            }
            tokio::time::timeout(
                Duration::from_secs(30),
                h.raft.change_membership(target.clone(), false),
            )
            .await
            .map_err(|_| PetrelError::Timeout(format!("group {group}: membership change")))?
            .map_err(|e| PetrelError::Unavailable(format!("group {group}: {e}")))?;
            tracing::info!(group, voters = ?target, "group membership changed");
        }
        self.meta_forward(bpb::MetaWriteRequest {
            op: Some(bpb::meta_write_request::Op::SettleReplicas(
                bpb::SettleReplicas {
                    group_id: group,
                    generation: q.generation,
                },
            )),
        })
        .await?;
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
            topics: map
                .topics
                .values()
                .map(crate::service::topic_route)
                .collect(),
            leading,
            meta_leader,
            hosting,
            meta_voters,
            map_unchanged: false,
        }
    }

    /// First half of a graceful stop: stop campaigning and hand every
    /// leadership to an up-to-date replica (bounded by
    /// `STOP_HANDOFF_TIMEOUT`). The server must still be serving: the
    /// targets ask this node for its vote.
    pub async fn hand_off_leaderships(&self) {
        self.stopping.store(true, Ordering::Release);
        let handles: Vec<(u64, GroupHandle)> =
            self.groups.iter().map(|e| (*e.key(), e.clone())).collect();
        for (_, h) in &handles {
            h.raft.runtime_config().elect(false);
        }
        // Let hand-offs already in flight (controller moves) finish first.
        let settle = Instant::now() + TRANSFER_TIMEOUT;
        while Instant::now() < settle
            && handles
                .iter()
                .any(|(_, h)| h.handoff.load(Ordering::Acquire))
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let led: Vec<(u64, u64)> = handles
            .iter()
            .filter(|(_, h)| self.serving(h).is_some())
            .filter_map(|(g, h)| {
                let m = h.raft.metrics();
                let m = m.borrow();
                let last = m.last_log_index;
                // The most up-to-date other voter, spread by group id.
                let voters: Vec<u64> = m
                    .membership_config
                    .membership()
                    .voter_ids()
                    .filter(|v| *v != self.id)
                    .collect();
                let matched = |v: &u64| {
                    m.replication
                        .as_ref()
                        .and_then(|r| r.get(v).cloned().flatten())
                        .map(|l| l.index)
                };
                let best = voters.iter().filter_map(matched).max();
                let cands: Vec<u64> = voters
                    .iter()
                    .copied()
                    .filter(|v| {
                        best.is_some()
                            && matched(v) == best
                            && best >= last.map(|l| l.saturating_sub(64))
                    })
                    .collect();
                (!cands.is_empty()).then(|| (*g, cands[*g as usize % cands.len()]))
            })
            .collect();
        if !led.is_empty() {
            tracing::info!(
                groups = led.len(),
                "handing leaderships away before stopping"
            );
            let futs = led.iter().map(|(g, to)| self.transfer_leader(*g, *to));
            let results =
                tokio::time::timeout(STOP_HANDOFF_TIMEOUT, futures::future::join_all(futs)).await;
            let moved = results
                .as_ref()
                .map(|r| r.iter().filter(|x| x.is_ok()).count())
                .unwrap_or(0);
            tracing::info!(moved, of = led.len(), "leadership hand-off done");
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
