//! The static cluster as operators run it: three `petrel-broker` processes
//! started with `--id/--data-dir/--listen/--peers` (one of them configured
//! through `PETREL_*` environment variables and a TOML file) and a
//! `petrel-proxy` started with `--brokers` naming only one broker; then the
//! SDK produces and consumes through the proxy. Every process is killed by
//! PID at the end, pass or fail.

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{bin, free_port, peers_arg, spawn_broker, spawn_proxy, wait_ready, Procs};
use petrel_sdk::{Client, Message, TopicSpec};

/// Elections and broker registration finish well within this.
const READY: Duration = Duration::from_secs(60);

#[test]
fn every_binary_explains_its_flags() {
    for (b, flags) in [
        (
            "petrel-broker",
            vec!["--id", "--data-dir", "--listen", "--peers", "--config"],
        ),
        (
            "petrel-proxy",
            vec![
                "--listen",
                "--brokers",
                "--max-record-bytes",
                "--receipt-secret",
            ],
        ),
        ("petrel", vec!["--endpoint", "--json"]),
    ] {
        let o = Command::new(bin(b)).arg("--help").output().unwrap();
        assert!(o.status.success(), "{b} --help");
        let text = String::from_utf8_lossy(&o.stdout);
        for f in flags {
            assert!(text.contains(f), "{b} --help does not mention {f}");
        }
    }
    let o = Command::new(bin("petrel-broker"))
        .args(["--id", "0"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("petrel-broker:"));
    let o = Command::new(bin("petrel-proxy"))
        .args(["--brokers", "nonsense"])
        .output()
        .unwrap();
    assert!(!o.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn separate_broker_and_proxy_processes_serve_produce_and_consume() {
    let dir = tempfile::tempdir().unwrap();
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let peers = peers_arg(&ports);
    let mut procs = Procs::default();
    for (i, port) in ports.iter().enumerate() {
        let id = i + 1;
        let data = dir.path().join(format!("b{id}"));
        let mut cmd = Command::new(bin("petrel-broker"));
        cmd.env("PETREL_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if id == 3 {
            // Configured through the environment and a config file.
            let cfg = dir.path().join("b3.toml");
            std::fs::write(&cfg, format!("data_dir = {:?}\nheartbeat_ms = 200\n", data)).unwrap();
            cmd.env("PETREL_ID", "3")
                .env("PETREL_LISTEN", format!("127.0.0.1:{port}"))
                .env("PETREL_PEERS", &peers)
                .env("PETREL_CONFIG", &cfg);
            procs.push(cmd.spawn().unwrap());
        } else {
            procs.push(spawn_broker(id, *port, &peers, dir.path(), &[]));
        }
    }
    let proxy_port = free_port();
    procs.push(spawn_proxy(proxy_port, &format!("127.0.0.1:{}", ports[1])));

    let client = Client::connect([format!("127.0.0.1:{proxy_port}")]).unwrap();
    let admin = client.admin();
    wait_ready(&admin, 3, READY).await;

    let info = admin
        .create_topic(TopicSpec::new("procs").queues(6).replicas(3))
        .await
        .unwrap();
    let mut preferred: Vec<u64> = info.queues.iter().map(|q| q.replicas[0]).collect();
    preferred.sort();
    assert_eq!(
        preferred,
        vec![1, 1, 2, 2, 3, 3],
        "leaders spread over the brokers"
    );

    let p = client.producer("procs").build();
    let msgs: Vec<Message> = (0..1000)
        .map(|i| Message::new(format!("p{i}")).with_key(format!("{i}")))
        .collect();
    let sent: HashSet<String> = p
        .send_batch(msgs)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.message_id)
        .collect();
    assert_eq!(sent.len(), 1000);

    let c = client
        .simple_consumer("procs", "g")
        .wait(Duration::from_secs(1))
        .build();
    let mut got = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while got.len() < 1000 && Instant::now() < deadline {
        let batch = c.receive(64).await.unwrap();
        for r in c.ack_many(&batch).await.unwrap() {
            r.unwrap();
        }
        for m in batch {
            assert!(got.insert(m.message_id), "duplicate delivery");
        }
    }
    assert_eq!(got, sent);

    let cluster = admin.describe_cluster().await.unwrap();
    let leaders: u32 = cluster.brokers.iter().map(|b| b.leader_count).sum();
    assert_eq!(leaders, 6);
    assert!(cluster.brokers.iter().all(|b| b.replica_count == 6));
    drop(procs);
}
