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
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use petrel_sdk::{Client, Message, TopicSpec};
use serde::Serialize;

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

struct Procs(Vec<Option<Child>>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in self.0.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let p = std::env::current_exe()?.with_file_name(name);
    anyhow::ensure!(p.exists(), "{} not found beside petrel-bench", p.display());
    Ok(p)
}

/// Appends a process's log to `dir/NAME.log`.
fn log(dir: &std::path::Path, name: &str) -> anyhow::Result<Stdio> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("{name}.log")))?;
    Ok(Stdio::from(f))
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
    let tmp = std::env::temp_dir().join(format!("petrel-failover-{}", std::process::id()));
    let dir = a.data_dir.clone().unwrap_or(tmp.clone());
    std::fs::create_dir_all(&dir)?;
    let broker_bin = sibling("petrel-broker")?;
    let proxy_bin = sibling("petrel-proxy")?;
    let ports: Vec<u16> = (1..=3).map(|i| a.base_port + i).collect();
    let peers = ports
        .iter()
        .enumerate()
        .map(|(i, p)| format!("{}=127.0.0.1:{p}", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    let start_broker = |i: usize| -> anyhow::Result<Child> {
        Ok(Command::new(&broker_bin)
            .args(["--id", &(i + 1).to_string()])
            .args(["--listen", &format!("127.0.0.1:{}", ports[i])])
            .args(["--peers", &peers])
            .arg("--data-dir")
            .arg(dir.join(format!("b{}", i + 1)))
            .env("PETREL_LOG", "info,openraft=warn")
            .stdout(Stdio::null())
            .stderr(log(&dir, &format!("broker{}", i + 1))?)
            .spawn()?)
    };
    let mut procs = Procs(Vec::new());
    for i in 0..3 {
        procs.0.push(Some(start_broker(i)?));
    }
    let brokers = ports
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    procs.0.push(Some(
        Command::new(&proxy_bin)
            .args(["--listen", &format!("127.0.0.1:{}", a.base_port)])
            .args(["--brokers", &brokers])
            .env("PETREL_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log(&dir, "proxy")?)
            .spawn()?,
    ));
    let client = Client::builder(vec![format!("127.0.0.1:{}", a.base_port)])
        .request_timeout(Duration::from_secs(30))
        .build()?;
    let admin = client.admin();
    let topic = "failover";
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match admin
            .create_topic(TopicSpec::new(topic).queues(a.queues).replicas(3))
            .await
        {
            Ok(_) | Err(petrel_sdk::Error::AlreadyExists(_)) => break,
            Err(e) if Instant::now() > deadline => return Err(e).context("creating the topic"),
            Err(_) => tokio::time::sleep(Duration::from_millis(300)).await,
        }
    }
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
        if let Some(mut c) = procs.0[i].take() {
            c.kill()?;
            c.wait()?;
        }
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
        procs.0[i] = Some(start_broker(i)?);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        let _ = w.await;
    }
    drop(procs);
    if a.data_dir.is_none() {
        let _ = std::fs::remove_dir_all(&tmp);
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
