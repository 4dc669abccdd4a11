//! `petrel-bench`: a load generator for a running Petrel proxy.
//!
//! One subcommand per workload; progress goes to stderr once a second and
//! the result is ONE JSON line on stdout:
//!
//! ```text
//! {"workload":"produce","records":N,"bytes":B,"seconds":S,"records_per_sec":..,
//!  "mb_per_sec":..,"p50_ms":..,"p99_ms":..,"p999_ms":..,"errors":E}
//! ```
//!
//! Latencies are per request (produce: one `send_batch`; consume: one
//! receive), recorded in microseconds in an HDR histogram.

use anyhow::Context as _;
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};

mod failover;
mod timers;
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
    Produce(ProduceArgs),
    /// Receive and ack `--count` records with `--inflight` concurrent
    /// receivers, `--batch` records per receive.
    Consume(ConsumeArgs),
    /// Start a 3-broker cluster of its own, SIGKILL its brokers in turn
    /// `--kills` times, and report per affected queue the time
    /// from the kill to the first acked write (p50/p99/max).
    Failover(failover::FailoverArgs),
    /// Delayed-delivery accuracy and send latency on one DELAY queue,
    /// before and after loading it with `--pending` far-future timers.
    Timers(timers::TimersArgs),
}

#[derive(Debug, Args)]
struct Common {
    /// Proxy endpoint(s), comma-separated; requests fail over between them.
    #[arg(
        long,
        env = "PETREL_ENDPOINT",
        default_value = "127.0.0.1:7400",
        value_delimiter = ','
    )]
    endpoint: Vec<String>,
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

#[derive(Debug, Args)]
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

#[derive(Debug, Args)]
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
}

#[derive(Debug, Default)]
struct Counters {
    records: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
}

fn new_histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).context("creating histogram")
}

fn record_latency(h: &mut Histogram<u64>, since: Instant) {
    let us = u64::try_from(since.elapsed().as_micros()).unwrap_or(MAX_LATENCY_US);
    h.saturating_record(us.clamp(1, MAX_LATENCY_US));
}

/// Waits for the workers, merges their histograms, stops the progress
/// printer and builds the report.
async fn finish(
    workload: &'static str,
    workers: Vec<tokio::task::JoinHandle<anyhow::Result<Histogram<u64>>>>,
    counters: &Counters,
    start: Instant,
    done: &AtomicBool,
    progress: tokio::task::JoinHandle<()>,
) -> anyhow::Result<Report> {
    let mut hist = new_histogram()?;
    for w in workers {
        let h = w.await.context("worker panicked")??;
        hist.add(&h).context("merging histograms")?;
    }
    let elapsed = start.elapsed();
    done.store(true, Ordering::Relaxed);
    progress.abort();
    Ok(report(workload, counters, &hist, elapsed))
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

async fn connect(common: &Common) -> anyhow::Result<Client> {
    let client = Client::builder(common.endpoint.clone())
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
    }
    Ok(client)
}

async fn produce(a: ProduceArgs) -> anyhow::Result<Report> {
    let client = connect(&a.common).await?;
    let producer = client.producer(a.common.topic.clone()).build();
    let body = Bytes::from(
        (0..a.size)
            .map(|i| b'a' + (i % 26) as u8)
            .collect::<Vec<u8>>(),
    );
    let batches = a.count.div_ceil(a.batch);
    let next = Arc::new(AtomicU64::new(0));
    let counters = Arc::new(Counters::default());
    let done = Arc::new(AtomicBool::new(false));
    let progress = spawn_progress("produce", counters.clone(), done.clone());
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..a.inflight.min(batches.max(1)) {
        let (producer, body, next, c) = (
            producer.clone(),
            body.clone(),
            next.clone(),
            counters.clone(),
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
                        eprintln!("produce: request failed: {e}");
                    }
                }
            }
        }));
    }
    finish("produce", workers, &counters, start, &done, progress).await
}

async fn consume(a: ConsumeArgs) -> anyhow::Result<Report> {
    let client = connect(&a.common).await?;
    let consumer = client
        .simple_consumer(a.common.topic.clone(), a.group.clone())
        .build();
    let counters = Arc::new(Counters::default());
    let done = Arc::new(AtomicBool::new(false));
    // Claimed records (may run ahead of acked ones), to stop near --count.
    let claimed = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let last_seen_ms = Arc::new(AtomicU64::new(0));
    let progress = spawn_progress("consume", counters.clone(), done.clone());
    let invisible = Duration::from_millis(a.invisible_ms);
    let wait = Duration::from_millis(a.wait_ms);
    let mut workers = Vec::new();
    for _ in 0..a.inflight {
        let (consumer, c, done, claimed, last_seen_ms) = (
            consumer.clone(),
            counters.clone(),
            done.clone(),
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
                match consumer.ack_many(&msgs).await {
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
                    }
                    Err(e) => {
                        c.errors.fetch_add(1, Ordering::Relaxed);
                        eprintln!("consume: ack failed: {e}");
                    }
                }
            }
            anyhow::Ok(h)
        }));
    }
    finish("consume", workers, &counters, start, &done, progress).await
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let report = match cli.workload {
        Workload::Produce(a) => produce(a).await?,
        Workload::Consume(a) => consume(a).await?,
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
}
