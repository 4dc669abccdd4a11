//! Consuming through a group: `Receive` (sweeping the queues, long-polling
//! with wake-ups from the brokers), `Ack`, `Nack` and
//! `ChangeInvisibleDuration` on receipt handles, and storing the dead
//! letters a pop or nack hands back in the group's dead-letter topic.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use petrel_proto::pb;
use petrel_proto::pb::broker as bpb;
use petrel_proto::receipt::Receipt;
use petrel_proto::record::RecordData;
use petrel_proto::{validate, MessageId, PetrelError};
use tokio::sync::mpsc;
use tonic::{Request, Response};

use super::{client_key, hash_of, scopeguard, Inner, ReceiveStream, MAX_RECEIVE_MESSAGES, R};
use crate::auth::{Action, Principal, Resource};

/// Retry budget for one queue within one receive sweep.
const SWEEP_QUEUE_BUDGET: Duration = Duration::from_secs(1);
/// Target size of one message of a receive stream.
const RECEIVE_CHUNK_BYTES: usize = 8 << 20;
const MIN_INVISIBLE_MS: u64 = 100;
const MAX_INVISIBLE_MS: u64 = 12 * 3600 * 1000;
/// Poll interval bounds while a receive long-polls an empty topic.
const POLL_MIN: Duration = Duration::from_millis(10);
const POLL_MAX: Duration = Duration::from_millis(100);

pub(super) async fn receive(s: &Arc<Inner>, req: Request<pb::ReceiveRequest>) -> R<ReceiveStream> {
    let s = s.clone();
    let (who, _call) = Inner::enter(
        &s,
        &req,
        &[
            (Resource::Topic(&req.get_ref().topic), Action::Subscribe),
            (Resource::Group(&req.get_ref().group), Action::Subscribe),
        ],
    )?;
    let client = client_key(&who, &req);
    let slot = Inner::receive_slot(&s, client)?;
    let peer = req.remote_addr();
    let mut req = req.into_inner();
    validate::group_name(&req.group)?;
    if req.max_messages == 0 || req.max_messages > MAX_RECEIVE_MESSAGES {
        return Err(PetrelError::InvalidArgument(format!(
            "max_messages must be 1..={MAX_RECEIVE_MESSAGES}"
        ))
        .into());
    }
    if !(MIN_INVISIBLE_MS..=MAX_INVISIBLE_MS).contains(&req.invisible_duration_ms) {
        return Err(PetrelError::InvalidArgument(format!(
            "invisible_duration_ms must be {MIN_INVISIBLE_MS}..={MAX_INVISIBLE_MS}"
        ))
        .into());
    }
    if let Some(f) = &req.filter {
        let kind = match pb::FilterType::try_from(f.r#type) {
            Ok(pb::FilterType::Sql) => petrel_proto::filter::FilterKind::Sql,
            Ok(_) => petrel_proto::filter::FilterKind::Tag,
            Err(_) => {
                return Err(
                    PetrelError::InvalidFilter(format!("unknown filter type {}", f.r#type)).into(),
                )
            }
        };
        petrel_proto::filter::Filter::parse(kind, &f.expression)
            .map_err(|e| PetrelError::InvalidFilter(e.to_string()))?;
    }
    // Receive rate limits: refused when a bucket is empty, else the
    // ask shrinks to what the emptiest holds.
    let user = match &who {
        Principal::User(u) => Some(&**u),
        Principal::Anonymous => None,
    };
    let allowance =
        s.limiter
            .admit_receive(&req.group, user, peer.map(|a| a.ip()), req.max_messages)?;
    req.max_messages = allowance.max.max(1);
    let t = s.topic(&req.topic).await?;
    let wait = Duration::from_millis(req.wait_ms).min(s.config.max_wait);
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        let _slot = slot;
        let open = metrics::gauge!("petrel_proxy_open_streams");
        open.increment(1.0);
        let _close = scopeguard(move || open.decrement(1.0));
        let deadline = Instant::now() + wait;
        let mut poll = POLL_MIN;
        // Each queue's version at its last pop, and the queues the last
        // wake-up named (only those are popped again: the others have
        // not changed since they answered empty).
        let mut known: HashMap<u64, u64> = HashMap::new();
        let mut only: Option<Vec<u64>> = None;
        loop {
            let versions = match s.sweep(&t, &req, only.as_deref()).await {
                Ok((records, _)) if !records.is_empty() => {
                    s.limiter.received(&allowance, records.len() as u64);
                    // Several stream messages when the records are big,
                    // so no single message nears the gRPC size limit.
                    let mut chunk = Vec::new();
                    let mut bytes = 0usize;
                    for r in records {
                        let size = r.body.len() + r.key.len() + 256;
                        if !chunk.is_empty() && bytes + size > RECEIVE_CHUNK_BYTES {
                            let _ = tx
                                .send(Ok(pb::ReceiveResponse {
                                    records: std::mem::take(&mut chunk),
                                }))
                                .await;
                            bytes = 0;
                        }
                        bytes += size;
                        chunk.push(r);
                    }
                    let _ = tx.send(Ok(pb::ReceiveResponse { records: chunk })).await;
                    return;
                }
                Ok((_, v)) => v,
                Err(e) => {
                    let _ = tx.send(Err(e.to_status())).await;
                    return;
                }
            };
            if Instant::now() >= deadline || tx.is_closed() || s.draining.load(Ordering::Acquire) {
                return;
            }
            // Every queue answered: wait to be woken by a change
            // (within a millisecond of the commit), not by a timer.
            // Otherwise (a queue without a reachable leader) poll.
            if only.is_none() {
                known.clear();
            }
            known.extend(versions);
            only = None;
            if known.len() == t.queues.len() {
                let versions: Vec<(u64, u64)> = known.iter().map(|(g, v)| (*g, *v)).collect();
                if let Some(ready) = s.wait_ready(&req.group, &versions, deadline).await {
                    poll = POLL_MIN;
                    only = (!ready.is_empty()).then_some(ready);
                    continue;
                }
            }
            if Instant::now() + poll > deadline {
                return;
            }
            tokio::time::sleep(poll).await;
            poll = (poll * 2).min(POLL_MAX);
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    Ok(Response::new(Box::pin(stream)))
}

pub(super) async fn ack(s: &Arc<Inner>, req: Request<pb::AckRequest>) -> R<pb::AckResponse> {
    let _call = Inner::enter(
        s,
        &req,
        &[
            (Resource::Topic(&req.get_ref().topic), Action::Subscribe),
            (Resource::Group(&req.get_ref().group), Action::Subscribe),
        ],
    )?;
    let req = req.into_inner();
    validate::topic_name(&req.topic)?;
    validate::group_name(&req.group)?;
    if req.receipt_handles.is_empty() || req.receipt_handles.len() > MAX_RECEIVE_MESSAGES as usize {
        return Err(PetrelError::InvalidArgument(format!(
            "ack needs 1..={MAX_RECEIVE_MESSAGES} receipt handles"
        ))
        .into());
    }
    let mut results = vec![pb::Status::default(); req.receipt_handles.len()];
    let mut by_group: BTreeMap<u64, Vec<(usize, Receipt)>> = BTreeMap::new();
    let decoded = s.receipts.decode_many(
        req.receipt_handles.iter().map(|h| h.as_str()),
        &req.topic,
        &req.group,
    );
    for (i, r) in decoded.into_iter().enumerate() {
        match r {
            Ok(r) => by_group.entry(r.group_id).or_default().push((i, r)),
            Err(e) => {
                let d = e.to_detail();
                results[i] = pb::Status {
                    code: d.code,
                    message: d.message,
                };
            }
        }
    }
    let futs = by_group.into_iter().map(|(g, items)| {
        let group = req.group.clone();
        async move {
            let breq = bpb::BrokerAckRequest {
                group_id: g,
                consumer_group: group,
                leases: items
                    .iter()
                    .map(|(_, r)| bpb::LeaseRef {
                        offset: r.offset,
                        lease_id: r.lease_id,
                    })
                    .collect(),
            };
            let r = s
                .on_leader(g, |_, _, mut c| {
                    let breq = breq.clone();
                    async move {
                        c.ack(breq)
                            .await
                            .map(|r| r.into_inner())
                            .map_err(|s| PetrelError::from_status(&s))
                    }
                })
                .await;
            (items, r)
        }
    });
    for (items, r) in futures::future::join_all(futs).await {
        match r {
            Ok(resp) => {
                for ((i, _), st) in items.iter().zip(resp.results) {
                    results[*i] = st;
                }
            }
            Err(e) => {
                let d = e.to_detail();
                for (i, _) in items {
                    results[i] = pb::Status {
                        code: d.code,
                        message: d.message.clone(),
                    };
                }
            }
        }
    }
    Ok(Response::new(pb::AckResponse { results }))
}

pub(super) async fn nack(s: &Arc<Inner>, req: Request<pb::NackRequest>) -> R<pb::NackResponse> {
    let _call = Inner::enter(
        s,
        &req,
        &[
            (Resource::Topic(&req.get_ref().topic), Action::Subscribe),
            (Resource::Group(&req.get_ref().group), Action::Subscribe),
        ],
    )?;
    let req = req.into_inner();
    validate::topic_name(&req.topic)?;
    validate::group_name(&req.group)?;
    let r = s
        .receipts
        .decode(&req.receipt_handle, &req.topic, &req.group)?;
    let breq = bpb::BrokerNackRequest {
        group_id: r.group_id,
        consumer_group: req.group.clone(),
        lease: Some(bpb::LeaseRef {
            offset: r.offset,
            lease_id: r.lease_id,
        }),
        reason: req.reason,
        dead_letter: req.dead_letter,
    };
    let resp = s
        .on_leader(r.group_id, |_, _, mut c| {
            let breq = breq.clone();
            async move {
                c.nack(breq)
                    .await
                    .map(|r| r.into_inner())
                    .map_err(|s| PetrelError::from_status(&s))
            }
        })
        .await?;
    // The record is out of the group once the broker answers; storing
    // it in the dead-letter topic now (rather than with the group's
    // next receive) puts it there by the time the caller moves on. On
    // failure it stays pending and the next receive stores it.
    if !resp.dead_letters.is_empty() {
        if let Err(e) = s
            .ship_dead_letters(
                &req.topic,
                r.queue,
                r.group_id,
                &req.group,
                resp.dead_letters,
            )
            .await
        {
            tracing::warn!(topic = %req.topic, queue = r.queue, error = %e, "storing dead letters");
        }
    }
    Ok(Response::new(pb::NackResponse {
        redeliver_at_ms: resp.redeliver_at_ms,
    }))
}

pub(super) async fn change_invisible_duration(
    s: &Arc<Inner>,
    req: Request<pb::ChangeInvisibleDurationRequest>,
) -> R<pb::ChangeInvisibleDurationResponse> {
    let _call = Inner::enter(
        s,
        &req,
        &[
            (Resource::Topic(&req.get_ref().topic), Action::Subscribe),
            (Resource::Group(&req.get_ref().group), Action::Subscribe),
        ],
    )?;
    let req = req.into_inner();
    validate::topic_name(&req.topic)?;
    validate::group_name(&req.group)?;
    if !(MIN_INVISIBLE_MS..=MAX_INVISIBLE_MS).contains(&req.invisible_duration_ms) {
        return Err(PetrelError::InvalidArgument(format!(
            "invisible_duration_ms must be {MIN_INVISIBLE_MS}..={MAX_INVISIBLE_MS}"
        ))
        .into());
    }
    let r = s
        .receipts
        .decode(&req.receipt_handle, &req.topic, &req.group)?;
    let breq = bpb::BrokerChangeInvisibleRequest {
        group_id: r.group_id,
        consumer_group: req.group.clone(),
        lease: Some(bpb::LeaseRef {
            offset: r.offset,
            lease_id: r.lease_id,
        }),
        invisible_duration_ms: req.invisible_duration_ms,
    };
    let resp = s
        .on_leader(r.group_id, |_, _, mut c| {
            let breq = breq.clone();
            async move {
                c.change_invisible(breq)
                    .await
                    .map(|r| r.into_inner())
                    .map_err(|s| PetrelError::from_status(&s))
            }
        })
        .await?;
    let handle = s.receipts.encode(
        &Receipt {
            lease_id: resp.lease_id,
            deadline_ms: resp.deadline_ms,
            ..r
        },
        &req.topic,
        &req.group,
    );
    Ok(Response::new(pb::ChangeInvisibleDurationResponse {
        receipt_handle: handle,
        invisible_until_ms: resp.deadline_ms,
    }))
}

impl Inner {
    /// Stores a queue's dead letters in the consumer group's dead-letter
    /// topic (created on demand), then tells the queue they are stored.
    /// Idempotent: each is appended with a producer id and sequence that
    /// name it, so a retry after a crash stores it once.
    async fn ship_dead_letters(
        &self,
        topic: &str,
        queue: u32,
        source_group: u64,
        consumer_group: &str,
        dead: Vec<bpb::DeadLetter>,
    ) -> Result<(), PetrelError> {
        let dlq_name = validate::dead_letter_topic(consumer_group);
        let dlq = match self.topic(&dlq_name).await {
            Ok(t) => t,
            Err(PetrelError::NotFound(_)) => {
                let brokers = self.router.table().brokers.len().max(1) as u32;
                let cfg = pb::TopicConfig {
                    name: dlq_name.clone(),
                    queue_count: 1,
                    replication_factor: brokers.min(3),
                    message_type: pb::MessageType::Normal as i32,
                    retention_ms: 0,
                    retention_bytes: 0,
                };
                match self
                    .meta_write(bpb::meta_write_request::Op::CreateTopic(cfg))
                    .await
                {
                    Ok(_) | Err(PetrelError::AlreadyExists(_)) => {}
                    Err(e) => return Err(e),
                }
                self.topic(&dlq_name).await?
            }
            Err(e) => return Err(e),
        };
        let target = dlq
            .queues
            .first()
            .ok_or_else(|| PetrelError::Unavailable("dead-letter topic has no queue".into()))?
            .group_id;
        let mut messages = Vec::with_capacity(dead.len());
        let mut offsets = Vec::with_capacity(dead.len());
        for d in &dead {
            let original = MessageId {
                topic: topic.to_string(),
                queue,
                offset: d.offset,
            }
            .to_string();
            let mut m = match RecordData::decode(&d.encoded) {
                Ok(r) => pb::Message {
                    key: r.key,
                    tag: r.tag,
                    properties: r.properties.into_iter().collect(),
                    body: r.body,
                    born_timestamp_ms: r.born_timestamp_ms,
                    ..Default::default()
                },
                // Unreadable (corrupt or removed): still recorded, without
                // its body, so the group does not hold it forever.
                Err(e) => pb::Message {
                    properties: [("petrel.dlq.unreadable".to_string(), e.to_string())].into(),
                    ..Default::default()
                },
            };
            m.sequence = d.offset + 1;
            for (k, v) in [
                ("petrel.dlq.original_id", original),
                ("petrel.dlq.original_topic", topic.to_string()),
                ("petrel.dlq.group", consumer_group.to_string()),
                ("petrel.dlq.attempts", d.attempts.to_string()),
                ("petrel.dlq.reason", d.reason.clone()),
            ] {
                m.properties.insert(k.to_string(), v);
            }
            messages.push(m);
            offsets.push(d.offset);
        }
        let producer_id = format!(
            "petrel-dlq-{:016x}",
            hash_of(&[consumer_group.as_bytes(), &source_group.to_le_bytes()])
        );
        self.append(
            target,
            bpb::AppendRecords {
                group_id: target,
                producer_id,
                messages,
            },
        )
        .await?;
        let req = bpb::DeadLetteredRequest {
            group_id: source_group,
            consumer_group: consumer_group.to_string(),
            offsets,
        };
        self.on_leader(source_group, |_, _, mut c| {
            let req = req.clone();
            async move {
                c.dead_lettered(req)
                    .await
                    .map(|_| ())
                    .map_err(|s| PetrelError::from_status(&s))
            }
        })
        .await
    }

    /// One pass over the topic's queues, leasing up to `max` records.
    /// Also returns, per queue that answered, its version at the pop (for
    /// `wait_ready`).
    /// Pops the topic's queues in turn (only those in `only`, when given:
    /// the ones a wake-up named) until `max` records.
    async fn sweep(
        &self,
        t: &bpb::TopicRoute,
        req: &pb::ReceiveRequest,
        only: Option<&[u64]>,
    ) -> Result<(Vec<pb::Record>, Vec<(u64, u64)>), PetrelError> {
        let mut versions = Vec::with_capacity(t.queues.len());
        let (group, max) = (req.group.as_str(), req.max_messages);
        let topic = t
            .config
            .as_ref()
            .map(|c| c.name.clone())
            .unwrap_or_default();
        let n = t.queues.len();
        let start = self.rr.fetch_add(1, Ordering::Relaxed) as usize;
        let mut out = Vec::new();
        let mut last_err = None;
        for i in 0..n {
            if out.len() >= max as usize {
                break;
            }
            let q = &t.queues[(start + i) % n];
            if only.is_some_and(|o| !o.contains(&q.group_id)) {
                continue;
            }
            let want = max - out.len() as u32;
            let preq = bpb::PopRequest {
                group_id: q.group_id,
                consumer_group: group.to_string(),
                max_messages: want,
                invisible_duration_ms: req.invisible_duration_ms,
                filter: req.filter.clone(),
                retry: req.retry,
            };
            // A queue without a reachable leader is skipped for this sweep
            // rather than holding up the whole receive.
            let res = self
                .on_leader_within(q.group_id, SWEEP_QUEUE_BUDGET, |_, _, mut c| {
                    let req = preq.clone();
                    async move {
                        c.pop(req)
                            .await
                            .map(|r| r.into_inner())
                            .map_err(|s| PetrelError::from_status(&s))
                    }
                })
                .await;
            match res {
                Ok(resp) => {
                    // A queue with dead letters to move is polled, not
                    // waited on: its pops write (and move its version)
                    // until the dead-letter topic has them.
                    if resp.dead_letters.is_empty() {
                        versions.push((q.group_id, resp.queue_version));
                    }
                    if !resp.dead_letters.is_empty() {
                        let n = resp.dead_letters.len();
                        match self
                            .ship_dead_letters(
                                &topic,
                                q.queue,
                                q.group_id,
                                group,
                                resp.dead_letters,
                            )
                            .await
                        {
                            Ok(()) => {
                                tracing::info!(topic = %topic, queue = q.queue, group, n, "dead-lettered")
                            }
                            // Kept by the queue; the next receive retries.
                            Err(e) => {
                                tracing::warn!(topic = %topic, queue = q.queue, error = %e, "storing dead letters")
                            }
                        }
                    }
                    let mut signer = self.receipts.signer(&topic, group);
                    for l in resp.records {
                        let mut rec = match self.to_record(&topic, q.queue, l.offset, &l.encoded) {
                            Ok(r) => r,
                            Err(e) => {
                                last_err = Some(e);
                                continue;
                            }
                        };
                        rec.attempt = l.attempt;
                        rec.invisible_until_ms = l.deadline_ms;
                        rec.receipt_handle = signer.sign(&Receipt {
                            group_id: q.group_id,
                            queue: q.queue,
                            offset: l.offset,
                            lease_id: l.lease_id,
                            deadline_ms: l.deadline_ms,
                        });
                        out.push(rec);
                    }
                }
                Err(e) => {
                    tracing::debug!(topic = %topic, queue = q.queue, error = %e, "pop failed");
                    last_err = Some(e);
                }
            }
        }
        if out.is_empty() {
            if let Some(e) = last_err {
                if !e.is_retryable() {
                    return Err(e);
                }
            }
        }
        Ok((out, versions))
    }

    /// After a sweep found nothing: waits until one of the queues changed
    /// since its pop (an append, a release, an ack that unblocks a FIFO
    /// group), a lease expires, or `until`. One `WaitReady` per leader,
    /// all at once; the first answer ends the wait. Returns the queues that
    /// answer named as ready (empty: look at every queue), or `None` when
    /// the brokers could not be asked (the caller falls back to a short
    /// sleep).
    async fn wait_ready(
        &self,
        group: &str,
        versions: &[(u64, u64)],
        until: Instant,
    ) -> Option<Vec<u64>> {
        let wait_ms = until.saturating_duration_since(Instant::now()).as_millis() as u64;
        if wait_ms == 0 {
            return Some(Vec::new());
        }
        let mut by_leader: HashMap<String, Vec<bpb::WaitQueue>> = HashMap::new();
        for (g, v) in versions {
            let (_, addr) = self.router.leader_addr(*g)?;
            by_leader.entry(addr).or_default().push(bpb::WaitQueue {
                group_id: *g,
                consumer_group: group.to_string(),
                known_version: *v,
            });
        }
        let calls: Vec<_> = by_leader
            .into_iter()
            .filter_map(|(addr, queues)| {
                let mut c = self.router.channels.client(&addr).ok()?;
                Some(Box::pin(async move {
                    let mut r = tonic::Request::new(bpb::WaitReadyRequest { queues, wait_ms });
                    r.set_timeout(Duration::from_millis(wait_ms) + Duration::from_secs(2));
                    c.wait_ready(r).await.ok().map(|r| r.into_inner().ready)
                }))
            })
            .collect();
        if calls.is_empty() {
            return None;
        }
        tokio::select! {
            (answered, _, _) = futures::future::select_all(calls) => answered,
            _ = tokio::time::sleep_until(until.into()) => Some(Vec::new()),
            _ = self.shutdown.cancelled() => Some(Vec::new()),
        }
    }
}
