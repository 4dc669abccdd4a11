//! Petrel broker: a storage node with no master role.
//!
//! ```text
//!            proxies ──BrokerData──▶ service.rs ──client_write──▶ queue group (Raft)
//!  peer brokers ──RaftTransport──▶ service.rs ──────────────────▶ any group by id
//!                                     node.rs: group registry, reconciler, controller
//!                                     sm.rs / log_store.rs ──▶ storage.rs (RocksDB)
//! ```
//!
//! Data is sharded into Raft groups (openraft 0.9): the meta group (id 0,
//! the cluster map) and one group per queue. Start a broker in-process with
//! [`run`]; the `petrel-broker` binary is a thin wrapper around it.

// openraft's storage traits fix the error type (`StorageError`, ~224 bytes);
// helpers that feed them return it too.
#![allow(clippy::result_large_err)]

pub mod config;
pub mod keys;
pub mod log_store;
pub mod meta;
pub mod network;
pub mod node;
pub mod queue;
pub mod service;
pub mod sm;
pub mod storage;
pub mod types;

use std::sync::Arc;

pub use config::{BrokerArgs, BrokerConfig};
pub use node::Node;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Runs a broker on `listener` until `shutdown` is cancelled, then stops its
/// Raft groups and closes its database.
pub async fn run(
    config: BrokerConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let node = Node::start(config, shutdown.child_token()).await?;
    let result = service::serve(node.clone(), listener, shutdown.clone()).await;
    node.stop().await;
    // Let in-flight tasks that hold store handles finish before returning,
    // so a restart in the same process can reopen the database.
    drop(node);
    result
}

/// Starts a broker in the background; returns the node and the task.
pub async fn spawn(
    config: BrokerConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<(Arc<Node>, tokio::task::JoinHandle<anyhow::Result<()>>)> {
    let node = Node::start(config, shutdown.child_token()).await?;
    let n = node.clone();
    let task = tokio::spawn(async move {
        let r = service::serve(n.clone(), listener, shutdown).await;
        n.stop().await;
        r
    });
    Ok((node, task))
}
