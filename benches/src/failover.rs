//! `petrel-bench failover`: how long writes to a queue stop when the broker
//! leading it is SIGKILLed.
//!
//! Starts its own cluster from the binaries beside this one (3 brokers with
//! default Raft settings, 1 proxy), creates a topic, and runs one writer per
//! queue (a keyed `Producer::send` every `--interval-ms`). Then, `--kills`
//! times: SIGKILL brokers 1, 2, 3, 1, ... in turn, note the queues it
//! led, and measure for each the time from the kill to the first write acked
//! after it; restart the broker and let the controller rebalance. Every
//! process it starts is killed (by PID) when it ends.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use petrel_sdk::{Client, Message, TopicSpec};
use serde::Serialize;

use crate::cluster::{LocalCluster, READY_TIMEOUT};

#[derive(Debug, Args)]
pub struct FailoverArgs {
    /// Broker kills to measure.
    #[arg(long, default_value_t = 5)]
    kills: u32,
    /// Queues of the topic (RF 3).
    #[arg(long, default_value_t = 12)]
    queues: u32,
    /// Pause between one writer's writes, in ms.
    #[arg(long, default_value_t = 10)]
    interval_ms: u64,
    /// First port to use (proxy; brokers on the next three).
    #[arg(long, default_value_t = 7600)]
    base_port: u16,
    /// Directory for the brokers' data (a fresh temporary one by default).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
pub struct FailoverReport {
    workload: &'static str,
    kills: u32,
    /// One sample per queue led by a killed broker: ms from the kill to the
    /// first write acked after it.
    samples_ms: Vec<u64>,
    p50_ms: u64,
    p99_ms: u64,
    max_ms: u64,
    write_errors: u64,
}

fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// Runs the measurement; Ctrl-C or SIGTERM stops it and still kills every
/// process it started.
pub async fn run(a: FailoverArgs) -> anyhow::Result<FailoverReport> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = measure(a) => r,
        _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted"),
        _ = term.recv() => anyhow::bail!("terminated"),
    }
}

async fn measure(a: FailoverArgs) -> anyhow::Result<FailoverReport> {
    let mut cluster = LocalCluster::start(a.base_port, a.data_dir.clone())?;
    let r = measure_on(&mut cluster, &a).await;
    if r.is_err() {
        // Keep the logs of a failed run.
        cluster.keep_dir();
        eprintln!("failover: logs kept in {}", cluster.dir().display());
    }
    r
}

async fn measure_on(
    cluster: &mut LocalCluster,
    a: &FailoverArgs,
) -> anyhow::Result<FailoverReport> {
    let client = Client::builder(vec![cluster.endpoint()])
        .request_timeout(Duration::from_secs(30))
        .build()?;
    let admin = client.admin();
    let topic = "failover";
    LocalCluster::create_topic_when_ready(
        &admin,
        TopicSpec::new(topic).queues(a.queues).replicas(3),
        READY_TIMEOUT,
    )
    .await?;
    let producer = client.producer(topic).build();
    // A key per queue.
    let mut keys: BTreeMap<u32, String> = BTreeMap::new();
    for i in 0..10_000 {
        if keys.len() == a.queues as usize {
            break;
        }
        let k = format!("k{i}");
        let r = producer
            .send(Message::new("probe").with_key(k.clone()))
            .await?;
        keys.entry(r.queue).or_insert(k);
    }
    anyhow::ensure!(keys.len() == a.queues as usize, "no key for every queue");
    // Writers: per queue the instants of acked writes.
    let acks: Arc<Mutex<BTreeMap<u32, Vec<Instant>>>> = Arc::default();
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for (q, k) in keys.clone() {
        let (p, acks, errors, stop) =
            (producer.clone(), acks.clone(), errors.clone(), stop.clone());
        let interval = Duration::from_millis(a.interval_ms);
        writers.push(tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match p.send(Message::new("x").with_key(k.clone())).await {
                    Ok(_) => acks
                        .lock()
                        .unwrap()
                        .entry(q)
                        .or_default()
                        .push(Instant::now()),
                    Err(_) => {
                        errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(interval).await;
            }
        }));
    }
    let mut samples = Vec::new();
    for k in 0..a.kills {
        // Settle: everyone up and balanced.
        tokio::time::sleep(Duration::from_secs(6)).await;
        let info = admin.describe_topic(topic).await?;
        let mut led: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
        for q in &info.queues {
            led.entry(q.leader).or_default().push(q.queue);
        }
        // Brokers in turn (so the meta leader is killed too).
        let victim = u64::from(k % 3) + 1;
        let queues = led.get(&victim).cloned().unwrap_or_default();
        let i = victim as usize - 1;
        cluster.kill_broker(i)?;
        let killed = Instant::now();
        // Wait until each affected queue has an ack well after the kill.
        let wait_until = killed + Duration::from_secs(30);
        let mut got: BTreeMap<u32, u64> = BTreeMap::new();
        while got.len() < queues.len() && Instant::now() < wait_until {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let acks = acks.lock().unwrap();
            for q in &queues {
                if got.contains_key(q) {
                    continue;
                }
                // An ack within 50 ms of the kill was committed before it.
                let first = acks.get(q).and_then(|v| {
                    v.iter()
                        .find(|t| **t > killed + Duration::from_millis(50))
                        .copied()
                });
                if let Some(t) = first {
                    got.insert(*q, t.duration_since(killed).as_millis() as u64);
                }
            }
        }
        eprintln!(
            "kill {}: broker {victim} led queues {queues:?}; write gaps (ms) {:?}",
            k + 1,
            got.values().collect::<Vec<_>>()
        );
        samples.extend(got.values().copied());
        for q in &queues {
            if !got.contains_key(q) {
                samples.push(30_000);
            }
        }
        cluster.restart_broker(i)?;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        let _ = w.await;
    }
    let mut sorted = samples.clone();
    sorted.sort_unstable();
    Ok(FailoverReport {
        workload: "failover",
        kills: a.kills,
        p50_ms: percentile(&sorted, 0.5),
        p99_ms: percentile(&sorted, 0.99),
        max_ms: sorted.last().copied().unwrap_or(0),
        samples_ms: samples,
        write_errors: errors.load(std::sync::atomic::Ordering::Relaxed),
    })
}
