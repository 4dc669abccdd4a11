//! A broker that was down while a queue's log moved on by hundreds of
//! entries (past several snapshots) catches up when it returns: afterwards
//! its own database holds every record, each passing its CRC. (openraft
//! chooses log replication or snapshot transfer; in this run the leader kept
//! its log for the lagging follower, so this pins catch-up by replication
//! across snapshots, not snapshot install.) Processes are killed by PID.

mod common;

use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

use common::{broker_list, free_port, peers_arg, spawn_broker, spawn_proxy, wait_ready, Procs};
use petrel_sdk::{Client, Message, TopicSpec};

/// Elections and registration of a fresh cluster finish well within this.
const READY: Duration = Duration::from_secs(60);
/// How long the returning broker gets per catch-up check, and how many checks.
const CATCHUP_STEP: Duration = Duration::from_secs(2);
const CATCHUP_TRIES: usize = 10;
/// Graceful stop bound.
const STOP: Duration = Duration::from_secs(20);

fn broker(id: usize, port: u16, peers: &str, dir: &Path) -> Child {
    spawn_broker(id, port, peers, dir, &["--snapshot-every", "100"])
}

fn sigterm_and_wait(mut c: Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &c.id().to_string()])
        .status();
    let deadline = std::time::Instant::now() + STOP;
    while std::time::Instant::now() < deadline {
        if c.try_wait().unwrap().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = c.kill();
    panic!("broker did not stop on SIGTERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn returning_broker_catches_up_and_holds_every_record() {
    let dir = tempfile::tempdir().unwrap();
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let peers = peers_arg(&ports);
    let mut procs = Procs::default();
    for (i, port) in ports.iter().enumerate() {
        procs.push(broker(i + 1, *port, &peers, dir.path()));
    }
    let proxy_port = free_port();
    procs.push(spawn_proxy(proxy_port, &broker_list(&ports)));
    let client = Client::connect([format!("127.0.0.1:{proxy_port}")]).unwrap();
    let admin = client.admin();
    wait_ready(&admin, 3, READY).await;
    let info = admin
        .create_topic(TopicSpec::new("catchup").queues(1).replicas(3))
        .await
        .unwrap();
    let group = info.queues[0].group_id;
    let p = client.producer("catchup").build();
    for i in 0..20 {
        p.send_batch(vec![Message::new(format!("before-{i}"))])
            .await
            .unwrap();
    }

    // Broker 1 goes away; the log moves on by hundreds of entries, past
    // several snapshots.
    procs.kill(0);
    for i in 0..600 {
        p.send_batch(vec![Message::new(format!("during-{i}"))])
            .await
            .unwrap();
    }
    let total = 620u64;

    // Broker 1 returns; check its own database until it holds everything.
    let b1 = dir.path().join("b1");
    let mut last = Vec::new();
    for _ in 0..CATCHUP_TRIES {
        let child = broker(1, ports[0], &peers, dir.path());
        tokio::time::sleep(CATCHUP_STEP).await;
        sigterm_and_wait(child);
        last = petrel_broker::storage::stored_offsets_for_test(&b1, group).unwrap();
        if last.len() as u64 == total {
            break;
        }
    }
    assert_eq!(
        last.len() as u64,
        total,
        "broker 1 holds every record after catching up"
    );
    assert!(last
        .iter()
        .enumerate()
        .all(|(i, (off, ok))| *off == i as u64 && *ok));

    // And the cluster still serves everything.
    let pull = client.pull_consumer("catchup", "check");
    let mut next = 0;
    while next < total {
        let b = pull.read(0, next, 1 << 20, 1000).await.unwrap();
        assert!(!b.records.is_empty());
        next = b.next_offset;
    }
    drop(procs);
}
