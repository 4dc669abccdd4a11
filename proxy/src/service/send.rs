//! `Send`: checks a batch, picks each message's queue (by message group,
//! key, or producer and sequence) and appends the parts to their queues'
//! leaders at once.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use petrel_proto::pb;
use petrel_proto::pb::broker as bpb;
use petrel_proto::{validate, MessageId, PetrelError};
use tonic::{Request, Response};

use super::{hash_of, Inner, R};
use crate::auth::{Action, Principal, Resource};

/// Producer ids Petrel's own sends use (dead letters); clients may not.
const SYSTEM_PRODUCER_PREFIX: &str = "petrel-";

/// Consecutive sequences of one producer that go to the same queue.
pub const SPREAD_STRIPE: u64 = 16;

/// The queue of an unkeyed record: a producer's records go round robin over
/// the queues in stripes of [`SPREAD_STRIPE`] consecutive sequences,
/// starting at a queue chosen by its id. A pure function of (producer,
/// sequence), so a retried request lands where it first did; and any window
/// of W consecutive records of a producer puts W/n ± `SPREAD_STRIPE` in each
/// of n queues, whatever the batch sizes (a batch that crosses a stripe is
/// split, and the parts travel together in the per-leader append).
pub fn unkeyed_queue(producer_hash: u64, sequence: u64, queues: u64) -> u64 {
    (producer_hash % queues + (sequence / SPREAD_STRIPE) % queues) % queues
}

pub(super) async fn send(s: &Arc<Inner>, req: Request<pb::SendRequest>) -> R<pb::SendResponse> {
    let (who, _call) = Inner::enter(
        s,
        &req,
        &[(Resource::Topic(&req.get_ref().topic), Action::Publish)],
    )?;
    let peer = req.remote_addr();
    let mut req = req.into_inner();
    validate::producer_id(&req.producer_id)?;
    if req.producer_id.starts_with(SYSTEM_PRODUCER_PREFIX) {
        return Err(PetrelError::InvalidArgument(format!(
            "producer ids starting with {SYSTEM_PRODUCER_PREFIX:?} are reserved for Petrel itself"
        ))
        .into());
    }
    if req.messages.is_empty() {
        return Err(PetrelError::InvalidArgument("send request has no messages".into()).into());
    }
    if req.messages.len() > s.config.max_batch_messages {
        return Err(PetrelError::TooLarge(format!(
            "{} messages in one request, the limit is {}",
            req.messages.len(),
            s.config.max_batch_messages
        ))
        .into());
    }
    for (i, m) in req.messages.iter().enumerate() {
        validate::message(m, s.config.max_record_bytes).map_err(|e| match e {
            PetrelError::TooLarge(m) => PetrelError::TooLarge(format!("message {i}: {m}")),
            PetrelError::InvalidArgument(m) => {
                PetrelError::InvalidArgument(format!("message {i}: {m}"))
            }
            e => e,
        })?;
    }
    let t = s.topic(&req.topic).await?;
    s.limiter.admit(
        &req.topic,
        &req.producer_id,
        peer.map(|a| a.ip()),
        req.messages.len() as u64,
    )?;
    // A user's producer ids are its own: de-duplication windows (and
    // the stored producer id) are keyed by `USER:ID`, so no client can
    // poison another's sequences.
    if let Principal::User(u) = &who {
        if !req.producer_id.is_empty() {
            req.producer_id = format!("{u}:{}", req.producer_id);
            validate::producer_id(&req.producer_id)?;
        }
    }
    let n = t.queues.len() as u64;
    if n == 0 {
        return Err(PetrelError::Unavailable("topic has no queues".into()).into());
    }
    let mt = t
        .config
        .as_ref()
        .and_then(|c| pb::MessageType::try_from(c.message_type).ok())
        .unwrap_or(pb::MessageType::Normal);
    let now = petrel_proto::now_ms();
    for (i, m) in req.messages.iter().enumerate() {
        validate::message_type_fit(m, mt, now).map_err(|e| match e {
            PetrelError::WrongMessageType(m) => {
                PetrelError::WrongMessageType(format!("message {i}: {m}"))
            }
            PetrelError::InvalidArgument(m) => {
                PetrelError::InvalidArgument(format!("message {i}: {m}"))
            }
            e => e,
        })?;
    }
    // Queue choice is a pure function of the request, so a retried
    // request (same producer id and sequences) lands where it did.
    // Without a producer id (no de-duplication, so no retry to match)
    // requests go round robin.
    let rr = if req.producer_id.is_empty() {
        Some(s.rr.fetch_add(1, Ordering::Relaxed) % n)
    } else {
        None
    };
    let producer_hash = hash_of(&[req.producer_id.as_bytes()]);
    let mut parts: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for (i, m) in req.messages.iter().enumerate() {
        // A FIFO message group pins its records to one queue, whatever
        // their keys; otherwise the key does.
        let q = if !m.message_group.is_empty() {
            hash_of(&[m.message_group.as_bytes()]) % n
        } else if m.key.is_empty() {
            rr.unwrap_or_else(|| unkeyed_queue(producer_hash, m.sequence, n))
        } else {
            hash_of(&[m.key.as_bytes()]) % n
        };
        parts.entry(t.queues[q as usize].queue).or_default().push(i);
    }
    let mut messages: Vec<Option<pb::Message>> = req.messages.into_iter().map(Some).collect();
    let futs = parts.into_iter().map(|(queue, idx)| {
        let group = Inner::group_of(&t, queue);
        let msgs: Vec<pb::Message> = idx
            .iter()
            .map(|i| {
                let mut m = messages[*i].take().unwrap_or_default();
                if m.born_timestamp_ms == 0 {
                    m.born_timestamp_ms = now;
                }
                m
            })
            .collect();
        let producer_id = req.producer_id.clone();
        async move {
            let group = group?;
            let recs = bpb::AppendRecords {
                group_id: group,
                producer_id,
                messages: msgs,
            };
            let (offsets, dups) = s.append(group, recs).await?;
            if offsets.len() != idx.len() {
                return Err(PetrelError::Internal(
                    "broker returned a short offset list".into(),
                ));
            }
            Ok::<_, PetrelError>((queue, idx, offsets, dups))
        }
    });
    let done = futures::future::join_all(futs).await;
    let total: usize = messages.len();
    let mut results = vec![pb::SendResult::default(); total];
    for part in done {
        let (queue, idx, offsets, dups) = part?;
        for (k, i) in idx.into_iter().enumerate() {
            results[i] = pb::SendResult {
                message_id: MessageId {
                    topic: req.topic.clone(),
                    queue,
                    offset: offsets[k],
                }
                .to_string(),
                queue,
                offset: offsets[k],
                duplicate: dups.get(k).copied().unwrap_or(false),
            };
        }
    }
    Ok(Response::new(pb::SendResponse { results }))
}

#[cfg(test)]
mod spread_tests {
    use super::*;

    /// Any window of a few thousand records of one producer is spread
    /// within a stripe of even, whatever the batch size, and the queue of a
    /// record depends only on (producer, sequence).
    #[test]
    fn unkeyed_records_spread_evenly_for_any_batch_size() {
        for queues in [1u64, 3, 8, 12] {
            for batch in [1u64, 7, 16, 100, 128, 1000] {
                let h = hash_of(&[b"producer-1"]);
                let mut counts = vec![0u64; queues as usize];
                let mut seq = 1;
                while seq <= 4000 {
                    for s in seq..(seq + batch).min(4001) {
                        counts[unkeyed_queue(h, s, queues) as usize] += 1;
                    }
                    seq += batch;
                }
                let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
                assert!(
                    max - min <= 2 * SPREAD_STRIPE,
                    "{queues} queues, batch {batch}: {counts:?}"
                );
            }
        }
        assert_eq!(unkeyed_queue(7, 35, 8), unkeyed_queue(7, 35, 8));
    }
}
