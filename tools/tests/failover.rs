//! Groundwork for the failover issue: SIGKILL one of three broker processes
//! while a producer (idempotent retries) and a consumer run; every record
//! acknowledged to the producer is consumed, none twice, and the affected
//! queues get new leaders. Processes are killed by PID at the end.

use std::collections::HashSet;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use common::{broker_list, free_port, peers_arg, spawn_broker, spawn_proxy, wait_ready, Procs};
use petrel_sdk::{Client, Message, TopicSpec};

/// Elections and registration of a fresh cluster finish well within this.
const READY: Duration = Duration::from_secs(60);
/// Bound on draining every acknowledged record after the kill.
const DRAIN: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_of_one_broker_loses_no_acknowledged_record() {
    let dir = tempfile::tempdir().unwrap();
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let peers = peers_arg(&ports);
    let mut procs = Procs::default();
    for (i, port) in ports.iter().enumerate() {
        procs.push(spawn_broker(i + 1, *port, &peers, dir.path(), &[]));
    }
    let proxy_port = free_port();
    procs.push(spawn_proxy(proxy_port, &broker_list(&ports)));

    let client = Client::connect([format!("127.0.0.1:{proxy_port}")]).unwrap();
    let admin = client.admin();
    wait_ready(&admin, 3, READY).await;
    admin
        .create_topic(TopicSpec::new("ha").queues(6).replicas(3))
        .await
        .unwrap();

    // Producer: keeps sending until told to stop; collects acknowledged ids.
    let stop = Arc::new(AtomicBool::new(false));
    let producer = client.producer("ha").build();
    let (stop2, p2) = (stop.clone(), producer.clone());
    let sender = tokio::spawn(async move {
        let mut acked = HashSet::new();
        let mut acks_at: Vec<(Instant, u32)> = Vec::new();
        let mut failed = 0u32;
        let mut i = 0u64;
        while !stop2.load(Ordering::Relaxed) {
            let batch: Vec<Message> = (0..20)
                .map(|k| Message::new(format!("m{i}-{k}")).with_key(format!("{}", i * 20 + k)))
                .collect();
            i += 1;
            match p2.send_batch(batch).await {
                Ok(rs) => {
                    let now = Instant::now();
                    for r in rs {
                        acks_at.push((now, r.queue));
                        acked.insert(r.message_id);
                    }
                }
                Err(_) => failed += 1,
            }
        }
        (acked, failed, acks_at)
    });

    tokio::time::sleep(Duration::from_secs(2)).await;
    // SIGKILL broker 1 (preferred leader of a third of the queues).
    procs.kill(0);
    let killed_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(6)).await;
    stop.store(true, Ordering::Relaxed);
    let (acked, failed, acks_at) = sender.await.unwrap();
    assert!(
        acked.len() > 100,
        "producer made progress: {} acked",
        acked.len()
    );
    assert_eq!(failed, 0, "clients see retries, not errors");

    // Every queue has a live leader again.
    let t = admin.describe_topic("ha").await.unwrap();
    assert!(
        t.queues.iter().all(|q| q.leader == 2 || q.leader == 3),
        "{:?}",
        t.queues
    );
    // Time from the kill to the first acknowledged write on each queue
    // (reported, not asserted: speed is measured, not tested).
    let mut worst = Duration::ZERO;
    for q in 0..6u32 {
        if let Some((t, _)) = acks_at.iter().find(|(t, qq)| *qq == q && *t > killed_at) {
            worst = worst.max(*t - killed_at);
        }
    }
    eprintln!("slowest queue's first write after the kill: {worst:?}");

    let consumer = client
        .simple_consumer("ha", "g")
        .wait(Duration::from_millis(500))
        .build();
    let mut got = HashSet::new();
    let deadline = Instant::now() + DRAIN;
    while !acked.is_subset(&got) && Instant::now() < deadline {
        let batch = consumer.receive(64).await.unwrap();
        for r in consumer.ack_many(&batch).await.unwrap() {
            r.unwrap();
        }
        for m in batch {
            assert!(
                got.insert(m.message_id.clone()),
                "delivered twice: {}",
                m.message_id
            );
        }
    }
    let missing = acked.difference(&got).count();
    assert_eq!(missing, 0, "acknowledged records lost");
    drop(procs);
}
