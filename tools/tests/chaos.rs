//! Chaos: three broker processes (RF 3) and two proxies under load while a
//! controller SIGKILLs and restarts brokers (one at a time) and, once, a
//! proxy. Two producers (one with `send_batch`, one through the batcher)
//! and two pop-mode consumers of one group talk to BOTH proxies.
//!
//! Checked afterwards: every acknowledged record was consumed; nothing was
//! consumed or stored that was never produced; no record is stored twice
//! (a full offset-mode read of every queue, plus the message ids seen by
//! producers and consumers); per producer and key, storage order follows
//! send order; each consumer's first deliveries of a queue come in offset
//! order; no acknowledged record was delivered and acknowledged again; and
//! the cluster is balanced at the end (every broker reachable, leaders
//! within ±1 of the fair share).
//!
//! `PETREL_CHAOS_SECS` (default 60) sets the chaos duration,
//! `PETREL_CHAOS_RATE` (default 250) the messages per second per producer
//! and `PETREL_CHAOS_SEED` the controller's choices (printed; timing is not
//! reproducible). SDK retries are counted from the SDK's `retrying` debug
//! events. Send errors after the SDK's retries count as not acknowledged
//! (printed loudly, not a failure). Broker and proxy logs (`warn`) go to
//! files in the test's temp dir; on failure their tails are printed and the
//! files copied out. Every process is SIGKILLed by PID when the test ends,
//! pass or fail; the whole test is bounded by the chaos duration + 180 s.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{broker_command, broker_list, free_port, log_to, peers_arg, proxy_command, Procs};
use futures::stream::{FuturesUnordered, StreamExt};
use petrel_sdk::{pb, Client, Error, Message, ReceivedMessage, TopicSpec};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const TOPIC: &str = "chaos";
const GROUP: &str = "chaos-group";
const QUEUES: u32 = 8;
const BROKERS: usize = 3;
const PROXIES: usize = 2;
/// Distinct keys per producer; the key of `p{i}-{seq}` is `k{seq % KEYS}`.
const KEYS: u64 = 16;
/// Elections and registration of a fresh cluster finish well within this.
const READY: Duration = Duration::from_secs(60);
/// Bound on consuming every acknowledged record after the producers stop.
const DRAIN: Duration = Duration::from_secs(60);
/// Bound on the cluster getting balanced (and fully reachable) at the end.
const BALANCE: Duration = Duration::from_secs(30);
/// Bound on a producer or consumer task finishing once told to stop (one
/// SDK call with its 30 s budget, plus slack).
const STOP: Duration = Duration::from_secs(40);
/// Lease of a received record: short, so lost pops come back in the drain.
const LEASE: Duration = Duration::from_secs(10);
/// Bound on the whole test beyond the chaos duration.
const OVERALL_SLACK: Duration = Duration::from_secs(180);
/// Batcher producer: most `send` calls awaiting their receipts at once.
const WINDOW: usize = 256;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

// ---------------------------------------------------------------------------
// SDK retries, counted from the SDK's own debug events.

/// Who made an SDK call: tasks run inside `ROLE.scope`; the producer's
/// batcher sends from tasks of its own, which carry no role.
const ROLE_NAMES: [&str; 6] = [
    "producer0(send_batch)",
    "producer1(batcher)",
    "consumer0",
    "consumer1",
    "test/admin",
    "unscoped(batcher tasks)",
];
const ROLE_UNSCOPED: usize = 5;

tokio::task_local! {
    static ROLE: usize;
}

struct SdkEvents {
    retries: [AtomicU64; 6],
    batch_failures: AtomicU64,
    cut_streams: AtomicU64,
    /// Retried errors by kind (the text before the first ':').
    kinds: Mutex<BTreeMap<String, u64>>,
}

static SDK_EVENTS: SdkEvents = SdkEvents {
    retries: [const { AtomicU64::new(0) }; 6],
    batch_failures: AtomicU64::new(0),
    cut_streams: AtomicU64::new(0),
    kinds: Mutex::new(BTreeMap::new()),
};

#[derive(Default)]
struct EventFields {
    message: String,
    error: String,
}

impl tracing::field::Visit for EventFields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "message" => self.message = format!("{value:?}"),
            "error" => self.error = format!("{value:?}"),
            _ => {}
        }
    }
}

struct SdkCounter;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for SdkCounter {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let mut f = EventFields::default();
        event.record(&mut f);
        match f.message.as_str() {
            "retrying" => {
                let role = ROLE.try_with(|r| *r).unwrap_or(ROLE_UNSCOPED);
                SDK_EVENTS.retries[role].fetch_add(1, Ordering::Relaxed);
                let kind = f.error.split(':').next().unwrap_or("").to_string();
                *SDK_EVENTS.kinds.lock().unwrap().entry(kind).or_default() += 1;
            }
            "producer batch failed" => {
                SDK_EVENTS.batch_failures.fetch_add(1, Ordering::Relaxed);
            }
            "receive stream ended early" => {
                SDK_EVENTS.cut_streams.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }
}

fn install_sdk_counter() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::Layer;
    let filter =
        tracing_subscriber::filter::Targets::new().with_target("petrel_sdk", tracing::Level::DEBUG);
    let subscriber = tracing_subscriber::registry().with(SdkCounter.with_filter(filter));
    // The only global subscriber of this test binary (set once).
    let _ = tracing::subscriber::set_global_default(subscriber);
}

// ---------------------------------------------------------------------------
// The cluster: brokers in Procs slots 0..3, proxies in 3..5.

struct Cluster {
    dir: tempfile::TempDir,
    broker_ports: Vec<u16>,
    proxy_ports: Vec<u16>,
    peers: String,
    procs: Procs,
}

impl Drop for Cluster {
    /// On any panic (e.g. the cluster never got ready), show and keep the
    /// process logs; `procs` then kills every process by PID.
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.print_logs();
            eprintln!(
                "[chaos] process logs kept in {}",
                self.keep_logs().display()
            );
        }
    }
}

impl Cluster {
    fn new() -> Self {
        let broker_ports: Vec<u16> = (0..BROKERS).map(|_| free_port()).collect();
        let proxy_ports: Vec<u16> = (0..PROXIES).map(|_| free_port()).collect();
        Cluster {
            dir: tempfile::tempdir().unwrap(),
            peers: peers_arg(&broker_ports),
            broker_ports,
            proxy_ports,
            procs: Procs((0..BROKERS + PROXIES).map(|_| None).collect()),
        }
    }

    fn log(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    /// (Re)starts broker `i` (id `i + 1`) on its port and data dir.
    fn start_broker(&mut self, i: usize) {
        let mut cmd = broker_command(
            i + 1,
            self.broker_ports[i],
            &self.peers,
            self.dir.path(),
            &[],
        );
        log_to(&mut cmd, &self.log(&format!("broker{}", i + 1)));
        self.procs.replace(i, cmd.spawn().unwrap());
    }

    fn start_proxy(&mut self, j: usize) {
        let mut cmd = proxy_command(self.proxy_ports[j], &broker_list(&self.broker_ports));
        log_to(&mut cmd, &self.log(&format!("proxy{j}")));
        self.procs.replace(BROKERS + j, cmd.spawn().unwrap());
    }

    fn endpoints(&self) -> Vec<String> {
        self.proxy_ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect()
    }

    /// Copies the process logs out of the temp dir (deleted on drop).
    fn keep_logs(&self) -> PathBuf {
        let to = std::env::temp_dir().join(format!("petrel-chaos-logs-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&to);
        for e in std::fs::read_dir(self.dir.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            if e.path().extension().is_some_and(|x| x == "log") {
                let _ = std::fs::copy(e.path(), to.join(e.file_name()));
            }
        }
        to
    }

    /// Prints, per log file, the count of WARN/ERROR lines and the last
    /// lines that are not replication noise about a broker being down.
    fn print_logs(&self) {
        const NOISE: [&str; 4] = [
            "Unreachable node",
            "backoff_drain_events",
            "update progress error",
            "development receipt secret",
        ];
        let mut names: Vec<String> = (1..=BROKERS).map(|i| format!("broker{i}")).collect();
        names.extend((0..PROXIES).map(|j| format!("proxy{j}")));
        for n in names {
            let text = std::fs::read_to_string(self.log(&n)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let errors = lines.iter().filter(|l| l.contains("ERROR")).count();
            let warns = lines.iter().filter(|l| l.contains("WARN")).count();
            let signal: Vec<&&str> = lines
                .iter()
                .filter(|l| !NOISE.iter().any(|x| l.contains(x)))
                .collect();
            eprintln!(
                "[chaos] --- {n}.log: {} lines, {errors} ERROR, {warns} WARN; last 15 of the {} that are not 'peer down' noise:",
                lines.len(),
                signal.len()
            );
            for l in signal.iter().rev().take(15).rev() {
                eprintln!("[chaos]   {l}");
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Chaos controller.

#[derive(Debug, Default)]
struct ChaosStats {
    broker_kills: u64,
    proxy_kills: u64,
    proxy_restarts: u64,
    /// Problems of the cluster processes themselves (e.g. a restarted broker
    /// that exited).
    problems: Vec<String>,
}

/// Kills and restarts brokers (never two down at once) until `end`; kills
/// one proxy around the middle and restarts it about 15 s later if there is
/// time left. Every broker is running when this returns.
async fn chaos(cluster: &mut Cluster, start: Instant, end: Instant, seed: u64) -> ChaosStats {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut stats = ChaosStats::default();
    let mid = start + (end - start) / 2;
    let mut proxy_down: Option<(usize, Instant)> = None;
    let mut proxy_done = false;
    let t = |at: Instant| format!("t+{:.1}s", (at - start).as_secs_f64());
    // Let the producers and consumers get going first.
    tokio::time::sleep(Duration::from_secs(3)).await;
    loop {
        let down = Duration::from_millis(rng.gen_range(3000..=6000));
        let up = Duration::from_millis(rng.gen_range(5000..=8000));
        if Instant::now() + down + Duration::from_secs(2) > end {
            break;
        }
        let b = rng.gen_range(0..BROKERS);
        cluster.procs.kill(b);
        stats.broker_kills += 1;
        eprintln!(
            "[chaos] {} SIGKILL broker {} (down for {down:?})",
            t(Instant::now()),
            b + 1
        );
        tokio::time::sleep(down).await;
        cluster.start_broker(b);
        eprintln!("[chaos] {} restarted broker {}", t(Instant::now()), b + 1);

        if !proxy_done && proxy_down.is_none() && Instant::now() >= mid {
            // The proxy most clients talk to (random on a tie).
            let conns: Vec<usize> = cluster
                .proxy_ports
                .iter()
                .map(|p| established_to(*p))
                .collect();
            let most = conns.iter().copied().max().unwrap_or(0);
            let busiest: Vec<usize> = (0..PROXIES).filter(|j| conns[*j] == most).collect();
            let j = busiest[rng.gen_range(0..busiest.len())];
            cluster.procs.kill(BROKERS + j);
            stats.proxy_kills += 1;
            proxy_down = Some((j, Instant::now()));
            eprintln!(
                "[chaos] {} SIGKILL proxy {j} (client connections per proxy: {conns:?})",
                t(Instant::now())
            );
        }
        let until = (Instant::now() + up).min(end);
        tokio::time::sleep_until(tokio::time::Instant::from_std(until)).await;
        if let Err(e) = cluster.procs.check_running(b) {
            let p = format!("broker {} after its restart: {e}", b + 1);
            eprintln!("[chaos] !!! {p}; starting it again");
            stats.problems.push(p);
            cluster.start_broker(b);
        }
        if let Some((j, since)) = proxy_down {
            if since.elapsed() >= Duration::from_secs(15) {
                cluster.start_proxy(j);
                stats.proxy_restarts += 1;
                proxy_down = None;
                proxy_done = true;
                eprintln!("[chaos] {} restarted proxy {j}", t(Instant::now()));
            }
        }
        if Instant::now() >= end {
            break;
        }
    }
    if let Some((j, _)) = proxy_down {
        eprintln!("[chaos] proxy {j} stays dead until the end");
    }
    tokio::time::sleep_until(tokio::time::Instant::from_std(end)).await;
    for b in 0..BROKERS {
        if let Err(e) = cluster.procs.check_running(b) {
            stats
                .problems
                .push(format!("broker {} at the end of the chaos: {e}", b + 1));
        }
    }
    stats
}

/// Established TCP connections to 127.0.0.1:`port` (Linux `/proc/net/tcp`;
/// only this test's clients connect to the proxies).
fn established_to(port: u16) -> usize {
    let want = format!("0100007F:{port:04X}");
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[2] == want && f[3] == "01"
        })
        .count()
}

// ---------------------------------------------------------------------------
// Producers.

#[derive(Debug, Default)]
struct ProducerOutcome {
    producer_id: String,
    /// Every body handed to the SDK.
    attempted: HashSet<String>,
    /// Acknowledged body → message id.
    acked: HashMap<String, String>,
    /// Receipts marked `duplicate` (a retried send de-duplicated).
    duplicate_receipts: u64,
    /// Bodies whose send failed after the SDK's retries, and the errors.
    failed: Vec<(String, Error)>,
    /// Time from handing a message to the SDK to its answer, per message.
    latencies: Vec<Duration>,
}

impl ProducerOutcome {
    /// "p50 …, p99 …, max …, N over 1 s".
    fn latency_summary(&self) -> String {
        let mut l = self.latencies.clone();
        if l.is_empty() {
            return "no sends".into();
        }
        l.sort();
        let at = |q: f64| l[((l.len() - 1) as f64 * q) as usize];
        format!(
            "latency p50 {:?} p99 {:?} max {:?}, {} over 1 s",
            at(0.5),
            at(0.99),
            l[l.len() - 1],
            l.iter().filter(|d| **d > Duration::from_secs(1)).count()
        )
    }
}

fn body(p: usize, seq: u64) -> String {
    format!("p{p}-{seq}")
}

fn key_of(seq: u64) -> String {
    format!("k{}", seq % KEYS)
}

/// `p{p}-{seq}` → (p, seq).
fn parse_body(b: &[u8]) -> Option<(usize, u64)> {
    let s = std::str::from_utf8(b).ok()?;
    let (p, seq) = s.strip_prefix('p')?.split_once('-')?;
    Some((p.parse().ok()?, seq.parse().ok()?))
}

fn loud_send_error(p: usize, n: usize, e: &Error) {
    eprintln!("[chaos] !!!!!!!! producer {p}: send of {n} message(s) FAILED after retries: {e}");
}

/// Producer 0: one `send_batch` of 1..=20 messages at a time, in order.
async fn produce_batches(client: Client, end: Instant, rate: u64, seed: u64) -> ProducerOutcome {
    let producer = client.producer(TOPIC).build();
    let mut out = ProducerOutcome {
        producer_id: producer.producer_id().to_string(),
        ..Default::default()
    };
    let mut rng = StdRng::seed_from_u64(seed);
    let mut seq = 0u64;
    let mut next_at = Instant::now();
    while Instant::now() < end {
        let n = rng.gen_range(1..=20u64);
        let bodies: Vec<String> = (seq..seq + n).map(|s| body(0, s)).collect();
        let msgs = (seq..seq + n)
            .zip(&bodies)
            .map(|(s, b)| Message::new(b.clone()).with_key(key_of(s)))
            .collect();
        seq += n;
        out.attempted.extend(bodies.iter().cloned());
        let sent_at = Instant::now();
        let result = producer.send_batch(msgs).await;
        out.latencies
            .extend(std::iter::repeat_n(sent_at.elapsed(), bodies.len()));
        match result {
            Ok(receipts) => {
                for (b, r) in bodies.into_iter().zip(receipts) {
                    out.duplicate_receipts += u64::from(r.duplicate);
                    out.acked.insert(b, r.message_id);
                }
            }
            Err(e) => {
                loud_send_error(0, bodies.len(), &e);
                out.failed
                    .extend(bodies.into_iter().map(|b| (b, e.clone())));
            }
        }
        // Pace to `rate`; after a stall, do not burst more than 1 s worth.
        next_at += Duration::from_secs_f64(n as f64 / rate as f64);
        let now = Instant::now();
        if next_at > now {
            tokio::time::sleep(next_at - now).await;
        } else if now - next_at > Duration::from_secs(1) {
            next_at = now - Duration::from_secs(1);
        }
    }
    out
}

/// Producer 1: single `send`s through the SDK's batcher, up to `WINDOW`
/// awaiting receipts, one request in flight (so batches stay in order).
async fn produce_single(client: Client, end: Instant, rate: u64) -> ProducerOutcome {
    let producer = client
        .producer(TOPIC)
        .max_in_flight(1)
        .linger(Duration::from_millis(2))
        .build();
    let mut out = ProducerOutcome {
        producer_id: producer.producer_id().to_string(),
        ..Default::default()
    };
    let per_tick = (rate / 100).max(1);
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pending = FuturesUnordered::new();
    let mut seq = 0u64;
    loop {
        let producing = Instant::now() < end;
        tokio::select! {
            _ = tick.tick(), if producing => {
                for _ in 0..per_tick {
                    if pending.len() >= WINDOW {
                        break;
                    }
                    let b = body(1, seq);
                    let msg = Message::new(b.clone()).with_key(key_of(seq));
                    seq += 1;
                    out.attempted.insert(b.clone());
                    let p = producer.clone();
                    pending.push(async move {
                        let sent_at = Instant::now();
                        let r = p.send(msg).await;
                        (b, sent_at.elapsed(), r)
                    });
                }
            }
            Some((b, took, r)) = pending.next() => match r {
                Ok(r) => {
                    out.latencies.push(took);
                    out.duplicate_receipts += u64::from(r.duplicate);
                    out.acked.insert(b, r.message_id);
                }
                Err(e) => {
                    out.latencies.push(took);
                    loud_send_error(1, 1, &e);
                    out.failed.push((b, e));
                }
            },
            else => break,
        }
    }
    producer.close().await;
    out
}

// ---------------------------------------------------------------------------
// Consumers.

#[derive(Debug, Clone)]
struct Delivery {
    body: String,
    message_id: String,
    queue: u32,
    offset: u64,
    attempt: u32,
}

#[derive(Debug, Default)]
struct ConsumerLog {
    deliveries: Vec<Delivery>,
    /// Bodies whose ack came back OK.
    acked_ok: Vec<String>,
    receive_errors: u64,
    ack_request_errors: u64,
    /// Per-message ack failures by kind.
    ack_failures: BTreeMap<String, u64>,
}

/// Receives, records, then acks, until `stop`; errors are logged and the
/// loop goes on.
async fn consume(
    i: usize,
    client: Client,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<HashSet<String>>>,
    log: Arc<Mutex<ConsumerLog>>,
) {
    let consumer = client
        .simple_consumer(TOPIC, GROUP)
        .invisible_duration(LEASE)
        .wait(Duration::from_secs(1))
        .build();
    let (mut errors, mut next_report) = (0u64, 1u64);
    while !stop.load(Ordering::Relaxed) {
        let batch: Vec<ReceivedMessage> = match consumer.receive(64).await {
            Ok(b) => b,
            Err(e) => {
                errors += 1;
                if errors >= next_report {
                    // The first ten, then ever more sparsely.
                    next_report = if errors < 10 { errors + 1 } else { errors * 2 };
                    eprintln!("[chaos] consumer {i}: receive failed (#{errors}, retrying): {e}");
                }
                log.lock().unwrap().receive_errors += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        if batch.is_empty() {
            continue;
        }
        {
            let mut seen = seen.lock().unwrap();
            let mut log = log.lock().unwrap();
            for m in &batch {
                let b = String::from_utf8_lossy(&m.body).into_owned();
                seen.insert(b.clone());
                log.deliveries.push(Delivery {
                    body: b,
                    message_id: m.message_id.clone(),
                    queue: m.queue,
                    offset: m.offset,
                    attempt: m.attempt,
                });
            }
        }
        match consumer.ack_many(&batch).await {
            Ok(results) => {
                let mut log = log.lock().unwrap();
                for (m, r) in batch.iter().zip(results) {
                    match r {
                        Ok(()) => log
                            .acked_ok
                            .push(String::from_utf8_lossy(&m.body).into_owned()),
                        Err(e) => {
                            let kind = e.to_string().split(':').next().unwrap_or("").to_string();
                            *log.ack_failures.entry(kind).or_default() += 1;
                        }
                    }
                }
            }
            Err(e) => {
                eprintln!(
                    "[chaos] consumer {i}: ack of {} failed (they come back): {e}",
                    batch.len()
                );
                log.lock().unwrap().ack_request_errors += 1;
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Audit: every stored record, read in offset mode.

#[derive(Debug, Clone)]
struct Stored {
    queue: u32,
    offset: u64,
    message_id: String,
    body: String,
    key: String,
    producer_id: String,
    sequence: u64,
}

async fn read_everything(client: &Client) -> Result<Vec<Stored>, String> {
    let pull = client.pull_consumer(TOPIC, "chaos-audit");
    let mut out = Vec::new();
    for q in 0..QUEUES {
        let mut offset = 0u64;
        let mut failures = 0;
        loop {
            match pull.read(q, offset, 4 << 20, 1000).await {
                Ok(b) => {
                    for r in &b.records {
                        out.push(Stored {
                            queue: r.queue,
                            offset: r.offset,
                            message_id: r.message_id.clone(),
                            body: String::from_utf8_lossy(&r.body).into_owned(),
                            key: r.key.clone(),
                            producer_id: r.producer_id.clone(),
                            sequence: r.sequence,
                        });
                    }
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

// ---------------------------------------------------------------------------
// Balance.

/// Polls until every broker is reachable, every queue has a leader and each
/// broker leads within ±1 of queues/brokers. Returns the last view.
async fn wait_balanced(client: &Client) -> Result<pb::ClusterInfo, String> {
    let admin = client.admin();
    let deadline = Instant::now() + BALANCE;
    loop {
        let last = match admin.describe_cluster().await {
            Ok(c) => {
                let n = c.brokers.len().max(1) as f64;
                let fair = f64::from(c.queue_count) / n;
                let leaders: u32 = c.brokers.iter().map(|b| b.leader_count).sum();
                let ok = c.brokers.len() == BROKERS
                    && c.brokers.iter().all(|b| b.reachable)
                    && leaders == c.queue_count
                    && c.brokers
                        .iter()
                        .all(|b| (f64::from(b.leader_count) - fair).abs() <= 1.0);
                if ok {
                    return Ok(c);
                }
                format!(
                    "queues {} (fair share {fair:.2}), leaders {}: {}",
                    c.queue_count,
                    leaders,
                    c.brokers
                        .iter()
                        .map(|b| format!(
                            "broker {} reachable={} leaders={} replicas={}",
                            b.id, b.reachable, b.leader_count, b.replica_count
                        ))
                        .collect::<Vec<_>>()
                        .join("; ")
                )
            }
            Err(e) => format!("describe_cluster failed: {e}"),
        };
        if Instant::now() >= deadline {
            return Err(last);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

// ---------------------------------------------------------------------------
// The checker.

fn sample<T: std::fmt::Debug>(items: impl IntoIterator<Item = T>) -> String {
    let v: Vec<T> = items.into_iter().take(10).collect();
    format!("{v:?}")
}

struct Checked {
    failures: Vec<String>,
    consumed: usize,
    deliveries: usize,
}

fn check(
    producers: &[ProducerOutcome],
    consumers: &[ConsumerLog],
    stored: Option<&[Stored]>,
) -> Checked {
    let mut failures = Vec::new();
    let attempted: HashSet<&str> = producers
        .iter()
        .flat_map(|p| p.attempted.iter().map(String::as_str))
        .collect();
    let acked: HashMap<&str, &str> = producers
        .iter()
        .flat_map(|p| p.acked.iter().map(|(b, m)| (b.as_str(), m.as_str())))
        .collect();
    let deliveries: Vec<&Delivery> = consumers.iter().flat_map(|c| &c.deliveries).collect();

    // Consumed: body → message ids it was delivered under.
    let mut consumed: HashMap<&str, HashSet<&str>> = HashMap::new();
    for d in &deliveries {
        consumed
            .entry(d.body.as_str())
            .or_default()
            .insert(d.message_id.as_str());
    }

    // 1. Every acknowledged record was consumed.
    let mut missing: Vec<&str> = acked
        .keys()
        .filter(|b| !consumed.contains_key(*b))
        .copied()
        .collect();
    missing.sort();
    if !missing.is_empty() {
        failures.push(format!(
            "{} acknowledged record(s) never consumed, e.g. {}",
            missing.len(),
            sample(&missing)
        ));
    }

    // 2. Nothing consumed that was never produced.
    let phantom: Vec<&str> = consumed
        .keys()
        .filter(|b| !attempted.contains(*b))
        .copied()
        .collect();
    if !phantom.is_empty() {
        failures.push(format!(
            "{} consumed record(s) were never produced, e.g. {}",
            phantom.len(),
            sample(&phantom)
        ));
    }

    // 3. Not stored twice, as consumers and producers see it: one message id
    //    per body, and it is the one the producer was given.
    let twice: Vec<_> = consumed.iter().filter(|(_, ids)| ids.len() > 1).collect();
    if !twice.is_empty() {
        failures.push(format!(
            "{} record(s) consumed under several message ids (stored twice), e.g. {}",
            twice.len(),
            sample(&twice)
        ));
    }
    let wrong_id: Vec<_> = acked
        .iter()
        .filter_map(|(b, id)| {
            let ids = consumed.get(b)?;
            (!ids.contains(id)).then_some((b, id, ids))
        })
        .collect();
    if !wrong_id.is_empty() {
        failures.push(format!(
            "{} acknowledged record(s) consumed under another message id than their receipt, e.g. {}",
            wrong_id.len(),
            sample(&wrong_id)
        ));
    }

    // 4. The full log: each body stored once, every acknowledged record
    //    stored under its receipt's id, nothing foreign, and per producer and
    //    key the stored order follows the SDK's send order (sequence).
    if let Some(stored) = stored {
        let mut at: HashMap<&str, Vec<&str>> = HashMap::new();
        for s in stored {
            at.entry(s.body.as_str())
                .or_default()
                .push(s.message_id.as_str());
        }
        let dup: Vec<_> = at.iter().filter(|(_, v)| v.len() > 1).collect();
        if !dup.is_empty() {
            failures.push(format!(
                "{} record(s) STORED more than once, e.g. {}",
                dup.len(),
                sample(&dup)
            ));
        }
        let lost: Vec<_> = acked
            .iter()
            .filter(|(b, id)| at.get(*b).is_none_or(|v| !v.contains(id)))
            .collect();
        if !lost.is_empty() {
            failures.push(format!(
                "{} acknowledged record(s) not in the log under their receipt's id, e.g. {}",
                lost.len(),
                sample(&lost)
            ));
        }
        let foreign: Vec<&str> = at
            .keys()
            .filter(|b| !attempted.contains(*b))
            .copied()
            .collect();
        if !foreign.is_empty() {
            failures.push(format!(
                "{} stored record(s) never produced, e.g. {}",
                foreign.len(),
                sample(&foreign)
            ));
        }
        let pid_of: HashMap<&str, usize> = producers
            .iter()
            .enumerate()
            .map(|(i, p)| (p.producer_id.as_str(), i))
            .collect();
        let mut sorted: Vec<&Stored> = stored.iter().collect();
        sorted.sort_by_key(|s| (s.queue, s.offset));
        let mut last: HashMap<(&str, &str), (u64, &Stored)> = HashMap::new();
        let mut key_queue: HashMap<&str, u32> = HashMap::new();
        let mut disorder = Vec::new();
        let mut mislabelled = Vec::new();
        for s in sorted {
            match (
                parse_body(s.body.as_bytes()),
                pid_of.get(s.producer_id.as_str()),
            ) {
                (Some((p, seq)), Some(pi)) if p == *pi && s.key == key_of(seq) => {}
                _ => mislabelled.push((s.body.clone(), s.key.clone(), s.producer_id.clone())),
            }
            if let Some(q) = key_queue.insert(s.key.as_str(), s.queue) {
                if q != s.queue {
                    mislabelled.push((
                        s.body.clone(),
                        s.key.clone(),
                        format!("queue {q}≠{}", s.queue),
                    ));
                }
            }
            let k = (s.producer_id.as_str(), s.key.as_str());
            if let Some((prev, p)) = last.get(&k) {
                if s.sequence <= *prev {
                    disorder.push(format!(
                        "{} (seq {}) at {} after {} (seq {}) at {}",
                        s.body, s.sequence, s.message_id, p.body, p.sequence, p.message_id
                    ));
                }
            }
            last.insert(k, (s.sequence, s));
        }
        if !disorder.is_empty() {
            failures.push(format!(
                "{} record(s) stored out of send order for their producer and key, e.g. {}",
                disorder.len(),
                sample(&disorder)
            ));
        }
        if !mislabelled.is_empty() {
            failures.push(format!(
                "{} stored record(s) with an unexpected key/producer/queue, e.g. {}",
                mislabelled.len(),
                sample(&mislabelled)
            ));
        }
    }

    // 5. Each consumer's first deliveries of a queue come in offset order.
    for (i, c) in consumers.iter().enumerate() {
        let mut last: HashMap<u32, u64> = HashMap::new();
        let mut bad = Vec::new();
        for d in c.deliveries.iter().filter(|d| d.attempt == 1) {
            if let Some(prev) = last.insert(d.queue, d.offset) {
                if d.offset <= prev {
                    bad.push(format!(
                        "queue {} offset {} after {prev}",
                        d.queue, d.offset
                    ));
                }
            }
        }
        if !bad.is_empty() {
            failures.push(format!(
                "consumer {i}: {} first deliveries out of offset order, e.g. {}",
                bad.len(),
                sample(&bad)
            ));
        }
    }

    // 6. An acknowledged record is never delivered again: at most one
    //    successful ack per record (a superseded lease's ack fails).
    let mut acks: HashMap<&str, u32> = HashMap::new();
    for c in consumers {
        for b in &c.acked_ok {
            *acks.entry(b.as_str()).or_default() += 1;
        }
    }
    let reacked: Vec<_> = acks.iter().filter(|(_, n)| **n > 1).collect();
    if !reacked.is_empty() {
        // How the first one was delivered, to tell a late ack of a
        // superseded lease from a redelivery after an ack.
        let first = reacked.iter().map(|(b, _)| **b).min().unwrap_or_default();
        let how: Vec<String> = consumers
            .iter()
            .enumerate()
            .flat_map(|(i, c)| {
                c.deliveries
                    .iter()
                    .filter(|d| d.body == first)
                    .map(move |d| {
                        format!(
                            "consumer {i} got q{}@{} attempt {}",
                            d.queue, d.offset, d.attempt
                        )
                    })
            })
            .collect();
        failures.push(format!(
            "{} record(s) acknowledged successfully more than once (redelivered after an ack), e.g. {}; {first}: {}",
            reacked.len(),
            sample(&reacked),
            how.join(", ")
        ));
    }

    Checked {
        failures,
        consumed: consumed.len(),
        deliveries: deliveries.len(),
    }
}

// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_kills_and_restarts_brokers_and_a_proxy() {
    let secs = env_u64("PETREL_CHAOS_SECS", 60).max(10);
    let bound = Duration::from_secs(secs) + OVERALL_SLACK;
    let run = ROLE.scope(4, run(secs));
    if tokio::time::timeout(bound, run).await.is_err() {
        panic!("chaos test did not finish within {bound:?} (processes are killed on drop)");
    }
}

async fn run(secs: u64) {
    install_sdk_counter();
    let rate = env_u64("PETREL_CHAOS_RATE", 250).max(1);
    let seed = env_u64("PETREL_CHAOS_SEED", rand::random::<u64>() % 1_000_000);
    eprintln!("[chaos] {secs} s of chaos, {rate} msg/s per producer, seed {seed}");

    let mut cluster = Cluster::new();
    for i in 0..BROKERS {
        cluster.start_broker(i);
    }
    for j in 0..PROXIES {
        cluster.start_proxy(j);
    }
    let endpoints = cluster.endpoints();
    let connect = || Client::connect(endpoints.clone()).unwrap();
    let admin_client = connect();
    let admin = admin_client.admin();
    common::wait_ready(&admin, BROKERS, READY).await;
    admin
        .create_topic(TopicSpec::new(TOPIC).queues(QUEUES).replicas(3))
        .await
        .unwrap();

    let start = Instant::now();
    let end = start + Duration::from_secs(secs);

    // Producers and consumers, each with its own client (each picks a random
    // first proxy, so the proxy kill hits some of them).
    let p0 = tokio::spawn(ROLE.scope(0, produce_batches(connect(), end, rate, seed)));
    let p1 = tokio::spawn(ROLE.scope(1, produce_single(connect(), end, rate)));
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(HashSet::new()));
    let logs: Vec<Arc<Mutex<ConsumerLog>>> = (0..2).map(|_| Arc::default()).collect();
    let consumers: Vec<_> = logs
        .iter()
        .enumerate()
        .map(|(i, log)| {
            tokio::spawn(ROLE.scope(
                2 + i,
                consume(i, connect(), stop.clone(), seen.clone(), log.clone()),
            ))
        })
        .collect();

    let stats = chaos(&mut cluster, start, end, seed).await;
    eprintln!(
        "[chaos] t+{:.1}s chaos over: {stats:?}",
        start.elapsed().as_secs_f64()
    );

    // Producers stop at `end`; their last call may still be retrying.
    let mut producers = Vec::new();
    for (i, h) in [p0, p1].into_iter().enumerate() {
        match tokio::time::timeout(STOP, h).await {
            Ok(r) => producers.push(r.unwrap()),
            Err(_) => panic!("producer {i} did not stop within {STOP:?}"),
        }
    }
    let acked: HashSet<String> = producers
        .iter()
        .flat_map(|p| p.acked.keys().cloned())
        .collect();

    // Drain: until every acknowledged record was consumed, or the bound.
    let drain_start = Instant::now();
    loop {
        let left = {
            let seen = seen.lock().unwrap();
            acked.iter().filter(|b| !seen.contains(*b)).count()
        };
        if left == 0 {
            break;
        }
        if drain_start.elapsed() >= DRAIN {
            eprintln!("[chaos] drain bound reached with {left} acknowledged record(s) unconsumed");
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!(
        "[chaos] drained in {:.1}s",
        drain_start.elapsed().as_secs_f64()
    );
    stop.store(true, Ordering::Relaxed);
    let mut problems = stats.problems.clone();
    for (i, h) in consumers.into_iter().enumerate() {
        if tokio::time::timeout(STOP, h).await.is_err() {
            problems.push(format!("consumer {i} did not stop within {STOP:?}"));
        }
    }
    let consumer_logs: Vec<ConsumerLog> = logs
        .iter()
        .map(|l| std::mem::take(&mut *l.lock().unwrap()))
        .collect();

    let stored = match read_everything(&admin_client).await {
        Ok(s) => Some(s),
        Err(e) => {
            problems.push(format!("could not read the whole log back: {e}"));
            None
        }
    };
    let checked = check(&producers, &consumer_logs, stored.as_deref());
    let balance = wait_balanced(&admin_client).await;

    // Report.
    let produced: usize = producers.iter().map(|p| p.attempted.len()).sum();
    let failed: usize = producers.iter().map(|p| p.failed.len()).sum();
    let dup_receipts: u64 = producers.iter().map(|p| p.duplicate_receipts).sum();
    let retries: Vec<u64> = SDK_EVENTS
        .retries
        .iter()
        .map(|r| r.load(Ordering::Relaxed))
        .collect();
    let producer_retries = retries[0] + retries[1] + retries[ROLE_UNSCOPED];
    let consumer_retries = retries[2] + retries[3];
    let receive_errors: u64 = consumer_logs.iter().map(|c| c.receive_errors).sum();
    let ack_request_errors: u64 = consumer_logs.iter().map(|c| c.ack_request_errors).sum();
    let mut ack_failures: BTreeMap<String, u64> = BTreeMap::new();
    for c in &consumer_logs {
        for (k, n) in &c.ack_failures {
            *ack_failures.entry(k.clone()).or_default() += n;
        }
    }
    let redelivered = checked.deliveries - checked.consumed;
    eprintln!(
        "[chaos] SDK retries by role: {}; retried error kinds: {:?}; failed batcher batches: {}; receive streams cut short: {}",
        ROLE_NAMES
            .iter()
            .zip(&retries)
            .map(|(n, r)| format!("{n}={r}"))
            .collect::<Vec<_>>()
            .join(" "),
        SDK_EVENTS.kinds.lock().unwrap(),
        SDK_EVENTS.batch_failures.load(Ordering::Relaxed),
        SDK_EVENTS.cut_streams.load(Ordering::Relaxed),
    );
    eprintln!(
        "[chaos] consumers: receive errors {receive_errors}, ack request errors {ack_request_errors}, per-message ack failures {ack_failures:?}; records in the log: {}",
        stored.as_ref().map(|s| s.len().to_string()).unwrap_or_else(|| "?".into())
    );
    for (i, p) in producers.iter().enumerate() {
        eprintln!(
            "[chaos] producer {i} ({}): produced {} acked {} failed {} ({:.0} msg/s); {}",
            p.producer_id,
            p.attempted.len(),
            p.acked.len(),
            p.failed.len(),
            p.attempted.len() as f64 / secs as f64,
            p.latency_summary()
        );
    }
    if failed > 0 {
        eprintln!("[chaos] !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!");
        eprintln!("[chaos] !!! {failed} message(s) NOT ACKNOWLEDGED: sends failed after the SDK's retries");
        let mut by_error: BTreeMap<String, usize> = BTreeMap::new();
        for p in &producers {
            for (_, e) in &p.failed {
                *by_error.entry(e.to_string()).or_default() += 1;
            }
        }
        for (e, n) in by_error {
            eprintln!("[chaos] !!!   {n} × {e}");
        }
        eprintln!("[chaos] !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!");
    }
    println!(
        "chaos summary: produced={produced} acked={} not_acked={failed} consumed={} deliveries={} redelivered={redelivered} \
         failovers={} (broker_kills={} proxy_kills={}) proxy_restarts={} producer_retries={producer_retries} \
         consumer_retries={consumer_retries} dedup_receipts={dup_receipts} balanced={}",
        acked.len(),
        checked.consumed,
        checked.deliveries,
        stats.broker_kills + stats.proxy_kills,
        stats.broker_kills,
        stats.proxy_kills,
        stats.proxy_restarts,
        balance.is_ok(),
    );

    let mut failures = problems;
    failures.extend(checked.failures);
    if acked.is_empty() {
        failures.push("no record was acknowledged at all".into());
    }
    if stats.broker_kills == 0 {
        failures.push("no broker was killed (chaos too short?)".into());
    }
    // Balance last: it depends on leader rebalancing, work in progress.
    if let Err(e) = &balance {
        failures.push(format!("cluster not balanced within {BALANCE:?}: {e}"));
    }
    if !failures.is_empty() {
        // The panic below shows and keeps the process logs (`Drop`).
        for f in &failures {
            eprintln!("[chaos] FAILED: {f}");
        }
        panic!(
            "{} chaos check(s) failed:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
    drop(cluster);
}

/// The checker itself: a clean history passes, and each kind of violation
/// is reported.
#[test]
fn checker_reports_each_kind_of_violation() {
    type History = (Vec<ProducerOutcome>, Vec<ConsumerLog>, Vec<Stored>);
    type Mutation = Box<dyn Fn(&mut History)>;
    let clean = || -> History {
        let mut p = ProducerOutcome {
            producer_id: "pid0".into(),
            ..Default::default()
        };
        let mut c = ConsumerLog::default();
        let mut stored = Vec::new();
        for (off, seq) in [0u64, 16, 32].into_iter().enumerate() {
            let (b, id) = (body(0, seq), format!("{TOPIC}/0/{off}"));
            p.attempted.insert(b.clone());
            p.acked.insert(b.clone(), id.clone());
            c.deliveries.push(Delivery {
                body: b.clone(),
                message_id: id.clone(),
                queue: 0,
                offset: off as u64,
                attempt: 1,
            });
            c.acked_ok.push(b.clone());
            stored.push(Stored {
                queue: 0,
                offset: off as u64,
                message_id: id,
                body: b,
                key: key_of(seq),
                producer_id: "pid0".into(),
                sequence: off as u64 + 1,
            });
        }
        (vec![p], vec![c], stored)
    };
    let failures = |h: &History| check(&h.0, &h.1, Some(&h.2)).failures;
    assert_eq!(failures(&clean()), Vec::<String>::new());

    let cases: Vec<(&str, Mutation)> = vec![
        (
            "never consumed",
            Box::new(|h| {
                h.1[0].deliveries.pop();
            }),
        ),
        (
            "were never produced",
            Box::new(|h| {
                let mut d = h.1[0].deliveries[0].clone();
                d.body = "p9-9".into();
                h.1[0].deliveries.push(d);
            }),
        ),
        (
            "STORED more than once",
            Box::new(|h| {
                let mut s = h.2[0].clone();
                s.offset = 3;
                s.message_id = format!("{TOPIC}/0/3");
                h.2.push(s);
            }),
        ),
        (
            "out of send order",
            Box::new(|h| {
                // The record sent second is stored first.
                (h.2[0].sequence, h.2[1].sequence) = (h.2[1].sequence, h.2[0].sequence);
            }),
        ),
        (
            "first deliveries out of offset order",
            Box::new(|h| h.1[0].deliveries.swap(0, 1)),
        ),
        (
            "acknowledged successfully more than once",
            Box::new(|h| h.1[0].acked_ok.push(body(0, 0))),
        ),
        (
            "under several message ids",
            Box::new(|h| {
                let mut d = h.1[0].deliveries[0].clone();
                d.message_id = format!("{TOPIC}/0/7");
                d.attempt = 2;
                h.1[0].deliveries.push(d);
            }),
        ),
    ];
    for (want, mutate) in cases {
        let mut h = clean();
        mutate(&mut h);
        let f = failures(&h);
        assert!(
            f.iter().any(|m| m.contains(want)),
            "{want:?} not reported: {f:?}"
        );
    }
}
