//! `petrel-bench`: a load generator for a running Petrel proxy.
//!
//! One subcommand per workload; progress goes to stderr once a second and
//! the result is ONE JSON line on stdout:
//!
//! ```text
//! {"workload":"produce","records":N,"bytes":B,"seconds":S,"records_per_sec":..,
//!  "mb_per_sec":..,"p50_ms":..,"p99_ms":..,"p999_ms":..,"errors":E,
//!  "server_cpu_seconds":..,"server_cpu_cores":..,"server_cpu_us_per_record":..,
//!  "server_pids":n}
//! ```
//!
//! Latencies are per request (produce: one `send_batch`; publish: one
//! `send` of one record; consume: one receive; drain: one receive plus the
//! ack of what it returned), except for e2e, where they are per record, from
//! the publisher's send to a receiver getting it (see [`e2e`]); recorded in
//! microseconds in an HDR histogram. Server CPU is utime + stime of the
//! server processes over the run (see [`cpu`]). `suite` starts its own
//! cluster and runs every workload against it (see [`suite`]).

use anyhow::Context as _;
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};

mod cluster;
mod cpu;
mod drain;
mod e2e;
mod failover;
mod idle;
mod suite;
mod timers;
use cpu::{CpuSampler, CpuUsage};
use hdrhistogram::Histogram;
use petrel_sdk::{Client, Error as PetrelError, Message, TopicSpec};
use serde::Serialize;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Highest latency the histograms track (60 s, in µs).
const MAX_LATENCY_US: u64 = 60_000_000;
/// Progress report interval on stderr.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Load generator for a running Petrel proxy.
#[derive(Debug, Parser)]
#[command(name = "petrel-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    workload: Workload,
}

#[derive(Debug, Subcommand)]
enum Workload {
    /// Produce `--count` records of `--size` bytes, `--batch` per request,
    /// `--inflight` requests at once.
    Produce {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        args: ProduceArgs,
    },
    /// Publish `--count` records of `--size` bytes one `Producer::send` at a
    /// time from `--inflight` concurrent tasks (one default producer, which
    /// batches concurrent sends).
    Publish {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        args: PublishArgs,
    },
    /// Receive and ack `--count` records with `--inflight` concurrent
    /// receivers, `--batch` records per receive.
    Consume {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        args: ConsumeArgs,
    },
    /// Fill a backlog of `--count` records (not timed), then time receiving
    /// and acking all of it with `--inflight` receivers, `--batch` records
    /// per receive.
    Drain {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        args: drain::DrainArgs,
    },
    /// Publish `--rate` records/s for `--seconds` s (one `Producer::send`
    /// each, send time in the body) while `--receivers` receivers receive
    /// and ack them: publish-to-receive latency per record.
    E2e {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        args: e2e::E2eArgs,
    },
    /// Create a topic of `--queues` queues, let the cluster settle, then
    /// measure the server processes' CPU with no traffic.
    Idle {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        args: idle::IdleArgs,
    },
    /// Start a cluster of its own (3 brokers + 1 proxy from the binaries
    /// beside this one), run publish, produce, consume, drain, e2e and idle
    /// against it and print every report and a Markdown table.
    Suite(suite::SuiteArgs),
    /// Start a 3-broker cluster of its own, SIGKILL its brokers in turn
    /// `--kills` times, and report per affected queue the time
    /// from the kill to the first acked write (p50/p99/max).
    Failover(failover::FailoverArgs),
    /// Delayed-delivery accuracy and send latency on one DELAY queue,
    /// before and after loading it with `--pending` far-future timers.
    Timers(timers::TimersArgs),
}

/// Where the cluster is: the proxies to talk to and the server processes
/// to measure.
#[derive(Debug, Args)]
struct Target {
    /// Proxy endpoint(s), comma-separated; requests fail over between them.
    #[arg(
        long,
        env = "PETREL_ENDPOINT",
        default_value = "127.0.0.1:7400",
        value_delimiter = ','
    )]
    endpoint: Vec<String>,
    /// PIDs of the server processes whose CPU time to report,
    /// comma-separated [default: every process on this machine named
    /// petrel-broker, petrel-proxy or petrel].
    #[arg(long, value_delimiter = ',')]
    server_pids: Option<Vec<u32>>,
}

#[derive(Debug, Clone, Args)]
struct Common {
    /// Topic to use.
    #[arg(long, default_value = "bench")]
    topic: String,
    /// Create the topic first (an existing topic is fine).
    #[arg(long)]
    create_topic: bool,
    /// Queues of the created topic.
    #[arg(long, default_value_t = 8)]
    queues: u32,
    /// Replicas of the created topic.
    #[arg(long, default_value_t = 3)]
    replicas: u32,
    /// Total time budget of each request including retries, in ms.
    #[arg(long, default_value_t = 30_000)]
    timeout_ms: u64,
}

#[derive(Debug, Clone, Args)]
struct ProduceArgs {
    #[command(flatten)]
    common: Common,
    /// Body size of each record in bytes.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Records to produce.
    #[arg(long, default_value_t = 100_000)]
    count: u64,
    /// Concurrent requests.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    inflight: u64,
    /// Records per request (one `send_batch` each).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    batch: u64,
}

#[derive(Debug, Clone, Args)]
struct PublishArgs {
    #[command(flatten)]
    common: Common,
    /// Body size of each record in bytes.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Records to publish.
    #[arg(long, default_value_t = 100_000)]
    count: u64,
    /// Concurrent tasks, each with one `send` (one record) outstanding.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    inflight: u64,
}

#[derive(Debug, Clone, Args)]
struct ConsumeArgs {
    #[command(flatten)]
    common: Common,
    /// Consumer group.
    #[arg(long, default_value = "bench")]
    group: String,
    /// Records to receive and ack before stopping.
    #[arg(long, default_value_t = 100_000)]
    count: u64,
    /// Concurrent receivers.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    inflight: u64,
    /// Most records per receive.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    batch: u32,
    /// Long-poll wait of each receive, in ms.
    #[arg(long, default_value_t = 1_000)]
    wait_ms: u64,
    /// Lease of each received record, in ms.
    #[arg(long, default_value_t = 30_000)]
    invisible_ms: u64,
    /// Stop when nothing was received for this long, in ms.
    #[arg(long, default_value_t = 10_000)]
    idle_ms: u64,
}

/// The final report (one JSON line on stdout).
#[derive(Debug, Serialize)]
struct Report {
    workload: &'static str,
    records: u64,
    bytes: u64,
    seconds: f64,
    records_per_sec: f64,
    /// Decimal megabytes (10^6 bytes) of record bodies per second.
    mb_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    /// Failed requests (after the SDK's retries), plus failed per-record acks.
    errors: u64,
    /// CPU seconds (user + system) of the server processes during the run;
    /// `None` (null) when no server process could be read.
    server_cpu_seconds: Option<f64>,
    /// `server_cpu_seconds` per wall-clock second (1.0 = one core busy).
    server_cpu_cores: Option<f64>,
    /// Server CPU µs per record (null when no records).
    server_cpu_us_per_record: Option<f64>,
    /// Server processes measured (readable at the start and the end).
    server_pids: usize,
    /// Bytes the server processes caused to be written to storage during
    /// the run (`write_bytes` of `/proc/PID/io`; null when unreadable).
    server_disk_write_bytes: Option<u64>,
    /// `server_disk_write_bytes` / record body bytes, all replicas
    /// together: divide by the replication factor for the write
    /// amplification of one replica. Flushes and compactions that finish
    /// after the run are not counted.
    disk_bytes_per_body_byte: Option<f64>,
}

impl Report {
    /// Adds what a [`CpuSampler`] measured over the run.
    fn with_cpu(mut self, cpu: Option<CpuUsage>) -> Self {
        if let Some(u) = cpu {
            self.server_cpu_seconds = Some(u.seconds);
            self.server_cpu_cores = Some(u.cores());
            self.server_cpu_us_per_record =
                (self.records > 0).then(|| u.seconds * 1e6 / self.records as f64);
            self.server_pids = u.pids;
            self.server_disk_write_bytes = u.disk_write_bytes;
            self.disk_bytes_per_body_byte = u
                .disk_write_bytes
                .filter(|_| self.bytes > 0)
                .map(|w| w as f64 / self.bytes as f64);
        }
        self
    }
}

#[derive(Debug, Default)]
struct Counters {
    records: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
}

/// Acks `msgs` and counts them: each acked record (and its body bytes),
/// or an error per record refused and one for a failed call. True when the
/// call went through.
async fn ack_and_count(
    consumer: &petrel_sdk::SimpleConsumer,
    msgs: &[petrel_sdk::ReceivedMessage],
    c: &Counters,
    workload: &str,
) -> bool {
    match consumer.ack_many(msgs).await {
        Ok(results) => {
            for (m, r) in msgs.iter().zip(results) {
                match r {
                    Ok(()) => {
                        c.records.fetch_add(1, Ordering::Relaxed);
                        c.bytes.fetch_add(m.body.len() as u64, Ordering::Relaxed);
                    }
                    Err(_) => {
                        c.errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            true
        }
        Err(e) => {
            c.errors.fetch_add(1, Ordering::Relaxed);
            eprintln!("{workload}: ack failed: {e}");
            false
        }
    }
}

fn new_histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).context("creating histogram")
}

fn record_latency(h: &mut Histogram<u64>, since: Instant) {
    let us = u64::try_from(since.elapsed().as_micros()).unwrap_or(MAX_LATENCY_US);
    h.saturating_record(us.clamp(1, MAX_LATENCY_US));
}

/// The state of a load workload while it runs.
struct Run {
    workload: &'static str,
    counters: Arc<Counters>,
    done: Arc<AtomicBool>,
    progress: tokio::task::JoinHandle<()>,
    cpu: CpuSampler,
    start: Instant,
}

impl Run {
    /// Starts the progress printer and the server CPU sampler (over `pids`,
    /// or the server processes found on this machine) and the clock.
    fn start(workload: &'static str, pids: Option<&[u32]>) -> Self {
        let counters = Arc::new(Counters::default());
        let done = Arc::new(AtomicBool::new(false));
        let progress = spawn_progress(workload, counters.clone(), done.clone());
        let cpu = CpuSampler::start(pids);
        if cpu.pids() == 0 {
            eprintln!("{workload}: no server process to measure; CPU fields will be null");
        }
        Self {
            workload,
            counters,
            done,
            progress,
            cpu,
            start: Instant::now(),
        }
    }

    /// Waits for the workers, merges their histograms, stops the progress
    /// printer and the CPU sampler and builds the report.
    async fn finish(
        self,
        workers: Vec<tokio::task::JoinHandle<anyhow::Result<Histogram<u64>>>>,
    ) -> anyhow::Result<Report> {
        let mut hist = new_histogram()?;
        let mut failed = None;
        for w in workers {
            match w.await.context("worker panicked").and_then(|r| r) {
                Ok(h) => hist.add(&h).context("merging histograms")?,
                Err(e) => failed = failed.or(Some(e)),
            }
        }
        let elapsed = self.start.elapsed();
        let cpu = self.cpu.finish();
        self.done.store(true, Ordering::Relaxed);
        self.progress.abort();
        if let Some(e) = failed {
            return Err(e);
        }
        Ok(report(self.workload, &self.counters, &hist, elapsed).with_cpu(cpu))
    }
}

fn report(workload: &'static str, c: &Counters, h: &Histogram<u64>, elapsed: Duration) -> Report {
    let seconds = elapsed.as_secs_f64().max(1e-9);
    let records = c.records.load(Ordering::Relaxed);
    let bytes = c.bytes.load(Ordering::Relaxed);
    let q = |p: f64| {
        if h.is_empty() {
            0.0
        } else {
            h.value_at_quantile(p) as f64 / 1000.0
        }
    };
    Report {
        workload,
        records,
        bytes,
        seconds,
        records_per_sec: records as f64 / seconds,
        mb_per_sec: bytes as f64 / 1e6 / seconds,
        p50_ms: q(0.5),
        p99_ms: q(0.99),
        p999_ms: q(0.999),
        errors: c.errors.load(Ordering::Relaxed),
        server_cpu_seconds: None,
        server_cpu_cores: None,
        server_cpu_us_per_record: None,
        server_disk_write_bytes: None,
        disk_bytes_per_body_byte: None,
        server_pids: 0,
    }
}

/// Prints progress to stderr once a second until `done` is set.
fn spawn_progress(
    workload: &'static str,
    c: Arc<Counters>,
    done: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let start = Instant::now();
        let mut last = 0u64;
        let mut tick = tokio::time::interval(PROGRESS_EVERY);
        tick.tick().await;
        while !done.load(Ordering::Relaxed) {
            tick.tick().await;
            let n = c.records.load(Ordering::Relaxed);
            eprintln!(
                "{workload}: {:>6.1}s  {n} records  {} records/s  {:.1} MB total  errors {}",
                start.elapsed().as_secs_f64(),
                n - last,
                c.bytes.load(Ordering::Relaxed) as f64 / 1e6,
                c.errors.load(Ordering::Relaxed),
            );
            last = n;
        }
    })
}

async fn connect(endpoint: &[String], common: &Common) -> anyhow::Result<Client> {
    let client = Client::builder(endpoint.to_vec())
        .request_timeout(Duration::from_millis(common.timeout_ms))
        .build()
        .context("connecting")?;
    if common.create_topic {
        let spec = TopicSpec::new(common.topic.clone())
            .queues(common.queues)
            .replicas(common.replicas);
        match client.admin().create_topic(spec).await {
            Ok(_) | Err(PetrelError::AlreadyExists(_)) => {}
            Err(e) => return Err(e).context("creating the topic"),
        }
        wait_for_leaders(
            &client,
            &common.topic,
            Duration::from_millis(common.timeout_ms),
        )
        .await;
    }
    Ok(client)
}

/// Waits (at most `budget`) until every queue of `topic` has a leader, so
/// that a run on a topic it just created does not measure the elections of
/// its queues; says so on stderr and goes on when the budget runs out.
async fn wait_for_leaders(client: &Client, topic: &str, budget: Duration) {
    let deadline = Instant::now() + budget;
    loop {
        let leaderless = match client.admin().describe_topic(topic).await {
            Ok(info) if !info.queues.is_empty() => {
                info.queues.iter().filter(|q| q.leader == 0).count()
            }
            Ok(_) | Err(_) => usize::MAX,
        };
        if leaderless == 0 {
            return;
        }
        if Instant::now() >= deadline {
            eprintln!("{topic}: not every queue has a leader after {budget:?}; starting anyway");
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A stop signal set once (by any clone) and awaited by many tasks.
#[derive(Debug, Clone)]
struct Stop(Arc<tokio::sync::watch::Sender<bool>>);

/// What a receiver of a stoppable workload got from one receive.
enum Received {
    /// The workload stopped while the receive long-polled.
    Stopped,
    /// The receive failed (counted as an error and reported on stderr).
    Failed,
    Got(Vec<petrel_sdk::ReceivedMessage>),
}

/// One receive of up to `n` records that gives way to `stop`.
async fn receive_or_stop(
    consumer: &petrel_sdk::SimpleConsumer,
    n: u32,
    invisible: Duration,
    wait: Duration,
    stop: &Stop,
    c: &Counters,
    workload: &str,
) -> Received {
    tokio::select! {
        r = consumer.receive_with(n, invisible, wait) => match r {
            Ok(m) => Received::Got(m),
            Err(e) => {
                c.errors.fetch_add(1, Ordering::Relaxed);
                eprintln!("{workload}: receive failed: {e}");
                Received::Failed
            }
        },
        () = stop.stopped() => Received::Stopped,
    }
}

impl Stop {
    fn new() -> Self {
        Self(Arc::new(tokio::sync::watch::channel(false).0))
    }

    /// Sets the signal (idempotent).
    fn stop(&self) {
        self.0.send_replace(true);
    }

    fn is_stopped(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once the signal is set (at once if it already is).
    async fn stopped(&self) {
        let mut rx = self.0.subscribe();
        // The sender lives in `self`, so this cannot fail.
        let _ = rx.wait_for(|s| *s).await;
    }
}

/// A consumer group name no earlier run used: `PREFIX-MS-PID` (ms since
/// the Unix epoch, this process's id).
fn fresh_group(prefix: &str) -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    format!("{prefix}-{ms}-{}", std::process::id())
}

/// Moves consumer group `group` to the current end of every queue of
/// `topic` (a commit where the group is behind the end; nothing on an empty
/// topic), so that it receives only records produced from now on. Returns
/// how many records it skipped.
async fn start_group_at_end(client: &Client, topic: &str, group: &str) -> anyhow::Result<u64> {
    let info = client
        .admin()
        .describe_topic(topic)
        .await
        .with_context(|| format!("describing topic {topic}"))?;
    let pull = client.pull_consumer(topic, group);
    let mut skipped = 0;
    for q in &info.queues {
        let o = pull
            .committed(q.queue)
            .await
            .with_context(|| format!("reading group {group}'s offset of {topic}/{}", q.queue))?;
        if o.end_offset > o.committed_offset {
            pull.commit(q.queue, o.end_offset).await.with_context(|| {
                format!("moving group {group} to the end of {topic}/{}", q.queue)
            })?;
            skipped += o.end_offset - o.committed_offset;
        }
    }
    Ok(skipped)
}

/// A record body of `size` bytes.
fn make_body(size: usize) -> Bytes {
    Bytes::from(
        (0..size)
            .map(|i| b'a' + (i % 26) as u8)
            .collect::<Vec<u8>>(),
    )
}

/// `--batch` records per `send_batch`, `--inflight` requests at once.
async fn produce(
    a: &ProduceArgs,
    endpoint: &[String],
    pids: Option<&[u32]>,
) -> anyhow::Result<Report> {
    let client = connect(endpoint, &a.common).await?;
    run_produce("produce", &client, a, pids).await
}

/// The produce workload on a connected client, reported as `workload`
/// (also the label of its progress lines).
async fn run_produce(
    workload: &'static str,
    client: &Client,
    a: &ProduceArgs,
    pids: Option<&[u32]>,
) -> anyhow::Result<Report> {
    let producer = client.producer(a.common.topic.clone()).build();
    let body = make_body(a.size);
    let batches = a.count.div_ceil(a.batch);
    let next = Arc::new(AtomicU64::new(0));
    let run = Run::start(workload, pids);
    let mut workers = Vec::new();
    for _ in 0..a.inflight.min(batches.max(1)) {
        let (producer, body, next, c) = (
            producer.clone(),
            body.clone(),
            next.clone(),
            run.counters.clone(),
        );
        let (count, batch, size) = (a.count, a.batch, a.size as u64);
        workers.push(tokio::spawn(async move {
            let mut h = new_histogram()?;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= batches {
                    return anyhow::Ok(h);
                }
                let n = batch.min(count - i * batch);
                let msgs = (0..n).map(|_| Message::new(body.clone())).collect();
                let t = Instant::now();
                match producer.send_batch(msgs).await {
                    Ok(_) => {
                        record_latency(&mut h, t);
                        c.records.fetch_add(n, Ordering::Relaxed);
                        c.bytes.fetch_add(n * size, Ordering::Relaxed);
                    }
                    Err(e) => {
                        c.errors.fetch_add(1, Ordering::Relaxed);
                        eprintln!("{workload}: request failed: {e}");
                    }
                }
            }
        }));
    }
    run.finish(workers).await
}

/// One `Producer::send` (one record) per request from `--inflight` tasks
/// sharing one producer with default settings.
async fn publish(
    a: &PublishArgs,
    endpoint: &[String],
    pids: Option<&[u32]>,
) -> anyhow::Result<Report> {
    let client = connect(endpoint, &a.common).await?;
    let producer = client.producer(a.common.topic.clone()).build();
    let body = make_body(a.size);
    let next = Arc::new(AtomicU64::new(0));
    let run = Run::start("publish", pids);
    let mut workers = Vec::new();
    for _ in 0..a.inflight.min(a.count.max(1)) {
        let (producer, body, next, c) = (
            producer.clone(),
            body.clone(),
            next.clone(),
            run.counters.clone(),
        );
        let (count, size) = (a.count, a.size as u64);
        workers.push(tokio::spawn(async move {
            let mut h = new_histogram()?;
            while next.fetch_add(1, Ordering::Relaxed) < count {
                let t = Instant::now();
                match producer.send(Message::new(body.clone())).await {
                    Ok(_) => {
                        record_latency(&mut h, t);
                        c.records.fetch_add(1, Ordering::Relaxed);
                        c.bytes.fetch_add(size, Ordering::Relaxed);
                    }
                    Err(e) => {
                        c.errors.fetch_add(1, Ordering::Relaxed);
                        eprintln!("publish: send failed: {e}");
                    }
                }
            }
            anyhow::Ok(h)
        }));
    }
    run.finish(workers).await
}

/// Receive + ack with `--inflight` receivers until `--count` records are
/// acked or nothing arrives for `--idle-ms`.
async fn consume(
    a: &ConsumeArgs,
    endpoint: &[String],
    pids: Option<&[u32]>,
) -> anyhow::Result<Report> {
    let client = connect(endpoint, &a.common).await?;
    let consumer = client
        .simple_consumer(a.common.topic.clone(), a.group.clone())
        .build();
    // Claimed records (may run ahead of acked ones), to stop near --count.
    let claimed = Arc::new(AtomicU64::new(0));
    let last_seen_ms = Arc::new(AtomicU64::new(0));
    let run = Run::start("consume", pids);
    let start = run.start;
    let invisible = Duration::from_millis(a.invisible_ms);
    let wait = Duration::from_millis(a.wait_ms);
    let mut workers = Vec::new();
    for _ in 0..a.inflight {
        let (consumer, c, done, claimed, last_seen_ms) = (
            consumer.clone(),
            run.counters.clone(),
            run.done.clone(),
            claimed.clone(),
            last_seen_ms.clone(),
        );
        let (count, batch, idle_ms) = (a.count, a.batch, a.idle_ms);
        workers.push(tokio::spawn(async move {
            let mut h = new_histogram()?;
            while !done.load(Ordering::Relaxed) {
                let got = claimed.load(Ordering::Relaxed);
                if got >= count {
                    break;
                }
                let want = (count - got).min(u64::from(batch)) as u32;
                let t = Instant::now();
                let msgs = match consumer.receive_with(want, invisible, wait).await {
                    Ok(m) => {
                        record_latency(&mut h, t);
                        m
                    }
                    Err(e) => {
                        c.errors.fetch_add(1, Ordering::Relaxed);
                        eprintln!("consume: receive failed: {e}");
                        continue;
                    }
                };
                let now_ms = start.elapsed().as_millis() as u64;
                if msgs.is_empty() {
                    if now_ms.saturating_sub(last_seen_ms.load(Ordering::Relaxed)) >= idle_ms {
                        eprintln!("consume: nothing received for {idle_ms} ms, stopping");
                        done.store(true, Ordering::Relaxed);
                    }
                    continue;
                }
                last_seen_ms.fetch_max(now_ms, Ordering::Relaxed);
                claimed.fetch_add(msgs.len() as u64, Ordering::Relaxed);
                ack_and_count(&consumer, &msgs, &c, "consume").await;
            }
            anyhow::Ok(h)
        }));
    }
    run.finish(workers).await
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let report = match cli.workload {
        Workload::Produce { target, args } => {
            produce(&args, &target.endpoint, target.server_pids.as_deref()).await?
        }
        Workload::Publish { target, args } => {
            publish(&args, &target.endpoint, target.server_pids.as_deref()).await?
        }
        Workload::Consume { target, args } => {
            consume(&args, &target.endpoint, target.server_pids.as_deref()).await?
        }
        Workload::Drain { target, args } => {
            drain::run(&args, &target.endpoint, target.server_pids.as_deref()).await?
        }
        Workload::E2e { target, args } => {
            e2e::run(&args, &target.endpoint, target.server_pids.as_deref()).await?
        }
        Workload::Idle { target, args } => {
            let r = idle::run(&args, &target.endpoint, target.server_pids.as_deref()).await?;
            println!("{}", serde_json::to_string(&r)?);
            return Ok(());
        }
        Workload::Suite(a) => return suite::run(a).await,
        Workload::Failover(a) => {
            let r = failover::run(a).await?;
            println!("{}", serde_json::to_string(&r)?);
            return Ok(());
        }
        Workload::Timers(a) => {
            let r = timers::run(a).await?;
            println!("{}", serde_json::to_string(&r)?);
            return Ok(());
        }
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_valid() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn fresh_groups_are_valid_names() {
        let g = fresh_group("e2e");
        assert!(g.starts_with("e2e-"), "{g}");
        petrel_proto::validate::group_name(&g).unwrap();
    }

    #[tokio::test]
    async fn stop_wakes_every_waiter_and_later_ones() {
        let stop = Stop::new();
        assert!(!stop.is_stopped());
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let s = stop.clone();
                tokio::spawn(async move { s.stopped().await })
            })
            .collect();
        stop.clone().stop();
        for w in waiters {
            w.await.unwrap();
        }
        assert!(stop.is_stopped());
        stop.stopped().await;
        stop.stop();
    }

    #[test]
    fn report_uses_histogram_quantiles() {
        let c = Counters::default();
        c.records.store(1000, Ordering::Relaxed);
        c.bytes.store(2_000_000, Ordering::Relaxed);
        let mut h = new_histogram().unwrap();
        for us in 1..=1000u64 {
            h.record(us * 1000).unwrap();
        }
        let r = report("produce", &c, &h, Duration::from_secs(2));
        assert_eq!(r.records_per_sec, 500.0);
        assert_eq!(r.mb_per_sec, 1.0);
        assert!((r.p50_ms - 500.0).abs() < 2.0);
        assert!((r.p99_ms - 990.0).abs() < 5.0);
        let line = serde_json::to_string(&r).unwrap();
        assert!(line.starts_with("{\"workload\":\"produce\",\"records\":1000,"));
    }

    #[test]
    fn cpu_fields_come_last_and_are_null_when_unmeasured() {
        let c = Counters::default();
        c.records.store(1000, Ordering::Relaxed);
        let h = new_histogram().unwrap();
        let r = report("publish", &c, &h, Duration::from_secs(2)).with_cpu(None);
        let line = serde_json::to_string(&r).unwrap();
        assert!(
            line.ends_with(
                ",\"errors\":0,\"server_cpu_seconds\":null,\"server_cpu_cores\":null,\
                 \"server_cpu_us_per_record\":null,\"server_pids\":0,\
                 \"server_disk_write_bytes\":null,\"disk_bytes_per_body_byte\":null}"
            ),
            "{line}"
        );
        let cpu = CpuUsage {
            seconds: 0.5,
            wall_seconds: 2.0,
            pids: 4,
            disk_write_bytes: Some(6000),
        };
        let r = report("publish", &c, &h, Duration::from_secs(2)).with_cpu(Some(cpu));
        assert_eq!(r.server_cpu_seconds, Some(0.5));
        assert_eq!(r.server_cpu_cores, Some(0.25));
        assert_eq!(r.server_cpu_us_per_record, Some(500.0));
        assert_eq!(r.server_pids, 4);
        // No body bytes counted in this report: no ratio.
        assert_eq!(r.server_disk_write_bytes, Some(6000));
        assert_eq!(r.disk_bytes_per_body_byte, None);
        c.bytes.store(2000, Ordering::Relaxed);
        let r = report("publish", &c, &h, Duration::from_secs(2)).with_cpu(Some(cpu));
        assert_eq!(r.disk_bytes_per_body_byte, Some(3.0));
        // No records: no per-record figure (rather than infinity).
        let r =
            report("publish", &Counters::default(), &h, Duration::from_secs(2)).with_cpu(Some(cpu));
        assert_eq!(r.server_cpu_us_per_record, None);
        assert_eq!(r.server_cpu_cores, Some(0.25));
    }
}
