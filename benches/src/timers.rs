//! `petrel-bench timers`: does a queue with many pending delayed records
//! stay fast? Measures short-delay probes on one DELAY queue before and
//! after loading it with `--pending` timers due far in the future: the
//! send latency of each probe and how late it is received after its
//! delivery time.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use clap::Args;
use petrel_sdk::pb::MessageType;
use petrel_sdk::{Client, Error as PetrelError, Message, TopicSpec};
use serde::Serialize;

#[derive(Debug, Args)]
pub struct TimersArgs {
    /// Proxy endpoint.
    #[arg(long, env = "PETREL_ENDPOINT", default_value = "127.0.0.1:7400")]
    endpoint: String,
    /// DELAY topic to create (one queue, so every timer is on it).
    #[arg(long, default_value = "bench-timers")]
    topic: String,
    /// Timers to load, due in an hour.
    #[arg(long, default_value_t = 1_000_000)]
    pending: u64,
    /// Probes per phase.
    #[arg(long, default_value_t = 200)]
    probes: u64,
    /// Delay of each probe, in ms.
    #[arg(long, default_value_t = 500)]
    probe_delay_ms: u64,
}

#[derive(Debug, Serialize)]
pub struct Phase {
    pending_before: u64,
    send_p50_ms: f64,
    send_p99_ms: f64,
    late_p50_ms: i64,
    late_p99_ms: i64,
    late_max_ms: i64,
    early: u64,
}

#[derive(Debug, Serialize)]
pub struct TimersReport {
    workload: &'static str,
    pending: u64,
    load_seconds: f64,
    load_records_per_sec: f64,
    baseline: Phase,
    loaded: Phase,
}

pub async fn run(a: TimersArgs) -> anyhow::Result<TimersReport> {
    let client = Client::connect([a.endpoint.clone()])?;
    match client
        .admin()
        .create_topic(
            TopicSpec::new(&a.topic)
                .queues(1)
                .replicas(3)
                .message_type(MessageType::Delay),
        )
        .await
    {
        Ok(_) | Err(PetrelError::AlreadyExists(_)) => {}
        Err(e) => return Err(e.into()),
    }
    let baseline = probe(&client, &a, "base", 0).await?;
    eprintln!("baseline: {baseline:?}");

    let start = Instant::now();
    let producer = client.producer(&a.topic).build();
    let far = petrel_proto::now_ms() + 3_600_000;
    let mut sent = 0u64;
    let mut inflight = futures::stream::FuturesUnordered::new();
    use futures::StreamExt;
    while sent < a.pending || !inflight.is_empty() {
        while sent < a.pending && inflight.len() < 8 {
            let n = (a.pending - sent).min(1000);
            let batch: Vec<Message> = (0..n)
                .map(|i| Message::new(format!("t{}", sent + i)).with_deliver_at(far))
                .collect();
            let p = producer.clone();
            inflight.push(async move { p.send_batch(batch).await });
            sent += n;
        }
        if let Some(r) = inflight.next().await {
            r?;
        }
    }
    let load = start.elapsed().as_secs_f64();
    eprintln!("loaded {} timers in {load:.1} s", a.pending);

    let loaded = probe(&client, &a, "loaded", a.pending).await?;
    eprintln!("with {} pending: {loaded:?}", a.pending);
    Ok(TimersReport {
        workload: "timers",
        pending: a.pending,
        load_seconds: load,
        load_records_per_sec: a.pending as f64 / load.max(1e-9),
        baseline,
        loaded,
    })
}

/// Sends `probes` records 10 ms apart, each due `probe_delay_ms` later, and
/// receives them all with one consumer group.
async fn probe(client: &Client, a: &TimersArgs, tag: &str, pending: u64) -> anyhow::Result<Phase> {
    let producer = client.producer(&a.topic).build();
    let consumer = client
        .simple_consumer(&a.topic, format!("probe-{tag}"))
        .wait(Duration::from_millis(200))
        .build();
    let receiver = {
        let consumer = consumer.clone();
        let want = a.probes;
        let prefix = format!("{tag}:");
        tokio::spawn(async move {
            let mut got: HashMap<u64, i64> = HashMap::new();
            let deadline = Instant::now() + Duration::from_secs(600);
            while (got.len() as u64) < want && Instant::now() < deadline {
                let batch = consumer.receive(64).await.unwrap_or_default();
                let now = petrel_proto::now_ms();
                for m in &batch {
                    let body = String::from_utf8_lossy(&m.body).to_string();
                    if let Some(rest) = body.strip_prefix(&prefix) {
                        if let Some((i, at)) = rest.split_once(':') {
                            if let (Ok(i), Ok(at)) = (i.parse::<u64>(), at.parse::<i64>()) {
                                got.entry(i).or_insert(now - at);
                            }
                        }
                    }
                }
                let _ = consumer.ack_many(&batch).await;
            }
            got
        })
    };
    let mut send_ms = Vec::new();
    for i in 0..a.probes {
        let at = petrel_proto::now_ms() + a.probe_delay_ms as i64;
        let t = Instant::now();
        producer
            .send(Message::new(format!("{tag}:{i}:{at}")).with_deliver_at(at))
            .await?;
        send_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let got = receiver.await?;
    anyhow::ensure!(
        got.len() as u64 == a.probes,
        "only {} of {} probes arrived",
        got.len(),
        a.probes
    );
    let mut late: Vec<i64> = got.values().copied().collect();
    late.sort();
    send_ms.sort_by(|x, y| x.total_cmp(y));
    let pct = |v: &[f64], q: f64| v[((v.len() as f64 - 1.0) * q) as usize];
    Ok(Phase {
        pending_before: pending,
        send_p50_ms: pct(&send_ms, 0.5),
        send_p99_ms: pct(&send_ms, 0.99),
        late_p50_ms: late[late.len() / 2],
        late_p99_ms: late[(late.len() - 1) * 99 / 100],
        late_max_ms: late[late.len() - 1],
        early: late.iter().filter(|l| **l < 0).count() as u64,
    })
}
