//! [`PushConsumer`]: hand each message to a handler; the consumer receives,
//! bounds concurrency, acks on success and nacks (with the group's
//! back-off) on failure.
//!
//! # Ordering
//! On a FIFO topic the broker leases one record per message group at a
//! time, so a group's next record is not even received before the previous
//! one is acked or dead-lettered. In ordered mode the consumer also runs the
//! records of one message group that arrive together strictly one after
//! another, in order.
//!
//! # Shutdown
//! [`PushConsumer::shutdown`] stops receiving, lets every running handler
//! finish and its ack/nack go out, and returns the counts. A receive cut
//! short by the shutdown may leave records leased to nobody; they come back
//! when their lease (`invisible_duration`) expires.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Semaphore};

use crate::consumer::{RetryPolicy, SimpleConsumer, SimpleConsumerBuilder};
use crate::message::ReceivedMessage;

/// Default number of handlers running at once.
pub const DEFAULT_CONCURRENCY: usize = 16;

/// Configures a [`PushConsumer`]; from [`crate::Client::push_consumer`].
///
/// ```no_run
/// # async fn demo(client: petrel_sdk::Client) {
/// let consumer = client
///     .push_consumer("orders", "billing")
///     .concurrency(8)
///     .start(|m| async move {
///         println!("{}", String::from_utf8_lossy(&m.body));
///         Ok::<(), String>(())
///     });
/// // ...
/// let stats = consumer.shutdown().await;
/// println!("{} handled, {} failed", stats.succeeded, stats.failed);
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct PushConsumerBuilder {
    inner: SimpleConsumerBuilder,
    concurrency: usize,
    ordered: bool,
}

impl PushConsumerBuilder {
    pub(crate) fn new(inner: SimpleConsumerBuilder) -> Self {
        Self {
            inner,
            concurrency: DEFAULT_CONCURRENCY,
            ordered: false,
        }
    }

    /// Most handlers running at once (default 16, at least 1).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// Run the records of one message group one at a time, in order (for
    /// FIFO topics).
    pub fn ordered(mut self, on: bool) -> Self {
        self.ordered = on;
        self
    }

    /// How long a received message stays leased (default 30 s): a handler
    /// that runs longer sees it redelivered.
    pub fn invisible_duration(mut self, d: Duration) -> Self {
        self.inner = self.inner.invisible_duration(d);
        self
    }

    /// See [`SimpleConsumerBuilder::filter_tag`].
    pub fn filter_tag(mut self, expr: impl Into<String>) -> Self {
        self.inner = self.inner.filter_tag(expr);
        self
    }

    /// See [`SimpleConsumerBuilder::filter_sql`].
    pub fn filter_sql(mut self, expr: impl Into<String>) -> Self {
        self.inner = self.inner.filter_sql(expr);
        self
    }

    /// The group's redelivery policy: attempts and nack back-off.
    pub fn retry_policy(mut self, p: RetryPolicy) -> Self {
        self.inner = self.inner.retry_policy(p);
        self
    }

    /// Starts receiving in the background and calls `handler` for every
    /// message: `Ok` acks it, `Err(reason)` nacks it.
    pub fn start<H, Fut, E>(self, handler: H) -> PushConsumer
    where
        H: Fn(ReceivedMessage) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display,
    {
        let consumer = self.inner.wait(Duration::from_secs(2)).build();
        let (stop_tx, stop_rx) = watch::channel(false);
        let stats = Arc::new(Counters::default());
        let run = Run {
            consumer,
            handler: Arc::new(move |m| {
                let f = handler(m);
                Box::pin(async move { f.await.map_err(|e| e.to_string()) })
                    as std::pin::Pin<Box<dyn Future<Output = Result<(), String>> + Send>>
            }),
            permits: Arc::new(Semaphore::new(self.concurrency)),
            concurrency: self.concurrency,
            ordered: self.ordered,
            stats: stats.clone(),
        };
        let task = tokio::spawn(run.run(stop_rx));
        PushConsumer {
            stop: stop_tx,
            task: Some(task),
            stats,
        }
    }
}

type Handler = Arc<
    dyn Fn(ReceivedMessage) -> std::pin::Pin<Box<dyn Future<Output = Result<(), String>> + Send>>
        + Send
        + Sync,
>;

#[derive(Debug, Default)]
struct Counters {
    succeeded: AtomicU64,
    failed: AtomicU64,
    ack_errors: AtomicU64,
}

/// What a push consumer did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PushStats {
    /// Handler returned `Ok` (and the ack was sent).
    pub succeeded: u64,
    /// Handler returned `Err` (and the message was nacked).
    pub failed: u64,
    /// Acks or nacks that failed (the message comes back when its lease
    /// expires).
    pub ack_errors: u64,
}

/// A running push consumer. Dropping it without [`PushConsumer::shutdown`]
/// stops receiving but does not wait for running handlers.
pub struct PushConsumer {
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
    stats: Arc<Counters>,
}

impl std::fmt::Debug for PushConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushConsumer")
            .field("stats", &self.stats())
            .finish()
    }
}

impl PushConsumer {
    /// Counts so far.
    pub fn stats(&self) -> PushStats {
        PushStats {
            succeeded: self.stats.succeeded.load(Ordering::Relaxed),
            failed: self.stats.failed.load(Ordering::Relaxed),
            ack_errors: self.stats.ack_errors.load(Ordering::Relaxed),
        }
    }

    /// Stops receiving, waits for running handlers and their acks, and
    /// returns the final counts.
    pub async fn shutdown(mut self) -> PushStats {
        let _ = self.stop.send(true);
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
        PushStats {
            succeeded: self.stats.succeeded.load(Ordering::Relaxed),
            failed: self.stats.failed.load(Ordering::Relaxed),
            ack_errors: self.stats.ack_errors.load(Ordering::Relaxed),
        }
    }
}

impl Drop for PushConsumer {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

struct Run {
    consumer: SimpleConsumer,
    handler: Handler,
    permits: Arc<Semaphore>,
    concurrency: usize,
    ordered: bool,
    stats: Arc<Counters>,
}

impl Run {
    async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            if *stop.borrow() {
                break;
            }
            // Receive only as many as there are free handler slots.
            let free = match tokio::select! {
                p = self.permits.clone().acquire_owned() => p.ok(),
                _ = stop.changed() => None,
            } {
                Some(p) => {
                    let n = self.permits.available_permits() + 1;
                    drop(p);
                    n
                }
                None => break,
            };
            let batch = tokio::select! {
                r = self.consumer.receive(free.min(32) as u32) => r,
                _ = stop.changed() => break,
            };
            let batch = match batch {
                Ok(b) => {
                    backoff = Duration::from_millis(100);
                    b
                }
                Err(e) => {
                    tracing::warn!(error = %e, "push consumer receive failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.changed() => break,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            for chain in self.chains(batch) {
                let Ok(permit) = self.permits.clone().acquire_owned().await else {
                    break;
                };
                let (c, h, st) = (
                    self.consumer.clone(),
                    self.handler.clone(),
                    self.stats.clone(),
                );
                tokio::spawn(async move {
                    for m in chain {
                        handle_one(&c, &h, &st, m).await;
                    }
                    drop(permit);
                });
            }
        }
        // Wait for every running handler (each holds a permit).
        let _ = self.permits.acquire_many(self.concurrency as u32).await;
    }

    /// Units of work: one message each, or in ordered mode one chain per
    /// message group (in arrival order, which is send order).
    fn chains(&self, batch: Vec<ReceivedMessage>) -> Vec<Vec<ReceivedMessage>> {
        if !self.ordered {
            return batch.into_iter().map(|m| vec![m]).collect();
        }
        let mut by_group: BTreeMap<String, Vec<ReceivedMessage>> = BTreeMap::new();
        let mut loose = Vec::new();
        for m in batch {
            if m.message_group.is_empty() {
                loose.push(vec![m]);
            } else {
                by_group.entry(m.message_group.clone()).or_default().push(m);
            }
        }
        by_group.into_values().chain(loose).collect()
    }
}

async fn handle_one(c: &SimpleConsumer, h: &Handler, st: &Counters, m: ReceivedMessage) {
    match h(m.clone()).await {
        Ok(()) => {
            st.succeeded.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = c.ack(&m).await {
                st.ack_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(id = %m.message_id, error = %e, "ack failed; it will be redelivered");
            }
        }
        Err(reason) => {
            st.failed.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = c.nack(&m, &reason).await {
                st.ack_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(id = %m.message_id, error = %e, "nack failed; it will be redelivered");
            }
        }
    }
}
