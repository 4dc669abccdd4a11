//! Administration: creating, changing, listing and deleting topics,
//! describing and deleting consumer groups, and describing and changing
//! the cluster (through meta writes).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use petrel_proto::pb;
use petrel_proto::pb::broker as bpb;
use petrel_proto::{validate, PetrelError};
use tonic::{Request, Response};

use super::{Inner, R};
use crate::auth::{Action, Resource};

pub(super) async fn create_topic(
    s: &Arc<Inner>,
    req: Request<pb::CreateTopicRequest>,
) -> R<pb::TopicInfo> {
    let name = req
        .get_ref()
        .config
        .as_ref()
        .map(|c| c.name.as_str())
        .unwrap_or("");
    let _call = Inner::enter(s, &req, &[(Resource::Topic(name), Action::Create)])?;
    let cfg = req
        .into_inner()
        .config
        .ok_or_else(|| PetrelError::InvalidArgument("missing topic config".into()))?;
    validate::topic_name(&cfg.name)?;
    let resp = s
        .meta_write(bpb::meta_write_request::Op::CreateTopic(cfg))
        .await?;
    let route = resp
        .topic
        .ok_or_else(|| PetrelError::Internal("meta write returned no topic".into()))?;
    Ok(Response::new(s.topic_info(&route).await))
}

pub(super) async fn update_topic(
    s: &Arc<Inner>,
    req: Request<pb::UpdateTopicRequest>,
) -> R<pb::TopicInfo> {
    let _call = Inner::enter(
        s,
        &req,
        &[(Resource::Topic(&req.get_ref().name), Action::Update)],
    )?;
    let r = req.into_inner();
    validate::topic_name(&r.name)?;
    let resp = s
        .meta_write(bpb::meta_write_request::Op::UpdateTopic(bpb::UpdateTopic {
            name: r.name,
            queue_count: r.queue_count,
            retention_ms: r.retention_ms,
            retention_bytes: r.retention_bytes,
        }))
        .await?;
    let route = resp
        .topic
        .ok_or_else(|| PetrelError::Internal("meta write returned no topic".into()))?;
    Ok(Response::new(s.topic_info(&route).await))
}

pub(super) async fn delete_topic(
    s: &Arc<Inner>,
    req: Request<pb::DeleteTopicRequest>,
) -> R<pb::DeleteTopicResponse> {
    let _call = Inner::enter(
        s,
        &req,
        &[(Resource::Topic(&req.get_ref().name), Action::Delete)],
    )?;
    let name = req.into_inner().name;
    validate::topic_name(&name)?;
    s.meta_write(bpb::meta_write_request::Op::DeleteTopic(name))
        .await?;
    Ok(Response::new(pb::DeleteTopicResponse {}))
}

pub(super) async fn list_topics(
    s: &Arc<Inner>,
    req: Request<pb::ListTopicsRequest>,
) -> R<pb::ListTopicsResponse> {
    let (who, _call) = Inner::enter(s, &req, &[])?;
    let peer = req.remote_addr();
    s.router.refresh_now().await;
    s.ready().await?;
    let table = s.router.table();
    // Only the topics the caller may describe.
    let mut names: Vec<&String> = table
        .topics
        .keys()
        .filter(|n| {
            s.auth
                .permits(&who, peer, Resource::Topic(n), Action::Describe)
        })
        .collect();
    names.sort();
    let mut topics = Vec::with_capacity(names.len());
    for n in names {
        topics.push(s.topic_info(&table.topics[n]).await);
    }
    Ok(Response::new(pb::ListTopicsResponse { topics }))
}

pub(super) async fn describe_topic(
    s: &Arc<Inner>,
    req: Request<pb::DescribeTopicRequest>,
) -> R<pb::TopicInfo> {
    let _call = Inner::enter(
        s,
        &req,
        &[(Resource::Topic(&req.get_ref().name), Action::Describe)],
    )?;
    let t = s.topic(&req.into_inner().name).await?;
    Ok(Response::new(s.topic_info(&t).await))
}

pub(super) async fn list_groups(
    s: &Arc<Inner>,
    req: Request<pb::ListGroupsRequest>,
) -> R<pb::ListGroupsResponse> {
    let (who, _call) = Inner::enter(s, &req, &[])?;
    let peer = req.remote_addr();
    let table = s.router.table();
    let mut groups: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (name, t) in table.topics.iter() {
        let stats = s
            .stats(t.queues.iter().map(|q| q.group_id).collect(), "")
            .await;
        for st in stats.values().flatten() {
            for c in &st.consumer_groups {
                groups
                    .entry(c.name.clone())
                    .or_default()
                    .insert(name.clone());
            }
        }
    }
    // Only the groups the caller may describe.
    groups.retain(|g, _| {
        s.auth
            .permits(&who, peer, Resource::Group(g), Action::Describe)
    });
    Ok(Response::new(pb::ListGroupsResponse {
        groups: groups
            .into_iter()
            .map(|(name, topics)| pb::GroupSummary {
                name,
                topics: topics.into_iter().collect(),
            })
            .collect(),
    }))
}

pub(super) async fn describe_group(
    s: &Arc<Inner>,
    req: Request<pb::DescribeGroupRequest>,
) -> R<pb::DescribeGroupResponse> {
    let _call = Inner::enter(
        s,
        &req,
        &[(Resource::Group(&req.get_ref().group), Action::Describe)],
    )?;
    let group = req.into_inner().group;
    validate::group_name(&group)?;
    let table = s.router.table();
    let mut names: Vec<&String> = table.topics.keys().collect();
    names.sort();
    let mut queues = Vec::new();
    for name in names {
        let t = &table.topics[name];
        let stats = s
            .stats(t.queues.iter().map(|q| q.group_id).collect(), &group)
            .await;
        let member = stats
            .values()
            .flatten()
            .any(|st| st.consumer_groups.iter().any(|c| c.name == group));
        if !member {
            continue;
        }
        // A group that consumes a topic is shown on all its queues; a
        // queue it never received from counts from the queue's start.
        for q in &t.queues {
            let Some(Ok(st)) = stats.get(&q.group_id) else {
                continue;
            };
            let c = st
                .consumer_groups
                .iter()
                .find(|c| c.name == group)
                .cloned()
                .unwrap_or(bpb::ConsumerGroupStats {
                    committed_offset: st.start_offset,
                    lag_ms: st.start_age_ms,
                    ..Default::default()
                });
            let (committed, inflight, skipped) = (c.committed_offset, c.inflight, c.skipped);
            queues.push(pb::GroupQueueState {
                topic: name.clone(),
                queue: q.queue,
                committed_offset: committed,
                end_offset: st.end_offset,
                lag: st.end_offset.saturating_sub(committed),
                inflight,
                skipped,
                dead_lettered: c.dead_lettered,
                filtered: c.filtered,
                scheduled: c.scheduled,
                uncommitted: c.uncommitted,
                lag_ms: c.lag_ms,
            });
        }
    }
    if queues.is_empty() {
        return Err(PetrelError::NotFound(format!(
            "consumer group {group:?} has no state on any queue"
        ))
        .into());
    }
    Ok(Response::new(pb::DescribeGroupResponse { group, queues }))
}

pub(super) async fn delete_group(
    s: &Arc<Inner>,
    req: Request<pb::DeleteGroupRequest>,
) -> R<pb::DeleteGroupResponse> {
    let _call = Inner::enter(
        s,
        &req,
        &[(Resource::Group(&req.get_ref().group), Action::Delete)],
    )?;
    let req = req.into_inner();
    validate::group_name(&req.group)?;
    if !req.topic.is_empty() {
        s.topic(&req.topic).await?; // not_found for an unknown topic
    }
    let table = s.router.table();
    let mut names: Vec<&String> = table
        .topics
        .keys()
        .filter(|n| req.topic.is_empty() || **n == req.topic)
        .collect();
    names.sort();
    let mut topics = Vec::new();
    let mut queues = 0u32;
    for name in names {
        let t = &table.topics[name];
        let deletes = t.queues.iter().map(|q| {
            let breq = bpb::BrokerDeleteConsumerRequest {
                group_id: q.group_id,
                consumer_group: req.group.clone(),
            };
            s.on_leader(q.group_id, move |_, _, mut c| {
                let breq = breq.clone();
                async move {
                    c.delete_consumer(breq)
                        .await
                        .map(|r| r.into_inner().existed)
                        .map_err(|s| PetrelError::from_status(&s))
                }
            })
        });
        // Every queue must answer: a queue left out would keep the
        // group's position there.
        let mut here = 0;
        for r in futures::future::join_all(deletes).await {
            here += u32::from(r?);
        }
        if here > 0 {
            topics.push(name.clone());
            queues += here;
        }
    }
    tracing::info!(group = %req.group, topics = ?topics, queues, "consumer group deleted");
    Ok(Response::new(pb::DeleteGroupResponse { topics, queues }))
}

pub(super) async fn describe_cluster(
    s: &Arc<Inner>,
    req: Request<pb::DescribeClusterRequest>,
) -> R<pb::ClusterInfo> {
    let _call = Inner::enter(s, &req, &[(Resource::Cluster, Action::Describe)])?;
    s.router.refresh_now().await;
    let t = s.router.table();
    let mut leaders: HashMap<u64, u32> = HashMap::new();
    for (b, _) in t.leaders.values() {
        *leaders.entry(*b).or_default() += 1;
    }
    let mut replicas: HashMap<u64, u32> = HashMap::new();
    let mut queue_count = 0;
    for tr in t.topics.values() {
        for q in &tr.queues {
            queue_count += 1;
            // Retiring replicas still hold data until the move settles.
            for r in q.replicas.iter().chain(&q.retiring) {
                *replicas.entry(*r).or_default() += 1;
            }
        }
    }
    let mut brokers: Vec<pb::BrokerInfo> = t
        .brokers
        .iter()
        .map(|(id, a)| pb::BrokerInfo {
            id: *id,
            address: a.clone(),
            reachable: t.reachable.get(id).copied().unwrap_or(false),
            leader_count: leaders.get(id).copied().unwrap_or(0),
            replica_count: replicas.get(id).copied().unwrap_or(0),
            state: if t.draining.contains(id) {
                "draining".into()
            } else {
                "active".into()
            },
            meta_voter: t.meta_voters.contains(id),
        })
        .collect();
    brokers.sort_by_key(|b| b.id);
    Ok(Response::new(pb::ClusterInfo {
        brokers,
        meta_leader: t.meta_leader,
        topic_count: t.topics.len() as u32,
        queue_count,
        map_version: t.map_version,
    }))
}

pub(super) async fn admin_cluster(
    s: &Arc<Inner>,
    req: Request<pb::AdminClusterRequest>,
) -> R<pb::AdminClusterResponse> {
    use bpb::meta_write_request::Op as M;
    use pb::admin_cluster_request::Op as A;
    let _call = Inner::enter(s, &req, &[(Resource::Cluster, Action::Admin)])?;
    let op = match req.into_inner().op {
        None => return Err(PetrelError::InvalidArgument("empty admin request".into()).into()),
        Some(A::AddBroker(b)) => M::RegisterBroker(bpb::BrokerAddress {
            id: b.id,
            address: b.address,
            draining: false,
            // Only the broker itself may move its own address.
            self_register: false,
        }),
        Some(A::DrainBroker(id)) => M::DrainBroker(id),
        Some(A::UndrainBroker(id)) => M::UndrainBroker(id),
        Some(A::RemoveBroker(id)) => M::RemoveBroker(id),
        Some(A::Rebalance(_)) => M::Rebalance(true),
    };
    let r = s.meta_write(op).await?;
    s.router.poke();
    Ok(Response::new(pb::AdminClusterResponse {
        map_version: r.map_version,
        moves: r.moves,
    }))
}

impl Inner {
    async fn topic_info(&self, t: &bpb::TopicRoute) -> pb::TopicInfo {
        // Offsets only; the consumer groups that come along are ignored.
        let stats = self
            .stats(t.queues.iter().map(|q| q.group_id).collect(), "")
            .await;
        let table = self.router.table();
        pb::TopicInfo {
            config: t.config.clone(),
            queues: t
                .queues
                .iter()
                .map(|q| {
                    let s = stats.get(&q.group_id).and_then(|r| r.as_ref().ok());
                    pb::QueueInfo {
                        queue: q.queue,
                        group_id: q.group_id,
                        replicas: q.replicas.clone(),
                        leader: table.leaders.get(&q.group_id).map(|x| x.0).unwrap_or(0),
                        start_offset: s.map(|s| s.start_offset).unwrap_or(0),
                        end_offset: s.map(|s| s.end_offset).unwrap_or(0),
                    }
                })
                .collect(),
        }
    }
}
