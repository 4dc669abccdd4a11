//! Finding messages: `GetMessage` by Petrel's id or by the id a RocketMQ
//! client gave it, and `FindMessages` by key.

use std::sync::Arc;

use petrel_proto::pb;
use petrel_proto::pb::broker as bpb;
use petrel_proto::{validate, MessageId, PetrelError};
use tonic::{Request, Response, Status};

use super::{Inner, R};
use crate::auth::{Action, Principal, Resource};

/// Most bytes of records one FindMessages answer carries.
const FIND_MAX_BYTES: usize = 16 << 20;

/// Whether a string that is not a Petrel message id may be a RocketMQ
/// client's: every RocketMQ client makes hexadecimal ids (32 digits, or 34
/// with the "01" version prefix of 5.x).
fn is_client_message_id(s: &str) -> bool {
    (16..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

pub(super) async fn get_message(
    s: &Arc<Inner>,
    req: Request<pb::GetMessageRequest>,
) -> R<pb::GetMessageResponse> {
    let (who, _call) = Inner::enter(s, &req, &[])?;
    let peer = req.remote_addr();
    let req = req.into_inner();
    let id: MessageId = match req.message_id.parse() {
        Ok(id) => id,
        // Resolved to Petrel's id, then looked up like one.
        Err(_) if is_client_message_id(&req.message_id) => {
            s.find_by_client_id(&who, peer, &req).await?
        }
        Err(_) => {
            return Err(PetrelError::InvalidArgument(format!(
                "malformed message id {:?}: expected TOPIC/QUEUE/OFFSET (Petrel's) \
                 or the hexadecimal id a RocketMQ client gave the message",
                req.message_id
            ))
            .into())
        }
    };
    s.auth
        .permit(&who, peer, Resource::Topic(&id.topic), Action::Describe)?;
    let t = s.topic(&id.topic).await?;
    let group = Inner::group_of(&t, id.queue)?;
    let breq = bpb::LookupRequest {
        group_id: group,
        offset: id.offset,
    };
    let resp = s
        .on_leader(group, |_, _, mut c| async move {
            c.lookup(breq)
                .await
                .map(|r| r.into_inner())
                .map_err(|s| PetrelError::from_status(&s))
        })
        .await?;
    let record = s.to_record(&id.topic, id.queue, id.offset, &resp.encoded)?;
    Ok(Response::new(pb::GetMessageResponse {
        record: Some(record),
        hold: resp.hold,
        deliveries: resp.deliveries,
    }))
}

pub(super) async fn find_messages(
    s: &Arc<Inner>,
    req: Request<pb::FindMessagesRequest>,
) -> R<pb::FindMessagesResponse> {
    let _call = Inner::enter(
        s,
        &req,
        &[(Resource::Topic(&req.get_ref().topic), Action::Describe)],
    )?;
    let req = req.into_inner();
    if req.key.is_empty() || req.key.len() > validate::MAX_KEY_LEN {
        return Err(PetrelError::InvalidArgument(format!(
            "key must be 1..={} bytes",
            validate::MAX_KEY_LEN
        ))
        .into());
    }
    let max = if req.max == 0 { 100 } else { req.max.min(1000) };
    let t = s.topic(&req.topic).await?;
    // Every queue: a key's records stay where they were stored when
    // the topic's queue count changed since.
    let futs = t.queues.iter().map(|q| {
        let breq = bpb::FindByKeyRequest {
            group_id: q.group_id,
            key: req.key.clone(),
            max,
            client_id: false,
        };
        async move {
            let r = s
                .on_leader(q.group_id, |_, _, mut c| {
                    let breq = breq.clone();
                    async move {
                        c.find_by_key(breq)
                            .await
                            .map(|r| r.into_inner())
                            .map_err(|s| PetrelError::from_status(&s))
                    }
                })
                .await;
            (q.queue, r)
        }
    });
    let mut records = Vec::new();
    for (queue, r) in futures::future::join_all(futs).await {
        for sr in r?.records {
            records.push(s.to_record(&req.topic, queue, sr.offset, &sr.encoded)?);
        }
    }
    records.sort_by_key(|r| (r.store_timestamp_ms, r.queue, r.offset));
    records.truncate(max as usize);
    // Every queue answered up to its byte bound; the merged answer
    // keeps to one bound too (at least one record), oldest first.
    let mut bytes = 0usize;
    let keep = records
        .iter()
        .take_while(|r| {
            let first = bytes == 0;
            bytes += r.body.len() + r.key.len() + 256;
            first || bytes <= FIND_MAX_BYTES
        })
        .count();
    records.truncate(keep);
    Ok(Response::new(pb::FindMessagesResponse { records }))
}

impl Inner {
    /// `message get` by the id a RocketMQ client gave a message (indexed
    /// by the brokers from property `petrel.rmq.id`): every queue of
    /// `req.topic`, or of every topic the caller may describe when it is
    /// empty, a few queues at a time. The oldest match wins; its Petrel id
    /// is returned.
    async fn find_by_client_id(
        &self,
        who: &Principal,
        peer: Option<std::net::SocketAddr>,
        req: &pb::GetMessageRequest,
    ) -> Result<MessageId, Status> {
        use futures::StreamExt;
        let topics: Vec<bpb::TopicRoute> = if req.topic.is_empty() {
            let table = self.router.table();
            let mut all: Vec<_> = table
                .topics
                .values()
                .filter(|t| {
                    let name = t.config.as_ref().map(|c| c.name.as_str()).unwrap_or("");
                    self.auth
                        .permit(who, peer, Resource::Topic(name), Action::Describe)
                        .is_ok()
                })
                .cloned()
                .collect();
            all.sort_by(|a, b| {
                a.config
                    .as_ref()
                    .map(|c| &c.name)
                    .cmp(&b.config.as_ref().map(|c| &c.name))
            });
            all
        } else {
            self.auth
                .permit(who, peer, Resource::Topic(&req.topic), Action::Describe)?;
            vec![self.topic(&req.topic).await?]
        };
        let id = &req.message_id;
        let mut lookups: Vec<(String, u32, u64)> = Vec::new();
        for t in &topics {
            let name = t
                .config
                .as_ref()
                .map(|c| c.name.clone())
                .unwrap_or_default();
            for q in &t.queues {
                lookups.push((name.clone(), q.queue, q.group_id));
            }
        }
        let found: Vec<(String, u32, Result<bpb::FindByKeyResponse, PetrelError>)> =
            futures::stream::iter(lookups)
                .map(|(topic, queue, group)| async move {
                    let breq = bpb::FindByKeyRequest {
                        group_id: group,
                        key: id.clone(),
                        max: 1,
                        client_id: true,
                    };
                    let r = self
                        .on_leader(group, |_, _, mut c| {
                            let breq = breq.clone();
                            async move {
                                c.find_by_key(breq)
                                    .await
                                    .map(|r| r.into_inner())
                                    .map_err(|s| PetrelError::from_status(&s))
                            }
                        })
                        .await;
                    (topic, queue, r)
                })
                .buffer_unordered(16)
                .collect()
                .await;
        // A queue that cannot answer (no leader for a moment) does not
        // hide a match elsewhere; its error is reported only if nothing
        // matched.
        let mut best: Option<(i64, MessageId)> = None;
        let mut failed = None;
        for (topic, queue, r) in found {
            let r = match r {
                Ok(r) => r,
                Err(e) => {
                    failed.get_or_insert(e);
                    continue;
                }
            };
            for sr in r.records {
                let at = petrel_proto::record::store_timestamp_ms(&sr.encoded).unwrap_or(i64::MAX);
                if best.as_ref().is_none_or(|(b, _)| at < *b) {
                    let id = MessageId {
                        topic: topic.clone(),
                        queue,
                        offset: sr.offset,
                    };
                    best = Some((at, id));
                }
            }
        }
        let Some((_, found)) = best else {
            if let Some(e) = failed {
                return Err(e.into());
            }
            let scope = if req.topic.is_empty() {
                "any topic you may describe".to_string()
            } else {
                format!("topic {:?}", req.topic)
            };
            return Err(PetrelError::NotFound(format!(
                "no message in {scope} has the RocketMQ message id {id:?}"
            ))
            .into());
        };
        Ok(found)
    }
}
