//! FIFO message groups and delayed delivery (issue 4) across a broker
//! failover, with real broker and proxy processes (killed by PID at the
//! end, or on panic).
//!
//! - FIFO: 50 message groups × 200 records, 8 concurrent consumers, and a
//!   SIGKILL of the broker leading the most queues half-way: every group's
//!   records arrive in send order, none missing.
//! - Delay: 200 records delayed 1–5 s, a SIGKILL of the broker leading the
//!   most queues while they wait: none is received before its time, all
//!   are received.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;

use common::cluster::{balanced, describe_line, wait_cluster, TestCluster};
use common::wait_ready;
use petrel_sdk::pb::MessageType;
use petrel_sdk::{Admin, Message, TopicSpec};

const READY: Duration = Duration::from_secs(60);
const OVERALL: Duration = Duration::from_secs(240);

/// SIGKILLs the broker leading the most queues; returns its id.
async fn kill_busiest(cluster: &mut TestCluster, admin: &Admin) -> u64 {
    let c = admin.describe_cluster().await.unwrap();
    let victim = c
        .brokers
        .iter()
        .max_by_key(|b| (b.leader_count, b.id == c.meta_leader))
        .unwrap()
        .id;
    cluster.say(format!("SIGKILL broker {victim} ({})", describe_line(&c)));
    cluster.kill_broker(victim);
    victim
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifo_groups_arrive_in_order_across_a_failover() {
    let mut cluster = TestCluster::new("fifo", 3, 3, &[]);
    if tokio::time::timeout(OVERALL, fifo(&mut cluster))
        .await
        .is_err()
    {
        panic!("fifo test did not finish within {OVERALL:?}");
    }
}

const GROUPS: usize = 50;
const PER_GROUP: usize = 200;
const CONSUMERS: usize = 8;

#[derive(Default)]
struct Seen {
    /// Per message group: the next index expected.
    next: HashMap<usize, usize>,
    violations: Vec<String>,
    redelivered: u64,
    delivered: u64,
}

async fn fifo(cluster: &mut TestCluster) {
    cluster.start(3);
    let client = cluster.client();
    let admin = client.admin();
    wait_ready(&admin, 3, READY).await;
    admin
        .create_topic(
            TopicSpec::new("fifo")
                .queues(6)
                .replicas(3)
                .message_type(MessageType::Fifo),
        )
        .await
        .unwrap();
    wait_cluster(&admin, Duration::from_secs(30), balanced(3))
        .await
        .unwrap();

    let seen: Arc<Mutex<Seen>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut consumers = Vec::new();
    for c in 0..CONSUMERS {
        let consumer = client
            .simple_consumer("fifo", "ordered")
            .invisible_duration(Duration::from_secs(5))
            .wait(Duration::from_millis(500))
            .build();
        let (seen, stop) = (seen.clone(), stop.clone());
        consumers.push(tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let batch = match consumer.receive(16).await {
                    Ok(b) => b,
                    Err(e) => {
                        eprintln!("consumer {c}: receive: {e}");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                };
                for m in &batch {
                    let body = String::from_utf8(m.body.to_vec()).unwrap();
                    let (g, i) = body.split_once(':').unwrap();
                    let (g, i): (usize, usize) = (g.parse().unwrap(), i.parse().unwrap());
                    assert_eq!(m.message_group, format!("g{g}"));
                    let mut s = seen.lock().unwrap();
                    s.delivered += 1;
                    let next = s.next.entry(g).or_insert(0);
                    if i == *next {
                        *next += 1;
                    } else if i < *next {
                        // A redelivery (lease expired or the ack was lost
                        // in the failover): allowed, order unaffected.
                        s.redelivered += 1;
                    } else {
                        let v = format!("group {g}: got {i} while expecting {next}");
                        s.violations.push(v);
                    }
                }
                // Record, then ack: the next record of a group is leased
                // only after this ack, so the shared view sees it later.
                for (m, r) in batch
                    .iter()
                    .zip(consumer.ack_many(&batch).await.unwrap_or_default())
                {
                    if let Err(e) = r {
                        eprintln!("consumer {c}: ack {}: {e}", m.message_id);
                    }
                }
            }
        }));
    }

    // Round i sends record i of every group, so send order within a group
    // is the order of rounds.
    let producer = client.producer("fifo").producer_id("fifo-p").build();
    let mut killed = None;
    for i in 0..PER_GROUP {
        let batch: Vec<Message> = (0..GROUPS)
            .map(|g| Message::new(format!("{g}:{i}")).with_message_group(format!("g{g}")))
            .collect();
        producer.send_batch(batch).await.unwrap();
        if i == PER_GROUP / 2 {
            killed = Some(kill_busiest(cluster, &admin).await);
        }
    }
    cluster.say(format!(
        "produced {} records; broker {killed:?} was killed half-way",
        GROUPS * PER_GROUP
    ));

    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        {
            let s = seen.lock().unwrap();
            let complete = s.next.len() == GROUPS && s.next.values().all(|n| *n == PER_GROUP);
            if complete || !s.violations.is_empty() {
                break;
            }
        }
        if Instant::now() > deadline {
            let s = seen.lock().unwrap();
            let short: Vec<(usize, usize)> = (0..GROUPS)
                .map(|g| (g, s.next.get(&g).copied().unwrap_or(0)))
                .filter(|(_, n)| *n < PER_GROUP)
                .collect();
            panic!("not every record arrived; (group, next expected): {short:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for c in consumers {
        c.await.unwrap();
    }
    let s = seen.lock().unwrap();
    cluster.say(format!(
        "delivered {} (redelivered {}), order violations {}",
        s.delivered,
        s.redelivered,
        s.violations.len()
    ));
    assert!(
        s.violations.is_empty(),
        "{:?}",
        &s.violations[..s.violations.len().min(10)]
    );
    assert!((0..GROUPS).all(|g| s.next[&g] == PER_GROUP));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delayed_records_are_never_early_and_survive_a_failover() {
    let mut cluster = TestCluster::new("delay", 3, 3, &[]);
    if tokio::time::timeout(OVERALL, delay(&mut cluster))
        .await
        .is_err()
    {
        panic!("delay test did not finish within {OVERALL:?}");
    }
}

const DELAYED: u64 = 200;

async fn delay(cluster: &mut TestCluster) {
    cluster.start(3);
    let client = cluster.client();
    let admin = client.admin();
    wait_ready(&admin, 3, READY).await;
    admin
        .create_topic(
            TopicSpec::new("later")
                .queues(4)
                .replicas(3)
                .message_type(MessageType::Delay),
        )
        .await
        .unwrap();
    wait_cluster(&admin, Duration::from_secs(30), balanced(3))
        .await
        .unwrap();

    // Every record names its own delivery time (same clock as this test).
    let producer = client.producer("later").producer_id("delay-p").build();
    let mut x: u64 = 12345;
    let mut batch = Vec::new();
    for i in 0..DELAYED {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let delay_ms = 1000 + (x >> 33) % 4001;
        let at = petrel_proto::now_ms() + delay_ms as i64;
        batch.push(Message::new(format!("{i}:{at}")).with_deliver_at(at));
    }
    producer.send_batch(batch).await.unwrap();
    let sent_at = Instant::now();

    let consumer = client
        .simple_consumer("later", "timely")
        .wait(Duration::from_millis(300))
        .build();
    let mut got: HashMap<u64, i64> = HashMap::new();
    let mut early = Vec::new();
    let mut killed = false;
    let deadline = Instant::now() + Duration::from_secs(90);
    while (got.len() as u64) < DELAYED {
        assert!(
            Instant::now() < deadline,
            "only {} of {DELAYED} delayed records arrived",
            got.len()
        );
        if !killed && sent_at.elapsed() > Duration::from_millis(800) {
            // Before any is due: the timers must survive the leader change.
            kill_busiest(cluster, &admin).await;
            killed = true;
        }
        let batch = match consumer.receive(32).await {
            Ok(b) => b,
            Err(e) => {
                eprintln!("receive: {e}");
                continue;
            }
        };
        let now = petrel_proto::now_ms();
        for m in &batch {
            let body = String::from_utf8(m.body.to_vec()).unwrap();
            let (i, at) = body.split_once(':').unwrap();
            let (i, at): (u64, i64) = (i.parse().unwrap(), at.parse().unwrap());
            assert_eq!(m.deliver_at_ms, at);
            if now < at {
                early.push((i, at - now));
            }
            got.entry(i).or_insert(now - at);
        }
        let _ = consumer.ack_many(&batch).await;
    }
    assert!(early.is_empty(), "received early (id, ms early): {early:?}");
    let mut late: Vec<i64> = got.values().copied().collect();
    late.sort();
    cluster.say(format!(
        "all {DELAYED} delayed records arrived, none early; lateness ms p50 {} p99 {} max {} (one leader killed)",
        late[late.len() / 2],
        late[late.len() * 99 / 100],
        late[late.len() - 1]
    ));
}
