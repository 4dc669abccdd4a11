//! A cluster of real broker processes and one proxy, for the membership,
//! partition and rolling-restart tests: ports, data dirs and log files in a
//! temp dir, plus helpers that talk to one broker directly (Routes,
//! InjectFault, Append), to the cluster through the SDK (describe polling)
//! and through the `petrel` CLI binary.
//!
//! Processes live in a [`Procs`] (slot 0 = the proxy, slot `id` = broker
//! `id`) and are SIGKILLed by PID when the cluster is dropped, pass or fail.
//! On a panic (or with `PETREL_KEEP_LOGS` set) the process logs are first
//! copied out of the temp dir and their tails printed.

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use petrel_proto::pb::broker as bpb;
use petrel_proto::pb::broker::broker_data_client::BrokerDataClient;
use petrel_proto::PetrelError;
use petrel_sdk::{pb, Admin, Client};

use super::{
    bin, broker_command, free_port, join_broker_command, log_to, peers_arg, proxy_command, Procs,
};

/// Broker log filter: the broker's own decisions (moves, hand-offs,
/// membership changes) at info, everything else at warn.
pub const BROKER_LOG: &str = "warn,petrel_broker=info";

/// Log lines that only say a peer is down (printed tails skip them).
const NOISE: [&str; 5] = [
    "Unreachable node",
    "backoff_drain_events",
    "update progress error",
    "development receipt secret",
    "fault injection: broker",
];

/// A `BrokerDataClient` of broker `$id` (written as a macro so the channel
/// type, from `tonic`, need not be named here).
macro_rules! connect {
    ($cluster:expr, $id:expr) => {
        BrokerDataClient::connect(format!("http://{}", $cluster.broker_addr($id)))
            .await
            .map_err(|e| PetrelError::Unavailable(format!("connect to broker {}: {e}", $id)))?
    };
}

pub struct TestCluster {
    pub name: String,
    pub dir: tempfile::TempDir,
    /// Port of broker `id` at index `id - 1` (joiners included).
    pub ports: Vec<u16>,
    /// `--peers` of the founding brokers.
    pub peers: String,
    pub proxy_port: u16,
    /// Extra flags of every broker (e.g. `--fault-injection`).
    pub broker_flags: Vec<String>,
    pub procs: Procs,
    pub t0: Instant,
}

impl TestCluster {
    /// Ports for `max_brokers` brokers; brokers `1..=founders` form the
    /// founding `--peers`. Nothing is started yet.
    pub fn new(name: &str, founders: usize, max_brokers: usize, broker_flags: &[&str]) -> Self {
        let ports: Vec<u16> = (0..max_brokers).map(|_| free_port()).collect();
        TestCluster {
            name: name.to_string(),
            dir: tempfile::tempdir().unwrap(),
            peers: peers_arg(&ports[..founders]),
            ports,
            proxy_port: free_port(),
            broker_flags: broker_flags.iter().map(|s| s.to_string()).collect(),
            procs: Procs((0..=max_brokers).map(|_| None).collect()),
            t0: Instant::now(),
        }
    }

    pub fn broker_addr(&self, id: u64) -> String {
        format!("127.0.0.1:{}", self.ports[id as usize - 1])
    }

    /// The proxy's endpoint (what the SDK and the CLI talk to).
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.proxy_port)
    }

    pub fn log(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    /// "t+12.3s" since the cluster was created.
    pub fn t(&self) -> String {
        format!("t+{:.1}s", self.t0.elapsed().as_secs_f64())
    }

    /// One progress line on stderr, prefixed with the test name and time.
    pub fn say(&self, msg: impl std::fmt::Display) {
        eprintln!("[{}] {} {msg}", self.name, self.t());
    }

    fn flags(&self) -> Vec<&str> {
        self.broker_flags.iter().map(String::as_str).collect()
    }

    /// (Re)starts founding broker `id` (with `--peers`) on its port and data
    /// dir; its log is appended to `broker{id}.log`.
    pub fn start_founder(&mut self, id: u64) {
        let i = id as usize;
        let mut cmd = broker_command(
            i,
            self.ports[i - 1],
            &self.peers,
            self.dir.path(),
            &self.flags(),
        );
        cmd.env("PETREL_LOG", BROKER_LOG);
        log_to(&mut cmd, &self.log(&format!("broker{id}")));
        self.procs.replace(i, cmd.spawn().unwrap());
    }

    /// Starts broker `id` with `--join` through broker `seed` (no `--peers`).
    pub fn start_joiner(&mut self, id: u64, seed: u64) {
        let i = id as usize;
        let mut cmd = join_broker_command(
            i,
            self.ports[i - 1],
            &self.broker_addr(seed),
            self.dir.path(),
            &self.flags(),
        );
        cmd.env("PETREL_LOG", BROKER_LOG);
        log_to(&mut cmd, &self.log(&format!("broker{id}")));
        self.procs.replace(i, cmd.spawn().unwrap());
    }

    /// Starts the proxy, seeded with the founding brokers.
    pub fn start_proxy(&mut self, founders: usize) {
        let brokers = super::broker_list(&self.ports[..founders]);
        let mut cmd = proxy_command(self.proxy_port, &brokers);
        log_to(&mut cmd, &self.log("proxy"));
        self.procs.replace(0, cmd.spawn().unwrap());
    }

    /// Founding brokers `1..=founders` and the proxy.
    pub fn start(&mut self, founders: usize) {
        for id in 1..=founders as u64 {
            self.start_founder(id);
        }
        self.start_proxy(founders);
    }

    /// A new SDK client of the proxy.
    pub fn client(&self) -> Client {
        Client::connect([self.endpoint()]).unwrap()
    }

    pub fn pid(&self, id: u64) -> Option<u32> {
        self.procs.pid(id as usize)
    }

    /// SIGKILLs broker `id` and reaps it.
    pub fn kill_broker(&mut self, id: u64) {
        self.procs.kill(id as usize);
    }

    /// Whether broker `id`'s process is still running.
    pub fn check_running(&mut self, id: u64) -> Result<(), String> {
        self.procs.check_running(id as usize)
    }

    /// SIGTERMs broker `id` (by PID) and waits up to `bound` for it to exit;
    /// returns its exit status and how long it took. On timeout the broker
    /// is SIGKILLed and an error returned.
    pub async fn terminate_broker(
        &mut self,
        id: u64,
        bound: Duration,
    ) -> Result<(ExitStatus, Duration), String> {
        let i = id as usize;
        if !self.procs.sigterm(i) {
            return Err(format!("could not SIGTERM broker {id}"));
        }
        let start = Instant::now();
        loop {
            if let Some(status) = self.procs.try_reap(i) {
                return Ok((status, start.elapsed()));
            }
            if start.elapsed() > bound {
                self.procs.kill(i);
                return Err(format!(
                    "broker {id} did not exit within {bound:?} of SIGTERM (SIGKILLed)"
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Drops Raft traffic between broker `id` and `blocked` (replacing the
    /// previous set; empty heals). Needs `--fault-injection`.
    pub async fn inject_fault(&self, id: u64, blocked: &[u64]) -> Result<(), PetrelError> {
        let req = bpb::InjectFaultRequest {
            blocked: blocked.to_vec(),
        };
        let call = async {
            let mut c = connect!(self, id);
            c.inject_fault(req)
                .await
                .map_err(|s| PetrelError::from_status(&s))?;
            Ok(())
        };
        match tokio::time::timeout(Duration::from_secs(5), call).await {
            Ok(r) => r,
            Err(_) => Err(PetrelError::Timeout(format!(
                "InjectFault on broker {id} took over 5 s"
            ))),
        }
    }

    /// Broker `id`'s own Routes answer (its map and the groups it claims).
    pub async fn routes(&self, id: u64) -> Result<bpb::RoutesResponse, PetrelError> {
        let call = async {
            let mut c = connect!(self, id);
            Ok(c.routes(bpb::RoutesRequest::default())
                .await
                .map_err(|s| PetrelError::from_status(&s))?
                .into_inner())
        };
        match tokio::time::timeout(Duration::from_secs(3), call).await {
            Ok(r) => r,
            Err(_) => Err(PetrelError::Timeout(format!(
                "Routes on broker {id} took over 3 s"
            ))),
        }
    }

    /// An `Append` of one record straight to broker `id` for `group`
    /// (bypassing the proxy). `Ok(offsets)` means the broker acknowledged
    /// the write; a per-group error, an RPC error or no answer within
    /// `bound` (as `Timeout`) is an `Err`.
    pub async fn direct_append(
        &self,
        id: u64,
        group: u64,
        producer_id: &str,
        body: &str,
        bound: Duration,
    ) -> Result<Vec<u64>, PetrelError> {
        let req = bpb::AppendRequest {
            groups: vec![bpb::AppendRecords {
                group_id: group,
                producer_id: producer_id.to_string(),
                messages: vec![pb::Message {
                    key: body.to_string(),
                    body: body.as_bytes().to_vec().into(),
                    sequence: 1,
                    born_timestamp_ms: petrel_proto::now_ms(),
                    ..Default::default()
                }],
            }],
        };
        let call = async {
            let mut c = connect!(self, id);
            let r = c
                .append(req)
                .await
                .map_err(|s| PetrelError::from_status(&s))?
                .into_inner();
            let g =
                r.groups.into_iter().next().ok_or_else(|| {
                    PetrelError::Internal("Append answered without the group".into())
                })?;
            match g.error {
                Some(e) => Err(PetrelError::from_detail(&e)),
                None => Ok(g.offsets),
            }
        };
        match tokio::time::timeout(bound, call).await {
            Ok(r) => r,
            Err(_) => Err(PetrelError::Timeout(format!(
                "no answer from broker {id} within {bound:?}"
            ))),
        }
    }

    /// Runs the `petrel` CLI against the proxy (`--endpoint` is added),
    /// bounded by 60 s (killed after).
    pub async fn cli(&self, args: &[&str]) -> CliOut {
        let child = tokio::process::Command::new(bin("petrel"))
            .arg("--endpoint")
            .arg(self.endpoint())
            .args(args)
            .env("NO_COLOR", "1")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
            .await
            .unwrap_or_else(|_| panic!("petrel {args:?} did not finish within 60 s"))
            .unwrap();
        CliOut {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Copies the process logs out of the temp dir (deleted on drop) and
    /// prints, per log, the WARN/ERROR counts and the last lines that are
    /// not "peer down" noise.
    pub fn dump_logs(&self) {
        let to =
            std::env::temp_dir().join(format!("petrel-{}-logs-{}", self.name, std::process::id()));
        let _ = std::fs::create_dir_all(&to);
        let mut names: Vec<String> = Vec::new();
        for e in std::fs::read_dir(self.dir.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            if e.path().extension().is_some_and(|x| x == "log") {
                let _ = std::fs::copy(e.path(), to.join(e.file_name()));
                names.push(e.file_name().to_string_lossy().into_owned());
            }
        }
        names.sort();
        for n in names {
            let text = std::fs::read_to_string(self.dir.path().join(&n)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let errors = lines.iter().filter(|l| l.contains("ERROR")).count();
            let warns = lines.iter().filter(|l| l.contains("WARN")).count();
            let signal: Vec<&&str> = lines
                .iter()
                .filter(|l| !NOISE.iter().any(|x| l.contains(x)))
                .collect();
            eprintln!(
                "[{}] --- {n}: {} lines, {errors} ERROR, {warns} WARN; last 25 that are not 'peer down' noise:",
                self.name,
                lines.len()
            );
            for l in signal.iter().rev().take(25).rev() {
                eprintln!("[{}]   {l}", self.name);
            }
        }
        eprintln!("[{}] process logs kept in {}", self.name, to.display());
    }

    /// Lines of the log `{name}.log` (e.g. "broker2") containing `needle`.
    pub fn log_lines(&self, name: &str, needle: &str) -> Vec<String> {
        std::fs::read_to_string(self.log(name))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(needle))
            .map(String::from)
            .collect()
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("PETREL_KEEP_LOGS").is_some() {
            self.dump_logs();
        }
        // `procs` is dropped next: every process is SIGKILLed by PID.
    }
}

/// What a `petrel` CLI run printed.
#[derive(Debug)]
pub struct CliOut {
    /// Exit code (None if killed by a signal).
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CliOut {
    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }

    /// Stdout parsed as one JSON object per line (panics on anything else).
    pub fn json(&self) -> Vec<serde_json::Value> {
        self.stdout
            .lines()
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("stdout line is not JSON: {l:?}: {e}; {self:?}"))
            })
            .collect()
    }
}

/// Brokers of a describe, one line: "1(active,voter) L2 R6 up; ...".
pub fn describe_line(c: &pb::ClusterInfo) -> String {
    let mut s = format!("meta leader {}, {} queues: ", c.meta_leader, c.queue_count);
    for b in &c.brokers {
        s.push_str(&format!(
            "{}({},{}) L{} R{} {}; ",
            b.id,
            b.state,
            if b.meta_voter { "voter" } else { "learner" },
            b.leader_count,
            b.replica_count,
            if b.reachable { "up" } else { "DOWN" }
        ));
    }
    s
}

/// Polls `describe_cluster` every 250 ms until `ok` accepts it; returns it,
/// or the last reason (or describe error) once `bound` has passed.
pub async fn wait_cluster(
    admin: &Admin,
    bound: Duration,
    mut ok: impl FnMut(&pb::ClusterInfo) -> Result<(), String>,
) -> Result<pb::ClusterInfo, String> {
    let deadline = Instant::now() + bound;
    loop {
        let last = match admin.describe_cluster().await {
            Ok(c) => match ok(&c) {
                Ok(()) => return Ok(c),
                Err(why) => format!("{why} [{}]", describe_line(&c)),
            },
            Err(e) => format!("describe_cluster failed: {e}"),
        };
        if Instant::now() >= deadline {
            return Err(last);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Exactly `brokers` brokers, all reachable, every queue led, and every
/// active broker leading within ±1 of queues / active brokers (draining
/// brokers lead nothing).
pub fn balanced(brokers: usize) -> impl FnMut(&pb::ClusterInfo) -> Result<(), String> {
    move |c| {
        if c.brokers.len() != brokers {
            return Err(format!("{} brokers, want {brokers}", c.brokers.len()));
        }
        if let Some(b) = c.brokers.iter().find(|b| !b.reachable) {
            return Err(format!("broker {} unreachable", b.id));
        }
        let leaders: u32 = c.brokers.iter().map(|b| b.leader_count).sum();
        if leaders != c.queue_count {
            return Err(format!("{leaders} leaders for {} queues", c.queue_count));
        }
        let active: Vec<&pb::BrokerInfo> =
            c.brokers.iter().filter(|b| b.state == "active").collect();
        let fair = f64::from(c.queue_count) / active.len().max(1) as f64;
        if let Some(b) = active
            .iter()
            .find(|b| (f64::from(b.leader_count) - fair).abs() > 1.0)
        {
            return Err(format!(
                "broker {} leads {} (fair share {fair:.2})",
                b.id, b.leader_count
            ));
        }
        if let Some(b) = c
            .brokers
            .iter()
            .find(|b| b.state != "active" && b.leader_count > 0)
        {
            return Err(format!("{} broker {} still leads", b.state, b.id));
        }
        Ok(())
    }
}

/// One distinct cluster view seen by a [`Monitor`].
#[derive(Debug, Clone)]
pub struct View {
    /// Since the cluster's `t0`.
    pub at: Duration,
    pub line: String,
    /// None if describe failed.
    pub info: Option<pb::ClusterInfo>,
}

impl View {
    /// Queues without a leader in this view (0 if describe failed).
    pub fn unled(&self) -> u32 {
        self.info.as_ref().map_or(0, |c| {
            c.queue_count
                .saturating_sub(c.brokers.iter().map(|b| b.leader_count).sum())
        })
    }
}

/// Polls `describe_cluster` every 250 ms in the background and keeps each
/// view that differs from the previous one, with its time: the history of
/// leaderships and replica moves, printed by the tests.
pub struct Monitor {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<Vec<View>>,
}

impl Monitor {
    pub fn start(client: Client, t0: Instant) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let task = tokio::spawn(async move {
            let admin = client.admin();
            let mut seen: Vec<View> = Vec::new();
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                let (line, info) =
                    match tokio::time::timeout(Duration::from_secs(2), admin.describe_cluster())
                        .await
                    {
                        Ok(Ok(c)) => (describe_line(&c), Some(c)),
                        Ok(Err(e)) => (format!("describe failed: {e}"), None),
                        Err(_) => ("describe timed out".to_string(), None),
                    };
                if seen.last().is_none_or(|v| v.line != line) {
                    seen.push(View {
                        at: t0.elapsed(),
                        line,
                        info,
                    });
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            seen
        });
        Monitor { stop, task }
    }

    /// Stops polling and returns the distinct views.
    pub async fn finish(self) -> Vec<View> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .ok()
            .and_then(|r| r.ok())
            .unwrap_or_default()
    }

    /// Prints the views, prefixed with the test name.
    pub fn print(name: &str, views: &[View]) {
        for v in views {
            eprintln!("[{name}]   t+{:.1}s {}", v.at.as_secs_f64(), v.line);
        }
    }
}
