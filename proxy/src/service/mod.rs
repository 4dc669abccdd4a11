//! The client API (`petrel.v1.Petrel`): validation, queue selection, routing
//! to queue leaders with retries, and receipt handles.
//!
//! This file holds the service's shared state and the helpers every call
//! uses (permission check and call slots, topic lookup, leader routing,
//! meta writes); the trait impl hands each call to its concern's module.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

use crate::auth::{Action, Auth, Principal, Resource};
use futures::Stream;
use petrel_proto::pb;
use petrel_proto::pb::broker as bpb;
use petrel_proto::pb::broker::broker_data_client::BrokerDataClient;
use petrel_proto::pb::petrel_server::Petrel;
use petrel_proto::receipt::ReceiptKey;
use petrel_proto::record::RecordData;
use petrel_proto::{validate, MessageId, PetrelError};
use tokio::sync::mpsc;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::batcher::Batcher;
use crate::config::ProxyConfig;
use crate::routes::Router;

mod admin;
mod lookup;
mod read;
mod receive;
mod send;
mod txn;

pub use send::{unkeyed_queue, SPREAD_STRIPE};

pub const MAX_RECEIVE_MESSAGES: u32 = 1024;

#[derive(Clone)]
pub struct ProxyService {
    inner: Arc<Inner>,
}

struct Inner {
    config: ProxyConfig,
    router: Arc<Router>,
    batcher: Batcher,
    receipts: ReceiptKey,
    rr: AtomicU64,
    /// Producers' transaction checkers connected here, by topic.
    checkers: std::sync::Mutex<HashMap<String, Vec<CheckSender>>>,
    checker_loop: std::sync::Once,
    shutdown: CancellationToken,
    /// Set on SIGTERM: long-polls answer at once with what they have.
    draining: Arc<std::sync::atomic::AtomicBool>,
    /// Runtime settings: per-topic rate limits.
    limiter: Arc<crate::limits::Limiter>,
    /// Who may call, and what they may do.
    auth: Arc<Auth>,
    /// Receives open per client (user, or address when anonymous).
    open_receives: dashmap::DashMap<String, u32>,
    /// Calls in progress per client.
    open_requests: dashmap::DashMap<String, u32>,
}

/// Which per-client count a slot is taken from.
#[derive(Debug, Clone, Copy)]
enum Slots {
    Receives,
    Requests,
}

/// Who a call counts against in per-client limits: its user, or its
/// address when anonymous.
fn client_key<T>(who: &Principal, req: &Request<T>) -> String {
    match who {
        Principal::User(u) => format!("user:{u}"),
        Principal::Anonymous => match req.remote_addr() {
            Some(a) => format!("ip:{}", a.ip()),
            None => "ip:unknown".to_string(),
        },
    }
}

type CheckSender = mpsc::Sender<Result<pb::TransactionCheck, Status>>;

type R<T> = Result<Response<T>, Status>;

/// Runs `f` when dropped (however the scope ends).
fn scopeguard(f: impl FnOnce()) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

/// FNV-1a: stable across builds and processes, so every proxy picks the
/// same queue for the same request.
fn hash_of(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.iter().chain(&[0xFFu8]) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

impl ProxyService {
    /// `shutdown` ends the long-lived transaction-check streams, so the
    /// server's graceful stop does not wait for them.
    pub fn new(
        config: ProxyConfig,
        router: Arc<Router>,
        shutdown: CancellationToken,
        draining: Arc<std::sync::atomic::AtomicBool>,
        limiter: Arc<crate::limits::Limiter>,
        auth: Arc<Auth>,
    ) -> Self {
        let receipts = ReceiptKey::new(&config.receipt_secret);
        Self {
            inner: Arc::new(Inner {
                batcher: Batcher::new(router.clone()),
                router,
                receipts,
                config,
                rr: AtomicU64::new(0),
                checkers: Default::default(),
                checker_loop: std::sync::Once::new(),
                shutdown,
                draining,
                limiter,
                auth,
                open_receives: Default::default(),
                open_requests: Default::default(),
            }),
        }
    }
}

impl ProxyService {
    /// The proxy's users and rules (shared with its other front ends).
    pub fn auth(&self) -> Arc<Auth> {
        self.inner.auth.clone()
    }
}

impl Inner {
    /// Takes one of `client`'s receive slots, given back when the returned
    /// guard drops; `rate_limited` when all are taken.
    fn receive_slot(s: &Arc<Inner>, client: String) -> Result<impl Drop + Send, PetrelError> {
        let max = s.config.max_receives_per_client;
        Self::slot(s, Slots::Receives, client, max)
    }

    /// Authenticates and authorizes a call (see [`Auth::check`]) and takes
    /// one of its client's call slots (`--max-requests-per-client`) for as
    /// long as the returned guard lives; `rate_limited` when all are taken.
    fn enter<T>(
        s: &Arc<Inner>,
        req: &Request<T>,
        needs: &[(Resource<'_>, Action)],
    ) -> Result<(Principal, impl Drop + Send), PetrelError> {
        let who = s.auth.check(req, needs)?;
        let client = client_key(&who, req);
        let max = s.config.max_requests_per_client;
        let slot = Self::slot(s, Slots::Requests, client, max)?;
        Ok((who, slot))
    }

    fn slot(
        s: &Arc<Inner>,
        kind: Slots,
        client: String,
        max: u32,
    ) -> Result<impl Drop + Send, PetrelError> {
        let map = match kind {
            Slots::Receives => &s.open_receives,
            Slots::Requests => &s.open_requests,
        };
        {
            let mut n = map.entry(client.clone()).or_insert(0);
            if *n >= max {
                drop(n);
                let (limit, what, flag) = match kind {
                    Slots::Receives => (
                        "receives_per_client",
                        "receives",
                        "--max-receives-per-client",
                    ),
                    Slots::Requests => {
                        ("requests_per_client", "calls", "--max-requests-per-client")
                    }
                };
                metrics::counter!("petrel_proxy_limit_refusals_total", "limit" => limit)
                    .increment(1);
                return Err(PetrelError::RateLimited(format!(
                    "{client} already has {max} {what} open on this proxy ({flag})"
                )));
            }
            *n += 1;
        }
        let s = s.clone();
        Ok(scopeguard(move || {
            let map = match kind {
                Slots::Receives => &s.open_receives,
                Slots::Requests => &s.open_requests,
            };
            if let dashmap::Entry::Occupied(mut e) = map.entry(client) {
                *e.get_mut() -= 1;
                if *e.get() == 0 {
                    e.remove();
                }
            }
        }))
    }

    async fn topic(&self, name: &str) -> Result<bpb::TopicRoute, PetrelError> {
        validate::topic_name(name)?;
        if let Some(t) = self.router.table().topic(name) {
            return Ok(t.clone());
        }
        self.router.refresh_now().await;
        if let Some(t) = self.router.table().topic(name) {
            return Ok(t.clone());
        }
        // "Does not exist" only from a proxy that knows the cluster.
        self.ready().await?;
        Err(PetrelError::NotFound(format!(
            "topic {name:?} does not exist"
        )))
    }

    /// `unavailable` (retryable), saying why, while the proxy has no
    /// cluster map to answer from: no broker answered yet, or none has
    /// registered (a cluster still electing its meta leader).
    async fn ready(&self) -> Result<(), PetrelError> {
        if !self.router.table().brokers.is_empty() {
            return Ok(());
        }
        self.router.refresh_now().await;
        let t = self.router.table();
        if !t.brokers.is_empty() {
            return Ok(());
        }
        Err(PetrelError::Unavailable(
            if t.reachable.values().any(|r| *r) {
                "the cluster is not ready yet: its brokers answer but none has registered \
             (the meta group may still be electing a leader); retry in a few seconds"
                    .to_string()
            } else {
                format!(
                    "the cluster is not ready: this proxy has not reached any broker yet \
                 (--brokers {}); are they running?",
                    self.router.seeds().join(",")
                )
            },
        ))
    }

    fn group_of(t: &bpb::TopicRoute, queue: u32) -> Result<u64, PetrelError> {
        t.queues
            .iter()
            .find(|q| q.queue == queue)
            .map(|q| q.group_id)
            .ok_or_else(|| {
                PetrelError::NotFound(format!(
                    "queue {queue} does not exist (topic has {} queues)",
                    t.queues.len()
                ))
            })
    }

    /// Runs `op` against the leader of `group`, following not-leader hints
    /// and retrying unavailable brokers until the request timeout.
    async fn on_leader<T, F, Fut>(&self, group: u64, op: F) -> Result<T, PetrelError>
    where
        F: FnMut(u64, String, BrokerDataClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<T, PetrelError>>,
    {
        self.on_leader_within(group, self.config.request_timeout, op)
            .await
    }

    /// [`Inner::on_leader`] with its own retry budget.
    async fn on_leader_within<T, F, Fut>(
        &self,
        group: u64,
        budget: Duration,
        mut op: F,
    ) -> Result<T, PetrelError>
    where
        F: FnMut(u64, String, BrokerDataClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<T, PetrelError>>,
    {
        let deadline = Instant::now() + budget;
        let mut backoff = Duration::from_millis(20);
        let mut hinted = 0u32;
        loop {
            let err = match self.router.leader_addr(group) {
                None => PetrelError::Unavailable(format!("no known leader for group {group}")),
                Some((leader, addr)) => match self.router.channels.client(&addr) {
                    Err(e) => e,
                    Ok(c) => {
                        // Each attempt is bounded too, so a silent broker
                        // cannot hold a request past its budget.
                        let left = deadline
                            .saturating_duration_since(Instant::now())
                            .max(Duration::from_millis(50));
                        match tokio::time::timeout(left, op(leader, addr, c)).await {
                            Ok(Ok(v)) => return Ok(v),
                            Ok(Err(e)) => e,
                            Err(_) => PetrelError::Timeout(format!(
                                "leader of group {group} did not answer in time"
                            )),
                        }
                    }
                },
            };
            if !err.is_retryable() || Instant::now() + backoff >= deadline {
                return Err(match err {
                    PetrelError::NotLeader { group, .. } => PetrelError::Unavailable(format!(
                        "group {group} has no reachable leader right now"
                    )),
                    e => e,
                });
            }
            match &err {
                // Follow a hint at once, but not forever: two brokers with
                // stale views could point at each other during an election.
                PetrelError::NotLeader {
                    leader: Some(l), ..
                } if hinted < 2 => {
                    hinted += 1;
                    self.router.hint_leader(group, *l);
                    self.router.poke();
                    continue;
                }
                _ => {
                    hinted = 0;
                    self.router.poke();
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(200));
        }
    }

    async fn append(
        &self,
        group: u64,
        records: bpb::AppendRecords,
    ) -> Result<(Vec<u64>, Vec<bool>), PetrelError> {
        let batcher = self.batcher.clone();
        self.on_leader(group, |leader, addr, _| {
            let b = batcher.clone();
            let r = records.clone();
            async move { b.append(leader, addr, r).await }
        })
        .await
    }

    fn to_record(
        &self,
        topic: &str,
        queue: u32,
        offset: u64,
        encoded: &bytes::Bytes,
    ) -> Result<pb::Record, PetrelError> {
        let r = RecordData::decode(encoded).map_err(|e| {
            tracing::error!(topic, queue, offset, error = %e, "corrupt record from broker");
            PetrelError::Corrupt(format!("record {topic}/{queue}/{offset}: {e}"))
        })?;
        Ok(pb::Record {
            message_id: MessageId {
                topic: topic.to_string(),
                queue,
                offset,
            }
            .to_string(),
            topic: topic.to_string(),
            queue,
            offset,
            key: r.key,
            tag: r.tag,
            properties: r.properties.into_iter().collect(),
            body: r.body,
            producer_id: r.producer_id,
            sequence: r.sequence,
            born_timestamp_ms: r.born_timestamp_ms,
            store_timestamp_ms: r.store_timestamp_ms,
            attempt: 0,
            receipt_handle: String::new(),
            invisible_until_ms: 0,
            message_group: r.message_group,
            deliver_at_ms: r.deliver_at_ms,
        })
    }

    async fn stats(
        &self,
        groups: Vec<u64>,
        consumer_group: &str,
    ) -> HashMap<u64, Result<bpb::QueueStats, PetrelError>> {
        let futs = groups.into_iter().map(|g| {
            let cg = consumer_group.to_string();
            async move {
                let r = self
                    .on_leader(g, |_, _, mut c| {
                        let req = bpb::QueueStatsRequest {
                            group_ids: vec![g],
                            consumer_group: cg.clone(),
                        };
                        async move {
                            let mut resp = c
                                .queue_stats(req)
                                .await
                                .map_err(|s| PetrelError::from_status(&s))?
                                .into_inner();
                            let q = resp
                                .queues
                                .pop()
                                .ok_or_else(|| PetrelError::Internal("empty stats".into()))?;
                            match q.error {
                                Some(d) => Err(PetrelError::from_detail(&d)),
                                None => Ok(q),
                            }
                        }
                    })
                    .await;
                (g, r)
            }
        });
        futures::future::join_all(futs).await.into_iter().collect()
    }

    /// After a retried meta write fails with "already exists" (create) or
    /// "not found" (delete), checks whether that is the earlier attempt's
    /// own effect and if so reports success.
    async fn earlier_attempt_succeeded(
        &self,
        op: &bpb::meta_write_request::Op,
        e: &PetrelError,
    ) -> Option<bpb::MetaWriteResponse> {
        use bpb::meta_write_request::Op;
        self.router.refresh_now().await;
        let table = self.router.table();
        match (op, e) {
            (Op::CreateTopic(c), PetrelError::AlreadyExists(_)) => {
                let t = table.topic(&c.name)?;
                let have = t.config.as_ref()?;
                let same = have.queue_count == c.queue_count
                    && have.replication_factor == c.replication_factor
                    && have.retention_ms == c.retention_ms
                    && have.retention_bytes == c.retention_bytes;
                same.then(|| bpb::MetaWriteResponse {
                    topic: Some(t.clone()),
                    map_version: table.map_version,
                    moves: 0,
                })
            }
            (Op::DeleteTopic(name), PetrelError::NotFound(_)) if table.topic(name).is_none() => {
                Some(bpb::MetaWriteResponse {
                    topic: None,
                    map_version: table.map_version,
                    moves: 0,
                })
            }
            (Op::RemoveBroker(id), PetrelError::NotFound(_)) if !table.brokers.contains_key(id) => {
                Some(bpb::MetaWriteResponse {
                    topic: None,
                    map_version: table.map_version,
                    moves: 0,
                })
            }
            _ => None,
        }
    }

    async fn meta_write(
        &self,
        op: bpb::meta_write_request::Op,
    ) -> Result<bpb::MetaWriteResponse, PetrelError> {
        let table = self.router.table();
        let mut addrs: Vec<String> = Vec::new();
        if let Some(a) = table.brokers.get(&table.meta_leader) {
            addrs.push(a.clone());
        }
        addrs.extend(table.brokers.values().cloned());
        addrs.extend(self.config.brokers.iter().cloned());
        addrs.dedup();
        let deadline = Instant::now() + self.config.request_timeout;
        let mut last = PetrelError::Unavailable("no broker reachable".into());
        let mut backoff = Duration::from_millis(50);
        // Meta writes are not all idempotent: after an attempt whose outcome
        // is unknown, "already exists" / "not found" may be our own success.
        let mut unknown_outcome = false;
        loop {
            for a in &addrs {
                if Instant::now() >= deadline {
                    break;
                }
                let mut c = match self.router.channels.client(a) {
                    Ok(c) => c,
                    Err(e) => {
                        last = e;
                        continue;
                    }
                };
                let mut req = tonic::Request::new(bpb::MetaWriteRequest {
                    op: Some(op.clone()),
                });
                req.set_timeout(
                    deadline
                        .saturating_duration_since(Instant::now())
                        .max(Duration::from_millis(50)),
                );
                match c.meta_write(req).await {
                    Ok(r) => {
                        self.router.refresh_now().await;
                        return Ok(r.into_inner());
                    }
                    Err(s) => {
                        let e = PetrelError::from_status(&s);
                        if unknown_outcome {
                            if let Some(done) = self.earlier_attempt_succeeded(&op, &e).await {
                                return Ok(done);
                            }
                        }
                        if !e.is_retryable() {
                            return Err(e);
                        }
                        if !matches!(e, PetrelError::NotLeader { .. }) {
                            unknown_outcome = true;
                        }
                        last = e;
                    }
                }
            }
            if Instant::now() + backoff >= deadline {
                return Err(match last {
                    PetrelError::NotLeader { .. } => {
                        PetrelError::Unavailable("the meta group has no leader right now".into())
                    }
                    e => e,
                });
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(200));
        }
    }
}

type ReceiveStream = Pin<Box<dyn Stream<Item = Result<pb::ReceiveResponse, Status>> + Send>>;
type CheckStream = Pin<Box<dyn Stream<Item = Result<pb::TransactionCheck, Status>> + Send>>;

#[tonic::async_trait]
impl Petrel for ProxyService {
    async fn send(&self, req: Request<pb::SendRequest>) -> R<pb::SendResponse> {
        send::send(&self.inner, req).await
    }

    type ReceiveStream = ReceiveStream;

    async fn receive(&self, req: Request<pb::ReceiveRequest>) -> R<Self::ReceiveStream> {
        receive::receive(&self.inner, req).await
    }

    async fn ack(&self, req: Request<pb::AckRequest>) -> R<pb::AckResponse> {
        receive::ack(&self.inner, req).await
    }

    async fn get_message(&self, req: Request<pb::GetMessageRequest>) -> R<pb::GetMessageResponse> {
        lookup::get_message(&self.inner, req).await
    }

    async fn find_messages(
        &self,
        req: Request<pb::FindMessagesRequest>,
    ) -> R<pb::FindMessagesResponse> {
        lookup::find_messages(&self.inner, req).await
    }

    async fn end_transaction(
        &self,
        req: Request<pb::EndTransactionRequest>,
    ) -> R<pb::EndTransactionResponse> {
        txn::end_transaction(&self.inner, req).await
    }

    type WatchTransactionsStream = CheckStream;

    async fn watch_transactions(
        &self,
        req: Request<pb::WatchTransactionsRequest>,
    ) -> R<Self::WatchTransactionsStream> {
        txn::watch_transactions(&self.inner, req).await
    }

    async fn nack(&self, req: Request<pb::NackRequest>) -> R<pb::NackResponse> {
        receive::nack(&self.inner, req).await
    }

    async fn change_invisible_duration(
        &self,
        req: Request<pb::ChangeInvisibleDurationRequest>,
    ) -> R<pb::ChangeInvisibleDurationResponse> {
        receive::change_invisible_duration(&self.inner, req).await
    }

    async fn read(&self, req: Request<pb::ReadRequest>) -> R<pb::ReadResponse> {
        read::read(&self.inner, req).await
    }

    async fn offset_for_time(
        &self,
        req: Request<pb::OffsetForTimeRequest>,
    ) -> R<pb::OffsetForTimeResponse> {
        read::offset_for_time(&self.inner, req).await
    }

    async fn commit_offset(
        &self,
        req: Request<pb::CommitOffsetRequest>,
    ) -> R<pb::CommitOffsetResponse> {
        read::commit_offset(&self.inner, req).await
    }

    async fn get_offset(&self, req: Request<pb::GetOffsetRequest>) -> R<pb::GetOffsetResponse> {
        read::get_offset(&self.inner, req).await
    }

    async fn create_topic(&self, req: Request<pb::CreateTopicRequest>) -> R<pb::TopicInfo> {
        admin::create_topic(&self.inner, req).await
    }

    async fn update_topic(&self, req: Request<pb::UpdateTopicRequest>) -> R<pb::TopicInfo> {
        admin::update_topic(&self.inner, req).await
    }

    async fn delete_topic(
        &self,
        req: Request<pb::DeleteTopicRequest>,
    ) -> R<pb::DeleteTopicResponse> {
        admin::delete_topic(&self.inner, req).await
    }

    async fn list_topics(&self, req: Request<pb::ListTopicsRequest>) -> R<pb::ListTopicsResponse> {
        admin::list_topics(&self.inner, req).await
    }

    async fn describe_topic(&self, req: Request<pb::DescribeTopicRequest>) -> R<pb::TopicInfo> {
        admin::describe_topic(&self.inner, req).await
    }

    async fn list_groups(&self, req: Request<pb::ListGroupsRequest>) -> R<pb::ListGroupsResponse> {
        admin::list_groups(&self.inner, req).await
    }

    async fn describe_group(
        &self,
        req: Request<pb::DescribeGroupRequest>,
    ) -> R<pb::DescribeGroupResponse> {
        admin::describe_group(&self.inner, req).await
    }

    async fn delete_group(
        &self,
        req: Request<pb::DeleteGroupRequest>,
    ) -> R<pb::DeleteGroupResponse> {
        admin::delete_group(&self.inner, req).await
    }

    async fn describe_cluster(
        &self,
        req: Request<pb::DescribeClusterRequest>,
    ) -> R<pb::ClusterInfo> {
        admin::describe_cluster(&self.inner, req).await
    }

    async fn admin_cluster(
        &self,
        req: Request<pb::AdminClusterRequest>,
    ) -> R<pb::AdminClusterResponse> {
        admin::admin_cluster(&self.inner, req).await
    }
}
