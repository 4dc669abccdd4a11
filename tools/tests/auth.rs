//! Users and permissions at the proxy, as an operator sets them up and
//! clients meet them: a users file made with `petrel user add` and
//! `petrel acl add`, a `petrel-proxy --auth-file` in front of three
//! brokers, and SDK clients and raw gRPC calls with good, bad, stale and
//! replayed credentials. Then a rule is added while clients stay
//! connected. Every process is killed by PID at the end, pass or fail.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{
    add_user, bin, client, free_port, metric, peers_arg, petrel, proxy_command, spawn_broker,
    wait_ready, Procs,
};
use petrel_proto::pb;
use petrel_sdk::{Error, Message, TopicSpec};

const READY: Duration = Duration::from_secs(60);

/// A raw DescribeCluster call signed by hand with `date` and `nonce`.
async fn raw_call(
    port: u16,
    user: &str,
    secret: &str,
    date: i64,
    nonce: &str,
) -> Result<(), Error> {
    let mut c = pb::petrel_client::PetrelClient::connect(format!("http://127.0.0.1:{port}"))
        .await
        .unwrap();
    let mut req = tonic::Request::new(pb::DescribeClusterRequest {});
    let key = petrel_proto::auth::signing_key(user, secret);
    let auth = petrel_proto::auth::authorization(&key, user, date, nonce);
    req.metadata_mut().insert(
        petrel_proto::auth::DATE_HEADER,
        date.to_string().parse().unwrap(),
    );
    req.metadata_mut().insert(
        petrel_proto::auth::AUTHORIZATION_HEADER,
        auth.parse().unwrap(),
    );
    c.describe_cluster(req)
        .await
        .map(|_| ())
        .map_err(|s| Error::from_status(&s))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_and_rules_decide_who_may_do_what() {
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users.toml");
    let file = users.to_str().unwrap();
    let admin_secret = add_user(file, "admin");
    let alice_secret = add_user(file, "alice");
    petrel(&[
        "acl",
        "add",
        "--auth-file",
        file,
        "--user",
        "admin",
        "--resource",
        "*",
        "--actions",
        "*",
    ]);
    petrel(&[
        "acl",
        "add",
        "--auth-file",
        file,
        "--user",
        "alice",
        "--resource",
        "topic:orders.*",
        "--actions",
        "publish,describe",
    ]);
    // The file holds no secret.
    let text = std::fs::read_to_string(&users).unwrap();
    assert!(!text.contains(&alice_secret) && !text.contains(&admin_secret));
    // A bad rule is refused before it reaches the file.
    let o = Command::new(bin("petrel"))
        .args([
            "acl",
            "add",
            "--auth-file",
            file,
            "--user",
            "alice",
            "--resource",
            "topic:x",
        ])
        .args(["--actions", "fly"])
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(std::fs::read_to_string(&users).unwrap(), text);

    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let peers = peers_arg(&ports);
    let mut procs = Procs::default();
    for (i, port) in ports.iter().enumerate() {
        procs.push(spawn_broker(i + 1, *port, &peers, dir.path(), &[]));
    }
    let (port, admin_port) = (free_port(), free_port());
    let mut pc = proxy_command(port, &common::broker_list(&ports));
    pc.env_remove("PETREL_ALLOW_ANONYMOUS")
        .arg("--auth-file")
        .arg(&users)
        .arg("--admin-listen")
        .arg(format!("127.0.0.1:{admin_port}"));
    procs.push(pc.spawn().unwrap());

    let admin = client(port, Some(("admin", &admin_secret)));
    wait_ready(&admin.admin(), 3, READY).await;
    for t in ["orders.eu", "billing"] {
        admin
            .admin()
            .create_topic(TopicSpec::new(t).queues(2).replicas(3))
            .await
            .unwrap();
    }

    // No credentials, an unknown user, a wrong secret: unauthenticated.
    for c in [
        client(port, None),
        client(port, Some(("mallory", "whatever-secret"))),
        client(port, Some(("alice", "not-alices-secret"))),
    ] {
        match c.admin().describe_cluster().await {
            Err(Error::Unauthenticated(_)) => {}
            other => panic!("expected unauthenticated, got {other:?}"),
        }
    }

    let alice = client(port, Some(("alice", &alice_secret)));
    alice
        .producer("orders.eu")
        .build()
        .send(Message::new("ok"))
        .await
        .unwrap();
    match alice
        .producer("billing")
        .build()
        .send(Message::new("no"))
        .await
    {
        Err(Error::PermissionDenied(m)) => {
            assert!(m.contains("topic:billing") && m.contains("publish"), "{m}")
        }
        other => panic!("expected permission_denied, got {other:?}"),
    }
    for r in [
        alice
            .admin()
            .create_topic(TopicSpec::new("orders.new").queues(1).replicas(3))
            .await
            .map(|_| ()),
        alice.admin().delete_topic("orders.eu").await.map(|_| ()),
    ] {
        assert!(matches!(r, Err(Error::PermissionDenied(_))), "{r:?}");
    }
    // Producer ids belong to their user: the same id and sequence from
    // two users are two records, not a duplicate; `petrel-` is reserved.
    let a = alice
        .producer("orders.eu")
        .producer_id("shared")
        .build()
        .send(Message::new("alice's").with_key("k"))
        .await
        .unwrap();
    let b = admin
        .producer("orders.eu")
        .producer_id("shared")
        .build()
        .send(Message::new("admin's").with_key("k"))
        .await
        .unwrap();
    assert_ne!(
        a.message_id, b.message_id,
        "one user's sends de-duplicated another's"
    );
    let looked = admin.admin().get_message(&a.message_id).await.unwrap();
    assert_eq!(looked.record.unwrap().producer_id, "alice:shared");
    let r = alice
        .producer("orders.eu")
        .producer_id("petrel-dlq-1")
        .build()
        .send(Message::new("x"))
        .await;
    assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
    // Lists show only what the caller may describe.
    let names: Vec<String> = alice
        .admin()
        .list_topics()
        .await
        .unwrap()
        .topics
        .into_iter()
        .map(|t| t.config.unwrap_or_default().name)
        .collect();
    assert_eq!(names, vec!["orders.eu"]);
    // Nor may she consume (no subscribe rule).
    let r = alice
        .simple_consumer("orders.eu", "g")
        .build()
        .receive(1)
        .await;
    assert!(matches!(r, Err(Error::PermissionDenied(_))), "{r:?}");
    // The CLI signs too.
    let out = petrel(&[
        "--endpoint",
        &format!("127.0.0.1:{port}"),
        "--access-key",
        "alice",
        "--secret-key",
        &alice_secret,
        "topic",
        "list",
        "--json",
    ]);
    assert!(
        out.contains("orders.eu") && !out.contains("billing"),
        "{out}"
    );

    // A stale signature and a replayed one are refused; a fresh one works.
    let now = petrel_proto::now_ms();
    let stale = raw_call(port, "admin", &admin_secret, now - 600_000, "abc-1").await;
    assert!(
        matches!(&stale, Err(Error::Unauthenticated(m)) if m.contains("stale")),
        "{stale:?}"
    );
    raw_call(port, "admin", &admin_secret, now, "abc-2")
        .await
        .unwrap();
    let replay = raw_call(port, "admin", &admin_secret, now, "abc-2").await;
    assert!(
        matches!(&replay, Err(Error::Unauthenticated(m)) if m.contains("replayed")),
        "{replay:?}"
    );

    // A rule added to the file takes effect without a restart, and no
    // client is disconnected by it.
    let accepted = metric(admin_port, "petrel_proxy_connections_accepted_total");
    petrel(&[
        "acl",
        "add",
        "--auth-file",
        file,
        "--user",
        "alice",
        "--resource",
        "topic:billing",
        "--actions",
        "publish",
    ]);
    let billing = alice.producer("billing").build();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match billing.send(Message::new("now allowed")).await {
            Ok(_) => break,
            Err(Error::PermissionDenied(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => panic!("the new rule never took effect: {e}"),
        }
    }
    admin.admin().describe_cluster().await.unwrap();
    assert_eq!(
        metric(admin_port, "petrel_proxy_connections_accepted_total"),
        accepted,
        "a reload must not drop connections"
    );
    assert!(metric(admin_port, "petrel_proxy_auth_refusals_total") >= 5.0);
    drop(procs);
}

/// Secure by default: no receipt secret, or no auth choice, and the proxy
/// does not start.
#[test]
fn a_proxy_without_a_receipt_secret_or_an_auth_choice_refuses_to_start() {
    for (args, says) in [
        (
            vec!["--brokers", "127.0.0.1:1", "--allow-anonymous"],
            "--receipt-secret",
        ),
        (
            vec![
                "--brokers",
                "127.0.0.1:1",
                "--receipt-secret",
                "0123456789abcdef",
            ],
            "--allow-anonymous",
        ),
    ] {
        let o = Command::new(bin("petrel-proxy"))
            .args(&args)
            .env_remove("PETREL_RECEIPT_SECRET")
            .env_remove("PETREL_ALLOW_ANONYMOUS")
            .env_remove("PETREL_AUTH_FILE")
            .stdout(Stdio::null())
            .output()
            .unwrap();
        assert!(!o.status.success(), "{args:?} started");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
    }
}
