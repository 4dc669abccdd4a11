//! A local cluster of separate processes started from the binaries beside
//! `petrel-bench`: 3 `petrel-broker`s with default settings and one
//! `petrel-proxy`, on 127.0.0.1. The proxy listens on `base_port`, broker
//! `i` (1-based) on `base_port + i`. Every process logs to `DIR/NAME.log`
//! and is SIGKILLed (by PID) and reaped when the [`LocalCluster`] is
//! dropped; a temporary data directory it made is removed then too.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use petrel_sdk::{Admin, TopicSpec};

/// Brokers in a [`LocalCluster`].
pub const BROKERS: usize = 3;

/// How long [`LocalCluster::create_topic_when_ready`] retries by default.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

pub struct LocalCluster {
    base_port: u16,
    dir: PathBuf,
    /// Set when `dir` is a temporary directory made by `start`.
    made_dir: bool,
    broker_bin: PathBuf,
    peers: String,
    /// Index `i` is broker `i + 1`; `None` while killed.
    brokers: Vec<Option<Child>>,
    proxy: Option<Child>,
}

/// A binary beside this one.
fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let p = std::env::current_exe()?.with_file_name(name);
    anyhow::ensure!(p.exists(), "{} not found beside petrel-bench", p.display());
    Ok(p)
}

/// Appends a process's log to `dir/NAME.log`.
fn log(dir: &Path, name: &str) -> anyhow::Result<Stdio> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("{name}.log")))?;
    Ok(Stdio::from(f))
}

impl LocalCluster {
    /// Starts the brokers and the proxy (it does not wait for them: see
    /// [`LocalCluster::create_topic_when_ready`]). Data and logs go to
    /// `data_dir`, or to a fresh temporary directory removed on drop.
    pub fn start(base_port: u16, data_dir: Option<PathBuf>) -> anyhow::Result<Self> {
        anyhow::ensure!(
            base_port.checked_add(BROKERS as u16).is_some(),
            "--base-port {base_port} leaves no room for {BROKERS} brokers"
        );
        let (dir, made_dir) = match data_dir {
            Some(d) => (d, false),
            None => (
                std::env::temp_dir()
                    .join(format!("petrel-bench-{}-{base_port}", std::process::id())),
                true,
            ),
        };
        let broker_bin = sibling("petrel-broker")?;
        let proxy_bin = sibling("petrel-proxy")?;
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let peers = (1..=BROKERS)
            .map(|i| format!("{i}=127.0.0.1:{}", base_port + i as u16))
            .collect::<Vec<_>>()
            .join(",");
        // From here on, drop kills whatever was started.
        let mut cluster = Self {
            base_port,
            dir,
            made_dir,
            broker_bin,
            peers,
            brokers: (0..BROKERS).map(|_| None).collect(),
            proxy: None,
        };
        for i in 0..BROKERS {
            cluster.restart_broker(i)?;
        }
        let brokers = (1..=BROKERS)
            .map(|i| format!("127.0.0.1:{}", base_port + i as u16))
            .collect::<Vec<_>>()
            .join(",");
        cluster.proxy = Some(
            Command::new(&proxy_bin)
                .args(["--listen", &cluster.endpoint()])
                .args(["--brokers", &brokers])
                // A throwaway local cluster: no users, a fresh secret.
                .arg("--allow-anonymous")
                .args([
                    "--receipt-secret",
                    &format!("bench-secret-{}-{base_port}", std::process::id()),
                ])
                .env("PETREL_LOG", "info")
                .stdout(Stdio::null())
                .stderr(log(&cluster.dir, "proxy")?)
                .spawn()
                .with_context(|| format!("starting {}", proxy_bin.display()))?,
        );
        Ok(cluster)
    }

    /// The proxy's address (HOST:PORT).
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.base_port)
    }

    /// The directory holding the brokers' data and every process's log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// PIDs of the running server processes (brokers, then the proxy).
    pub fn pids(&self) -> Vec<u32> {
        self.brokers
            .iter()
            .chain(std::iter::once(&self.proxy))
            .flatten()
            .map(Child::id)
            .collect()
    }

    /// Keeps the data directory (and the logs in it) after the drop even if
    /// it is a temporary one: for a run that failed.
    pub fn keep_dir(&mut self) {
        self.made_dir = false;
    }

    /// Fails if a process that should be running has exited (a crash).
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        let names = (1..=BROKERS).map(|id| format!("broker{id}"));
        let procs = self.brokers.iter_mut().zip(names);
        for (c, name) in procs.chain(std::iter::once((&mut self.proxy, "proxy".into()))) {
            if let Some(status) = c.as_mut().map(Child::try_wait).transpose()?.flatten() {
                anyhow::bail!(
                    "{name} exited ({status}); see {}",
                    self.dir.join(format!("{name}.log")).display()
                );
            }
        }
        Ok(())
    }

    /// SIGKILLs broker `i` (0-based: broker id `i + 1`) and reaps it; a
    /// no-op when it is not running.
    pub fn kill_broker(&mut self, i: usize) -> anyhow::Result<()> {
        if let Some(mut c) = self.brokers[i].take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }

    /// Starts broker `i` (0-based) again with its data directory, killing
    /// it first if it is running.
    pub fn restart_broker(&mut self, i: usize) -> anyhow::Result<()> {
        self.kill_broker(i)?;
        let id = i + 1;
        let child = Command::new(&self.broker_bin)
            .args(["--id", &id.to_string()])
            .args([
                "--listen",
                &format!("127.0.0.1:{}", self.base_port + id as u16),
            ])
            .args(["--peers", &self.peers])
            .arg("--data-dir")
            .arg(self.dir.join(format!("b{id}")))
            .env("PETREL_LOG", "info,openraft=warn")
            .stdout(Stdio::null())
            .stderr(log(&self.dir, &format!("broker{id}"))?)
            .spawn()
            .with_context(|| format!("starting {}", self.broker_bin.display()))?;
        self.brokers[i] = Some(child);
        Ok(())
    }

    /// Creates a topic, retrying every error until `budget` is spent: the
    /// first call succeeds once the brokers have elected the metadata
    /// leader and the proxy reaches them, so this is also how to wait for
    /// a freshly started cluster. An existing topic is fine.
    pub async fn create_topic_when_ready(
        admin: &Admin,
        spec: TopicSpec,
        budget: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + budget;
        loop {
            match admin.create_topic(spec.clone()).await {
                Ok(_) | Err(petrel_sdk::Error::AlreadyExists(_)) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    return Err(e).with_context(|| format!("creating topic {}", spec.name))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(300)).await,
            }
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for c in self
            .brokers
            .iter_mut()
            .chain(std::iter::once(&mut self.proxy))
            .flatten()
        {
            let _ = c.kill();
            let _ = c.wait();
        }
        if self.made_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
