//! The first hour with Petrel, as a new user or operator meets it: three
//! `petrel-broker`s and a `petrel-proxy` started by hand with their default
//! log settings, logs written to files (as under systemd or Kubernetes),
//! a topic created from its name alone, and a clean shutdown. Every
//! process is killed by PID at the end.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

mod common;

use common::{broker_command, broker_list, free_port, peers_arg, proxy_command, wait_ready, Procs};

const READY: Duration = Duration::from_secs(60);
const STOP: Duration = Duration::from_secs(30);

/// Sends the command's stderr (the log) to `file`, as a service manager
/// would: not a terminal, and no NO_COLOR hint.
fn log_to_file(cmd: &mut std::process::Command, file: &Path) {
    let f = std::fs::File::create(file).unwrap();
    cmd.env_remove("PETREL_LOG")
        .env_remove("NO_COLOR")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(f);
}

/// SIGTERM every process, then wait for each to exit cleanly.
fn stop_all(procs: &mut Procs, n: usize) {
    for i in 0..n {
        assert!(procs.sigterm(i), "SIGTERM to process {i}");
    }
    let deadline = Instant::now() + STOP;
    let mut left: Vec<usize> = (0..n).collect();
    while !left.is_empty() {
        assert!(
            Instant::now() < deadline,
            "processes {left:?} did not stop on SIGTERM"
        );
        left.retain(|&i| match procs.try_reap(i) {
            Some(status) => {
                assert!(status.success(), "process {i} exited with {status}");
                false
            }
            None => true,
        });
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_cluster_starts_and_stops_without_a_warning_in_its_logs() {
    let dir = tempfile::tempdir().unwrap();
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let peers = peers_arg(&ports);
    let mut procs = Procs::default();
    let mut logs = Vec::new();
    // The proxy first, so it is up (and retrying) before any broker is:
    // that too must not be a warning on a cluster that is just starting.
    // As in production: users, not anonymous access (which the proxy
    // rightly warns about).
    let users = dir.path().join("users.toml");
    let users = users.to_str().unwrap();
    let secret = common::add_user(users, "ops");
    common::petrel(&[
        "acl",
        "add",
        "--auth-file",
        users,
        "--user",
        "ops",
        "--resource",
        "*",
        "--actions",
        "*",
    ]);
    let port = free_port();
    let mut proxy = proxy_command(port, &broker_list(&ports));
    proxy
        .env_remove("PETREL_ALLOW_ANONYMOUS")
        .args(["--auth-file", users]);
    let proxy_log = dir.path().join("proxy.log");
    log_to_file(&mut proxy, &proxy_log);
    procs.push(proxy.spawn().unwrap());
    logs.push(proxy_log);
    for (i, p) in ports.iter().enumerate() {
        // Broker 3 logs JSON lines, the others text.
        let extra: &[&str] = if i == 2 {
            &["--log-format", "json"]
        } else {
            &[]
        };
        let mut b = broker_command(i + 1, *p, &peers, dir.path(), extra);
        let log = dir.path().join(format!("broker-{}.log", i + 1));
        log_to_file(&mut b, &log);
        procs.push(b.spawn().unwrap());
        logs.push(log);
        // Brokers of a real cluster come up a little apart.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let client = common::client(port, Some(("ops", &secret)));
    wait_ready(&client.admin(), 3, READY).await;

    // A topic from its name alone: 8 queues, min(3, brokers) replicas.
    let endpoint = format!("127.0.0.1:{port}");
    std::env::set_var("PETREL_ACCESS_KEY", "ops");
    std::env::set_var("PETREL_SECRET_KEY", &secret);
    let out = common::petrel(&[
        "--endpoint",
        &endpoint,
        "--json",
        "topic",
        "create",
        "hello",
    ]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["queue_count"], 8, "{out}");
    assert_eq!(v["replication_factor"], 3, "{out}");
    let text = common::petrel(&["--endpoint", &endpoint, "topic", "create", "hello2"]);
    assert!(text.contains("replicas: the default, 3"), "{text}");
    let ids = common::petrel(&[
        "--endpoint",
        &endpoint,
        "produce",
        "--topic",
        "hello",
        "--count",
        "50",
    ]);
    assert_eq!(ids.lines().count(), 50);
    let got = common::petrel(&[
        "--endpoint",
        &endpoint,
        "--json",
        "consume",
        "--topic",
        "hello",
        "--group",
        "g",
        "--max",
        "50",
        "--wait-ms",
        "3000",
    ]);
    assert_eq!(got.lines().count(), 50);
    drop(client);

    // Proxy first, then the brokers, as an operator stops a cluster.
    stop_all(&mut procs, 4);

    for log in &logs {
        let text = std::fs::read_to_string(log).unwrap();
        assert!(!text.trim().is_empty(), "{}: nothing logged", log.display());
        assert!(
            !text.contains('\x1b'),
            "{}: colour codes in a log file:\n{text}",
            log.display()
        );
        let json = log.ends_with("broker-3.log");
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let level = if json {
                let v: serde_json::Value = serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("{}: not a JSON line ({e}): {line}", log.display()));
                assert!(v["fields"]["message"].is_string(), "{line}");
                v["level"].as_str().unwrap_or_default().to_string()
            } else {
                line.split_whitespace()
                    .nth(1)
                    .unwrap_or_default()
                    .to_string()
            };
            assert!(
                level != "WARN" && level != "ERROR",
                "{}: a healthy start and stop logged:\n{line}\n--- whole log:\n{text}",
                log.display()
            );
        }
    }
}
