//! The checkpoint lane: how a queue leader's consumer ops reach the log.
//!
//! Receives, acks and nacks run in the leader's memory (see `queue.rs`,
//! [`ConsumerOp`]). Each call records its ops here, in the order it made
//! them, and gets a sequence number. One writer at a time proposes every
//! op recorded so far as a single `Command::Checkpoint`, so the Raft
//! entries a busy group writes do not grow with its receives and acks:
//! while one checkpoint replicates, the next one gathers.
//!
//! Every call waits until every op recorded up to it is committed before
//! it answers: a receive, so a failover never hands a record a consumer
//! already holds to another as a first delivery; an ack, nack or
//! invisibility change, so a failover never undoes it. Waiting costs a
//! Raft round trip but no Raft entry of its own: calls that arrive while
//! one checkpoint replicates share the next.

use std::sync::Mutex;

use petrel_proto::PetrelError;
use tokio::sync::Notify;

use crate::queue::{Checkpoint, ConsumerOps};

/// Failed ranges remembered for late waiters (a waiter looks right after
/// it is woken, so a handful is plenty).
const FAILURES_KEPT: usize = 64;
/// Ops one checkpoint carries at most (the rest go in the next one), so an
/// entry stays far below the Raft message limit.
pub const MAX_OPS_PER_CHECKPOINT: usize = 16_384;

#[derive(Debug, Default)]
struct Inner {
    /// The leadership term the ops belong to (see `queue::Serving`).
    term: u64,
    /// Sequence number of the term's first call.
    first: u64,
    /// Ops not yet proposed, per call: its ops (per consumer group) and
    /// its sequence number.
    buf: Vec<(Vec<ConsumerOps>, u64)>,
    /// Sequence number of the last recorded call.
    recorded: u64,
    /// Every call up to this one has an outcome.
    settled: u64,
    /// Calls `lo..=hi` whose checkpoint failed, and why.
    failures: Vec<(u64, u64, PetrelError)>,
    /// A writer task is running.
    writing: bool,
}

#[derive(Debug, Default)]
pub struct CheckpointLane {
    inner: Mutex<Inner>,
    settled: Notify,
}

impl CheckpointLane {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records one call's ops, taken while serving `term` (call with the
    /// queue state still locked, so the lane's order is the order the state
    /// changed in). Returns its sequence number and whether the caller must
    /// start a writer (for `term`).
    ///
    /// The first call of a new term fails every call of the old one still
    /// waiting: their ops died with that term's serving state.
    pub fn record(&self, ops: Vec<ConsumerOps>, term: u64) -> (u64, bool) {
        let mut g = self.lock();
        if term != g.term {
            let (lo, hi) = (g.settled + 1, g.recorded);
            if lo <= hi {
                let e = PetrelError::Unavailable(format!(
                    "the queue's leadership term {} ended before these changes were stored",
                    g.term
                ));
                g.failures.push((lo, hi, e));
                g.settled = hi;
            }
            g.buf.clear();
            g.writing = false;
            g.term = term;
            g.first = g.recorded + 1;
            drop(g);
            self.settled.notify_waiters();
            g = self.lock();
        }
        let n: usize = ops.iter().map(|b| b.ops.len()).sum();
        if n == 0 {
            // Waits for what the term recorded before it (nothing, if the
            // term has recorded nothing yet).
            return (if g.recorded >= g.first { g.recorded } else { 0 }, false);
        }
        g.recorded += 1;
        let seq = g.recorded;
        g.buf.push((ops, seq));
        let start = !g.writing;
        g.writing = true;
        (seq, start)
    }

    /// The next checkpoint of `term`'s writer (`None`, and the writer
    /// stops, when nothing waits or its term is over). Returns the last
    /// call it covers.
    pub fn take(&self, term: u64) -> Option<(u64, Checkpoint)> {
        let mut g = self.lock();
        if g.term != term {
            return None;
        }
        if g.buf.is_empty() {
            g.writing = false;
            return None;
        }
        // Whole calls (one call's ops never span two checkpoints), at least
        // one, up to MAX_OPS_PER_CHECKPOINT ops.
        let (mut calls, mut ops) = (0, 0);
        for (batches, _) in &g.buf {
            let n: usize = batches.iter().map(|b| b.ops.len()).sum();
            if calls > 0 && ops + n > MAX_OPS_PER_CHECKPOINT {
                break;
            }
            calls += 1;
            ops += n;
        }
        let taken: Vec<_> = g.buf.drain(..calls).collect();
        let hi = taken.last().map(|c| c.1).unwrap_or(g.settled);
        let mut batches: Vec<ConsumerOps> = Vec::new();
        for b in taken.into_iter().flat_map(|(call, _)| call) {
            match batches.last_mut() {
                Some(last) if last.consumer == b.consumer => last.ops.extend(b.ops),
                _ => batches.push(b),
            }
        }
        Some((hi, Checkpoint { term, batches }))
    }

    /// `term`'s checkpoint covering calls up to `hi` is committed (or
    /// failed). Ignored once the term is over (its calls already failed).
    pub fn settle(&self, term: u64, hi: u64, outcome: Result<(), PetrelError>) {
        let mut g = self.lock();
        if g.term != term {
            return;
        }
        let lo = g.settled + 1;
        g.settled = g.settled.max(hi);
        if let Err(e) = outcome {
            g.failures.push((lo, hi, e));
            if g.failures.len() > FAILURES_KEPT {
                g.failures.remove(0);
            }
        }
        drop(g);
        self.settled.notify_waiters();
    }

    /// `term`'s writer stopped early (leadership lost): every op waiting
    /// fails with `e`.
    pub fn abandon(&self, term: u64, e: PetrelError) {
        let hi = {
            let mut g = self.lock();
            if g.term != term {
                return;
            }
            g.buf.clear();
            g.writing = false;
            g.recorded
        };
        self.settle(term, hi, Err(e));
    }

    /// Waits until call `seq` is committed; its checkpoint's error if not.
    pub async fn wait(&self, seq: u64) -> Result<(), PetrelError> {
        loop {
            let notified = self.settled.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let g = self.lock();
                if g.settled >= seq {
                    return match g
                        .failures
                        .iter()
                        .find(|(lo, hi, _)| *lo <= seq && seq <= *hi)
                    {
                        Some((_, _, e)) => Err(e.clone()),
                        None => Ok(()),
                    };
                }
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::ConsumerOp;

    fn op(n: u64) -> ConsumerOp {
        ConsumerOp::Done(n)
    }

    /// One call's ops, all for consumer group `c`.
    fn call(c: &str, ops: Vec<ConsumerOp>) -> Vec<ConsumerOps> {
        vec![ConsumerOps {
            consumer: c.into(),
            ops,
        }]
    }

    #[test]
    fn calls_gather_into_one_checkpoint_grouped_by_consumer() {
        let lane = CheckpointLane::default();
        let (s1, start1) = lane.record(call("a", vec![op(1), op(2)]), 9);
        let (s2, start2) = lane.record(call("b", vec![op(3)]), 9);
        let (s3, _) = lane.record(call("a", vec![op(4)]), 9);
        assert!(start1 && !start2, "one writer");
        assert_eq!((s1, s2, s3), (1, 2, 3));
        let (hi, cp) = lane.take(9).unwrap();
        assert_eq!(hi, 3);
        assert_eq!(cp.term, 9);
        let shape: Vec<_> = cp
            .batches
            .iter()
            .map(|b| (b.consumer.as_str(), b.ops.len()))
            .collect();
        assert_eq!(shape, vec![("a", 2), ("b", 1), ("a", 1)]);
        assert!(lane.take(9).is_none(), "the writer stops when idle");
        let (_, start) = lane.record(call("a", vec![op(5)]), 9);
        assert!(start, "the next call starts a writer again");
    }

    #[tokio::test]
    async fn waiters_get_their_checkpoints_outcome() {
        let lane = CheckpointLane::default();
        let (s1, _) = lane.record(call("a", vec![op(1)]), 1);
        let (hi, _) = lane.take(1).unwrap();
        let (s2, _) = lane.record(call("a", vec![op(2)]), 1);
        lane.settle(1, hi, Err(PetrelError::Unavailable("lost".into())));
        let (hi2, _) = lane.take(1).unwrap();
        lane.settle(1, hi2, Ok(()));
        assert!(lane.wait(s1).await.is_err());
        assert!(lane.wait(s2).await.is_ok());
        // An empty call waits for whatever was recorded before it.
        assert_eq!(lane.record(Vec::new(), 1), (s2, false));
    }

    #[test]
    fn one_calls_ops_are_never_split() {
        let lane = CheckpointLane::default();
        let big = call(
            "a",
            (0..MAX_OPS_PER_CHECKPOINT as u64 + 10).map(op).collect(),
        );
        lane.record(call("a", vec![op(0)]), 1);
        lane.record(big, 1);
        let (hi, cp) = lane.take(1).unwrap();
        assert_eq!(hi, 1);
        assert_eq!(cp.batches[0].ops.len(), 1);
        let (hi, cp) = lane.take(1).unwrap();
        assert_eq!(hi, 2);
        assert_eq!(cp.batches[0].ops.len(), MAX_OPS_PER_CHECKPOINT + 10);
    }

    #[tokio::test]
    async fn a_new_term_fails_the_old_terms_calls_and_stops_its_writer() {
        let lane = CheckpointLane::default();
        let (s1, start) = lane.record(call("a", vec![op(1)]), 3);
        assert!(start);
        let (hi, _) = lane.take(3).unwrap();
        let (s2, _) = lane.record(call("a", vec![op(2)]), 3);
        // Leadership lost and won again: the first call of term 5.
        let (s3, start) = lane.record(call("a", vec![op(3)]), 5);
        assert!(start, "the new term gets its own writer");
        assert!(
            lane.wait(s1).await.is_err(),
            "in flight when the term ended"
        );
        assert!(lane.wait(s2).await.is_err(), "never proposed");
        // The old writer's late outcome changes nothing, and it stops.
        lane.settle(3, hi, Ok(()));
        assert!(lane.wait(s1).await.is_err());
        assert!(lane.take(3).is_none());
        let (hi, cp) = lane.take(5).unwrap();
        assert_eq!((hi, cp.term, cp.batches[0].ops.len()), (s3, 5, 1));
        lane.settle(5, hi, Ok(()));
        assert!(lane.wait(s3).await.is_ok());
        // An empty call of a fresh term waits for nothing of the old one.
        let lane = CheckpointLane::default();
        lane.record(call("a", vec![op(1)]), 3);
        let (s, _) = lane.record(Vec::new(), 4);
        assert!(lane.wait(s).await.is_ok());
    }
}
