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
