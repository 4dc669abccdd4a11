//! The producer: an async batcher in front of `Send`.
//!
//! ```text
//!  send() ──▶ bounded channel ──▶ batcher task ──▶ (≤ max_in_flight) Send RPCs
//!   ▲ oneshot per message         assigns sequences,         │
//!   └──────────────────────────── linger / size / count ◀────┘ results in order
//! ```
//!
//! # Idempotent retry
//! Every message gets the next per-producer `sequence` (1, 2, 3, ...) once,
//! when the producer first accepts it: `send` at the moment the batcher takes
//! it off the channel, `send_batch` when called. A request is built once; a
//! retry after a retryable error (possibly to another proxy) resends the
//! IDENTICAL request — same `producer_id`, same sequences, same order — so the
//! broker recognises what it already stored and stores it once, answering
//! `duplicate: true` for those messages.
//!
//! # Invariants
//! - Sequences within one request are strictly increasing.
//! - A message that fails local validation never joins a batch, so one bad
//!   message cannot fail other callers' messages.
//! - Several batches may be in flight at once (`max_in_flight`), so requests
//!   can reach brokers out of sequence order.

use crate::client::Client;
use crate::message::{Message, SendReceipt};
use crate::{pb, Error, Result};
use petrel_proto::validate;
use prost::Message as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, Notify, Semaphore};
use tokio::time::Instant;

/// Default longest time a message waits behind requests in flight before it
/// is sent anyway. A message sent while fewer than two requests are in
/// flight does not wait at all (batching is self-clocking).
pub const DEFAULT_LINGER: Duration = Duration::from_millis(5);
/// Requests in flight below which a message is sent at once rather than
/// coalesced behind them.
const EAGER_IN_FLIGHT: usize = 2;
/// Default largest batch, in encoded bytes.
pub const DEFAULT_MAX_BATCH_BYTES: usize = 1024 * 1024;
/// Default most messages per batch.
pub const DEFAULT_MAX_BATCH_MESSAGES: usize = 1000;
/// Default most Send requests in flight per producer.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 16;
/// Messages waiting for the batcher before `send` applies back-pressure.
const QUEUE_CAPACITY: usize = 8192;

/// Configures a [`Producer`]; from [`Client::producer`].
///
/// ```no_run
/// # fn demo(client: petrel_sdk::Client) {
/// use std::time::Duration;
/// let producer = client
///     .producer("orders")
///     .producer_id("order-service-1")
///     .linger(Duration::from_millis(2))
///     .max_batch_messages(500)
///     .build();
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct ProducerBuilder {
    client: Client,
    topic: String,
    producer_id: Option<String>,
    linger: Duration,
    max_batch_bytes: usize,
    max_batch_messages: usize,
    max_in_flight: usize,
    checker: Option<crate::transaction::Checker>,
}

impl ProducerBuilder {
    pub(crate) fn new(client: Client, topic: String) -> Self {
        Self {
            client,
            topic,
            producer_id: None,
            linger: DEFAULT_LINGER,
            max_batch_bytes: DEFAULT_MAX_BATCH_BYTES,
            max_batch_messages: DEFAULT_MAX_BATCH_MESSAGES,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            checker: None,
        }
    }

    /// TRANSACTION topics: answers the broker's questions about
    /// transactions left open (by this producer or one that died). The
    /// proxy this producer is connected to streams each check; the answer
    /// commits, rolls back, or (`Unknown`) leaves it for the next check.
    /// After 5 unanswered checks the broker rolls it back.
    pub fn transaction_checker<F>(mut self, f: F) -> Self
    where
        F: Fn(&crate::transaction::TransactionCheck) -> crate::transaction::TransactionResolution
            + Send
            + Sync
            + 'static,
    {
        self.checker = Some(crate::transaction::Checker(Arc::new(f)));
        self
    }

    /// Stable producer id used for de-duplication (default: a random unique
    /// id per `build`). Reuse an id only with its sequence state, i.e. never
    /// from two live producers at once.
    pub fn producer_id(mut self, id: impl Into<String>) -> Self {
        self.producer_id = Some(id.into());
        self
    }

    /// Longest time a message waits behind requests in flight before it is
    /// sent anyway (default 5 ms). Batching is self-clocking: a message sent
    /// while fewer than two requests are in flight leaves at once, and the
    /// ones that queue behind leave together when a request completes.
    pub fn linger(mut self, d: Duration) -> Self {
        self.linger = d;
        self
    }

    /// Largest batch in encoded bytes (default 1 MiB). A single larger
    /// message is sent alone.
    pub fn max_batch_bytes(mut self, n: usize) -> Self {
        self.max_batch_bytes = n.max(1);
        self
    }

    /// Most messages per batch (default 1000, at most 10 000).
    pub fn max_batch_messages(mut self, n: usize) -> Self {
        self.max_batch_messages = n.clamp(1, validate::DEFAULT_MAX_BATCH_MESSAGES);
        self
    }

    /// Most `Send` requests in flight at once (default 16). Use 1 to keep
    /// batches strictly ordered on the wire.
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = n.clamp(1, Semaphore::MAX_PERMITS >> 4);
        self
    }

    /// Creates the producer and starts its batcher task.
    pub fn build(self) -> Producer {
        let producer_id = self.producer_id.unwrap_or_else(random_producer_id);
        let next_sequence = Arc::new(AtomicU64::new(1));
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        let batcher = Batcher {
            client: self.client.clone(),
            topic: self.topic.clone(),
            producer_id: producer_id.clone(),
            next_sequence: next_sequence.clone(),
            linger: self.linger,
            max_batch_bytes: self.max_batch_bytes,
            max_batch_messages: self.max_batch_messages,
            max_in_flight: self.max_in_flight,
        };
        self.client.spawn(batcher.run(rx));
        let (alive, alive_rx) = tokio::sync::watch::channel(());
        if let Some(checker) = self.checker {
            self.client.spawn(crate::transaction::run_checker(
                self.client.clone(),
                self.topic.clone(),
                checker,
                alive_rx,
            ));
        }
        Producer {
            inner: Arc::new(Shared {
                client: self.client,
                topic: self.topic,
                producer_id,
                next_sequence,
                tx,
                closed: AtomicBool::new(false),
                _alive: alive,
                txn_counter: AtomicU64::new(0),
            }),
        }
    }
}

fn random_producer_id() -> String {
    format!(
        "p-{:016x}{:016x}",
        rand::random::<u64>(),
        rand::random::<u64>()
    )
}

/// Sends messages to one topic, batching concurrent sends.
///
/// Cheap to clone; clones share the batcher, the producer id and the
/// sequence counter. See the [module docs](crate::producer) for how retries
/// stay idempotent.
///
/// ```no_run
/// # async fn demo(client: petrel_sdk::Client) -> petrel_sdk::Result<()> {
/// use petrel_sdk::Message;
/// let producer = client.producer("orders").build();
/// // Concurrent sends share one request.
/// let (a, b) = tokio::join!(
///     producer.send(Message::new("first")),
///     producer.send(Message::new("second").with_key("k")),
/// );
/// println!("{} {}", a?.message_id, b?.message_id);
/// // Or one request explicitly:
/// let receipts = producer
///     .send_batch(vec![Message::new("x"), Message::new("y")])
///     .await?;
/// assert_eq!(receipts.len(), 2);
/// producer.close().await;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Producer {
    inner: Arc<Shared>,
}

struct Shared {
    client: Client,
    topic: String,
    producer_id: String,
    next_sequence: Arc<AtomicU64>,
    tx: mpsc::Sender<Command>,
    closed: AtomicBool,
    /// Dropped with the last clone: stops the transaction checker.
    _alive: tokio::sync::watch::Sender<()>,
    txn_counter: AtomicU64,
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer")
            .field("topic", &self.inner.topic)
            .field("producer_id", &self.inner.producer_id)
            .finish()
    }
}

enum Command {
    Send {
        msg: Box<pb::Message>,
        done: oneshot::Sender<Result<SendReceipt>>,
    },
    Flush {
        done: oneshot::Sender<()>,
    },
}

impl Producer {
    /// The topic this producer writes to.
    pub fn topic(&self) -> &str {
        &self.inner.topic
    }

    /// The producer id sent with every request.
    pub fn producer_id(&self) -> &str {
        &self.inner.producer_id
    }

    fn check(&self) -> Result<()> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(Error::InvalidArgument("producer is closed".to_string()));
        }
        validate::topic_name(&self.inner.topic)?;
        validate::producer_id(&self.inner.producer_id)
    }

    /// Sends one message through the batcher; resolves when it is durable
    /// (or failed). Retries are idempotent, see the module docs.
    ///
    /// Sends that run concurrently enter the batcher in whatever order they
    /// are polled; to keep an order, use [`Producer::enqueue`].
    pub async fn send(&self, message: Message) -> Result<SendReceipt> {
        self.enqueue(message).await?.await
    }

    /// Hands one message to the batcher and returns a future of its
    /// receipt. Messages enqueued one after another (each `enqueue` awaited
    /// before the next) get their sequences, and with `max_in_flight(1)`
    /// their offsets in a queue, in that order, while their receipts are
    /// awaited together.
    pub async fn enqueue(
        &self,
        message: Message,
    ) -> Result<impl std::future::Future<Output = Result<SendReceipt>>> {
        self.check()?;
        let msg = message.into_pb(0);
        validate::message(&msg, validate::MAX_RECORD_BYTES)?;
        let (done, rx) = oneshot::channel();
        self.inner
            .tx
            .send(Command::Send {
                msg: Box::new(msg),
                done,
            })
            .await
            .map_err(|_| Error::Internal("producer batcher stopped".to_string()))?;
        Ok(async move {
            rx.await
                .map_err(|_| Error::Internal("producer batcher stopped".to_string()))?
        })
    }

    /// Sends these messages as ONE request, bypassing the batcher; results
    /// come back in order. All are stored or none is acknowledged.
    pub async fn send_batch(&self, messages: Vec<Message>) -> Result<Vec<SendReceipt>> {
        if messages.is_empty() {
            self.check()?;
            return Ok(Vec::new());
        }
        self.send_one_request(messages, "").await
    }

    /// Opens a transaction (TRANSACTION topics): its messages stay
    /// invisible to consumers until [`Transaction::commit`](crate::Transaction::commit).
    pub fn begin(&self) -> crate::Transaction {
        let n = self.inner.txn_counter.fetch_add(1, Ordering::Relaxed);
        let id = format!(
            "{}-{n}-{:08x}",
            self.inner.producer_id,
            rand::random::<u32>()
        );
        crate::transaction::Transaction::new(self.clone(), id)
    }

    /// One request of messages that belong to transaction `txn`.
    pub(crate) async fn send_in_txn(
        &self,
        messages: Vec<Message>,
        txn: &str,
    ) -> Result<Vec<SendReceipt>> {
        self.send_one_request(messages, txn).await
    }

    /// Validates, numbers and sends `messages` as ONE request (in
    /// transaction `txn`, "" = none), bypassing the batcher.
    async fn send_one_request(
        &self,
        messages: Vec<Message>,
        txn: &str,
    ) -> Result<Vec<SendReceipt>> {
        self.check()?;
        let mut pbs = messages
            .into_iter()
            .map(|m| {
                let mut m = m.into_pb(0);
                m.transaction_id = txn.to_string();
                validate::message(&m, validate::MAX_RECORD_BYTES).map(|_| m)
            })
            .collect::<Result<Vec<_>>>()?;
        let first = self
            .inner
            .next_sequence
            .fetch_add(pbs.len() as u64, Ordering::Relaxed);
        assign_sequences(&mut pbs, first);
        let req = pb::SendRequest {
            topic: self.inner.topic.clone(),
            producer_id: self.inner.producer_id.clone(),
            messages: pbs,
        };
        send_request(&self.inner.client, req).await
    }

    pub(crate) fn client(&self) -> &Client {
        &self.inner.client
    }

    /// Sends a prepared request verbatim (with retries). For tests that
    /// replay a request to check de-duplication.
    #[doc(hidden)]
    pub async fn send_request_raw(&self, request: pb::SendRequest) -> Result<Vec<SendReceipt>> {
        send_request(&self.inner.client, request).await
    }

    /// Waits until every message whose `send` was called before this call
    /// has been answered (sent and acknowledged, or failed).
    pub async fn flush(&self) {
        let (done, rx) = oneshot::channel();
        if self.inner.tx.send(Command::Flush { done }).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Flushes, then marks the producer closed: later sends on any clone
    /// fail with `InvalidArgument("producer is closed")`.
    pub async fn close(self) {
        self.flush().await;
        self.inner.closed.store(true, Ordering::Release);
    }
}

fn assign_sequences(msgs: &mut [pb::Message], first: u64) {
    for (i, m) in msgs.iter_mut().enumerate() {
        m.sequence = first + i as u64;
    }
}

/// Sends one request with retries and checks the answer's shape.
async fn send_request(client: &Client, req: pb::SendRequest) -> Result<Vec<SendReceipt>> {
    let expected = req.messages.len();
    let resp = client
        .call(Duration::ZERO, |mut c| {
            let req = req.clone();
            async move { c.send(req).await.map(|r| r.into_inner()) }
        })
        .await?;
    if resp.results.len() != expected {
        return Err(Error::Internal(format!(
            "proxy answered {} results for {expected} messages",
            resp.results.len()
        )));
    }
    Ok(resp.results.into_iter().map(SendReceipt::from).collect())
}

/// Sans-IO batch accumulator: collects items until a size or count limit.
#[derive(Debug)]
pub(crate) struct Accumulator<T> {
    items: Vec<T>,
    bytes: usize,
    max_bytes: usize,
    max_items: usize,
}

impl<T> Accumulator<T> {
    pub(crate) fn new(max_bytes: usize, max_items: usize) -> Self {
        Self {
            items: Vec::new(),
            bytes: 0,
            max_bytes: max_bytes.max(1),
            max_items: max_items.max(1),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Adds an item of `size` bytes; returns the batches that are now
    /// complete (zero, one or two), oldest first. An item that would push a
    /// non-empty batch over `max_bytes` starts the next batch; an item
    /// larger than `max_bytes` on its own becomes a batch by itself.
    pub(crate) fn push(&mut self, item: T, size: usize) -> Vec<Vec<T>> {
        let mut out = Vec::new();
        if !self.items.is_empty() && self.bytes.saturating_add(size) > self.max_bytes {
            out.push(self.take());
        }
        self.items.push(item);
        self.bytes = self.bytes.saturating_add(size);
        if self.items.len() >= self.max_items || self.bytes >= self.max_bytes {
            out.push(self.take());
        }
        out
    }

    /// Takes the current (possibly empty) batch.
    pub(crate) fn take(&mut self) -> Vec<T> {
        self.bytes = 0;
        std::mem::take(&mut self.items)
    }
}

struct Pending {
    msg: pb::Message,
    done: oneshot::Sender<Result<SendReceipt>>,
}

struct Batcher {
    client: Client,
    topic: String,
    producer_id: String,
    next_sequence: Arc<AtomicU64>,
    linger: Duration,
    max_batch_bytes: usize,
    max_batch_messages: usize,
    max_in_flight: usize,
}

impl Batcher {
    /// Self-clocking batching: a message goes out at once while fewer than
    /// `EAGER_IN_FLIGHT` requests are in flight (so a lone send never waits),
    /// otherwise it coalesces behind them and leaves when one of them
    /// completes, when its batch is full, or after `linger` at most.
    async fn run(self, mut rx: mpsc::Receiver<Command>) {
        let permits = Arc::new(Semaphore::new(self.max_in_flight));
        let completed = Arc::new(Notify::new());
        let mut acc = Accumulator::new(self.max_batch_bytes, self.max_batch_messages);
        let mut deadline: Option<Instant> = None;
        let mut open = true;
        while open || !acc.is_empty() {
            // A request in flight completed: what waited behind it goes.
            let mut slot_freed = false;
            let mut cmd = if !open {
                None
            } else if acc.is_empty() {
                Some(rx.recv().await)
            } else {
                let at = deadline.unwrap_or_else(|| Instant::now() + self.linger);
                deadline = Some(at);
                tokio::select! {
                    biased;
                    c = rx.recv() => Some(c),
                    _ = completed.notified() => {
                        slot_freed = true;
                        None
                    }
                    _ = tokio::time::sleep_until(at) => {
                        deadline = None;
                        self.dispatch(acc.take(), &permits, &completed).await;
                        continue;
                    }
                }
            };
            // Take everything already queued before deciding, so callers
            // that arrived together leave together.
            while let Some(c) = cmd.take() {
                match c {
                    None => {
                        open = false;
                    }
                    Some(Command::Send { msg, done }) => {
                        let mut msg = *msg;
                        msg.sequence = self.next_sequence.fetch_add(1, Ordering::Relaxed);
                        let size = msg.encoded_len();
                        for batch in acc.push(Pending { msg, done }, size) {
                            self.dispatch(batch, &permits, &completed).await;
                        }
                    }
                    Some(Command::Flush { done }) => {
                        deadline = None;
                        self.dispatch(acc.take(), &permits, &completed).await;
                        // Semaphore waiters are served in order, so getting
                        // every permit means every earlier batch has been
                        // answered.
                        let permits = permits.clone();
                        let all = self.max_in_flight as u32;
                        self.client.spawn(async move {
                            let _all = permits.acquire_many_owned(all).await;
                            let _ = done.send(());
                        });
                    }
                }
                if open {
                    match rx.try_recv() {
                        Ok(c) => cmd = Some(Some(c)),
                        Err(mpsc::error::TryRecvError::Empty) => {}
                        Err(mpsc::error::TryRecvError::Disconnected) => cmd = Some(None),
                    }
                }
            }
            if acc.is_empty() {
                deadline = None;
                continue;
            }
            let in_flight = self.max_in_flight - permits.available_permits();
            if !open || slot_freed || in_flight < EAGER_IN_FLIGHT.min(self.max_in_flight) {
                deadline = None;
                self.dispatch(acc.take(), &permits, &completed).await;
            }
        }
    }

    async fn dispatch(
        &self,
        batch: Vec<Pending>,
        permits: &Arc<Semaphore>,
        completed: &Arc<Notify>,
    ) {
        if batch.is_empty() {
            return;
        }
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return; // never closed
        };
        let (messages, waiters): (Vec<_>, Vec<_>) =
            batch.into_iter().map(|p| (p.msg, p.done)).unzip();
        let req = pb::SendRequest {
            topic: self.topic.clone(),
            producer_id: self.producer_id.clone(),
            messages,
        };
        let client = self.client.clone();
        let completed = completed.clone();
        self.client.spawn(async move {
            let result = send_request(&client, req).await;
            drop(permit);
            // Wakes the batcher: what coalesced behind this request goes now.
            completed.notify_one();
            match result {
                Ok(receipts) => {
                    for (w, r) in waiters.into_iter().zip(receipts) {
                        let _ = w.send(Ok(r));
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "producer batch failed");
                    for w in waiters {
                        let _ = w.send(Err(e.clone()));
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_split_by_count() {
        let mut a = Accumulator::new(1_000_000, 3);
        let mut out = Vec::new();
        for i in 0..7 {
            out.extend(a.push(i, 10));
        }
        assert_eq!(out, vec![vec![0, 1, 2], vec![3, 4, 5]]);
        assert_eq!(a.take(), vec![6]);
        assert!(a.is_empty());
    }

    #[test]
    fn batches_split_by_size_without_exceeding_it() {
        let mut a = Accumulator::new(100, 1000);
        assert!(a.push(1, 40).is_empty());
        assert!(a.push(2, 40).is_empty());
        // 40 + 40 + 40 > 100: the third item starts the next batch.
        assert_eq!(a.push(3, 40), vec![vec![1, 2]]);
        // Exactly reaching the limit completes the batch.
        assert_eq!(a.push(4, 60), vec![vec![3, 4]]);
        assert!(a.is_empty());
    }

    #[test]
    fn oversized_item_goes_alone() {
        let mut a = Accumulator::new(100, 1000);
        assert!(a.push(1, 10).is_empty());
        assert_eq!(a.push(2, 500), vec![vec![1], vec![2]]);
        assert!(a.is_empty());
        assert_eq!(a.push(3, 500), vec![vec![3]]);
    }

    #[test]
    fn sequences_are_consecutive_in_request_order() {
        let mut msgs: Vec<pb::Message> = (0..4).map(|_| pb::Message::default()).collect();
        assign_sequences(&mut msgs, 41);
        let seqs: Vec<u64> = msgs.iter().map(|m| m.sequence).collect();
        assert_eq!(seqs, vec![41, 42, 43, 44]);
    }

    #[test]
    fn producer_ids_are_unique() {
        let a = random_producer_id();
        assert_ne!(a, random_producer_id());
        assert!(validate::producer_id(&a).is_ok());
    }
}
