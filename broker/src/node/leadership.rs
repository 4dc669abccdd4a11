//! Who leads each group, on this broker: the fast-failover campaign loop,
//! the liveness pings that pause elections on a cut-off broker, leadership
//! tracking, and handing a leadership to another replica (controller moves,
//! graceful stop). Its decisions are the pure `Failover` and `handoff_target`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use petrel_proto::PetrelError;

use super::{group_kind, voters, GroupHandle, Node};
use crate::meta::ClusterMap;
use crate::network::{KIND_ELECT, KIND_PING};
use crate::types::{Raft, META_GROUP};

/// Bound on one leadership hand-off.
pub const TRANSFER_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on handing every leadership away at shutdown.
pub const STOP_HANDOFF_TIMEOUT: Duration = Duration::from_secs(10);
/// A designated follower's campaigns per silence of its leader...
const ATTEMPTS: u32 = 3;
/// ...this far apart (a follower whose own timer fired first may hold
/// the term's vote)...
const GAP: Duration = Duration::from_millis(300);
/// ...after which it leaves elections to openraft's own timers until this
/// long after its first attempt.
const RETRY: Duration = Duration::from_secs(10);
/// Every group is examined only while some peer is silent (its groups may
/// need a campaign), and otherwise once per `FULL_SCAN_EVERY` ticks for
/// groups that lost their leader some other way; with a thousand idle
/// groups a scan every 100 ms was most of an idle broker's CPU.
const FULL_SCAN_EVERY: u32 = 10;
/// A graceful stop hands a group only to a voter at most this many
/// entries behind the leader's last.
const HANDOFF_MAX_LAG: u64 = 64;

impl Node {
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
    pub(super) async fn failover_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut failover = Failover::new(self.started);
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            failover.tick();
            if self.stopping.load(Ordering::Acquire) {
                continue;
            }
            let silence = self.lease() + Duration::from_millis(100);
            if !self.pool.heard_any(silence) {
                continue; // cut off from everyone: campaigning cannot win
            }
            let map = self.map_rx.borrow().clone();
            let now = Instant::now();
            let peers = map.brokers.keys().chain(self.config.peers.keys()).copied();
            let round = failover.peers(self.id, peers, |b| self.pool.last_in(b), now, silence);
            // A peer that is back (restarted, healed) may hold replicas
            // that know no leader: wake the quiet groups led here that it
            // is a voter of, so their heartbeats reach it before its own
            // election timer fires.
            if !round.back.is_empty() {
                self.wake_led_groups_with(&round.back);
            }
            if !round.scan {
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
                let last_in = |l| self.pool.last_in(l);
                if !failover.leader_silent(g, self.id, leader, is_voter, last_in, now, silence) {
                    continue;
                }
                // A quiet group's timers are off: its leader's broker went
                // silent, so turn them back on (openraft's own elections are
                // the fallback below) on every replica that notices.
                if let Some(h) = self.group(g) {
                    h.quiet.wake(&h.raft);
                }
                let voters: Vec<u64> = voters(&raft);
                let order = map.assignment(g).map(|(_, q)| q.replicas.as_slice());
                if !failover.may_campaign(g, self.id, leader, &voters, order, now) {
                    continue;
                }
                tracing::info!(group = g, old_leader = ?leader, "leader silent past its lease: campaigning");
                let _ = raft.trigger().elect().await;
            }
            failover.end_round(now);
        }
    }

    /// Pings every other broker every 200 ms (node-level liveness on the
    /// Raft transport, whatever groups they share), and turns this broker's
    /// own election timers off while it reaches none of them: openraft 0.9
    /// has no pre-vote, so a cut-off broker that kept campaigning would
    /// come back with a higher term and depose healthy leaders on healing.
    pub(super) async fn ping_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let peers = ping_targets(&self.map_rx.borrow(), self.config.peers.keys(), self.id);
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
            let stopping = self.stopping.load(Ordering::Acquire);
            let isolated = cut_off(
                !peers.is_empty(),
                self.started.elapsed(),
                lease,
                stopping,
                || self.pool.heard_any(lease),
            );
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

    /// Records when this node was first seen leading each group (term), and
    /// counts elections: every new term a replica here sees is one
    /// (`petrel_broker_raft_elections_total`, the term a group is in when
    /// first seen included), and every term this broker
    /// starts leading is one it won (`petrel_broker_raft_leaderships_won_total`).
    pub(super) fn watch_leadership(&self, group: u64, raft: Raft) {
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
                let matched = m
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(&to).cloned().flatten())
                    .map(|l| l.index);
                caught_up(m.last_log_index, matched)
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
                let matched = |v: u64| {
                    m.replication
                        .as_ref()
                        .and_then(|r| r.get(&v).cloned().flatten())
                        .map(|l| l.index)
                };
                let voters = m.membership_config.membership().voter_ids();
                handoff_target(*g, self.id, voters, m.last_log_index, matched).map(|to| (*g, to))
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
}

/// The fast-failover decisions of one broker, sans-IO: which peers went
/// silent or came back, whether a group's leader is silent, and whether
/// this broker campaigns for the group now. `failover_loop` feeds it what
/// it saw (when each peer last sent Raft traffic, each group's leader and
/// voters, the replica order) and acts on the answers.
pub(super) struct Failover {
    started: Instant,
    /// Groups without a known leader, since when.
    no_leader_since: BTreeMap<u64, Instant>,
    /// Groups this broker campaigns for: (attempts, first, last).
    tried: BTreeMap<u64, (u32, Instant, Instant)>,
    /// Peers silent at the previous tick.
    was_silent: BTreeSet<u64>,
    /// Counts down to the next full scan.
    ticks: u32,
}

/// What the peers' silence means for one tick of `failover_loop`.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct PeerRound {
    /// Peers silent at the previous tick and heard from again.
    pub back: Vec<u64>,
    /// Whether to examine every group this tick.
    pub scan: bool,
}

impl Failover {
    /// A broker that started at `started`: peers it never heard from count
    /// from then.
    pub(super) fn new(started: Instant) -> Self {
        Self {
            started,
            no_leader_since: BTreeMap::new(),
            tried: BTreeMap::new(),
            was_silent: BTreeSet::new(),
            ticks: 0,
        }
    }

    /// Every tick, first (also when the tick does nothing else).
    pub(super) fn tick(&mut self) {
        self.ticks = match self.ticks {
            0 => FULL_SCAN_EVERY - 1,
            t => t - 1,
        };
    }

    /// The peers (`candidates`, this broker `me` excluded) and when each
    /// last sent Raft traffic: which came back, and whether to scan.
    pub(super) fn peers(
        &mut self,
        me: u64,
        candidates: impl Iterator<Item = u64>,
        last_in: impl Fn(u64) -> Option<Instant>,
        now: Instant,
        silence: Duration,
    ) -> PeerRound {
        let silent: BTreeSet<u64> = candidates
            .filter(|b| *b != me)
            .filter(|b| now.duration_since(self.heard(last_in(*b))) > silence)
            .collect();
        let back: Vec<u64> = self.was_silent.difference(&silent).copied().collect();
        let scan = !(silent.is_empty()
            && self.tried.is_empty()
            && self.no_leader_since.is_empty()
            && self.ticks != 0);
        self.was_silent = silent;
        PeerRound { back, scan }
    }

    /// When a peer was last heard from, counting from this broker's start.
    fn heard(&self, last_in: Option<Instant>) -> Instant {
        last_in.unwrap_or(self.started).max(self.started)
    }

    /// Whether `group`'s leader has been silent past `silence`, as seen by
    /// replica `me` (`is_voter`: a voter in any of its configs). No leader
    /// at all counts from when that was first seen. A leader heard from
    /// again (a broker back after being taken for dead) ends the episode:
    /// the next silence gets fresh attempts.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn leader_silent(
        &mut self,
        group: u64,
        me: u64,
        leader: Option<u64>,
        is_voter: bool,
        last_in: impl FnOnce(u64) -> Option<Instant>,
        now: Instant,
        silence: Duration,
    ) -> bool {
        if !is_voter || leader == Some(me) {
            self.no_leader_since.remove(&group);
            return false;
        }
        let silent = match leader {
            Some(l) => {
                self.no_leader_since.remove(&group);
                now.duration_since(self.heard(last_in(l))) > silence
            }
            None => {
                let since = *self.no_leader_since.entry(group).or_insert(now);
                now.duration_since(since) > silence
            }
        };
        if !silent {
            self.tried.remove(&group);
        }
        silent
    }

    /// Whether `me` campaigns for `group` (whose leader is silent) now: only
    /// its designated follower does, up to `ATTEMPTS` times `GAP` apart,
    /// then not until `RETRY` after the first. `order` is the queue's
    /// replica order (the voters' when the map has none).
    pub(super) fn may_campaign(
        &mut self,
        group: u64,
        me: u64,
        leader: Option<u64>,
        voters: &[u64],
        order: Option<&[u64]>,
        now: Instant,
    ) -> bool {
        if voters.len() < 2 {
            return false;
        }
        if designated_follower(order.unwrap_or(voters), voters, leader) != Some(me) {
            return false;
        }
        let e = self.tried.entry(group).or_insert((0, now, now - GAP));
        if now.duration_since(e.1) >= RETRY {
            *e = (0, now, now - GAP);
        }
        if e.0 >= ATTEMPTS || now.duration_since(e.2) < GAP {
            return false;
        }
        e.0 += 1;
        e.2 = now;
        true
    }

    /// At the end of a scan: episodes older than `RETRY` are forgotten.
    pub(super) fn end_round(&mut self, now: Instant) {
        self.tried.retain(|_, t| now.duration_since(t.1) < RETRY);
    }
}

/// The follower that campaigns when a group's leader is silent: the first
/// voter in replica order that is not the leader. Its log position is not
/// known here (followers do not see each other's); a follower that is
/// behind loses the vote and `Failover` stops it after `ATTEMPTS`.
pub(super) fn designated_follower(
    order: &[u64],
    voters: &[u64],
    leader: Option<u64>,
) -> Option<u64> {
    order
        .iter()
        .find(|b| voters.contains(b) && Some(**b) != leader)
        .copied()
}

/// Whom a leader stopping gracefully hands `group` to: the other voter with
/// the highest matched index (`matched`), if that is at most
/// `HANDOFF_MAX_LAG` entries behind the leader's `last`; among equals, one
/// chosen by group id so the groups spread. None without such a voter.
pub(super) fn handoff_target(
    group: u64,
    me: u64,
    voters: impl IntoIterator<Item = u64>,
    last: Option<u64>,
    matched: impl Fn(u64) -> Option<u64>,
) -> Option<u64> {
    let voters: Vec<u64> = voters.into_iter().filter(|v| *v != me).collect();
    let best = voters.iter().filter_map(|v| matched(*v)).max();
    let cands: Vec<u64> = voters
        .iter()
        .copied()
        .filter(|v| {
            best.is_some()
                && matched(*v) == best
                && best >= last.map(|l| l.saturating_sub(HANDOFF_MAX_LAG))
        })
        .collect();
    (!cands.is_empty()).then(|| cands[group as usize % cands.len()])
}

/// Whether a hand-off target holds every entry of the leader: its matched
/// index is the leader's last.
pub(super) fn caught_up(last: Option<u64>, matched: Option<u64>) -> bool {
    last.is_some() && matched == last
}

/// The brokers `ping_loop` probes: every registered or configured broker
/// but this one and those an operator removed.
pub(super) fn ping_targets<'a>(
    map: &'a ClusterMap,
    peers: impl Iterator<Item = &'a u64>,
    me: u64,
) -> BTreeSet<u64> {
    map.brokers
        .keys()
        .chain(peers)
        .copied()
        .filter(|b| *b != me && !map.removed.contains(b))
        .collect()
}

/// Whether this broker is cut off and pauses its own elections: it has
/// peers, has run for a lease, heard from none of them within a lease, and
/// is not stopping. It resumes as soon as one answers.
pub(super) fn cut_off(
    has_peers: bool,
    up_for: Duration,
    lease: Duration,
    stopping: bool,
    heard_any: impl FnOnce() -> bool,
) -> bool {
    has_peers && up_for > lease && !heard_any() && !stopping
}

#[cfg(test)]
mod tests {
    use super::*;

    const SILENCE: Duration = Duration::from_millis(1000);

    fn ms(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    /// Runs `failover_loop`'s per-group decisions for replica `me` of group
    /// 7 (voters 1, 2, 3; replica order 1, 2, 3) every 100 ms up to `until`
    /// ms, the leader last heard at `heard(t)` ms; returns the campaign
    /// times in ms.
    fn campaigns(me: u64, leader: Option<u64>, until: u64, heard: impl Fn(u64) -> u64) -> Vec<u64> {
        let t0 = Instant::now();
        let mut f = Failover::new(t0);
        let voters = [1, 2, 3];
        let mut out = Vec::new();
        for t in (0..=until).step_by(100) {
            let now = ms(t0, t);
            f.tick();
            let last = Some(ms(t0, heard(t)));
            if f.leader_silent(7, me, leader, true, |_| last, now, SILENCE)
                && f.may_campaign(7, me, leader, &voters, Some(&[1, 2, 3]), now)
            {
                out.push(t);
            }
            f.end_round(now);
        }
        out
    }

    #[test]
    fn the_designated_follower_is_the_first_other_voter_in_replica_order() {
        // (replica order, voters, leader, designated)
        type Case = (&'static [u64], &'static [u64], Option<u64>, Option<u64>);
        let cases: &[Case] = &[
            (&[1, 2, 3], &[1, 2, 3], Some(1), Some(2)),
            (&[1, 2, 3], &[1, 2, 3], Some(2), Some(1)),
            (&[3, 1, 2], &[1, 2, 3], Some(1), Some(3)),
            // No leader known: the first voter.
            (&[1, 2, 3], &[1, 2, 3], None, Some(1)),
            // A replica moved in and not yet a voter is skipped.
            (&[4, 2, 3], &[1, 2, 3], Some(2), Some(3)),
            // A retiring voter missing from the order is never designated.
            (&[2, 3], &[1, 2, 3], Some(2), Some(3)),
            // No candidate at all.
            (&[1], &[1], Some(1), None),
            (&[], &[1, 2], Some(1), None),
        ];
        for (order, voters, leader, want) in cases {
            assert_eq!(
                designated_follower(order, voters, *leader),
                *want,
                "order {order:?} voters {voters:?} leader {leader:?}"
            );
        }
    }

    #[test]
    fn a_silent_leader_gets_three_campaigns_then_a_pause() {
        // Leader 1 last heard at 0: silent after 1000 ms. Broker 2 is
        // designated: three tries 300 ms apart, then nothing until RETRY
        // after the first, then three more.
        assert_eq!(
            campaigns(2, Some(1), 12_000, |_| 0),
            vec![1100, 1400, 1700, 11_100, 11_400, 11_700]
        );
        // Broker 3 is not designated: it leaves the silence to broker 2 and
        // openraft's own timers.
        assert!(campaigns(3, Some(1), 12_000, |_| 0).is_empty());
    }

    #[test]
    fn a_designated_follower_that_cannot_win_leaves_the_field() {
        // Broker 2 may be behind the log of broker 3: its campaigns fail
        // (voters refuse a stale log), and after three it stops for RETRY so
        // it does not starve the caught-up follower's own elections with
        // ever higher terms. Not more than ATTEMPTS per RETRY, ever.
        let times = campaigns(2, Some(1), 60_000, |_| 0);
        for w in times.windows(ATTEMPTS as usize + 1) {
            assert!(
                w[ATTEMPTS as usize] - w[0] >= RETRY.as_millis() as u64,
                "{times:?}"
            );
        }
    }

    #[test]
    fn a_leader_heard_again_ends_the_episode() {
        // Leader 1 silent from 0, back (heard continuously) from 1500 to
        // 3000, silent again after: fresh attempts at once, no RETRY wait.
        let heard = |t: u64| {
            if (1500..=3000).contains(&t) {
                t
            } else if t > 3000 {
                3000
            } else {
                0
            }
        };
        assert_eq!(
            campaigns(2, Some(1), 5_000, heard),
            vec![1100, 1400, 4100, 4400, 4700]
        );
    }

    #[test]
    fn no_leader_counts_from_when_it_was_first_seen() {
        // No leader: the first voter in order campaigns once the group has
        // been leaderless for the silence.
        assert_eq!(campaigns(1, None, 1_800, |_| 0), vec![1100, 1400, 1700]);
        assert!(campaigns(2, None, 3_000, |_| 0).is_empty());
    }

    #[test]
    fn leaders_learners_and_lone_voters_never_campaign() {
        let t0 = Instant::now();
        let mut f = Failover::new(t0);
        let late = ms(t0, 5_000);
        // This broker leads the group.
        assert!(!f.leader_silent(7, 1, Some(1), true, |_| None, late, SILENCE));
        // This broker is a learner (not a voter in any config).
        assert!(!f.leader_silent(7, 4, Some(1), false, |_| None, late, SILENCE));
        // A group of one voter: nobody to campaign.
        assert!(f.leader_silent(8, 1, Some(2), true, |_| None, late, SILENCE));
        assert!(!f.may_campaign(8, 1, Some(2), &[2], None, late));
        // Without an assignment the voters give the order.
        assert!(f.leader_silent(9, 2, Some(1), true, |_| None, late, SILENCE));
        assert!(f.may_campaign(9, 2, Some(1), &[1, 2, 3], None, late));
    }

    #[test]
    fn peers_that_go_silent_and_come_back() {
        let t0 = Instant::now();
        let mut f = Failover::new(t0);
        // (tick ms, when peers 2 and 3 were last heard (None: never), back, scan)
        type Case = (u64, [Option<u64>; 2], &'static [u64], bool);
        let cases: &[Case] = &[
            // Just started: nobody is silent yet, nothing to scan.
            (100, [None, None], &[], false),
            // Peer 3 was never heard and the silence has passed.
            (1200, [Some(1100), None], &[], true),
            // Peer 3 answers: it is back.
            (1300, [Some(1200), Some(1250)], &[3], false),
            // Both silent, then both back.
            (5000, [Some(1200), Some(1250)], &[], true),
            (5100, [Some(5050), Some(5060)], &[2, 3], false),
        ];
        for (t, heard, back, scan) in cases {
            f.tick();
            let last = |b: u64| heard[b as usize - 2].map(|h| ms(t0, h));
            let round = f.peers(1, [1, 2, 3].into_iter(), last, ms(t0, *t), SILENCE);
            assert_eq!(round.back, *back, "at {t}");
            assert_eq!(round.scan, *scan, "at {t}");
        }
    }

    #[test]
    fn every_group_is_scanned_every_tenth_tick_when_all_is_quiet() {
        let t0 = Instant::now();
        let mut f = Failover::new(t0);
        let scans: Vec<usize> = (0..30)
            .filter(|_| {
                f.tick();
                f.peers(1, [1].into_iter(), |_| None, t0, SILENCE).scan
            })
            .collect();
        assert_eq!(scans, vec![9, 19, 29]);
    }

    #[test]
    fn a_graceful_stop_hands_off_to_the_most_caught_up_voter() {
        // (group, voters, leader's last index, matched per broker, target)
        type Case = (
            u64,
            &'static [u64],
            Option<u64>,
            &'static [(u64, u64)],
            Option<u64>,
        );
        let cases: &[Case] = &[
            // Equally caught up: spread by group id.
            (0, &[1, 2, 3], Some(100), &[(2, 100), (3, 100)], Some(2)),
            (1, &[1, 2, 3], Some(100), &[(2, 100), (3, 100)], Some(3)),
            // A follower behind is never chosen ahead of one caught up.
            (1, &[1, 2, 3], Some(100), &[(2, 100), (3, 90)], Some(2)),
            (0, &[1, 2, 3], Some(100), &[(2, 99), (3, 100)], Some(3)),
            // The best may lag by up to 64 entries...
            (0, &[1, 2, 3], Some(100), &[(2, 36)], Some(2)),
            // ...not more.
            (0, &[1, 2, 3], Some(100), &[(2, 35), (3, 20)], None),
            // No follower position known (a new leader): nobody.
            (0, &[1, 2, 3], Some(100), &[], None),
            // No other voter at all.
            (0, &[1], Some(100), &[], None),
        ];
        for (group, voters, last, matched, want) in cases {
            let m = |v: u64| matched.iter().find(|(b, _)| *b == v).map(|(_, i)| *i);
            assert_eq!(
                handoff_target(*group, 1, voters.iter().copied(), *last, m),
                *want,
                "group {group} voters {voters:?} last {last:?} matched {matched:?}"
            );
        }
    }

    #[test]
    fn a_transfer_waits_for_every_entry() {
        let cases = [
            (None, None, false),
            (Some(5), None, false),
            (Some(5), Some(4), false),
            (Some(5), Some(5), true),
        ];
        for (last, matched, want) in cases {
            assert_eq!(caught_up(last, matched), want, "{last:?} {matched:?}");
        }
    }

    #[test]
    fn removed_brokers_are_not_pinged() {
        let mut map = ClusterMap::default();
        for b in 1..=4 {
            map.register_broker(b, &format!("127.0.0.1:{b}")).unwrap();
        }
        map.set_draining(4, true).unwrap();
        map.remove_broker(4).unwrap();
        // Broker 5 is only in --peers (not registered yet): pinged.
        let peers = [1u64, 4, 5];
        assert_eq!(
            ping_targets(&map, peers.iter(), 1),
            BTreeSet::from([2, 3, 5])
        );
    }

    #[test]
    fn a_broker_cut_off_pauses_elections_until_a_peer_answers() {
        let lease = Duration::from_secs(2);
        let up = Duration::from_secs(60);
        // (has peers, up for, stopping, heard any, cut off)
        let cases = [
            (true, up, false, false, true),
            // A peer answered again: elections resume.
            (true, up, false, true, false),
            // Alone in the cluster, just started, or stopping: never.
            (false, up, false, false, false),
            (true, Duration::from_secs(1), false, false, false),
            (true, up, true, false, false),
        ];
        for (peers, up_for, stopping, heard, want) in cases {
            assert_eq!(cut_off(peers, up_for, lease, stopping, || heard), want);
        }
    }
}
