//! The consumer calls of `BrokerData`: receive (pop), wait-ready, ack, nack,
//! invisibility changes, offset commits, dead-letter reports and group
//! deletion. They run on the leader's in-memory served state and are made
//! durable by the queue's checkpoint lane, whose writer task lives here.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use petrel_proto::pb;
use petrel_proto::pb::broker as bpb;
use petrel_proto::record::RecordData;
use petrel_proto::{validate, PetrelError};
use tonic::{Request, Response as TResponse};

use super::{Service, POP_MAX_BYTES, R};
use crate::queue::{Changes, PopParams, RecordView, RetryPolicy};
use crate::types::{Command, Response};

/// Longest nack reason kept (longer ones are cut).
const MAX_REASON: usize = 512;
/// Most queues one `WaitReady` watches.
const MAX_WAIT_QUEUES: usize = 4096;
/// Longest `WaitReady`.
const MAX_WAIT_MS: u64 = 60_000;

impl Service {
    /// Runs `f` on the consumer groups this leader serves in `term` (see
    /// `queue::Serving`) and records the consumer ops it took for the next
    /// checkpoint (starting a writer if none runs). Returns `f`'s result
    /// and the lane's sequence number covering everything the served state
    /// now holds (wait on it to make the call durable).
    ///
    /// A receive (`wakes` false) cannot make a record deliverable for
    /// anyone; waiting receives only re-check their lease timers.
    pub(super) fn consumer_change<T>(
        &self,
        group: u64,
        q: &Arc<crate::sm::QueueShared>,
        term: u64,
        wakes: bool,
        f: impl FnOnce(&mut crate::queue::QueueState, &mut Changes) -> T,
    ) -> Result<(T, u64), PetrelError> {
        let mut ch = Changes::default();
        let mut st = q.write();
        let out = st.serve(term, |st| f(st, &mut ch)).map_err(|_| {
            PetrelError::Unavailable(format!(
                "group {group}: leadership moved on while the call was under way; retry"
            ))
        })?;
        let changed = !ch.ops.is_empty();
        let (seq, start) = q.lane.record(ch.ops, term);
        if changed && wakes {
            q.touched(&st);
        }
        drop(st);
        if changed {
            q.changed.notify_waiters();
        }
        if start {
            self.spawn_checkpoint_writer(group, q.clone(), term);
        }
        Ok((out, seq))
    }

    /// `limit_exceeded` when `consumer` would be a group beyond the cap on
    /// queue `group` (checked by the calls that create group state).
    pub(super) fn check_group_cap(
        &self,
        group: u64,
        q: &crate::sm::QueueShared,
        consumer: &str,
    ) -> Result<(), PetrelError> {
        let max = self.node.config.max_consumer_groups;
        if !q.read().over_group_cap(consumer, max) {
            return Ok(());
        }
        metrics::counter!("petrel_broker_limit_refusals_total", "limit" => "consumer_groups")
            .increment(1);
        Err(PetrelError::LimitExceeded(format!(
            "topic {:?} queue group {group} already has {max} consumer groups \
             (--max-consumer-groups); delete unused ones with `petrel group delete`",
            self.topic_name_of(group)
        )))
    }

    /// Proposes the lane's checkpoints of `term` one at a time until it is
    /// empty.
    ///
    /// A checkpoint that fails while this broker still leads the queue in
    /// `term` is proposed again (the same ops; applied twice in a row they
    /// change nothing more) before anything after it: the served state
    /// already holds its ops, so a later checkpoint must never commit
    /// without it (replicas would then miss, say, FIFO records a scan
    /// passed over). Once the term is over, every op still waiting fails,
    /// and the served state that took them is dropped.
    fn spawn_checkpoint_writer(&self, group: u64, q: Arc<crate::sm::QueueShared>, term: u64) {
        let node = self.node.clone();
        tokio::spawn(async move {
            while let Some((hi, cp)) = q.lane.take(term) {
                let mut backoff = std::time::Duration::from_millis(20);
                loop {
                    let r = match node.ensure_leader(group) {
                        Ok(h) => node
                            .write(group, &h, Command::Checkpoint(cp.clone()))
                            .await
                            .and_then(Response::into_done),
                        Err(e) => Err(e),
                    };
                    let still = || {
                        node.ensure_leader(group)
                            .ok()
                            .and_then(|h| node.consumer_term(group, &h).ok())
                            == Some(term)
                    };
                    match r {
                        Err(e) if still() => {
                            tracing::warn!(group, error = %e, "checkpoint failed; proposing it again");
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(std::time::Duration::from_secs(1));
                        }
                        Err(e) => {
                            // The term is over (or a fatal error): this
                            // writer ends here, before a new one may start
                            // on what `abandon` leaves.
                            q.lane.settle(term, hi, Err(e.clone()));
                            q.lane.abandon(term, e);
                            return;
                        }
                        Ok(()) => {
                            q.lane.settle(term, hi, Ok(()));
                            break;
                        }
                    }
                }
            }
        });
    }

    pub(super) async fn handle_pop(&self, req: Request<bpb::PopRequest>) -> R<bpb::PopResponse> {
        let req = req.into_inner();
        let group = req.group_id;
        validate::group_name(&req.consumer_group)?;
        let filter = match &req.filter {
            Some(f) if !f.expression.trim().is_empty() && f.expression.trim() != "*" => {
                Some(crate::sm::compile_filter(f.r#type, &f.expression)?)
            }
            _ => None,
        };
        let policy = match &req.retry {
            Some(r) => {
                RetryPolicy::with_defaults(r.max_attempts, r.initial_backoff_ms, r.max_backoff_ms)
            }
            None => RetryPolicy::default(),
        };
        let fifo = self.message_type_of(group) == pb::MessageType::Fifo;
        let (q, term) = self.consumer_queue(group)?;
        // Read before the pop: a change that lands while it runs (an
        // append) then still wakes the caller's WaitReady (at worst one
        // extra, empty pop, which writes nothing).
        let queue_version = q.version();
        let now = petrel_proto::now_ms();
        if req.max_messages == 0 || !q.read().has_deliverable(&req.consumer_group, now) {
            return Ok(TResponse::new(bpb::PopResponse {
                queue_version,
                ..Default::default()
            }));
        }
        self.check_group_cap(group, &q, &req.consumer_group)?;
        // Size the pop by bytes so one response stays well under the
        // message limit however large the records are (at least one). The
        // records read here (immutable per offset) are reused below, so each
        // is read and CRC-checked once.
        let candidates =
            q.read()
                .pop_candidates(&req.consumer_group, req.max_messages.min(1024), now);
        let mut fetched: HashMap<u64, Result<Bytes, PetrelError>> = self
            .read_records(group, &candidates, POP_MAX_BYTES)
            .into_iter()
            .collect();
        let n = fetched.len() as u32;
        let consumer = req.consumer_group.clone();
        let p = PopParams {
            max: n.max(1),
            now_ms: now,
            invisible_ms: req.invisible_duration_ms,
            filter: filter.as_ref(),
            fifo,
            policy,
        };
        // Leases are taken in this leader's memory; the next checkpoint
        // carries them to the replicas, batched with every other receive
        // and ack of the queue meanwhile. The records are answered once it
        // commits (their bytes are read meanwhile), so a failover never
        // hands out again, as a first delivery, a record a consumer has.
        let lease_id = q.next_lease_id(term);
        let (outcome, seq) = self.consumer_change(group, &q, term, false, |st, ch| {
            let mut view = |off: u64| {
                let bytes = match fetched.get(&off) {
                    Some(Ok(b)) => b.clone(),
                    _ => self.read_record(group, off).ok()?,
                };
                let r = RecordData::decode(&bytes).ok()?;
                Some(RecordView {
                    tag: r.tag,
                    properties: r.properties,
                    message_group: r.message_group,
                })
            };
            st.pop(&consumer, p, lease_id, &mut view, ch)
        })?;
        let topic = self.topic_name_of(group);
        let first = outcome.leases.iter().filter(|l| l.attempt <= 1).count() as u64;
        let again = outcome.leases.len() as u64 - first;
        let labels = [("topic", topic), ("group", consumer.clone())];
        metrics::counter!("petrel_broker_delivered_records_total", &labels).increment(first);
        metrics::counter!("petrel_broker_redelivered_records_total", &labels).increment(again);
        let mut records = Vec::with_capacity(outcome.leases.len());
        let mut corrupt = None;
        for l in outcome.leases {
            let rec = fetched
                .remove(&l.offset)
                .unwrap_or_else(|| self.read_record(group, l.offset));
            match rec {
                Ok(encoded) => records.push(bpb::LeasedRecord {
                    offset: l.offset,
                    attempt: l.attempt,
                    lease_id: l.lease_id,
                    deadline_ms: l.deadline_ms,
                    encoded,
                }),
                // Not served; the lease expires and the record stays
                // visible to operators. Other records keep flowing.
                Err(e) => corrupt = Some(e),
            }
        }
        let delivered_bytes: usize = records.iter().map(|r| r.encoded.len()).sum();
        metrics::counter!("petrel_broker_delivered_bytes_total", &labels)
            .increment(delivered_bytes as u64);
        // Dead letters share the answer's byte budget with the records (at
        // least one goes when no record does), so no pop answer nears the
        // message limit however many big dead letters wait: the rest stay
        // pending and leave with the next pops.
        let mut budget = POP_MAX_BYTES.saturating_sub(delivered_bytes);
        let mut dead_letters = Vec::new();
        for (offset, d) in outcome.dead {
            // A dead letter whose bytes cannot be read is still reported
            // (empty), so the group does not hold it forever.
            let encoded = self.read_record(group, offset).unwrap_or_default();
            if encoded.len() > budget && !(records.is_empty() && dead_letters.is_empty()) {
                break;
            }
            budget = budget.saturating_sub(encoded.len());
            dead_letters.push(bpb::DeadLetter {
                offset,
                attempts: d.attempts,
                reason: d.reason,
                encoded,
            });
        }
        q.lane.wait(seq).await?;
        if records.is_empty() && dead_letters.is_empty() {
            if let Some(e) = corrupt {
                return Err(e.into());
            }
        }
        Ok(TResponse::new(bpb::PopResponse {
            records,
            dead_letters,
            queue_version,
        }))
    }

    pub(super) async fn handle_wait_ready(
        &self,
        req: Request<bpb::WaitReadyRequest>,
    ) -> R<bpb::WaitReadyResponse> {
        let req = req.into_inner();
        if req.queues.len() > MAX_WAIT_QUEUES {
            return Err(PetrelError::InvalidArgument(format!(
                "wait on at most {MAX_WAIT_QUEUES} queues"
            ))
            .into());
        }
        for w in &req.queues {
            validate::group_name(&w.consumer_group)?;
        }
        let wait = std::time::Duration::from_millis(req.wait_ms.min(MAX_WAIT_MS));
        Ok(TResponse::new(bpb::WaitReadyResponse {
            ready: self.wait_ready_inner(&req.queues, wait).await,
        }))
    }

    pub(super) async fn handle_nack(
        &self,
        req: Request<bpb::BrokerNackRequest>,
    ) -> R<bpb::BrokerNackResponse> {
        let req = req.into_inner();
        validate::group_name(&req.consumer_group)?;
        let lease = req
            .lease
            .ok_or_else(|| PetrelError::InvalidArgument("missing lease".into()))?;
        let mut reason = req.reason;
        if reason.len() > MAX_REASON {
            let mut cut = MAX_REASON;
            while !reason.is_char_boundary(cut) {
                cut -= 1;
            }
            reason.truncate(cut);
        }
        let (q, term) = self.consumer_queue(req.group_id)?;
        let new_id = q.next_lease_id(term);
        let now = petrel_proto::now_ms();
        let (r, seq) = self.consumer_change(req.group_id, &q, term, true, |st, ch| {
            let r = st.nack(
                &req.consumer_group,
                lease.offset,
                lease.lease_id,
                &reason,
                req.dead_letter,
                now,
                new_id,
                ch,
            );
            // A dead letter made now is handed to the proxy with the answer.
            let dead = match r {
                Ok(None) => st
                    .consumers
                    .get(&req.consumer_group)
                    .and_then(|c| c.dead_pending.get(&lease.offset).cloned()),
                _ => None,
            };
            r.map(|at| (at, dead))
        })?;
        q.lane.wait(seq).await?;
        match r {
            Ok((Some(at), _)) => Ok(TResponse::new(bpb::BrokerNackResponse {
                redeliver_at_ms: at,
                dead_letters: Vec::new(),
            })),
            // Handed to the proxy to store now; it stays pending (and
            // leaves with a later pop) until the proxy reports it stored.
            Ok((None, dead)) => {
                let dead_letters = dead
                    .map(|d| bpb::DeadLetter {
                        offset: lease.offset,
                        attempts: d.attempts,
                        reason: d.reason,
                        encoded: self
                            .read_record(req.group_id, lease.offset)
                            .unwrap_or_default(),
                    })
                    .into_iter()
                    .collect();
                Ok(TResponse::new(bpb::BrokerNackResponse {
                    redeliver_at_ms: 0,
                    dead_letters,
                }))
            }
            Err(e) => Err(PetrelError::from(e).into()),
        }
    }

    pub(super) async fn handle_dead_lettered(
        &self,
        req: Request<bpb::DeadLetteredRequest>,
    ) -> R<bpb::DeadLetteredResponse> {
        let req = req.into_inner();
        validate::group_name(&req.consumer_group)?;
        if req.offsets.len() > 1024 {
            return Err(PetrelError::InvalidArgument("at most 1024 offsets".into()).into());
        }
        let labels = [
            ("topic", self.topic_name_of(req.group_id)),
            ("group", req.consumer_group.clone()),
        ];
        let n = req.offsets.len() as u64;
        let (q, term) = self.consumer_queue(req.group_id)?;
        let (_, seq) = self.consumer_change(req.group_id, &q, term, true, |st, ch| {
            st.dead_lettered(&req.consumer_group, &req.offsets, ch)
        })?;
        q.lane.wait(seq).await?;
        metrics::counter!("petrel_broker_dead_letters_total", &labels).increment(n);
        Ok(TResponse::new(bpb::DeadLetteredResponse {}))
    }

    pub(super) async fn handle_ack(
        &self,
        req: Request<bpb::BrokerAckRequest>,
    ) -> R<bpb::BrokerAckResponse> {
        let req = req.into_inner();
        validate::group_name(&req.consumer_group)?;
        let labels = [
            ("topic", self.topic_name_of(req.group_id)),
            ("group", req.consumer_group.clone()),
        ];
        let (q, term) = self.consumer_queue(req.group_id)?;
        let leases: Vec<(u64, u64)> = req.leases.iter().map(|l| (l.offset, l.lease_id)).collect();
        let (v, seq) = self.consumer_change(req.group_id, &q, term, true, |st, ch| {
            st.ack(&req.consumer_group, &leases, ch)
        })?;
        // Answered once committed: a failover never undoes an ack.
        q.lane.wait(seq).await?;
        metrics::counter!("petrel_broker_acked_records_total", &labels)
            .increment(v.iter().filter(|r| r.is_ok()).count() as u64);
        Ok(TResponse::new(bpb::BrokerAckResponse {
            results: v
                .into_iter()
                .map(|r| match r {
                    Ok(()) => pb::Status::default(),
                    Err(e) => {
                        let d = PetrelError::from(e).to_detail();
                        pb::Status {
                            code: d.code,
                            message: d.message,
                        }
                    }
                })
                .collect(),
        }))
    }

    pub(super) async fn handle_change_invisible(
        &self,
        req: Request<bpb::BrokerChangeInvisibleRequest>,
    ) -> R<bpb::BrokerChangeInvisibleResponse> {
        let req = req.into_inner();
        validate::group_name(&req.consumer_group)?;
        let lease = req
            .lease
            .ok_or_else(|| PetrelError::InvalidArgument("missing lease".into()))?;
        let (q, term) = self.consumer_queue(req.group_id)?;
        let new_id = q.next_lease_id(term);
        let now = petrel_proto::now_ms();
        let (r, seq) = self.consumer_change(req.group_id, &q, term, true, |st, ch| {
            st.change_invisible(
                &req.consumer_group,
                lease.offset,
                lease.lease_id,
                now,
                req.invisible_duration_ms,
                new_id,
                ch,
            )
        })?;
        q.lane.wait(seq).await?;
        match r {
            Ok(l) => Ok(TResponse::new(bpb::BrokerChangeInvisibleResponse {
                lease_id: l.lease_id,
                deadline_ms: l.deadline_ms,
            })),
            Err(e) => Err(PetrelError::from(e).into()),
        }
    }

    pub(super) async fn handle_commit_offset(
        &self,
        req: Request<bpb::BrokerCommitOffsetRequest>,
    ) -> R<bpb::BrokerCommitOffsetResponse> {
        let req = req.into_inner();
        validate::group_name(&req.consumer_group)?;
        let (q, term) = self.consumer_queue(req.group_id)?;
        self.check_group_cap(req.group_id, &q, &req.consumer_group)?;
        // In order with the group's receives and acks (a consumer op).
        let (r, seq) = self.consumer_change(req.group_id, &q, term, true, |st, ch| {
            st.commit_offset(&req.consumer_group, req.offset, ch)
        })?;
        r.map_err(PetrelError::from)?;
        q.lane.wait(seq).await?;
        Ok(TResponse::new(bpb::BrokerCommitOffsetResponse {}))
    }

    pub(super) async fn handle_delete_consumer(
        &self,
        req: Request<bpb::BrokerDeleteConsumerRequest>,
    ) -> R<bpb::BrokerDeleteConsumerResponse> {
        let req = req.into_inner();
        validate::group_name(&req.consumer_group)?;
        let (q, term) = self.consumer_queue(req.group_id)?;
        // A consumer op, in order with the group's receives and acks: a
        // receive answered before the delete is forgotten with it.
        let (existed, seq) = self.consumer_change(req.group_id, &q, term, true, |st, ch| {
            st.delete_consumer(&req.consumer_group, ch)
        })?;
        q.lane.wait(seq).await?;
        if existed {
            tracing::info!(group = req.group_id, consumer = %req.consumer_group, "consumer group deleted");
        }
        Ok(TResponse::new(bpb::BrokerDeleteConsumerResponse {
            existed,
        }))
    }

    /// Waits until a listed queue's version passes the caller's, a lease of
    /// its consumer group expires, or `wait` ends; returns the queues that
    /// are worth a pop (a queue not led here is one: the pop will say
    /// where it went).
    async fn wait_ready_inner(
        &self,
        queues: &[bpb::WaitQueue],
        wait: std::time::Duration,
    ) -> Vec<u64> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut watched = Vec::with_capacity(queues.len());
        let mut ready = Vec::new();
        for w in queues {
            match self
                .node
                .ensure_leader(w.group_id)
                .ok()
                .and_then(|h| h.queue)
            {
                Some(q) => watched.push((w, q)),
                None => ready.push(w.group_id),
            }
        }
        if !ready.is_empty() || watched.is_empty() {
            return ready;
        }
        loop {
            // Register for wake-ups before looking, so a change between
            // the look and the wait is not lost.
            let mut wakes: Vec<_> = watched
                .iter()
                .map(|(_, q)| Box::pin(q.changed.notified()))
                .collect();
            for n in &mut wakes {
                n.as_mut().enable();
            }
            let now = petrel_proto::now_ms();
            let mut lease_due: Option<(i64, u64)> = None;
            for (w, q) in &watched {
                if q.version() > w.known_version {
                    ready.push(w.group_id);
                    continue;
                }
                let st = q.read();
                if let Some(c) = st.served().get(&w.consumer_group) {
                    if let Some(t) = c
                        .leases
                        .values()
                        .map(|l| l.retry_at_ms)
                        .filter(|t| *t > now)
                        .min()
                    {
                        if lease_due.is_none_or(|(d, _)| t < d) {
                            lease_due = Some((t, w.group_id));
                        }
                    }
                }
            }
            if !ready.is_empty() {
                return ready;
            }
            let until = match lease_due {
                Some((t, _)) => deadline.min(
                    tokio::time::Instant::now()
                        + std::time::Duration::from_millis((t - now).max(0) as u64),
                ),
                None => deadline,
            };
            tokio::select! {
                _ = futures::future::select_all(wakes) => {}
                _ = tokio::time::sleep_until(until) => {
                    return match lease_due {
                        Some((t, g)) if petrel_proto::now_ms() >= t => vec![g],
                        _ => Vec::new(),
                    };
                }
                _ = self.node.shutdown.cancelled() => return Vec::new(),
            }
            if tokio::time::Instant::now() >= deadline {
                return Vec::new();
            }
        }
    }
}
