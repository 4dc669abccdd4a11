//! Petrel proxy: the stateless front end.
//!
//! ```text
//!  sdk ──petrel.v1.Petrel──▶ service.rs ──validate, pick queue──▶ batcher.rs (per leader)
//!                                │                                  │
//!                                └── routes.rs (cached route table) ◀┘ BrokerData RPCs
//! ```
//!
//! # Invariants
//! - The proxy keeps no consumer state: leases, offsets and retry schedules
//!   live in brokers; receipt handles carry what an ack needs to be routed.
//! - The queue a send goes to is a pure function of the request (key hash,
//!   or producer id + first sequence), so a retried request lands in the
//!   same queue and is de-duplicated there.

pub mod batcher;
pub mod config;
pub mod routes;
pub mod service;

pub use config::{ProxyArgs, ProxyConfig};
use petrel_proto::pb::petrel_server::PetrelServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Largest client message accepted (a send batch).
pub const MAX_CLIENT_MESSAGE: usize = 64 << 20;

/// Serves the client API on `listener` until `shutdown` is cancelled.
pub async fn run(
    config: ProxyConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    if config.receipt_secret == config::DEV_RECEIPT_SECRET {
        tracing::warn!("using the development receipt secret; set --receipt-secret in production");
    }
    let router = routes::Router::new(config.brokers.clone());
    tokio::spawn(
        router
            .clone()
            .run(config.route_refresh, shutdown.child_token()),
    );
    let svc = service::ProxyService::new(config, router, shutdown.child_token());
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(
            PetrelServer::new(svc)
                .max_decoding_message_size(MAX_CLIENT_MESSAGE)
                .max_encoding_message_size(MAX_CLIENT_MESSAGE),
        )
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await?;
    Ok(())
}
