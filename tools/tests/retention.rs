//! Retention (issue 4): records older than a topic's retention age, or
//! beyond its byte budget, are removed on every replica with a range delete;
//! consumers behind continue from the earliest retained record and the lag
//! they skipped is reported.

use std::time::{Duration, Instant};

use petrel_sdk::{Client, Error, Message, TopicSpec};
use petrel_tools::dev::{broker_dir, ClusterOptions, LocalCluster};

const READY: Duration = Duration::from_secs(30);
/// Retention runs every 2 s on each leader; this bounds the wait.
const RETENTION_WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expired_records_are_removed_and_consumers_continue() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(ClusterOptions::new(dir.path()))
        .await
        .unwrap();
    cluster.wait_ready(READY).await.unwrap();
    let client = Client::connect([cluster.endpoint()]).unwrap();
    let admin = client.admin();
    let info = admin
        .create_topic(
            TopicSpec::new("ret")
                .queues(1)
                .replicas(3)
                .retention(Duration::from_secs(3)),
        )
        .await
        .unwrap();
    let group_id = info.queues[0].group_id;
    let producer = client.producer("ret").build();
    let consumer = client
        .simple_consumer("ret", "g")
        .wait(Duration::from_millis(500))
        .build();

    // The group consumes the first 10, then falls behind by 40.
    for i in 0..10 {
        producer.send(Message::new(format!("a{i}"))).await.unwrap();
    }
    let mut got = 0;
    while got < 10 {
        for m in consumer.receive(10).await.unwrap() {
            consumer.ack(&m).await.unwrap();
            got += 1;
        }
    }
    for i in 0..40 {
        producer.send(Message::new(format!("b{i}"))).await.unwrap();
    }
    // Wait until retention has removed all 50 (each is older than 3 s).
    let deadline = Instant::now() + RETENTION_WAIT;
    loop {
        let t = admin.describe_topic("ret").await.unwrap();
        if t.queues[0].start_offset == 50 {
            assert_eq!(t.queues[0].end_offset, 50);
            break;
        }
        assert!(Instant::now() < deadline, "retention did not run: {t:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Reading below the start is a typed error, not an empty answer.
    let pull = client.pull_consumer("ret", "reader");
    match pull.read(0, 0, 0, 10).await {
        Err(Error::OffsetOutOfRange(_)) => {}
        other => panic!("expected offset_out_of_range, got {other:?}"),
    }
    // The group skipped the 40 it never consumed, and continues.
    let d = admin.describe_group("g").await.unwrap();
    assert_eq!(d.queues[0].skipped, 40, "{d:?}");
    assert_eq!(d.queues[0].committed_offset, 50);
    for i in 0..5 {
        producer.send(Message::new(format!("c{i}"))).await.unwrap();
    }
    let mut bodies = Vec::new();
    while bodies.len() < 5 {
        for m in consumer.receive(10).await.unwrap() {
            bodies.push(String::from_utf8(m.body.to_vec()).unwrap());
            consumer.ack(&m).await.unwrap();
        }
    }
    bodies.sort();
    assert_eq!(bodies, vec!["c0", "c1", "c2", "c3", "c4"]);
    cluster.stop().await;
    // Every replica deleted the expired records from its database.
    for b in 1..=3 {
        let stored =
            petrel_broker::storage::stored_offsets_for_test(&broker_dir(dir.path(), b), group_id)
                .unwrap();
        assert!(
            stored.iter().all(|(off, _)| *off >= 50),
            "broker {b} still stores expired records: {:?}",
            &stored[..stored.len().min(5)]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn byte_budget_keeps_the_newest_records() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(ClusterOptions::new(dir.path()))
        .await
        .unwrap();
    cluster.wait_ready(READY).await.unwrap();
    let client = Client::connect([cluster.endpoint()]).unwrap();
    client
        .admin()
        .create_topic(
            TopicSpec::new("retb")
                .queues(1)
                .replicas(3)
                .retention_bytes(20_000),
        )
        .await
        .unwrap();
    let producer = client.producer("retb").build();
    for i in 0..100u32 {
        let body = format!("{i:04}").repeat(250); // 1,000 bytes
        producer.send(Message::new(body)).await.unwrap();
    }
    let deadline = Instant::now() + RETENTION_WAIT;
    let start = loop {
        let t = client.admin().describe_topic("retb").await.unwrap();
        let (start, end) = (t.queues[0].start_offset, t.queues[0].end_offset);
        // A pass may run mid-production; wait for one after the last send.
        if start >= 75 {
            assert_eq!(end, 100);
            break start;
        }
        assert!(Instant::now() < deadline, "byte retention did not run");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    // ~1,050 encoded bytes per record: about 19 of 100 fit in 20,000 bytes.
    assert!((75..=85).contains(&start), "start offset {start}");
    let pull = client.pull_consumer("retb", "r");
    let batch = pull.read(0, start, 0, 1000).await.unwrap();
    assert_eq!(batch.records.len() as u64, 100 - start);
    cluster.stop().await;
}
