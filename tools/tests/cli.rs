//! The `petrel` binary as a user drives it: `petrel dev` as a real process,
//! admin and data commands with `--json` parsed here, a whole-cluster
//! SIGKILL and restart on the same data that loses no acknowledged record
//! and redelivers no acked one, and on-disk corruption reported as such.

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

mod common;

/// A fresh dev cluster elects its leaders within this.
const READY: Duration = Duration::from_secs(60);
/// A graceful stop finishes within this.
const STOP: Duration = Duration::from_secs(30);

fn petrel() -> &'static str {
    env!("CARGO_BIN_EXE_petrel")
}

/// A base port with the next three free and reserved as well (the
/// brokers of `petrel dev` use port + i).
fn free_port_block() -> u16 {
    common::free_port_block(4)
}

/// `petrel dev` running as a child process; killed by PID on drop.
struct Dev {
    child: Option<Child>,
    port: u16,
    log: std::path::PathBuf,
}

impl Dev {
    fn start(dir: &Path, port: u16) -> Dev {
        // The cluster's own log goes next to its data, so a failure can show
        // what the processes said (appended across restarts on one dir).
        let log = dir.join("dev-stderr.log");
        let err = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("open dev log");
        let mut child = Command::new(petrel())
            .args(["--json", "dev", "--port", &port.to_string(), "--data-dir"])
            .arg(dir)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .expect("spawn petrel dev");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        let dev = Dev {
            child: Some(child),
            port,
            log,
        };
        let line = rx
            .recv_timeout(READY)
            .expect("petrel dev did not become ready");
        let v: Value = serde_json::from_str(&line).expect("ready line is JSON");
        assert_eq!(v["event"], "ready");
        assert_eq!(v["endpoint"], format!("127.0.0.1:{port}"));
        dev
    }

    fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn run(&self, args: &[&str]) -> Output {
        self.run_stdin(args, None)
    }

    fn run_stdin(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut c = Command::new(petrel())
            .arg("--endpoint")
            .arg(self.endpoint())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = c.stdin.take().unwrap();
        if let Some(s) = stdin {
            input.write_all(s.as_bytes()).unwrap();
        }
        drop(input);
        c.wait_with_output().unwrap()
    }

    /// Runs a command that must succeed; returns its JSON lines.
    fn json(&self, args: &[&str]) -> Vec<Value> {
        let mut full = vec!["--json"];
        full.extend_from_slice(args);
        let o = self.run(&full);
        assert!(
            o.status.success(),
            "petrel {args:?} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
            .collect()
    }

    fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .args([sig, &c.id().to_string()])
                .status();
        }
    }

    /// SIGKILL: the whole cluster dies at once, mid-whatever.
    fn kill9(mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    fn stop(mut self) {
        self.signal("-TERM");
        let mut c = self.child.take().unwrap();
        let deadline = std::time::Instant::now() + STOP;
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                if !st.success() {
                    let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(40).collect();
                    let tail: Vec<&str> = tail.into_iter().rev().collect();
                    panic!(
                        "petrel dev exited with {st}; its log ends:\n{}",
                        tail.join("\n")
                    );
                }
                return;
            }
            if std::time::Instant::now() > deadline {
                let _ = c.kill();
                panic!("petrel dev did not stop on SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn fails_with(o: &Output, needle: &str) {
    assert!(!o.status.success(), "expected failure");
    let err = String::from_utf8_lossy(&o.stderr);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "one line on stderr, got {err:?}");
    assert!(lines[0].starts_with("error:"), "{err}");
    assert!(
        err.to_lowercase().contains(needle),
        "expected {needle:?} in {err:?}"
    );
    assert!(!err.contains("panicked"));
}

fn ids(v: &[Value]) -> Vec<String> {
    v.iter()
        .map(|x| x["id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn cli_produces_and_consumes_with_json_output() {
    const N: usize = 20_000;
    let dir = tempfile::tempdir().unwrap();
    let dev = Dev::start(dir.path(), free_port_block());

    let t = dev.json(&["topic", "create", "cli", "--queues", "8", "--replicas", "3"]);
    assert_eq!(t.len(), 1);
    assert_eq!(t[0]["queues"].as_array().unwrap().len(), 8);
    let produced = dev.json(&[
        "produce",
        "--topic",
        "cli",
        "--count",
        &N.to_string(),
        "--size",
        "64",
    ]);
    assert_eq!(produced.len(), N);
    let o = dev.run_stdin(
        &[
            "--json", "produce", "--topic", "cli", "--key", "k1", "--tag", "TagA",
        ],
        Some("first line\nsecond line\n\u{e9}t\u{e9}\n"),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let from_stdin: Vec<Value> = String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(from_stdin.len(), 3);
    // Lines are stored in the order given (one key: one queue, rising
    // offsets), however the producer batches them.
    dev.json(&[
        "topic",
        "create",
        "lines",
        "--queues",
        "4",
        "--replicas",
        "3",
    ]);
    let lines: String = (0..300).map(|i| format!("line {i}\n")).collect();
    let o = dev.run_stdin(
        &["--json", "produce", "--topic", "lines", "--key", "k"],
        Some(&lines),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stored: Vec<(u64, u64)> = String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (v["queue"].as_u64().unwrap(), v["offset"].as_u64().unwrap())
        })
        .collect();
    assert_eq!(stored.len(), 300);
    assert!(
        stored
            .windows(2)
            .all(|w| w[0].0 == w[1].0 && w[0].1 < w[1].1),
        "stdin lines stored out of order: {stored:?}"
    );
    let all: HashSet<String> = ids(&produced).into_iter().chain(ids(&from_stdin)).collect();
    assert_eq!(all.len(), N + 3);
    for p in &produced {
        let id = p["id"].as_str().unwrap();
        assert_eq!(id, format!("cli/{}/{}", p["queue"], p["offset"]));
    }

    for group in ["g1", "g2"] {
        let got = dev.json(&[
            "consume",
            "--topic",
            "cli",
            "--group",
            group,
            "--max",
            &(N + 3).to_string(),
            "--wait-ms",
            "5000",
        ]);
        assert_eq!(got.len(), N + 3, "group {group}");
        let got_ids: HashSet<String> = ids(&got).into_iter().collect();
        assert_eq!(got_ids, all, "group {group}: each record exactly once");
        let mut last: BTreeMap<u64, u64> = BTreeMap::new();
        for r in &got {
            let (q, off) = (r["queue"].as_u64().unwrap(), r["offset"].as_u64().unwrap());
            if let Some(prev) = last.insert(q, off) {
                assert!(off > prev, "queue {q} out of order");
            }
            assert_eq!(r["attempt"], 1);
            assert_eq!(r["body_encoding"], "utf8");
        }
        let keyed: Vec<&Value> = got.iter().filter(|r| r["key"] == "k1").collect();
        assert_eq!(keyed.len(), 3);
        assert!(keyed.iter().all(|r| r["tag"] == "TagA"));
        let bodies: HashSet<&str> = keyed.iter().map(|r| r["body"].as_str().unwrap()).collect();
        assert!(bodies.contains("\u{e9}t\u{e9}"));
    }

    // Nothing more for this group; the consume ends after --wait-ms.
    let none = dev.json(&[
        "consume",
        "--topic",
        "cli",
        "--group",
        "g1",
        "--wait-ms",
        "500",
    ]);
    assert!(none.is_empty());

    let g = dev.json(&["group", "describe", "g1"]);
    assert_eq!(g.len(), 8);
    assert!(g.iter().all(|q| q["lag"] == 0));
    let groups = dev.json(&["group", "list"]);
    assert!(groups.iter().any(|x| x["group"] == "g1"));

    // Errors: one line on stderr, non-zero exit, cluster keeps serving.
    fails_with(
        &dev.run(&[
            "topic",
            "create",
            "bad/name",
            "--queues",
            "1",
            "--replicas",
            "1",
        ]),
        "invalid",
    );
    fails_with(
        &dev.run(&["topic", "create", "z", "--queues", "0", "--replicas", "1"]),
        "invalid",
    );
    fails_with(
        &dev.run(&["topic", "create", "z", "--queues", "1", "--replicas", "4"]),
        "invalid",
    );
    fails_with(
        &dev.run(&[
            "consume",
            "--topic",
            "nope",
            "--group",
            "g",
            "--wait-ms",
            "100",
        ]),
        "not found",
    );
    fails_with(
        &dev.run(&[
            "read", "--topic", "cli", "--queue", "0", "--offset", "100000",
        ]),
        "out of range",
    );
    // With --json the one stderr line is a JSON object with a stable code.
    let o = dev.run(&["--json", "topic", "describe", "missing"]);
    assert!(!o.status.success());
    let err = String::from_utf8(o.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    let v: Value = serde_json::from_str(err.trim()).unwrap();
    assert_eq!(v["error"]["code"], "not_found");
    let more = dev.json(&["produce", "--topic", "cli", "--count", "1", "--size", "8"]);
    assert_eq!(more.len(), 1);
    dev.stop();
}

#[test]
fn acked_records_survive_sigkill_of_the_whole_cluster_and_acked_ones_stay_acked() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port_block();
    let dev = Dev::start(dir.path(), port);
    dev.json(&[
        "topic",
        "create",
        "durable",
        "--queues",
        "4",
        "--replicas",
        "3",
    ]);
    let produced: HashSet<String> = ids(&dev.json(&[
        "produce", "--topic", "durable", "--count", "200", "--size", "100",
    ]))
    .into_iter()
    .collect();
    assert_eq!(produced.len(), 200);
    let first: HashSet<String> = ids(&dev.json(&[
        "consume",
        "--topic",
        "durable",
        "--group",
        "g",
        "--max",
        "80",
        "--wait-ms",
        "5000",
    ]))
    .into_iter()
    .collect();
    assert_eq!(first.len(), 80);
    dev.kill9();

    let dev = Dev::start(dir.path(), port);
    let rest = dev.json(&[
        "consume",
        "--topic",
        "durable",
        "--group",
        "g",
        "--max",
        "200",
        "--wait-ms",
        "3000",
    ]);
    let rest_ids: HashSet<String> = ids(&rest).into_iter().collect();
    assert_eq!(rest.len(), 120, "exactly the unacked remainder");
    assert!(
        rest_ids.is_disjoint(&first),
        "an acked record was redelivered"
    );
    let union: HashSet<String> = first.union(&rest_ids).cloned().collect();
    assert_eq!(union, produced, "every acknowledged record is still there");
    // A second group still sees all 200.
    let other = dev.json(&[
        "consume",
        "--topic",
        "durable",
        "--group",
        "g2",
        "--max",
        "200",
        "--wait-ms",
        "3000",
    ]);
    assert_eq!(other.len(), 200);
    dev.stop();
}

#[test]
fn record_with_flipped_bytes_on_disk_is_reported_corrupt_not_served() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port_block();
    let dev = Dev::start(dir.path(), port);
    let t = dev.json(&[
        "topic",
        "create",
        "fragile",
        "--queues",
        "1",
        "--replicas",
        "3",
    ]);
    let group_id = t[0]["queues"][0]["group_id"]
        .as_u64()
        .expect("group_id in topic JSON");
    let produced = dev.json(&[
        "produce", "--topic", "fragile", "--count", "5", "--size", "50",
    ]);
    assert_eq!(produced.len(), 5);
    // An ack means a quorum stored the records; the third replica learns
    // the commit index with the next heartbeat (500 ms) and only then
    // applies them to its records column family, which this test reads.
    // A database can only be read stopped: stop, and if a broker lacks a
    // record, run the cluster again (its new leader commits, and so the
    // straggler applies) until every broker holds all five.
    let mut dev = dev;
    let deadline = std::time::Instant::now() + READY;
    loop {
        dev.stop();
        let lacking: Vec<u64> = (1..=3)
            .filter(|b| {
                let bdir = dir.path().join(format!("broker-{b}"));
                petrel_broker::storage::stored_offsets_for_test(&bdir, group_id)
                    .unwrap()
                    .len()
                    < 5
            })
            .collect();
        if lacking.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "brokers {lacking:?} never applied the five records"
        );
        dev = Dev::start(dir.path(), port);
    }

    for b in 1..=3 {
        let bdir = dir.path().join(format!("broker-{b}"));
        let flipped = petrel_broker::storage::corrupt_record_for_test(&bdir, group_id, 2).unwrap();
        assert!(flipped, "broker {b} has offset 2 on disk");
    }

    let dev = Dev::start(dir.path(), port);
    let ok = dev.json(&[
        "read", "--topic", "fragile", "--queue", "0", "--offset", "0", "--max", "2",
    ]);
    assert_eq!(ok.len(), 2);
    fails_with(
        &dev.run(&[
            "read", "--topic", "fragile", "--queue", "0", "--offset", "0", "--max", "10",
        ]),
        "corrupt",
    );
    fails_with(
        &dev.run(&[
            "read", "--topic", "fragile", "--queue", "0", "--offset", "2", "--max", "1",
        ]),
        "corrupt",
    );
    // The queue is not poisoned: later records read fine and writes go on.
    let later = dev.json(&[
        "read", "--topic", "fragile", "--queue", "0", "--offset", "3", "--max", "10",
    ]);
    assert_eq!(later.len(), 2);
    assert_eq!(
        dev.json(&["produce", "--topic", "fragile", "--count", "1", "--size", "8"])
            .len(),
        1
    );
    dev.stop();
}

#[test]
fn group_reset_moves_a_group_to_earliest_latest_an_offset_or_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Dev::start(dir.path(), free_port_block());
    dev.json(&["topic", "create", "rs", "--queues", "1", "--replicas", "3"]);
    let produce = |n: &str| dev.json(&["produce", "--topic", "rs", "--count", n]);
    assert_eq!(produce("5").len(), 5);
    std::thread::sleep(Duration::from_millis(1200));
    let between = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    std::thread::sleep(Duration::from_millis(1200));
    let later = produce("5");
    let consume = |wait: &str| {
        dev.json(&[
            "consume",
            "--topic",
            "rs",
            "--group",
            "g",
            "--max",
            "100",
            "--wait-ms",
            wait,
        ])
    };
    assert_eq!(consume("2000").len(), 10);
    let reset = |args: &[&str]| {
        let mut full = vec!["group", "reset", "g", "--topic", "rs"];
        full.extend_from_slice(args);
        dev.json(&full)
    };
    // To a time: exactly the records stored after it come again.
    let r = reset(&["--to-time", &between.to_string()]);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0]["offset"], 5);
    assert_eq!(ids(&consume("2000")), ids(&later));
    // RFC 3339 works too (1970 is before everything: offset 0).
    assert_eq!(
        reset(&["--to-time", "1970-01-01T00:00:00Z"])[0]["offset"],
        0
    );
    assert_eq!(consume("2000").len(), 10);
    // Earliest, an offset, latest.
    assert_eq!(reset(&["--to", "earliest"])[0]["offset"], 0);
    assert_eq!(reset(&["--to", "3"])[0]["offset"], 3);
    assert_eq!(consume("2000").len(), 7);
    assert_eq!(reset(&["--to", "latest"])[0]["offset"], 10);
    assert_eq!(consume("500").len(), 0);
    // Bad input: typed errors, one line each, nothing moved.
    let o = dev.run(&["group", "reset", "g", "--topic", "rs", "--to", "soon"]);
    fails_with(&o, "earliest, latest or an offset");
    assert_eq!(o.status.code(), Some(2));
    let o = dev.run(&[
        "group",
        "reset",
        "g",
        "--topic",
        "rs",
        "--to-time",
        "yesterday",
    ]);
    fails_with(&o, "rfc 3339");
    let o = dev.run(&["group", "reset", "g", "--topic", "rs", "--to", "99"]);
    fails_with(&o, "past the end");
    let o = dev.run(&["group", "reset", "g", "--topic", "nope", "--to", "earliest"]);
    fails_with(&o, "not found");
    assert_eq!(consume("500").len(), 0);
    dev.stop();
}

#[test]
fn message_lookup_by_id_and_key_shows_delivery_state_per_group() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Dev::start(dir.path(), free_port_block());
    dev.json(&["topic", "create", "lk", "--queues", "2", "--replicas", "3"]);
    let a = dev.json(&[
        "produce", "--topic", "lk", "--count", "3", "--key", "order-1",
    ]);
    dev.json(&[
        "produce", "--topic", "lk", "--count", "2", "--key", "order-2",
    ]);
    // Group g takes the first order-1 record and holds it (no ack).
    let got = dev.json(&[
        "consume",
        "--topic",
        "lk",
        "--group",
        "g",
        "--max",
        "1",
        "--wait-ms",
        "2000",
        "--no-ack",
    ]);
    assert_eq!(got.len(), 1);
    let found = dev.json(&["message", "find", "--topic", "lk", "--key", "order-1"]);
    assert_eq!(ids(&found), ids(&a), "every order-1 record, oldest first");
    assert!(found.iter().all(|r| r["key"] == "order-1"));
    assert!(dev
        .json(&["message", "find", "--topic", "lk", "--key", "nope"])
        .is_empty());

    let leased = got[0]["id"].as_str().unwrap();
    let m = dev.json(&["message", "get", leased]);
    assert_eq!(m.len(), 1);
    assert_eq!(m[0]["id"], leased);
    assert_eq!(m[0]["hold"], "");
    let d = &m[0]["deliveries"];
    assert_eq!(d[0]["group"], "g");
    assert_eq!(d[0]["state"], "leased", "{m:?}");
    assert_eq!(d[0]["attempt"], 1);
    // Plain output names the same.
    let plain = String::from_utf8(dev.run(&["message", "get", leased]).stdout).unwrap();
    assert!(
        plain.contains("leased") && plain.contains("key:        order-1"),
        "{plain}"
    );

    fails_with(&dev.run(&["message", "get", "lk/0/999999"]), "not stored");
    fails_with(
        &dev.run(&["message", "get", "garbage"]),
        "malformed message id",
    );
    fails_with(
        &dev.run(&["message", "get", "lk/7/0"]),
        "queue 7 does not exist",
    );
    dev.stop();
}

#[test]
fn cli_speaks_message_types_filters_and_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Dev::start(dir.path(), free_port_block());
    dev.json(&[
        "topic",
        "create",
        "plain",
        "--queues",
        "1",
        "--replicas",
        "3",
    ]);
    dev.json(&[
        "topic",
        "create",
        "ord",
        "--queues",
        "2",
        "--replicas",
        "3",
        "--type",
        "fifo",
    ]);
    fails_with(
        &dev.run(&[
            "produce",
            "--topic",
            "plain",
            "--count",
            "1",
            "--message-group",
            "g",
        ]),
        "wrong message type",
    );
    fails_with(
        &dev.run(&["produce", "--topic", "ord", "--count", "1"]),
        "needs a message group",
    );
    let sent = dev.json(&[
        "produce",
        "--topic",
        "ord",
        "--count",
        "3",
        "--message-group",
        "g1",
    ]);
    assert_eq!(sent.len(), 3);
    let got = dev.json(&[
        "consume",
        "--topic",
        "ord",
        "--group",
        "c",
        "--max",
        "3",
        "--wait-ms",
        "2000",
    ]);
    assert_eq!(ids(&got), ids(&sent), "FIFO order");
    assert!(got.iter().all(|r| r["message_group"] == "g1"));

    // Filters.
    dev.json(&["produce", "--topic", "plain", "--count", "2", "--tag", "A"]);
    dev.json(&[
        "produce",
        "--topic",
        "plain",
        "--count",
        "2",
        "--tag",
        "B",
        "--property",
        "n=5",
    ]);
    let b = dev.json(&[
        "consume",
        "--topic",
        "plain",
        "--group",
        "fb",
        "--filter-sql",
        "n >= 5",
        "--wait-ms",
        "1500",
    ]);
    assert_eq!(b.len(), 2);
    assert!(b.iter().all(|r| r["tag"] == "B"));
    fails_with(
        &dev.run(&[
            "consume",
            "--topic",
            "plain",
            "--group",
            "x",
            "--filter-sql",
            "n >>",
            "--wait-ms",
            "500",
        ]),
        "position",
    );

    // A consumer that nacks everything: after --max-attempts the record is
    // in GROUP.dlq and group describe counts it.
    dev.json(&["topic", "create", "dl", "--queues", "1", "--replicas", "3"]);
    dev.json(&["produce", "--topic", "dl", "--count", "1"]);
    let mut tries = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let got = dev.json(&[
            "consume",
            "--topic",
            "dl",
            "--group",
            "w",
            "--max-attempts",
            "2",
            "--nack",
            "boom",
            "--wait-ms",
            "1500",
        ]);
        tries += got.len();
        let d = dev.json(&["group", "describe", "w"]);
        if d.iter().any(|q| q["dead_lettered"] == 1) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not dead-lettered: {d:?}"
        );
    }
    assert_eq!(tries, 2, "delivered exactly max-attempts times");
    let dead = dev.json(&[
        "consume",
        "--topic",
        "w.dlq",
        "--group",
        "audit",
        "--max",
        "1",
        "--wait-ms",
        "3000",
    ]);
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["properties"]["petrel.dlq.attempts"], "2");
    assert!(dead[0]["properties"]["petrel.dlq.reason"]
        .as_str()
        .unwrap()
        .contains("boom"));
    dev.stop();
}

#[test]
fn top_reports_produce_and_consume_rates_lag_and_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Dev::start(dir.path(), free_port_block());
    dev.json(&["topic", "create", "tp", "--queues", "1", "--replicas", "3"]);
    dev.json(&["produce", "--topic", "tp", "--count", "5"]);
    dev.json(&[
        "consume",
        "--topic",
        "tp",
        "--group",
        "tg",
        "--max",
        "2",
        "--wait-ms",
        "2000",
    ]);
    let rows = dev.json(&["top", "--interval-ms", "300", "--iterations", "2"]);
    assert_eq!(rows.len(), 2, "one JSON line per refresh");
    let row = |list: &str, key: &str, name: &str| -> Value {
        rows[1][list]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x[key] == name)
            .unwrap_or_else(|| panic!("{list} has no {name}: {:?}", rows[1]))
            .clone()
    };
    assert_eq!(row("topics", "topic", "tp")["end_offset"], 5);
    let g = row("groups", "group", "tg");
    assert_eq!(g["topic"], "tp");
    assert_eq!(g["lag"], 3);
    assert!(
        g["lag_ms"].as_u64().is_some_and(|ms| ms > 0),
        "lag in time of 3 waiting records: {g}"
    );
    assert_eq!(g["dead_lettered"], 0);
    assert!(g["consume_per_sec"].as_f64().is_some());
    dev.stop();
}

/// A command line clap rejects is one stderr line like any other failure
/// (JSON with `--json`), exit 2; help still prints whole.
#[test]
fn usage_errors_are_one_line_and_help_is_whole() {
    let run = |args: &[&str]| {
        std::process::Command::new(petrel())
            .args(args)
            .output()
            .unwrap()
    };
    for args in [
        &["top", "--iterations", "0"][..],
        &["bogus-command"][..],
        &["topic", "create"][..],
        &["consume", "--topic", "t", "--group", "g", "--max", "lots"][..],
    ] {
        let o = run(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {o:?}");
        fails_with(&o, "");
        assert!(o.stdout.is_empty(), "{args:?}: {o:?}");
        let mut j = vec!["--json"];
        j.extend_from_slice(args);
        let o = run(&j);
        assert_eq!(o.status.code(), Some(2), "{j:?}: {o:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(err.lines().count(), 1, "{j:?}: {err}");
        let v: Value = serde_json::from_str(err.trim()).unwrap();
        assert_eq!(v["error"]["code"], "usage", "{err}");
        assert!(v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }
    let help = run(&["topic", "--help"]);
    assert!(help.status.success());
    assert!(String::from_utf8_lossy(&help.stdout).lines().count() > 3);

    // One line, with its substance: what is missing or wrong, and the
    // usage line.
    let o = run(&["produce", "--count", "3"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--topic <TOPIC>"), "{err}");
    assert!(err.contains("Usage: petrel produce"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    let o = run(&["consume", "--topic", "t"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--group <GROUP>"), "{err}");
    let o = run(&["topic", "create", "x", "--queues", "many"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("'many'") && err.contains("--queues"), "{err}");
    let o = run(&["--json", "topic", "delete"]);
    let v: Value = serde_json::from_str(String::from_utf8_lossy(&o.stderr).trim()).unwrap();
    assert!(
        v["error"]["message"].as_str().unwrap().contains("<NAME>"),
        "{v}"
    );
    assert!(
        v["error"]["usage"]
            .as_str()
            .unwrap()
            .starts_with("Usage: petrel topic delete"),
        "{v}"
    );
    // `topic create` needs nothing but a name; its defaults are in --help.
    let help = String::from_utf8(run(&["topic", "create", "--help"]).stdout).unwrap();
    assert!(help.contains("[default: 8]"), "{help}");
    assert!(help.contains("[default: 3, or"), "{help}");
}

#[test]
fn shell_completions_for_bash_zsh_and_fish() {
    for (shell, marker, flag) in [
        ("bash", "_petrel()", "--topic"),
        ("zsh", "#compdef petrel", "--topic"),
        ("fish", "complete -c petrel", "-l topic"),
    ] {
        let o = Command::new(petrel())
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(o.status.success(), "{shell}: {o:?}");
        let script = String::from_utf8(o.stdout).unwrap();
        assert!(script.contains(marker), "{shell}: no {marker:?}");
        // Subcommands and their flags are in it.
        assert!(
            script.contains("produce") && script.contains(flag),
            "{shell}"
        );
    }
    let o = Command::new(petrel())
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("bash"));
    // bash accepts what it printed.
    let o = Command::new("bash")
        .args(["-n", "-c"])
        .arg(
            String::from_utf8(
                Command::new(petrel())
                    .args(["completions", "bash"])
                    .output()
                    .unwrap()
                    .stdout,
            )
            .unwrap(),
        )
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// Errors a new user meets before anything works: nothing listening, a
/// broker's port instead of a proxy's, a timeout. Each names the problem.
#[test]
fn wrong_endpoints_and_timeouts_say_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port_block();
    let dev = Dev::start(dir.path(), port);
    // A broker's port (petrel dev puts its brokers after the proxy's).
    let broker = format!("127.0.0.1:{}", port + 1);
    let o = Command::new(petrel())
        .args(["--endpoint", &broker, "--timeout", "5s", "topic", "list"])
        .output()
        .unwrap();
    fails_with(&o, "petrel proxy");
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(err.contains("broker"), "{err}");
    // Nothing listening.
    let closed = common::free_port();
    let o = Command::new(petrel())
        .args([
            "--endpoint",
            &format!("127.0.0.1:{closed}"),
            "--timeout",
            "2s",
            "topic",
            "list",
        ])
        .output()
        .unwrap();
    fails_with(&o, &format!("127.0.0.1:{closed}"));
    let err = String::from_utf8_lossy(&o.stderr).to_lowercase();
    assert!(
        err.contains("nothing is listening") || err.contains("refused"),
        "{err}"
    );
    // A server that is not gRPC at all (a plain TCP listener that closes).
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let odd = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in l.incoming().take(20) {
            drop(c);
        }
    });
    let o = Command::new(petrel())
        .args([
            "--endpoint",
            &format!("127.0.0.1:{odd}"),
            "--timeout",
            "2s",
            "topic",
            "list",
        ])
        .output()
        .unwrap();
    fails_with(&o, &format!("127.0.0.1:{odd}"));
    // No error message is empty, whatever the failure.
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.trim_end().ends_with(':'), "{err}");
    dev.stop();

    // A proxy whose brokers are not up: "not ready", not an empty topic
    // list or "topic does not exist".
    let proxy_port = free_port_block();
    let mut proxy = Command::new(std::path::Path::new(petrel()).with_file_name("petrel-proxy"))
        .args([
            "--listen",
            &format!("127.0.0.1:{proxy_port}"),
            "--brokers",
            &format!("127.0.0.1:{}", proxy_port + 1),
            "--receipt-secret",
            "0123456789abcdef0123",
            "--allow-anonymous",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let endpoint = format!("127.0.0.1:{proxy_port}");
    let mut last = None;
    for _ in 0..50 {
        let o = Command::new(petrel())
            .args(["--endpoint", &endpoint, "--timeout", "2s", "topic", "list"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        if err.contains("not ready") {
            last = None;
            fails_with(&o, "has not reached any broker");
            let o = Command::new(petrel())
                .args([
                    "--endpoint",
                    &endpoint,
                    "--timeout",
                    "2s",
                    "produce",
                    "--topic",
                    "t",
                    "--count",
                    "1",
                ])
                .output()
                .unwrap();
            fails_with(&o, "not ready");
            break;
        }
        // The proxy may still be starting (connection refused).
        last = Some(err);
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = proxy.kill();
    let _ = proxy.wait();
    assert!(last.is_none(), "never said not ready: {last:?}");
}

/// `produce` from stdin and `consume` without --max show progress on a
/// terminal (run here under `script`, which gives them one) and nothing
/// but records when piped.
#[test]
fn long_commands_show_progress_on_a_terminal_only() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port_block();
    let dev = Dev::start(dir.path(), port);
    dev.json(&[
        "topic",
        "create",
        "prog",
        "--queues",
        "2",
        "--replicas",
        "1",
    ]);
    let lines: String = (0..40).map(|i| format!("line {i}\n")).collect();
    let input = dir.path().join("in.txt");
    std::fs::write(&input, &lines).unwrap();
    // Piped: records only, nothing on stderr.
    let o = dev.run_stdin(&["produce", "--topic", "prog"], Some(&lines));
    assert!(o.status.success());
    assert_eq!(String::from_utf8_lossy(&o.stdout).lines().count(), 40);
    assert!(
        o.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // On a terminal: a closing progress line with the count.
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("no `script` on this machine: the terminal half is skipped");
        dev.stop();
        return;
    }
    let cmd = format!(
        "{} --endpoint {} produce --topic prog < {}",
        petrel(),
        dev.endpoint(),
        input.display()
    );
    let o = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let tty = String::from_utf8_lossy(&o.stdout);
    assert!(tty.contains("-- produced 40 records"), "{tty}");
    // --json on a terminal: no progress either.
    let cmd = format!("{cmd} --json")
        .replace(" produce --topic prog <", " --json produce --topic prog <");
    let cmd = cmd.trim_end_matches(" --json").to_string();
    let o = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let tty = String::from_utf8_lossy(&o.stdout);
    assert!(!tty.contains("-- produced"), "{tty}");
    dev.stop();
}
