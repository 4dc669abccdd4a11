//! Placement in action. While this broker leads the meta group it is the
//! controller: it registers brokers, keeps the meta voters healthy, and
//! starts replica and leadership moves. On every broker, the leader of a
//! queue group carries out its replica moves (Raft membership changes).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::{BasicNode, ChangeMembers};
use petrel_proto::pb::broker as bpb;
use petrel_proto::pb::broker::broker_data_client::BrokerDataClient;
use petrel_proto::PetrelError;

use super::{voters, GroupHandle, Node};
use crate::meta::{plan_leader_moves, ClusterMap, GroupLeadership};
use crate::network::KIND_TRANSFER;
use crate::types::{Command, Raft, Response, META_GROUP};

/// How often the controller plans leadership and replica moves.
const BALANCE_EVERY: Duration = Duration::from_secs(2);
/// A group whose leadership was moved is left alone this long.
const MOVE_DAMPING: Duration = Duration::from_secs(10);
/// Leadership or replica moves started per controller round.
const MOVES_PER_ROUND: usize = 64;
/// Replica moves in flight at once (groups with retiring replicas).
const REPLICA_MOVES_IN_FLIGHT: usize = 8;

impl Node {
    /// Controller duties while this node leads the meta group: register
    /// brokers and keep them in the meta group, keep three healthy meta
    /// voters, move replicas off draining brokers and balance leaderships.
    /// On every node: drive membership changes of the groups it leads.
    pub(super) async fn controller_loop(self: Arc<Self>) {
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
        for (id, addr) in unregistered_peers(&map, &self.config.peers) {
            let cmd = Command::RegisterBroker {
                id,
                address: addr.to_string(),
            };
            match self.meta_write_local(cmd).await {
                Ok(_) => tracing::info!(broker = id, %addr, "registered broker"),
                Err(e) => tracing::warn!(broker = id, error = %e, "registering broker"),
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
        let Some(plan) = plan_meta_membership(&map, self.id, &voters, &nodes, joint) else {
            return;
        };
        for (id, addr) in plan.learners {
            let node = BasicNode { addr };
            match meta.add_learner(id, node, false).await {
                Ok(_) => tracing::info!(broker = id, "added broker as meta learner"),
                Err(e) => tracing::warn!(broker = id, error = %e, "adding meta learner"),
            }
        }
        match plan.voters {
            MetaVoters::Keep => {}
            MetaVoters::HandOff(to) => {
                if let Some(to) = to {
                    let _ = self.transfer_leader(META_GROUP, to).await;
                }
            }
            MetaVoters::Replace(desired) => {
                match meta.change_membership(desired.clone(), true).await {
                    Ok(_) => tracing::info!(voters = ?desired, "meta voters changed"),
                    Err(e) => tracing::warn!(error = %e, "changing meta voters"),
                }
            }
            MetaVoters::RemoveNodes(gone) => {
                match meta
                    .change_membership(ChangeMembers::RemoveNodes(gone.clone()), false)
                    .await
                {
                    Ok(_) => tracing::info!(brokers = ?gone, "removed brokers from the meta group"),
                    Err(e) => tracing::warn!(error = %e, "removing meta learners"),
                }
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
        let lease = self.lease();
        let reachable = |b: u64| self.pool.heard_from(b, lease);
        for (group, from, to) in plan_replica_moves(&map, self.id, reachable) {
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
        // Leader claims from every broker (highest term wins per group).
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
        let routes = futures::future::join_all(futs).await.into_iter().flatten();
        let (alive, claims) = merge_claims(routes.map(|(id, r)| (id, r.leading)));
        let now = Instant::now();
        let moves = plan_leadership(
            &map,
            &claims,
            &alive,
            self.id,
            |g| self.moves_in_flight.get(&g).map(|to| *to),
            reachable,
            |g| self.moved_at.get(&g).map(|t| *t),
            now,
        );
        for (group, from, to) in moves {
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
        match replica_change(self.id, &voters, &target) {
            ReplicaChange::HandOff(to) => {
                let to = to.ok_or_else(|| {
                    PetrelError::Unavailable(format!("group {group}: no staying voter"))
                })?;
                return self.transfer_leader(group, to).await;
            }
            ReplicaChange::Settle => {}
            ReplicaChange::Change { learners } => {
                for b in &learners {
                    let addr = addrs.get(b).cloned().ok_or_else(|| {
                        PetrelError::Unavailable(format!("no address for broker {b}"))
                    })?;
                    tracing::info!(group, broker = b, "adding learner");
                    tokio::time::timeout(
                        Duration::from_secs(120),
                        h.raft.add_learner(*b, BasicNode { addr }, true),
                    )
                    .await
                    .map_err(|_| {
                        PetrelError::Timeout(format!("group {group}: learner {b} catch-up"))
                    })?
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
}

/// Brokers in `--peers` the map does not know (and an operator did not
/// remove): the controller registers them. A registered broker's address
/// is changed by the broker itself (`--join`), never from `--peers`.
pub(super) fn unregistered_peers<'a>(
    map: &ClusterMap,
    peers: &'a BTreeMap<u64, String>,
) -> Vec<(u64, &'a str)> {
    peers
        .iter()
        .filter(|(id, _)| !map.brokers.contains_key(id) && !map.removed.contains(id))
        .map(|(id, addr)| (*id, addr.as_str()))
        .collect()
}

/// One round of meta-group membership, as `plan_meta_membership` decides it.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct MetaPlan {
    /// Registered brokers not yet in the meta group: they follow it as
    /// learners.
    pub learners: Vec<(u64, String)>,
    pub voters: MetaVoters,
}

/// What happens to the meta voters this round.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum MetaVoters {
    Keep,
    /// This leader is itself a voter that leaves (draining, removed): it
    /// hands the meta leadership to this healthy voter first (`None`: no
    /// such voter, it waits).
    HandOff(Option<u64>),
    /// Voters that leave are replaced by active brokers, up to three; the
    /// old ones stay as learners.
    Replace(BTreeSet<u64>),
    /// Removed brokers that are no longer voters leave the group entirely.
    RemoveNodes(BTreeSet<u64>),
}

/// The meta leader `me`'s membership decisions, given the map and the meta
/// group's `voters`, `nodes` (voters and learners) and whether a change is
/// under way (`joint`: then nothing, `None`).
pub(super) fn plan_meta_membership(
    map: &ClusterMap,
    me: u64,
    voters: &BTreeSet<u64>,
    nodes: &BTreeSet<u64>,
    joint: bool,
) -> Option<MetaPlan> {
    if joint {
        return None;
    }
    let learners = map
        .brokers
        .iter()
        .filter(|(id, _)| !nodes.contains(id))
        .map(|(id, addr)| (*id, addr.clone()))
        .collect();
    let bad = |b: &u64| map.draining.contains(b) || map.removed.contains(b);
    let voters = if voters.iter().any(bad) {
        let mut desired: BTreeSet<u64> = voters.iter().copied().filter(|b| !bad(b)).collect();
        for b in map.active_brokers() {
            if desired.len() >= 3 {
                break;
            }
            desired.insert(b);
        }
        if bad(&me) {
            MetaVoters::HandOff(voters.iter().find(|b| !bad(b) && **b != me).copied())
        } else if !desired.is_empty() {
            MetaVoters::Replace(desired)
        } else {
            MetaVoters::Keep
        }
    } else {
        let gone: BTreeSet<u64> = nodes
            .iter()
            .copied()
            .filter(|b| map.removed.contains(b) && !voters.contains(b))
            .collect();
        if gone.is_empty() {
            MetaVoters::Keep
        } else {
            MetaVoters::RemoveNodes(gone)
        }
    };
    Some(MetaPlan { learners, voters })
}

/// Replica moves `(group, from, to)` the controller starts this round:
/// none while `REPLICA_MOVES_IN_FLIGHT` groups still have retiring
/// replicas; else off draining brokers first (`ClusterMap::plan_drain`),
/// or when nothing drains, spread evenly (`plan_replica_balance`: a broker
/// that joined or came back receives its share). Only onto `me` or
/// brokers that are `reachable` (a registered broker that is not running
/// would hold the move until its timeout).
pub(super) fn plan_replica_moves(
    map: &ClusterMap,
    me: u64,
    reachable: impl Fn(u64) -> bool,
) -> Vec<(u64, u64, u64)> {
    let in_flight = map
        .topics
        .values()
        .flat_map(|t| &t.queues)
        .filter(|q| !q.retiring.is_empty())
        .count();
    if in_flight >= REPLICA_MOVES_IN_FLIGHT {
        return Vec::new();
    }
    let mut moves = map.plan_drain(REPLICA_MOVES_IN_FLIGHT - in_flight);
    if moves.is_empty() && map.draining.is_empty() {
        moves = map.plan_replica_balance(REPLICA_MOVES_IN_FLIGHT - in_flight);
    }
    moves.retain(|(_, _, to)| *to == me || reachable(*to));
    moves
}

/// The brokers that answered `Routes`, and per group the leader claim with
/// the highest term `(term, broker)` (on a tie, the first claim seen).
pub(super) fn merge_claims(
    routes: impl IntoIterator<Item = (u64, Vec<bpb::LeaderClaim>)>,
) -> (BTreeSet<u64>, BTreeMap<u64, (u64, u64)>) {
    let mut alive = BTreeSet::new();
    let mut claims: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
    for (id, leading) in routes {
        alive.insert(id);
        for c in leading {
            let e = claims.entry(c.group_id).or_insert((c.term, id));
            if c.term > e.0 {
                *e = (c.term, id);
            }
        }
    }
    (alive, claims)
}

/// Leadership moves `(group, from, to)` for this round, planned by
/// `meta::plan_leader_moves` over the queues with more than one replica and
/// none retiring. A move in flight (`in_flight`: group → target) counts as
/// done; a group moved less than `MOVE_DAMPING` ago (`moved_at`) counts
/// where it is but does not move. Eligible to lead: brokers that answered
/// `Routes` (`alive`), are not draining, and are `me` or `reachable` over
/// Raft (a broker cut off from its peers may still answer gRPC). Nothing
/// while some group has no known leader (elections in progress).
#[allow(clippy::too_many_arguments)]
pub(super) fn plan_leadership(
    map: &ClusterMap,
    claims: &BTreeMap<u64, (u64, u64)>,
    alive: &BTreeSet<u64>,
    me: u64,
    in_flight: impl Fn(u64) -> Option<u64>,
    reachable: impl Fn(u64) -> bool,
    moved_at: impl Fn(u64) -> Option<Instant>,
    now: Instant,
) -> Vec<(u64, u64, u64)> {
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
            leader: in_flight(q.group_id).or_else(|| claims.get(&q.group_id).map(|c| c.1)),
        })
        .collect();
    if groups.iter().any(|g| g.leader.is_none()) {
        // Elections in progress: the counts are not stable yet.
        return Vec::new();
    }
    let eligible: BTreeSet<u64> = alive
        .iter()
        .copied()
        .filter(|b| !map.draining.contains(b))
        .filter(|b| *b == me || reachable(*b))
        .collect();
    let groups: Vec<GroupLeadership> = groups
        .into_iter()
        .map(|mut g| {
            // A recently moved group counts where it is but does not move.
            if moved_at(g.group).is_some_and(|t| now.duration_since(t) < MOVE_DAMPING) {
                g.replicas = g.leader.into_iter().collect();
            }
            g
        })
        .collect();
    plan_leader_moves(&groups, &eligible, MOVES_PER_ROUND)
}

/// What the leader `me` of a queue group does to bring its Raft voters to
/// the map's `target` replicas.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum ReplicaChange {
    /// `me` is being moved off: it hands the group to a staying voter (the
    /// lowest id; `None`: no voter stays) and the new leader carries on.
    HandOff(Option<u64>),
    /// Bring these in as learners (caught up), make the target the
    /// voters, then report the move settled.
    Change { learners: Vec<u64> },
    /// Raft already has the target voters: report the move settled.
    Settle,
}

pub(super) fn replica_change(
    me: u64,
    voters: &BTreeSet<u64>,
    target: &BTreeSet<u64>,
) -> ReplicaChange {
    if !target.contains(&me) {
        return ReplicaChange::HandOff(target.iter().find(|b| voters.contains(b)).copied());
    }
    if voters != target {
        ReplicaChange::Change {
            learners: target.difference(voters).copied().collect(),
        }
    } else {
        ReplicaChange::Settle
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::TopicSpec;

    /// Brokers 1..=n, and one topic of `queues` queues with `rf` replicas.
    fn map(n: u64, queues: u32, rf: u32) -> ClusterMap {
        let mut m = ClusterMap::default();
        for b in 1..=n {
            m.register_broker(b, &format!("127.0.0.1:{b}")).unwrap();
        }
        let spec = TopicSpec {
            name: "t".into(),
            queue_count: queues,
            replication_factor: rf,
            message_type: 1,
            retention_ms: 0,
            retention_bytes: 0,
        };
        let p = m.place(queues, rf);
        m.create_topic(&spec, &p, 0).unwrap();
        m
    }

    fn set(v: &[u64]) -> BTreeSet<u64> {
        v.iter().copied().collect()
    }

    fn groups(m: &ClusterMap) -> Vec<u64> {
        m.topics["t"].queues.iter().map(|q| q.group_id).collect()
    }

    /// Every group claimed by `leader(group)` at term 1.
    fn claims(m: &ClusterMap, leader: impl Fn(u64) -> u64) -> BTreeMap<u64, (u64, u64)> {
        groups(m).into_iter().map(|g| (g, (1, leader(g)))).collect()
    }

    /// `plan_leadership` as the controller (broker 1) runs it, nothing in
    /// flight or damped, every alive broker reachable unless listed.
    fn leadership(
        m: &ClusterMap,
        claims: &BTreeMap<u64, (u64, u64)>,
        alive: &[u64],
        unreachable: &[u64],
    ) -> Vec<(u64, u64, u64)> {
        let now = Instant::now();
        let reachable = |b: u64| !unreachable.contains(&b);
        plan_leadership(
            m,
            claims,
            &set(alive),
            1,
            |_| None,
            reachable,
            |_| None,
            now,
        )
    }

    #[test]
    fn peers_the_map_does_not_know_are_registered_once() {
        let mut m = map(2, 1, 1);
        m.set_draining(2, true).unwrap();
        let peers: BTreeMap<u64, String> = (1..=4).map(|b| (b, format!("h{b}"))).collect();
        // 1 and 2 are registered (2 draining: still registered).
        assert_eq!(unregistered_peers(&m, &peers), vec![(3, "h3"), (4, "h4")]);
        // An operator removed 4 (it had been registered): not again.
        m.register_broker(4, "h4").unwrap();
        m.remove_broker(4).unwrap();
        assert_eq!(unregistered_peers(&m, &peers), vec![(3, "h3")]);
    }

    #[test]
    fn meta_voters_never_go_to_a_draining_broker() {
        // (draining, voters, leader, voter step)
        let cases: &[(&[u64], &[u64], u64, MetaVoters)] = &[
            (&[], &[1, 2, 3], 1, MetaVoters::Keep),
            // A draining voter is replaced by the lowest active broker.
            (&[2], &[1, 2, 3], 1, MetaVoters::Replace(set(&[1, 3, 4]))),
            (&[2, 4], &[1, 2, 3], 1, MetaVoters::Replace(set(&[1, 3, 5]))),
            // The leader itself drains: it hands over to a healthy voter.
            (&[1], &[1, 2, 3], 1, MetaVoters::HandOff(Some(2))),
            (&[1, 2], &[1, 2, 3], 1, MetaVoters::HandOff(Some(3))),
            // No healthy voter to hand to: it waits.
            (&[1], &[1], 1, MetaVoters::HandOff(None)),
            // Too few active brokers: fewer voters rather than a draining
            // one (a corner kept as it was).
            (&[2, 3, 4, 5], &[1, 2, 3], 1, MetaVoters::Replace(set(&[1]))),
        ];
        for (draining, voters, me, want) in cases {
            let mut m = map(5, 1, 1);
            for b in *draining {
                m.set_draining(*b, true).unwrap();
            }
            let nodes = set(&[1, 2, 3, 4, 5]);
            let plan = plan_meta_membership(&m, *me, &set(voters), &nodes, false).unwrap();
            assert_eq!(
                plan.voters, *want,
                "draining {draining:?} voters {voters:?}"
            );
            if let MetaVoters::Replace(d) = &plan.voters {
                assert!(d.iter().all(|b| !draining.contains(b)));
            }
        }
    }

    #[test]
    fn meta_learners_and_removed_brokers() {
        let mut m = map(5, 1, 1);
        // Broker 5 was a learner and is removed; 4 is not in the group yet.
        m.remove_broker(5).unwrap();
        let voters = set(&[1, 2, 3]);
        let plan = plan_meta_membership(&m, 1, &voters, &set(&[1, 2, 3, 5]), false).unwrap();
        assert_eq!(plan.learners, vec![(4, "127.0.0.1:4".to_string())]);
        assert_eq!(plan.voters, MetaVoters::RemoveNodes(set(&[5])));
        // A removed voter is replaced first; learners leave in a later round.
        let voters = set(&[1, 2, 5]);
        let plan = plan_meta_membership(&m, 1, &voters, &set(&[1, 2, 3, 4, 5]), false).unwrap();
        assert_eq!(plan.voters, MetaVoters::Replace(set(&[1, 2, 3])));
        // A membership change under way: nothing this round.
        assert_eq!(plan_meta_membership(&m, 1, &voters, &voters, true), None);
    }

    #[test]
    fn replicas_leave_a_draining_broker_only_for_reachable_active_ones() {
        let mut m = map(4, 6, 3);
        m.set_draining(1, true).unwrap();
        let hosted = m.groups_of(1).count();
        let moves = plan_replica_moves(&m, 2, |_| true);
        assert_eq!(moves.len(), hosted.min(REPLICA_MOVES_IN_FLIGHT));
        assert!(moves.iter().all(|(_, from, to)| *from == 1 && *to != 1));
        // Broker 4 does not answer: no move goes there. The controller
        // itself always counts as reachable.
        let moves = plan_replica_moves(&m, 2, |b| b != 4);
        assert!(moves.iter().all(|(_, _, to)| *to != 4), "{moves:?}");
        let moves = plan_replica_moves(&m, 4, |_| false);
        assert!(moves.iter().all(|(_, _, to)| *to == 4), "{moves:?}");
    }

    #[test]
    fn replica_moves_in_flight_are_bounded() {
        let mut m = map(4, 12, 3);
        m.set_draining(1, true).unwrap();
        let moves = plan_replica_moves(&m, 2, |_| true);
        assert_eq!(moves.len(), REPLICA_MOVES_IN_FLIGHT);
        for (g, from, to) in &moves[..REPLICA_MOVES_IN_FLIGHT - 1] {
            m.move_replica(*g, *from, *to).unwrap();
        }
        // Seven groups still retiring a replica: one more may start.
        assert_eq!(plan_replica_moves(&m, 2, |_| true).len(), 1);
        let (g, from, to) = moves[REPLICA_MOVES_IN_FLIGHT - 1];
        m.move_replica(g, from, to).unwrap();
        assert!(plan_replica_moves(&m, 2, |_| true).is_empty());
    }

    #[test]
    fn a_broker_that_joins_or_comes_back_gets_replicas_once_it_answers() {
        let mut m = map(3, 8, 3);
        assert!(plan_replica_moves(&m, 1, |_| true).is_empty());
        m.register_broker(4, "127.0.0.1:4").unwrap();
        assert!(plan_replica_moves(&m, 1, |b| b != 4).is_empty());
        let moves = plan_replica_moves(&m, 1, |_| true);
        assert!(!moves.is_empty());
        assert!(moves.iter().all(|(_, _, to)| *to == 4), "{moves:?}");
        // Nothing is spread while a broker drains.
        m.set_draining(4, true).unwrap();
        assert!(plan_replica_moves(&m, 1, |_| true).is_empty());
    }

    #[test]
    fn no_replica_move_without_a_candidate() {
        // Three replicas on three brokers, one draining: nowhere to go.
        let mut m = map(3, 4, 3);
        m.set_draining(3, true).unwrap();
        assert!(plan_replica_moves(&m, 1, |_| true).is_empty());
    }

    #[test]
    fn the_highest_term_claim_wins() {
        let claim = |group_id, term| bpb::LeaderClaim { group_id, term };
        let (alive, claims) = merge_claims([
            (1, vec![claim(10, 3), claim(11, 1)]),
            (2, vec![claim(10, 4)]),
            (3, vec![claim(11, 1)]),
            (4, vec![]),
        ]);
        assert_eq!(alive, set(&[1, 2, 3, 4]));
        // Group 10: the newer term; group 11: a stale tie keeps the first.
        assert_eq!(claims, BTreeMap::from([(10, (4, 2)), (11, (1, 1))]));
    }

    #[test]
    fn leaders_leave_draining_and_unreachable_brokers() {
        let mut m = map(3, 6, 3);
        let all_on_3 = claims(&m, |_| 3);
        // Broker 3 answers gRPC but not Raft (cut off): its leaderships go.
        let moves = leadership(&m, &all_on_3, &[1, 2, 3], &[3]);
        assert_eq!(moves.len(), 6, "{moves:?}");
        assert!(moves.iter().all(|(_, from, to)| *from == 3 && *to != 3));
        // Broker 3 drains: the same, and it never receives one.
        m.set_draining(3, true).unwrap();
        let moves = leadership(&m, &all_on_3, &[1, 2, 3], &[]);
        assert_eq!(moves.len(), 6, "{moves:?}");
        assert!(moves.iter().all(|(_, _, to)| *to != 3));
        let on_1 = claims(&m, |_| 1);
        assert!(leadership(&m, &on_1, &[1, 2, 3], &[])
            .iter()
            .all(|(_, _, to)| *to != 3));
    }

    #[test]
    fn a_broker_back_from_the_dead_gets_its_share() {
        let m = map(3, 6, 3);
        // Broker 3 was down: 1 and 2 lead everything.
        let c = claims(&m, |g| if g % 2 == 0 { 1 } else { 2 });
        // Still down (no Routes answer): nothing moves to it.
        assert!(leadership(&m, &c, &[1, 2], &[])
            .iter()
            .all(|(_, _, to)| *to != 3));
        // Back: it receives two leaderships (fair share of six on three).
        let moves = leadership(&m, &c, &[1, 2, 3], &[]);
        assert_eq!(
            moves.iter().filter(|(_, _, to)| *to == 3).count(),
            2,
            "{moves:?}"
        );
    }

    #[test]
    fn no_leadership_moves_while_a_group_has_no_leader_or_nobody_is_eligible() {
        let mut m = map(3, 6, 3);
        let mut c = claims(&m, |_| 1);
        c.remove(&groups(&m)[0]);
        assert!(leadership(&m, &c, &[1, 2, 3], &[]).is_empty());
        let c = claims(&m, |_| 1);
        assert!(leadership(&m, &c, &[], &[]).is_empty());
        for b in 1..=3 {
            m.set_draining(b, true).unwrap();
        }
        assert!(leadership(&m, &c, &[1, 2, 3], &[]).is_empty());
    }

    #[test]
    fn moves_in_flight_count_as_done_and_moved_groups_rest() {
        let m = map(3, 6, 3);
        let c = claims(&m, |_| 1);
        let gs = groups(&m);
        let now = Instant::now();
        let all = |b: u64| b > 0;
        // Every group being moved to its preferred leader already: balanced.
        let preferred: BTreeMap<u64, u64> = m.topics["t"]
            .queues
            .iter()
            .map(|q| (q.group_id, q.replicas[0]))
            .collect();
        let in_flight = |g: u64| preferred.get(&g).copied();
        let alive = set(&[1, 2, 3]);
        assert!(plan_leadership(&m, &c, &alive, 1, in_flight, all, |_| None, now).is_empty());
        // Every group moved 5 s ago: none moves yet; after 10 s they may.
        let moved = |_| Some(now - Duration::from_secs(5));
        assert!(plan_leadership(&m, &c, &alive, 1, |_| None, all, moved, now).is_empty());
        let moved = |_| Some(now - MOVE_DAMPING);
        let moves = plan_leadership(&m, &c, &alive, 1, |_| None, all, moved, now);
        assert!(!moves.is_empty());
        assert!(moves.iter().all(|(g, _, _)| gs.contains(g)));
    }

    #[test]
    fn groups_being_moved_or_unreplicated_do_not_hold_up_balancing() {
        let mut m = map(3, 6, 3);
        let c = claims(&m, |_| 1);
        let gs = groups(&m);
        // Group 0 is retiring a replica and has no leader claim: skipped.
        let from = m.topics["t"].queues[0].replicas[1];
        m.register_broker(4, "127.0.0.1:4").unwrap();
        m.move_replica(gs[0], from, 4).unwrap();
        let mut c2 = c.clone();
        c2.remove(&gs[0]);
        let moves = leadership(&m, &c2, &[1, 2, 3], &[]);
        assert!(!moves.is_empty());
        assert!(moves.iter().all(|(g, _, _)| *g != gs[0]));
    }

    #[test]
    fn a_leader_moved_off_hands_over_to_a_staying_voter() {
        // (me, voters, target, change)
        let cases: &[(u64, &[u64], &[u64], ReplicaChange)] = &[
            (1, &[1, 2, 3], &[1, 2, 3], ReplicaChange::Settle),
            (
                1,
                &[1, 2, 3],
                &[1, 2, 4],
                ReplicaChange::Change { learners: vec![4] },
            ),
            // Shrinking (a joint config left over): no learner to add.
            (
                1,
                &[1, 2, 3, 4],
                &[1, 2, 3],
                ReplicaChange::Change { learners: vec![] },
            ),
            (1, &[1, 2, 3], &[2, 3, 4], ReplicaChange::HandOff(Some(2))),
            (1, &[1, 2, 3], &[4, 3, 5], ReplicaChange::HandOff(Some(3))),
            // No voter stays: nobody to hand to.
            (1, &[1, 2, 3], &[4, 5, 6], ReplicaChange::HandOff(None)),
        ];
        for (me, voters, target, want) in cases {
            assert_eq!(
                replica_change(*me, &set(voters), &set(target)),
                *want,
                "voters {voters:?} target {target:?}"
            );
        }
    }
}
