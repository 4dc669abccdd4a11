//! The cluster map held by the meta group, and the controller's placement
//! decisions, as plain data and pure functions.
//!
//! # Invariants
//! - Group ids are allocated by applying `CreateTopic`/`UpdateTopic`, from a
//!   counter in the map, so every replica agrees on them and none is reused.
//! - The first replica of a queue is its preferred leader; placement spreads
//!   replicas and preferred leaders evenly over registered brokers.

use std::collections::BTreeMap;

use petrel_proto::pb;
use serde::{Deserialize, Serialize};

use crate::types::{ApplyError, META_GROUP};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicSpec {
    pub name: String,
    pub queue_count: u32,
    pub replication_factor: u32,
    /// `pb::MessageType` as i32.
    pub message_type: i32,
    pub retention_ms: u64,
    pub retention_bytes: u64,
}

impl TopicSpec {
    pub fn to_pb(&self) -> pb::TopicConfig {
        pb::TopicConfig {
            name: self.name.clone(),
            queue_count: self.queue_count,
            replication_factor: self.replication_factor,
            message_type: self.message_type,
            retention_ms: self.retention_ms,
            retention_bytes: self.retention_bytes,
        }
    }
}

/// Replicas of one queue; `replicas[0]` is the preferred leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuePlacement {
    pub replicas: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueAssignment {
    pub queue: u32,
    pub group_id: u64,
    pub replicas: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topic {
    pub spec: TopicSpec,
    pub queues: Vec<QueueAssignment>,
    pub created_ms: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMap {
    /// Bumped by every applied change.
    pub version: u64,
    pub brokers: BTreeMap<u64, String>,
    pub topics: BTreeMap<String, Topic>,
    /// Next queue group id to hand out (group 0 is the meta group).
    pub next_group_id: u64,
}

impl ClusterMap {
    /// Queue groups with `broker` among their replicas.
    pub fn groups_of(&self, broker: u64) -> impl Iterator<Item = (&Topic, &QueueAssignment)> {
        self.topics.values().flat_map(move |t| {
            t.queues
                .iter()
                .filter(move |q| q.replicas.contains(&broker))
                .map(move |q| (t, q))
        })
    }

    pub fn assignment(&self, group: u64) -> Option<(&Topic, &QueueAssignment)> {
        self.topics
            .values()
            .flat_map(|t| t.queues.iter().map(move |q| (t, q)))
            .find(|(_, q)| q.group_id == group)
    }

    pub fn register_broker(&mut self, id: u64, address: &str) -> Result<u64, ApplyError> {
        if id == 0 {
            return Err(ApplyError::InvalidArgument(
                "broker id 0 is reserved".into(),
            ));
        }
        self.brokers.insert(id, address.to_string());
        self.version += 1;
        Ok(self.version)
    }

    pub fn create_topic(
        &mut self,
        spec: &TopicSpec,
        placements: &[QueuePlacement],
        now_ms: i64,
    ) -> Result<u64, ApplyError> {
        if self.topics.contains_key(&spec.name) {
            return Err(ApplyError::AlreadyExists(format!(
                "topic {:?} already exists",
                spec.name
            )));
        }
        if placements.len() != spec.queue_count as usize {
            return Err(ApplyError::InvalidArgument(
                "placement count mismatch".into(),
            ));
        }
        let queues = self.assign(0, placements);
        self.topics.insert(
            spec.name.clone(),
            Topic {
                spec: spec.clone(),
                queues,
                created_ms: now_ms,
            },
        );
        self.version += 1;
        Ok(self.version)
    }

    fn assign(&mut self, first_queue: u32, placements: &[QueuePlacement]) -> Vec<QueueAssignment> {
        let mut out = Vec::with_capacity(placements.len());
        for (i, p) in placements.iter().enumerate() {
            self.next_group_id = self.next_group_id.max(META_GROUP + 1);
            out.push(QueueAssignment {
                queue: first_queue + i as u32,
                group_id: self.next_group_id,
                replicas: p.replicas.clone(),
            });
            self.next_group_id += 1;
        }
        out
    }

    pub fn update_topic(
        &mut self,
        name: &str,
        retention_ms: Option<u64>,
        retention_bytes: Option<u64>,
        target_queue_count: u32,
        add: &[QueuePlacement],
    ) -> Result<u64, ApplyError> {
        let Some(t) = self.topics.get(name) else {
            return Err(ApplyError::NotFound(format!(
                "topic {name:?} does not exist"
            )));
        };
        let first = t.queues.len() as u32;
        let need = (target_queue_count.saturating_sub(first) as usize).min(add.len());
        let new = self.assign(first, &add[..need]);
        let t = self.topics.get_mut(name).expect("checked above");
        t.queues.extend(new);
        t.spec.queue_count = t.queues.len() as u32;
        if let Some(r) = retention_ms {
            t.spec.retention_ms = r;
        }
        if let Some(r) = retention_bytes {
            t.spec.retention_bytes = r;
        }
        self.version += 1;
        Ok(self.version)
    }

    pub fn delete_topic(&mut self, name: &str) -> Result<u64, ApplyError> {
        if self.topics.remove(name).is_none() {
            return Err(ApplyError::NotFound(format!(
                "topic {name:?} does not exist"
            )));
        }
        self.version += 1;
        Ok(self.version)
    }

    /// Chooses replicas for `count` new queues: each queue's replicas are the
    /// brokers with the fewest replicas so far (ties: fewest preferred
    /// leaderships, then lowest id), and its preferred leader is the chosen
    /// broker with the fewest preferred leaderships.
    pub fn place(&self, count: u32, rf: u32) -> Vec<QueuePlacement> {
        let mut replicas: BTreeMap<u64, u64> = self.brokers.keys().map(|b| (*b, 0)).collect();
        let mut leaders = replicas.clone();
        for t in self.topics.values() {
            for q in &t.queues {
                for (i, b) in q.replicas.iter().enumerate() {
                    if let Some(n) = replicas.get_mut(b) {
                        *n += 1;
                    }
                    if i == 0 {
                        if let Some(n) = leaders.get_mut(b) {
                            *n += 1;
                        }
                    }
                }
            }
        }
        let mut out = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let mut cands: Vec<u64> = replicas.keys().copied().collect();
            cands.sort_by_key(|b| (replicas[b], leaders[b], *b));
            let mut chosen: Vec<u64> = cands.into_iter().take(rf as usize).collect();
            chosen.sort_by_key(|b| (leaders[b], replicas[b], *b));
            for b in &chosen {
                *replicas.get_mut(b).expect("candidate") += 1;
            }
            *leaders.get_mut(&chosen[0]).expect("candidate") += 1;
            out.push(QueuePlacement { replicas: chosen });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(brokers: u64) -> ClusterMap {
        let mut m = ClusterMap::default();
        for b in 1..=brokers {
            m.register_broker(b, &format!("127.0.0.1:{b}")).unwrap();
        }
        m
    }

    fn spec(name: &str, q: u32, rf: u32) -> TopicSpec {
        TopicSpec {
            name: name.into(),
            queue_count: q,
            replication_factor: rf,
            message_type: 1,
            retention_ms: 0,
            retention_bytes: 0,
        }
    }

    #[test]
    fn placement_spreads_replicas_and_leaders_evenly() {
        let mut m = map(3);
        let p = m.place(8, 3);
        m.create_topic(&spec("a", 8, 3), &p, 0).unwrap();
        let p = m.place(7, 1);
        m.create_topic(&spec("b", 7, 1), &p, 0).unwrap();
        let mut leaders = BTreeMap::new();
        let mut replicas = BTreeMap::new();
        for (_, q) in m
            .topics
            .values()
            .flat_map(|t| t.queues.iter().map(move |q| (t, q)))
        {
            *leaders.entry(q.replicas[0]).or_insert(0) += 1;
            for r in &q.replicas {
                *replicas.entry(*r).or_insert(0) += 1;
            }
            let mut uniq = q.replicas.clone();
            uniq.dedup();
            assert_eq!(uniq.len(), q.replicas.len());
        }
        let (min, max) = (
            leaders.values().min().unwrap(),
            leaders.values().max().unwrap(),
        );
        assert!(max - min <= 1, "{leaders:?}");
        let (min, max) = (
            replicas.values().min().unwrap(),
            replicas.values().max().unwrap(),
        );
        assert!(max - min <= 1, "{replicas:?}");
    }

    #[test]
    fn group_ids_are_unique_and_never_reused() {
        let mut m = map(3);
        let p = m.place(2, 1);
        m.create_topic(&spec("a", 2, 1), &p, 0).unwrap();
        m.delete_topic("a").unwrap();
        m.create_topic(&spec("a", 2, 1), &p, 0).unwrap();
        let ids: Vec<u64> = m.topics["a"].queues.iter().map(|q| q.group_id).collect();
        assert_eq!(ids, vec![3, 4]);
        assert!(m.create_topic(&spec("a", 2, 1), &p, 0).is_err());
        let add = m.place(1, 1);
        m.update_topic("a", Some(5), None, 3, &add).unwrap();
        assert_eq!(m.topics["a"].queues[2].group_id, 5);
        assert_eq!(m.topics["a"].spec.queue_count, 3);
        // Applying the same update again (a retry) adds nothing.
        m.update_topic("a", Some(5), None, 3, &add).unwrap();
        assert_eq!(m.topics["a"].queues.len(), 3);
    }
}
