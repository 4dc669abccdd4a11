//! Petrel client SDK.
//!
//! A thin client that talks only to Petrel proxies (gRPC service
//! `petrel.v1.Petrel`); it knows nothing about brokers, queue leaders or
//! Raft. It batches sends, retries idempotently and fails over between
//! proxies.
//!
//! ```text
//!  Producer ─┐                         ┌─▶ proxy A ─┐
//!  SimpleConsumer ─┼─ Client (channels per proxy) ─┤            ├─▶ brokers
//!  PullConsumer ───┤   retry + failover             └─▶ proxy B ─┘
//!  Admin ──────────┘
//! ```
//!
//! # Example
//!
//! ```no_run
//! use petrel_sdk::{Client, Message, TopicSpec};
//! use std::time::Duration;
//!
//! # async fn demo() -> petrel_sdk::Result<()> {
//! // Any number of proxy endpoints; calls fail over between them.
//! let client = Client::connect(["127.0.0.1:7400", "127.0.0.1:7401"])?;
//!
//! // Create a topic (ignore "already exists" on re-runs).
//! match client.admin().create_topic(TopicSpec::new("orders").queues(4).replicas(3)).await {
//!     Ok(_) | Err(petrel_sdk::Error::AlreadyExists(_)) => {}
//!     Err(e) => return Err(e),
//! }
//!
//! // Produce: concurrent sends are batched; retries are idempotent.
//! let producer = client.producer("orders").build();
//! let receipt = producer
//!     .send(Message::new("order 42").with_key("customer-7").with_tag("created"))
//!     .await?;
//! println!("stored as {}", receipt.message_id);
//! producer.close().await;
//!
//! // Consume in pop mode: receive, process, ack.
//! let consumer = client
//!     .simple_consumer("orders", "billing")
//!     .invisible_duration(Duration::from_secs(30))
//!     .build();
//! for m in consumer.receive(32).await? {
//!     println!("{} (attempt {}): {}", m.message_id, m.attempt, String::from_utf8_lossy(&m.body));
//!     consumer.ack(&m).await?;
//! }
//!
//! // Or replay by offset.
//! let pull = client.pull_consumer("orders", "replayer");
//! let batch = pull.read(0, 0, 1 << 20, 100).await?;
//! pull.commit(0, batch.next_offset).await?;
//! # Ok(()) }
//! ```
//!
//! # Errors and retries
//! Every call returns [`Error`] (= [`petrel_proto::PetrelError`]), a typed
//! error with a stable code. Retryable errors ([`Error::is_retryable`]:
//! unavailable, not-leader, timeout, transport failures) are retried with
//! capped exponential back-off on the next proxy until the client's request
//! timeout is spent; all others are returned at once.
//!
//! # Invariants
//! - A retried `Send` is byte-for-byte the request first sent (same producer
//!   id, sequences and order), so brokers de-duplicate it.
//! - The SDK never panics on bad input: malformed endpoints, oversized
//!   messages and odd server answers are errors.

mod admin;
mod client;
mod consumer;
mod message;
pub mod producer;
pub mod push;
pub mod transaction;

pub use admin::{Admin, TopicSpec};
pub use client::{Client, ClientBuilder};
pub use consumer::{PullConsumer, ReadBatch, RetryPolicy, SimpleConsumer, SimpleConsumerBuilder};
pub use message::{Message, ReceivedMessage, SendReceipt};
pub use petrel_proto::PetrelError as Error;
pub use producer::{Producer, ProducerBuilder};
pub use push::{PushConsumer, PushConsumerBuilder, PushStats};
pub use transaction::{Transaction, TransactionCheck, TransactionResolution};

/// The client protocol's messages and gRPC client (`petrel.v1`), for the
/// admin calls that return them and for callers who want the raw API.
/// Only the client API: the brokers' internal protocol and the RocketMQ
/// definitions the proxy serves are not part of the SDK.
pub mod pb {
    pub use petrel_proto::pb::petrel::v1::*;
}

/// The result of every SDK call.
pub type Result<T> = std::result::Result<T, Error>;

/// Defaults, for documentation and for tools that show them.
pub mod defaults {
    pub use crate::admin::{DEFAULT_QUEUES, DEFAULT_REPLICAS};
    pub use crate::client::{
        DEFAULT_CONNECT_TIMEOUT, DEFAULT_REQUEST_TIMEOUT, INITIAL_BACKOFF, MAX_BACKOFF,
    };
    pub use crate::consumer::{DEFAULT_INVISIBLE_DURATION, DEFAULT_WAIT};
    pub use crate::producer::{
        DEFAULT_LINGER, DEFAULT_MAX_BATCH_BYTES, DEFAULT_MAX_BATCH_MESSAGES, DEFAULT_MAX_IN_FLIGHT,
    };
}
