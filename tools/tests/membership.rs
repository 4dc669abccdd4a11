//! Join and drain under load: three brokers (`--peers`) and a proxy, a topic
//! of 8 queues (RF 3), an idempotent SDK producer writing and a pop-mode
//! consumer receiving throughout. Broker 4 starts with `--join` (no
//! `--peers`) and registers through broker 2; `petrel cluster drain 1` (CLI,
//! `--json`) moves every replica and leadership of broker 1 to the others
//! (broker 4 receives one replica of every queue, and replaces broker 1 as a
//! meta voter); `petrel cluster remove-broker 1` then forgets it, and its
//! process is SIGKILLed.
//!
//! Checked along the way: the CLI's JSON answers; `remove-broker` of a
//! broker that still holds replicas fails with a non-zero exit and exactly
//! one `{"error":{...}}` line on stderr; a drain that would leave fewer
//! active brokers than the replication factor is refused (while broker 1
//! drains, and again once it is gone). At the end: no send failed and no
//! receive failed after the SDK's retries, every acknowledged record was
//! consumed, and a full offset-mode read holds every acknowledged record
//! exactly once.
//!
//! Every process is SIGKILLed by PID at the end, pass or fail; the test is
//! bounded by `OVERALL`.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::cluster::{balanced, describe_line, wait_cluster, CliOut, Monitor, TestCluster};
use common::wait_ready;
use common::workload::{audit, count_sdk_retries, read_all, sdk_retries, Consuming, Producing};
use petrel_sdk::{pb, TopicSpec};

const TOPIC: &str = "members";
const QUEUES: u32 = 8;
const READY: Duration = Duration::from_secs(60);
/// Bound on the joining broker being registered and reachable.
const JOIN: Duration = Duration::from_secs(30);
/// Bound on the drain moving every replica and leadership off broker 1.
const DRAIN: Duration = Duration::from_secs(60);
/// Bound on the consumer receiving every acknowledged record at the end.
const CONSUME: Duration = Duration::from_secs(60);
const OVERALL: Duration = Duration::from_secs(300);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_drain_and_remove_under_load_lose_nothing() {
    count_sdk_retries();
    let mut cluster = TestCluster::new("membership", 3, 4, &[]);
    if tokio::time::timeout(OVERALL, run(&mut cluster))
        .await
        .is_err()
    {
        // Dropping `cluster` while panicking prints and keeps the logs.
        panic!("membership test did not finish within {OVERALL:?}");
    }
}

fn broker(c: &pb::ClusterInfo, id: u64) -> Option<&pb::BrokerInfo> {
    c.brokers.iter().find(|b| b.id == id)
}

/// A CLI failure in `--json` mode: non-zero exit, nothing on stdout, and
/// exactly one stderr line `{"error":{"code":..,"message":..}}`. Returns
/// the code.
fn json_error(what: &str, o: &CliOut) -> String {
    assert!(
        !o.ok() && o.code.is_some(),
        "{what}: expected a failure exit, got {o:?}"
    );
    assert!(o.stdout.trim().is_empty(), "{what}: stdout {o:?}");
    let lines: Vec<&str> = o.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{what}: want one stderr line: {o:?}");
    let v: serde_json::Value = serde_json::from_str(lines[0])
        .unwrap_or_else(|e| panic!("{what}: stderr is not JSON ({e}): {o:?}"));
    let code = v["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: no error.code: {o:?}"));
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{what}: no error.message: {o:?}"
    );
    code.to_string()
}

/// A CLI success in `--json` mode: exit 0 and one `{"ok":true,..}` line.
fn json_ok(what: &str, o: &CliOut) -> serde_json::Value {
    assert!(o.ok(), "{what} failed: {o:?}");
    let lines = o.json();
    assert_eq!(lines.len(), 1, "{what}: want one JSON line: {o:?}");
    assert_eq!(lines[0]["ok"], true, "{what}: {o:?}");
    assert!(
        lines[0]["map_version"].as_u64().is_some_and(|v| v > 0),
        "{what}: map_version: {o:?}"
    );
    lines[0].clone()
}

async fn run(cluster: &mut TestCluster) {
    cluster.start(3);
    let client = cluster.client();
    let admin = client.admin();
    wait_ready(&admin, 3, READY).await;
    admin
        .create_topic(TopicSpec::new(TOPIC).queues(QUEUES).replicas(3))
        .await
        .unwrap();
    wait_cluster(&admin, Duration::from_secs(30), balanced(3))
        .await
        .expect("topic led on every queue");
    // An operator cannot redirect or shadow a registered broker with
    // add-broker, nor register garbage; the map does not change.
    let before = admin.describe_cluster().await.unwrap();
    let b2 = broker(&before, 2).unwrap().address.clone();
    let b3 = broker(&before, 3).unwrap().address.clone();
    for (args, want) in [
        (vec!["2", "127.0.0.1:1"], "already_exists"),
        (vec!["7", b2.as_str()], "already_exists"),
        (vec!["7", b3.as_str()], "already_exists"),
        (vec!["7", "127.0.0.1:1,127.0.0.1:2"], "invalid_argument"),
        (
            vec!["18446744073709551615", "127.0.0.1:3"],
            "invalid_argument",
        ),
        (vec!["0", "127.0.0.1:3"], "invalid_argument"),
    ] {
        let mut a = vec!["--json", "cluster", "add-broker"];
        a.extend(args.iter().copied());
        let o = cluster.cli(&a).await;
        assert_eq!(
            json_error(&format!("add-broker {args:?}"), &o),
            want,
            "{o:?}"
        );
    }
    // Registering a broker again where it is changes nothing.
    let o = cluster
        .cli(&["--json", "cluster", "add-broker", "2", &b2])
        .await;
    json_ok("add-broker at its own address", &o);
    let after = admin.describe_cluster().await.unwrap();
    let addrs = |c: &pb::ClusterInfo| -> Vec<(u64, String)> {
        c.brokers
            .iter()
            .map(|b| (b.id, b.address.clone()))
            .collect()
    };
    assert_eq!(addrs(&after), addrs(&before), "add-broker changed the map");
    cluster.say("cluster ready; producing and consuming");
    let monitor = Monitor::start(cluster.client(), cluster.t0);
    let producer = Producing::start(cluster.client(), TOPIC, "p", 150, 10);
    let consumer = Consuming::start(cluster.client(), TOPIC, "g", Duration::from_secs(10));
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Join: broker 4 through broker 2, no --peers.
    let join_at = Instant::now();
    cluster.start_joiner(4, 2);
    let joined = wait_cluster(&admin, JOIN, |c| {
        let b = broker(c, 4).ok_or("broker 4 not registered")?;
        if c.brokers.len() != 4 || !c.brokers.iter().all(|b| b.reachable) {
            return Err("not 4 reachable brokers".into());
        }
        if b.state != "active" {
            return Err(format!("broker 4 is {}", b.state));
        }
        Ok(())
    })
    .await
    .unwrap_or_else(|e| panic!("broker 4 did not join within {JOIN:?}: {e}"));
    let join_took = join_at.elapsed();
    cluster.say(format!(
        "broker 4 joined after {join_took:?}: {}",
        describe_line(&joined)
    ));
    // `cluster describe --json` lists it too.
    let d = cluster.cli(&["--json", "cluster", "describe"]).await;
    assert!(d.ok(), "{d:?}");
    let ids: Vec<u64> = d.json()[0]["brokers"]
        .as_array()
        .expect("brokers array")
        .iter()
        .filter_map(|b| b["id"].as_u64())
        .collect();
    assert_eq!(ids, vec![1, 2, 3, 4], "{d:?}");

    // Drain broker 1 through the CLI.
    let drain_at = Instant::now();
    let o = cluster.cli(&["--json", "cluster", "drain", "1"]).await;
    let v = json_ok("drain 1", &o);
    cluster.say(format!("drain 1: {v}"));

    // While it drains: removing a broker that holds replicas is refused,
    // and so is draining a second one (2 other active brokers < RF 3).
    let o = cluster
        .cli(&["--json", "cluster", "remove-broker", "2"])
        .await;
    let remove_code = json_error("remove-broker 2 (holds replicas)", &o);
    cluster.say(format!(
        "remove-broker 2 refused: exit {:?}, {}",
        o.code,
        o.stderr.trim()
    ));
    let o = cluster.cli(&["--json", "cluster", "drain", "2"]).await;
    let drain2_code = json_error("drain 2 while 1 drains", &o);
    assert_eq!(drain2_code, "invalid_argument", "{o:?}");
    cluster.say(format!("drain 2 refused: {}", o.stderr.trim()));
    let c = admin.describe_cluster().await.unwrap();
    assert_eq!(broker(&c, 1).unwrap().state, "draining", "{c:?}");
    assert_eq!(broker(&c, 2).unwrap().state, "active", "{c:?}");

    let drained = wait_cluster(&admin, DRAIN, |c| {
        let b1 = broker(c, 1).ok_or("broker 1 gone before removal")?;
        let b4 = broker(c, 4).ok_or("broker 4 gone")?;
        if b1.replica_count > 0 || b1.leader_count > 0 {
            return Err(format!(
                "broker 1 still has {} replicas, {} leaderships",
                b1.replica_count, b1.leader_count
            ));
        }
        if b4.replica_count != QUEUES {
            return Err(format!("broker 4 has {} replicas", b4.replica_count));
        }
        let leaders: u32 = c.brokers.iter().map(|b| b.leader_count).sum();
        if leaders != c.queue_count {
            return Err(format!("{leaders} leaders for {} queues", c.queue_count));
        }
        Ok(())
    })
    .await
    .unwrap_or_else(|e| panic!("broker 1 not drained within {DRAIN:?}: {e}"));
    let drain_took = drain_at.elapsed();
    cluster.say(format!(
        "broker 1 drained after {drain_took:?}: {}",
        describe_line(&drained)
    ));
    // Broker 1 is no longer a meta voter; broker 4 replaced it.
    let voters = wait_cluster(&admin, Duration::from_secs(20), |c| {
        let v: Vec<u64> = c
            .brokers
            .iter()
            .filter(|b| b.meta_voter)
            .map(|b| b.id)
            .collect();
        if v == [2, 3, 4] {
            Ok(())
        } else {
            Err(format!("meta voters {v:?}"))
        }
    })
    .await
    .unwrap_or_else(|e| panic!("meta voters not replaced: {e}"));
    // Every queue's replicas are on 2, 3 and 4.
    let t = admin.describe_topic(TOPIC).await.unwrap();
    for q in &t.queues {
        let mut r = q.replicas.clone();
        r.sort();
        assert_eq!(r, vec![2, 3, 4], "queue {}: {q:?}", q.queue);
    }

    // Remove broker 1, then kill its process. describe_cluster counts only
    // a queue's target replicas, so "R0" can come before the moves are
    // done; retry (bounded) and report it if the first try was refused.
    let remove_at = Instant::now();
    let mut early_refusals: Vec<String> = Vec::new();
    let v = loop {
        let o = cluster
            .cli(&["--json", "cluster", "remove-broker", "1"])
            .await;
        if o.ok() {
            break json_ok("remove-broker 1", &o);
        }
        let code = json_error("remove-broker 1", &o);
        assert_eq!(code, "invalid_argument", "remove-broker 1: {o:?}");
        if early_refusals.is_empty() {
            cluster.say(format!(
                "!!! remove-broker 1 refused although describe showed it drained: {}",
                o.stderr.trim()
            ));
        }
        early_refusals.push(o.stderr.trim().to_string());
        assert!(
            remove_at.elapsed() < DRAIN,
            "remove-broker 1 still refused {DRAIN:?} after describe showed it drained: {o:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let remove_waited = remove_at.elapsed();
    cluster.say(format!(
        "remove-broker 1: {v} (after {} refusal(s), {remove_waited:.1?})",
        early_refusals.len()
    ));
    let removed = wait_cluster(&admin, Duration::from_secs(20), |c| {
        let ids: Vec<u64> = c.brokers.iter().map(|b| b.id).collect();
        if ids == [2, 3, 4] {
            Ok(())
        } else {
            Err(format!("brokers {ids:?}"))
        }
    })
    .await
    .unwrap_or_else(|e| panic!("broker 1 still listed after remove-broker: {e}"));
    cluster.say(format!(
        "broker 1 removed: {}; SIGKILL pid {:?}",
        describe_line(&removed),
        cluster.pid(1)
    ));
    cluster.kill_broker(1);
    let killed_at = Instant::now();
    // Three active brokers and RF 3: no more drains.
    let o = cluster.cli(&["--json", "cluster", "drain", "3"]).await;
    let drain3_code = json_error("drain 3 with 3 brokers left", &o);
    assert_eq!(drain3_code, "invalid_argument", "{o:?}");

    // Writes go on without broker 1, on every queue.
    let after_kill = producer
        .wait_acks_on(
            killed_at,
            &(0..QUEUES).collect::<Vec<_>>(),
            Duration::from_secs(20),
        )
        .await
        .unwrap_or_else(|e| panic!("writes stalled after broker 1 was killed: {e}"));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let final_view = wait_cluster(&admin, Duration::from_secs(30), balanced(3))
        .await
        .unwrap_or_else(|e| panic!("not balanced over brokers 2-4: {e}"));
    for b in &final_view.brokers {
        assert_eq!(b.replica_count, QUEUES, "{}", describe_line(&final_view));
    }

    // Stop, consume everything, read everything.
    let log = producer.finish().await;
    let acked: HashSet<String> = log.acked.keys().cloned().collect();
    let missing = consumer.wait_consumed(&acked, CONSUME).await;
    let clog = consumer.finish().await;
    let views = monitor.finish().await;
    eprintln!("[membership] cluster views (describe) over time:");
    Monitor::print("membership", &views);
    let stored = read_all(&client, TOPIC, QUEUES)
        .await
        .expect("full read of the topic");
    let failures = audit(&[&log], &stored, Some(&clog));
    let (retries, kinds) = sdk_retries();
    let redelivered = clog.deliveries.len() - clog.seen.len();
    println!(
        "membership summary: join={join_took:.1?} drain={drain_took:.1?} first_write_per_queue_after_kill={after_kill:.1?} \
         meta_voters={} remove_busy_broker_error={remove_code} remove_refused_after_describe_said_drained={} (for {remove_waited:.1?}) \
         produced={} acked={} send_errors={} dedup_receipts={} max_send_latency={:.1?} consumed={} unconsumed={missing} \
         redelivered={redelivered} receive_errors={} ack_errors={} ack_failures={:?} sdk_retries={retries} {kinds:?} \
         stored={} audit_failures={}",
        describe_line(&voters),
        early_refusals.len(),
        log.attempted.len(),
        log.acked.len(),
        log.errors.len(),
        log.duplicates(),
        log.max_latency,
        clog.seen.len(),
        clog.receive_errors.len(),
        clog.ack_errors.len(),
        clog.ack_failures,
        stored.len(),
        failures.len(),
    );
    assert!(!log.acked.is_empty(), "nothing acknowledged");
    assert_eq!(
        log.errors.len(),
        0,
        "send errors after retries: {:?}",
        log.errors
    );
    assert_eq!(
        clog.receive_errors.len(),
        0,
        "receive errors after retries: {:?}",
        clog.receive_errors
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Last, so the rest of the flow is checked first: once describe shows a
    // draining broker with no replicas and no leaderships, remove-broker
    // must succeed (the SDK and CLI docs promise it).
    assert!(
        early_refusals.is_empty(),
        "describe_cluster showed broker 1 drained (replica_count 0, leader_count 0) {remove_waited:.1?} \
         before remove-broker 1 was accepted; it was refused {} time(s), first: {}",
        early_refusals.len(),
        early_refusals[0]
    );
}
