//! openraft state machine for both kinds of group: the meta group (cluster
//! map) and queue groups (records, consumer and de-duplication state).
//!
//! Applying writes with the WAL off (see `storage.rs` invariants); the
//! in-memory state is updated and persisted under one write lock so that a
//! reader never sees an offset whose record is not yet readable.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::Cursor;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder, StorageIOError};
use petrel_proto::filter::{Filter, FilterKind};
use rocksdb::{Direction, IteratorMode, WriteBatch};
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};

use crate::keys::{self, sm_state};
use crate::meta::ClusterMap;
use crate::queue::{
    Changes, ConsumerState, DeadLetter, Lease, PopParams, ProducerWindow, QueueHeader, QueueState,
    RecordView, RetryPolicy, Txn, TXN_HOLD,
};
use crate::storage::{Store, CF_INDEXES, CF_RECORDS, CF_SM_STATE, CF_TIMERS};
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
    /// Earliest delivery time of a held record (`i64::MAX`: none), kept
    /// beside the state so the release loop looks at an atomic per queue
    /// rather than taking every queue's lock 20 times a second.
    pub next_due_ms: AtomicI64,
    /// The broker's earliest due time over all its queues: lowered here
    /// whenever this queue's moves down.
    earliest_due: Arc<AtomicI64>,
    /// Bumped by every apply (and load): a receive that found nothing waits
    /// for it to move (`WaitReady`) instead of polling.
    version: AtomicU64,
    /// Lease ids the leader hands out: its term above bit 40, a counter
    /// below (log indexes, used by older entries, stay below 2^40).
    lease_ids: AtomicU64,
    /// Consumer ops waiting for their checkpoint (see `checkpoint.rs`).
    pub lane: crate::checkpoint::CheckpointLane,
}

impl QueueShared {
    pub fn new(group: u64, earliest_due: Arc<AtomicI64>) -> Self {
        Self {
            group,
            state: RwLock::new(QueueState::default()),
            changed: Notify::new(),
            next_due_ms: AtomicI64::new(i64::MAX),
            earliest_due,
            version: AtomicU64::new(0),
            lease_ids: AtomicU64::new(0),
            lane: Default::default(),
        }
    }

    /// A lease id unique across leaders: `term` above bit 40.
    pub fn next_lease_id(&self, term: u64) -> u64 {
        (term << 40) | (self.lease_ids.fetch_add(1, Ordering::Relaxed) & ((1 << 40) - 1))
    }

    pub fn write(&self) -> std::sync::RwLockWriteGuard<'_, QueueState> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The leader changed `st` in memory in a way that may make a record
    /// deliverable (an ack can free a FIFO message group, a nack or reset
    /// brings records back): receives waiting on this queue look again.
    /// Call with `st` still locked, then `changed.notify_waiters()` once it
    /// is released.
    pub fn touched(&self, st: &QueueState) {
        self.note_due(st, true);
    }

    /// The queue's change counter (see `version`).
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    pub fn read(&self) -> std::sync::RwLockReadGuard<'_, QueueState> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The state just changed: publish its due time and, if the change
    /// may make a record deliverable (`bump`), the version (call before
    /// `changed.notify_waiters()`). A change that cannot (a receive's
    /// leases, a checkpoint of ops this leader took) leaves the version
    /// alone: every waiting receive of the queue would otherwise come back
    /// through the proxy and pop every queue of its topic for nothing.
    fn note_due(&self, st: &QueueState, bump: bool) {
        let due = st.next_due().unwrap_or(i64::MAX);
        self.next_due_ms.store(due, Ordering::Release);
        self.earliest_due.fetch_min(due, Ordering::AcqRel);
        if bump {
            self.version.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Earliest delivery time of a held record, if any.
    pub fn next_due(&self) -> Option<i64> {
        Some(self.next_due_ms.load(Ordering::Acquire)).filter(|t| *t != i64::MAX)
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
    filters: HashMap<(i32, String), Arc<Filter>>,
    /// Consumer groups whose leases are persisted one key each (see
    /// `persist_consumer`); the others keep them inside their state.
    keyed: HashSet<String>,
}

/// A consumer group holding more leases than this has them persisted one
/// key each, so a checkpoint writes what it changed; below half of it,
/// inside the group's state again (one small value beats hundreds of
/// key writes and tombstones when leases are few and short-lived).
pub const KEYED_LEASES_ABOVE: usize = 4096;

/// Compiles a subscription filter (`pb::FilterType` as i32).
pub fn compile_filter(kind: i32, expr: &str) -> Result<Filter, petrel_proto::PetrelError> {
    use petrel_proto::pb::FilterType;
    let k = match FilterType::try_from(kind) {
        Ok(FilterType::Tag) | Ok(FilterType::Unspecified) => FilterKind::Tag,
        Ok(FilterType::Sql) => FilterKind::Sql,
        Err(_) => {
            return Err(petrel_proto::PetrelError::InvalidFilter(format!(
                "unknown filter type {kind}"
            )))
        }
    };
    Filter::parse(k, expr).map_err(|e| petrel_proto::PetrelError::InvalidFilter(e.to_string()))
}

#[derive(Serialize, Deserialize)]
enum SnapshotPayload {
    Meta(ClusterMap),
    Queue {
        header: QueueHeader,
        consumers: Vec<(String, ConsumerState)>,
        producers: Vec<(String, ProducerWindow)>,
        records: Vec<(u64, Bytes)>,
        /// Delayed records not yet due: (offset, deliver time).
        held: Vec<(u64, i64)>,
        txns: Vec<(String, Txn)>,
    },
    /// A snapshot that only marks a flush point (queue groups): the log up to
    /// it may be purged. The data sent to a follower is always produced by
    /// `get_current_snapshot`, which builds a full payload.
    FlushMark,
}

/// A consumer group's state without its leases (each has its own key),
/// laid out as `ConsumerState` so that it decodes as one.
#[derive(Serialize)]
struct ConsumerHead<'a> {
    committed: u64,
    next_fresh: u64,
    /// Always empty.
    leases: BTreeMap<u64, Lease>,
    pending: &'a BTreeMap<u64, u64>,
    dead_pending: &'a BTreeMap<u64, DeadLetter>,
    skipped: u64,
    dead_lettered: u64,
    filtered: u64,
    policy: RetryPolicy,
    finished: &'a BTreeMap<u64, u64>,
}

impl<'a> ConsumerHead<'a> {
    fn of(c: &'a ConsumerState) -> Self {
        Self {
            committed: c.committed,
            next_fresh: c.next_fresh,
            leases: BTreeMap::new(),
            pending: &c.pending,
            dead_pending: &c.dead_pending,
            skipped: c.skipped,
            dead_lettered: c.dead_lettered,
            filtered: c.filtered,
            policy: c.policy,
            finished: &c.finished,
        }
    }
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

/// Calls `f(key, value)` for every key of the state CF that starts with
/// `prefix`, in order.
fn for_each_with_prefix(
    store: &Store,
    prefix: &[u8],
    mut f: impl FnMut(&[u8], &[u8]) -> Result<(), RaftStorageError>,
) -> Result<(), RaftStorageError> {
    let cf = store.cf(CF_SM_STATE);
    for kv in store
        .db()
        .iterator_cf(&cf, IteratorMode::From(prefix, Direction::Forward))
    {
        let (k, v) = kv.map_err(sm_read_err)?;
        if !k.starts_with(prefix) {
            break;
        }
        f(&k, &v)?;
    }
    Ok(())
}

/// Every producer's de-duplication window of `group`: its entries
/// (`PRODUCER_SEQ`) and when it was last seen (`PRODUCER_SEEN`).
fn scan_producers(
    store: &Store,
    group: u64,
) -> Result<HashMap<String, ProducerWindow>, RaftStorageError> {
    let mut out: HashMap<String, ProducerWindow> = HashMap::new();
    let seqs = keys::state_key(group, sm_state::PRODUCER_SEQ);
    for_each_with_prefix(store, &seqs, |k, v| {
        let (Some((name, seq)), Ok(off)) = (
            keys::decode_producer_seq_key(group, k),
            <[u8; 8]>::try_from(v),
        ) else {
            return Err(sm_read_err(std::io::Error::other(
                "malformed de-duplication entry",
            )));
        };
        out.entry(name)
            .or_default()
            .seqs
            .insert(seq, u64::from_be_bytes(off));
        Ok(())
    })?;
    let seen = keys::state_key(group, sm_state::PRODUCER_SEEN);
    for_each_with_prefix(store, &seen, |k, v| {
        let name = String::from_utf8_lossy(&k[seen.len()..]).into_owned();
        out.entry(name).or_default().last_seen =
            <[u8; 8]>::try_from(v).map_or(0, u64::from_be_bytes);
        Ok(())
    })?;
    Ok(out)
}

impl StateMachine {
    /// Loads the state last flushed for `group`.
    pub fn open(group: u64, store: Store, kind: Kind) -> Result<Self, RaftStorageError> {
        let mut keyed = HashSet::new();
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
                let mut consumers: BTreeMap<String, ConsumerState> =
                    scan_named(&store, group, sm_state::CONSUMER)?
                        .into_iter()
                        .collect();
                let lease_prefix = keys::state_key(group, sm_state::CONSUMER_LEASE);
                for_each_with_prefix(&store, &lease_prefix, |k, v| {
                    if let Some((name, off)) = keys::decode_consumer_lease_key(group, k) {
                        let l: Lease = bincode::deserialize(v).map_err(sm_read_err)?;
                        keyed.insert(name.clone());
                        consumers.entry(name).or_default().leases.insert(off, l);
                    }
                    Ok(())
                })?;
                let producers = scan_producers(&store, group)?;
                let mut held = BTreeMap::new();
                let mut due = BTreeSet::new();
                let prefix = keys::group_start(group);
                let cf = store.cf(CF_TIMERS);
                for kv in store
                    .db()
                    .iterator_cf(&cf, IteratorMode::From(&prefix, Direction::Forward))
                {
                    let (k, v) = kv.map_err(sm_read_err)?;
                    let Some((g, off)) = keys::decode_group_u64(&k) else {
                        break;
                    };
                    if g != group {
                        break;
                    }
                    let at = i64::from_be_bytes(v.as_ref().try_into().unwrap_or([0; 8]));
                    held.insert(off, at);
                    if at != TXN_HOLD {
                        due.insert((at, off));
                    }
                }
                let txns = scan_named(&store, group, sm_state::TXN)?;
                let mut st = q.state.write().unwrap_or_else(|e| e.into_inner());
                *st = QueueState {
                    header,
                    consumers: consumers.into_iter().collect(),
                    serving: None,
                    producers: producers.into_iter().collect(),
                    held,
                    due,
                    txns: txns.into_iter().collect(),
                };
                q.note_due(&st, true);
            }
        }
        Ok(Self {
            group,
            store,
            last_applied,
            membership,
            kind,
            startup_snapshot_served: false,
            filters: HashMap::new(),
            keyed,
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

    /// Writes consumer group `name`: whole, or (`touched`) its state but
    /// the leases plus the leases at `touched`. Leases live inside the
    /// state while they are few, one key each while they are many (see
    /// [`KEYED_LEASES_ABOVE`]); `keyed` tracks which form is on disk.
    fn persist_consumer(
        &self,
        keyed: &mut HashSet<String>,
        name: &str,
        c: &ConsumerState,
        touched: Option<&Vec<u64>>,
        b: &mut WriteBatch,
    ) -> Result<(), RaftStorageError> {
        let g = self.group;
        let sm = self.store.cf(CF_SM_STATE);
        let head_key = keys::named_state_key(g, sm_state::CONSUMER, name);
        let was_keyed = keyed.contains(name);
        let limit = if was_keyed {
            KEYED_LEASES_ABOVE / 2
        } else {
            KEYED_LEASES_ABOVE
        };
        if c.leases.len() <= limit {
            b.put_cf(&sm, head_key, bincode::serialize(c).map_err(sm_write_err)?);
            if was_keyed {
                let (from, to) = keys::consumer_lease_range(g, name);
                b.delete_range_cf(&sm, from, to);
                keyed.remove(name);
            }
            return Ok(());
        }
        let head = bincode::serialize(&ConsumerHead::of(c)).map_err(sm_write_err)?;
        b.put_cf(&sm, head_key, head);
        let put = |b: &mut WriteBatch, off: u64, l: &Lease| -> Result<(), RaftStorageError> {
            let v = bincode::serialize(l).map_err(sm_write_err)?;
            b.put_cf(&sm, keys::consumer_lease_key(g, name, off), v);
            Ok(())
        };
        match touched {
            Some(offsets) if was_keyed => {
                for off in offsets {
                    match c.leases.get(off) {
                        Some(l) => put(b, *off, l)?,
                        None => b.delete_cf(&sm, keys::consumer_lease_key(g, name, *off)),
                    }
                }
            }
            _ => {
                if was_keyed {
                    let (from, to) = keys::consumer_lease_range(g, name);
                    b.delete_range_cf(&sm, from, to);
                }
                for (off, l) in &c.leases {
                    put(b, *off, l)?;
                }
                keyed.insert(name.to_string());
            }
        }
        Ok(())
    }

    fn persist_queue(
        &self,
        q: &QueueState,
        ch: Changes,
        keyed: &mut HashSet<String>,
        b: &mut WriteBatch,
    ) -> Result<(), RaftStorageError> {
        let g = self.group;
        let rec = self.store.cf(CF_RECORDS);
        let idx = self.store.cf(CF_INDEXES);
        let sm = self.store.cf(CF_SM_STATE);
        for (off, bytes) in &ch.records {
            if let Err(e) = petrel_proto::record::verify(bytes) {
                // Replication check: the leader's bytes arrived damaged or
                // were built wrong. Store them anyway (the log is the truth
                // and replicas must agree); every read will report corrupt.
                tracing::error!(group = g, offset = off, error = %e, "record failed its CRC on apply");
            }
            b.put_cf(&rec, keys::record_key(g, *off), bytes);
            if let Some(key) = petrel_proto::record::key_of(bytes).filter(|k| !k.is_empty()) {
                b.put_cf(&idx, keys::key_index_key(g, key, *off), []);
            }
            if let Some(id) =
                petrel_proto::record::property_of(bytes, petrel_proto::record::CLIENT_ID_PROPERTY)
                    .filter(|id| !id.is_empty())
            {
                b.put_cf(&idx, keys::client_id_index_key(g, id, *off), []);
            }
        }
        let timers = self.store.cf(CF_TIMERS);
        for (off, at) in &ch.held_added {
            b.put_cf(&timers, keys::record_key(g, *off), at.to_be_bytes());
        }
        for off in &ch.held_removed {
            b.delete_cf(&timers, keys::record_key(g, *off));
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
            match q.consumers.get(name) {
                Some(c) => self.persist_consumer(keyed, name, c, None, b)?,
                None => {
                    // Deleted: its state and any lease keys go.
                    b.delete_cf(&sm, keys::named_state_key(g, sm_state::CONSUMER, name));
                    let (from, to) = keys::consumer_lease_range(g, name);
                    b.delete_range_cf(&sm, from, to);
                    keyed.remove(name);
                }
            }
        }
        for (name, offsets) in &ch.consumer_leases {
            if ch.consumers.contains(name) {
                continue; // written whole above
            }
            if let Some(c) = q.consumers.get(name) {
                self.persist_consumer(keyed, name, c, Some(offsets), b)?;
            }
        }
        // Forgotten producers go first, so one evicted and back within this
        // batch keeps the entries written below.
        for name in &ch.removed_producers {
            b.delete_cf(&sm, keys::named_state_key(g, sm_state::PRODUCER_SEEN, name));
            b.delete_range_cf(
                &sm,
                keys::producer_seq_prefix(g, name),
                keys::producer_seq_end(g, name),
            );
        }
        for (name, changes) in &ch.producer_seqs {
            for (seq, off) in changes {
                let k = keys::producer_seq_key(g, name, *seq);
                match off {
                    Some(off) => b.put_cf(&sm, k, off.to_be_bytes()),
                    None => b.delete_cf(&sm, k),
                }
            }
        }
        for name in &ch.producers {
            if let Some(p) = q.producers.get(name) {
                b.put_cf(
                    &sm,
                    keys::named_state_key(g, sm_state::PRODUCER_SEEN, name),
                    p.last_seen.to_be_bytes(),
                );
            }
        }
        for id in &ch.txns {
            if let Some(t) = q.txns.get(id) {
                let v = bincode::serialize(t).map_err(sm_write_err)?;
                b.put_cf(&sm, keys::named_state_key(g, sm_state::TXN, id), v);
            }
        }
        for id in &ch.txns_removed {
            b.delete_cf(&sm, keys::named_state_key(g, sm_state::TXN, id));
        }
        Ok(())
    }

    /// A record's filter/FIFO view: from this apply batch, else the store.
    fn record_view(&self, recent: &[(u64, Bytes)], off: u64) -> Option<RecordView> {
        let bytes = match recent.binary_search_by_key(&off, |(o, _)| *o) {
            Ok(i) => recent[i].1.clone(),
            Err(_) => Bytes::from(
                self.store
                    .get(CF_RECORDS, &keys::record_key(self.group, off))
                    .ok()??,
            ),
        };
        let r = petrel_proto::record::RecordData::decode(&bytes).ok()?;
        Some(RecordView {
            tag: r.tag,
            properties: r.properties,
            message_group: r.message_group,
        })
    }

    /// A compiled filter, cached by expression.
    fn filter(&mut self, f: &Option<(i32, String)>) -> Option<Arc<Filter>> {
        let (kind, expr) = f.as_ref()?;
        if let Some(c) = self.filters.get(&(*kind, expr.clone())) {
            return Some(c.clone());
        }
        // The leader validated it; a filter that does not parse (none should)
        // filters nothing, the same way on every replica.
        let parsed = compile_filter(*kind, expr).ok()?;
        if self.filters.len() >= 256 {
            self.filters.clear();
        }
        let parsed = Arc::new(parsed);
        self.filters.insert((*kind, expr.clone()), parsed.clone());
        Some(parsed)
    }

    fn apply_queue(
        &mut self,
        q: &mut QueueState,
        cmd: &Command,
        log_id: LogId,
        ch: &mut Changes,
    ) -> Response {
        let index = log_id.index;
        match cmd {
            Command::Append {
                producer_id,
                records,
                deliver_at,
                txn,
            } => Response::Appended(q.append(
                producer_id,
                records,
                deliver_at,
                txn.as_ref(),
                index,
                ch,
            )),
            Command::AppendBatch(parts) => Response::AppendedBatch(
                parts
                    .iter()
                    .map(|p| {
                        q.append(
                            &p.producer_id,
                            &p.records,
                            &p.deliver_at,
                            p.txn.as_ref(),
                            index,
                            ch,
                        )
                    })
                    .collect(),
            ),
            Command::EndTxn { id, commit } => Response::Count(q.end_txn(id, *commit, index, ch)),
            Command::TxnChecked {
                ids,
                now_ms,
                interval_ms,
            } => {
                q.txn_checked(ids, *now_ms, *interval_ms, ch);
                Response::Done(Ok(()))
            }
            Command::Pop {
                consumer,
                max,
                now_ms,
                invisible_ms,
                filter,
                fifo,
                policy,
            } => {
                let filter = self.filter(filter);
                let p = PopParams {
                    max: *max,
                    now_ms: *now_ms,
                    invisible_ms: *invisible_ms,
                    filter: filter.as_deref(),
                    fifo: *fifo,
                    policy: *policy,
                };
                let recent = ch.records.clone();
                let mut view = |off: u64| self.record_view(&recent, off);
                Response::Leased(q.pop(consumer, p, index, &mut view, ch))
            }
            Command::Ack { consumer, leases } => Response::Acked(q.ack(consumer, leases, ch)),
            Command::Nack {
                consumer,
                offset,
                lease_id,
                reason,
                now_ms,
            } => Response::Nacked(q.nack(
                consumer, *offset, *lease_id, reason, false, *now_ms, index, ch,
            )),
            Command::DeadLettered { consumer, offsets } => {
                q.dead_lettered(consumer, offsets, ch);
                Response::Done(Ok(()))
            }
            Command::Release { now_ms, max } => {
                q.release(*now_ms, *max as usize, ch);
                Response::Done(Ok(()))
            }
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
            Command::Checkpoint(cp) => {
                if cp.term != log_id.leader_id.term {
                    // Proposed late, in a term whose leader did not take
                    // these ops: they belong to a state that is gone.
                    return Response::Done(Err(ApplyError::StaleTerm(format!(
                        "ops of term {} reached the log in term {}",
                        cp.term, log_id.leader_id.term
                    ))));
                }
                for b in &cp.batches {
                    q.apply_consumer_ops(b, ch);
                }
                Response::Done(Ok(()))
            }
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
                    held: st.held.into_iter().collect(),
                    txns: st.txns.into_iter().collect(),
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
                let mut bump = false;
                for e in entries {
                    // Any entry of a later term (a new leader's blank one
                    // first) ends the served state of an earlier term.
                    st.entered_term(e.log_id.leader_id.term);
                    out.push(match self.note_applied(&e) {
                        Some(cmd) => {
                            bump |= !matches!(cmd, Command::Checkpoint(_));
                            self.apply_queue(&mut st, cmd, e.log_id, &mut ch)
                        }
                        None => {
                            bump = true;
                            Response::None
                        }
                    });
                }
                let mut keyed = std::mem::take(&mut self.keyed);
                let r = self.persist_queue(&st, ch, &mut keyed, &mut b);
                self.keyed = keyed;
                r?;
                self.put_applied(&mut b)?;
                self.store.write_unlogged(b).map_err(sm_write_err)?;
                shared.note_due(&st, bump);
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
                filters: HashMap::new(),
                keyed: HashSet::new(),
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
                    held,
                    txns,
                },
            ) => {
                let mut st = shared.state.write().unwrap_or_else(|e| e.into_inner());
                // The range deletes below drop every lease key too.
                self.keyed.clear();
                b.delete_range_cf(
                    &self.store.cf(CF_RECORDS),
                    &keys::group_start(g)[..],
                    &keys::group_end(g)[..],
                );
                for cf in [CF_SM_STATE, CF_TIMERS, CF_INDEXES] {
                    b.delete_range_cf(
                        &self.store.cf(cf),
                        &keys::group_start(g)[..],
                        &keys::group_end(g)[..],
                    );
                }
                *st = QueueState {
                    header,
                    consumers: consumers.into_iter().collect(),
                    serving: None,
                    producers: producers.into_iter().collect(),
                    due: held
                        .iter()
                        .filter(|(_, t)| *t != TXN_HOLD)
                        .map(|(o, t)| (*t, *o))
                        .collect(),
                    held: held.iter().copied().collect(),
                    txns: txns.into_iter().collect(),
                };
                let mut ch = Changes {
                    records,
                    header: true,
                    consumers: st.consumers.keys().cloned().collect(),
                    consumer_leases: HashMap::new(),
                    producers: st.producers.keys().cloned().collect(),
                    removed_producers: Vec::new(),
                    producer_seqs: st
                        .producers
                        .iter()
                        .map(|(p, w)| {
                            (
                                p.clone(),
                                w.seqs.iter().map(|(s, o)| (*s, Some(*o))).collect(),
                            )
                        })
                        .collect(),
                    truncated: None,
                    held_added: held,
                    held_removed: Vec::new(),
                    txns: st.txns.keys().cloned().collect(),
                    txns_removed: Vec::new(),
                    ops: Vec::new(),
                };
                ch.records.sort_by_key(|r| r.0);
                let mut keyed = std::mem::take(&mut self.keyed);
                let r = self.persist_queue(&st, ch, &mut keyed, &mut b);
                self.keyed = keyed;
                r?;
                self.put_applied(&mut b)?;
                self.store.write_unlogged(b).map_err(sm_write_err)?;
                shared.note_due(&st, true);
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
