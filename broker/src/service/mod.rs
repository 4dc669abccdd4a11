//! The broker's gRPC services: `BrokerData` for proxies, `RaftTransport`
//! for peers. Handlers validate what they receive, clone a group handle out
//! of the registry before awaiting, and map every failure to a typed error.
//!
//! This module starts the server and holds what the calls share; the
//! `BrokerData` impl below only routes each call to its module by kind
//! (`append`, `consume`, `scan`, `admin`); the Raft entry point is `raft`.

use std::sync::Arc;

use petrel_proto::pb;
use petrel_proto::pb::broker as bpb;
use petrel_proto::pb::broker::broker_data_server::{BrokerData, BrokerDataServer};
use petrel_proto::pb::broker::raft_transport_server::RaftTransportServer;
use petrel_proto::PetrelError;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response as TResponse, Status};

use crate::network::MAX_RAFT_MESSAGE;
use crate::node::{GroupHandle, Node};
use crate::types::META_GROUP;

mod admin;
mod append;
mod consume;
mod raft;
mod scan;

pub use crate::meta::topic_route;
pub use crate::network::MAX_DATA_MESSAGE;
pub use admin::MAX_BROKER_ID;

/// Most record bytes one pop returns (records and dead letters).
pub const POP_MAX_BYTES: usize = 16 << 20;
/// Most record bytes one find-by-key answer carries.
pub const FIND_MAX_BYTES: usize = 16 << 20;

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
}

#[tonic::async_trait]
impl BrokerData for Service {
    async fn append(&self, req: Request<bpb::AppendRequest>) -> R<bpb::AppendResponse> {
        self.handle_append(req).await
    }

    async fn pop(&self, req: Request<bpb::PopRequest>) -> R<bpb::PopResponse> {
        self.handle_pop(req).await
    }

    async fn wait_ready(&self, req: Request<bpb::WaitReadyRequest>) -> R<bpb::WaitReadyResponse> {
        self.handle_wait_ready(req).await
    }

    async fn nack(&self, req: Request<bpb::BrokerNackRequest>) -> R<bpb::BrokerNackResponse> {
        self.handle_nack(req).await
    }

    async fn lookup(&self, req: Request<bpb::LookupRequest>) -> R<bpb::LookupResponse> {
        self.handle_lookup(req).await
    }

    async fn find_by_key(&self, req: Request<bpb::FindByKeyRequest>) -> R<bpb::FindByKeyResponse> {
        self.handle_find_by_key(req).await
    }

    async fn end_transaction(
        &self,
        req: Request<bpb::BrokerEndTransactionRequest>,
    ) -> R<bpb::BrokerEndTransactionResponse> {
        self.handle_end_transaction(req).await
    }

    async fn stale_transactions(
        &self,
        req: Request<bpb::StaleTransactionsRequest>,
    ) -> R<bpb::StaleTransactionsResponse> {
        self.handle_stale_transactions(req).await
    }

    async fn dead_lettered(
        &self,
        req: Request<bpb::DeadLetteredRequest>,
    ) -> R<bpb::DeadLetteredResponse> {
        self.handle_dead_lettered(req).await
    }

    async fn ack(&self, req: Request<bpb::BrokerAckRequest>) -> R<bpb::BrokerAckResponse> {
        self.handle_ack(req).await
    }

    async fn change_invisible(
        &self,
        req: Request<bpb::BrokerChangeInvisibleRequest>,
    ) -> R<bpb::BrokerChangeInvisibleResponse> {
        self.handle_change_invisible(req).await
    }

    async fn read(&self, req: Request<bpb::BrokerReadRequest>) -> R<bpb::BrokerReadResponse> {
        self.handle_read(req).await
    }

    async fn commit_offset(
        &self,
        req: Request<bpb::BrokerCommitOffsetRequest>,
    ) -> R<bpb::BrokerCommitOffsetResponse> {
        self.handle_commit_offset(req).await
    }

    async fn delete_consumer(
        &self,
        req: Request<bpb::BrokerDeleteConsumerRequest>,
    ) -> R<bpb::BrokerDeleteConsumerResponse> {
        self.handle_delete_consumer(req).await
    }

    async fn offset_for_time(
        &self,
        req: Request<bpb::BrokerOffsetForTimeRequest>,
    ) -> R<bpb::BrokerOffsetForTimeResponse> {
        self.handle_offset_for_time(req).await
    }

    async fn queue_stats(
        &self,
        req: Request<bpb::QueueStatsRequest>,
    ) -> R<bpb::QueueStatsResponse> {
        self.handle_queue_stats(req).await
    }

    async fn inject_fault(
        &self,
        req: Request<bpb::InjectFaultRequest>,
    ) -> R<bpb::InjectFaultResponse> {
        self.handle_inject_fault(req).await
    }

    async fn routes(&self, req: Request<bpb::RoutesRequest>) -> R<bpb::RoutesResponse> {
        self.handle_routes(req).await
    }

    async fn meta_write(&self, req: Request<bpb::MetaWriteRequest>) -> R<bpb::MetaWriteResponse> {
        self.handle_meta_write(req).await
    }
}
