//! Message semantics (issue 4) on an embedded 3-broker cluster, through the
//! SDK as an application would use it: topic types, dead letters with
//! back-off, broker-side filters, and the PushConsumer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use petrel_sdk::pb::MessageType;
use petrel_sdk::{Client, Error, Message, RetryPolicy, TopicSpec};
use petrel_tools::dev::{ClusterOptions, LocalCluster};

const READY: Duration = Duration::from_secs(30);
const TXN_CHECK_MS: u64 = 1000;

async fn cluster() -> (tempfile::TempDir, LocalCluster, Client) {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = ClusterOptions::new(dir.path());
    // Transaction checks every second (default 5 s), to keep tests short.
    opts.transaction_check_ms = Some(TXN_CHECK_MS);
    let cluster = LocalCluster::start(opts).await.unwrap();
    cluster.wait_ready(READY).await.unwrap();
    let client = Client::connect([cluster.endpoint()]).unwrap();
    (dir, cluster, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_topic_type_takes_only_its_own_messages() {
    let (_dir, cluster, client) = cluster().await;
    let admin = client.admin();
    for (name, t) in [
        ("plain", MessageType::Normal),
        ("ordered", MessageType::Fifo),
        ("later", MessageType::Delay),
    ] {
        admin
            .create_topic(TopicSpec::new(name).queues(2).message_type(t))
            .await
            .unwrap();
    }
    let send = |topic: &'static str, m: Message| {
        let p = client.producer(topic).build();
        async move { p.send(m).await }
    };
    let wrong = |r: Result<petrel_sdk::SendReceipt, Error>| match r {
        Err(Error::WrongMessageType(m)) => m,
        other => panic!("expected wrong_message_type, got {other:?}"),
    };
    let m = wrong(send("plain", Message::new("x").with_message_group("g")).await);
    assert!(m.contains("FIFO"), "{m}");
    wrong(
        send(
            "plain",
            Message::new("x").with_delay(Duration::from_secs(1)),
        )
        .await,
    );
    wrong(send("ordered", Message::new("x")).await);
    wrong(
        send(
            "ordered",
            Message::new("x")
                .with_message_group("g")
                .with_delay(Duration::from_secs(1)),
        )
        .await,
    );
    wrong(send("later", Message::new("x")).await);
    match send(
        "later",
        Message::new("x").with_delay(Duration::from_secs(40 * 24 * 3600)),
    )
    .await
    {
        Err(Error::InvalidArgument(_)) => {}
        other => panic!("expected invalid_argument for a 40-day delay, got {other:?}"),
    }
    // The right kinds go through.
    send("plain", Message::new("x")).await.unwrap();
    send("ordered", Message::new("x").with_message_group("g"))
        .await
        .unwrap();
    send(
        "later",
        Message::new("x").with_delay(Duration::from_millis(10)),
    )
    .await
    .unwrap();
    // TRANSACTION topics take only messages sent in a transaction.
    admin
        .create_topic(TopicSpec::new("tx").message_type(MessageType::Transaction))
        .await
        .unwrap();
    wrong(send("tx", Message::new("x")).await);
    let txn = client.producer("plain").build().begin();
    wrong(txn.send(Message::new("x")).await);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_handler_dead_letters_after_exactly_max_attempts_with_back_off() {
    let (_dir, cluster, client) = cluster().await;
    let admin = client.admin();
    admin
        .create_topic(TopicSpec::new("jobs").queues(2))
        .await
        .unwrap();
    let producer = client.producer("jobs").build();
    let bad = producer
        .send(
            Message::new("poison")
                .with_key("k-poison")
                .with_property("kind", "bad"),
        )
        .await
        .unwrap();
    for i in 0..5 {
        producer
            .send(Message::new(format!("ok{i}")).with_property("kind", "good"))
            .await
            .unwrap();
    }
    const MAX: u32 = 4;
    const INITIAL: Duration = Duration::from_millis(300);
    let policy = RetryPolicy {
        max_attempts: MAX,
        initial_backoff: INITIAL,
        max_backoff: Duration::from_secs(10),
    };
    // Every delivery of the poison record, with its attempt and time.
    let seen: Arc<Mutex<Vec<(u32, Instant)>>> = Arc::default();
    let good: Arc<Mutex<Vec<String>>> = Arc::default();
    let (s, g) = (seen.clone(), good.clone());
    let push = client
        .push_consumer("jobs", "workers")
        .concurrency(4)
        .retry_policy(policy)
        .start(move |m| {
            let (s, g) = (s.clone(), g.clone());
            async move {
                if m.properties.get("kind").map(String::as_str) == Some("bad") {
                    s.lock().unwrap().push((m.attempt, Instant::now()));
                    Err(format!("cannot process {}", m.message_id))
                } else {
                    g.lock()
                        .unwrap()
                        .push(String::from_utf8(m.body.to_vec()).unwrap());
                    Ok(())
                }
            }
        });

    // The dead letter arrives in workers.dlq with its provenance.
    let dlq = client
        .simple_consumer("workers.dlq", "audit")
        .wait(Duration::from_millis(500))
        .build();
    let deadline = Instant::now() + Duration::from_secs(30);
    let dead = loop {
        match dlq.receive(10).await {
            Ok(v) if !v.is_empty() => break v,
            Ok(_) | Err(Error::NotFound(_)) => {}
            Err(e) => panic!("reading the dead-letter topic: {e}"),
        }
        assert!(
            Instant::now() < deadline,
            "no dead letter; deliveries so far: {:?}",
            seen.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(dead.len(), 1, "{dead:?}");
    let d = &dead[0];
    assert_eq!(&d.body[..], b"poison");
    assert_eq!(d.key, "k-poison");
    assert_eq!(d.properties["petrel.dlq.original_id"], bad.message_id);
    assert_eq!(d.properties["petrel.dlq.attempts"], MAX.to_string());
    assert_eq!(d.properties["petrel.dlq.group"], "workers");
    assert!(
        d.properties["petrel.dlq.reason"].contains("cannot process"),
        "{:?}",
        d.properties
    );
    dlq.ack(d).await.unwrap();

    let stats = push.shutdown().await;
    let seen = seen.lock().unwrap().clone();
    // Exactly MAX deliveries, attempts 1..=MAX, each after its back-off.
    assert_eq!(
        seen.iter().map(|(a, _)| *a).collect::<Vec<_>>(),
        (1..=MAX).collect::<Vec<_>>()
    );
    let mut gaps = Vec::new();
    for (i, w) in seen.windows(2).enumerate() {
        let gap = w[1].1 - w[0].1;
        let want = INITIAL * 2u32.pow(i as u32);
        gaps.push(gap);
        assert!(gap >= want, "gap {i} was {gap:?}, back-off is {want:?}");
        assert!(
            gap < want + Duration::from_secs(3),
            "gap {i} was {gap:?}, far over {want:?}"
        );
    }
    println!("back-off gaps observed: {gaps:?}");
    assert_eq!(stats.failed, MAX as u64);
    let mut good = good.lock().unwrap().clone();
    good.sort();
    assert_eq!(good, vec!["ok0", "ok1", "ok2", "ok3", "ok4"]);
    assert_eq!(stats.succeeded, 5);
    let desc = admin.describe_group("workers").await.unwrap();
    let total: u64 = desc.queues.iter().map(|q| q.dead_lettered).sum();
    assert_eq!(total, 1, "{desc:?}");
    assert!(desc.queues.iter().all(|q| q.inflight == 0), "{desc:?}");
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broker_side_filters_by_tag_and_sql_and_reject_bad_expressions() {
    let (_dir, cluster, client) = cluster().await;
    client
        .admin()
        .create_topic(TopicSpec::new("orders").queues(3))
        .await
        .unwrap();
    let producer = client.producer("orders").build();
    let rows = [
        ("TagA", "eu", "150"),
        ("TagB", "eu", "50"),
        ("TagC", "us", "500"),
        ("TagA", "us", "101"),
        ("TagB", "eu", "1000"),
        ("", "", ""),
    ];
    for (i, (tag, region, amount)) in rows.iter().enumerate() {
        let mut m = Message::new(format!("r{i}")).with_tag(*tag);
        if !region.is_empty() {
            m = m.with_property("region", *region);
        }
        if !amount.is_empty() {
            m = m.with_property("amount", *amount);
        }
        producer.send(m).await.unwrap();
    }
    let drain = |c: petrel_sdk::SimpleConsumer| async move {
        let mut got = Vec::new();
        loop {
            let batch = c.receive(16).await.unwrap();
            if batch.is_empty() {
                break;
            }
            for m in batch {
                c.ack(&m).await.unwrap();
                got.push(String::from_utf8(m.body.to_vec()).unwrap());
            }
        }
        got.sort();
        got
    };
    let sub = |group: &str| {
        client
            .simple_consumer("orders", group)
            .wait(Duration::from_millis(800))
    };
    assert_eq!(
        drain(sub("tags").filter_tag("TagA || TagB").build()).await,
        vec!["r0", "r1", "r3", "r4"]
    );
    assert_eq!(drain(sub("all").filter_tag("*").build()).await.len(), 6);
    assert_eq!(
        drain(
            sub("sql")
                .filter_sql("region = 'eu' AND amount > 100")
                .build()
        )
        .await,
        vec!["r0", "r4"]
    );
    assert_eq!(
        drain(
            sub("sql2")
                .filter_sql("region IN ('us') OR amount BETWEEN 40 AND 60 OR region IS NULL")
                .build()
        )
        .await,
        vec!["r1", "r2", "r3", "r5"]
    );
    // Skipped records are not deliveries: the group's position passed them.
    let d = client.admin().describe_group("sql").await.unwrap();
    let filtered: u64 = d.queues.iter().map(|q| q.filtered).sum();
    let lag: u64 = d.queues.iter().map(|q| q.lag).sum();
    assert_eq!((filtered, lag), (4, 0), "{d:?}");

    for (expr, sql, pos) in [
        ("region = ", true, "position 9"),
        ("a = 'x", true, "position 4"),
        ("TagA || ", false, ""),
        ("TagA |", false, ""),
    ] {
        let b = sub("bad");
        let c = if sql {
            b.filter_sql(expr).build()
        } else {
            b.filter_tag(expr).build()
        };
        match c.receive(1).await {
            Err(Error::InvalidFilter(m)) => assert!(m.contains(pos), "{expr:?}: {m}"),
            other => panic!("{expr:?}: expected invalid_filter, got {other:?}"),
        }
    }
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn push_consumer_bounds_concurrency_and_finishes_in_flight_handlers_on_shutdown() {
    let (_dir, cluster, client) = cluster().await;
    client
        .admin()
        .create_topic(TopicSpec::new("work").queues(4))
        .await
        .unwrap();
    let producer = client.producer("work").build();
    for i in 0..40 {
        producer.send(Message::new(format!("w{i}"))).await.unwrap();
    }
    let running = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let peak = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let done: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let (r, p, d) = (running.clone(), peak.clone(), done.clone());
    let push = client
        .push_consumer("work", "pool")
        .concurrency(3)
        // A receive cut short by the shutdown leaves its records leased
        // to no one until this runs out.
        .invisible_duration(Duration::from_secs(2))
        .start(move |m| {
            let (r, p, d) = (r.clone(), p.clone(), d.clone());
            async move {
                use std::sync::atomic::Ordering::SeqCst;
                let now = r.fetch_add(1, SeqCst) + 1;
                p.fetch_max(now, SeqCst);
                tokio::time::sleep(Duration::from_millis(100)).await;
                *d.lock()
                    .unwrap()
                    .entry(String::from_utf8(m.body.to_vec()).unwrap())
                    .or_default() += 1;
                r.fetch_sub(1, SeqCst);
                Ok::<(), String>(())
            }
        });
    // Shut down part-way (once a few are handled, not after a guessed
    // sleep): every handler that started finishes and is acked.
    let deadline = Instant::now() + Duration::from_secs(30);
    while done.lock().unwrap().len() < 3 {
        assert!(Instant::now() < deadline, "no handler finished");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let first = push.shutdown().await;
    assert_eq!(running.load(std::sync::atomic::Ordering::SeqCst), 0);
    assert!(peak.load(std::sync::atomic::Ordering::SeqCst) <= 3);
    assert!(first.succeeded > 0 && first.succeeded < 40, "{first:?}");
    assert_eq!(first.ack_errors, 0);
    // A second consumer of the group gets exactly the rest.
    let d2 = done.clone();
    let push = client
        .push_consumer("work", "pool")
        .concurrency(8)
        .start(move |m| {
            let d = d2.clone();
            async move {
                *d.lock()
                    .unwrap()
                    .entry(String::from_utf8(m.body.to_vec()).unwrap())
                    .or_default() += 1;
                Ok::<(), String>(())
            }
        });
    let deadline = Instant::now() + Duration::from_secs(30);
    while done.lock().unwrap().len() < 40 {
        assert!(Instant::now() < deadline, "not all 40 handled");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let second = push.shutdown().await;
    assert_eq!(first.succeeded + second.succeeded, 40);
    assert!(done.lock().unwrap().values().all(|n| *n == 1));
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn consumers_see_exactly_the_committed_transactions() {
    use petrel_sdk::TransactionResolution as Res;
    let (_dir, cluster, client) = cluster().await;
    client
        .admin()
        .create_topic(
            TopicSpec::new("ledger")
                .queues(3)
                .message_type(MessageType::Transaction),
        )
        .await
        .unwrap();
    let consumer = client
        .simple_consumer("ledger", "books")
        .wait(Duration::from_millis(300))
        .build();
    let mut seen: Vec<String> = Vec::new();
    async fn drain(c: &petrel_sdk::SimpleConsumer, seen: &mut Vec<String>) {
        let batch = c.receive(10).await.unwrap();
        for m in &batch {
            seen.push(String::from_utf8(m.body.to_vec()).unwrap());
        }
        c.ack_many(&batch).await.unwrap();
    }
    let msgs = |t: &str| -> Vec<Message> {
        (0..3)
            .map(|i| Message::new(format!("{t}{i}")).with_key(format!("{t}-{i}")))
            .collect()
    };

    // Commit: all three appear; rollback: none.
    let producer = client.producer("ledger").build();
    let a = producer.begin();
    a.send_batch(msgs("a")).await.unwrap();
    let b = producer.begin();
    for m in msgs("b") {
        b.send(m).await.unwrap();
    }
    let batch = consumer.receive(10).await.unwrap();
    assert!(
        batch.is_empty(),
        "open transactions are invisible: {batch:?}"
    );
    assert_eq!(a.commit().await.unwrap(), 3);
    assert_eq!(b.rollback().await.unwrap(), 3);

    // A producer dies with three transactions open: c (its business
    // committed it), d (rolled back), e (nobody knows).
    let dying = client.producer("ledger").build();
    let (c, d, e) = (dying.begin(), dying.begin(), dying.begin());
    c.send_batch(msgs("c")).await.unwrap();
    d.send_batch(msgs("d")).await.unwrap();
    e.send_batch(msgs("e")).await.unwrap();
    let (c_id, d_id) = (c.id().to_string(), d.id().to_string());
    drop((c, d, e, dying));
    // Another producer of the topic answers the checks.
    let checks: Arc<Mutex<Vec<(String, u32)>>> = Arc::default();
    let log = checks.clone();
    let (cc, dd) = (c_id.clone(), d_id.clone());
    let _checker = client
        .producer("ledger")
        .transaction_checker(move |chk| {
            log.lock()
                .unwrap()
                .push((chk.transaction_id.clone(), chk.check));
            // The transaction's first record in the asking queue.
            let first = chk
                .first
                .as_ref()
                .map(|m| m.key.clone())
                .unwrap_or_default();
            if !["c-", "d-", "e-"].iter().any(|p| first.starts_with(p)) {
                return Res::Unknown; // fails the test below: never resolved
            }
            if chk.transaction_id == cc {
                Res::Commit
            } else if chk.transaction_id == dd {
                Res::Rollback
            } else {
                Res::Unknown
            }
        })
        .build();
    // c becomes visible after its first check; e is rolled back after the
    // unanswered checks. Wait for both.
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        drain(&consumer, &mut seen).await;
        let asked: Vec<(String, u32)> = checks.lock().unwrap().clone();
        let e_checks = asked
            .iter()
            .filter(|(id, _)| *id != c_id && *id != d_id)
            .count();
        let described = client.admin().describe_group("books").await.unwrap();
        let open: u64 = described.queues.iter().map(|q| q.uncommitted).sum();
        if seen.len() >= 6 && e_checks >= 1 && open == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "seen {seen:?}, checks {asked:?}, open {open}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A little longer: nothing else may appear.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    drain(&consumer, &mut seen).await;
    seen.sort();
    assert_eq!(seen, vec!["a0", "a1", "a2", "c0", "c1", "c2"]);
    cluster.stop().await;
}

/// A consumer gives up on a poison message at once (`dead_letter`, what a
/// RocketMQ client's ForwardMessageToDeadLetterQueue does): it is in the
/// dead-letter topic when the call returns, with the reason and its one
/// attempt, it never comes back, and the group's other records are
/// untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_consumer_gives_up_on_a_poison_message_at_once() {
    let (_dir, _cluster, client) = cluster().await;
    client
        .admin()
        .create_topic(TopicSpec::new("gu").queues(1))
        .await
        .unwrap();
    let producer = client.producer("gu").build();
    let poison = producer.send(Message::new("poison")).await.unwrap();
    producer.send(Message::new("fine")).await.unwrap();
    let c = client
        .simple_consumer("gu", "g")
        .retry_policy(RetryPolicy {
            max_attempts: 16,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(100),
        })
        .wait(Duration::from_millis(500))
        .build();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while got.len() < 2 {
        assert!(Instant::now() < deadline, "received {got:?}");
        got.extend(c.receive(10).await.unwrap());
    }
    let (bad, good): (Vec<_>, Vec<_>) = got.into_iter().partition(|m| m.body == "poison");
    c.dead_letter(&bad[0], "schema mismatch").await.unwrap();
    // Its handle is spent: a second give-up or an ack is refused.
    assert!(c.dead_letter(&bad[0], "again").await.is_err());
    assert!(c.ack(&bad[0]).await.is_err());
    c.ack(&good[0]).await.unwrap();
    // Already stored: the dead-letter topic has it without another receive
    // of the group.
    let dlq = client
        .simple_consumer("g.dlq", "audit")
        .wait(Duration::from_secs(2))
        .build();
    let d = dlq.receive(10).await.unwrap();
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!(d[0].body, "poison");
    assert_eq!(d[0].properties["petrel.dlq.original_id"], poison.message_id);
    assert_eq!(d[0].properties["petrel.dlq.attempts"], "1");
    let reason = &d[0].properties["petrel.dlq.reason"];
    assert!(reason.contains("schema mismatch"), "{reason}");
    // Never redelivered, past several back-offs.
    assert!(c.receive(10).await.unwrap().is_empty());
    let g = client
        .admin()
        .get_message(&poison.message_id)
        .await
        .unwrap();
    let state: Vec<_> = g.deliveries.iter().map(|d| d.state.as_str()).collect();
    assert_eq!(state, ["done"], "out of the group: {:?}", g.deliveries);
}

/// Dead letters travel with a pop's records; many big ones must not make
/// one response larger than the message limit (which would fail every pop
/// and stick the group). 30 records of 3 MiB (90 MiB) are all let expire
/// on their only attempt: every one reaches the dead-letter topic, over
/// several receives. (Leases that expire are dead-lettered by the pops
/// that find them; a nack on the last attempt would store its dead letter
/// itself.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_big_dead_letters_leave_over_several_receives() {
    let (_dir, _cluster, client) = cluster().await;
    client
        .admin()
        .create_topic(TopicSpec::new("big").queues(1))
        .await
        .unwrap();
    let producer = client.producer("big").build();
    const N: usize = 30;
    for i in 0..N {
        let mut body = vec![b'x'; 3 << 20];
        body[..8].copy_from_slice(format!("{i:08}").as_bytes());
        producer.send(Message::new(body)).await.unwrap();
    }
    let c = client
        .simple_consumer("big", "g")
        .retry_policy(RetryPolicy {
            max_attempts: 1,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(100),
        })
        .wait(Duration::from_millis(300))
        .build();
    let dlq = client
        .simple_consumer("g.dlq", "audit")
        .wait(Duration::from_millis(300))
        .build();
    // Take all of them first (a receive returns at most 16 MiB) and let
    // their leases run out: 90 MiB of dead letters for the next receives.
    let mut held = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while held.len() < N {
        assert!(Instant::now() < deadline, "received {} of {N}", held.len());
        held.extend(
            c.receive_with(32, Duration::from_millis(200), Duration::from_millis(300))
                .await
                .unwrap(),
        );
    }
    let mut dead = std::collections::HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while dead.len() < N {
        assert!(
            Instant::now() < deadline,
            "{} of {N} dead letters stored",
            dead.len()
        );
        // Receiving is what ships the group's dead letters.
        assert!(c.receive(32).await.unwrap().is_empty());
        match dlq.receive(32).await {
            Ok(v) => {
                for m in v {
                    dead.insert(m.body[..8].to_vec());
                    dlq.ack(&m).await.unwrap();
                }
            }
            Err(Error::NotFound(_)) => {}
            Err(e) => panic!("reading the dead-letter topic: {e}"),
        }
    }
}
