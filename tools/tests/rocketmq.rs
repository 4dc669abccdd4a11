//! The official RocketMQ 5 Rust client (crate `rocketmq` 5.0.0, unmodified)
//! against three brokers behind a `petrel-proxy`, which serves RocketMQ's
//! `apache.rocketmq.v2.MessagingService` on its client port. Producers and
//! SimpleConsumers as a RocketMQ application uses them; what that client has
//! no API for (ChangeInvisibleDuration) goes through a raw gRPC client of
//! the same protocol. Every process is killed by PID at the end.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

mod common;

use common::{broker_list, free_port, spawn_proxy, wait_ready};
use petrel_proto::pb;
use petrel_proto::pb::rocketmq as rmq;
use petrel_sdk::{Client, Message, TopicSpec};
use rocketmq::conf::{ClientOption, ProducerOption, SimpleConsumerOption};
use rocketmq::model::common::{FilterExpression, FilterType};
use rocketmq::model::message::MessageBuilder;
use rocketmq::model::transaction::{Transaction, TransactionResolution};
use rocketmq::{Producer, SimpleConsumer};

const READY: Duration = Duration::from_secs(60);

fn options(port: u16) -> ClientOption {
    let mut o = ClientOption::default();
    o.set_access_url(format!("127.0.0.1:{port}"));
    o.set_enable_tls(false);
    o.set_timeout(Duration::from_secs(10));
    // Short long-polls keep the "nothing more" checks quick.
    o.set_long_polling_timeout(Duration::from_secs(3));
    o
}

async fn producer(port: u16, topics: &[&str]) -> Producer {
    let mut po = ProducerOption::default();
    po.set_topics(topics.to_vec());
    let mut p = Producer::new(po, options(port)).unwrap();
    p.start().await.unwrap();
    p
}

async fn consumer(port: u16, group: &str, topics: &[&str]) -> SimpleConsumer {
    let mut co = SimpleConsumerOption::default();
    co.set_consumer_group(group);
    co.set_topics(topics.to_vec());
    let mut c = SimpleConsumer::new(co, options(port)).unwrap();
    c.start().await.unwrap();
    c
}

fn all() -> FilterExpression {
    FilterExpression::new(FilterType::Tag, "*")
}

/// Receives (and acks) until `n` messages came or `within` passed.
async fn drain(
    c: &SimpleConsumer,
    topic: &str,
    filter: &FilterExpression,
    n: usize,
    within: Duration,
) -> Vec<rocketmq::model::message::MessageView> {
    let deadline = Instant::now() + within;
    let mut out = Vec::new();
    while out.len() < n && Instant::now() < deadline {
        let got = c
            .receive_with(topic, filter, 32, Duration::from_secs(30))
            .await
            .unwrap();
        for m in got {
            c.ack(&m).await.unwrap();
            out.push(m);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_rocketmq_client_produces_and_consumes_through_petrel() {
    let dir = tempfile::tempdir().unwrap();
    let (mut procs, ports) = common::spawn_brokers(3, dir.path(), &[]);
    let port = free_port();
    procs.push(spawn_proxy(port, &broker_list(&ports)));
    let petrel = Client::connect([format!("127.0.0.1:{port}")]).unwrap();
    let admin = petrel.admin();
    wait_ready(&admin, 3, READY).await;
    for (t, ty) in [
        ("rq", pb::MessageType::Normal),
        ("rq-redeliver", pb::MessageType::Normal),
        ("rq-extend", pb::MessageType::Normal),
        ("rq-fifo", pb::MessageType::Fifo),
        ("rq-delay", pb::MessageType::Delay),
        ("rq-txn", pb::MessageType::Transaction),
    ] {
        admin
            .create_topic(TopicSpec::new(t).queues(2).replicas(3).message_type(ty))
            .await
            .unwrap();
    }

    // 1. 1,000 NORMAL messages with tags, keys and properties, each
    //    received exactly once, intact, and acked; nothing comes back.
    let p = producer(port, &["rq", "rq-redeliver", "rq-fifo", "rq-delay"]).await;
    let mut sent = HashMap::new();
    for i in 0..1000 {
        let tag = if i % 2 == 0 { "even" } else { "odd" };
        let m = MessageBuilder::builder()
            .set_topic("rq")
            .set_tag(tag)
            .set_keys(vec![format!("k{i}"), "all".to_string()])
            .set_properties(HashMap::from([("i", i.to_string())]))
            .set_body(format!("body-{i}").into_bytes())
            .build()
            .unwrap();
        let r = p.send(m).await.unwrap();
        sent.insert(r.message_id().to_string(), i);
    }
    let c = consumer(port, "rq-all", &["rq"]).await;
    let got = drain(&c, "rq", &all(), 1000, Duration::from_secs(120)).await;
    assert_eq!(got.len(), 1000);
    let mut seen = HashSet::new();
    for m in &got {
        let i = sent[m.message_id()];
        assert!(seen.insert(i), "message {i} delivered twice");
        assert_eq!(m.body(), format!("body-{i}").as_bytes());
        assert_eq!(m.tag(), Some(if i % 2 == 0 { "even" } else { "odd" }));
        assert_eq!(m.keys(), [format!("k{i}"), "all".to_string()]);
        assert_eq!(m.properties().get("i"), Some(&i.to_string()));
        assert_eq!(m.delivery_attempt(), 1);
    }
    let again = c
        .receive_with("rq", &all(), 32, Duration::from_secs(30))
        .await
        .unwrap();
    assert!(
        again.is_empty(),
        "acked messages came back: {}",
        again.len()
    );

    // 2. Filters: a tag filter and a SQL filter deliver exactly the match.
    let c = consumer(port, "rq-odd", &["rq"]).await;
    let odd = drain(
        &c,
        "rq",
        &FilterExpression::new(FilterType::Tag, "odd"),
        500,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(odd.len(), 500);
    assert!(odd.iter().all(|m| m.tag() == Some("odd")));
    let c = consumer(port, "rq-sql", &["rq"]).await;
    let sql = FilterExpression::new(FilterType::Sql, "i >= 990");
    let top = drain(&c, "rq", &sql, 10, Duration::from_secs(60)).await;
    let mut idx: Vec<usize> = top.iter().map(|m| sent[m.message_id()]).collect();
    idx.sort();
    assert_eq!(idx, (990..1000).collect::<Vec<_>>());

    // 3. A message not acked within its invisible duration comes back with
    //    its delivery attempt raised.
    let m = MessageBuilder::builder()
        .set_topic("rq-redeliver")
        .set_body(b"again".to_vec())
        .build()
        .unwrap();
    p.send(m).await.unwrap();
    let c = consumer(port, "rq-r", &["rq-redeliver"]).await;
    let mut first = Vec::new();
    while first.is_empty() {
        first = c
            .receive_with("rq-redeliver", &all(), 1, Duration::from_secs(1))
            .await
            .unwrap();
    }
    assert_eq!(first[0].delivery_attempt(), 1);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut second = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while second.is_empty() && Instant::now() < deadline {
        second = c
            .receive_with("rq-redeliver", &all(), 1, Duration::from_secs(30))
            .await
            .unwrap();
    }
    assert_eq!(second.len(), 1, "redelivered");
    assert_eq!(second[0].message_id(), first[0].message_id());
    assert_eq!(second[0].delivery_attempt(), 2);
    c.ack(&second[0]).await.unwrap();

    // 4. FIFO: one message group arrives in send order.
    for i in 0..20 {
        let m = MessageBuilder::fifo_message_builder("rq-fifo", format!("{i}").into_bytes(), "g1")
            .build()
            .unwrap();
        p.send(m).await.unwrap();
    }
    let c = consumer(port, "rq-f", &["rq-fifo"]).await;
    let fifo = drain(&c, "rq-fifo", &all(), 20, Duration::from_secs(60)).await;
    let order: Vec<String> = fifo
        .iter()
        .map(|m| String::from_utf8(m.body().to_vec()).unwrap())
        .collect();
    assert_eq!(order, (0..20).map(|i| i.to_string()).collect::<Vec<_>>());
    assert!(fifo.iter().all(|m| m.message_group() == Some("g1")));

    // 5. DELAY: nothing arrives before its delivery time.
    let at = (petrel_proto::now_ms() / 1000 + 4) * 1000;
    let m = MessageBuilder::delay_message_builder("rq-delay", b"later".to_vec(), at / 1000)
        .build()
        .unwrap();
    p.send(m).await.unwrap();
    let c = consumer(port, "rq-d", &["rq-delay"]).await;
    let got = drain(&c, "rq-delay", &all(), 1, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 1);
    assert!(
        petrel_proto::now_ms() >= at,
        "delivered {} ms early",
        at - petrel_proto::now_ms()
    );

    // 6. TRANSACTION: committed is delivered, rolled back is not.
    let mut po = ProducerOption::default();
    po.set_topics(vec!["rq-txn"]);
    let mut tp = Producer::new_transaction_producer(
        po,
        options(port),
        Box::new(|_, _| TransactionResolution::ROLLBACK),
    )
    .unwrap();
    tp.start().await.unwrap();
    for (body, commit) in [("committed", true), ("rolled back", false)] {
        let m = MessageBuilder::transaction_message_builder("rq-txn", body.as_bytes().to_vec())
            .build()
            .unwrap();
        let t = tp.send_transaction_message(m).await.unwrap();
        if commit {
            t.commit().await.unwrap();
        } else {
            t.rollback().await.unwrap();
        }
    }
    let c = consumer(port, "rq-t", &["rq-txn"]).await;
    let got = drain(&c, "rq-txn", &all(), 2, Duration::from_secs(8)).await;
    let bodies: Vec<&[u8]> = got.iter().map(|m| m.body()).collect();
    assert_eq!(bodies, [b"committed".as_slice()]);

    // 7. Both ways with Petrel's own SDK and CLI.
    petrel
        .producer("rq")
        .build()
        .send(Message::new("from petrel").with_tag("sdk"))
        .await
        .unwrap();
    let c = consumer(port, "rq-sdk", &["rq"]).await;
    let from_sdk = drain(
        &c,
        "rq",
        &FilterExpression::new(FilterType::Tag, "sdk"),
        1,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(from_sdk.len(), 1);
    assert_eq!(from_sdk[0].body(), b"from petrel");
    assert!(!from_sdk[0].message_id().is_empty());
    let seen_by_petrel = petrel
        .simple_consumer("rq", "petrel-side")
        .wait(Duration::from_secs(5))
        .build()
        .receive(1)
        .await
        .unwrap();
    assert_eq!(
        seen_by_petrel.len(),
        1,
        "RocketMQ-sent records are Petrel records"
    );
    // The CLI finds a RocketMQ-sent message by its first key.
    let out = common::petrel(&[
        "--endpoint",
        &format!("127.0.0.1:{port}"),
        "message",
        "find",
        "--topic",
        "rq",
        "--key",
        "k7",
        "--json",
    ]);
    assert!(out.contains("body-7"), "{out}");

    // `message get` finds a RocketMQ-sent message by the id the RocketMQ
    // client gave it, in a named topic or in all of them.
    let receipt = p
        .send(
            MessageBuilder::builder()
                .set_topic("rq")
                .set_tag("by-id")
                .set_body(b"find me by id".to_vec())
                .build()
                .unwrap(),
        )
        .await
        .unwrap();
    let rmq_id = receipt.message_id().to_string();
    assert!(!rmq_id.contains('/'), "a RocketMQ id: {rmq_id}");
    let endpoint = format!("127.0.0.1:{port}");
    // (In any case: RocketMQ ids mix upper and lower case.)
    let lower = rmq_id.to_lowercase();
    for (id, extra) in [(&rmq_id, &["--topic", "rq"][..]), (&lower, &[][..])] {
        let mut args = vec!["--endpoint", &endpoint, "message", "get", id, "--json"];
        args.extend_from_slice(extra);
        let out = common::petrel(&args);
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(v["body"], "find me by id", "{out}");
        assert_eq!(v["tag"], "by-id", "{out}");
        assert!(v["id"].as_str().unwrap().starts_with("rq/"), "{out}");
    }
    let missing = std::process::Command::new(common::bin("petrel"))
        .args([
            "--endpoint",
            &endpoint,
            "message",
            "get",
            "01ABCDEF0123456789ABCDEF0123456789",
        ])
        .output()
        .unwrap();
    assert!(!missing.status.success());
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(err.contains("RocketMQ message id"), "{err}");

    // 8. ChangeInvisibleDuration (the Rust client has no API for it): a
    //    raw client extends a lease, and the original handle still acks.
    let m = MessageBuilder::builder()
        .set_topic("rq-extend")
        .set_body(b"extend me".to_vec())
        .build()
        .unwrap();
    p.send(m).await.unwrap();
    let mut raw = rmq::messaging_service_client::MessagingServiceClient::connect(format!(
        "http://127.0.0.1:{port}"
    ))
    .await
    .unwrap();
    let queue = rmq::MessageQueue {
        topic: Some(rmq::Resource {
            resource_namespace: String::new(),
            name: "rq-extend".into(),
        }),
        ..Default::default()
    };
    let group = rmq::Resource {
        resource_namespace: String::new(),
        name: "rq-raw".into(),
    };
    let message = raw_receive(&mut raw, &group, &queue).await;
    assert_eq!(message.body.as_ref(), b"extend me");
    let sp = message.system_properties.unwrap();
    // A body digest the Java client can check: CRC32, uppercase hex.
    let digest = sp.body_digest.clone().expect("a body digest");
    assert_eq!(digest.r#type, rmq::DigestType::Crc32 as i32);
    assert_eq!(
        u32::from_str_radix(&digest.checksum, 16).unwrap(),
        crc32fast::hash(b"extend me")
    );
    assert_eq!(digest.checksum, digest.checksum.to_uppercase());
    let original = sp.receipt_handle.unwrap();
    let changed = raw
        .change_invisible_duration(rmq::ChangeInvisibleDurationRequest {
            group: Some(group.clone()),
            topic: queue.topic.clone(),
            receipt_handle: original.clone(),
            invisible_duration: Some(prost_types::Duration {
                seconds: 10,
                nanos: 0,
            }),
            message_id: sp.message_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(changed.status.unwrap().code, rmq::Code::Ok as i32);
    assert!(!changed.receipt_handle.is_empty());
    // Past the first lease (2 s) it is still invisible: not redelivered.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let c = consumer(port, "rq-raw", &["rq-extend"]).await;
    let early = c
        .receive_with("rq-extend", &all(), 1, Duration::from_secs(30))
        .await
        .unwrap();
    assert!(early.is_empty(), "the extended lease held");
    let acked = raw
        .ack_message(rmq::AckMessageRequest {
            group: Some(group.clone()),
            topic: queue.topic.clone(),
            entries: vec![rmq::AckMessageEntry {
                message_id: sp.message_id.clone(),
                receipt_handle: original,
                lite_topic: None,
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        acked.status.as_ref().unwrap().code,
        rmq::Code::Ok as i32,
        "{acked:?}"
    );

    // 8b. ForwardMessageToDeadLetterQueue (a PushConsumer's, after its
    //     listener failed the last attempt): the message leaves the group
    //     at once and is in the group's dead-letter topic; its handle is
    //     spent.
    let m = MessageBuilder::builder()
        .set_topic("rq-extend")
        .set_body(b"poison".to_vec())
        .build()
        .unwrap();
    p.send(m).await.unwrap();
    let message = raw_receive(&mut raw, &group, &queue).await;
    let sp = message.system_properties.unwrap();
    let forward = |handle: String| rmq::ForwardMessageToDeadLetterQueueRequest {
        group: Some(group.clone()),
        topic: queue.topic.clone(),
        receipt_handle: handle,
        message_id: sp.message_id.clone(),
        delivery_attempt: 1,
        max_delivery_attempts: 16,
        lite_topic: None,
    };
    let handle = sp.receipt_handle.clone().unwrap();
    let fwd = raw
        .forward_message_to_dead_letter_queue(forward(handle.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fwd.status.unwrap().code, rmq::Code::Ok as i32);
    let again = raw
        .forward_message_to_dead_letter_queue(forward(handle))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(
        again.status.unwrap().code,
        rmq::Code::Ok as i32,
        "a spent handle"
    );
    let dlq = petrel
        .simple_consumer("rq-raw.dlq", "audit")
        .wait(Duration::from_secs(2))
        .build()
        .receive(10)
        .await
        .unwrap();
    assert_eq!(dlq.len(), 1, "{dlq:?}");
    assert_eq!(dlq[0].body.as_ref(), b"poison");
    assert!(
        dlq[0].properties["petrel.dlq.reason"].contains("attempt 1 of 16"),
        "{:?}",
        dlq[0].properties
    );
    // RocketMQ's own name for the group's dead-letter topic reads it too.
    let dc = consumer(port, "rq-dlq-reader", &["%DLQ%rq-raw"]).await;
    let dead = drain(&dc, "%DLQ%rq-raw", &all(), 1, Duration::from_secs(20)).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].body(), b"poison");
    assert_eq!(dead[0].topic(), "%DLQ%rq-raw");
    let c = consumer(port, "rq-raw", &["rq-extend"]).await;
    let none = c
        .receive_with("rq-extend", &all(), 1, Duration::from_secs(30))
        .await
        .unwrap();
    assert!(none.is_empty(), "a forwarded message is not redelivered");

    // 9. Errors are RocketMQ codes: an unknown topic.
    let route = raw
        .query_route(rmq::QueryRouteRequest {
            topic: Some(rmq::Resource {
                resource_namespace: String::new(),
                name: "no-such-topic".into(),
            }),
            endpoints: Some(rmq::Endpoints {
                scheme: rmq::AddressScheme::IPv4 as i32,
                addresses: vec![rmq::Address {
                    host: "127.0.0.1".into(),
                    port: port as i32,
                }],
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(route.status.unwrap().code, rmq::Code::TopicNotFound as i32);

    p.shutdown().await.unwrap();
    tp.shutdown().await.unwrap();
    drop(procs);
}

/// One message received over a raw RocketMQ client, leased for 2 s.
async fn raw_receive(
    raw: &mut rmq::messaging_service_client::MessagingServiceClient<tonic::transport::Channel>,
    group: &rmq::Resource,
    queue: &rmq::MessageQueue,
) -> rmq::Message {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let mut s = raw
            .receive_message(rmq::ReceiveMessageRequest {
                group: Some(group.clone()),
                message_queue: Some(queue.clone()),
                batch_size: 1,
                invisible_duration: Some(prost_types::Duration {
                    seconds: 2,
                    nanos: 0,
                }),
                long_polling_timeout: Some(prost_types::Duration {
                    seconds: 2,
                    nanos: 0,
                }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let mut message = None;
        while let Some(item) = s.message().await.unwrap() {
            if let Some(rmq::receive_message_response::Content::Message(m)) = item.content {
                message = Some(m);
            }
        }
        if let Some(m) = message {
            return m;
        }
    }
    panic!("nothing received over the raw client within 20 s");
}

/// Killing a broker, and then the proxy a RocketMQ producer is connected
/// to (it knows two), loses nothing the producer was told was sent. The
/// second proxy also takes RocketMQ clients on a port of its own
/// (`--rocketmq-listen`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_a_rocketmq_producer_was_told_was_sent_is_lost_to_kills() {
    let dir = tempfile::tempdir().unwrap();
    let (mut procs, ports) = common::spawn_brokers(3, dir.path(), &[]);
    let (p1, p2, rq2) = (free_port(), free_port(), free_port());
    let proxy1 = procs.push(spawn_proxy(p1, &broker_list(&ports)));
    let mut second = common::proxy_command(p2, &broker_list(&ports));
    second.args(["--rocketmq-listen", &format!("127.0.0.1:{rq2}")]);
    procs.push(second.spawn().unwrap());
    let petrel = Client::connect([format!("127.0.0.1:{p2}")]).unwrap();
    wait_ready(&petrel.admin(), 3, READY).await;
    petrel
        .admin()
        .create_topic(TopicSpec::new("rk").queues(2).replicas(3))
        .await
        .unwrap();

    let mut o = options(p1);
    o.set_access_url(format!("127.0.0.1:{p1},127.0.0.1:{rq2}"));
    let mut po = ProducerOption::default();
    po.set_topics(vec!["rk"]);
    let mut p = Producer::new(po, o).unwrap();
    p.start().await.unwrap();
    let mut told = HashSet::new();
    let (mut failed, mut i) = (0, 0);
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(40) && told.len() < 600 {
        if i == 150 {
            procs.kill(0); // broker 1
        }
        if i == 300 {
            procs.kill(proxy1);
        }
        i += 1;
        let m = MessageBuilder::builder()
            .set_topic("rk")
            .set_body(format!("m{i}").into_bytes())
            .build()
            .unwrap();
        match tokio::time::timeout(Duration::from_secs(12), p.send(m)).await {
            Ok(Ok(r)) => {
                told.insert(r.message_id().to_string());
            }
            _ => failed += 1,
        }
    }
    println!("sent {} (told ok), {failed} failed", told.len());
    assert!(told.len() > 300, "sends went on after the kills");

    // Every one of them is there, read through the surviving proxy's
    // RocketMQ port.
    let c = consumer(rq2, "rk-check", &["rk"]).await;
    let got = drain(&c, "rk", &all(), told.len(), Duration::from_secs(120)).await;
    let ids: HashSet<String> = got.iter().map(|m| m.message_id().to_string()).collect();
    let lost: Vec<&String> = told.difference(&ids).collect();
    assert!(
        lost.is_empty(),
        "{} lost, e.g. {:?}",
        lost.len(),
        lost.first()
    );
    drop(procs);
}

/// On a proxy with users, RocketMQ clients sign in with their access and
/// secret keys (`MQv2-HMAC-SHA1`) as the same users as Petrel's SDK, and
/// the same rules apply: a wrong secret is refused, and so is a topic the
/// user may not use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rocketmq_clients_sign_in_as_petrel_users_under_the_same_rules() {
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users.toml");
    let file = users.to_str().unwrap();
    let secret = common::add_user(file, "alice");
    let ops = common::add_user(file, "ops");
    for (user, resource, actions) in [
        ("alice", "topic:sec", "publish,subscribe,describe"),
        ("alice", "group:*", "subscribe"),
        ("ops", "*", "*"),
    ] {
        common::petrel(&[
            "acl",
            "add",
            "--auth-file",
            file,
            "--user",
            user,
            "--resource",
            resource,
            "--actions",
            actions,
        ]);
    }
    let (mut procs, ports) = common::spawn_brokers(3, dir.path(), &[]);
    let port = free_port();
    let mut pc = common::proxy_command(port, &broker_list(&ports));
    pc.env_remove("PETREL_ALLOW_ANONYMOUS")
        .arg("--auth-file")
        .arg(&users);
    procs.push(pc.spawn().unwrap());
    let admin = common::client(port, Some(("ops", &ops)));
    wait_ready(&admin.admin(), 3, READY).await;
    for t in ["sec", "other"] {
        admin
            .admin()
            .create_topic(TopicSpec::new(t).queues(1).replicas(3))
            .await
            .unwrap();
    }
    let signed = |sk: &str| {
        let mut o = options(port);
        o.set_access_key("alice");
        o.set_secret_key(sk);
        o
    };
    let start = |o: ClientOption, topic: &'static str| async move {
        let mut po = ProducerOption::default();
        po.set_topics(vec![topic]);
        let mut p = Producer::new(po, o).unwrap();
        p.start().await.map(|_| p)
    };
    // Signed correctly: sends and receives on its topic.
    let p = start(signed(&secret), "sec").await.unwrap();
    let m = MessageBuilder::builder()
        .set_topic("sec")
        .set_body(b"signed".to_vec())
        .build()
        .unwrap();
    p.send(m).await.unwrap();
    let mut co = SimpleConsumerOption::default();
    co.set_consumer_group("sec-g");
    co.set_topics(vec!["sec"]);
    let mut c = SimpleConsumer::new(co, signed(&secret)).unwrap();
    c.start().await.unwrap();
    let got = drain(&c, "sec", &all(), 1, Duration::from_secs(20)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body(), b"signed");
    // A wrong secret, no credentials, or a topic not granted: refused.
    assert!(start(signed("not-the-secret"), "sec").await.is_err());
    assert!(start(options(port), "sec").await.is_err());
    assert!(start(signed(&secret), "other").await.is_err());
    drop(procs);
}
