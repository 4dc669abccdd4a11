//! Shared by the real-process tests: binaries, ports, and a process group
//! that kills every child by PID when dropped (pass or fail).

#![allow(dead_code)] // each test file uses its own subset

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Child;

/// A workspace binary. Those of other crates sit beside `petrel` in the
/// target dir (`cargo build --workspace` builds them; scripts/test.sh does).
pub fn bin(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_BIN_EXE_petrel")).with_file_name(name);
    assert!(
        p.exists(),
        "{} not built; run `cargo build --workspace` first",
        p.display()
    );
    p
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Child processes, killed (SIGKILL) and reaped on drop.
#[derive(Default)]
pub struct Procs(pub Vec<Option<Child>>);

impl Procs {
    pub fn push(&mut self, c: Child) -> usize {
        self.0.push(Some(c));
        self.0.len() - 1
    }

    /// SIGKILL one child now and wait for it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.0[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for i in 0..self.0.len() {
            self.kill(i);
        }
    }
}

/// `--peers` value for brokers 1..=n on 127.0.0.1 `ports`.
pub fn peers_arg(ports: &[u16]) -> String {
    ports
        .iter()
        .enumerate()
        .map(|(i, p)| format!("{}=127.0.0.1:{p}", i + 1))
        .collect::<Vec<_>>()
        .join(",")
}

/// Waits until the meta group has a leader and `brokers` brokers are
/// registered and reachable through the proxy.
pub async fn wait_ready(admin: &petrel_sdk::Admin, brokers: usize, timeout: std::time::Duration) {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Ok(c) = admin.describe_cluster().await {
            if c.meta_leader != 0
                && c.brokers.len() == brokers
                && c.brokers.iter().all(|b| b.reachable)
            {
                return;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "cluster not ready after {timeout:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// Starts `petrel-broker` with flags, data under `dir/b{id}`, quiet logs.
pub fn spawn_broker(
    id: usize,
    port: u16,
    peers: &str,
    dir: &std::path::Path,
    extra: &[&str],
) -> Child {
    std::process::Command::new(bin("petrel-broker"))
        .args([
            "--id",
            &id.to_string(),
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--peers",
            peers,
        ])
        .args(extra)
        .arg("--data-dir")
        .arg(dir.join(format!("b{id}")))
        .env("PETREL_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// Starts `petrel-proxy` on `port`, seeded with `brokers` (HOST:PORT,...).
pub fn spawn_proxy(port: u16, brokers: &str) -> Child {
    std::process::Command::new(bin("petrel-proxy"))
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--brokers",
            brokers,
        ])
        .env("PETREL_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// `HOST:PORT,...` for brokers on 127.0.0.1 `ports`.
pub fn broker_list(ports: &[u16]) -> String {
    ports
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",")
}
