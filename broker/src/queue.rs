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

use crate::types::{ApplyError, LeaseInfo};

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub attempt: u32,
    pub lease_id: u64,
    pub deadline_ms: i64,
    /// The lease id this one replaced by a change of invisible duration, so
    /// a retried change (reply lost) gets the current lease back.
    pub prev_lease_id: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumerState {
    pub committed: u64,
    pub next_fresh: u64,
    pub leases: BTreeMap<u64, Lease>,
    pub acked: BTreeSet<u64>,
    /// Records removed by retention before this group acked them.
    pub skipped: u64,
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
        while self.acked.remove(&self.committed) {
            self.committed += 1;
        }
    }

    /// Records leased and not yet acked.
    pub fn inflight(&self) -> u64 {
        self.leases.len() as u64
    }
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
    pub consumers: HashSet<String>,
    pub producers: HashSet<String>,
    pub removed_producers: Vec<String>,
    /// Records `old..new` removed by retention.
    pub truncated: Option<(u64, u64)>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueState {
    pub header: QueueHeader,
    pub consumers: BTreeMap<String, ConsumerState>,
    pub producers: HashMap<String, ProducerWindow>,
}

impl QueueState {
    /// Appends records, skipping any whose (producer, sequence) is already
    /// stored. Returns (offset, duplicate) per record.
    pub fn append(
        &mut self,
        producer_id: &str,
        records: &[(u64, Bytes)],
        log_index: u64,
        ch: &mut Changes,
    ) -> Vec<(u64, bool)> {
        let mut out = Vec::with_capacity(records.len());
        let dedup = !producer_id.is_empty();
        if dedup && !self.producers.contains_key(producer_id) {
            self.evict_producers_if_full(ch);
            // Evicted earlier in this same apply batch and back now: its
            // new window must not be deleted by that eviction's write.
            ch.removed_producers.retain(|p| p != producer_id);
        }
        for (seq, bytes) in records {
            if dedup && *seq != 0 {
                let w = self.producers.entry(producer_id.to_string()).or_default();
                w.last_seen = log_index;
                if let Some(off) = w.seqs.get(seq) {
                    out.push((*off, true));
                    continue;
                }
                let off = self.header.next_offset;
                w.seqs.insert(*seq, off);
                while w.seqs.len() > DEDUP_WINDOW {
                    w.seqs.pop_first();
                }
                ch.producers.insert(producer_id.to_string());
            }
            let off = self.header.next_offset;
            self.header.next_offset += 1;
            self.header.bytes += bytes.len() as u64;
            ch.records.push((off, bytes.clone()));
            out.push((off, false));
        }
        ch.header = true;
        out
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
            ch.removed_producers.push(oldest);
        }
    }

    fn consumer(&mut self, name: &str) -> &mut ConsumerState {
        let start = self.header.start_offset;
        self.consumers
            .entry(name.to_string())
            .or_insert_with(|| ConsumerState::new(start))
    }

    /// Whether a pop for `consumer` at `now_ms` would return anything.
    pub fn has_deliverable(&self, consumer: &str, now_ms: i64) -> bool {
        match self.consumers.get(consumer) {
            None => self.header.next_offset > self.header.start_offset,
            Some(c) => {
                c.next_fresh < self.header.next_offset
                    || c.leases.values().any(|l| l.deadline_ms <= now_ms)
            }
        }
    }

    /// The offsets a pop would lease now, in the order it would lease them
    /// (used by the leader to size a pop by bytes before proposing it).
    pub fn pop_candidates(&self, consumer: &str, max: u32, now_ms: i64) -> Vec<u64> {
        let end = self.header.next_offset;
        let max = max as usize;
        match self.consumers.get(consumer) {
            None => (self.header.start_offset..end).take(max).collect(),
            Some(c) => {
                let mut out: Vec<u64> = c
                    .leases
                    .iter()
                    .filter(|(_, l)| l.deadline_ms <= now_ms)
                    .map(|(o, _)| *o)
                    .take(max)
                    .collect();
                let room = max - out.len();
                out.extend((c.next_fresh..end).take(room));
                out
            }
        }
    }

    /// Retention: drops records below `before` (clamped to the stored
    /// range); `freed_bytes` is their size as the leader measured it.
    /// Consumer groups behind move to the new start; what they had neither
    /// acked is counted in `skipped`. Returns the number
    /// of records removed.
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
        for (name, c) in self.consumers.iter_mut() {
            if c.committed >= new {
                continue;
            }
            let acked = c.acked.range(c.committed..new).count() as u64;
            c.skipped += new - c.committed - acked;
            c.committed = new;
            c.next_fresh = c.next_fresh.max(new);
            c.leases.retain(|off, _| *off >= new);
            c.acked.retain(|off| *off >= new);
            ch.consumers.insert(name.clone());
        }
        new - old
    }

    /// Leases up to `max` records: expired leases first (attempt + 1), then
    /// fresh records in offset order.
    pub fn pop(
        &mut self,
        consumer: &str,
        max: u32,
        now_ms: i64,
        invisible_ms: u64,
        log_index: u64,
        ch: &mut Changes,
    ) -> Vec<LeaseInfo> {
        let end = self.header.next_offset;
        let deadline_ms = now_ms.saturating_add(invisible_ms.min(i64::MAX as u64) as i64);
        let c = self.consumer(consumer);
        let mut out = Vec::new();
        for (off, l) in c.leases.iter_mut() {
            if out.len() >= max as usize {
                break;
            }
            if l.deadline_ms <= now_ms {
                l.attempt += 1;
                l.lease_id = log_index;
                l.prev_lease_id = 0;
                l.deadline_ms = deadline_ms;
                out.push(LeaseInfo {
                    offset: *off,
                    attempt: l.attempt,
                    lease_id: log_index,
                    deadline_ms,
                });
            }
        }
        while out.len() < max as usize && c.next_fresh < end {
            let off = c.next_fresh;
            c.next_fresh += 1;
            let l = Lease {
                attempt: 1,
                lease_id: log_index,
                deadline_ms,
                prev_lease_id: 0,
            };
            c.leases.insert(off, l);
            out.push(LeaseInfo {
                offset: off,
                attempt: 1,
                lease_id: log_index,
                deadline_ms,
            });
        }
        if !out.is_empty() {
            ch.consumers.insert(consumer.to_string());
        }
        out
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
            if off < c.committed || c.acked.contains(&off) {
                out.push(Ok(())); // already acked: idempotent
                continue;
            }
            match c.leases.get(&off) {
                Some(l) if l.lease_id == lease_id => {
                    c.leases.remove(&off);
                    c.acked.insert(off);
                    changed = true;
                    out.push(Ok(()));
                }
                Some(_) => out.push(Err(ApplyError::ReceiptExpired(format!(
                    "offset {off} was redelivered after this receipt was issued"
                )))),
                None => out.push(Err(ApplyError::InvalidArgument(format!(
                    "offset {off} is not leased to this group"
                )))),
            }
        }
        if changed {
            c.advance();
            ch.consumers.insert(consumer.to_string());
        }
        out
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
                let info = LeaseInfo {
                    offset,
                    attempt: l.attempt,
                    lease_id: log_index,
                    deadline_ms: l.deadline_ms,
                };
                ch.consumers.insert(consumer.to_string());
                Ok(info)
            }
            Some(_) => Err(ApplyError::ReceiptExpired(format!(
                "offset {offset} was redelivered after this receipt was issued"
            ))),
            None if offset < c.committed || c.acked.contains(&offset) => Err(
                ApplyError::ReceiptExpired(format!("offset {offset} is already acked")),
            ),
            None => Err(ApplyError::InvalidArgument(format!(
                "offset {offset} is not leased to this group"
            ))),
        }
    }

    /// Offset mode: sets the group's committed position (clamped to the
    /// queue). Moving backwards forgets leases and acks above it.
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
        let c = self.consumer(consumer);
        if offset < c.committed {
            c.leases.clear();
            c.acked.clear();
            c.next_fresh = offset;
        } else {
            c.leases = c.leases.split_off(&offset);
            c.acked = c.acked.split_off(&offset);
            c.next_fresh = c.next_fresh.max(offset);
        }
        c.committed = offset;
        c.advance();
        ch.consumers.insert(consumer.to_string());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q_with(n: u64) -> QueueState {
        let mut q = QueueState::default();
        let recs: Vec<_> = (0..n).map(|_| (0, Bytes::from_static(b"x"))).collect();
        q.append("", &recs, 1, &mut Changes::default());
        q
    }

    #[test]
    fn append_assigns_dense_offsets_and_dedups_retries() {
        let mut q = QueueState::default();
        let mut ch = Changes::default();
        let recs = vec![(1, Bytes::from_static(b"a")), (2, Bytes::from_static(b"b"))];
        assert_eq!(
            q.append("p", &recs, 1, &mut ch),
            vec![(0, false), (1, false)]
        );
        assert_eq!(ch.records.len(), 2);
        let mut ch = Changes::default();
        assert_eq!(q.append("p", &recs, 2, &mut ch), vec![(0, true), (1, true)]);
        assert!(ch.records.is_empty());
        assert_eq!(q.header.next_offset, 2);
        // Another producer with the same sequences is not a duplicate.
        assert_eq!(
            q.append("p2", &recs, 3, &mut ch),
            vec![(2, false), (3, false)]
        );
        // Out-of-order sequences within the window are fine.
        let late = vec![(10, Bytes::new()), (5, Bytes::new())];
        assert_eq!(
            q.append("p", &late, 4, &mut ch),
            vec![(4, false), (5, false)]
        );
        assert_eq!(q.append("p", &late, 5, &mut ch), vec![(4, true), (5, true)]);
    }

    #[test]
    fn expired_lease_is_redelivered_with_next_attempt_and_old_receipt_fails() {
        let mut q = q_with(3);
        let mut ch = Changes::default();
        let first = q.pop("g", 10, 1000, 500, 10, &mut ch);
        assert_eq!(
            first.iter().map(|l| l.offset).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        assert!(first.iter().all(|l| l.attempt == 1));
        // Not expired yet: nothing.
        assert!(q.pop("g", 10, 1400, 500, 11, &mut ch).is_empty());
        assert!(!q.has_deliverable("g", 1400));
        assert!(q.has_deliverable("g", 1500));
        // Ack offset 1 in time.
        assert_eq!(q.ack("g", &[(1, 10)], &mut ch), vec![Ok(())]);
        let again = q.pop("g", 10, 1500, 500, 12, &mut ch);
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
        assert!(c.leases.is_empty() && c.acked.is_empty());
        // Acking again is idempotent.
        assert_eq!(q.ack("g", &[(0, 12)], &mut ch), vec![Ok(())]);
    }

    #[test]
    fn groups_are_independent_and_commit_advances_only_over_contiguous_acks() {
        let mut q = q_with(4);
        let mut ch = Changes::default();
        let a = q.pop("a", 2, 0, 1000, 5, &mut ch);
        let b = q.pop("b", 4, 0, 1000, 6, &mut ch);
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
        q.pop("g", 3, 0, 100, 1, &mut ch);
        q.ack("g", &[(1, 1)], &mut ch);
        let cands = q.pop_candidates("g", 10, 100);
        let leased: Vec<u64> = q
            .pop("g", 10, 100, 100, 2, &mut ch)
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
        let l = q.pop("g", 1, 0, 100, 7, &mut ch)[0];
        let l2 = q
            .change_invisible("g", 0, l.lease_id, 50, 1000, 8, &mut ch)
            .unwrap();
        assert_eq!(l2.deadline_ms, 1050);
        assert!(q.pop("g", 1, 200, 100, 9, &mut ch).is_empty());
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
    fn commit_offset_moves_both_ways_and_rejects_past_end() {
        let mut q = q_with(5);
        let mut ch = Changes::default();
        q.commit_offset("g", 3, &mut ch).unwrap();
        assert_eq!(
            q.pop("g", 10, 0, 10, 1, &mut ch)
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
        let leases = q.pop("g", 4, 1000, 60_000, 2, &mut ch);
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
        assert!(g.leases.is_empty() && g.acked.is_empty());
        assert_eq!(q.consumers["h"].skipped, 5);
        // Clamped to the stored range; nothing to do twice.
        assert_eq!(q.truncate(3, 0, &mut Changes::default()), 0);
        assert_eq!(q.truncate(99, 5, &mut Changes::default()), 5);
        assert_eq!(q.header.start_offset, 10);
        assert_eq!(q.header.bytes, 0);
    }
}
