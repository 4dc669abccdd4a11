//! Quiescence (TiKV calls it hibernation): a queue group with no traffic
//! whose followers hold every entry turns its Raft timers off on every
//! replica, so an idle queue costs no ticks, heartbeats or applies.
//!
//! ```text
//!  leader: no write for QUIET_AFTER, every voter matched = last index
//!     ── KIND_QUIET(term, last index) ──▶ each follower: same leader, term
//!                                           and last index? timers off, ok
//!  all ok ──▶ leader: timers off (unless a write came meanwhile)
//! ```
//!
//! Waking: any write proposed on the leader (`Node::write`), and any Raft
//! message other than a ping or a quiet request reaching a replica (an
//! append, a heartbeat, a vote, a hand-off), turns the timers back on, so
//! the first write after a quiet spell wakes the leader and then each
//! follower as its append arrives. A follower that went quiet while its
//! leader did not is woken by the next heartbeat.
//!
//! Failure detection does not need the timers: brokers ping each other
//! every 200 ms whatever groups they share, and `Node::failover_loop`
//! wakes a group (and campaigns, on its designated follower) when its
//! leader's broker has been silent for a lease. A leader that is cut off
//! while quiet is fenced as before (`Node::lost_quorum`, from the same
//! pings) and steps down on the first message from a newer term.
//! The meta group never goes quiet.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use petrel_proto::PetrelError;

use crate::network::KIND_QUIET;
use crate::node::{GroupHandle, Node};
use crate::types::{Raft, META_GROUP};

/// A leader whose group saw no write for this long may quiet it.
pub const QUIET_AFTER: Duration = Duration::from_secs(2);
/// How often leaders look for groups to quiet.
const QUIET_EVERY: Duration = Duration::from_secs(1);
/// Bound on one follower's answer to a quiet request.
const QUIET_RPC_TIMEOUT: Duration = Duration::from_millis(500);

fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// One replica's quiescence state.
#[derive(Debug, Default)]
pub struct QuietState {
    /// Whether this replica's Raft timers are off. Transitions happen under
    /// the lock, so a wake never loses to a concurrent sleep.
    quiet: Mutex<bool>,
    /// When this node last proposed a write to the group (process ms).
    last_write_ms: AtomicU64,
}

impl QuietState {
    fn lock(&self) -> std::sync::MutexGuard<'_, bool> {
        self.quiet.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_quiet(&self) -> bool {
        *self.lock()
    }

    /// Turns the group's timers back on if they were off.
    pub fn wake(&self, raft: &Raft) {
        let mut q = self.lock();
        if *q {
            *q = false;
            raft.runtime_config().tick(true);
        }
    }

    /// A write is about to be proposed: note it, and wake.
    pub fn note_write(&self, raft: &Raft) {
        self.last_write_ms.store(now_ms(), Ordering::Release);
        self.wake(raft);
    }

    /// Turns the timers off, unless a write was noted after `since`
    /// (`None`: unconditionally, for a follower).
    fn sleep(&self, raft: &Raft, since: Option<u64>) -> bool {
        let mut q = self.lock();
        if since.is_some_and(|s| self.last_write_ms.load(Ordering::Acquire) != s) {
            return false;
        }
        if !*q {
            *q = true;
            raft.runtime_config().tick(false);
        }
        true
    }
}

fn encode(term: u64, last_index: u64) -> Vec<u8> {
    let mut v = term.to_be_bytes().to_vec();
    v.extend_from_slice(&last_index.to_be_bytes());
    v
}

fn decode(p: &[u8]) -> Option<(u64, u64)> {
    let term = u64::from_be_bytes(p.get(..8)?.try_into().ok()?);
    let last = u64::from_be_bytes(p.get(8..16)?.try_into().ok()?);
    (p.len() == 16).then_some((term, last))
}

impl Node {
    /// A write to `h` is about to be proposed (wakes a quiet group).
    pub(crate) fn note_write(&self, h: &GroupHandle) {
        h.quiet.note_write(&h.raft);
    }

    /// Follower side of `KIND_QUIET`: go quiet if `from` is our leader in
    /// `term` and we hold exactly its last entry.
    pub fn quiet_request(&self, group: u64, from: u64, payload: &[u8]) -> Result<(), PetrelError> {
        let (term, last) = decode(payload)
            .ok_or_else(|| PetrelError::InvalidArgument("quiet payload must be two u64".into()))?;
        if group == META_GROUP {
            return Err(PetrelError::InvalidArgument(
                "the meta group never goes quiet".into(),
            ));
        }
        let h = self.group(group).ok_or_else(|| {
            PetrelError::NotFound(format!("broker {} does not host group {group}", self.id))
        })?;
        let agrees = {
            let m = h.raft.metrics();
            let m = m.borrow();
            m.current_leader == Some(from)
                && m.current_term == term
                && m.last_log_index == Some(last)
                && m.last_applied.map(|l| l.index) == Some(last)
        };
        if !agrees || self.is_stopping() {
            return Err(PetrelError::Unavailable(format!(
                "group {group}: not caught up with leader {from} in term {term}"
            )));
        }
        h.quiet.sleep(&h.raft, None);
        if let Some(log) = &h.log {
            log.forget_tail();
        }
        Ok(())
    }

    /// Leader side: every `QUIET_EVERY`, quiet each queue group this node
    /// leads that saw no write for `QUIET_AFTER` and whose voters all hold
    /// its last entry.
    pub(crate) async fn quiet_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(QUIET_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let mut quiet = 0u64;
            let mut candidates = Vec::new();
            for e in self.groups.iter() {
                if e.quiet.is_quiet() {
                    quiet += 1;
                    continue;
                }
                if *e.key() == META_GROUP || self.is_stopping() || self.is_isolated() {
                    continue;
                }
                if let Some(c) = self.quiet_candidate(*e.key(), e.value()) {
                    candidates.push(c);
                }
            }
            metrics::gauge!("petrel_broker_quiet_groups").set(quiet as f64);
            let attempts = candidates
                .into_iter()
                .map(|(g, h, since, term, last, followers)| {
                    let node = self.clone();
                    async move {
                        let payload = encode(term, last);
                        let asks = followers.iter().map(|f| {
                            let node = node.clone();
                            let payload = payload.clone();
                            async move {
                                tokio::time::timeout(
                                    QUIET_RPC_TIMEOUT,
                                    node.peer_raft_call(*f, g, KIND_QUIET, payload),
                                )
                                .await
                                .is_ok_and(|r| r.is_ok())
                            }
                        });
                        let all = futures::future::join_all(asks).await;
                        if all.iter().all(|ok| *ok)
                            && node.quiet_candidate(g, &h).is_some()
                            && h.quiet.sleep(&h.raft, Some(since))
                        {
                            // Every follower holds every entry: nothing
                            // will be replicated from the in-memory tail.
                            if let Some(log) = &h.log {
                                log.forget_tail();
                            }
                            tracing::debug!(group = g, "quiet");
                        }
                    }
                });
            futures::future::join_all(attempts).await;
        }
    }

    /// (group, handle, last write, term, last index, followers) if `h` may
    /// go quiet now.
    #[allow(clippy::type_complexity)]
    fn quiet_candidate(
        &self,
        g: u64,
        h: &GroupHandle,
    ) -> Option<(u64, GroupHandle, u64, u64, u64, Vec<u64>)> {
        let since = h.quiet.last_write_ms.load(Ordering::Acquire);
        if now_ms().saturating_sub(since) < QUIET_AFTER.as_millis() as u64
            || h.handoff.load(Ordering::Acquire)
            || self.is_changing(g)
        {
            return None;
        }
        let m = h.raft.metrics();
        let m = m.borrow();
        if m.current_leader != Some(self.id) {
            return None;
        }
        let last = m.last_log_index?;
        if m.last_applied.map(|l| l.index) != Some(last) {
            return None;
        }
        let mem = m.membership_config.membership();
        let configs = mem.get_joint_config();
        if configs.len() != 1 {
            return None; // a membership change is under way
        }
        let voters: Vec<u64> = configs[0].iter().copied().collect();
        if mem.nodes().count() != voters.len() {
            return None; // learners being brought in
        }
        let repl = m.replication.as_ref()?;
        let followers: Vec<u64> = voters.into_iter().filter(|v| *v != self.id).collect();
        let caught_up = followers.iter().all(|f| {
            repl.get(f)
                .cloned()
                .flatten()
                .is_some_and(|l| l.index == last)
        });
        caught_up.then(|| (g, h.clone(), since, m.current_term, last, followers))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quiet_payload_round_trips_and_rejects_garbage() {
        assert_eq!(decode(&encode(7, 42)), Some((7, 42)));
        assert_eq!(decode(&[1, 2, 3]), None);
        assert_eq!(decode(&[0; 17]), None);
    }
}
