//! Receives are woken, not polling: a receive that finds nothing waits on
//! the queues' leaders (`WaitReady`) and is woken by the append that gives
//! it something. Checked by counting the pops an idle receive costs (the
//! broker RPC metrics of this process) rather than by timing anything.
//!
//! Its own test binary: the metrics recorder is process-wide.

use std::time::Duration;

use petrel_sdk::{Client, Message, TopicSpec};
use petrel_tools::dev::{ClusterOptions, LocalCluster};

/// Pops served by the brokers of this process so far.
fn pops() -> u64 {
    petrel_admin::recorder()
        .render()
        .lines()
        .filter(|l| l.starts_with("petrel_broker_rpc_duration_seconds_count{rpc=\"Pop\"}"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_receive_waits_instead_of_polling_and_an_append_wakes_it() {
    // Installed before the brokers start, so every RPC is counted.
    petrel_admin::recorder();
    let dir = tempfile::tempdir().unwrap();
    let c = LocalCluster::start(ClusterOptions::new(dir.path()))
        .await
        .unwrap();
    c.wait_ready(Duration::from_secs(30)).await.unwrap();
    let client = Client::connect([c.endpoint()]).unwrap();
    let queues = 8u64;
    client
        .admin()
        .create_topic(TopicSpec::new("wake").queues(queues as u32).replicas(3))
        .await
        .unwrap();
    let consumer = client
        .simple_consumer("wake", "g")
        .invisible_duration(Duration::from_secs(30))
        .build();

    // An empty topic: a 3 s receive sweeps the queues once, maybe twice (a
    // change racing the first sweep), and then waits. Polling every
    // 10-100 ms swept it ~35 times.
    let before = pops();
    let got = consumer
        .receive_with(16, Duration::from_secs(30), Duration::from_secs(3))
        .await
        .unwrap();
    assert!(got.is_empty());
    let sweeps = (pops() - before) as f64 / queues as f64;
    eprintln!("idle receive: {sweeps} sweeps, {} pops in all", pops());
    assert!(
        sweeps <= 4.0,
        "an idle 3 s receive swept the queues {sweeps} times"
    );

    // A waiting receive gets a record sent while it waits.
    let swept = pops() + queues;
    let waiting = {
        let consumer = consumer.clone();
        tokio::spawn(async move {
            consumer
                .receive_with(16, Duration::from_secs(30), Duration::from_secs(20))
                .await
        })
    };
    // Once it has swept every queue and found nothing, it waits.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while pops() < swept {
        assert!(
            std::time::Instant::now() < deadline,
            "the receive never swept the queues"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let producer = client.producer("wake").build();
    producer.send(Message::new("wake up")).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(15), waiting)
        .await
        .expect("the waiting receive returned")
        .unwrap()
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(&got[0].body[..], b"wake up");
    consumer.ack_many(&got).await.unwrap();
    c.stop().await;
}
