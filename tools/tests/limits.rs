//! Limits that hold against a hostile client, tried as one would: a user
//! of an auth-enabled proxy opens thousands of streams on one connection,
//! creates consumer groups by the hundred thousand, sends a 1 MiB tag
//! filter and drains faster than its receive limit allows. Each gets a
//! typed error and a metric, while another user keeps sending and
//! receiving throughout. Every process is killed by PID at the end, pass
//! or fail.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;

mod common;

use common::{add_user, client, free_port, metric, petrel, proxy_command, wait_ready};
use petrel_proto::pb;
use petrel_sdk::{Client, Error, Message, TopicSpec};

const READY: Duration = Duration::from_secs(60);

/// Signs every call as one user, with its own nonce counter.
#[derive(Clone)]
struct Signer {
    key: [u8; 32],
    user: String,
    instance: u64,
    counter: Arc<AtomicU64>,
}

impl tonic::service::Interceptor for Signer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let date = petrel_proto::now_ms();
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let nonce = format!("{:x}-{n}", self.instance);
        let auth = petrel_proto::auth::authorization(&self.key, &self.user, date, &nonce);
        let md = req.metadata_mut();
        md.insert(
            petrel_proto::auth::DATE_HEADER,
            date.to_string().parse().unwrap(),
        );
        md.insert(
            petrel_proto::auth::AUTHORIZATION_HEADER,
            auth.parse().unwrap(),
        );
        Ok(req)
    }
}

type Raw = pb::petrel_client::PetrelClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Signer>,
>;

/// A raw client on ONE connection to the proxy, signing every call as
/// `user` (no SDK retries: each call's outcome is seen as it is).
async fn raw(port: u16, user: &str, secret: &str) -> Raw {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let signer = Signer {
        key: petrel_proto::auth::signing_key(user, secret),
        user: user.to_string(),
        instance: rand::random::<u32>() as u64,
        counter: Arc::new(AtomicU64::new(0)),
    };
    pb::petrel_client::PetrelClient::with_interceptor(channel, signer)
}

/// One receive call to its end: the records it got, or its typed error.
async fn receive(mut c: Raw, req: pb::ReceiveRequest) -> Result<usize, Error> {
    let mut stream = c
        .receive(req)
        .await
        .map_err(|s| Error::from_status(&s))?
        .into_inner();
    let mut n = 0;
    loop {
        match stream.message().await {
            Ok(Some(r)) => n += r.records.len(),
            Ok(None) => return Ok(n),
            Err(s) => return Err(Error::from_status(&s)),
        }
    }
}

fn receive_req(topic: &str, group: &str, wait_ms: u64) -> pb::ReceiveRequest {
    pb::ReceiveRequest {
        topic: topic.into(),
        group: group.into(),
        max_messages: 32,
        invisible_duration_ms: 30_000,
        wait_ms,
        ..Default::default()
    }
}

/// Tallies outcomes by error code name ("ok" for success).
fn tally<T>(results: &[Result<T, Error>]) -> std::collections::BTreeMap<&'static str, usize> {
    let mut m = std::collections::BTreeMap::new();
    for r in results {
        let k = match r {
            Ok(_) => "ok",
            Err(e) => e.code_name(),
        };
        *m.entry(k).or_default() += 1;
    }
    m
}

/// Bob's steady traffic while Alice floods: send one message, receive and
/// ack it, every 50 ms. Its count and worst round trip, or the first error.
fn steady(
    bob: Client,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Result<(u32, Duration), Error>> {
    tokio::spawn(async move {
        let p = bob.producer("calm").build();
        let c = bob
            .simple_consumer("calm", "bob")
            .wait(Duration::from_secs(5))
            .build();
        let (mut n, mut worst) = (0u32, Duration::ZERO);
        while !stop.load(Ordering::Relaxed) {
            let t = Instant::now();
            p.send(Message::new(format!("m{n}"))).await?;
            let mut got = Vec::new();
            while got.is_empty() {
                got = c.receive(1).await?;
            }
            c.ack_many(&got).await?;
            worst = worst.max(t.elapsed());
            n += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok((n, worst))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_clients_floods_get_typed_errors_while_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users.toml");
    let file = users.to_str().unwrap();
    let alice_secret = add_user(file, "alice");
    let bob_secret = add_user(file, "bob");
    petrel(&[
        "acl",
        "add",
        "--auth-file",
        file,
        "--user",
        "*",
        "--resource",
        "*",
        "--actions",
        "*",
    ]);
    let config = dir.path().join("proxy.toml");
    std::fs::write(&config, "").unwrap();
    let (mut procs, ports) = common::spawn_brokers(3, dir.path(), &["--max-consumer-groups", "64"]);
    let (port, admin) = (free_port(), free_port());
    let mut pc = proxy_command(port, &common::broker_list(&ports));
    pc.env_remove("PETREL_ALLOW_ANONYMOUS")
        .arg("--auth-file")
        .arg(&users)
        .arg("--config")
        .arg(&config)
        .args(["--admin-listen", &format!("127.0.0.1:{admin}")]);
    let proxy = procs.push(pc.spawn().unwrap());
    let alice = client(port, Some(("alice", &alice_secret)));
    let bob = client(port, Some(("bob", &bob_secret)));
    wait_ready(&bob.admin(), 3, READY).await;
    for (t, queues) in [("calm", 2), ("idle", 2), ("flood", 1), ("rl", 1)] {
        bob.admin()
            .create_topic(TopicSpec::new(t).queues(queues).replicas(3))
            .await
            .unwrap();
    }
    bob.producer("flood")
        .build()
        .send(Message::new("one"))
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let bob_task = steady(bob.clone(), stop.clone());
    let flood = raw(port, "alice", &alice_secret).await;

    // 1. 10,000 long-polls on one connection: the proxy holds at most
    //    --max-receives-per-client (1000) of them; the rest are refused.
    let t = Instant::now();
    let calls = (0..10_000).map(|_| receive(flood.clone(), receive_req("idle", "a", 2_000)));
    let results = futures::future::join_all(calls).await;
    let counts = tally(&results);
    println!("10,000 streams in {:?}: {counts:?}", t.elapsed());
    assert_eq!(
        counts.keys().copied().collect::<Vec<_>>(),
        ["ok", "rate_limited"],
        "held, or refused with rate_limited: {counts:?}"
    );
    assert!(metric(admin, "petrel_proxy_limit_refusals_total") > 0.0);

    // 2. 100,000 consumer groups on a one-queue topic capped at 64: the
    //    first groups get their record, every other gets limit_exceeded.
    let t = Instant::now();
    let results: Vec<(String, Result<usize, Error>)> = futures::stream::iter(0..100_000)
        .map(|i| {
            let c = flood.clone();
            async move {
                let g = format!("g-{i}");
                let r = receive(c, receive_req("flood", &g, 0)).await;
                (g, r)
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let outcomes: Vec<Result<usize, Error>> = results.iter().map(|(_, r)| r.clone()).collect();
    let counts = tally(&outcomes);
    println!("100,000 groups in {:?}: {counts:?}", t.elapsed());
    assert_eq!(
        counts.keys().copied().collect::<Vec<_>>(),
        ["limit_exceeded", "ok"],
        "{counts:?}"
    );
    // The cap is checked before each receive, so concurrent first receives
    // may pass it together: never by more than the 64 in flight.
    let admitted: Vec<&String> = results
        .iter()
        .filter(|(_, r)| matches!(r, Ok(1)))
        .map(|(g, _)| g)
        .collect();
    assert!(
        (64..=128).contains(&counts["ok"]) && admitted.len() == counts["ok"],
        "{counts:?}"
    );
    let refused = outcomes.iter().find_map(|r| r.as_ref().err()).unwrap();
    assert!(
        refused.to_string().contains("petrel group delete"),
        "the error says how to make room: {refused}"
    );

    // Deleting the groups makes room again (CLI, as an operator would).
    let endpoint = format!("127.0.0.1:{port}");
    let cli = |args: &[&str]| {
        let mut all = vec![
            "--endpoint",
            &endpoint,
            "--access-key",
            "bob",
            "--secret-key",
            &bob_secret,
        ];
        all.extend_from_slice(args);
        petrel(&all)
    };
    let g0 = admitted[0].clone();
    let out = cli(&["group", "delete", &g0, "--topic", "flood", "--json"]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["deleted"], g0.as_str(), "{out}");
    assert_eq!(v["topics"], serde_json::json!(["flood"]), "{out}");
    assert_eq!(v["queues"], 1, "{out}");
    let again: serde_json::Value =
        serde_json::from_str(cli(&["group", "delete", &g0, "--json"]).trim()).unwrap();
    assert_eq!(again["queues"], 0, "deleting twice finds nothing");
    for g in &admitted[1..] {
        bob.admin().delete_group(g.to_string(), None).await.unwrap();
    }
    let fresh = bob
        .simple_consumer("flood", "fresh")
        .wait(Duration::from_secs(2))
        .build()
        .receive(1)
        .await
        .unwrap();
    assert_eq!(fresh.len(), 1, "a new group starts at the earliest record");
    // A deleted group that comes back starts afresh too.
    let back = receive(flood.clone(), receive_req("flood", &g0, 0)).await;
    assert!(matches!(back, Ok(1)), "{back:?}");

    // 3. A 1 MiB tag filter: a typed error, before any broker is asked.
    let huge = "t||".repeat(350_000);
    let mut req = receive_req("flood", "filtered", 0);
    req.filter = Some(pb::FilterExpression {
        r#type: pb::FilterType::Tag as i32,
        expression: huge,
    });
    let r = receive(flood.clone(), req).await;
    assert!(matches!(r, Err(Error::InvalidFilter(_))), "{r:?}");

    // 4. A receive limit for Alice, set while running (SIGHUP): she gets
    //    at most her 5 records a second; Bob is not limited.
    let sends = bob.producer("rl").build();
    for i in 0..40 {
        sends.send(Message::new(format!("r{i}"))).await.unwrap();
    }
    let reloads = metric(admin, "petrel_proxy_config_reloads_total");
    std::fs::write(&config, "[receive_limits.clients]\n\"alice\" = 5\n").unwrap();
    assert!(procs.signal(proxy, "-HUP"));
    // Applied once the reload counter moves (it counts after the apply;
    // the file watcher may beat the signal to it, with the same text).
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(admin, "petrel_proxy_config_reloads_total") <= reloads {
        assert!(
            Instant::now() < deadline,
            "the proxy never reloaded its config"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let first = receive(flood.clone(), receive_req("rl", "ra", 1_000)).await;
    assert!(matches!(first, Ok(1..=5)), "{first:?}");
    let second = receive(flood.clone(), receive_req("rl", "ra", 1_000)).await;
    assert!(
        matches!(&second, Err(Error::RateLimited(m)) if m.contains("alice")),
        "{second:?}"
    );
    let bobs = bob
        .simple_consumer("rl", "rb")
        .wait(Duration::from_secs(2))
        .build()
        .receive(32)
        .await
        .unwrap();
    assert_eq!(bobs.len(), 32, "Bob's receives are not limited");

    stop.store(true, Ordering::Relaxed);
    let (n, worst) = bob_task.await.unwrap().expect("Bob was served throughout");
    println!("Bob: {n} round trips during the floods, worst {worst:?}");
    assert!(n > 0);
    // The cluster keeps serving Alice within her rights too.
    alice
        .producer("calm")
        .build()
        .send(Message::new("still here"))
        .await
        .unwrap();
    drop(procs);
}

/// One client cannot hold more receives open than the proxy allows
/// (`--max-receives-per-client`): the next gets `rate_limited`, while
/// another client is served as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_clients_open_receives_are_capped_and_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users.toml");
    let file = users.to_str().unwrap();
    let alice_secret = add_user(file, "alice");
    let bob_secret = add_user(file, "bob");
    petrel(&[
        "acl",
        "add",
        "--auth-file",
        file,
        "--user",
        "*",
        "--resource",
        "*",
        "--actions",
        "*",
    ]);
    let (mut procs, ports) = common::spawn_brokers(3, dir.path(), &[]);
    let (port, admin) = (free_port(), free_port());
    let mut pc = proxy_command(port, &common::broker_list(&ports));
    pc.env_remove("PETREL_ALLOW_ANONYMOUS")
        .arg("--auth-file")
        .arg(&users)
        .args(["--max-receives-per-client", "4"])
        .args(["--admin-listen", &format!("127.0.0.1:{admin}")]);
    procs.push(pc.spawn().unwrap());
    let alice = client(port, Some(("alice", &alice_secret)));
    let bob = client(port, Some(("bob", &bob_secret)));
    wait_ready(&bob.admin(), 3, READY).await;
    bob.admin()
        .create_topic(TopicSpec::new("capped").queues(2).replicas(3))
        .await
        .unwrap();

    // Alice parks four long-polls on the empty topic.
    let mut holders = Vec::new();
    for _ in 0..4 {
        let c = alice
            .simple_consumer("capped", "a")
            .wait(Duration::from_secs(6))
            .build();
        holders.push(tokio::spawn(async move { c.receive(1).await }));
    }
    // Until the proxy holds all four (nobody else receives here).
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(admin, "petrel_proxy_open_streams") < 4.0 {
        assert!(
            Instant::now() < deadline,
            "the four receives never reached the proxy"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let fifth = Client::builder([format!("127.0.0.1:{port}")])
        .credentials("alice", alice_secret.clone())
        .request_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let r = fifth
        .simple_consumer("capped", "a")
        .wait(Duration::from_millis(100))
        .build()
        .receive(1)
        .await;
    assert!(
        matches!(&r, Err(Error::RateLimited(m)) if m.contains("user:alice")),
        "{r:?}"
    );
    // Bob is not affected.
    bob.producer("capped")
        .build()
        .send(Message::new("for bob"))
        .await
        .unwrap();
    let got = bob
        .simple_consumer("capped", "b")
        .wait(Duration::from_secs(3))
        .build()
        .receive(1)
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    // Alice's slots come back when her long-polls end.
    for h in holders {
        h.await.unwrap().unwrap();
    }
    fifth
        .simple_consumer("capped", "a")
        .wait(Duration::from_millis(100))
        .build()
        .receive(1)
        .await
        .unwrap();
    drop(procs);
}
