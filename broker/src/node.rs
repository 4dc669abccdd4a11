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
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use openraft::error::{ClientWriteError, RaftError};
use openraft::BasicNode;
use petrel_proto::PetrelError;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::BrokerConfig;
use crate::log_store::LogStore;
use crate::meta::ClusterMap;
use crate::network::{NetworkFactory, PeerPool};
use crate::sm::{Kind, QueueShared, StateMachine};
use crate::storage::Store;
use crate::types::{Command, Raft, Response, META_GROUP};

/// How long a non-preferred replica waits before it initializes a group
/// itself (the preferred leader normally does it at once).
const INIT_GRACE: Duration = Duration::from_secs(3);
/// Upper bound on one replicated write, so a request never hangs forever.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct GroupHandle {
    pub raft: Raft,
    pub queue: Option<Arc<QueueShared>>,
}

pub struct Node {
    pub id: u64,
    pub config: BrokerConfig,
    pub store: Store,
    pub pool: PeerPool,
    pub groups: DashMap<u64, GroupHandle>,
    pub map_rx: watch::Receiver<Arc<ClusterMap>>,
    raft_config: Arc<openraft::Config>,
    pub shutdown: CancellationToken,
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
        let node = Arc::new(Self {
            id: config.id,
            store: store.clone(),
            pool: PeerPool::default(),
            groups: DashMap::new(),
            map_rx,
            raft_config,
            shutdown,
            config,
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
        node.groups.insert(
            META_GROUP,
            GroupHandle {
                raft: raft.clone(),
                queue: None,
            },
        );
        let voters = node.meta_voters();
        if voters.contains_key(&node.id) {
            let first = *voters.keys().next().expect("non-empty");
            spawn_initialize(raft, voters, first == node.id);
        }
        tokio::spawn(node.clone().reconcile_loop());
        tokio::spawn(node.clone().controller_loop());
        Ok(node)
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
        match Self::leader_of(&h.raft) {
            Some(l) if l == self.id => Ok(h),
            other => Err(PetrelError::NotLeader {
                group,
                leader: other,
            }),
        }
    }

    /// Replicates `cmd` through `group` and returns its applied response.
    pub async fn write(
        &self,
        group: u64,
        h: &GroupHandle,
        cmd: Command,
    ) -> Result<Response, PetrelError> {
        match tokio::time::timeout(WRITE_TIMEOUT, h.raft.client_write(cmd)).await {
            Err(_) => Err(PetrelError::Timeout(format!(
                "replicating to group {group} took longer than {WRITE_TIMEOUT:?}"
            ))),
            Ok(Ok(r)) => Ok(r.data),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                Err(PetrelError::NotLeader {
                    group,
                    leader: f.leader_id,
                })
            }
            Ok(Err(RaftError::APIError(e))) => Err(PetrelError::Internal(e.to_string())),
            Ok(Err(RaftError::Fatal(e))) => Err(PetrelError::Unavailable(format!(
                "group {group} is stopped: {e}"
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
            let shared = Arc::new(QueueShared {
                group: q.group_id,
                state: Default::default(),
                changed: Default::default(),
            });
            let sm =
                StateMachine::open(q.group_id, self.store.clone(), Kind::Queue(shared.clone()))?;
            let raft = Raft::new(
                self.id,
                self.raft_config.clone(),
                NetworkFactory {
                    group: q.group_id,
                    pool: self.pool.clone(),
                },
                LogStore::new(q.group_id, self.store.clone()),
                sm,
            )
            .await?;
            self.groups.insert(
                q.group_id,
                GroupHandle {
                    raft: raft.clone(),
                    queue: Some(shared),
                },
            );
            let members: BTreeMap<u64, BasicNode> = q
                .replicas
                .iter()
                .map(|b| {
                    let addr = map.brokers.get(b).cloned().unwrap_or_default();
                    (*b, BasicNode { addr })
                })
                .collect();
            spawn_initialize(raft, members, q.replicas.first() == Some(&self.id));
            tracing::info!(group = q.group_id, queue = q.queue, replicas = ?q.replicas, "started queue group");
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

    /// While this node leads the meta group: make sure every configured
    /// broker is registered in the map.
    async fn controller_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let meta = self.meta();
            if Self::leader_of(&meta) != Some(self.id) {
                continue;
            }
            let map = self.map_rx.borrow().clone();
            // Brokers beyond the meta voters follow the meta group as
            // learners, so they learn the map and host their queues.
            let members: BTreeSet<u64> = meta
                .metrics()
                .borrow()
                .membership_config
                .membership()
                .nodes()
                .map(|(id, _)| *id)
                .collect();
            for (id, addr) in &self.config.peers {
                if !members.contains(id) {
                    let node = BasicNode { addr: addr.clone() };
                    match meta.add_learner(*id, node, false).await {
                        Ok(_) => tracing::info!(broker = id, "added broker as meta learner"),
                        Err(e) => tracing::warn!(broker = id, error = %e, "adding meta learner"),
                    }
                }
            }
            for (id, addr) in &self.config.peers {
                if map.brokers.get(id) != Some(addr) {
                    let cmd = Command::RegisterBroker {
                        id: *id,
                        address: addr.clone(),
                    };
                    let h = GroupHandle {
                        raft: meta.clone(),
                        queue: None,
                    };
                    match self.write(META_GROUP, &h, cmd).await {
                        Ok(_) => tracing::info!(broker = id, %addr, "registered broker"),
                        Err(e) => tracing::warn!(broker = id, error = %e, "registering broker"),
                    }
                }
            }
        }
    }

    pub async fn stop(&self) {
        self.shutdown.cancel();
        let handles: Vec<(u64, GroupHandle)> =
            self.groups.iter().map(|e| (*e.key(), e.clone())).collect();
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
