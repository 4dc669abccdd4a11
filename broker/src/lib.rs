//! Petrel broker: a storage node with no master role.
//!
//! ```text
//!            proxies ──BrokerData──▶ service/   ──client_write──▶ queue group (Raft)
//!  peer brokers ──RaftTransport──▶ service/   ──────────────────▶ any group by id
//!                                     node/: group registry, write path, reconciler (mod.rs),
//!                                       controller.rs, leadership.rs (failover), queue_tasks.rs
//!                                     sm.rs / log_store.rs ──▶ storage.rs (RocksDB)
//! ```
//!
//! Data is sharded into Raft groups (openraft 0.9): the meta group (id 0,
//! the cluster map) and one group per queue. Start a broker in-process with
//! [`run`]; the `petrel-broker` binary is a thin wrapper around it.

// openraft's storage traits fix the error type (`StorageError`, ~224 bytes);
// helpers that feed them return it too.
#![allow(clippy::result_large_err)]

pub mod append_lane;
pub mod apply_error;
pub mod checkpoint;
pub mod config;
pub mod keys;
pub mod log_store;
pub mod meta;
pub mod network;
pub mod node;
pub mod queue;
pub mod quiet;
pub mod service;
pub mod sm;
pub mod storage;
pub mod types;

use std::sync::Arc;

pub use config::{BrokerArgs, BrokerConfig};
pub use node::Node;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Runs a broker on `listener` until `shutdown` is cancelled, then hands
/// its leaderships to other replicas (while still serving them the votes),
/// stops its Raft groups and closes its database.
pub async fn run(
    config: BrokerConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let (node, task) = spawn(config, listener, shutdown).await?;
    let result = task.await?;
    // Let in-flight tasks that hold store handles finish before returning,
    // so a restart in the same process can reopen the database.
    drop(node);
    result
}

/// Starts a broker in the background; returns the node and the task, which
/// ends after `shutdown` is cancelled and the graceful stop is done.
pub async fn spawn(
    config: BrokerConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<(Arc<Node>, tokio::task::JoinHandle<anyhow::Result<()>>)> {
    spawn_with(config, listener, shutdown, true).await
}

/// [`spawn`], choosing whether a stop first hands leaderships away
/// (`graceful`). An embedded cluster that stops all its brokers at once
/// has no one to hand them to and skips it.
pub async fn spawn_with(
    config: BrokerConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
    graceful: bool,
) -> anyhow::Result<(Arc<Node>, tokio::task::JoinHandle<anyhow::Result<()>>)> {
    // Bind first, so a taken port fails the start with a clear error.
    let admin = match config.admin_listen {
        Some(a) => Some(petrel_admin::bind(a).await?),
        None => None,
    };
    let admin_tls = match &config.admin_tls {
        Some((cert, key)) => Some(
            petrel_proto::tls::ServerTls::load_http1(cert.clone(), key.clone())
                .map_err(|e| anyhow::anyhow!("--admin-tls-cert: {e}"))?,
        ),
        None => None,
    };
    let node = Node::start(config, CancellationToken::new()).await?;
    if let Some(l) = admin {
        // Weak: an open scrape connection must not keep the node (and its
        // database) alive after the broker stopped.
        let n = Arc::downgrade(&node);
        let ready: petrel_admin::Readiness = Arc::new(move || match n.upgrade() {
            Some(n) => n.readiness(),
            None => Err("stopped".into()),
        });
        let stop = shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) =
                petrel_admin::serve(l, ready, admin_tls, async move { stop.cancelled().await })
                    .await
            {
                tracing::error!(error = %e, "admin endpoint failed");
            }
        });
    }
    let n = node.clone();
    let task = tokio::spawn(async move {
        let server_stop = CancellationToken::new();
        let mut server = tokio::spawn(service::serve(n.clone(), listener, server_stop.clone()));
        let early = tokio::select! {
            _ = shutdown.cancelled() => None,
            r = &mut server => Some(r),
        };
        let r = match early {
            Some(r) => r,
            None => {
                if graceful {
                    n.hand_off_leaderships().await;
                }
                server_stop.cancel();
                server.await
            }
        };
        n.stop().await;
        r?
    });
    Ok((node, task))
}
