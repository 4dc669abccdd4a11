//! Client-side workload of the membership, partition and rolling-restart
//! tests: a paced producer (SDK, idempotent retries) that records every
//! body it handed to the SDK and every acknowledgement, a pop-mode
//! consumer that records every delivery and error, an offset-mode read of
//! the whole topic, and the exactly-once audit over all three. SDK retries
//! are counted from the SDK's own `retrying` debug events.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use petrel_sdk::{Client, Message, ReceivedMessage};

// ---------------------------------------------------------------------------
// SDK retries.

static RETRIES: AtomicU64 = AtomicU64::new(0);
static RETRY_KINDS: Mutex<BTreeMap<String, u64>> = Mutex::new(BTreeMap::new());

struct RetryCounter;

#[derive(Default)]
struct Fields {
    message: String,
    error: String,
}

impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "message" => self.message = format!("{value:?}"),
            "error" => self.error = format!("{value:?}"),
            _ => {}
        }
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for RetryCounter {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let mut f = Fields::default();
        event.record(&mut f);
        if f.message == "retrying" {
            RETRIES.fetch_add(1, Ordering::Relaxed);
            let kind = f.error.split(':').next().unwrap_or("").to_string();
            *RETRY_KINDS.lock().unwrap().entry(kind).or_default() += 1;
        }
    }
}

/// Installs the retry counter as this test binary's global subscriber.
pub fn count_sdk_retries() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::Layer;
    let filter =
        tracing_subscriber::filter::Targets::new().with_target("petrel_sdk", tracing::Level::DEBUG);
    let _ = tracing::subscriber::set_global_default(
        tracing_subscriber::registry().with(RetryCounter.with_filter(filter)),
    );
}

/// SDK retries so far, and their error kinds.
pub fn sdk_retries() -> (u64, BTreeMap<String, u64>) {
    (
        RETRIES.load(Ordering::Relaxed),
        RETRY_KINDS.lock().unwrap().clone(),
    )
}

// ---------------------------------------------------------------------------
// Producer.

#[derive(Debug, Clone)]
pub struct Ack {
    pub message_id: String,
    pub queue: u32,
    pub at: Instant,
    pub duplicate: bool,
}

#[derive(Debug, Default)]
pub struct ProducerLog {
    pub producer_id: String,
    /// Every body handed to the SDK.
    pub attempted: HashSet<String>,
    /// Acknowledged body → receipt.
    pub acked: HashMap<String, Ack>,
    /// Sends that failed after the SDK's retries: (when, messages, error).
    pub errors: Vec<(Instant, usize, String)>,
    /// Send calls and how long the slowest one took.
    pub sends: u64,
    pub max_latency: Duration,
    pub over_1s: u64,
}

impl ProducerLog {
    pub fn duplicates(&self) -> usize {
        self.acked.values().filter(|a| a.duplicate).count()
    }

    /// The longest time within [from, to] without any acknowledgement.
    pub fn longest_ack_gap(&self, from: Instant, to: Instant) -> Duration {
        let mut at: Vec<Instant> = self
            .acked
            .values()
            .map(|a| a.at)
            .filter(|t| *t > from && *t < to)
            .collect();
        at.sort();
        at.dedup();
        let mut prev = from;
        let mut gap = Duration::ZERO;
        for t in at.into_iter().chain([to]) {
            gap = gap.max(t - prev);
            prev = t;
        }
        gap
    }
}

/// A producer task: `send_batch` of `batch` messages at a time, paced to
/// `rate` messages/s, until stopped. Bodies are `{tag}-{seq}`, each with its
/// own key, so the messages spread over the queues.
pub struct Producing {
    stop: Arc<AtomicBool>,
    pub log: Arc<Mutex<ProducerLog>>,
    task: tokio::task::JoinHandle<()>,
}

impl Producing {
    pub fn start(client: Client, topic: &str, tag: &str, rate: u64, batch: u64) -> Self {
        let producer = client.producer(topic).build();
        let log = Arc::new(Mutex::new(ProducerLog {
            producer_id: producer.producer_id().to_string(),
            ..Default::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (l, s, tag) = (log.clone(), stop.clone(), tag.to_string());
        let task = tokio::spawn(async move {
            let _client = client;
            let mut seq = 0u64;
            let mut next_at = Instant::now();
            while !s.load(Ordering::Relaxed) {
                let bodies: Vec<String> =
                    (seq..seq + batch).map(|i| format!("{tag}-{i}")).collect();
                seq += batch;
                let msgs = bodies
                    .iter()
                    .map(|b| Message::new(b.clone()).with_key(format!("k{b}")))
                    .collect();
                l.lock().unwrap().attempted.extend(bodies.iter().cloned());
                let sent = Instant::now();
                let r = producer.send_batch(msgs).await;
                let took = sent.elapsed();
                let now = Instant::now();
                {
                    let mut l = l.lock().unwrap();
                    l.sends += 1;
                    l.max_latency = l.max_latency.max(took);
                    l.over_1s += u64::from(took > Duration::from_secs(1));
                    match r {
                        Ok(receipts) => {
                            for (b, r) in bodies.into_iter().zip(receipts) {
                                l.acked.insert(
                                    b,
                                    Ack {
                                        message_id: r.message_id,
                                        queue: r.queue,
                                        at: now,
                                        duplicate: r.duplicate,
                                    },
                                );
                            }
                        }
                        Err(e) => {
                            eprintln!(
                                "[workload] !!! producer {tag}: send of {} FAILED after retries: {e}",
                                bodies.len()
                            );
                            l.errors.push((now, bodies.len(), e.to_string()));
                        }
                    }
                }
                // Pace; after a stall, do not burst more than 1 s worth.
                next_at += Duration::from_secs_f64(batch as f64 / rate as f64);
                let now = Instant::now();
                if next_at > now {
                    tokio::time::sleep(next_at - now).await;
                } else if now - next_at > Duration::from_secs(1) {
                    next_at = now - Duration::from_secs(1);
                }
            }
        });
        Producing { stop, log, task }
    }

    pub fn acked(&self) -> usize {
        self.log.lock().unwrap().acked.len()
    }

    pub fn errors(&self) -> usize {
        self.log.lock().unwrap().errors.len()
    }

    /// Acknowledgements received after `t`, per queue.
    pub fn acked_since(&self, t: Instant) -> BTreeMap<u32, usize> {
        let mut m = BTreeMap::new();
        for a in self.log.lock().unwrap().acked.values() {
            if a.at > t {
                *m.entry(a.queue).or_default() += 1;
            }
        }
        m
    }

    /// Waits (bounded) until each of `queues` has an acknowledgement after
    /// `t`; returns the time from `t` to the latest of those first acks.
    pub async fn wait_acks_on(
        &self,
        t: Instant,
        queues: &[u32],
        bound: Duration,
    ) -> Result<Duration, String> {
        let deadline = Instant::now() + bound;
        loop {
            let per = self.acked_since(t);
            if queues.iter().all(|q| per.contains_key(q)) {
                let log = self.log.lock().unwrap();
                let last_first = queues
                    .iter()
                    .filter_map(|q| {
                        log.acked
                            .values()
                            .filter(|a| a.queue == *q && a.at > t)
                            .map(|a| a.at)
                            .min()
                    })
                    .max()
                    .unwrap_or(t);
                return Ok(last_first - t);
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "acks per queue since then after {bound:?}: {per:?} (want each of {queues:?})"
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops the producer and waits (bounded: one SDK call with its 30 s
    /// budget, plus slack) for its last send.
    pub async fn finish(self) -> ProducerLog {
        self.stop.store(true, Ordering::Relaxed);
        tokio::time::timeout(Duration::from_secs(40), self.task)
            .await
            .expect("producer did not stop within 40 s")
            .expect("producer task panicked");
        Arc::try_unwrap(self.log)
            .map(|m| m.into_inner().unwrap())
            .unwrap_or_else(|a| std::mem::take(&mut *a.lock().unwrap()))
    }
}

// ---------------------------------------------------------------------------
// Consumer.

#[derive(Debug, Default)]
pub struct ConsumerLog {
    /// (body, message id, attempt) per delivery.
    pub deliveries: Vec<(String, String, u32)>,
    pub seen: HashSet<String>,
    /// Receives that failed after the SDK's retries.
    pub receive_errors: Vec<String>,
    /// Ack requests that failed after the SDK's retries.
    pub ack_errors: Vec<String>,
    /// Per-message ack failures (e.g. receipt_expired), by kind.
    pub ack_failures: BTreeMap<String, u64>,
}

/// A pop-mode consumer task: receive (up to 64), record, ack; until stopped.
pub struct Consuming {
    stop: Arc<AtomicBool>,
    pub log: Arc<Mutex<ConsumerLog>>,
    task: tokio::task::JoinHandle<()>,
}

impl Consuming {
    pub fn start(client: Client, topic: &str, group: &str, lease: Duration) -> Self {
        let consumer = client
            .simple_consumer(topic, group)
            .invisible_duration(lease)
            .wait(Duration::from_secs(1))
            .build();
        let log = Arc::new(Mutex::new(ConsumerLog::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (l, s) = (log.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let _client = client;
            while !s.load(Ordering::Relaxed) {
                let batch: Vec<ReceivedMessage> = match consumer.receive(64).await {
                    Ok(b) => b,
                    Err(e) => {
                        eprintln!("[workload] !!! consumer: receive FAILED after retries: {e}");
                        l.lock().unwrap().receive_errors.push(e.to_string());
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                };
                if batch.is_empty() {
                    continue;
                }
                {
                    let mut l = l.lock().unwrap();
                    for m in &batch {
                        let b = String::from_utf8_lossy(&m.body).into_owned();
                        l.seen.insert(b.clone());
                        l.deliveries.push((b, m.message_id.clone(), m.attempt));
                    }
                }
                match consumer.ack_many(&batch).await {
                    Ok(rs) => {
                        let mut l = l.lock().unwrap();
                        for r in rs {
                            if let Err(e) = r {
                                let k = e.code_name().to_string();
                                *l.ack_failures.entry(k).or_default() += 1;
                            }
                        }
                    }
                    Err(e) => {
                        eprintln!("[workload] !!! consumer: ack FAILED after retries: {e}");
                        l.lock().unwrap().ack_errors.push(e.to_string());
                    }
                }
            }
        });
        Consuming { stop, log, task }
    }

    /// Waits (bounded) until every body of `want` was delivered; returns how
    /// many were not.
    pub async fn wait_consumed(&self, want: &HashSet<String>, bound: Duration) -> usize {
        let deadline = Instant::now() + bound;
        loop {
            let missing = {
                let l = self.log.lock().unwrap();
                want.iter().filter(|b| !l.seen.contains(*b)).count()
            };
            if missing == 0 || Instant::now() >= deadline {
                return missing;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Stops the consumer and waits (bounded) for its last call.
    pub async fn finish(self) -> ConsumerLog {
        self.stop.store(true, Ordering::Relaxed);
        tokio::time::timeout(Duration::from_secs(40), self.task)
            .await
            .expect("consumer did not stop within 40 s")
            .expect("consumer task panicked");
        Arc::try_unwrap(self.log)
            .map(|m| m.into_inner().unwrap())
            .unwrap_or_else(|a| std::mem::take(&mut *a.lock().unwrap()))
    }
}

// ---------------------------------------------------------------------------
// Audit.

/// Every stored record of `topic` (queues `0..queues`), read in offset mode
/// through the proxy (each read retried up to 5 times).
pub async fn read_all(
    client: &Client,
    topic: &str,
    queues: u32,
) -> Result<Vec<ReceivedMessage>, String> {
    let pull = client.pull_consumer(topic, "audit");
    let mut out = Vec::new();
    for q in 0..queues {
        let mut offset = 0u64;
        let mut failures = 0;
        loop {
            match pull.read(q, offset, 4 << 20, 1000).await {
                Ok(b) => {
                    out.extend(b.records.iter().cloned());
                    if b.next_offset >= b.end_offset {
                        break;
                    }
                    if b.records.is_empty() && b.next_offset <= offset {
                        return Err(format!("queue {q}: read at {offset} made no progress"));
                    }
                    offset = b.next_offset;
                }
                Err(e) => {
                    failures += 1;
                    if failures > 5 {
                        return Err(format!("queue {q}: read at {offset} failed: {e}"));
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
    Ok(out)
}

fn sample<T: std::fmt::Debug>(items: impl IntoIterator<Item = T>) -> String {
    let v: Vec<T> = items.into_iter().take(8).collect();
    format!("{v:?}")
}

/// Exactly-once audit. Returns the failures (empty = pass):
/// every acknowledged record is stored exactly once, under its receipt's
/// message id; no body is stored twice; nothing stored was never produced;
/// and, with a consumer log, every acknowledged record was delivered and no
/// record was delivered under two message ids.
pub fn audit(
    producers: &[&ProducerLog],
    stored: &[ReceivedMessage],
    consumer: Option<&ConsumerLog>,
) -> Vec<String> {
    let mut failures = Vec::new();
    let attempted: HashSet<&str> = producers
        .iter()
        .flat_map(|p| p.attempted.iter().map(String::as_str))
        .collect();
    let acked: HashMap<&str, &Ack> = producers
        .iter()
        .flat_map(|p| p.acked.iter().map(|(b, a)| (b.as_str(), a)))
        .collect();
    let mut at: HashMap<String, Vec<&str>> = HashMap::new();
    for r in stored {
        at.entry(String::from_utf8_lossy(&r.body).into_owned())
            .or_default()
            .push(r.message_id.as_str());
    }
    let twice: Vec<_> = at.iter().filter(|(_, v)| v.len() > 1).collect();
    if !twice.is_empty() {
        failures.push(format!(
            "{} record(s) STORED more than once, e.g. {}",
            twice.len(),
            sample(&twice)
        ));
    }
    let mut lost: Vec<(&str, &str)> = acked
        .iter()
        .filter(|(b, a)| {
            at.get(**b)
                .is_none_or(|v| !v.contains(&a.message_id.as_str()))
        })
        .map(|(b, a)| (*b, a.message_id.as_str()))
        .collect();
    lost.sort();
    if !lost.is_empty() {
        failures.push(format!(
            "{} acknowledged record(s) LOST (not in the log under their receipt's id), e.g. {}",
            lost.len(),
            sample(&lost)
        ));
    }
    let foreign: Vec<&String> = at
        .keys()
        .filter(|b| !attempted.contains(b.as_str()))
        .collect();
    if !foreign.is_empty() {
        failures.push(format!(
            "{} stored record(s) were never produced, e.g. {}",
            foreign.len(),
            sample(&foreign)
        ));
    }
    if let Some(c) = consumer {
        let mut unconsumed: Vec<&str> = acked
            .keys()
            .filter(|b| !c.seen.contains(**b))
            .copied()
            .collect();
        unconsumed.sort();
        if !unconsumed.is_empty() {
            failures.push(format!(
                "{} acknowledged record(s) never consumed, e.g. {}",
                unconsumed.len(),
                sample(&unconsumed)
            ));
        }
        let mut ids: HashMap<&str, HashSet<&str>> = HashMap::new();
        for (b, id, _) in &c.deliveries {
            ids.entry(b.as_str()).or_default().insert(id.as_str());
        }
        let multi: Vec<_> = ids.iter().filter(|(_, v)| v.len() > 1).collect();
        if !multi.is_empty() {
            failures.push(format!(
                "{} record(s) delivered under several message ids, e.g. {}",
                multi.len(),
                sample(&multi)
            ));
        }
    }
    failures
}
