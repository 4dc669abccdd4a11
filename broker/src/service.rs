//! The broker's gRPC services: `BrokerData` for proxies, `RaftTransport`
//! for peers. Handlers validate what they receive, clone a group handle out
//! of the registry before awaiting, and map every failure to a typed error.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use petrel_proto::pb;
use petrel_proto::pb::broker as bpb;
use petrel_proto::pb::broker::broker_data_client::BrokerDataClient;
use petrel_proto::pb::broker::broker_data_server::{BrokerData, BrokerDataServer};
use petrel_proto::pb::broker::raft_transport_server::{RaftTransport, RaftTransportServer};
use petrel_proto::record::RecordData;
use petrel_proto::{validate, PetrelError};
use rocksdb::{Direction, IteratorMode};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response as TResponse, Status};

use crate::keys;
use crate::meta::TopicSpec;
use crate::network::{
    encode_result, KIND_APPEND, KIND_ELECT, KIND_PING, KIND_QUIET, KIND_SNAPSHOT, KIND_TRANSFER,
    KIND_VOTE, MAX_RAFT_MESSAGE,
};
use crate::node::{GroupHandle, Node};
use crate::queue::{Changes, PopParams, RecordView, RetryPolicy, TxnOpen};
use crate::storage::{StorageError, CF_RECORDS};
use crate::types::{AppendPart, Command, Response, META_GROUP};

/// How long a Raft message for a group this broker does not (yet) host
/// waits for the group to be started.
const UNKNOWN_GROUP_GRACE: std::time::Duration = std::time::Duration::from_millis(500);
/// Most record bytes one pop returns (records and dead letters).
pub const POP_MAX_BYTES: usize = 16 << 20;
/// Most record bytes one find-by-key answer carries.
pub const FIND_MAX_BYTES: usize = 16 << 20;
/// Largest gRPC message a proxy may send to a broker.
pub const MAX_DATA_MESSAGE: usize = 64 << 20;
/// Longest nack reason kept (longer ones are cut).
const MAX_REASON: usize = 512;
const FORWARDED: &str = "x-petrel-forwarded";

pub async fn serve(
    node: Arc<Node>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    use tokio_stream::StreamExt as _;
    if let Some(files) = node.config.tls.clone() {
        // Only holders of a cluster certificate (brokers, proxies) get in:
        // no one else can speak Raft or write the map.
        let tls =
            petrel_proto::tls::ServerTls::load(files, petrel_proto::tls::ClientAuth::Required)
                .map_err(anyhow::Error::msg)?;
        let incoming = tls.incoming(listener, "petrel_broker");
        return serve_on(node, incoming, shutdown).await;
    }
    // tonic's `tcp_nodelay` does not reach streams passed in: set it here
    // (see `petrel_proto::transport`).
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|c| {
        if let Ok(s) = &c {
            let _ = s.set_nodelay(true);
        }
        c
    });
    serve_on(node, incoming, shutdown).await
}

async fn serve_on<S, IO, E>(
    node: Arc<Node>,
    incoming: S,
    shutdown: CancellationToken,
) -> anyhow::Result<()>
where
    S: tokio_stream::Stream<Item = Result<IO, E>> + Send + 'static,
    IO: petrel_proto::tls::ServerIo,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let svc = Service { node };
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(petrel_proto::transport::STREAM_WINDOW))
        .initial_connection_window_size(Some(petrel_proto::transport::CONNECTION_WINDOW))
        .layer(petrel_admin::RpcMetricsLayer {
            prefix: "petrel_broker",
        })
        .add_service(
            BrokerDataServer::new(svc.clone())
                .max_decoding_message_size(MAX_DATA_MESSAGE)
                .max_encoding_message_size(MAX_DATA_MESSAGE),
        )
        .add_service(
            RaftTransportServer::new(svc)
                .max_decoding_message_size(MAX_RAFT_MESSAGE)
                .max_encoding_message_size(MAX_RAFT_MESSAGE),
        )
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await?;
    Ok(())
}

#[derive(Clone)]
pub struct Service {
    node: Arc<Node>,
}

type R<T> = Result<TResponse<T>, Status>;

fn queue_of(h: &GroupHandle, group: u64) -> Result<&Arc<crate::sm::QueueShared>, PetrelError> {
    h.queue
        .as_ref()
        .ok_or_else(|| PetrelError::InvalidArgument(format!("group {group} is not a queue")))
}

impl Service {
    /// Runs `f` on the consumer groups this leader serves in `term` (see
    /// `queue::Serving`) and records the consumer ops it took for the next
    /// checkpoint (starting a writer if none runs). Returns `f`'s result
    /// and the lane's sequence number covering everything the served state
    /// now holds (wait on it to make the call durable).
    ///
    /// A receive (`wakes` false) cannot make a record deliverable for
    /// anyone; waiting receives only re-check their lease timers.
    fn consumer_change<T>(
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
    fn check_group_cap(
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
                        Ok(h) => match node.write(group, &h, Command::Checkpoint(cp.clone())).await
                        {
                            Ok(Response::Done(Ok(()))) => Ok(()),
                            Ok(Response::Done(Err(e))) => Err(PetrelError::from(e)),
                            Ok(other) => Err(PetrelError::Internal(format!(
                                "unexpected response {other:?}"
                            ))),
                            Err(e) => Err(e),
                        },
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

    /// Queue `group` of this leader, once it may serve consumers from
    /// memory (see `Node::consumer_term`), and the term to issue leases in.
    fn consumer_queue(
        &self,
        group: u64,
    ) -> Result<(Arc<crate::sm::QueueShared>, u64), PetrelError> {
        let h = self.leader(group)?;
        let term = self.node.consumer_term(group, &h)?;
        Ok((queue_of(&h, group)?.clone(), term))
    }

    fn leader(&self, group: u64) -> Result<GroupHandle, PetrelError> {
        if group == META_GROUP {
            return Err(PetrelError::InvalidArgument(
                "group 0 is the meta group".into(),
            ));
        }
        self.node.ensure_leader(group)
    }

    async fn append_one(&self, g: bpb::AppendRecords) -> bpb::AppendedOffsets {
        let group = g.group_id;
        match self.append_inner(g).await {
            Ok(v) => bpb::AppendedOffsets {
                group_id: group,
                error: None,
                offsets: v.iter().map(|x| x.0).collect(),
                duplicate: v.iter().map(|x| x.1).collect(),
            },
            Err(e) => bpb::AppendedOffsets {
                group_id: group,
                error: Some(e.to_detail()),
                offsets: vec![],
                duplicate: vec![],
            },
        }
    }

    async fn append_inner(&self, g: bpb::AppendRecords) -> Result<Vec<(u64, bool)>, PetrelError> {
        let h = self.leader(g.group_id)?;
        validate::producer_id(&g.producer_id)?;
        if g.messages.is_empty() {
            return Ok(vec![]);
        }
        let now = petrel_proto::now_ms();
        let mt = self.message_type_of(g.group_id);
        let txn_id = g.messages[0].transaction_id.clone();
        if g.messages.iter().any(|m| m.transaction_id != txn_id) {
            return Err(PetrelError::InvalidArgument(
                "all messages of one request must belong to the same transaction".into(),
            ));
        }
        let txn = if txn_id.is_empty() {
            None
        } else {
            let q = queue_of(&h, g.group_id)?;
            if let Some(t) = q.read().txns.get(&txn_id) {
                if let Some(committed) = t.outcome {
                    let how = if committed {
                        "committed"
                    } else {
                        "rolled back"
                    };
                    return Err(PetrelError::InvalidArgument(format!(
                        "transaction {txn_id:?} was already {how}"
                    )));
                }
            }
            Some(TxnOpen {
                id: txn_id,
                now_ms: now,
                check_ms: self.node.runtime.transaction_check_ms(),
            })
        };
        let mut records = Vec::with_capacity(g.messages.len());
        let mut bytes = 0u64;
        let mut deliver_at = Vec::new();
        for m in g.messages {
            validate::message(&m, self.node.runtime.max_record_bytes())?;
            let at = validate::message_type_fit(&m, mt, now)?;
            // Already due: stored as a plain record, delivered at once.
            let hold = if at > now { at } else { 0 };
            deliver_at.push(hold);
            let mut properties: Vec<(String, String)> = m.properties.into_iter().collect();
            properties.sort();
            let rec = RecordData {
                producer_id: g.producer_id.clone(),
                sequence: m.sequence,
                born_timestamp_ms: m.born_timestamp_ms,
                store_timestamp_ms: now,
                key: m.key,
                tag: m.tag,
                properties,
                body: m.body,
                message_group: m.message_group,
                deliver_at_ms: at,
            };
            let enc = rec.encode();
            bytes += enc.len() as u64;
            records.push((m.sequence, enc));
        }
        if deliver_at.iter().all(|t| *t == 0) {
            deliver_at.clear();
        }
        let part = AppendPart {
            producer_id: g.producer_id,
            records,
            deliver_at,
            txn,
        };
        let v = self.node.append(g.group_id, &h, part).await?;
        let topic = self.topic_name_of(g.group_id);
        let new = v.iter().filter(|(_, dup)| !dup).count() as u64;
        metrics::counter!("petrel_broker_appended_records_total", "topic" => topic.clone())
            .increment(new);
        metrics::counter!("petrel_broker_appended_bytes_total", "topic" => topic).increment(bytes);
        Ok(v)
    }

    /// The name of the topic a queue group belongs to ("" if unknown).
    fn topic_name_of(&self, group: u64) -> String {
        let map = self.node.map_rx.borrow();
        map.topics
            .values()
            .find(|t| t.queues.iter().any(|q| q.group_id == group))
            .map(|t| t.spec.name.clone())
            .unwrap_or_default()
    }

    /// The message type of the topic a queue group belongs to (NORMAL if
    /// unknown: the map may lag a just-created topic only on followers).
    fn message_type_of(&self, group: u64) -> pb::MessageType {
        let map = self.node.map_rx.borrow();
        map.topics
            .values()
            .find(|t| t.queues.iter().any(|q| q.group_id == group))
            .and_then(|t| pb::MessageType::try_from(t.spec.message_type).ok())
            .unwrap_or(pb::MessageType::Normal)
    }

    /// Reads `offsets` (ascending runs are read with one iterator seek
    /// each, not one lookup per record, which is most of a backlog drain's
    /// reads), in order, stopping before `max_bytes` (at least one).
    fn read_records(
        &self,
        group: u64,
        offsets: &[u64],
        max_bytes: usize,
    ) -> Vec<(u64, Result<Bytes, PetrelError>)> {
        let mut out = Vec::with_capacity(offsets.len());
        let mut bytes = 0usize;
        let mut i = 0;
        while i < offsets.len() {
            let mut run = 1;
            while i + run < offsets.len() && offsets[i + run] == offsets[i] + run as u64 {
                run += 1;
            }
            let got: Vec<(u64, Result<Bytes, PetrelError>)> = if run < 4 {
                offsets[i..i + run]
                    .iter()
                    .map(|o| (*o, self.read_record(group, *o)))
                    .collect()
            } else {
                self.read_run(group, offsets[i], run)
            };
            for (off, r) in got {
                let size = r.as_ref().map(|b| b.len()).unwrap_or(0);
                if !out.is_empty() && bytes + size > max_bytes {
                    return out;
                }
                bytes += size;
                out.push((off, r));
            }
            i += run;
        }
        out
    }

    /// `n` consecutive records from `first`, with one iterator.
    fn read_run(&self, group: u64, first: u64, n: usize) -> Vec<(u64, Result<Bytes, PetrelError>)> {
        let store = &self.node.store;
        let mut opts = rocksdb::ReadOptions::default();
        opts.set_iterate_upper_bound(keys::record_key(group, first + n as u64));
        let mut it = store.db().raw_iterator_cf_opt(&store.cf(CF_RECORDS), opts);
        it.seek(keys::record_key(group, first));
        let mut out = Vec::with_capacity(n);
        for off in first..first + n as u64 {
            let here = it
                .key()
                .and_then(keys::decode_group_u64)
                .filter(|(g, o)| *g == group && *o == off);
            match (here, it.value()) {
                (Some(_), Some(v)) => {
                    out.push((off, Self::checked(group, off, v.to_vec())));
                    it.next();
                }
                _ => {
                    // A gap or an iterator error: fall back to one lookup,
                    // which reports it precisely.
                    if let Err(e) = it.status() {
                        out.push((off, Err(storage_err(group, off, e.into()))));
                        it.seek(keys::record_key(group, off + 1));
                    } else {
                        out.push((off, self.read_record(group, off)));
                    }
                }
            }
        }
        out
    }

    fn checked(group: u64, offset: u64, v: Vec<u8>) -> Result<Bytes, PetrelError> {
        if let Err(e) = petrel_proto::record::verify(&v) {
            tracing::error!(group, offset, error = %e, "corrupt record on read");
            return Err(PetrelError::Corrupt(format!(
                "record at group {group} offset {offset} failed its checksum: {e}"
            )));
        }
        Ok(Bytes::from(v))
    }

    /// Reads stored bytes of `offset`, verifying the CRC.
    fn read_record(&self, group: u64, offset: u64) -> Result<Bytes, PetrelError> {
        let v = self
            .node
            .store
            .get(CF_RECORDS, &keys::record_key(group, offset))
            .map_err(|e| storage_err(group, offset, e))?
            .ok_or_else(|| {
                PetrelError::Internal(format!("group {group} offset {offset} is missing"))
            })?;
        Self::checked(group, offset, v)
    }

    async fn meta_write(
        &self,
        req: bpb::MetaWriteRequest,
    ) -> Result<bpb::MetaWriteResponse, PetrelError> {
        let meta = self.node.meta();
        let h = GroupHandle::new(meta.clone(), None);
        let map = self.node.map_rx.borrow().clone();
        let (cmd, name) = match req.op {
            None => return Err(PetrelError::InvalidArgument("empty meta write".into())),
            Some(bpb::meta_write_request::Op::CreateTopic(c)) => {
                validate::topic_name(&c.name)?;
                let configured = self
                    .node
                    .config
                    .peers
                    .keys()
                    .filter(|b| !map.removed.contains(b))
                    .count();
                if map.brokers.len() < configured {
                    // Start-up: the controller registers the configured
                    // brokers within a second; placing replicas before that
                    // would crowd them onto the first ones. Retryable.
                    return Err(PetrelError::Unavailable(format!(
                        "cluster is starting: {} of {configured} brokers registered",
                        map.brokers.len()
                    )));
                }
                validate::topic_shape(
                    c.queue_count,
                    c.replication_factor,
                    map.active_brokers().count(),
                )?;
                let mt = match pb::MessageType::try_from(c.message_type) {
                    Ok(pb::MessageType::Unspecified) | Ok(pb::MessageType::Normal) => {
                        pb::MessageType::Normal
                    }
                    Ok(t) => t,
                    Err(_) => {
                        return Err(PetrelError::InvalidArgument("unknown message type".into()))
                    }
                };
                if map.topics.contains_key(&c.name) {
                    return Err(PetrelError::AlreadyExists(format!(
                        "topic {:?} already exists",
                        c.name
                    )));
                }
                let spec = TopicSpec {
                    name: c.name.clone(),
                    queue_count: c.queue_count,
                    replication_factor: c.replication_factor,
                    message_type: mt as i32,
                    retention_ms: c.retention_ms,
                    retention_bytes: c.retention_bytes,
                };
                let placements = map.place(c.queue_count, c.replication_factor);
                (
                    Command::CreateTopic {
                        spec,
                        placements,
                        now_ms: petrel_proto::now_ms(),
                    },
                    c.name,
                )
            }
            Some(bpb::meta_write_request::Op::UpdateTopic(u)) => {
                validate::topic_name(&u.name)?;
                let Some(t) = map.topics.get(&u.name) else {
                    return Err(PetrelError::NotFound(format!(
                        "topic {:?} does not exist",
                        u.name
                    )));
                };
                let cur = t.queues.len() as u32;
                let add = if u.queue_count == 0 || u.queue_count == cur {
                    vec![]
                } else if u.queue_count < cur {
                    return Err(PetrelError::InvalidArgument(format!(
                        "queue count can only grow (topic has {cur}, asked for {})",
                        u.queue_count
                    )));
                } else {
                    validate::topic_shape(
                        u.queue_count,
                        t.spec.replication_factor,
                        map.active_brokers().count(),
                    )?;
                    map.place(u.queue_count - cur, t.spec.replication_factor)
                };
                (
                    Command::UpdateTopic {
                        name: u.name.clone(),
                        retention_ms: u.retention_ms,
                        retention_bytes: u.retention_bytes,
                        target_queue_count: u.queue_count.max(cur),
                        add_queues: add,
                    },
                    u.name,
                )
            }
            Some(bpb::meta_write_request::Op::DeleteTopic(name)) => {
                validate::topic_name(&name)?;
                (Command::DeleteTopic { name: name.clone() }, name)
            }
            Some(bpb::meta_write_request::Op::RegisterBroker(b)) => {
                if b.id == 0 || b.id > MAX_BROKER_ID {
                    return Err(PetrelError::InvalidArgument(format!(
                        "broker id must be 1..={MAX_BROKER_ID}, got {}",
                        b.id
                    )));
                }
                validate_address(&b.address)?;
                match map.brokers.get(&b.id) {
                    // Registering again where it is: nothing to do.
                    Some(a) if *a == b.address => {}
                    // Only the broker itself may move its address; an
                    // operator typo must not redirect a live broker.
                    Some(a) if !b.self_register => {
                        return Err(PetrelError::AlreadyExists(format!(
                            "broker {} is already registered at {a}; drain and remove it before \
                             registering that id elsewhere",
                            b.id
                        )))
                    }
                    _ => {}
                }
                if let Some((other, _)) = map
                    .brokers
                    .iter()
                    .find(|(id, a)| **id != b.id && **a == b.address)
                {
                    return Err(PetrelError::AlreadyExists(format!(
                        "address {} is already broker {other}",
                        b.address
                    )));
                }
                (
                    Command::RegisterBroker {
                        id: b.id,
                        address: b.address,
                    },
                    String::new(),
                )
            }
            Some(bpb::meta_write_request::Op::DrainBroker(id)) => {
                let active = map.active_brokers().filter(|b| *b != id).count();
                let max_rf = map
                    .topics
                    .values()
                    .map(|t| t.spec.replication_factor as usize)
                    .max()
                    .unwrap_or(0);
                if map.brokers.contains_key(&id) && active < max_rf {
                    return Err(PetrelError::InvalidArgument(format!(
                        "cannot drain broker {id}: {active} other active brokers cannot hold \
                         replication factor {max_rf}; add a broker first"
                    )));
                }
                (Command::SetDraining { id, draining: true }, String::new())
            }
            Some(bpb::meta_write_request::Op::UndrainBroker(id)) => (
                Command::SetDraining {
                    id,
                    draining: false,
                },
                String::new(),
            ),
            Some(bpb::meta_write_request::Op::RemoveBroker(id)) => {
                (Command::RemoveBroker { id }, String::new())
            }
            Some(bpb::meta_write_request::Op::SettleReplicas(s)) => (
                Command::SettleReplicas {
                    group: s.group_id,
                    generation: s.generation,
                },
                String::new(),
            ),
            Some(bpb::meta_write_request::Op::Rebalance(_)) => {
                let moves = self.node.balance_round().await as u32;
                return Ok(bpb::MetaWriteResponse {
                    topic: None,
                    map_version: map.version,
                    moves,
                });
            }
        };
        match self.node.write(META_GROUP, &h, cmd).await? {
            Response::Meta(Ok(version)) => {
                let map = self.node.map_rx.borrow().clone();
                Ok(bpb::MetaWriteResponse {
                    topic: map.topics.get(&name).map(topic_route),
                    map_version: version,
                    moves: 0,
                })
            }
            Response::Meta(Err(e)) => Err(e.into()),
            other => Err(PetrelError::Internal(format!(
                "unexpected response {other:?}"
            ))),
        }
    }
}

/// Largest broker id (ids come from configuration, e.g. pod ordinals).
pub const MAX_BROKER_ID: u64 = u32::MAX as u64;

/// One `HOST:PORT`: a DNS name, IPv4 or `[IPv6]` host and a port.
fn validate_address(a: &str) -> Result<(), PetrelError> {
    let ok = !a.is_empty()
        && a.len() <= 255
        && a.rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0))
        && a.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '[' | ']'));
    if ok {
        Ok(())
    } else {
        Err(PetrelError::InvalidArgument(format!(
            "invalid broker address {a:?}: expected HOST:PORT"
        )))
    }
}

/// A failed storage read as the caller sees it: damaged bytes are
/// `corrupt` (not retried elsewhere as if the broker were busy), anything
/// else `internal`.
fn storage_err(group: u64, offset: u64, e: StorageError) -> PetrelError {
    tracing::error!(group, offset, error = %e, "storage read failed");
    let m = format!("group {group} offset {offset}: {e}");
    if e.is_corruption() {
        PetrelError::Corrupt(m)
    } else {
        PetrelError::Internal(m)
    }
}

pub fn topic_route(t: &crate::meta::Topic) -> bpb::TopicRoute {
    bpb::TopicRoute {
        config: Some(t.spec.to_pb()),
        queues: t
            .queues
            .iter()
            .map(|q| bpb::QueueAssignment {
                queue: q.queue,
                group_id: q.group_id,
                replicas: q.replicas.clone(),
                retiring: q.retiring.clone(),
            })
            .collect(),
    }
}

#[tonic::async_trait]
impl BrokerData for Service {
    async fn append(&self, req: Request<bpb::AppendRequest>) -> R<bpb::AppendResponse> {
        let req = req.into_inner();
        let futs = req.groups.into_iter().map(|g| self.append_one(g));
        let groups = futures::future::join_all(futs).await;
        Ok(TResponse::new(bpb::AppendResponse { groups }))
    }

    async fn pop(&self, req: Request<bpb::PopRequest>) -> R<bpb::PopResponse> {
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

    async fn wait_ready(&self, req: Request<bpb::WaitReadyRequest>) -> R<bpb::WaitReadyResponse> {
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

    async fn nack(&self, req: Request<bpb::BrokerNackRequest>) -> R<bpb::BrokerNackResponse> {
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

    async fn lookup(&self, req: Request<bpb::LookupRequest>) -> R<bpb::LookupResponse> {
        let req = req.into_inner();
        let h = self.leader(req.group_id)?;
        let q = queue_of(&h, req.group_id)?;
        let (start, end) = {
            let st = q.read();
            (st.header.start_offset, st.header.next_offset)
        };
        if req.offset < start || req.offset >= end {
            return Err(PetrelError::NotFound(format!(
                "offset {} is not stored (the queue holds {start}..{end})",
                req.offset
            ))
            .into());
        }
        let encoded = self.read_record(req.group_id, req.offset)?;
        let st = q.read();
        Ok(TResponse::new(bpb::LookupResponse {
            encoded,
            hold: st.hold_of(req.offset).to_string(),
            deliveries: st
                .delivery_states(req.offset)
                .into_iter()
                .map(|(group, state, attempt, until)| pb::DeliveryState {
                    group,
                    state: state.to_string(),
                    attempt,
                    invisible_until_ms: until,
                })
                .collect(),
        }))
    }

    async fn find_by_key(&self, req: Request<bpb::FindByKeyRequest>) -> R<bpb::FindByKeyResponse> {
        let req = req.into_inner();
        if req.key.is_empty() || req.key.len() > validate::MAX_KEY_LEN {
            return Err(PetrelError::InvalidArgument(format!(
                "key must be 1..={} bytes",
                validate::MAX_KEY_LEN
            ))
            .into());
        }
        let max = if req.max == 0 { 100 } else { req.max.min(1000) } as usize;
        let h = self.leader(req.group_id)?;
        let start = queue_of(&h, req.group_id)?.read().header.start_offset;
        let prefix = if req.client_id {
            keys::client_id_index_prefix(req.group_id, &req.key)
        } else {
            keys::key_index_prefix(req.group_id, &req.key)
        };
        let cf = self.node.store.cf(crate::storage::CF_INDEXES);
        let mut records = Vec::new();
        let mut bytes = 0usize;
        for kv in self
            .node
            .store
            .db()
            .iterator_cf(&cf, IteratorMode::From(&prefix, Direction::Forward))
        {
            let (k, _) = kv.map_err(|e| PetrelError::Internal(e.to_string()))?;
            if !k.starts_with(&prefix) || k.len() != prefix.len() + 8 {
                break;
            }
            let off = u64::from_be_bytes(k[prefix.len()..].try_into().unwrap_or([0; 8]));
            // Index entries of records removed by retention are skipped
            // (they are not range-deleted with the records).
            if off < start {
                continue;
            }
            let encoded = self.read_record(req.group_id, off)?;
            bytes += encoded.len();
            records.push(bpb::StoredRecord {
                offset: off,
                encoded,
            });
            // Bounded in bytes too (at least one record).
            if records.len() >= max || bytes >= FIND_MAX_BYTES {
                break;
            }
        }
        Ok(TResponse::new(bpb::FindByKeyResponse { records }))
    }

    async fn end_transaction(
        &self,
        req: Request<bpb::BrokerEndTransactionRequest>,
    ) -> R<bpb::BrokerEndTransactionResponse> {
        let req = req.into_inner();
        validate::transaction_id(&req.transaction_id)?;
        let h = self.leader(req.group_id)?;
        let cmd = Command::EndTxn {
            id: req.transaction_id,
            commit: req.commit,
        };
        match self.node.write(req.group_id, &h, cmd).await? {
            Response::Count(n) => Ok(TResponse::new(bpb::BrokerEndTransactionResponse {
                records: n,
            })),
            other => Err(PetrelError::Internal(format!("unexpected response {other:?}")).into()),
        }
    }

    async fn stale_transactions(
        &self,
        req: Request<bpb::StaleTransactionsRequest>,
    ) -> R<bpb::StaleTransactionsResponse> {
        let group = req.into_inner().group_id;
        let h = self.leader(group)?;
        let now = petrel_proto::now_ms();
        // Past the last check, the broker's own timeout rolls it back.
        let mut stale: Vec<_> = queue_of(&h, group)?
            .read()
            .stale_txns(now)
            .into_iter()
            .filter(|(_, t)| t.checks < crate::config::TRANSACTION_MAX_CHECKS)
            .collect();
        if stale.is_empty() {
            return Ok(TResponse::new(bpb::StaleTransactionsResponse::default()));
        }
        stale.truncate(256);
        // Each check carries the transaction's first record: as many as fit
        // one answer's byte budget (at least one); the rest are handed out
        // by the next call.
        let mut transactions = Vec::with_capacity(stale.len());
        let mut bytes = 0usize;
        for (id, t) in stale {
            let first = t.offsets.first().copied();
            let first_encoded = first
                .and_then(|o| self.read_record(group, o).ok())
                .unwrap_or_default();
            bytes += first_encoded.len() + id.len() + 64;
            if bytes > POP_MAX_BYTES && !transactions.is_empty() {
                break;
            }
            transactions.push(bpb::StaleTransaction {
                transaction_id: id,
                opened_ms: t.opened_ms,
                check: t.checks + 1,
                first_offset: first.unwrap_or(0),
                first_encoded,
            });
        }
        // Record the checks before handing them out, so each is handed out
        // once per interval.
        let cmd = Command::TxnChecked {
            ids: transactions
                .iter()
                .map(|t| t.transaction_id.clone())
                .collect(),
            now_ms: now,
            interval_ms: self.node.runtime.transaction_check_ms(),
        };
        self.node.write(group, &h, cmd).await?;
        Ok(TResponse::new(bpb::StaleTransactionsResponse {
            transactions,
        }))
    }

    async fn dead_lettered(
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

    async fn ack(&self, req: Request<bpb::BrokerAckRequest>) -> R<bpb::BrokerAckResponse> {
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

    async fn change_invisible(
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

    async fn read(&self, req: Request<bpb::BrokerReadRequest>) -> R<bpb::BrokerReadResponse> {
        let req = req.into_inner();
        let group = req.group_id;
        let h = self.leader(group)?;
        let header = queue_of(&h, group)?.read().header;
        if req.offset > header.next_offset || req.offset < header.start_offset {
            return Err(PetrelError::OffsetOutOfRange(format!(
                "offset {} is outside [{}, {}] of group {group}",
                req.offset, header.start_offset, header.next_offset
            ))
            .into());
        }
        let max_bytes = if req.max_bytes == 0 {
            1 << 20
        } else {
            req.max_bytes.min(32 << 20)
        } as usize;
        let max_n = if req.max_messages == 0 {
            1000
        } else {
            req.max_messages.min(10_000)
        } as usize;
        let cf = self.node.store.cf(CF_RECORDS);
        let from = keys::record_key(group, req.offset);
        let mut records = Vec::new();
        let mut bytes = 0usize;
        let iter = self
            .node
            .store
            .db()
            .iterator_cf(&cf, IteratorMode::From(&from, Direction::Forward));
        for (expect, kv) in (req.offset..).zip(iter) {
            let (k, v) = kv.map_err(|e| storage_err(group, expect, e.into()))?;
            let Some((g, off)) = keys::decode_group_u64(&k) else {
                break;
            };
            if g != group || off >= header.next_offset || records.len() >= max_n {
                break;
            }
            if off != expect {
                return Err(PetrelError::Corrupt(format!(
                    "group {group}: offset {expect} is missing"
                ))
                .into());
            }
            if let Err(e) = petrel_proto::record::verify(&v) {
                tracing::error!(group, offset = off, error = %e, "corrupt record on read");
                return Err(PetrelError::Corrupt(format!(
                    "record at group {group} offset {off} failed its checksum: {e}"
                ))
                .into());
            }
            if !records.is_empty() && bytes + v.len() > max_bytes {
                break;
            }
            bytes += v.len();
            records.push(bpb::StoredRecord {
                offset: off,
                encoded: Bytes::from(Vec::from(v)),
            });
        }
        Ok(TResponse::new(bpb::BrokerReadResponse {
            records,
            start_offset: header.start_offset,
            end_offset: header.next_offset,
        }))
    }

    async fn commit_offset(
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

    async fn delete_consumer(
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

    async fn offset_for_time(
        &self,
        req: Request<bpb::BrokerOffsetForTimeRequest>,
    ) -> R<bpb::BrokerOffsetForTimeResponse> {
        let req = req.into_inner();
        let g = req.group_id;
        let h = self.leader(g)?;
        let q = queue_of(&h, g)?;
        let (mut lo, mut hi) = {
            let st = q.read();
            (st.header.start_offset, st.header.next_offset)
        };
        // Store times are assigned in offset order (by the leader of the
        // moment), so the first record at or after the time is found by
        // binary search over the retained range.
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let v = self.read_record(g, mid)?;
            let ts = petrel_proto::record::store_timestamp_ms(&v).unwrap_or(i64::MAX);
            if ts < req.timestamp_ms {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        Ok(TResponse::new(bpb::BrokerOffsetForTimeResponse {
            offset: lo,
        }))
    }

    async fn queue_stats(
        &self,
        req: Request<bpb::QueueStatsRequest>,
    ) -> R<bpb::QueueStatsResponse> {
        let req = req.into_inner();
        let mut queues = Vec::with_capacity(req.group_ids.len());
        for g in req.group_ids {
            let h = match self.leader(g) {
                Ok(h) => h,
                Err(e) => {
                    queues.push(bpb::QueueStats {
                        group_id: g,
                        error: Some(e.to_detail()),
                        ..Default::default()
                    });
                    continue;
                }
            };
            let Ok(q) = queue_of(&h, g) else { continue };
            let st = q.read();
            let now = petrel_proto::now_ms();
            let end = st.header.next_offset;
            // Age of the record at `offset` (0 when there is none to wait for).
            let age = |offset: u64| -> u64 {
                if offset >= end {
                    return 0;
                }
                self.node.record_age_ms(g, offset, now)
            };
            queues.push(bpb::QueueStats {
                group_id: g,
                start_age_ms: age(st.header.start_offset),
                start_offset: st.header.start_offset,
                end_offset: st.header.next_offset,
                consumer_groups: st
                    .served()
                    .iter()
                    .filter(|(n, _)| req.consumer_group.is_empty() || **n == req.consumer_group)
                    .map(|(n, c)| bpb::ConsumerGroupStats {
                        name: n.clone(),
                        committed_offset: c.committed,
                        inflight: c.inflight(),
                        skipped: c.skipped,
                        dead_lettered: c.dead_lettered,
                        filtered: c.filtered,
                        scheduled: st.due.len() as u64,
                        uncommitted: st
                            .txns
                            .values()
                            .filter(|t| t.outcome.is_none())
                            .map(|t| t.offsets.len() as u64)
                            .sum(),
                        lag_ms: age(c.committed.max(st.header.start_offset)),
                    })
                    .collect(),
                error: None,
            });
        }
        Ok(TResponse::new(bpb::QueueStatsResponse { queues }))
    }

    async fn inject_fault(
        &self,
        req: Request<bpb::InjectFaultRequest>,
    ) -> R<bpb::InjectFaultResponse> {
        if !cfg!(feature = "fault-injection") || !self.node.config.fault_injection {
            return Err(PetrelError::InvalidArgument(
                "fault injection is disabled (a test build started with --fault-injection only)"
                    .into(),
            )
            .into());
        }
        let blocked = req.into_inner().blocked;
        tracing::warn!(
            ?blocked,
            "fault injection: Raft traffic to these brokers is dropped"
        );
        self.node.pool.set_blocked(&blocked);
        Ok(TResponse::new(bpb::InjectFaultResponse {}))
    }

    async fn routes(&self, req: Request<bpb::RoutesRequest>) -> R<bpb::RoutesResponse> {
        let known = req.into_inner().known_map_version;
        let map = self.node.map_rx.borrow().clone();
        let mut r = self.node.routes_response(&map);
        if known != 0 && known == r.map_version {
            r.brokers.clear();
            r.topics.clear();
            r.map_unchanged = true;
        }
        Ok(TResponse::new(r))
    }

    async fn meta_write(&self, req: Request<bpb::MetaWriteRequest>) -> R<bpb::MetaWriteResponse> {
        let forwarded = req.metadata().get(FORWARDED).is_some();
        let req = req.into_inner();
        let meta = self.node.meta();
        match Node::leader_of(&meta) {
            Some(l) if l == self.node.id => Ok(TResponse::new(self.meta_write(req).await?)),
            Some(l) if !forwarded => {
                let addr = self.node.broker_addr(l)?;
                let ch = self.node.pool.channel(l, &addr)?;
                let mut r = Request::new(req);
                r.metadata_mut()
                    .insert(FORWARDED, "1".parse().expect("ascii"));
                r.set_timeout(crate::node::WRITE_TIMEOUT);
                let resp = BrokerDataClient::new(ch).meta_write(r).await?;
                Ok(resp)
            }
            other => Err(PetrelError::NotLeader {
                group: META_GROUP,
                leader: other,
            }
            .into()),
        }
    }
}

#[tonic::async_trait]
impl RaftTransport for Service {
    async fn raft(&self, req: Request<bpb::RaftRequest>) -> R<bpb::RaftResponse> {
        Ok(TResponse::new(self.raft_one(req.into_inner()).await?))
    }

    async fn raft_batch(&self, req: Request<bpb::RaftBatchRequest>) -> R<bpb::RaftBatchResponse> {
        let reqs = req.into_inner().requests;
        if reqs.len() > 4096 {
            return Err(PetrelError::InvalidArgument("raft batch too large".into()).into());
        }
        let futs = reqs.into_iter().map(|r| async move {
            self.raft_one(r)
                .await
                .unwrap_or_else(|status| bpb::RaftResponse {
                    payload: Bytes::new(),
                    error: Some(PetrelError::from_status(&status).to_detail()),
                })
        });
        let responses = futures::future::join_all(futs).await;
        Ok(TResponse::new(bpb::RaftBatchResponse { responses }))
    }
}

/// Most queues one `WaitReady` watches.
const MAX_WAIT_QUEUES: usize = 4096;
/// Longest `WaitReady`.
const MAX_WAIT_MS: u64 = 60_000;

impl Service {
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

    async fn raft_one(&self, req: bpb::RaftRequest) -> Result<bpb::RaftResponse, Status> {
        if req.from != 0 && self.node.pool.is_blocked(req.from) {
            return Err(PetrelError::Unavailable(format!(
                "fault injection: broker {} is cut off",
                req.from
            ))
            .into());
        }
        if req.from != 0 {
            self.node.pool.heard_in(req.from);
        }
        // A group just created by the meta group may reach a peer before
        // that peer's reconciler has started it: give it a moment rather
        // than failing the vote or append (and logging an error) at once.
        let mut h = self.node.group(req.group_id);
        let waited = std::time::Instant::now();
        while h.is_none() && waited.elapsed() < UNKNOWN_GROUP_GRACE {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            h = self.node.group(req.group_id);
        }
        let Some(h) = h else {
            return Ok(bpb::RaftResponse {
                payload: Bytes::new(),
                error: Some(
                    PetrelError::Unavailable(format!(
                        "broker {} does not host group {}",
                        self.node.id, req.group_id
                    ))
                    .to_detail(),
                ),
            });
        };
        let bad = |e: bincode::Error| {
            PetrelError::InvalidArgument(format!("undecodable raft payload: {e}")).to_status()
        };
        // Any Raft traffic for the group but a ping or a quiet request
        // wakes a quiet replica (quiet.rs).
        if req.kind != KIND_PING && req.kind != KIND_QUIET {
            h.quiet.wake(&h.raft);
        }
        let resp = match req.kind {
            KIND_APPEND => {
                let rpc = bincode::deserialize(&req.payload).map_err(bad)?;
                encode_result(&h.raft.append_entries(rpc).await)
            }
            KIND_VOTE => {
                let rpc = bincode::deserialize(&req.payload).map_err(bad)?;
                encode_result(&h.raft.vote(rpc).await)
            }
            KIND_SNAPSHOT => {
                let rpc = bincode::deserialize(&req.payload).map_err(bad)?;
                encode_result(&h.raft.install_snapshot(rpc).await)
            }
            KIND_PING => encode_control(Ok(())),
            KIND_QUIET => encode_control(self.node.quiet_request(
                req.group_id,
                req.from,
                &req.payload,
            )),
            KIND_ELECT => {
                let r = self.node.elect_now(req.group_id).await;
                encode_control(r)
            }
            KIND_TRANSFER => {
                let to: [u8; 8] = req.payload[..].try_into().map_err(|_| {
                    PetrelError::InvalidArgument("transfer payload must be a u64".into())
                        .to_status()
                })?;
                let r = self
                    .node
                    .transfer_leader(req.group_id, u64::from_be_bytes(to))
                    .await;
                encode_control(r)
            }
            k => {
                return Err(
                    PetrelError::InvalidArgument(format!("unknown raft message kind {k}")).into(),
                )
            }
        };
        Ok(resp)
    }
}

/// Control calls over the Raft transport answer with an empty payload or
/// a typed error.
fn encode_control(r: Result<(), PetrelError>) -> bpb::RaftResponse {
    match r {
        Ok(()) => bpb::RaftResponse {
            payload: Bytes::new(),
            error: None,
        },
        Err(e) => bpb::RaftResponse {
            payload: Bytes::new(),
            error: Some(e.to_detail()),
        },
    }
}
