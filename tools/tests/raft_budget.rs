//! Raft messages stay within their byte budget: a follower that falls
//! behind by large records is sent them in several AppendEntries, and holds
//! every record afterwards. Alone in its binary, so the 150 MiB it writes
//! does not slow another test's cluster. Processes are killed by PID.

mod common;

use std::time::Duration;

use common::{broker_list, free_port, peers_arg, spawn_broker, spawn_proxy, wait_ready, Procs};
use petrel_sdk::{Client, Message, TopicSpec};

const READY: Duration = Duration::from_secs(60);
/// Graceful stop bound.
const STOP: Duration = Duration::from_secs(20);

/// A follower that falls behind by large records (paused with SIGSTOP
/// while 24 records of 2 MiB are written) gets them in several
/// AppendEntries cut at the 16 MiB byte budget, never one message of 16
/// entries (32 MiB), and ends up holding every record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_behind_by_large_records_gets_them_in_parts() {
    let dir = tempfile::tempdir().unwrap();
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let admins: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let peers = peers_arg(&ports);
    let mut procs = Procs::default();
    for (i, port) in ports.iter().enumerate() {
        let admin = format!("127.0.0.1:{}", admins[i]);
        procs.push(spawn_broker(
            i + 1,
            *port,
            &peers,
            dir.path(),
            &["--admin-listen", &admin],
        ));
    }
    let proxy_port = free_port();
    procs.push(spawn_proxy(proxy_port, &broker_list(&ports)));
    let client = Client::connect([format!("127.0.0.1:{proxy_port}")]).unwrap();
    let admin = client.admin();
    wait_ready(&admin, 3, READY).await;
    let info = admin
        .create_topic(TopicSpec::new("big").queues(1).replicas(3))
        .await
        .unwrap();
    let q = &info.queues[0];
    // Pause a follower of the queue; the other two still make a quorum.
    let follower = q.replicas.iter().copied().find(|b| *b != q.leader).unwrap();
    let slot = follower as usize - 1;
    assert!(procs.signal(slot, "-STOP"));
    let p = client.producer("big").build();
    for i in 0..24 {
        let mut body = format!("big-{i}-").into_bytes();
        body.resize(2 << 20, b'x');
        p.send_batch(vec![Message::new(body)]).await.unwrap();
    }
    assert!(procs.signal(slot, "-CONT"));
    // Wait until the follower's admin endpoint says it holds the log
    // (readiness is not enough: poll the leader's cut counter and then
    // the follower's database after stopping it).
    let cuts = || -> f64 {
        admins
            .iter()
            .map(|a| common::metric(*a, "petrel_broker_raft_appends_cut_total"))
            .sum()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while cuts() == 0.0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        cuts() > 0.0,
        "the catch-up batch was cut at the byte budget"
    );
    // Let it finish, then check its own database.
    tokio::time::sleep(Duration::from_secs(3)).await;
    procs.sigterm(slot);
    let deadline = std::time::Instant::now() + STOP;
    while procs.try_reap(slot).is_none() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stored = petrel_broker::storage::stored_offsets_for_test(
        &dir.path().join(format!("b{follower}")),
        q.group_id,
    )
    .unwrap();
    assert_eq!(stored.len(), 24, "the follower holds every record");
    assert!(stored.iter().all(|(_, ok)| *ok), "each passes its CRC");
    drop(procs);
}
