//! Shared by the real-process tests: binaries, ports, and a process group
//! that kills every child by PID when dropped (pass or fail).

#![allow(dead_code)] // each test file uses its own subset

pub mod cluster;
pub mod workload;

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

/// A port on 127.0.0.1 for a server a test starts (usually a child
/// process given `--listen`), which no other test will be handed while
/// this test process lives.
///
/// The OS picks the port (a bind to port 0), and the listener is dropped so
/// the server can bind it. Left there, that is a race: a test binary
/// running in parallel binds port 0 too, may be given the same free port,
/// and one of the two servers fails to listen. So every port handed out is
/// also reserved: an exclusive `flock` on `PORT.lock` in
/// `$TMPDIR/petrel-test-ports/`, held open until the test process exits
/// (the kernel releases it then, however the process ends), plus a set of
/// the ports handed out in this process (for its parallel tests). A port
/// someone else reserved is passed over. The reservation lasts for the
/// whole process rather than one test because servers are restarted on
/// their old ports (peers know brokers by address), and a port never goes
/// back to the pool mid-process.
///
/// Retrying a child that found its port taken was the alternative; it does
/// not cover a restart on the same port, and every spawning helper would
/// need it. What is left is a process outside the tests binding the port
/// in the moment between the check and the server's bind.
pub fn free_port() -> u16 {
    for _ in 0..1000 {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if ports::reserve(port) {
            return port;
        }
    }
    panic!("no free port could be reserved");
}

/// `n` consecutive ports, each free and reserved as by [`free_port`]: for
/// `petrel dev --port BASE`, whose brokers listen on BASE + 1, BASE + 2...
/// Returns the first.
pub fn free_port_block(n: u16) -> u16 {
    for _ in 0..1000 {
        let base = free_port();
        if base.checked_add(n).is_none() {
            continue; // `base` stays reserved; it is only one port
        }
        let mut taken = Vec::new();
        for p in base + 1..base + n {
            if TcpListener::bind(("127.0.0.1", p)).is_ok() && ports::reserve(p) {
                taken.push(p);
            } else {
                break;
            }
        }
        if taken.len() == usize::from(n - 1) {
            return base;
        }
        for p in taken.into_iter().chain([base]) {
            ports::release(p);
        }
    }
    panic!("no block of {n} free ports could be reserved");
}

/// The reservations behind [`free_port`].
mod ports {
    use std::collections::HashMap;
    use std::fs::File;
    use std::os::fd::AsRawFd;
    use std::sync::Mutex;

    /// Ports this process reserved, each with its open (locked) file.
    static HELD: Mutex<Option<HashMap<u16, File>>> = Mutex::new(None);

    /// Reserves `port` for this process: false if this process or another
    /// one already holds it.
    pub fn reserve(port: u16) -> bool {
        let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
        let held = held.get_or_insert_with(HashMap::new);
        if held.contains_key(&port) {
            return false;
        }
        let dir = std::env::temp_dir().join("petrel-test-ports");
        std::fs::create_dir_all(&dir).unwrap();
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(format!("{port}.lock")))
            .unwrap();
        // SAFETY: flock on a file descriptor this function owns.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return false;
        }
        held.insert(port, f);
        true
    }

    /// Gives a reservation back (closing the file releases the lock).
    pub fn release(port: u16) {
        let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(held) = held.as_mut() {
            held.remove(&port);
        }
    }
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

    /// Puts a (re)started child in slot `i`, SIGKILLing whatever was there.
    pub fn replace(&mut self, i: usize, c: Child) {
        self.kill(i);
        self.0[i] = Some(c);
    }

    /// The PID of the child in slot `i`, if one is there.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.0.get(i).and_then(|c| c.as_ref()).map(|c| c.id())
    }

    /// Sends SIGTERM to the child in slot `i` (by PID, with `kill -TERM`);
    /// false if there is none or `kill` failed. Does not wait.
    pub fn sigterm(&self, i: usize) -> bool {
        self.signal(i, "-TERM")
    }

    /// Sends `sig` (e.g. "-HUP") to the child in slot `i` by PID.
    pub fn signal(&self, i: usize, sig: &str) -> bool {
        let Some(pid) = self.pid(i) else {
            return false;
        };
        std::process::Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .is_ok_and(|s| s.success())
    }

    /// If the child in slot `i` has exited: reaps it, empties the slot and
    /// returns its status.
    pub fn try_reap(&mut self, i: usize) -> Option<std::process::ExitStatus> {
        let status = self.0.get_mut(i)?.as_mut()?.try_wait().ok()??;
        self.0[i] = None;
        Some(status)
    }

    /// Whether the child in slot `i` is running (`Err` = it exited, with
    /// its status).
    pub fn check_running(&mut self, i: usize) -> Result<(), String> {
        match self.0[i].as_mut() {
            None => Err("not started".to_string()),
            Some(c) => match c.try_wait() {
                Ok(None) => Ok(()),
                Ok(Some(status)) => Err(format!("exited: {status}")),
                Err(e) => Err(format!("wait failed: {e}")),
            },
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
        let last = match admin.describe_cluster().await {
            Ok(c) => {
                if c.meta_leader != 0
                    && c.brokers.len() == brokers
                    && c.brokers.iter().all(|b| b.reachable)
                {
                    return;
                }
                format!(
                    "meta leader {}, brokers {:?}",
                    c.meta_leader,
                    c.brokers
                        .iter()
                        .map(|b| (b.id, b.reachable))
                        .collect::<Vec<_>>()
                )
            }
            Err(e) => format!("describe_cluster: {e}"),
        };
        assert!(
            std::time::Instant::now() < deadline,
            "cluster not ready after {timeout:?}; last seen: {last}"
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
    broker_command(id, port, peers, dir, extra).spawn().unwrap()
}

/// Starts `n` founding brokers on fresh ports (ids 1..=n, in slots
/// 0..n of the returned processes), each with `extra` flags.
pub fn spawn_brokers(n: usize, dir: &std::path::Path, extra: &[&str]) -> (Procs, Vec<u16>) {
    let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
    let peers = peers_arg(&ports);
    let mut procs = Procs::default();
    for (i, port) in ports.iter().enumerate() {
        procs.push(spawn_broker(i + 1, *port, &peers, dir, extra));
    }
    (procs, ports)
}

/// The command [`spawn_broker`] runs (output discarded; see [`log_to`]).
pub fn broker_command(
    id: usize,
    port: u16,
    peers: &str,
    dir: &std::path::Path,
    extra: &[&str],
) -> std::process::Command {
    let mut cmd = std::process::Command::new(bin("petrel-broker"));
    cmd.args([
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
    .stderr(std::process::Stdio::null());
    cmd
}

/// The command of a broker that joins a running cluster through `seeds`
/// (`--join HOST:PORT,...`, no `--peers`); otherwise as [`broker_command`].
pub fn join_broker_command(
    id: usize,
    port: u16,
    seeds: &str,
    dir: &std::path::Path,
    extra: &[&str],
) -> std::process::Command {
    let mut cmd = std::process::Command::new(bin("petrel-broker"));
    cmd.args([
        "--id",
        &id.to_string(),
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--join",
        seeds,
    ])
    .args(extra)
    .arg("--data-dir")
    .arg(dir.join(format!("b{id}")))
    .env("PETREL_LOG", "warn")
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null());
    cmd
}

/// The receipt secret of test proxies.
pub const TEST_RECEIPT_SECRET: &str = "petrel-test-receipt-secret";

/// Starts `petrel-proxy` on `port`, seeded with `brokers` (HOST:PORT,...),
/// anonymous (`PETREL_ALLOW_ANONYMOUS`; a test that wants users passes
/// `--auth-file` and removes that variable).
pub fn spawn_proxy(port: u16, brokers: &str) -> Child {
    proxy_command(port, brokers).spawn().unwrap()
}

/// The command [`spawn_proxy`] runs (output discarded; see [`log_to`]).
pub fn proxy_command(port: u16, brokers: &str) -> std::process::Command {
    let mut cmd = std::process::Command::new(bin("petrel-proxy"));
    cmd.args([
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--brokers",
        brokers,
        // Every proxy of a test cluster shares it (a receipt from one is
        // acked through another).
        "--receipt-secret",
        TEST_RECEIPT_SECRET,
    ])
    .env("PETREL_ALLOW_ANONYMOUS", "true")
    .env("PETREL_LOG", "warn")
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null());
    cmd
}

/// Sends a command's stdout and stderr to `file`, appended (so a restarted
/// process adds to the log of its previous run), without colour codes.
pub fn log_to(cmd: &mut std::process::Command, file: &std::path::Path) {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)
        .unwrap();
    cmd.env("NO_COLOR", "1")
        .stdout(f.try_clone().unwrap())
        .stderr(f);
}

/// `HOST:PORT,...` for brokers on 127.0.0.1 `ports`.
pub fn broker_list(ports: &[u16]) -> String {
    ports
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",")
}

// ------------------------------------------------ users, CLI and metrics

/// Runs the `petrel` CLI; its stdout (it must succeed).
pub fn petrel(args: &[&str]) -> String {
    let o = std::process::Command::new(bin("petrel"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "petrel {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// `petrel user add NAME --json`: the new user's secret.
pub fn add_user(file: &str, name: &str) -> String {
    let out = petrel(&["user", "add", name, "--auth-file", file, "--json"]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    v["secret_key"].as_str().unwrap().to_string()
}

/// An SDK client of the proxy on `port`, signed as `creds` when given.
pub fn client(port: u16, creds: Option<(&str, &str)>) -> petrel_sdk::Client {
    let mut b = petrel_sdk::Client::builder([format!("127.0.0.1:{port}")])
        .request_timeout(std::time::Duration::from_secs(10));
    if let Some((ak, sk)) = creds {
        b = b.credentials(ak, sk);
    }
    b.build().unwrap()
}

/// The sum of metric `name`'s samples on the admin endpoint at `port`.
pub fn metric(port: u16, name: &str) -> f64 {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    use std::io::{Read, Write};
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body.lines()
        .filter(|l| {
            !l.starts_with('#')
                && (l.starts_with(&format!("{name} ")) || l.starts_with(&format!("{name}{{")))
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}
