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

    /// Records one call's ops (call with the queue state still locked, so
    /// the lane's order is the order the state changed in). Returns its
    /// sequence number and whether the caller must start a writer.
    pub fn record(&self, ops: Vec<ConsumerOps>) -> (u64, bool) {
        let mut g = self.lock();
        let n: usize = ops.iter().map(|b| b.ops.len()).sum();
        if n == 0 {
            return (g.recorded, false);
        }
        g.recorded += 1;
        let seq = g.recorded;
        g.buf.push((ops, seq));
        let start = !g.writing;
        g.writing = true;
        (seq, start)
    }

    /// The writer's next checkpoint (`None`, and the writer stops, when
    /// nothing waits). Returns the last call it covers.
    pub fn take(&self, origin: u64) -> Option<(u64, Checkpoint)> {
        let mut g = self.lock();
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
        Some((hi, Checkpoint { origin, batches }))
    }

    /// The checkpoint covering calls up to `hi` is committed (or failed).
    pub fn settle(&self, hi: u64, outcome: Result<(), PetrelError>) {
        let mut g = self.lock();
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

    /// The writer stopped early (leadership lost): every op waiting fails
    /// with `e`.
    pub fn abandon(&self, e: PetrelError) {
        let hi = {
            let mut g = self.lock();
            g.buf.clear();
            g.writing = false;
            g.recorded
        };
        self.settle(hi, Err(e));
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
        let (s1, start1) = lane.record(call("a", vec![op(1), op(2)]));
        let (s2, start2) = lane.record(call("b", vec![op(3)]));
        let (s3, _) = lane.record(call("a", vec![op(4)]));
        assert!(start1 && !start2, "one writer");
        assert_eq!((s1, s2, s3), (1, 2, 3));
        let (hi, cp) = lane.take(9).unwrap();
        assert_eq!(hi, 3);
        assert_eq!(cp.origin, 9);
        let shape: Vec<_> = cp
            .batches
            .iter()
            .map(|b| (b.consumer.as_str(), b.ops.len()))
            .collect();
        assert_eq!(shape, vec![("a", 2), ("b", 1), ("a", 1)]);
        assert!(lane.take(9).is_none(), "the writer stops when idle");
        let (_, start) = lane.record(call("a", vec![op(5)]));
        assert!(start, "the next call starts a writer again");
    }

    #[tokio::test]
    async fn waiters_get_their_checkpoints_outcome() {
        let lane = CheckpointLane::default();
        let (s1, _) = lane.record(call("a", vec![op(1)]));
        let (hi, _) = lane.take(1).unwrap();
        let (s2, _) = lane.record(call("a", vec![op(2)]));
        lane.settle(hi, Err(PetrelError::Unavailable("lost".into())));
        let (hi2, _) = lane.take(1).unwrap();
        lane.settle(hi2, Ok(()));
        assert!(lane.wait(s1).await.is_err());
        assert!(lane.wait(s2).await.is_ok());
        // An empty call waits for whatever was recorded before it.
        assert_eq!(lane.record(Vec::new()), (s2, false));
    }

    #[test]
    fn one_calls_ops_are_never_split() {
        let lane = CheckpointLane::default();
        let big = call(
            "a",
            (0..MAX_OPS_PER_CHECKPOINT as u64 + 10).map(op).collect(),
        );
        lane.record(call("a", vec![op(0)]));
        lane.record(big);
        let (hi, cp) = lane.take(1).unwrap();
        assert_eq!(hi, 1);
        assert_eq!(cp.batches[0].ops.len(), 1);
        let (hi, cp) = lane.take(1).unwrap();
        assert_eq!(hi, 2);
        assert_eq!(cp.batches[0].ops.len(), MAX_OPS_PER_CHECKPOINT + 10);
    }
}
