//! openraft state machine for both kinds of group: the meta group (cluster
//! map) and queue groups (records, consumer and de-duplication state).
//!
//! Applying writes with the WAL off (see `storage.rs` invariants); the
//! in-memory state is updated and persisted under one write lock so that a
//! reader never sees an offset whose record is not yet readable.

use std::io::Cursor;
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder, StorageIOError};
use rocksdb::{Direction, IteratorMode, WriteBatch};
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};

use crate::keys::{self, sm_state};
use crate::meta::ClusterMap;
use crate::queue::{Changes, ConsumerState, ProducerWindow, QueueHeader, QueueState};
use crate::storage::{Store, CF_RECORDS, CF_SM_STATE};
use crate::types::{
    ApplyError, Command, Entry, LogId, RaftStorageError, Response, SnapshotMeta, StoredMembership,
    TypeConfig,
};

/// Queue state shared between the state machine and the data service.
#[derive(Debug)]
pub struct QueueShared {
    pub group: u64,
    pub state: RwLock<QueueState>,
    /// Woken whenever records are appended or leases change.
    pub changed: Notify,
}

impl QueueShared {
    pub fn read(&self) -> std::sync::RwLockReadGuard<'_, QueueState> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Debug, Clone)]
pub enum Kind {
    Meta(watch::Sender<Arc<ClusterMap>>),
    Queue(Arc<QueueShared>),
}

pub struct StateMachine {
    group: u64,
    store: Store,
    last_applied: Option<LogId>,
    membership: StoredMembership,
    kind: Kind,
    /// openraft asks for the current snapshot once at start-up only to learn
    /// its meta; that first answer is a flush mark instead of a full copy of
    /// the queue (see `get_current_snapshot`).
    startup_snapshot_served: bool,
}

#[derive(Serialize, Deserialize)]
enum SnapshotPayload {
    Meta(ClusterMap),
    Queue {
        header: QueueHeader,
        consumers: Vec<(String, ConsumerState)>,
        producers: Vec<(String, ProducerWindow)>,
        records: Vec<(u64, Bytes)>,
    },
    /// A snapshot that only marks a flush point (queue groups): the log up to
    /// it may be purged. The data sent to a follower is always produced by
    /// `get_current_snapshot`, which builds a full payload.
    FlushMark,
}

fn sm_read_err(e: impl std::error::Error + 'static) -> RaftStorageError {
    StorageIOError::read_state_machine(&e).into()
}
fn sm_write_err(e: impl std::error::Error + 'static) -> RaftStorageError {
    StorageIOError::write_state_machine(&e).into()
}

fn scan_named<T: serde::de::DeserializeOwned>(
    store: &Store,
    group: u64,
    kind: u8,
) -> Result<Vec<(String, T)>, RaftStorageError> {
    let prefix = keys::state_key(group, kind);
    let cf = store.cf(CF_SM_STATE);
    let it = store
        .db()
        .iterator_cf(&cf, IteratorMode::From(&prefix, Direction::Forward));
    let mut out = Vec::new();
    for kv in it {
        let (k, v) = kv.map_err(sm_read_err)?;
        if !k.starts_with(&prefix) {
            break;
        }
        let name = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
        out.push((name, bincode::deserialize(&v).map_err(sm_read_err)?));
    }
    Ok(out)
}

impl StateMachine {
    /// Loads the state last flushed for `group`.
    pub fn open(group: u64, store: Store, kind: Kind) -> Result<Self, RaftStorageError> {
        let (last_applied, membership) = match store
            .get(CF_SM_STATE, &keys::state_key(group, sm_state::APPLIED))
            .map_err(sm_read_err)?
        {
            Some(v) => bincode::deserialize(&v).map_err(sm_read_err)?,
            None => (None, StoredMembership::default()),
        };
        match &kind {
            Kind::Meta(tx) => {
                if let Some(v) = store
                    .get(CF_SM_STATE, &keys::state_key(group, sm_state::CLUSTER_MAP))
                    .map_err(sm_read_err)?
                {
                    let map: ClusterMap = bincode::deserialize(&v).map_err(sm_read_err)?;
                    tx.send_replace(Arc::new(map));
                }
            }
            Kind::Queue(q) => {
                let header = match store
                    .get(CF_SM_STATE, &keys::state_key(group, sm_state::QUEUE_HEADER))
                    .map_err(sm_read_err)?
                {
                    Some(v) => bincode::deserialize(&v).map_err(sm_read_err)?,
                    None => QueueHeader::default(),
                };
                let consumers = scan_named(&store, group, sm_state::CONSUMER)?;
                let producers = scan_named(&store, group, sm_state::PRODUCER)?;
                let mut st = q.state.write().unwrap_or_else(|e| e.into_inner());
                *st = QueueState {
                    header,
                    consumers: consumers.into_iter().collect(),
                    producers: producers.into_iter().collect(),
                };
            }
        }
        Ok(Self {
            group,
            store,
            last_applied,
            membership,
            kind,
            startup_snapshot_served: false,
        })
    }

    /// Records `e` as applied (and its membership, if any); returns its
    /// command when it carries one.
    fn note_applied<'e>(&mut self, e: &'e Entry) -> Option<&'e Command> {
        self.last_applied = Some(e.log_id);
        match &e.payload {
            EntryPayload::Blank => None,
            EntryPayload::Membership(m) => {
                self.membership = StoredMembership::new(Some(e.log_id), m.clone());
                None
            }
            EntryPayload::Normal(cmd) => Some(cmd),
        }
    }

    fn put_applied(&self, b: &mut WriteBatch) -> Result<(), RaftStorageError> {
        let v =
            bincode::serialize(&(&self.last_applied, &self.membership)).map_err(sm_write_err)?;
        b.put_cf(
            &self.store.cf(CF_SM_STATE),
            keys::state_key(self.group, sm_state::APPLIED),
            v,
        );
        Ok(())
    }

    fn persist_queue(
        &self,
        q: &QueueState,
        ch: Changes,
        b: &mut WriteBatch,
    ) -> Result<(), RaftStorageError> {
        let g = self.group;
        let rec = self.store.cf(CF_RECORDS);
        let sm = self.store.cf(CF_SM_STATE);
        for (off, bytes) in &ch.records {
            if let Err(e) = petrel_proto::record::verify(bytes) {
                // Replication check: the leader's bytes arrived damaged or
                // were built wrong. Store them anyway (the log is the truth
                // and replicas must agree); every read will report corrupt.
                tracing::error!(group = g, offset = off, error = %e, "record failed its CRC on apply");
            }
            b.put_cf(&rec, keys::record_key(g, *off), bytes);
        }
        if let Some((old, new)) = ch.truncated {
            // Range delete: one tombstone, space returns at compaction.
            b.delete_range_cf(&rec, keys::record_key(g, old), keys::record_key(g, new));
        }
        if ch.header {
            let v = bincode::serialize(&q.header).map_err(sm_write_err)?;
            b.put_cf(&sm, keys::state_key(g, sm_state::QUEUE_HEADER), v);
        }
        for name in &ch.consumers {
            if let Some(c) = q.consumers.get(name) {
                let v = bincode::serialize(c).map_err(sm_write_err)?;
                b.put_cf(&sm, keys::named_state_key(g, sm_state::CONSUMER, name), v);
            }
        }
        for name in &ch.producers {
            if let Some(p) = q.producers.get(name) {
                let v = bincode::serialize(p).map_err(sm_write_err)?;
                b.put_cf(&sm, keys::named_state_key(g, sm_state::PRODUCER, name), v);
            }
        }
        for name in &ch.removed_producers {
            b.delete_cf(&sm, keys::named_state_key(g, sm_state::PRODUCER, name));
        }
        Ok(())
    }

    fn apply_queue(q: &mut QueueState, cmd: &Command, index: u64, ch: &mut Changes) -> Response {
        match cmd {
            Command::Append {
                producer_id,
                records,
            } => Response::Appended(q.append(producer_id, records, index, ch)),
            Command::Pop {
                consumer,
                max,
                now_ms,
                invisible_ms,
            } => Response::Leased(q.pop(consumer, *max, *now_ms, *invisible_ms, index, ch)),
            Command::Ack { consumer, leases } => Response::Acked(q.ack(consumer, leases, ch)),
            Command::ChangeInvisible {
                consumer,
                offset,
                lease_id,
                now_ms,
                invisible_ms,
            } => Response::Lease(q.change_invisible(
                consumer,
                *offset,
                *lease_id,
                *now_ms,
                *invisible_ms,
                index,
                ch,
            )),
            Command::CommitOffset { consumer, offset } => {
                Response::Done(q.commit_offset(consumer, *offset, ch))
            }
            Command::Truncate {
                before,
                freed_bytes,
            } => {
                q.truncate(*before, *freed_bytes, ch);
                Response::Done(Ok(()))
            }
            _ => Response::Done(Err(ApplyError::WrongGroupKind)),
        }
    }

    fn apply_meta(map: &mut ClusterMap, cmd: &Command) -> Response {
        Response::Meta(match cmd {
            Command::RegisterBroker { id, address } => map.register_broker(*id, address),
            Command::CreateTopic {
                spec,
                placements,
                now_ms,
            } => map.create_topic(spec, placements, *now_ms),
            Command::UpdateTopic {
                name,
                retention_ms,
                retention_bytes,
                add_queues,
                target_queue_count,
            } => map.update_topic(
                name,
                *retention_ms,
                *retention_bytes,
                *target_queue_count,
                add_queues,
            ),
            Command::DeleteTopic { name } => map.delete_topic(name),
            Command::SetDraining { id, draining } => map.set_draining(*id, *draining),
            Command::RemoveBroker { id } => map.remove_broker(*id),
            Command::MoveReplica { group, from, to } => map.move_replica(*group, *from, *to),
            Command::SettleReplicas { group, generation } => {
                map.settle_replicas(*group, *generation)
            }
            _ => Err(ApplyError::WrongGroupKind),
        })
    }

    fn full_payload(&self) -> Result<SnapshotPayload, RaftStorageError> {
        match &self.kind {
            Kind::Meta(tx) => Ok(SnapshotPayload::Meta((**tx.borrow()).clone())),
            Kind::Queue(q) => {
                let st = q.read().clone();
                let cf = self.store.cf(CF_RECORDS);
                let from = keys::record_key(self.group, st.header.start_offset);
                let mut records = Vec::new();
                for kv in self
                    .store
                    .db()
                    .iterator_cf(&cf, IteratorMode::From(&from, Direction::Forward))
                {
                    let (k, v) = kv.map_err(sm_read_err)?;
                    match keys::decode_group_u64(&k) {
                        Some((g, off)) if g == self.group && off < st.header.next_offset => {
                            records.push((off, Bytes::from(Vec::from(v))))
                        }
                        _ => break,
                    }
                }
                Ok(SnapshotPayload::Queue {
                    header: st.header,
                    consumers: st.consumers.into_iter().collect(),
                    producers: st.producers.into_iter().collect(),
                    records,
                })
            }
        }
    }

    fn snapshot_of(
        &self,
        payload: &SnapshotPayload,
    ) -> Result<Snapshot<TypeConfig>, RaftStorageError> {
        let data = bincode::serialize(payload).map_err(sm_read_err)?;
        let meta = SnapshotMeta {
            last_log_id: self.last_applied,
            last_membership: self.membership.clone(),
            // Deterministic: the same applied state names the same snapshot.
            snapshot_id: match self.last_applied {
                Some(l) => format!("{}-{}-{}", self.group, l.leader_id.term, l.index),
                None => format!("{}-empty", self.group),
            },
        };
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

/// Builds snapshots: for queue groups a flush mark (see `SnapshotPayload`).
pub struct SnapshotBuilder {
    sm_copy: StateMachine,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, RaftStorageError> {
        // Everything applied up to `last_applied` (captured when this builder
        // was made) reaches SST files before the log may be purged.
        self.sm_copy.store.flush_state().map_err(sm_write_err)?;
        let payload = match &self.sm_copy.kind {
            Kind::Meta(_) => self.sm_copy.full_payload()?,
            Kind::Queue(_) => SnapshotPayload::FlushMark,
        };
        self.sm_copy.snapshot_of(&payload)
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId>, StoredMembership), RaftStorageError> {
        Ok((self.last_applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, RaftStorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut out = Vec::new();
        let mut b = WriteBatch::default();
        match self.kind.clone() {
            Kind::Queue(shared) => {
                let mut st = shared.state.write().unwrap_or_else(|e| e.into_inner());
                let mut ch = Changes::default();
                for e in entries {
                    out.push(match self.note_applied(&e) {
                        Some(cmd) => Self::apply_queue(&mut st, cmd, e.log_id.index, &mut ch),
                        None => Response::None,
                    });
                }
                self.persist_queue(&st, ch, &mut b)?;
                self.put_applied(&mut b)?;
                self.store.write_unlogged(b).map_err(sm_write_err)?;
                drop(st);
                shared.changed.notify_waiters();
            }
            Kind::Meta(tx) => {
                let mut map = (**tx.borrow()).clone();
                let before = map.version;
                for e in entries {
                    out.push(match self.note_applied(&e) {
                        Some(cmd) => Self::apply_meta(&mut map, cmd),
                        None => Response::None,
                    });
                }
                let v = bincode::serialize(&map).map_err(sm_write_err)?;
                b.put_cf(
                    &self.store.cf(CF_SM_STATE),
                    keys::state_key(self.group, sm_state::CLUSTER_MAP),
                    v,
                );
                self.put_applied(&mut b)?;
                self.store.write_unlogged(b).map_err(sm_write_err)?;
                if map.version != before {
                    tx.send_replace(Arc::new(map));
                }
            }
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            sm_copy: StateMachine {
                group: self.group,
                store: self.store.clone(),
                last_applied: self.last_applied,
                membership: self.membership.clone(),
                kind: self.kind.clone(),
                startup_snapshot_served: true,
            },
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, RaftStorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), RaftStorageError> {
        let payload: SnapshotPayload =
            bincode::deserialize(snapshot.get_ref()).map_err(sm_read_err)?;
        let g = self.group;
        let mut b = WriteBatch::default();
        self.last_applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        match (&self.kind, payload) {
            (Kind::Meta(tx), SnapshotPayload::Meta(map)) => {
                let v = bincode::serialize(&map).map_err(sm_write_err)?;
                b.put_cf(
                    &self.store.cf(CF_SM_STATE),
                    keys::state_key(g, sm_state::CLUSTER_MAP),
                    v,
                );
                self.put_applied(&mut b)?;
                self.store.write_unlogged(b).map_err(sm_write_err)?;
                tx.send_replace(Arc::new(map));
            }
            (
                Kind::Queue(shared),
                SnapshotPayload::Queue {
                    header,
                    consumers,
                    producers,
                    records,
                },
            ) => {
                let mut st = shared.state.write().unwrap_or_else(|e| e.into_inner());
                b.delete_range_cf(
                    &self.store.cf(CF_RECORDS),
                    &keys::group_start(g)[..],
                    &keys::group_end(g)[..],
                );
                b.delete_range_cf(
                    &self.store.cf(CF_SM_STATE),
                    &keys::group_start(g)[..],
                    &keys::group_end(g)[..],
                );
                *st = QueueState {
                    header,
                    consumers: consumers.into_iter().collect(),
                    producers: producers.into_iter().collect(),
                };
                let mut ch = Changes {
                    records,
                    header: true,
                    consumers: st.consumers.keys().cloned().collect(),
                    producers: st.producers.keys().cloned().collect(),
                    removed_producers: Vec::new(),
                    truncated: None,
                };
                ch.records.sort_by_key(|r| r.0);
                self.persist_queue(&st, ch, &mut b)?;
                self.put_applied(&mut b)?;
                self.store.write_unlogged(b).map_err(sm_write_err)?;
                drop(st);
                shared.changed.notify_waiters();
            }
            (_, SnapshotPayload::FlushMark) => {
                return Err(sm_read_err(std::io::Error::other(
                    "received a flush-mark snapshot, which carries no data",
                )))
            }
            _ => {
                return Err(sm_read_err(std::io::Error::other(
                    "snapshot payload does not match the group kind",
                )))
            }
        }
        // The log before this snapshot is about to be dropped: make the
        // installed state durable first.
        self.store.flush_state().map_err(sm_write_err)?;
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, RaftStorageError> {
        if self.last_applied.is_none() {
            // Nothing applied yet (a new group): the start-up call is over.
            self.startup_snapshot_served = true;
            return Ok(None);
        }
        self.store.flush_state().map_err(sm_write_err)?;
        // The first call comes from openraft's start-up (RaftCore reads the
        // snapshot meta); answering it with a full copy of a large queue
        // would cost memory and time for nothing. Later calls are for
        // sending to a lagging follower and get the full payload.
        if !self.startup_snapshot_served && matches!(self.kind, Kind::Queue(_)) {
            self.startup_snapshot_served = true;
            return Ok(Some(self.snapshot_of(&SnapshotPayload::FlushMark)?));
        }
        self.startup_snapshot_served = true;
        let payload = self.full_payload()?;
        Ok(Some(self.snapshot_of(&payload)?))
    }
}
