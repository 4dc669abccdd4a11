//! RocketMQ 5's client protocol (`apache.rocketmq.v2.MessagingService`),
//! served next to Petrel's own so that applications written against the
//! official RocketMQ clients work against Petrel unchanged.
//!
//! A thin translation: each RPC becomes calls on [`ProxyService`] (Petrel's
//! own front end), so routing, limits, validation and receipts are the
//! same. Errors travel as RocketMQ codes inside the response's `status`
//! with gRPC OK, as RocketMQ's proxy does ([`status_of`] maps every Petrel
//! error). Routes name the proxy endpoints the client dialed (never
//! brokers). Per-client state (the telemetry settings) is keyed by the
//! `x-mq-client-id` header and is only a cache: a client that moves to
//! another proxy sends its settings again there.
//!
//! What RocketMQ keeps that a Petrel record has no field for travels in
//! reserved properties: the client's message id (`petrel.rmq.id`), every
//! key (`petrel.rmq.keys`; the first is also the record's key) and the
//! born host (`petrel.rmq.born_host`). They are stripped on delivery.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use futures::{Stream, StreamExt};
use petrel_proto::pb;
use petrel_proto::pb::petrel_server::Petrel;
use petrel_proto::pb::rocketmq as rmq;
use petrel_proto::PetrelError;
use rmq::messaging_service_server::MessagingService;
use rmq::Code;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use crate::auth::{Auth, Principal, Verified};
use crate::service::ProxyService;

/// The client's message id, as it sent it.
pub const PROP_ID: &str = petrel_proto::record::CLIENT_ID_PROPERTY;
/// Every key of the message, space-separated (RocketMQ's own encoding).
pub const PROP_KEYS: &str = "petrel.rmq.keys";
/// The host that produced the message.
pub const PROP_BORN_HOST: &str = "petrel.rmq.born_host";
/// Longest body a client is told it may send (RocketMQ's default).
const MAX_BODY_SIZE: i32 = 4 << 20;
/// Long polls end this long before the client's deadline, so the stream
/// (status, messages, timestamp) is complete when it gives up.
const POLL_MARGIN: Duration = Duration::from_millis(1500);
/// Longest long poll served.
const MAX_POLL: Duration = Duration::from_secs(30);
/// Receive batch size offered to consumers in the settings.
const RECEIVE_BATCH: i32 = 32;

#[derive(Clone)]
pub struct RocketMqService {
    petrel: ProxyService,
    /// The settings each client (by `x-mq-client-id`) last sent, merged.
    settings: Arc<DashMap<String, rmq::Settings>>,
    /// The proxy's users: RocketMQ clients sign in with their own scheme.
    auth: Arc<Auth>,
}

impl RocketMqService {
    pub fn new(petrel: ProxyService, auth: Arc<Auth>) -> Self {
        Self {
            petrel,
            settings: Default::default(),
            auth,
        }
    }

    /// Authenticates a call by its RocketMQ signature: the extensions to
    /// give Petrel's handlers (the caller's connection and, when signed,
    /// its user, whose rules they then apply), or the refusal.
    fn admit<T>(&self, req: &Request<T>) -> Result<tonic::Extensions, rmq::Status> {
        let mut ext = req.extensions().clone();
        match self.auth.rocketmq_user(req.metadata(), req.remote_addr()) {
            Ok(Principal::User(u)) => {
                ext.insert(Verified(u));
                Ok(ext)
            }
            Ok(Principal::Anonymous) => Ok(ext),
            Err(e) => Err(status_of(&e)),
        }
    }
}

fn st(code: Code, message: impl Into<String>) -> rmq::Status {
    rmq::Status {
        code: code as i32,
        message: message.into(),
    }
}

fn ok() -> rmq::Status {
    st(Code::Ok, "OK")
}

/// The RocketMQ code for a Petrel error.
pub fn status_of(e: &PetrelError) -> rmq::Status {
    let code = match e {
        PetrelError::NotFound(m) if m.contains("topic") => Code::TopicNotFound,
        PetrelError::NotFound(m) if m.contains("message") => Code::MessageNotFound,
        PetrelError::NotFound(_) => Code::NotFound,
        PetrelError::InvalidArgument(_) | PetrelError::OffsetOutOfRange(_) => Code::BadRequest,
        PetrelError::NotLeader { .. } | PetrelError::Unavailable(_) => Code::HaNotAvailable,
        PetrelError::TooLarge(_) => Code::MessageBodyTooLarge,
        PetrelError::Corrupt(_) => Code::MessageCorrupted,
        PetrelError::AlreadyExists(_) => Code::BadRequest,
        PetrelError::ReceiptExpired(_) => Code::InvalidReceiptHandle,
        PetrelError::Internal(_) => Code::InternalServerError,
        PetrelError::Timeout(_) => Code::ProxyTimeout,
        PetrelError::WrongMessageType(_) => Code::MessagePropertyConflictWithType,
        PetrelError::InvalidFilter(_) => Code::IllegalFilterExpression,
        PetrelError::RateLimited(_) | PetrelError::LimitExceeded(_) => Code::TooManyRequests,
        PetrelError::Unauthenticated(_) => Code::Unauthorized,
        PetrelError::PermissionDenied(_) => Code::Forbidden,
    };
    st(code, e.to_string())
}

fn err(s: Status) -> rmq::Status {
    status_of(&PetrelError::from_status(&s))
}

/// A RocketMQ resource as a Petrel name: `namespace%name` when namespaced
/// (RocketMQ's own convention), else the name.
/// RocketMQ names a consumer group's dead-letter topic `%DLQ%GROUP`.
const DLQ_PREFIX: &str = "%DLQ%";

/// The Petrel name of a RocketMQ resource: `namespace%name`, and a
/// group's dead-letter topic `%DLQ%GROUP` as Petrel's (`GROUP.dlq`), so a
/// RocketMQ consumer reads dead letters where RocketMQ keeps them.
fn name_of(r: Option<&rmq::Resource>) -> String {
    let Some(r) = r else {
        return String::new();
    };
    let with_ns = |n: &str| {
        if r.resource_namespace.is_empty() {
            n.to_string()
        } else {
            format!("{}%{}", r.resource_namespace, n)
        }
    };
    match r.name.strip_prefix(DLQ_PREFIX) {
        Some(group) if !group.is_empty() => {
            petrel_proto::validate::dead_letter_topic(&with_ns(group))
        }
        _ => with_ns(&r.name),
    }
}

fn resource(name: &str) -> rmq::Resource {
    match name.split_once('%') {
        Some((ns, n)) => rmq::Resource {
            resource_namespace: ns.into(),
            name: n.into(),
        },
        None => rmq::Resource {
            resource_namespace: String::new(),
            name: name.into(),
        },
    }
}

fn message_type(t: i32) -> rmq::MessageType {
    match pb::MessageType::try_from(t) {
        Ok(pb::MessageType::Fifo) => rmq::MessageType::Fifo,
        Ok(pb::MessageType::Delay) => rmq::MessageType::Delay,
        Ok(pb::MessageType::Transaction) => rmq::MessageType::Transaction,
        _ => rmq::MessageType::Normal,
    }
}

fn ms_of(d: &prost_types::Duration) -> u64 {
    (d.seconds.max(0) as u64)
        .saturating_mul(1000)
        .saturating_add((d.nanos.max(0) / 1_000_000) as u64)
}

fn duration(ms: u64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

fn ts_ms(t: &prost_types::Timestamp) -> i64 {
    t.seconds
        .saturating_mul(1000)
        .saturating_add((t.nanos / 1_000_000) as i64)
}

/// The `grpc-timeout` header (e.g. `40S`, `39999m`), if any.
fn grpc_timeout<T>(req: &Request<T>) -> Option<Duration> {
    let v = req.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (n, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = n.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A request to Petrel's own handlers on behalf of a RocketMQ call, with
/// the caller's connection (its address counts in per-client limits).
fn with_peer<T>(ext: &tonic::Extensions, message: T) -> Request<T> {
    let mut r = Request::new(message);
    *r.extensions_mut() = ext.clone();
    r
}

fn client_id<T>(req: &Request<T>) -> String {
    req.metadata()
        .get("x-mq-client-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

/// A RocketMQ message as a Petrel one (`txn`: the transaction it opens).
fn to_petrel(m: &rmq::Message, txn: Option<&str>) -> Result<pb::Message, PetrelError> {
    let sp = m.system_properties.clone().unwrap_or_default();
    let mut properties = m.user_properties.clone();
    for k in properties.keys() {
        if k.starts_with("petrel.rmq.") {
            return Err(PetrelError::InvalidArgument(format!(
                "property {k:?}: the petrel.rmq. prefix is reserved"
            )));
        }
    }
    if !sp.message_id.is_empty() {
        properties.insert(PROP_ID.into(), sp.message_id.clone());
    }
    if sp.keys.len() > 1 {
        properties.insert(PROP_KEYS.into(), sp.keys.join(" "));
    }
    if !sp.born_host.is_empty() {
        properties.insert(PROP_BORN_HOST.into(), sp.born_host.clone());
    }
    Ok(pb::Message {
        key: sp.keys.first().cloned().unwrap_or_default(),
        tag: sp.tag.clone().unwrap_or_default(),
        properties,
        body: m.body.clone(),
        sequence: 0,
        born_timestamp_ms: sp.born_timestamp.as_ref().map(ts_ms).unwrap_or(0),
        message_group: sp.message_group.clone().unwrap_or_default(),
        deliver_at_ms: sp.delivery_timestamp.as_ref().map(ts_ms).unwrap_or(0),
        delay_ms: 0,
        transaction_id: txn.unwrap_or_default().to_string(),
    })
}

/// A delivered Petrel record as a RocketMQ message.
pub fn to_rocketmq(r: pb::Record, invisible_ms: Option<u64>) -> rmq::Message {
    let mut props: HashMap<String, String> = r.properties;
    let id = props
        .remove(PROP_ID)
        .unwrap_or_else(|| r.message_id.clone());
    let keys: Vec<String> = match props.remove(PROP_KEYS) {
        Some(k) => k.split(' ').map(str::to_string).collect(),
        None if !r.key.is_empty() => vec![r.key.clone()],
        None => Vec::new(),
    };
    let born_host = props.remove(PROP_BORN_HOST).unwrap_or_default();
    let message_type = if !r.message_group.is_empty() {
        rmq::MessageType::Fifo
    } else {
        rmq::MessageType::Normal
    };
    let sp = rmq::SystemProperties {
        tag: (!r.tag.is_empty()).then(|| r.tag.clone()),
        keys,
        message_id: id,
        // The Java client checks it and logs an error for a message
        // without one. CRC32 is the cheapest it knows: uppercase hex, not
        // zero-padded (as Java's Long.toHexString then toUpperCase).
        body_digest: Some(rmq::Digest {
            r#type: rmq::DigestType::Crc32 as i32,
            checksum: format!("{:X}", crc32fast::hash(&r.body)),
        }),
        body_encoding: rmq::Encoding::Identity as i32,
        message_type: message_type as i32,
        born_timestamp: Some(timestamp(r.born_timestamp_ms)),
        born_host,
        store_timestamp: Some(timestamp(r.store_timestamp_ms)),
        store_host: "petrel".into(),
        delivery_timestamp: None,
        receipt_handle: (!r.receipt_handle.is_empty()).then(|| r.receipt_handle.clone()),
        queue_id: r.queue as i32,
        queue_offset: Some(r.offset as i64),
        invisible_duration: invisible_ms.map(duration),
        delivery_attempt: (r.attempt > 0).then_some(r.attempt as i32),
        message_group: (!r.message_group.is_empty()).then(|| r.message_group.clone()),
        trace_context: None,
        orphaned_transaction_recovery_duration: None,
        dead_letter_queue: None,
        priority: None,
    };
    rmq::Message {
        topic: Some(resource(&r.topic)),
        user_properties: props,
        system_properties: Some(sp),
        body: r.body,
    }
}

type ReceiveStream =
    Pin<Box<dyn Stream<Item = Result<rmq::ReceiveMessageResponse, Status>> + Send>>;
type TelemetryStream = Pin<Box<dyn Stream<Item = Result<rmq::TelemetryCommand, Status>> + Send>>;
type PullStream = Pin<Box<dyn Stream<Item = Result<rmq::PullMessageResponse, Status>> + Send>>;

fn once<T: Send + 'static>(items: Vec<T>) -> Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>> {
    Box::pin(futures::stream::iter(items.into_iter().map(Ok)))
}

impl RocketMqService {
    /// The topic's Petrel description, or a RocketMQ status.
    async fn topic(
        &self,
        ext: &tonic::Extensions,
        name: &str,
    ) -> Result<pb::TopicInfo, rmq::Status> {
        let req = with_peer(ext, pb::DescribeTopicRequest { name: name.into() });
        match Petrel::describe_topic(&self.petrel, req).await {
            Ok(r) => Ok(r.into_inner()),
            Err(s) => Err(match PetrelError::from_status(&s) {
                PetrelError::NotFound(m) => st(Code::TopicNotFound, m),
                e => status_of(&e),
            }),
        }
    }

    /// The queues of `topic` as RocketMQ sees them, all served by
    /// `endpoints` (the proxies the client dialed).
    async fn queues(
        &self,
        ext: &tonic::Extensions,
        topic: &rmq::Resource,
        endpoints: Option<rmq::Endpoints>,
    ) -> Result<Vec<rmq::MessageQueue>, rmq::Status> {
        let name = name_of(Some(topic));
        let info = self.topic(ext, &name).await?;
        let Some(endpoints) = endpoints.filter(|e| !e.addresses.is_empty()) else {
            return Err(st(
                Code::IllegalAccessPoint,
                "the request names no endpoints (the proxies the client dialed)",
            ));
        };
        let ty = message_type(info.config.as_ref().map(|c| c.message_type).unwrap_or(0));
        let mut queues: Vec<rmq::MessageQueue> = info
            .queues
            .iter()
            .map(|q| rmq::MessageQueue {
                topic: Some(topic.clone()),
                id: q.queue as i32,
                permission: rmq::Permission::ReadWrite as i32,
                broker: Some(rmq::Broker {
                    name: "petrel".into(),
                    id: 0,
                    endpoints: Some(endpoints.clone()),
                }),
                accept_message_types: vec![ty as i32],
            })
            .collect();
        queues.sort_by_key(|q| q.id);
        if queues.is_empty() {
            return Err(st(
                Code::TopicNotFound,
                format!("topic {name:?} has no queues"),
            ));
        }
        Ok(queues)
    }

    /// The client's settings merged with what the server decides.
    fn merge(&self, mut s: rmq::Settings) -> rmq::Settings {
        s.backoff_policy = Some(rmq::RetryPolicy {
            max_attempts: 16,
            strategy: Some(rmq::retry_policy::Strategy::ExponentialBackoff(
                rmq::ExponentialBackoff {
                    initial: Some(duration(1000)),
                    max: Some(duration(60_000)),
                    multiplier: 2.0,
                },
            )),
        });
        match &mut s.pub_sub {
            Some(rmq::settings::PubSub::Publishing(p)) => {
                p.max_body_size = MAX_BODY_SIZE;
            }
            Some(rmq::settings::PubSub::Subscription(sub)) => {
                sub.receive_batch_size = Some(RECEIVE_BATCH);
                sub.fifo = Some(sub.fifo.unwrap_or(false));
                sub.long_polling_timeout = Some(duration(MAX_POLL.as_millis() as u64));
            }
            None => {}
        }
        s.metric = Some(rmq::Metric {
            on: false,
            endpoints: None,
        });
        s
    }
}

#[tonic::async_trait]
impl MessagingService for RocketMqService {
    async fn query_route(
        &self,
        req: Request<rmq::QueryRouteRequest>,
    ) -> Result<Response<rmq::QueryRouteResponse>, Status> {
        let ext = match self.admit(&req) {
            Ok(ext) => ext,
            Err(status) => {
                return Ok(Response::new(rmq::QueryRouteResponse {
                    status: Some(status),
                    message_queues: Vec::new(),
                }));
            }
        };
        let req = req.into_inner();
        let Some(topic) = req.topic else {
            return Ok(Response::new(rmq::QueryRouteResponse {
                status: Some(st(Code::IllegalTopic, "no topic")),
                message_queues: Vec::new(),
            }));
        };
        Ok(Response::new(
            match self.queues(&ext, &topic, req.endpoints).await {
                Ok(message_queues) => rmq::QueryRouteResponse {
                    status: Some(ok()),
                    message_queues,
                },
                Err(status) => rmq::QueryRouteResponse {
                    status: Some(status),
                    message_queues: Vec::new(),
                },
            },
        ))
    }

    async fn heartbeat(
        &self,
        req: Request<rmq::HeartbeatRequest>,
    ) -> Result<Response<rmq::HeartbeatResponse>, Status> {
        let status = self.admit(&req).err().unwrap_or_else(ok);
        Ok(Response::new(rmq::HeartbeatResponse {
            status: Some(status),
        }))
    }

    async fn send_message(
        &self,
        req: Request<rmq::SendMessageRequest>,
    ) -> Result<Response<rmq::SendMessageResponse>, Status> {
        let fail = |status: rmq::Status, n: usize, ids: Vec<String>| {
            Response::new(rmq::SendMessageResponse {
                status: Some(status.clone()),
                entries: (0..n.max(1))
                    .map(|i| rmq::SendResultEntry {
                        status: Some(status.clone()),
                        message_id: ids.get(i).cloned().unwrap_or_default(),
                        ..Default::default()
                    })
                    .collect(),
            })
        };
        let ext = match self.admit(&req) {
            Ok(ext) => ext,
            Err(status) => {
                return Ok(fail(status, req.get_ref().messages.len(), Vec::new()));
            }
        };
        let req = req.into_inner();
        let ids: Vec<String> = req
            .messages
            .iter()
            .map(|m| {
                m.system_properties
                    .as_ref()
                    .map(|s| s.message_id.clone())
                    .unwrap_or_default()
            })
            .collect();
        let n = req.messages.len();
        if n == 0 {
            return Ok(fail(st(Code::BadRequest, "no messages"), 0, ids));
        }
        let topic = name_of(req.messages[0].topic.as_ref());
        if req
            .messages
            .iter()
            .any(|m| name_of(m.topic.as_ref()) != topic)
        {
            return Ok(fail(
                st(
                    Code::BadRequest,
                    "every message of a send must have one topic",
                ),
                n,
                ids,
            ));
        }
        // A transactional message opens a transaction of its own, named
        // after the message: EndTransaction names it back.
        let mut txns = Vec::with_capacity(n);
        let mut messages = Vec::with_capacity(n);
        for (m, id) in req.messages.iter().zip(&ids) {
            let transactional = m
                .system_properties
                .as_ref()
                .is_some_and(|s| s.message_type == rmq::MessageType::Transaction as i32);
            let txn = transactional.then(|| format!("rmq-{id}"));
            match to_petrel(m, txn.as_deref()) {
                Ok(pm) => messages.push(pm),
                Err(e) => return Ok(fail(status_of(&e), n, ids)),
            }
            txns.push(txn.unwrap_or_default());
        }
        let sreq = with_peer(
            &ext,
            pb::SendRequest {
                topic,
                producer_id: String::new(),
                messages,
            },
        );
        match Petrel::send(&self.petrel, sreq).await {
            Ok(r) => {
                let results = r.into_inner().results;
                let entries = results
                    .into_iter()
                    .zip(ids.iter().zip(txns))
                    .map(|(res, (id, txn))| rmq::SendResultEntry {
                        status: Some(ok()),
                        message_id: if id.is_empty() {
                            res.message_id
                        } else {
                            id.clone()
                        },
                        transaction_id: txn,
                        offset: res.offset as i64,
                        recall_handle: String::new(),
                    })
                    .collect();
                Ok(Response::new(rmq::SendMessageResponse {
                    status: Some(ok()),
                    entries,
                }))
            }
            Err(s) => Ok(fail(err(s), n, ids)),
        }
    }

    async fn query_assignment(
        &self,
        req: Request<rmq::QueryAssignmentRequest>,
    ) -> Result<Response<rmq::QueryAssignmentResponse>, Status> {
        let ext = match self.admit(&req) {
            Ok(ext) => ext,
            Err(status) => {
                return Ok(Response::new(rmq::QueryAssignmentResponse {
                    status: Some(status),
                    assignments: Vec::new(),
                }));
            }
        };
        let req = req.into_inner();
        let topic = req.topic.unwrap_or_default();
        // Every queue goes to every consumer: receives pop from all of a
        // topic's queues for the group, whatever queue they name.
        Ok(Response::new(
            match self.queues(&ext, &topic, req.endpoints).await {
                Ok(qs) => rmq::QueryAssignmentResponse {
                    status: Some(ok()),
                    assignments: qs
                        .into_iter()
                        .map(|q| rmq::Assignment {
                            message_queue: Some(q),
                        })
                        .collect(),
                },
                Err(status) => rmq::QueryAssignmentResponse {
                    status: Some(status),
                    assignments: Vec::new(),
                },
            },
        ))
    }

    type ReceiveMessageStream = ReceiveStream;

    async fn receive_message(
        &self,
        req: Request<rmq::ReceiveMessageRequest>,
    ) -> Result<Response<Self::ReceiveMessageStream>, Status> {
        let status_only = |s: rmq::Status| -> Response<ReceiveStream> {
            Response::new(once(vec![rmq::ReceiveMessageResponse {
                content: Some(rmq::receive_message_response::Content::Status(s)),
            }]))
        };
        let ext = match self.admit(&req) {
            Ok(ext) => ext,
            Err(status) => {
                return Ok(status_only(status));
            }
        };
        let deadline = grpc_timeout(&req);
        let req = req.into_inner();
        let group = name_of(req.group.as_ref());
        let asked = req.message_queue.as_ref().and_then(|q| q.topic.clone());
        let topic = name_of(asked.as_ref());
        let invisible_ms = req.invisible_duration.as_ref().map(ms_of).unwrap_or(30_000);
        if invisible_ms == 0 {
            return Ok(status_only(st(
                Code::IllegalInvisibleTime,
                "invisible duration must be positive",
            )));
        }
        let mut wait = req
            .long_polling_timeout
            .as_ref()
            .map(|d| Duration::from_millis(ms_of(d)))
            .unwrap_or(Duration::from_secs(20))
            .min(MAX_POLL);
        if let Some(d) = deadline {
            wait = wait.min(d.saturating_sub(POLL_MARGIN));
        }
        let filter = req.filter_expression.as_ref().and_then(|f| {
            let expr = f.expression.trim();
            let sql = f.r#type == rmq::FilterType::Sql as i32;
            if !sql && (expr.is_empty() || expr == "*") {
                return None;
            }
            Some(pb::FilterExpression {
                r#type: if sql {
                    pb::FilterType::Sql
                } else {
                    pb::FilterType::Tag
                } as i32,
                expression: expr.to_string(),
            })
        });
        let preq = with_peer(
            &ext,
            pb::ReceiveRequest {
                topic,
                group,
                max_messages: req
                    .batch_size
                    .clamp(1, crate::service::MAX_RECEIVE_MESSAGES as i32)
                    as u32,
                invisible_duration_ms: invisible_ms,
                wait_ms: wait.as_millis() as u64,
                filter,
                retry: None,
            },
        );
        let mut stream = match Petrel::receive(&self.petrel, preq).await {
            Ok(r) => r.into_inner(),
            Err(s) => return Ok(status_only(err(s))),
        };
        let mut records = Vec::new();
        let mut failed = None;
        while let Some(item) = stream.next().await {
            match item {
                Ok(batch) => records.extend(batch.records),
                Err(s) => {
                    failed = Some(err(s));
                    break;
                }
            }
        }
        use rmq::receive_message_response::Content;
        let now = timestamp(petrel_proto::now_ms());
        let mut out = Vec::with_capacity(records.len() + 2);
        if records.is_empty() {
            out.push(Content::Status(
                failed.unwrap_or_else(|| st(Code::MessageNotFound, "no new message")),
            ));
        } else {
            // Records already leased are delivered even if the stream then
            // failed: they are the client's now.
            out.push(Content::Status(ok()));
            out.extend(records.into_iter().map(|r| {
                // Named as the client asked (`%DLQ%G` stays so).
                let mut m = to_rocketmq(r, Some(invisible_ms));
                if asked.is_some() {
                    m.topic = asked.clone();
                }
                Content::Message(m)
            }));
        }
        out.push(Content::DeliveryTimestamp(now));
        Ok(Response::new(once(
            out.into_iter()
                .map(|c| rmq::ReceiveMessageResponse { content: Some(c) })
                .collect(),
        )))
    }

    async fn ack_message(
        &self,
        req: Request<rmq::AckMessageRequest>,
    ) -> Result<Response<rmq::AckMessageResponse>, Status> {
        let entries_with = |entries: &[rmq::AckMessageEntry], s: &rmq::Status| {
            entries
                .iter()
                .map(|e| rmq::AckMessageResultEntry {
                    message_id: e.message_id.clone(),
                    receipt_handle: e.receipt_handle.clone(),
                    status: Some(s.clone()),
                })
                .collect()
        };
        let ext = match self.admit(&req) {
            Ok(ext) => ext,
            Err(status) => {
                let entries = entries_with(&req.get_ref().entries, &status);
                return Ok(Response::new(rmq::AckMessageResponse {
                    status: Some(status),
                    entries,
                }));
            }
        };
        let req = req.into_inner();
        if req.entries.is_empty() {
            return Ok(Response::new(rmq::AckMessageResponse {
                status: Some(st(Code::BadRequest, "no entries")),
                entries: Vec::new(),
            }));
        }
        let preq = with_peer(
            &ext,
            pb::AckRequest {
                topic: name_of(req.topic.as_ref()),
                group: name_of(req.group.as_ref()),
                receipt_handles: req
                    .entries
                    .iter()
                    .map(|e| e.receipt_handle.clone())
                    .collect(),
            },
        );
        let results = match Petrel::ack(&self.petrel, preq).await {
            Ok(r) => r.into_inner().results,
            Err(s) => {
                let status = err(s);
                let entries = entries_with(&req.entries, &status);
                return Ok(Response::new(rmq::AckMessageResponse {
                    status: Some(status),
                    entries,
                }));
            }
        };
        let mut top: Option<rmq::Status> = None;
        let entries: Vec<rmq::AckMessageResultEntry> = req
            .entries
            .iter()
            .zip(results)
            .map(|(e, r)| {
                let s = if r.code == 0 {
                    ok()
                } else {
                    status_of(&PetrelError::from_detail(&pb::ErrorDetail {
                        code: r.code,
                        message: r.message,
                        ..Default::default()
                    }))
                };
                top = Some(match top.take() {
                    None => s.clone(),
                    Some(t) if t.code == s.code => t,
                    Some(_) => st(Code::MultipleResults, "entries differ"),
                });
                rmq::AckMessageResultEntry {
                    message_id: e.message_id.clone(),
                    receipt_handle: e.receipt_handle.clone(),
                    status: Some(s),
                }
            })
            .collect();
        Ok(Response::new(rmq::AckMessageResponse {
            status: Some(top.unwrap_or_else(ok)),
            entries,
        }))
    }

    async fn forward_message_to_dead_letter_queue(
        &self,
        req: Request<rmq::ForwardMessageToDeadLetterQueueRequest>,
    ) -> Result<Response<rmq::ForwardMessageToDeadLetterQueueResponse>, Status> {
        // A PushConsumer sends this when its listener failed a message on
        // its last attempt (or asked for it outright). The record leaves the
        // group at once and is stored in the group's dead-letter topic,
        // `GROUP.dlq`, exactly as when Petrel runs out of attempts itself.
        let status = match self.admit(&req) {
            Err(s) => s,
            Ok(ext) => {
                let req = req.into_inner();
                let preq = with_peer(
                    &ext,
                    pb::NackRequest {
                        topic: name_of(req.topic.as_ref()),
                        group: name_of(req.group.as_ref()),
                        receipt_handle: req.receipt_handle,
                        reason: format!(
                            "forwarded by the RocketMQ client after delivery attempt {} of {}",
                            req.delivery_attempt, req.max_delivery_attempts
                        ),
                        dead_letter: true,
                    },
                );
                match Petrel::nack(&self.petrel, preq).await {
                    Ok(_) => ok(),
                    Err(s) => err(s),
                }
            }
        };
        Ok(Response::new(
            rmq::ForwardMessageToDeadLetterQueueResponse {
                status: Some(status),
            },
        ))
    }

    type PullMessageStream = PullStream;

    async fn pull_message(
        &self,
        _req: Request<rmq::PullMessageRequest>,
    ) -> Result<Response<Self::PullMessageStream>, Status> {
        Ok(Response::new(once(vec![rmq::PullMessageResponse {
            content: Some(rmq::pull_message_response::Content::Status(st(
                Code::NotImplemented,
                "PullConsumer is not supported; use a SimpleConsumer",
            ))),
        }])))
    }

    async fn update_offset(
        &self,
        _req: Request<rmq::UpdateOffsetRequest>,
    ) -> Result<Response<rmq::UpdateOffsetResponse>, Status> {
        Ok(Response::new(rmq::UpdateOffsetResponse {
            status: Some(st(Code::NotImplemented, "PullConsumer is not supported")),
        }))
    }

    async fn get_offset(
        &self,
        _req: Request<rmq::GetOffsetRequest>,
    ) -> Result<Response<rmq::GetOffsetResponse>, Status> {
        Ok(Response::new(rmq::GetOffsetResponse {
            status: Some(st(Code::NotImplemented, "PullConsumer is not supported")),
            offset: 0,
        }))
    }

    async fn query_offset(
        &self,
        _req: Request<rmq::QueryOffsetRequest>,
    ) -> Result<Response<rmq::QueryOffsetResponse>, Status> {
        Ok(Response::new(rmq::QueryOffsetResponse {
            status: Some(st(Code::NotImplemented, "PullConsumer is not supported")),
            offset: 0,
        }))
    }

    async fn end_transaction(
        &self,
        req: Request<rmq::EndTransactionRequest>,
    ) -> Result<Response<rmq::EndTransactionResponse>, Status> {
        let ext = match self.admit(&req) {
            Ok(ext) => ext,
            Err(status) => {
                return Ok(Response::new(rmq::EndTransactionResponse {
                    status: Some(status),
                }));
            }
        };
        let req = req.into_inner();
        let commit = match rmq::TransactionResolution::try_from(req.resolution) {
            Ok(rmq::TransactionResolution::Commit) => true,
            Ok(rmq::TransactionResolution::Rollback) => false,
            // The checker does not know yet: keep it open; it is asked again.
            _ => {
                return Ok(Response::new(rmq::EndTransactionResponse {
                    status: Some(ok()),
                }))
            }
        };
        let preq = with_peer(
            &ext,
            pb::EndTransactionRequest {
                topic: name_of(req.topic.as_ref()),
                transaction_id: req.transaction_id,
                commit,
            },
        );
        let status = match Petrel::end_transaction(&self.petrel, preq).await {
            Ok(_) => ok(),
            Err(s) => err(s),
        };
        Ok(Response::new(rmq::EndTransactionResponse {
            status: Some(status),
        }))
    }

    type TelemetryStream = TelemetryStream;

    async fn telemetry(
        &self,
        req: Request<tonic::Streaming<rmq::TelemetryCommand>>,
    ) -> Result<Response<Self::TelemetryStream>, Status> {
        let admitted = self.admit(&req);
        let refused = admitted.as_ref().err().cloned();
        let ext = admitted.unwrap_or_default();
        let client = client_id(&req);
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel::<Result<rmq::TelemetryCommand, Status>>(16);
        let this = self.clone();
        tokio::spawn(async move {
            let mut watching: Vec<tokio::task::JoinHandle<()>> = Vec::new();
            while let Some(Ok(cmd)) = inbound.next().await {
                let Some(rmq::telemetry_command::Command::Settings(s)) = cmd.command else {
                    // Stack traces and verify results: nothing to do.
                    continue;
                };
                if let Some(status) = &refused {
                    let _ = tx
                        .send(Ok(rmq::TelemetryCommand {
                            status: Some(status.clone()),
                            command: None,
                        }))
                        .await;
                    continue;
                }
                let merged = this.merge(s);
                // A producer of transactional topics gets their checks.
                if let Some(rmq::settings::PubSub::Publishing(p)) = &merged.pub_sub {
                    for h in watching.drain(..) {
                        h.abort();
                    }
                    for t in &p.topics {
                        watching.push(tokio::spawn(this.clone().watch(
                            ext.clone(),
                            name_of(Some(t)),
                            tx.clone(),
                        )));
                    }
                }
                if !client.is_empty() {
                    this.settings.insert(client.clone(), merged.clone());
                }
                let answer = rmq::TelemetryCommand {
                    status: Some(ok()),
                    command: Some(rmq::telemetry_command::Command::Settings(merged)),
                };
                if tx.send(Ok(answer)).await.is_err() {
                    break;
                }
            }
            for h in watching {
                h.abort();
            }
        });
        let out = tokio_stream::wrappers::ReceiverStream::new(rx);
        Ok(Response::new(Box::pin(out)))
    }

    async fn notify_client_termination(
        &self,
        req: Request<rmq::NotifyClientTerminationRequest>,
    ) -> Result<Response<rmq::NotifyClientTerminationResponse>, Status> {
        self.settings.remove(&client_id(&req));
        let status = self.admit(&req).err().unwrap_or_else(ok);
        Ok(Response::new(rmq::NotifyClientTerminationResponse {
            status: Some(status),
        }))
    }

    async fn change_invisible_duration(
        &self,
        req: Request<rmq::ChangeInvisibleDurationRequest>,
    ) -> Result<Response<rmq::ChangeInvisibleDurationResponse>, Status> {
        let reply = |status: rmq::Status, receipt_handle: String| {
            Response::new(rmq::ChangeInvisibleDurationResponse {
                status: Some(status),
                receipt_handle,
            })
        };
        let ext = match self.admit(&req) {
            Ok(ext) => ext,
            Err(status) => {
                return Ok(reply(status, String::new()));
            }
        };
        let req = req.into_inner();
        let ms = req.invisible_duration.as_ref().map(ms_of).unwrap_or(0);
        if ms == 0 {
            return Ok(reply(
                st(
                    Code::IllegalInvisibleTime,
                    "invisible duration must be positive",
                ),
                String::new(),
            ));
        }
        let preq = with_peer(
            &ext,
            pb::ChangeInvisibleDurationRequest {
                topic: name_of(req.topic.as_ref()),
                group: name_of(req.group.as_ref()),
                receipt_handle: req.receipt_handle,
                invisible_duration_ms: ms,
            },
        );
        match Petrel::change_invisible_duration(&self.petrel, preq).await {
            Ok(r) => Ok(reply(ok(), r.into_inner().receipt_handle)),
            Err(s) => Ok(reply(err(s), String::new())),
        }
    }

    async fn recall_message(
        &self,
        _req: Request<rmq::RecallMessageRequest>,
    ) -> Result<Response<rmq::RecallMessageResponse>, Status> {
        Ok(Response::new(rmq::RecallMessageResponse {
            status: Some(st(Code::NotImplemented, "recall is not supported")),
            message_id: String::new(),
        }))
    }
}

impl RocketMqService {
    /// Forwards the transaction checks of `topic` (when it is a
    /// transactional topic) to a producer's telemetry stream as
    /// `RecoverOrphanedTransactionCommand`s, until the stream ends.
    async fn watch(
        self,
        ext: tonic::Extensions,
        topic: String,
        tx: mpsc::Sender<Result<rmq::TelemetryCommand, Status>>,
    ) {
        match self.topic(&ext, &topic).await {
            Ok(t)
                if t.config.as_ref().map(|c| c.message_type)
                    == Some(pb::MessageType::Transaction as i32) => {}
            _ => return,
        }
        let req = with_peer(
            &ext,
            pb::WatchTransactionsRequest {
                topic: topic.clone(),
            },
        );
        let Ok(r) = Petrel::watch_transactions(&self.petrel, req).await else {
            return;
        };
        let mut checks = r.into_inner();
        while let Some(Ok(c)) = checks.next().await {
            let Some(first) = c.first else { continue };
            let mut message = to_rocketmq(first, None);
            if let Some(sp) = message.system_properties.as_mut() {
                sp.message_type = rmq::MessageType::Transaction as i32;
                sp.receipt_handle = None;
            }
            let cmd = rmq::TelemetryCommand {
                status: Some(ok()),
                command: Some(
                    rmq::telemetry_command::Command::RecoverOrphanedTransactionCommand(
                        rmq::RecoverOrphanedTransactionCommand {
                            message: Some(message),
                            transaction_id: c.transaction_id,
                        },
                    ),
                ),
            };
            if tx.send(Ok(cmd)).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_map_namespaces_and_dead_letter_topics() {
        let r = |ns: &str, n: &str| rmq::Resource {
            resource_namespace: ns.into(),
            name: n.into(),
        };
        assert_eq!(name_of(Some(&r("", "orders"))), "orders");
        assert_eq!(name_of(Some(&r("shop", "orders"))), "shop%orders");
        assert_eq!(name_of(Some(&r("", "%DLQ%workers"))), "workers.dlq");
        assert_eq!(
            name_of(Some(&r("shop", "%DLQ%workers"))),
            "shop%workers.dlq"
        );
        // Not a dead-letter name: passed on for validation to refuse.
        assert_eq!(name_of(Some(&r("", "%DLQ%"))), "%DLQ%");
        assert_eq!(name_of(None), "");
    }

    use super::*;

    #[test]
    fn every_petrel_error_has_a_rocketmq_code_the_clients_know() {
        for e in [
            PetrelError::NotFound("topic \"x\"".into()),
            PetrelError::InvalidArgument("x".into()),
            PetrelError::NotLeader {
                group: 1,
                leader: None,
            },
            PetrelError::TooLarge("x".into()),
            PetrelError::Unavailable("x".into()),
            PetrelError::Corrupt("x".into()),
            PetrelError::AlreadyExists("x".into()),
            PetrelError::OffsetOutOfRange("x".into()),
            PetrelError::ReceiptExpired("x".into()),
            PetrelError::Internal("x".into()),
            PetrelError::Timeout("x".into()),
            PetrelError::WrongMessageType("x".into()),
            PetrelError::InvalidFilter("x".into()),
            PetrelError::RateLimited("x".into()),
            PetrelError::Unauthenticated("x".into()),
            PetrelError::PermissionDenied("x".into()),
            PetrelError::LimitExceeded("x".into()),
        ] {
            let s = status_of(&e);
            assert!(Code::try_from(s.code).is_ok(), "{e}: {}", s.code);
            assert_ne!(s.code, Code::Ok as i32);
        }
        assert_eq!(
            status_of(&PetrelError::NotFound("topic \"t\" not found".into())).code,
            Code::TopicNotFound as i32
        );
    }

    #[test]
    fn messages_keep_keys_ids_and_properties_both_ways() {
        let m = rmq::Message {
            topic: Some(resource("orders")),
            user_properties: [("region".to_string(), "eu".to_string())].into(),
            system_properties: Some(rmq::SystemProperties {
                tag: Some("created".into()),
                keys: vec!["k1".into(), "k2".into()],
                message_id: "01ABCDEF".into(),
                born_host: "host-1".into(),
                born_timestamp: Some(timestamp(1_700_000_000_000)),
                ..Default::default()
            }),
            body: bytes::Bytes::from_static(b"hello"),
        };
        let p = to_petrel(&m, None).unwrap();
        assert_eq!((p.key.as_str(), p.tag.as_str()), ("k1", "created"));
        let r = pb::Record {
            message_id: "petrel-id".into(),
            topic: "orders".into(),
            key: p.key.clone(),
            tag: p.tag.clone(),
            properties: p.properties.clone(),
            body: p.body.clone(),
            attempt: 2,
            receipt_handle: "rh".into(),
            ..Default::default()
        };
        let back = to_rocketmq(r, Some(5000));
        let sp = back.system_properties.unwrap();
        assert_eq!(sp.keys, ["k1", "k2"]);
        assert_eq!(sp.message_id, "01ABCDEF");
        assert_eq!(sp.tag.as_deref(), Some("created"));
        assert_eq!(sp.born_host, "host-1");
        assert_eq!(sp.delivery_attempt, Some(2));
        assert_eq!(sp.receipt_handle.as_deref(), Some("rh"));
        assert_eq!(
            back.user_properties, m.user_properties,
            "reserved keys stripped"
        );
        assert_eq!(back.topic.unwrap().name, "orders");
        // The reserved prefix cannot be set by a client.
        let mut bad = m.clone();
        bad.user_properties.insert(PROP_ID.into(), "x".into());
        assert!(to_petrel(&bad, None).is_err());
    }

    #[test]
    fn grpc_timeouts_parse() {
        let mut r = Request::new(());
        r.metadata_mut()
            .insert("grpc-timeout", "40S".parse().unwrap());
        assert_eq!(grpc_timeout(&r), Some(Duration::from_secs(40)));
        r.metadata_mut()
            .insert("grpc-timeout", "2500m".parse().unwrap());
        assert_eq!(grpc_timeout(&r), Some(Duration::from_millis(2500)));
        r.metadata_mut()
            .insert("grpc-timeout", "x".parse().unwrap());
        assert_eq!(grpc_timeout(&r), None);
    }
}
