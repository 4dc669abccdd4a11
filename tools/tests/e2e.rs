//! End to end through the SDK against an in-process cluster (3 brokers +
//! 1 proxy on 127.0.0.1): every acknowledged record is delivered exactly
//! once per consumer group, leases expire into redeliveries, retries are
//! de-duplicated, and bad input gets typed errors without hurting service.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use petrel_sdk::{pb, Admin, Client, Error, Message, TopicSpec};
use petrel_tools::dev::{ClusterOptions, LocalCluster};
use tokio::sync::Mutex;

/// Leader elections of a fresh cluster finish well within this.
const READY: Duration = Duration::from_secs(30);
/// Bound on consuming everything in the big test (normally a few seconds).
const CONSUME_BUDGET: Duration = Duration::from_secs(240);

async fn cluster() -> (LocalCluster, tempfile::TempDir, Client) {
    let dir = tempfile::tempdir().unwrap();
    let c = LocalCluster::start(ClusterOptions::new(dir.path()))
        .await
        .unwrap();
    c.wait_ready(READY).await.unwrap();
    let client = Client::connect([c.endpoint()]).unwrap();
    (c, dir, client)
}

async fn create(admin: &Admin, name: &str, queues: u32, replicas: u32) -> pb::TopicInfo {
    admin
        .create_topic(TopicSpec::new(name).queues(queues).replicas(replicas))
        .await
        .unwrap()
}

/// Consumes with `tasks` concurrent consumers until `expect` records arrived
/// (or the budget ran out); returns (message id, queue, offset, attempt)
/// per delivery, and checks per-consumer, per-queue offset order.
async fn consume_all(
    client: &Client,
    topic: &str,
    group: &str,
    expect: usize,
    tasks: usize,
) -> Vec<(String, u32, u64, u32)> {
    let got = Arc::new(Mutex::new(Vec::new()));
    let deadline = Instant::now() + CONSUME_BUDGET;
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let consumer = client
            .simple_consumer(topic, group)
            .invisible_duration(Duration::from_secs(60))
            .wait(Duration::from_millis(500))
            .build();
        let got = got.clone();
        handles.push(tokio::spawn(async move {
            let mut last: HashMap<u32, u64> = HashMap::new();
            loop {
                if got.lock().await.len() >= expect || Instant::now() > deadline {
                    return;
                }
                let batch = consumer.receive(32).await.expect("receive");
                for m in &batch {
                    if let Some(prev) = last.insert(m.queue, m.offset) {
                        assert!(
                            m.offset > prev,
                            "queue {} went from {prev} to {}",
                            m.queue,
                            m.offset
                        );
                    }
                }
                if !batch.is_empty() {
                    for r in consumer.ack_many(&batch).await.expect("ack") {
                        r.expect("ack result");
                    }
                    got.lock().await.extend(
                        batch
                            .iter()
                            .map(|m| (m.message_id.clone(), m.queue, m.offset, m.attempt)),
                    );
                }
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let v = got.lock().await.clone();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_thousand_records_are_received_exactly_once_by_each_group() {
    const N: usize = 20_000;
    let (cluster, _dir, client) = cluster().await;
    let info = create(&client.admin(), "orders", 8, 3).await;
    assert_eq!(info.queues.len(), 8);
    for q in &info.queues {
        assert_eq!(q.replicas.len(), 3);
    }

    let producer = client.producer("orders").build();
    let mut sent: HashSet<String> = HashSet::new();
    let mut futs = Vec::new();
    for i in 0..N {
        let p = producer.clone();
        futs.push(tokio::spawn(async move {
            p.send(Message::new(format!("record-{i}")).with_key(format!("k{}", i % 97)))
                .await
        }));
        if futs.len() == 1000 {
            for f in futs.drain(..) {
                assert!(sent.insert(f.await.unwrap().unwrap().message_id));
            }
        }
    }
    for f in futs {
        assert!(sent.insert(f.await.unwrap().unwrap().message_id));
    }
    assert_eq!(sent.len(), N);

    for group in ["billing", "audit"] {
        let got = consume_all(&client, "orders", group, N, 4).await;
        let ids: HashSet<&String> = got.iter().map(|g| &g.0).collect();
        assert_eq!(got.len(), N, "group {group}: every record exactly once");
        assert_eq!(ids.len(), N, "group {group}: no duplicates");
        assert!(
            ids.iter().all(|id| sent.contains(*id)),
            "group {group}: nothing unknown"
        );
        assert!(
            got.iter().all(|g| g.3 == 1),
            "group {group}: first attempts only"
        );
    }

    let g = client.admin().describe_group("billing").await.unwrap();
    assert_eq!(g.queues.len(), 8);
    let ends: u64 = g.queues.iter().map(|q| q.end_offset).sum();
    assert_eq!(ends, N as u64);
    assert!(g
        .queues
        .iter()
        .all(|q| q.lag == 0 && q.committed_offset == q.end_offset));
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_lease_is_redelivered_with_attempt_two_and_stale_receipt_is_refused() {
    let (cluster, _dir, client) = cluster().await;
    create(&client.admin(), "leases", 1, 3).await;
    let p = client.producer("leases").build();
    let r = p.send(Message::new("hello")).await.unwrap();

    let c = client
        .simple_consumer("leases", "g")
        .wait(Duration::from_secs(2))
        .build();
    let first = c
        .receive_with(10, Duration::from_millis(800), Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].message_id, r.message_id);
    assert_eq!(first[0].attempt, 1);
    assert_eq!(&first[0].body[..], b"hello");

    // Not acked: once the lease expires it comes back with attempt 2.
    let again = c
        .receive_with(10, Duration::from_secs(30), Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].message_id, r.message_id);
    assert_eq!(again[0].attempt, 2);

    // The first receipt no longer names the current lease.
    match c.ack(&first[0]).await {
        Err(Error::ReceiptExpired(_)) => {}
        other => panic!("stale receipt: {other:?}"),
    }
    // Extending the current lease hands out a new receipt (the one it
    // replaced still acks until a redelivery, as RocketMQ clients expect).
    let extended = c
        .change_invisible_duration(&again[0], Duration::from_secs(30))
        .await
        .unwrap();
    assert_ne!(extended.receipt_handle, again[0].receipt_handle);
    c.ack(&extended).await.unwrap();
    let none = c
        .receive_with(10, Duration::from_secs(1), Duration::from_millis(1500))
        .await
        .unwrap();
    assert!(none.is_empty(), "acked record came back: {none:?}");
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_send_with_same_producer_sequence_is_stored_once() {
    let (cluster, _dir, client) = cluster().await;
    create(&client.admin(), "dedup", 4, 3).await;
    let p = client
        .producer("dedup")
        .producer_id("prod-1".to_string())
        .build();
    let req = pb::SendRequest {
        topic: "dedup".into(),
        producer_id: "prod-1".into(),
        messages: (1..=50u64)
            .map(|s| pb::Message {
                body: format!("m{s}").into(),
                sequence: s,
                key: if s % 2 == 0 {
                    format!("key{s}")
                } else {
                    String::new()
                },
                ..Default::default()
            })
            .collect(),
    };
    let a = p.send_request_raw(req.clone()).await.unwrap();
    let b = p.send_request_raw(req.clone()).await.unwrap();
    assert!(a.iter().all(|r| !r.duplicate));
    assert!(b.iter().all(|r| r.duplicate));
    let ids_a: Vec<&String> = a.iter().map(|r| &r.message_id).collect();
    let ids_b: Vec<&String> = b.iter().map(|r| &r.message_id).collect();
    assert_eq!(ids_a, ids_b);
    let t = client.admin().describe_topic("dedup").await.unwrap();
    let total: u64 = t.queues.iter().map(|q| q.end_offset - q.start_offset).sum();
    assert_eq!(total, 50, "stored once");
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_typed_errors_and_the_cluster_keeps_serving() {
    let (cluster, _dir, client) = cluster().await;
    let admin = client.admin();
    create(&admin, "good", 2, 3).await;

    // Topic shape and names.
    for (spec, what) in [
        (TopicSpec::new("zero").queues(0).replicas(1), "zero queues"),
        (TopicSpec::new("rf4").queues(1).replicas(4), "rf > brokers"),
        (TopicSpec::new("bad/name").queues(1).replicas(1), "bad name"),
        (TopicSpec::new("").queues(1).replicas(1), "empty name"),
    ] {
        match admin.create_topic(spec).await {
            Err(Error::InvalidArgument(_)) => {}
            other => panic!("{what}: {other:?}"),
        }
    }
    match admin
        .create_topic(TopicSpec::new("good").queues(1).replicas(1))
        .await
    {
        Err(Error::AlreadyExists(_)) => {}
        other => panic!("duplicate topic: {other:?}"),
    }

    // Unknown and invalid topics on the data path.
    match client
        .producer("nope")
        .build()
        .send(Message::new("x"))
        .await
    {
        Err(Error::NotFound(_)) => {}
        other => panic!("unknown topic: {other:?}"),
    }
    match client
        .producer("bad name!")
        .build()
        .send(Message::new("x"))
        .await
    {
        Err(Error::InvalidArgument(_)) => {}
        other => panic!("invalid topic: {other:?}"),
    }

    // Oversized record (default limit 4 MiB).
    let p = client.producer("good").build();
    match p.send(Message::new(vec![b'x'; 4 * 1024 * 1024 + 1])).await {
        Err(Error::TooLarge(_)) => {}
        other => panic!("oversized: {other:?}"),
    }
    // A record of exactly the limit is fine, and comes back whole.
    let big = p
        .send(Message::new(vec![b'y'; 4 * 1024 * 1024]))
        .await
        .unwrap();
    let big_reader = client
        .simple_consumer("good", "big")
        .wait(Duration::from_secs(2))
        .build();
    let got_big = big_reader.receive(10).await.unwrap();
    assert_eq!(got_big.len(), 1);
    assert_eq!(got_big[0].message_id, big.message_id);
    assert_eq!(got_big[0].body.len(), 4 * 1024 * 1024);
    big_reader.ack(&got_big[0]).await.unwrap();
    // Empty bodies are allowed.
    let empty = p.send(Message::new(Vec::<u8>::new())).await.unwrap();

    // Garbage and forged receipt handles.
    let c = client
        .simple_consumer("good", "g")
        .wait(Duration::from_secs(2))
        .build();
    let got: Vec<_> = c
        .receive(10)
        .await
        .unwrap()
        .into_iter()
        .filter(|m| m.message_id != big.message_id)
        .collect();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].message_id, empty.message_id);
    assert!(got[0].body.is_empty());
    for garbage in [
        "",
        "not-a-handle",
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    ] {
        let mut forged = got[0].clone();
        forged.receipt_handle = garbage.to_string();
        match c.ack(&forged).await {
            Err(Error::InvalidArgument(_)) => {}
            other => panic!("garbage handle {garbage:?}: {other:?}"),
        }
    }
    // A real handle presented for another group is refused too.
    let other_group = client.simple_consumer("good", "other").build();
    match other_group.ack(&got[0]).await {
        Err(Error::InvalidArgument(_)) => {}
        other => panic!("handle of another group: {other:?}"),
    }
    c.ack(&got[0]).await.unwrap();

    // Reads past the end; unknown queue.
    let pull = client.pull_consumer("good", "pull");
    let q = got[0].queue;
    let end = pull.read(q, 0, 1 << 20, 100).await.unwrap().end_offset;
    assert_eq!(
        pull.read(q, end, 1 << 20, 100).await.unwrap().records.len(),
        0
    );
    match pull.read(q, end + 1, 1 << 20, 100).await {
        Err(Error::OffsetOutOfRange(_)) => {}
        other => panic!("read past end: {other:?}"),
    }
    match pull.read(99, 0, 1 << 20, 100).await {
        Err(Error::NotFound(_)) => {}
        other => panic!("unknown queue: {other:?}"),
    }
    match pull.commit(q, end + 5).await {
        Err(Error::InvalidArgument(_)) => {}
        other => panic!("commit past end: {other:?}"),
    }

    // Still serving.
    let r = p.send(Message::new("after")).await.unwrap();
    let got = c.receive(10).await.unwrap();
    assert_eq!(
        got.iter().map(|m| &m.message_id).collect::<Vec<_>>(),
        vec![&r.message_id]
    );
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offset_mode_reads_in_order_and_commits_per_group() {
    let (cluster, _dir, client) = cluster().await;
    create(&client.admin(), "log", 1, 3).await;
    let p = client.producer("log").build();
    let batch: Vec<Message> = (0..100).map(|i| Message::new(format!("e{i}"))).collect();
    let receipts = p.send_batch(batch).await.unwrap();
    let offsets: Vec<u64> = receipts.iter().map(|r| r.offset).collect();
    assert_eq!(offsets, (0..100).collect::<Vec<u64>>());

    let pull = client.pull_consumer("log", "replay");
    let mut next = 0;
    let mut bodies = Vec::new();
    while next < 100 {
        let b = pull.read(0, next, 256, 1000).await.unwrap();
        assert!(!b.records.is_empty());
        for r in &b.records {
            assert_eq!(r.offset, next);
            next += 1;
            bodies.push(String::from_utf8(r.body.to_vec()).unwrap());
        }
    }
    assert_eq!(bodies[42], "e42");
    pull.commit(0, 60).await.unwrap();
    let o = pull.committed(0).await.unwrap();
    assert_eq!((o.committed_offset, o.end_offset), (60, 100));
    // Pop mode for the same group continues from the committed offset.
    let c = client.simple_consumer("log", "replay").build();
    let got = c.receive(5).await.unwrap();
    assert_eq!(got[0].offset, 60);
    let _: BTreeMap<u32, u64> = BTreeMap::new();
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brokers_beyond_the_meta_voters_host_and_lead_queues() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = ClusterOptions::new(dir.path());
    opts.brokers = 4;
    let cluster = LocalCluster::start(opts).await.unwrap();
    cluster.wait_ready(READY).await.unwrap();
    let client = Client::connect([cluster.endpoint()]).unwrap();
    let info = create(&client.admin(), "wide", 4, 1).await;
    let mut owners: Vec<u64> = info.queues.iter().map(|q| q.replicas[0]).collect();
    owners.sort();
    assert_eq!(
        owners,
        vec![1, 2, 3, 4],
        "one queue per broker, broker 4 included"
    );
    let p = client.producer("wide").build();
    let msgs: Vec<Message> = (0..400)
        .map(|i| Message::new(format!("w{i}")).with_key(format!("{i}")))
        .collect();
    let sent = p.send_batch(msgs).await.unwrap();
    let queues: HashSet<u32> = sent.iter().map(|r| r.queue).collect();
    assert_eq!(queues.len(), 4, "keys spread over all queues");
    let got = consume_all(&client, "wide", "g", 400, 2).await;
    assert_eq!(got.len(), 400);
    cluster.stop().await;
}
