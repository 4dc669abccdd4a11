//! The replicated state of one queue, as plain data and pure functions:
//! offset assignment, de-duplication, leases, acks. No I/O; the state
//! machine (`sm.rs`) persists what [`Changes`] names.
//!
//! # Invariants
//! - Offsets are dense: `start_offset..next_offset` all exist.
//! - Per consumer group, every offset in `committed..next_fresh` is either
//!   leased or acked; every offset at or past `next_fresh` is fresh.
//! - Applying the same command sequence gives the same state everywhere:
//!   time comes from the command, lease ids from the log index.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::apply_error::ApplyError;

/// A lease handed out by `Pop` or `ChangeInvisible`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseInfo {
    pub offset: u64,
    pub attempt: u32,
    pub lease_id: u64,
    pub deadline_ms: i64,
}

/// Sequences remembered per producer per queue for de-duplication.
pub const DEDUP_WINDOW: usize = 4096;
/// Producers remembered per queue; the least recently seen is forgotten.
pub const MAX_PRODUCERS: usize = 10_000;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueHeader {
    pub start_offset: u64,
    pub next_offset: u64,
    /// Stored bytes in `start_offset..next_offset` (encoded records).
    pub bytes: u64,
}

/// Per consumer group: delivery attempts before a record is dead-lettered,
/// and the back-off after a nack (`initial * 2^(attempt-1)`, capped).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
}

pub const DEFAULT_MAX_ATTEMPTS: u32 = 16;
pub const DEFAULT_INITIAL_BACKOFF_MS: u64 = 1000;
pub const DEFAULT_MAX_BACKOFF_MS: u64 = 60_000;
/// Upper bound on a group's max attempts.
pub const MAX_ATTEMPTS_LIMIT: u32 = 1000;

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            initial_backoff_ms: DEFAULT_INITIAL_BACKOFF_MS,
            max_backoff_ms: DEFAULT_MAX_BACKOFF_MS,
        }
    }
}

impl RetryPolicy {
    /// Zero fields take the defaults; values are clamped to sane bounds.
    pub fn with_defaults(max_attempts: u32, initial_backoff_ms: u64, max_backoff_ms: u64) -> Self {
        let d = Self::default();
        let pick = |v: u64, dv: u64| if v == 0 { dv } else { v };
        let max_backoff_ms = pick(max_backoff_ms, d.max_backoff_ms).min(24 * 3600 * 1000);
        Self {
            max_attempts: if max_attempts == 0 {
                d.max_attempts
            } else {
                max_attempts.min(MAX_ATTEMPTS_LIMIT)
            },
            initial_backoff_ms: pick(initial_backoff_ms, d.initial_backoff_ms).min(max_backoff_ms),
            max_backoff_ms,
        }
    }

    /// Wait before redelivering after the `attempt`-th delivery failed.
    pub fn backoff_ms(&self, attempt: u32) -> u64 {
        let shift = attempt.saturating_sub(1).min(40);
        self.initial_backoff_ms
            .saturating_mul(1u64 << shift)
            .min(self.max_backoff_ms)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub attempt: u32,
    pub lease_id: u64,
    /// Receipts are valid until then.
    pub deadline_ms: i64,
    /// The lease id this one replaced by a change of invisible duration, so
    /// a retried change (reply lost) gets the current lease back.
    pub prev_lease_id: u64,
    /// When the record may be delivered again (the deadline, or a nack's
    /// back-off).
    pub retry_at_ms: i64,
    /// FIFO message group hash (0 = none): no other record of it is leased
    /// while this lease lives.
    pub mgroup: u64,
    /// Why the last attempt failed ("" = lease expired).
    pub reason: String,
}

/// A record that used up its attempts, waiting to be stored in the group's
/// dead-letter topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub attempts: u32,
    pub reason: String,
}

/// Dead letters a group may hold before shipping them (more wait as
/// leases).
pub const MAX_DEAD_PENDING: usize = 1024;
/// Passed-over records (FIFO blocked, released delays) a group may hold.
pub const MAX_PENDING: usize = 4096;
/// Redelivered records a group remembers the finishing receipt of.
pub const FINISHED_KEPT: usize = 1024;
/// Fresh records one pop examines at most (filters may skip many).
pub const POP_SCAN_LIMIT: u64 = 4096;
/// Held (delayed / transactional) records one pop passes over at most.
pub const POP_HELD_SKIP_LIMIT: u64 = 1 << 20;

/// One consumer group's position in one queue.
///
/// Every offset below `next_fresh` is leased, pending, or done (acked,
/// filtered out, dead-lettered, or a delayed record still held by the
/// queue, which comes back as pending when due). `committed` is the lowest
/// offset not done.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumerState {
    pub committed: u64,
    pub next_fresh: u64,
    pub leases: BTreeMap<u64, Lease>,
    /// Passed over, to deliver: offset → FIFO message group hash.
    pub pending: BTreeMap<u64, u64>,
    pub dead_pending: BTreeMap<u64, DeadLetter>,
    /// Records removed by retention before this group acked them.
    pub skipped: u64,
    /// Records moved (or moving) to the dead-letter topic.
    pub dead_lettered: u64,
    /// Records the group's filter passed over.
    pub filtered: u64,
    pub policy: RetryPolicy,
    /// Records delivered more than once that are done: offset → the lease
    /// whose ack finished it (0: dead-lettered). A late ack under an
    /// earlier delivery's receipt then fails instead of reporting success
    /// for a record another delivery finished (the last `FINISHED_KEPT`).
    pub finished: BTreeMap<u64, u64>,
}

impl ConsumerState {
    fn new(start: u64) -> Self {
        Self {
            committed: start,
            next_fresh: start,
            ..Default::default()
        }
    }

    fn advance(&mut self) {
        let mut c = self.next_fresh;
        if let Some((o, _)) = self.leases.first_key_value() {
            c = c.min(*o);
        }
        if let Some((o, _)) = self.pending.first_key_value() {
            c = c.min(*o);
        }
        self.committed = c;
    }

    /// `off`'s lease `l` ended (acked, or dead-lettered: `by` 0).
    fn finish(&mut self, off: u64, l: &Lease, by: u64) {
        if l.attempt > 1 || by == 0 {
            self.finished.insert(off, by);
            if self.finished.len() > FINISHED_KEPT {
                self.finished.pop_first();
            }
        }
    }

    /// An ack of `off` under `lease_id`, which names no live lease, where
    /// `off` is done: fine if it is the ack that finished it (a retry).
    fn ack_done(&self, off: u64, lease_id: u64) -> Result<(), ApplyError> {
        match self.finished.get(&off) {
            Some(0) => Err(ApplyError::ReceiptExpired(format!(
                "offset {off} used up its attempts and went to the dead-letter topic"
            ))),
            Some(by) if *by != lease_id => Err(ApplyError::ReceiptExpired(format!(
                "offset {off} was delivered again after this receipt was issued, and that \
                 delivery was acked"
            ))),
            _ => Ok(()),
        }
    }

    /// Records leased and not yet acked.
    pub fn inflight(&self) -> u64 {
        self.leases.len() as u64
    }

    /// Leases still running at `now_ms` (an expired one waits for its
    /// redelivery and is not in flight).
    pub fn inflight_at(&self, now_ms: i64) -> u64 {
        self.leases
            .values()
            .filter(|l| l.deadline_ms > now_ms)
            .count() as u64
    }

    /// Why a receipt for `offset` names no live lease: superseded by a
    /// redelivery, already done, or never leased.
    fn lease_miss(&self, offset: u64) -> ApplyError {
        if self.leases.contains_key(&offset) {
            ApplyError::ReceiptExpired(format!(
                "offset {offset} was redelivered after this receipt was issued"
            ))
        } else if offset < self.next_fresh && !self.pending.contains_key(&offset) {
            ApplyError::ReceiptExpired(format!("offset {offset} is already acked"))
        } else {
            // Receipts are signed, so this one was issued by a leader of
            // the queue whose lease was not checkpointed before a failover
            // (or was dropped by an offset reset): the record comes again.
            ApplyError::ReceiptExpired(format!(
                "offset {offset} is no longer leased under this receipt (the queue's leader \
                 changed or its offset was reset); it will be delivered again"
            ))
        }
    }

    /// Moves the group to `offset` (clamped to `start..=end`). Moving
    /// backwards forgets every lease and pending record.
    fn reset(&mut self, offset: u64, start: u64, end: u64) {
        let offset = offset.clamp(start, end.max(start));
        if offset < self.committed {
            self.leases.clear();
            self.pending.clear();
            // Delivered afresh from here.
            self.finished.retain(|o, _| *o < offset);
            self.next_fresh = offset;
        } else {
            self.leases = self.leases.split_off(&offset);
            self.pending = self.pending.split_off(&offset);
            self.next_fresh = self.next_fresh.max(offset);
        }
        self.advance();
    }

    /// Message groups that may not be leased now.
    fn blocked(&self) -> HashSet<u64> {
        self.leases
            .values()
            .filter(|l| l.mgroup != 0)
            .map(|l| l.mgroup)
            .collect()
    }
}

/// One change the queue leader made to a group's consumer state in its
/// memory (a receive, ack, nack, invisibility change or dead-letter
/// decision), replicated afterwards in a batched [`Checkpoint`]. Each is a
/// plain assignment of the outcome, so a replica that applies them in log
/// order reaches the leader's state whatever else (releases, retention,
/// transaction ends) was applied in between.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConsumerOp {
    /// The group's retry policy (every receive carries it).
    Policy(RetryPolicy),
    /// A lease granted or changed (first delivery, redelivery, nack back-off,
    /// invisibility change): the record is leased, not pending.
    Lease(u64, Lease),
    /// Acked: the lease ends and the record is done.
    Done(u64),
    /// A receive's scan of fresh records ended at `to`. `passed` went to
    /// pending (FIFO groups in flight), `held` (ranges, end exclusive) were
    /// delayed or transactional records still held when passed over: a
    /// replica where one has since been released hands it to the group as
    /// pending, as the leader's release did.
    Scan {
        to: u64,
        filtered: u64,
        passed: Vec<(u64, u64)>,
        held: Vec<(u64, u64)>,
    },
    /// The last attempt failed: the record waits to be stored as a dead
    /// letter.
    Dead(u64, DeadLetter),
    /// The dead letter is stored in the group's dead-letter topic.
    Shipped(u64),
    /// An operator set the group's position (offset mode).
    Reset(u64),
    /// An operator deleted the group: its position, leases and dead letters
    /// not yet stored are gone; a later receive starts it afresh.
    Deleted,
}

/// One group's consumer ops, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumerOps {
    pub consumer: String,
    pub ops: Vec<ConsumerOp>,
}

impl ConsumerOps {
    /// The offsets whose lease these ops set or end (`None`: a reset,
    /// which may drop any lease).
    pub fn leases_touched(&self) -> Option<Vec<u64>> {
        let mut out = Vec::new();
        for op in &self.ops {
            match op {
                ConsumerOp::Lease(o, _) | ConsumerOp::Done(o) | ConsumerOp::Dead(o, _) => {
                    out.push(*o)
                }
                ConsumerOp::Reset(_) | ConsumerOp::Deleted => return None,
                ConsumerOp::Policy(_) | ConsumerOp::Scan { .. } | ConsumerOp::Shipped(_) => {}
            }
        }
        Some(out)
    }
}

/// The ops of many receives, acks and nacks, replicated as one Raft entry
/// (`Command::Checkpoint`). `term` is the leadership term whose serving
/// state ([`Serving`]) took them: the ops only hold in that term's log, so
/// an entry of any other term carrying them (a stale writer's late
/// proposal) is not applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub term: u64,
    pub batches: Vec<ConsumerOps>,
}

/// The consumer groups as a queue leader serves them in one term: the
/// committed groups as they stood when it began serving, plus every op it
/// took since, committed or not. Never persisted and never a replica's
/// state: when the term ends it is dropped, so ops whose checkpoint never
/// committed die with it instead of lingering in a later term's state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Serving {
    pub term: u64,
    pub consumers: BTreeMap<String, ConsumerState>,
}

/// A receive, ack or nack of an earlier term than the one now served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StaleTerm;

/// An append inside a transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnOpen {
    pub id: String,
    /// Leader's clock at the send.
    pub now_ms: i64,
    /// First check after this long.
    pub check_ms: u64,
}

/// What pop needs to know of a record: its tag, properties, message group.
#[derive(Debug, Clone, Default)]
pub struct RecordView {
    pub tag: String,
    pub properties: Vec<(String, String)>,
    pub message_group: String,
}

/// A pop's parameters (from the command).
#[derive(Debug, Clone, Copy)]
pub struct PopParams<'a> {
    pub max: u32,
    pub now_ms: i64,
    pub invisible_ms: u64,
    pub filter: Option<&'a petrel_proto::filter::Filter>,
    pub fifo: bool,
    pub policy: RetryPolicy,
}

/// Stable hash of a FIFO message group (never 0, which means none).
pub fn mgroup_hash(g: &str) -> u64 {
    if g.is_empty() {
        return 0;
    }
    // FNV-1a: fixed across builds and platforms, unlike std's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in g.as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h.max(1)
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProducerWindow {
    /// sequence → offset
    pub seqs: BTreeMap<u64, u64>,
    /// Log index that last touched this producer (for eviction).
    pub last_seen: u64,
}

/// What an applied command changed, for the state machine to persist.
#[derive(Debug, Default)]
pub struct Changes {
    pub records: Vec<(u64, Bytes)>,
    pub header: bool,
    /// Consumer groups to write whole (every lease).
    pub consumers: HashSet<String>,
    /// Consumer groups whose state but the leases changed, and the offsets
    /// whose lease changed (written one key each).
    pub consumer_leases: HashMap<String, Vec<u64>>,
    /// Producers whose `last_seen` changed (a small value each).
    pub producers: HashSet<String>,
    /// Producers forgotten whole (their keys are range-deleted first).
    pub removed_producers: Vec<String>,
    /// De-duplication entries added (`Some(offset)`) or dropped (`None`):
    /// one small key each, so an append costs O(records), not O(window).
    pub producer_seqs: HashMap<String, Vec<(u64, Option<u64>)>>,
    /// Records `old..new` removed by retention.
    pub truncated: Option<(u64, u64)>,
    /// Delayed records held (offset, deliver time) and released.
    pub held_added: Vec<(u64, i64)>,
    pub held_removed: Vec<u64>,
    /// Transactions changed (to write) and forgotten (to delete).
    pub txns: HashSet<String>,
    pub txns_removed: Vec<String>,
    /// Consumer ops taken, per consumer group in order (recorded only
    /// when the leader runs a receive, ack or nack in memory; applying a
    /// command ignores them).
    pub ops: Vec<ConsumerOps>,
}

impl Changes {
    /// Records `op` of consumer group `consumer` (its name is stored once
    /// per run of ops, not per op).
    pub fn op(&mut self, consumer: &str, op: ConsumerOp) {
        match self.ops.last_mut() {
            Some(b) if b.consumer == consumer => b.ops.push(op),
            _ => self.ops.push(ConsumerOps {
                consumer: consumer.to_string(),
                ops: vec![op],
            }),
        }
    }

    /// Consumer ops recorded so far.
    pub fn op_count(&self) -> usize {
        self.ops.iter().map(|b| b.ops.len()).sum()
    }

    /// What `batch` changed, to persist: its leases, or the whole group
    /// after a reset.
    pub fn note_consumer_ops(&mut self, batch: &ConsumerOps) {
        match batch.leases_touched() {
            Some(offsets) => self
                .consumer_leases
                .entry(batch.consumer.clone())
                .or_default()
                .extend(offsets),
            None => {
                self.consumers.insert(batch.consumer.clone());
            }
        }
    }

    /// `name`'s state but its leases changed (a release made a record
    /// pending).
    fn consumer_head(&mut self, name: &str) {
        if !self.consumer_leases.contains_key(name) {
            self.consumer_leases.insert(name.to_string(), Vec::new());
        }
    }
}

/// A held record at `off` became deliverable (its time came, or its
/// transaction committed): groups that passed over it get it as pending.
fn now_deliverable(groups: &mut BTreeMap<String, ConsumerState>, off: u64, ch: &mut Changes) {
    for (name, c) in groups.iter_mut() {
        if c.next_fresh > off {
            c.pending.insert(off, 0);
            c.advance();
            ch.consumer_head(name);
        }
    }
}

/// `held` time of a record in an open (or rolled back) transaction: never
/// released by time.
pub const TXN_HOLD: i64 = i64::MAX;
/// Ended transactions remembered per queue (so a retried commit, or a late
/// send, finds the outcome).
pub const ENDED_TXNS: usize = 10_000;

/// A transaction's records in one queue.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Txn {
    pub offsets: Vec<u64>,
    pub opened_ms: i64,
    /// Checks handed out so far, and when the next is due.
    pub checks: u32,
    pub next_check_ms: i64,
    /// `Some(committed)` once ended.
    pub outcome: Option<bool>,
    /// Log index of the end (eviction order of ended transactions).
    pub ended_index: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueState {
    pub header: QueueHeader,
    /// Consumer groups as the committed log leaves them (what replicas
    /// hold, what is persisted and snapshotted).
    pub consumers: BTreeMap<String, ConsumerState>,
    /// On the leader, the groups it serves receives and acks from.
    pub serving: Option<Serving>,
    pub producers: HashMap<String, ProducerWindow>,
    /// Delayed records not yet due: offset → delivery time. Consumer groups
    /// pass over them; `release` hands them back as pending when due.
    pub held: BTreeMap<u64, i64>,
    /// `held` by time (records of transactions are not in it).
    pub due: BTreeSet<(i64, u64)>,
    /// Transactions, open and recently ended, by id.
    pub txns: BTreeMap<String, Txn>,
}

/// What a pop did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PopOutcome {
    pub leases: Vec<LeaseInfo>,
    /// Every dead letter of the group not yet stored (for the caller to
    /// move to the dead-letter topic and confirm).
    pub dead: Vec<(u64, DeadLetter)>,
}

impl QueueState {
    /// Appends records, skipping any whose (producer, sequence) is already
    /// stored. `deliver_at[i]` > 0 holds record i until then (a delayed
    /// record); an empty `deliver_at` holds none. Returns (offset,
    /// duplicate) per record.
    #[allow(clippy::too_many_arguments)] // a command's fields, applied as one
    pub fn append(
        &mut self,
        producer_id: &str,
        records: &[(u64, Bytes)],
        deliver_at: &[i64],
        txn: Option<&TxnOpen>,
        log_index: u64,
        ch: &mut Changes,
    ) -> Vec<(u64, bool)> {
        let mut out = Vec::with_capacity(records.len());
        let dedup = !producer_id.is_empty();
        if dedup && !self.producers.contains_key(producer_id) {
            // An evicted producer that comes back within this apply batch
            // is fine: its keys are range-deleted before the new ones are
            // written (see `StateMachine::persist_queue`).
            self.evict_producers_if_full(ch);
        }
        // The producer's window is taken out for the loop and put back
        // after it: no per-record lookup or allocation of its name.
        let mut window = (dedup && records.iter().any(|(seq, _)| *seq != 0))
            .then(|| self.producers.remove(producer_id).unwrap_or_default());
        let mut seq_changes: Vec<(u64, Option<u64>)> = Vec::new();
        for (i, (seq, bytes)) in records.iter().enumerate() {
            if let Some(w) = window.as_mut().filter(|_| *seq != 0) {
                w.last_seen = log_index;
                if let Some(off) = w.seqs.get(seq) {
                    out.push((*off, true));
                    continue;
                }
                let off = self.header.next_offset;
                w.seqs.insert(*seq, off);
                seq_changes.push((*seq, Some(off)));
                while w.seqs.len() > DEDUP_WINDOW {
                    if let Some((old, _)) = w.seqs.pop_first() {
                        seq_changes.push((old, None));
                    }
                }
            }
            let off = self.header.next_offset;
            self.header.next_offset += 1;
            self.header.bytes += bytes.len() as u64;
            ch.records.push((off, bytes.clone()));
            let mut at = deliver_at.get(i).copied().unwrap_or(0);
            if let Some(t) = txn {
                at = TXN_HOLD;
                let e = self.txns.entry(t.id.clone()).or_insert_with(|| Txn {
                    opened_ms: t.now_ms,
                    next_check_ms: t.now_ms.saturating_add(t.check_ms as i64),
                    ..Default::default()
                });
                // A record sent after its transaction ended stays held
                // (the leader refuses such sends; this is the race).
                if e.outcome.is_none() {
                    e.offsets.push(off);
                }
                ch.txns.insert(t.id.clone());
            }
            if at > 0 {
                self.held.insert(off, at);
                if at != TXN_HOLD {
                    self.due.insert((at, off));
                }
                ch.held_added.push((off, at));
            }
            out.push((off, false));
        }
        if let Some(w) = window {
            if !seq_changes.is_empty() {
                ch.producers.insert(producer_id.to_string());
                ch.producer_seqs
                    .entry(producer_id.to_string())
                    .or_default()
                    .extend(seq_changes);
            }
            self.producers.insert(producer_id.to_string(), w);
        }
        ch.header = true;
        out
    }

    /// Delayed records: hands every one due at `now_ms` (at most `max`)
    /// to the groups that passed over it. Returns how many.
    pub fn release(&mut self, now_ms: i64, max: usize, ch: &mut Changes) -> usize {
        let mut n = 0;
        while n < max {
            let Some(&(at, off)) = self.due.first() else {
                break;
            };
            if at > now_ms {
                break;
            }
            self.due.pop_first();
            self.held.remove(&off);
            ch.held_removed.push(off);
            self.each_consumers(ch, |groups, ch| now_deliverable(groups, off, ch));
            n += 1;
        }
        n
    }

    /// Ends a transaction: commit hands its records to the groups that
    /// passed them (like a due delayed record); rollback keeps them held
    /// for good (never delivered, removed by retention). Returns how many
    /// records this call ended (0 if already ended or unknown here).
    pub fn end_txn(&mut self, id: &str, commit: bool, log_index: u64, ch: &mut Changes) -> u64 {
        let Some(t) = self.txns.get_mut(id) else {
            return 0;
        };
        if t.outcome.is_some() {
            return 0;
        }
        t.outcome = Some(commit);
        t.ended_index = log_index;
        let offsets = std::mem::take(&mut t.offsets);
        ch.txns.insert(id.to_string());
        if commit {
            for off in &offsets {
                if self.held.remove(off).is_some() {
                    ch.held_removed.push(*off);
                }
                self.each_consumers(ch, |groups, ch| now_deliverable(groups, *off, ch));
            }
        }
        // Forget the oldest ended transactions beyond the bound.
        let ended = self.txns.values().filter(|t| t.outcome.is_some()).count();
        if ended > ENDED_TXNS {
            let mut old: Vec<(u64, String)> = self
                .txns
                .iter()
                .filter(|(_, t)| t.outcome.is_some())
                .map(|(k, t)| (t.ended_index, k.clone()))
                .collect();
            old.sort();
            for (_, k) in old.into_iter().take(ended - ENDED_TXNS) {
                self.txns.remove(&k);
                ch.txns.remove(&k);
                ch.txns_removed.push(k);
            }
        }
        offsets.len() as u64
    }

    /// Records that these open transactions were handed to a checker.
    pub fn txn_checked(&mut self, ids: &[String], now_ms: i64, interval_ms: u64, ch: &mut Changes) {
        for id in ids {
            if let Some(t) = self.txns.get_mut(id).filter(|t| t.outcome.is_none()) {
                t.checks += 1;
                t.next_check_ms = now_ms.saturating_add(interval_ms as i64);
                ch.txns.insert(id.clone());
            }
        }
    }

    /// Open transactions due for a check at `now_ms`.
    pub fn stale_txns(&self, now_ms: i64) -> Vec<(String, Txn)> {
        self.txns
            .iter()
            .filter(|(_, t)| t.outcome.is_none() && t.next_check_ms <= now_ms)
            .map(|(k, t)| (k.clone(), t.clone()))
            .collect()
    }

    /// How a stored record is held: "scheduled", "uncommitted",
    /// "rolled_back", or "" (deliverable).
    pub fn hold_of(&self, offset: u64) -> &'static str {
        match self.held.get(&offset) {
            None => "",
            Some(&TXN_HOLD) => {
                if self
                    .txns
                    .values()
                    .any(|t| t.outcome.is_none() && t.offsets.contains(&offset))
                {
                    "uncommitted"
                } else {
                    "rolled_back"
                }
            }
            Some(_) => "scheduled",
        }
    }

    /// Where `offset` stands in each consumer group: (group, state,
    /// attempt, lease end).
    pub fn delivery_states(&self, offset: u64) -> Vec<(String, &'static str, u32, i64)> {
        self.served()
            .iter()
            .map(|(name, c)| {
                let (state, attempt, until) = if let Some(l) = c.leases.get(&offset) {
                    ("leased", l.attempt, l.deadline_ms)
                } else if c.pending.contains_key(&offset) {
                    ("pending", 0, 0)
                } else if let Some(d) = c.dead_pending.get(&offset) {
                    ("dead_lettering", d.attempts, 0)
                } else if offset >= c.next_fresh || self.held.contains_key(&offset) {
                    ("not_delivered", 0, 0)
                } else {
                    ("done", 0, 0)
                };
                (name.clone(), state, attempt, until)
            })
            .collect()
    }

    /// Earliest delivery time of a held record.
    pub fn next_due(&self) -> Option<i64> {
        self.due.first().map(|(t, _)| *t)
    }

    fn evict_producers_if_full(&mut self, ch: &mut Changes) {
        if self.producers.len() < MAX_PRODUCERS {
            return;
        }
        if let Some(oldest) = self
            .producers
            .iter()
            .min_by_key(|(_, w)| w.last_seen)
            .map(|(k, _)| k.clone())
        {
            self.producers.remove(&oldest);
            ch.producers.remove(&oldest);
            ch.producer_seqs.remove(&oldest);
            ch.removed_producers.push(oldest);
        }
    }

    fn consumer(&mut self, name: &str) -> &mut ConsumerState {
        let start = self.header.start_offset;
        self.consumers
            .entry(name.to_string())
            .or_insert_with(|| ConsumerState::new(start))
    }

    /// Whether a pop for `consumer` at `now_ms` could return anything (a
    /// cheap check before proposing one).
    pub fn has_deliverable(&self, consumer: &str, now_ms: i64) -> bool {
        match self.served().get(consumer) {
            None => self.header.next_offset > self.header.start_offset,
            Some(c) => {
                if !c.dead_pending.is_empty()
                    || c.next_fresh < self.header.next_offset
                    || c.leases.values().any(|l| l.retry_at_ms <= now_ms)
                {
                    return true;
                }
                if c.pending.is_empty() {
                    return false;
                }
                let blocked = c.blocked();
                c.pending.values().any(|g| *g == 0 || !blocked.contains(g))
            }
        }
    }

    /// The offsets a pop would lease now, in order, ignoring filters and
    /// FIFO blocking (the leader sizes a pop by bytes with it).
    pub fn pop_candidates(&self, consumer: &str, max: u32, now_ms: i64) -> Vec<u64> {
        let end = self.header.next_offset;
        let max = max as usize;
        match self.served().get(consumer) {
            None => (self.header.start_offset..end)
                .filter(|o| !self.held.contains_key(o))
                .take(max)
                .collect(),
            Some(c) => {
                let mut out: Vec<u64> = c
                    .leases
                    .iter()
                    .filter(|(_, l)| l.retry_at_ms <= now_ms)
                    .map(|(o, _)| *o)
                    .chain(c.pending.keys().copied())
                    .take(max)
                    .collect();
                let room = max - out.len();
                out.extend(
                    (c.next_fresh..end)
                        .filter(|o| !self.held.contains_key(o))
                        .take(room),
                );
                out
            }
        }
    }

    /// Retention: drops records below `before` (clamped to the stored
    /// range); `freed_bytes` is their size as the leader measured it.
    /// Consumer groups behind move to the new start; what they had not
    /// consumed is counted in `skipped`. Returns the number of records
    /// removed.
    pub fn truncate(&mut self, before: u64, freed_bytes: u64, ch: &mut Changes) -> u64 {
        let old = self.header.start_offset;
        let new = before.clamp(old, self.header.next_offset);
        if new == old {
            return 0;
        }
        self.header.start_offset = new;
        self.header.bytes = self.header.bytes.saturating_sub(freed_bytes);
        ch.header = true;
        ch.truncated = Some((old, new));
        let gone: Vec<u64> = self.held.range(..new).map(|(o, _)| *o).collect();
        for off in gone {
            if let Some(at) = self.held.remove(&off) {
                self.due.remove(&(at, off));
                ch.held_removed.push(off);
            }
        }
        for (id, t) in self.txns.iter_mut() {
            if t.offsets.first().is_some_and(|o| *o < new) {
                t.offsets.retain(|o| *o >= new);
                ch.txns.insert(id.clone());
            }
        }
        self.each_consumers(ch, |groups, ch| {
            for (name, c) in groups.iter_mut() {
                if c.committed >= new {
                    continue;
                }
                let unconsumed = c.leases.range(..new).count()
                    + c.pending.range(..new).count()
                    + new.saturating_sub(c.next_fresh) as usize;
                c.skipped += unconsumed as u64;
                c.next_fresh = c.next_fresh.max(new);
                c.leases = c.leases.split_off(&new);
                c.pending = c.pending.split_off(&new);
                c.dead_pending = c.dead_pending.split_off(&new);
                c.finished = c.finished.split_off(&new);
                c.advance();
                ch.consumers.insert(name.clone());
            }
        });
        new - old
    }

    /// Runs `f` (a replicated command's effect on the consumer groups) on
    /// the committed groups, noting what to persist in `ch`, and on the
    /// groups a leader serves, if any (nothing to persist there).
    fn each_consumers(
        &mut self,
        ch: &mut Changes,
        mut f: impl FnMut(&mut BTreeMap<String, ConsumerState>, &mut Changes),
    ) {
        f(&mut self.consumers, ch);
        if let Some(s) = &mut self.serving {
            f(&mut s.consumers, &mut Changes::default());
        }
    }

    /// Runs a receive, ack or nack of a leader serving in `term` (`f`, on
    /// this state with the serving groups in place of the committed ones).
    /// The first call of a term starts serving from the committed groups;
    /// a call of an older term than the one served is refused.
    pub fn serve<T>(&mut self, term: u64, f: impl FnOnce(&mut Self) -> T) -> Result<T, StaleTerm> {
        let mut serving = match self.serving.take() {
            Some(s) if s.term == term => s,
            Some(s) if s.term > term => {
                self.serving = Some(s);
                return Err(StaleTerm);
            }
            _ => Serving {
                term,
                consumers: self.consumers.clone(),
            },
        };
        // Swapped back on drop, so a panic in `f` cannot leave the
        // serving groups in the committed ones' place.
        struct Swap<'a> {
            st: &'a mut QueueState,
            serving: Option<Serving>,
        }
        impl Drop for Swap<'_> {
            fn drop(&mut self) {
                if let Some(mut s) = self.serving.take() {
                    std::mem::swap(&mut self.st.consumers, &mut s.consumers);
                    self.st.serving = Some(s);
                }
            }
        }
        std::mem::swap(&mut self.consumers, &mut serving.consumers);
        let g = Swap {
            st: self,
            serving: Some(serving),
        };
        let out = f(&mut *g.st);
        drop(g);
        Ok(out)
    }

    /// An entry of `term` was applied: serving state of an earlier term is
    /// dropped (its uncommitted ops must not outlive the term).
    pub fn entered_term(&mut self, term: u64) {
        if self.serving.as_ref().is_some_and(|s| s.term < term) {
            self.serving = None;
        }
    }

    /// The consumer groups as this broker would serve them: the leader's
    /// serving groups, else the committed ones.
    pub fn served(&self) -> &BTreeMap<String, ConsumerState> {
        match &self.serving {
            Some(s) => &s.consumers,
            None => &self.consumers,
        }
    }

    /// Leases up to `p.max` records: redeliveries due first (attempt + 1;
    /// a record past its last attempt becomes a dead letter instead), then
    /// pending records, then fresh ones in offset order. `view` reads a
    /// record for the filter and FIFO groups (only called when one is in
    /// use); a record it cannot read is delivered unfiltered.
    pub fn pop(
        &mut self,
        consumer: &str,
        p: PopParams<'_>,
        log_index: u64,
        view: &mut dyn FnMut(u64) -> Option<RecordView>,
        ch: &mut Changes,
    ) -> PopOutcome {
        let end = self.header.next_offset;
        let now_ms = p.now_ms;
        let deadline_ms = now_ms.saturating_add(p.invisible_ms.min(i64::MAX as u64) as i64);
        let needs_view = p.fifo || p.filter.is_some_and(|f| !f.is_all());
        let held = &self.held;
        let start = self.header.start_offset;
        let c = self
            .consumers
            .entry(consumer.to_string())
            .or_insert_with(|| ConsumerState::new(start));
        let ops_before = ch.op_count();
        let mut op = |o: ConsumerOp| ch.op(consumer, o);
        if c.policy != p.policy {
            c.policy = p.policy;
            op(ConsumerOp::Policy(p.policy));
        }
        let max = p.max as usize;
        let mut out = Vec::new();
        let lease_of = |mgroup: u64| Lease {
            attempt: 1,
            lease_id: log_index,
            deadline_ms,
            prev_lease_id: 0,
            retry_at_ms: deadline_ms,
            mgroup,
            reason: String::new(),
        };
        // 1. Redeliveries (or dead letters).
        let due: Vec<u64> = c
            .leases
            .iter()
            .filter(|(_, l)| l.retry_at_ms <= now_ms)
            .map(|(o, _)| *o)
            .collect();
        for off in due {
            if out.len() >= max {
                break;
            }
            let Some(l) = c.leases.get_mut(&off) else {
                continue;
            };
            if l.attempt >= p.policy.max_attempts {
                if c.dead_pending.len() >= MAX_DEAD_PENDING {
                    continue;
                }
                let reason = if l.reason.is_empty() {
                    "lease expired without an ack".to_string()
                } else {
                    l.reason.clone()
                };
                let attempts = l.attempt;
                if let Some(l) = c.leases.remove(&off) {
                    c.finish(off, &l, 0);
                }
                let d = DeadLetter { attempts, reason };
                op(ConsumerOp::Dead(off, d.clone()));
                c.dead_pending.insert(off, d);
                c.dead_lettered += 1;
                continue;
            }
            l.attempt += 1;
            l.lease_id = log_index;
            l.prev_lease_id = 0;
            l.deadline_ms = deadline_ms;
            l.retry_at_ms = deadline_ms;
            op(ConsumerOp::Lease(off, l.clone()));
            out.push(LeaseInfo {
                offset: off,
                attempt: l.attempt,
                lease_id: log_index,
                deadline_ms,
            });
        }
        let mut blocked = if p.fifo { c.blocked() } else { HashSet::new() };
        // 2. Pending records (released delays, FIFO records passed over).
        if out.len() < max && !c.pending.is_empty() {
            let cands: Vec<(u64, u64)> = c.pending.iter().map(|(o, g)| (*o, *g)).collect();
            for (off, g) in cands {
                if out.len() >= max {
                    break;
                }
                if g != 0 && blocked.contains(&g) {
                    continue;
                }
                c.pending.remove(&off);
                op(ConsumerOp::Lease(off, lease_of(g)));
                c.leases.insert(off, lease_of(g));
                if g != 0 {
                    blocked.insert(g);
                }
                out.push(LeaseInfo {
                    offset: off,
                    attempt: 1,
                    lease_id: log_index,
                    deadline_ms,
                });
            }
        }
        // 3. Fresh records.
        let (mut scanned, mut held_skipped) = (0, 0);
        let scan_from = c.next_fresh;
        let (mut filtered, mut passed, mut held_runs) = (0u64, Vec::new(), Vec::new());
        while out.len() < max && c.next_fresh < end && scanned < POP_SCAN_LIMIT {
            let off = c.next_fresh;
            if held.contains_key(&off) {
                // Walk the run of held offsets from here in order (an
                // iterator step each, not a lookup), bounded per pop.
                let mut run = held.range(off..).map(|(o, _)| *o);
                while run.next() == Some(c.next_fresh) && held_skipped < POP_HELD_SKIP_LIMIT {
                    c.next_fresh += 1;
                    held_skipped += 1;
                }
                held_runs.push((off, c.next_fresh));
                if held_skipped >= POP_HELD_SKIP_LIMIT {
                    break;
                }
                continue;
            }
            let g = if needs_view {
                match view(off) {
                    Some(v) => {
                        if let Some(f) = p.filter {
                            if !f.matches(&v.tag, &v.properties) {
                                c.next_fresh += 1;
                                c.filtered += 1;
                                filtered += 1;
                                scanned += 1;
                                continue;
                            }
                        }
                        if p.fifo {
                            mgroup_hash(&v.message_group)
                        } else {
                            0
                        }
                    }
                    None => 0,
                }
            } else {
                0
            };
            if g != 0 && blocked.contains(&g) {
                if c.pending.len() >= MAX_PENDING {
                    break;
                }
                c.pending.insert(off, g);
                passed.push((off, g));
                c.next_fresh += 1;
                scanned += 1;
                continue;
            }
            c.next_fresh += 1;
            scanned += 1;
            op(ConsumerOp::Lease(off, lease_of(g)));
            c.leases.insert(off, lease_of(g));
            if g != 0 {
                blocked.insert(g);
            }
            out.push(LeaseInfo {
                offset: off,
                attempt: 1,
                lease_id: log_index,
                deadline_ms,
            });
        }
        if c.next_fresh != scan_from || !passed.is_empty() {
            op(ConsumerOp::Scan {
                to: c.next_fresh,
                filtered,
                passed,
                held: held_runs,
            });
        }
        c.advance();
        let dead = c
            .dead_pending
            .iter()
            .take(256)
            .map(|(o, d)| (*o, d.clone()))
            .collect();
        if ch.op_count() != ops_before {
            ch.consumers.insert(consumer.to_string());
        }
        PopOutcome { leases: out, dead }
    }

    pub fn ack(
        &mut self,
        consumer: &str,
        leases: &[(u64, u64)],
        ch: &mut Changes,
    ) -> Vec<Result<(), ApplyError>> {
        let c = self.consumer(consumer);
        let mut out = Vec::with_capacity(leases.len());
        let mut changed = false;
        for &(off, lease_id) in leases {
            match c.leases.get(&off) {
                // The receipt of this delivery, or the one its invisibility
                // change replaced (a client may ack with either, as
                // RocketMQ's do); a redelivery clears the latter.
                Some(l)
                    if l.lease_id == lease_id
                        || (l.prev_lease_id != 0 && l.prev_lease_id == lease_id) =>
                {
                    if let Some(l) = c.leases.remove(&off) {
                        c.finish(off, &l, lease_id);
                    }
                    ch.op(consumer, ConsumerOp::Done(off));
                    changed = true;
                    out.push(Ok(()));
                }
                Some(_) => out.push(Err(ApplyError::ReceiptExpired(format!(
                    "offset {off} was redelivered after this receipt was issued"
                )))),
                // Done: a retry of the ack that finished it is fine.
                None if off < c.next_fresh && !c.pending.contains_key(&off) => {
                    out.push(if c.dead_pending.contains_key(&off) {
                        Err(ApplyError::ReceiptExpired(format!(
                            "offset {off} used up its attempts and is going to the \
                             dead-letter topic"
                        )))
                    } else {
                        c.ack_done(off, lease_id)
                    })
                }
                None => out.push(Err(c.lease_miss(off))),
            }
        }
        if changed {
            c.advance();
            ch.consumers.insert(consumer.to_string());
        }
        out
    }

    /// A consumer could not process a leased record: it comes back after
    /// the group's back-off for its attempt, or, after its last attempt or
    /// when the consumer gives up on it (`give_up`), becomes a dead letter
    /// (then `Ok(None)`).
    #[allow(clippy::too_many_arguments)] // a command's fields, applied as one
    pub fn nack(
        &mut self,
        consumer: &str,
        offset: u64,
        lease_id: u64,
        reason: &str,
        give_up: bool,
        now_ms: i64,
        log_index: u64,
        ch: &mut Changes,
    ) -> Result<Option<i64>, ApplyError> {
        let c = self.consumer(consumer);
        let policy = c.policy;
        match c.leases.get_mut(&offset) {
            Some(l) if l.lease_id == lease_id => {
                let reason = match (reason.is_empty(), give_up) {
                    (true, false) => "nacked by the consumer".to_string(),
                    (true, true) => "dead-lettered by the consumer".to_string(),
                    (false, false) => format!("nacked: {reason}"),
                    (false, true) => format!("dead-lettered by the consumer: {reason}"),
                };
                let out = if give_up || l.attempt >= policy.max_attempts {
                    let attempts = l.attempt;
                    if let Some(l) = c.leases.remove(&offset) {
                        c.finish(offset, &l, 0);
                    }
                    let d = DeadLetter { attempts, reason };
                    ch.op(consumer, ConsumerOp::Dead(offset, d.clone()));
                    c.dead_pending.insert(offset, d);
                    c.dead_lettered += 1;
                    c.advance();
                    None
                } else {
                    let at = now_ms.saturating_add(policy.backoff_ms(l.attempt) as i64);
                    l.prev_lease_id = 0;
                    l.lease_id = log_index;
                    l.deadline_ms = now_ms;
                    l.retry_at_ms = at;
                    l.reason = reason;
                    ch.op(consumer, ConsumerOp::Lease(offset, l.clone()));
                    Some(at)
                };
                ch.consumers.insert(consumer.to_string());
                Ok(out)
            }
            _ => Err(c.lease_miss(offset)),
        }
    }

    /// The proxy stored these dead letters in the dead-letter topic.
    pub fn dead_lettered(&mut self, consumer: &str, offsets: &[u64], ch: &mut Changes) {
        let c = self.consumer(consumer);
        let mut changed = false;
        for o in offsets {
            if c.dead_pending.remove(o).is_some() {
                ch.op(consumer, ConsumerOp::Shipped(*o));
                changed = true;
            }
        }
        if changed {
            ch.consumers.insert(consumer.to_string());
        }
    }

    #[allow(clippy::too_many_arguments)] // a command's fields, applied as one
    pub fn change_invisible(
        &mut self,
        consumer: &str,
        offset: u64,
        lease_id: u64,
        now_ms: i64,
        invisible_ms: u64,
        log_index: u64,
        ch: &mut Changes,
    ) -> Result<LeaseInfo, ApplyError> {
        let c = self.consumer(consumer);
        match c.leases.get_mut(&offset) {
            Some(l) if l.prev_lease_id != 0 && l.prev_lease_id == lease_id => Ok(LeaseInfo {
                offset,
                attempt: l.attempt,
                lease_id: l.lease_id,
                deadline_ms: l.deadline_ms,
            }),
            Some(l) if l.lease_id == lease_id => {
                l.prev_lease_id = l.lease_id;
                l.lease_id = log_index;
                l.deadline_ms = now_ms.saturating_add(invisible_ms.min(i64::MAX as u64) as i64);
                l.retry_at_ms = l.deadline_ms;
                ch.op(consumer, ConsumerOp::Lease(offset, l.clone()));
                let info = LeaseInfo {
                    offset,
                    attempt: l.attempt,
                    lease_id: log_index,
                    deadline_ms: l.deadline_ms,
                };
                ch.consumers.insert(consumer.to_string());
                Ok(info)
            }
            _ => Err(c.lease_miss(offset)),
        }
    }

    /// Applies consumer ops the queue leader took in its memory (a
    /// checkpoint) to this replica's state. Offsets retention removed here
    /// are ignored.
    pub fn apply_consumer_ops(&mut self, batch: &ConsumerOps, ch: &mut Changes) {
        let (start, end) = (self.header.start_offset, self.header.next_offset);
        // A delete drops the group; ops after it (a receive that came
        // later) start it afresh.
        let mut ops = &batch.ops[..];
        if let Some(i) = ops.iter().rposition(|o| *o == ConsumerOp::Deleted) {
            self.consumers.remove(&batch.consumer);
            ops = &ops[i + 1..];
            if ops.is_empty() {
                ch.note_consumer_ops(batch);
                return;
            }
        }
        let held = &self.held;
        let c = self
            .consumers
            .entry(batch.consumer.clone())
            .or_insert_with(|| ConsumerState::new(start));
        for op in ops {
            match op {
                ConsumerOp::Policy(p) => c.policy = *p,
                ConsumerOp::Lease(off, l) => {
                    if *off >= start {
                        c.pending.remove(off);
                        c.leases.insert(*off, l.clone());
                    }
                }
                ConsumerOp::Done(off) => {
                    if let Some(l) = c.leases.remove(off) {
                        c.finish(*off, &l, l.lease_id);
                    }
                }
                ConsumerOp::Scan {
                    to,
                    filtered,
                    passed,
                    held: runs,
                } => {
                    c.next_fresh = c.next_fresh.max(*to);
                    c.filtered += filtered;
                    for (off, g) in passed {
                        if *off >= start && !c.leases.contains_key(off) {
                            c.pending.insert(*off, *g);
                        }
                    }
                    for (from, to) in runs {
                        for off in (*from).max(start)..*to {
                            // Released (or its transaction committed) after
                            // the leader passed over it: the leader's release
                            // made it pending; do the same here.
                            if !held.contains_key(&off) && !c.leases.contains_key(&off) {
                                c.pending.insert(off, 0);
                            }
                        }
                    }
                }
                ConsumerOp::Dead(off, d) => {
                    c.dead_lettered += 1;
                    if *off >= start {
                        if let Some(l) = c.leases.remove(off) {
                            c.finish(*off, &l, 0);
                        }
                        c.pending.remove(off);
                        c.dead_pending.insert(*off, d.clone());
                    }
                }
                ConsumerOp::Shipped(off) => {
                    c.dead_pending.remove(off);
                }
                ConsumerOp::Reset(offset) => c.reset(*offset, start, end),
                ConsumerOp::Deleted => unreachable!("ops after the last delete"),
            }
        }
        c.next_fresh = c.next_fresh.max(start);
        c.advance();
        ch.note_consumer_ops(batch);
    }

    /// Offset mode: sets the group's committed position (clamped to the
    /// queue). Moving backwards forgets leases above it.
    pub fn commit_offset(
        &mut self,
        consumer: &str,
        offset: u64,
        ch: &mut Changes,
    ) -> Result<(), ApplyError> {
        let (start, end) = (self.header.start_offset, self.header.next_offset);
        if offset > end {
            return Err(ApplyError::InvalidArgument(format!(
                "offset {offset} is past the end of the queue ({end})"
            )));
        }
        let offset = offset.max(start);
        self.consumer(consumer).reset(offset, start, end);
        ch.op(consumer, ConsumerOp::Reset(offset));
        ch.consumers.insert(consumer.to_string());
        Ok(())
    }

    /// Deletes consumer group `consumer` from this queue: its position,
    /// leases and dead letters not yet stored. Whether it was here.
    pub fn delete_consumer(&mut self, consumer: &str, ch: &mut Changes) -> bool {
        if self.consumers.remove(consumer).is_none() {
            return false;
        }
        ch.op(consumer, ConsumerOp::Deleted);
        ch.consumers.insert(consumer.to_string());
        true
    }

    /// Whether a receive or offset commit by `consumer` would add a group
    /// beyond `max` on this queue (a group already here always may).
    pub fn over_group_cap(&self, consumer: &str, max: usize) -> bool {
        let groups = self.served();
        !groups.contains_key(consumer) && groups.len() >= max
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use petrel_proto::filter::Filter;

    impl QueueState {
        /// A pop with no filter, not FIFO, default retry policy.
        fn pop_plain(
            &mut self,
            consumer: &str,
            max: u32,
            now_ms: i64,
            invisible_ms: u64,
            log_index: u64,
            ch: &mut Changes,
        ) -> Vec<LeaseInfo> {
            let p = PopParams {
                max,
                now_ms,
                invisible_ms,
                filter: None,
                fifo: false,
                policy: RetryPolicy::default(),
            };
            self.pop(consumer, p, log_index, &mut |_| None, ch).leases
        }
    }

    fn q_with(n: u64) -> QueueState {
        let mut q = QueueState::default();
        let recs: Vec<_> = (0..n).map(|_| (0, Bytes::from_static(b"x"))).collect();
        q.append("", &recs, &[], None, 1, &mut Changes::default());
        q
    }

    #[test]
    fn append_assigns_dense_offsets_and_dedups_retries() {
        let mut q = QueueState::default();
        let mut ch = Changes::default();
        let recs = vec![(1, Bytes::from_static(b"a")), (2, Bytes::from_static(b"b"))];
        assert_eq!(
            q.append("p", &recs, &[], None, 1, &mut ch),
            vec![(0, false), (1, false)]
        );
        assert_eq!(ch.records.len(), 2);
        let mut ch = Changes::default();
        assert_eq!(
            q.append("p", &recs, &[], None, 2, &mut ch),
            vec![(0, true), (1, true)]
        );
        assert!(ch.records.is_empty());
        assert_eq!(q.header.next_offset, 2);
        // Another producer with the same sequences is not a duplicate.
        assert_eq!(
            q.append("p2", &recs, &[], None, 3, &mut ch),
            vec![(2, false), (3, false)]
        );
        // Out-of-order sequences within the window are fine.
        let late = vec![(10, Bytes::new()), (5, Bytes::new())];
        assert_eq!(
            q.append("p", &late, &[], None, 4, &mut ch),
            vec![(4, false), (5, false)]
        );
        assert_eq!(
            q.append("p", &late, &[], None, 5, &mut ch),
            vec![(4, true), (5, true)]
        );
    }

    #[test]
    fn expired_lease_is_redelivered_with_next_attempt_and_old_receipt_fails() {
        let mut q = q_with(3);
        let mut ch = Changes::default();
        let first = q.pop_plain("g", 10, 1000, 500, 10, &mut ch);
        assert_eq!(
            first.iter().map(|l| l.offset).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        assert!(first.iter().all(|l| l.attempt == 1));
        // Not expired yet: nothing.
        assert!(q.pop_plain("g", 10, 1400, 500, 11, &mut ch).is_empty());
        assert!(!q.has_deliverable("g", 1400));
        assert!(q.has_deliverable("g", 1500));
        // Ack offset 1 in time.
        assert_eq!(q.ack("g", &[(1, 10)], &mut ch), vec![Ok(())]);
        let again = q.pop_plain("g", 10, 1500, 500, 12, &mut ch);
        assert_eq!(
            again
                .iter()
                .map(|l| (l.offset, l.attempt))
                .collect::<Vec<_>>(),
            vec![(0, 2), (2, 2)]
        );
        // The first receipt for offset 0 is stale now.
        assert!(matches!(
            q.ack("g", &[(0, 10)], &mut ch)[0],
            Err(ApplyError::ReceiptExpired(_))
        ));
        assert_eq!(
            q.ack("g", &[(0, 12), (2, 12)], &mut ch),
            vec![Ok(()), Ok(())]
        );
        let c = &q.consumers["g"];
        assert_eq!(c.committed, 3);
        assert!(c.leases.is_empty() && c.pending.is_empty());
        // Acking again is idempotent (a retry of the finishing ack), and so
        // is a record delivered once.
        assert_eq!(
            q.ack("g", &[(0, 12), (1, 10)], &mut ch),
            vec![Ok(()), Ok(())]
        );
        // A late ack under the first delivery's receipt, after the second
        // delivery was acked, fails: that delivery did not finish it.
        assert!(matches!(
            q.ack("g", &[(0, 10)], &mut ch)[0],
            Err(ApplyError::ReceiptExpired(_))
        ));
        // A replica that applies the ops knows it too.
        let mut replica = q_with(3);
        for b in &ch.ops {
            replica.apply_consumer_ops(b, &mut Changes::default());
        }
        assert_eq!(replica.consumers["g"].finished, q.consumers["g"].finished);
        assert!(matches!(
            replica.ack("g", &[(0, 10)], &mut Changes::default())[0],
            Err(ApplyError::ReceiptExpired(_))
        ));
    }

    #[test]
    fn groups_are_independent_and_commit_advances_only_over_contiguous_acks() {
        let mut q = q_with(4);
        let mut ch = Changes::default();
        let a = q.pop_plain("a", 2, 0, 1000, 5, &mut ch);
        let b = q.pop_plain("b", 4, 0, 1000, 6, &mut ch);
        assert_eq!(a.len(), 2);
        assert_eq!(b.len(), 4);
        q.ack("a", &[(1, 5)], &mut ch);
        assert_eq!(q.consumers["a"].committed, 0);
        q.ack("a", &[(0, 5)], &mut ch);
        assert_eq!(q.consumers["a"].committed, 2);
        assert_eq!(q.consumers["b"].committed, 0);
    }

    #[test]
    fn pop_candidates_match_what_pop_leases() {
        let mut q = q_with(6);
        let mut ch = Changes::default();
        assert_eq!(q.pop_candidates("g", 2, 0), vec![0, 1]);
        q.pop_plain("g", 3, 0, 100, 1, &mut ch);
        q.ack("g", &[(1, 1)], &mut ch);
        let cands = q.pop_candidates("g", 10, 100);
        let leased: Vec<u64> = q
            .pop_plain("g", 10, 100, 100, 2, &mut ch)
            .iter()
            .map(|l| l.offset)
            .collect();
        assert_eq!(cands, leased);
        assert_eq!(leased, vec![0, 2, 3, 4, 5]);
    }

    #[test]
    fn change_invisible_extends_and_rotates_the_lease() {
        let mut q = q_with(1);
        let mut ch = Changes::default();
        let l = q.pop_plain("g", 1, 0, 100, 7, &mut ch)[0];
        let l2 = q
            .change_invisible("g", 0, l.lease_id, 50, 1000, 8, &mut ch)
            .unwrap();
        assert_eq!(l2.deadline_ms, 1050);
        assert!(q.pop_plain("g", 1, 200, 100, 9, &mut ch).is_empty());
        // A retried change (same old receipt) returns the current lease.
        let again = q
            .change_invisible("g", 0, l.lease_id, 60, 10, 10, &mut ch)
            .unwrap();
        assert_eq!(again, l2);
        assert!(q
            .change_invisible("g", 0, 12345, 60, 10, 11, &mut ch)
            .is_err());
        assert!(q.ack("g", &[(0, 8)], &mut ch)[0].is_ok());
    }

    #[test]
    fn the_receipt_an_invisibility_change_replaced_still_acks_until_redelivery() {
        let mut q = QueueState::default();
        let mut ch = Changes::default();
        let recs: Vec<_> = (0..2).map(|_| (0, Bytes::from_static(b"x"))).collect();
        q.append("", &recs, &[0; 2], None, 1, &mut ch);
        let got = q.pop_plain("g", 2, 0, 1000, 5, &mut ch);
        let (a, b) = (got[0].lease_id, got[1].lease_id);
        q.change_invisible("g", 0, a, 0, 5000, 9, &mut ch).unwrap();
        assert!(
            q.ack("g", &[(0, a)], &mut ch)[0].is_ok(),
            "the original acks"
        );
        // Offset 1: changed, then redelivered after its new lease ran out.
        q.change_invisible("g", 1, b, 0, 10, 10, &mut ch).unwrap();
        let again = q.pop_plain("g", 1, 50, 1000, 11, &mut ch);
        assert_eq!(again[0].offset, 1);
        assert!(
            q.ack("g", &[(1, b)], &mut ch)[0].is_err(),
            "not after a redelivery"
        );
        assert!(q.ack("g", &[(1, 10)], &mut ch)[0].is_err());
        assert!(q.ack("g", &[(1, again[0].lease_id)], &mut ch)[0].is_ok());
    }

    #[test]
    fn a_deleted_group_is_gone_and_starts_afresh_and_the_cap_counts_groups() {
        let mut q = QueueState::default();
        let mut ch = Changes::default();
        let recs: Vec<_> = (0..4).map(|_| (0, Bytes::from_static(b"x"))).collect();
        q.append("", &recs, &[0; 4], None, 1, &mut ch);
        let got = q.pop_plain("g", 2, 0, 1000, 2, &mut ch);
        assert_eq!(got.len(), 2);
        assert!(q.over_group_cap("h", 1), "g fills a cap of one");
        assert!(!q.over_group_cap("g", 1), "a group already here may go on");
        let mut ch = Changes::default();
        assert!(q.delete_consumer("g", &mut ch));
        assert_eq!(ch.ops[0].ops, vec![ConsumerOp::Deleted]);
        assert!(ch.consumers.contains("g"), "persist deletes its keys");
        assert!(!q.delete_consumer("g", &mut Changes::default()));
        assert!(!q.over_group_cap("h", 1));
        // Recreated, it starts from the queue's start: leases were dropped.
        let again = q.pop_plain("g", 4, 0, 1000, 3, &mut Changes::default());
        assert_eq!(
            again.iter().map(|l| l.offset).collect::<Vec<_>>(),
            [0, 1, 2, 3]
        );
        // A replica applying [receive, delete, receive] ends as the leader.
        let mut r = QueueState::default();
        r.append("", &recs, &[0; 4], None, 1, &mut Changes::default());
        let batch = ConsumerOps {
            consumer: "g".into(),
            ops: vec![ConsumerOp::Done(0), ConsumerOp::Deleted],
        };
        let mut ch = Changes::default();
        r.apply_consumer_ops(&batch, &mut ch);
        assert!(!r.consumers.contains_key("g") && ch.consumers.contains("g"));
    }

    #[test]
    fn commit_offset_moves_both_ways_and_rejects_past_end() {
        let mut q = q_with(5);
        let mut ch = Changes::default();
        q.commit_offset("g", 3, &mut ch).unwrap();
        assert_eq!(
            q.pop_plain("g", 10, 0, 10, 1, &mut ch)
                .iter()
                .map(|l| l.offset)
                .collect::<Vec<_>>(),
            vec![3, 4]
        );
        q.commit_offset("g", 1, &mut ch).unwrap();
        assert_eq!(q.consumers["g"].next_fresh, 1);
        assert!(q.commit_offset("g", 6, &mut ch).is_err());
    }

    #[test]
    fn truncate_moves_groups_behind_and_counts_what_they_skipped() {
        let mut q = q_with(10);
        assert_eq!(q.header.bytes, 10);
        let mut ch = Changes::default();
        // Group g leases 0..4 and acks 0, 1 and 3; group h never consumed.
        let leases = q.pop_plain("g", 4, 1000, 60_000, 2, &mut ch);
        let acks: Vec<(u64, u64)> = leases
            .iter()
            .filter(|l| l.offset != 2)
            .map(|l| (l.offset, l.lease_id))
            .collect();
        q.ack("g", &acks, &mut ch);
        q.consumer("h");
        let mut ch = Changes::default();
        assert_eq!(q.truncate(5, 5, &mut ch), 5);
        assert_eq!(ch.truncated, Some((0, 5)));
        assert_eq!(q.header.start_offset, 5);
        assert_eq!(q.header.bytes, 5);
        let g = &q.consumers["g"];
        // 2 was leased, never acked: lost to retention, as was 4.
        assert_eq!((g.committed, g.next_fresh, g.skipped), (5, 5, 2));
        assert!(g.leases.is_empty() && g.pending.is_empty());
        assert_eq!(q.consumers["h"].skipped, 5);
        // Clamped to the stored range; nothing to do twice.
        assert_eq!(q.truncate(3, 0, &mut Changes::default()), 0);
        assert_eq!(q.truncate(99, 5, &mut Changes::default()), 5);
        assert_eq!(q.header.start_offset, 10);
        assert_eq!(q.header.bytes, 0);
    }

    fn rec(tag: &str, group: &str, props: &[(&str, &str)]) -> RecordView {
        RecordView {
            tag: tag.into(),
            properties: props
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            message_group: group.into(),
        }
    }

    fn params(max: u32, now_ms: i64, fifo: bool, filter: Option<&Filter>) -> PopParams<'_> {
        PopParams {
            max,
            now_ms,
            invisible_ms: 1000,
            filter,
            fifo,
            policy: RetryPolicy::default(),
        }
    }

    #[test]
    fn delayed_records_are_passed_over_until_released_then_delivered_once() {
        let mut q = QueueState::default();
        let mut ch = Changes::default();
        let recs: Vec<_> = (0..4).map(|_| (0, Bytes::from_static(b"x"))).collect();
        // Offsets 1 and 2 are delayed until 500 and 300.
        q.append("", &recs, &[0, 500, 300, 0], None, 1, &mut ch);
        assert_eq!(ch.held_added, vec![(1, 500), (2, 300)]);
        assert_eq!(q.next_due(), Some(300));
        let got: Vec<u64> = q
            .pop_plain("g", 10, 0, 1_000_000, 2, &mut ch)
            .iter()
            .map(|l| l.offset)
            .collect();
        assert_eq!(got, vec![0, 3]);
        // Nothing is released early.
        assert_eq!(q.release(299, 100, &mut ch), 0);
        assert!(q.pop_plain("g", 10, 299, 1_000_000, 3, &mut ch).is_empty());
        assert_eq!(q.release(300, 100, &mut ch), 1);
        let got: Vec<u64> = q
            .pop_plain("g", 10, 300, 1_000_000, 4, &mut ch)
            .iter()
            .map(|l| l.offset)
            .collect();
        assert_eq!(got, vec![2]);
        assert_eq!(q.release(10_000, 100, &mut ch), 1);
        // A group that starts after the release reads it as a fresh record.
        let late: Vec<u64> = q
            .pop_plain("late", 10, 10_000, 1_000_000, 5, &mut ch)
            .iter()
            .map(|l| l.offset)
            .collect();
        assert_eq!(late, vec![0, 1, 2, 3]);
        let got: Vec<u64> = q
            .pop_plain("g", 10, 10_000, 1_000_000, 6, &mut ch)
            .iter()
            .map(|l| l.offset)
            .collect();
        assert_eq!(got, vec![1]);
        assert!(q.held.is_empty() && q.due.is_empty());
        assert_eq!(ch.held_removed, vec![2, 1]);
    }

    #[test]
    fn fifo_leases_one_record_per_message_group_in_order() {
        let mut q = q_with(6);
        // Groups: a b a a b c
        let views = ["a", "b", "a", "a", "b", "c"];
        let mut view = |o: u64| Some(rec("", views[o as usize], &[]));
        let mut ch = Changes::default();
        let first = q.pop("g", params(10, 0, true, None), 2, &mut view, &mut ch);
        let offs: Vec<u64> = first.leases.iter().map(|l| l.offset).collect();
        assert_eq!(offs, vec![0, 1, 5]);
        assert_eq!(q.consumers["g"].pending.len(), 3);
        // Nothing more while a and b are leased.
        let none = q.pop("g", params(10, 0, true, None), 3, &mut view, &mut ch);
        assert!(none.leases.is_empty());
        assert!(!q.has_deliverable("g", 0));
        // Ack a's first record: its next one (2) comes, not 3.
        q.ack("g", &[(0, 2)], &mut ch);
        let next = q.pop("g", params(10, 0, true, None), 4, &mut view, &mut ch);
        assert_eq!(
            next.leases.iter().map(|l| l.offset).collect::<Vec<_>>(),
            vec![2]
        );
        // b's record 1 expires: redelivered (attempt 2) before 4.
        let again = q.pop("g", params(10, 1000, true, None), 5, &mut view, &mut ch);
        let got: Vec<(u64, u32)> = again.leases.iter().map(|l| (l.offset, l.attempt)).collect();
        assert_eq!(got, vec![(1, 2), (2, 2), (5, 2)]);
    }

    #[test]
    fn filtered_records_are_passed_over_without_counting_as_deliveries() {
        let mut q = q_with(4);
        let f = Filter::parse_sql("region = 'eu' AND amount > 100").unwrap();
        let views = [
            rec("", "", &[("amount", "150"), ("region", "eu")]),
            rec("", "", &[("amount", "50"), ("region", "eu")]),
            rec("", "", &[("region", "us")]),
            rec("", "", &[("amount", "101"), ("region", "eu")]),
        ];
        let mut view = |o: u64| Some(views[o as usize].clone());
        let mut ch = Changes::default();
        let out = q.pop("g", params(10, 0, false, Some(&f)), 2, &mut view, &mut ch);
        assert_eq!(
            out.leases.iter().map(|l| l.offset).collect::<Vec<_>>(),
            vec![0, 3]
        );
        let c = &q.consumers["g"];
        assert_eq!((c.filtered, c.inflight(), c.committed), (2, 2, 0));
        q.ack("g", &[(0, 2), (3, 2)], &mut ch);
        assert_eq!(q.consumers["g"].committed, 4);
        // Another group without a filter sees all four.
        let all = q.pop_plain("h", 10, 0, 1000, 3, &mut ch);
        assert_eq!(all.len(), 4);
    }

    #[test]
    fn nack_backs_off_and_the_last_attempt_becomes_a_dead_letter() {
        let mut q = q_with(1);
        let mut ch = Changes::default();
        let policy = RetryPolicy::with_defaults(3, 100, 1000);
        let mut p = params(1, 0, false, None);
        p.policy = policy;
        let mut now = 0;
        let mut idx = 10;
        let mut attempts = Vec::new();
        loop {
            p.now_ms = now;
            let out = q.pop("g", p, idx, &mut |_| None, &mut ch);
            if !out.dead.is_empty() {
                assert_eq!(out.dead[0].0, 0);
                assert_eq!(out.dead[0].1.attempts, 3);
                assert!(out.dead[0].1.reason.contains("boom"));
                break;
            }
            let Some(l) = out.leases.first().copied() else {
                now += 10;
                idx += 1;
                continue;
            };
            attempts.push((l.attempt, now));
            let at = q
                .nack("g", 0, l.lease_id, "boom", false, now, idx + 1, &mut ch)
                .unwrap();
            if l.attempt < 3 {
                assert_eq!(at, Some(now + policy.backoff_ms(l.attempt) as i64));
                // The old receipt no longer acks.
                assert!(q.ack("g", &[(0, l.lease_id)], &mut ch)[0].is_err());
            } else {
                assert_eq!(at, None);
            }
            idx += 2;
        }
        // Delivered exactly 3 times, 100 then 200 ms apart.
        assert_eq!(attempts, vec![(1, 0), (2, 100), (3, 300)]);
        let c = &q.consumers["g"];
        assert_eq!((c.dead_lettered, c.inflight(), c.committed), (1, 0, 1));
        q.dead_lettered("g", &[0], &mut ch);
        assert!(q.consumers["g"].dead_pending.is_empty());
    }

    #[test]
    fn a_consumer_that_gives_up_dead_letters_on_the_first_attempt() {
        let mut q = q_with(2);
        let mut ch = Changes::default();
        let mut p = params(2, 0, false, None);
        p.policy = RetryPolicy::with_defaults(16, 100, 1000);
        let out = q.pop("g", p, 10, &mut |_| None, &mut ch);
        let (first, second) = (out.leases[0], out.leases[1]);
        assert_eq!(first.attempt, 1);
        let at = q
            .nack("g", 0, first.lease_id, "bad input", true, 5, 11, &mut ch)
            .unwrap();
        assert_eq!(at, None, "no redelivery for a record given up on");
        let c = &q.consumers["g"];
        assert_eq!(c.dead_lettered, 1);
        let d = &c.dead_pending[&0];
        assert_eq!(d.attempts, 1);
        assert!(d.reason.contains("bad input"), "{}", d.reason);
        // A stale handle cannot dead-letter a record someone else holds.
        assert!(q.nack("g", 1, 999, "", true, 5, 12, &mut ch).is_err());
        assert_eq!(q.consumers["g"].dead_lettered, 1);
        // The other record is untouched and still acks.
        assert!(q.ack("g", &[(1, second.lease_id)], &mut ch)[0].is_ok());
        q.dead_lettered("g", &[0], &mut ch);
        assert_eq!(q.consumers["g"].committed, 2);
    }

    #[test]
    fn an_expired_last_attempt_is_dead_lettered_on_the_next_pop() {
        let mut q = q_with(1);
        let mut ch = Changes::default();
        let mut p = params(1, 0, false, None);
        p.policy = RetryPolicy::with_defaults(2, 0, 0);
        for (i, now) in [0i64, 1000].into_iter().enumerate() {
            p.now_ms = now;
            let out = q.pop("g", p, i as u64 + 1, &mut |_| None, &mut ch);
            assert_eq!(out.leases.len(), 1);
        }
        p.now_ms = 2000;
        let out = q.pop("g", p, 5, &mut |_| None, &mut ch);
        assert!(out.leases.is_empty());
        assert_eq!(out.dead.len(), 1);
        assert_eq!(out.dead[0].1.attempts, 2);
    }

    #[test]
    fn transactions_stay_invisible_until_commit_and_rollback_discards() {
        let mut q = q_with(1); // offset 0: a plain record
        let mut ch = Changes::default();
        let recs: Vec<_> = (0..2).map(|_| (0, Bytes::from_static(b"t"))).collect();
        let open = |id: &str| TxnOpen {
            id: id.into(),
            now_ms: 100,
            check_ms: 50,
        };
        q.append("", &recs, &[], Some(&open("a")), 2, &mut ch); // 1, 2
        q.append("", &recs, &[], Some(&open("b")), 3, &mut ch); // 3, 4
        let got: Vec<u64> = q
            .pop_plain("g", 10, 0, 1_000_000, 4, &mut ch)
            .iter()
            .map(|l| l.offset)
            .collect();
        assert_eq!(got, vec![0]);
        assert_eq!(q.stale_txns(149).len(), 0);
        assert_eq!(q.stale_txns(150).len(), 2);
        q.txn_checked(&["a".to_string()], 150, 50, &mut ch);
        assert_eq!(q.stale_txns(150).len(), 1);
        assert_eq!(q.txns["a"].checks, 1);
        assert_eq!(q.end_txn("a", true, 5, &mut ch), 2);
        assert_eq!(
            q.end_txn("a", true, 6, &mut ch),
            0,
            "a retried commit is a no-op"
        );
        assert_eq!(q.end_txn("b", false, 7, &mut ch), 2);
        assert_eq!(q.end_txn("nope", true, 8, &mut ch), 0);
        let got: Vec<u64> = q
            .pop_plain("g", 10, 0, 1_000_000, 9, &mut ch)
            .iter()
            .map(|l| l.offset)
            .collect();
        assert_eq!(got, vec![1, 2]);
        // A group that starts now sees exactly the committed ones too.
        let late: Vec<u64> = q
            .pop_plain("late", 10, 0, 1_000_000, 10, &mut ch)
            .iter()
            .map(|l| l.offset)
            .collect();
        assert_eq!(late, vec![0, 1, 2]);
        assert!(q.stale_txns(i64::MAX - 1).is_empty());
    }

    /// A log entry in the replication test below.
    enum Logged {
        Append(usize, Vec<i64>),
        Release(i64),
        Truncate(u64),
        Checkpoint(Vec<ConsumerOps>),
    }

    /// A replica that applies the leader's commands and checkpoints in log
    /// order reaches the leader's consumer state, however releases,
    /// retention, appends and resets land between the ops and the
    /// checkpoint that carries them.
    #[test]
    fn checkpointed_ops_reproduce_the_leaders_consumer_state() {
        for seed in 1..=60u64 {
            for (fifo, filtered) in [(false, false), (true, false), (false, true), (true, true)] {
                replicate(seed, fifo, filtered);
            }
        }
    }

    fn replicate(seed: u64, fifo: bool, filtered: bool) {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut rnd = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let f = Filter::parse_sql("region = 'eu'").unwrap();
        let filter = filtered.then_some(&f);
        let view = |o: u64| {
            let region = if o % 4 == 3 { "us" } else { "eu" };
            Some(rec("", &format!("m{}", o % 3), &[("region", region)]))
        };
        let mut leader = QueueState::default();
        fn serve<T>(q: &mut QueueState, f: impl FnOnce(&mut QueueState) -> T) -> T {
            q.serve(1, f).unwrap()
        }
        let mut log = Vec::new();
        let mut unflushed: Vec<ConsumerOps> = Vec::new();
        let mut now = 1_000i64;
        let mut id = 1u64 << 40;
        let policy = RetryPolicy::with_defaults(3, 10, 40);
        for _ in 0..400 {
            now += rnd(20) as i64;
            id += 1;
            let g = if rnd(3) == 0 { "g2" } else { "g1" };
            let mut ch = Changes::default();
            let leased: Vec<(u64, u64)> = leader
                .served()
                .get(g)
                .map(|c| c.leases.iter().map(|(o, l)| (*o, l.lease_id)).collect())
                .unwrap_or_default();
            let pick = |r: u64| leased.get(r as usize % leased.len().max(1)).copied();
            match rnd(21) {
                0..=6 => {
                    let p = PopParams {
                        max: 1 + rnd(8) as u32,
                        now_ms: now,
                        invisible_ms: [5, 30, 1000][rnd(3) as usize],
                        filter,
                        fifo,
                        policy,
                    };
                    serve(&mut leader, |l| l.pop(g, p, id, &mut { view }, &mut ch));
                }
                7..=10 => {
                    if let Some((o, l)) = pick(rnd(1000)) {
                        serve(&mut leader, |q| q.ack(g, &[(o, l)], &mut ch));
                    }
                }
                11 => {
                    if let Some((o, l)) = pick(rnd(1000)) {
                        let _ = serve(&mut leader, |q| {
                            q.nack(g, o, l, "no", false, now, id, &mut ch)
                        });
                    }
                }
                12 => {
                    if let Some((o, l)) = pick(rnd(1000)) {
                        let _ = serve(&mut leader, |q| {
                            q.change_invisible(g, o, l, now, 50, id, &mut ch)
                        });
                    }
                }
                13 => {
                    let dead: Vec<u64> = leader
                        .served()
                        .get(g)
                        .map(|c| c.dead_pending.keys().copied().collect())
                        .unwrap_or_default();
                    serve(&mut leader, |q| q.dead_lettered(g, &dead, &mut ch));
                }
                14 => {
                    let (s, e) = (leader.header.start_offset, leader.header.next_offset);
                    let to = s + rnd(e - s + 1);
                    let _ = serve(&mut leader, |q| q.commit_offset(g, to, &mut ch));
                }
                20 => {
                    serve(&mut leader, |q| q.delete_consumer(g, &mut ch));
                }
                15 | 16 => {
                    let n = 1 + rnd(6) as usize;
                    let at: Vec<i64> = (0..n)
                        .map(|_| if rnd(3) == 0 { now + rnd(60) as i64 } else { 0 })
                        .collect();
                    let recs: Vec<_> = (0..n).map(|_| (0, Bytes::from_static(b"x"))).collect();
                    leader.append("", &recs, &at, None, id, &mut ch);
                    log.push(Logged::Append(n, at));
                }
                17 | 18 => {
                    leader.release(now, usize::MAX, &mut ch);
                    log.push(Logged::Release(now));
                }
                _ => {
                    let before = leader.header.start_offset + rnd(4);
                    leader.truncate(before, 0, &mut ch);
                    log.push(Logged::Truncate(before));
                }
            }
            unflushed.extend(ch.ops);
            if rnd(4) == 0 {
                // Committed: the leader applies it to its committed groups as
                // a replica does (release, append and truncate above reached
                // both its committed and its served groups).
                let batches = std::mem::take(&mut unflushed);
                for b in &batches {
                    leader.apply_consumer_ops(b, &mut Changes::default());
                }
                log.push(Logged::Checkpoint(batches));
            }
        }
        for b in &unflushed {
            leader.apply_consumer_ops(b, &mut Changes::default());
        }
        log.push(Logged::Checkpoint(unflushed));

        let mut replica = QueueState::default();
        let mut ch = Changes::default();
        for e in &log {
            match e {
                Logged::Append(n, at) => {
                    let recs: Vec<_> = (0..*n).map(|_| (0, Bytes::from_static(b"x"))).collect();
                    replica.append("", &recs, at, None, 1, &mut ch);
                }
                Logged::Release(t) => {
                    replica.release(*t, usize::MAX, &mut ch);
                }
                Logged::Truncate(b) => {
                    replica.truncate(*b, 0, &mut ch);
                }
                Logged::Checkpoint(batches) => {
                    for batch in batches {
                        replica.apply_consumer_ops(batch, &mut ch);
                    }
                }
            }
        }
        let ctx = format!("seed {seed} fifo {fifo} filtered {filtered}");
        assert_eq!(replica.header, leader.header, "{ctx}");
        assert_eq!(
            replica.consumers, leader.consumers,
            "{ctx}: the leader's committed groups are a replica's"
        );
        for (name, l) in leader.served() {
            let Some(r) = replica.consumers.get(name) else {
                assert!(l.leases.is_empty() && l.pending.is_empty(), "{ctx}: {name}");
                continue;
            };
            assert_eq!(r.leases, l.leases, "{ctx}: {name} leases");
            assert_eq!(r.pending, l.pending, "{ctx}: {name} pending");
            assert_eq!(r.dead_pending, l.dead_pending, "{ctx}: {name} dead");
            assert_eq!(
                (
                    r.committed,
                    r.next_fresh,
                    r.dead_lettered,
                    r.filtered,
                    r.policy
                ),
                (
                    l.committed,
                    l.next_fresh,
                    l.dead_lettered,
                    l.filtered,
                    l.policy
                ),
                "{ctx}: {name} position"
            );
        }
    }

    #[test]
    fn ops_not_committed_die_with_their_term() {
        let mut q = q_with(4);
        let mut ch = Changes::default();
        let leased = q
            .serve(1, |q| q.pop_plain("g", 2, 0, 1000, 1 << 40, &mut ch))
            .unwrap();
        assert_eq!(leased.len(), 2);
        assert!(
            q.consumers.get("g").is_none_or(|c| c.leases.is_empty()),
            "only a committed checkpoint changes the committed groups"
        );
        assert_eq!(q.served()["g"].leases.len(), 2);
        // Replicated commands reach both: retention drops offset 0.
        q.truncate(1, 0, &mut Changes::default());
        assert_eq!(
            q.served()["g"].leases.keys().copied().collect::<Vec<_>>(),
            vec![1]
        );
        assert_eq!(q.serve(0, |_| ()), Err(StaleTerm), "an older term's call");
        // An entry of term 2 is applied: term 1's served state (whose ops
        // never committed) is gone, and term 2 serves from the committed one.
        q.entered_term(2);
        assert!(q.serving.is_none());
        let again = q
            .serve(2, |q| {
                q.pop_plain("g", 3, 0, 1000, 2 << 40, &mut Changes::default())
            })
            .unwrap();
        let offsets: Vec<u64> = again.iter().map(|l| l.offset).collect();
        assert_eq!(
            offsets,
            vec![1, 2, 3],
            "a first delivery again, nothing lost"
        );
        assert!(again.iter().all(|l| l.attempt == 1));
    }

    #[test]
    fn retry_policy_defaults_and_caps() {
        let d = RetryPolicy::with_defaults(0, 0, 0);
        assert_eq!(d, RetryPolicy::default());
        assert_eq!(d.backoff_ms(1), 1000);
        assert_eq!(d.backoff_ms(3), 4000);
        assert_eq!(d.backoff_ms(40), 60_000);
        assert_eq!(
            RetryPolicy::with_defaults(u32::MAX, 5, 1).max_attempts,
            MAX_ATTEMPTS_LIMIT
        );
    }
}
