//! `petrel-broker` configuration: flags, `PETREL_*` environment variables
//! and an optional TOML file (flags and env win over the file).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use clap::Parser;
use serde::Deserialize;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:7410";
pub const DEFAULT_HEARTBEAT_MS: u64 = 500;
pub const DEFAULT_ELECTION_TIMEOUT_MS: u64 = 1000;
pub const DEFAULT_SNAPSHOT_EVERY: u64 = 20_000;
pub const DEFAULT_MAX_RECORD_BYTES: usize = petrel_proto::validate::DEFAULT_MAX_RECORD_BYTES;
/// openraft's replication task logs every failed call to an unreachable
/// peer at ERROR (hundreds a minute); the transport logs such a run once
/// when it starts and once when it ends instead (`network.rs`).
pub const DEFAULT_LOG: &str = "info,openraft=error,openraft::replication=off";

/// Petrel storage broker: stores queues in RocksDB, replicated with one Raft
/// group per queue. Every broker is identical; there is no master.
#[derive(Debug, Clone, Parser, Default)]
#[command(name = "petrel-broker", version)]
pub struct BrokerArgs {
    /// This broker's id: a positive integer unique in the cluster.
    #[arg(long, env = "PETREL_ID")]
    pub id: Option<u64>,
    /// Directory for this broker's RocksDB (created if missing).
    #[arg(long, env = "PETREL_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address to listen on for proxies and peer brokers [default: 127.0.0.1:7410].
    #[arg(long, env = "PETREL_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Address peers and proxies use to reach this broker [default: the
    /// --listen address, or this broker's entry in --peers].
    #[arg(long, env = "PETREL_ADVERTISE")]
    pub advertise: Option<String>,
    /// Every broker of the static cluster as ID=HOST:PORT, comma-separated,
    /// including this one, e.g. `1=10.0.0.1:7410,2=10.0.0.2:7410,3=10.0.0.3:7410`.
    /// The three lowest ids form the meta group.
    #[arg(long, env = "PETREL_PEERS")]
    pub peers: Option<String>,
    /// Join a running cluster through any of its brokers (HOST:PORT,
    /// comma-separated): this broker registers itself with the controller,
    /// follows the meta group as a learner and receives replicas when the
    /// controller moves them here. It never initializes the meta group.
    #[arg(long, env = "PETREL_JOIN")]
    pub join: Option<String>,
    /// Accept the InjectFault RPC (drop Raft traffic to chosen brokers).
    /// For partition tests only: refused unless the broker was built with
    /// the `fault-injection` cargo feature, which only the test suite
    /// enables.
    #[arg(long, env = "PETREL_FAULT_INJECTION", hide = !cfg!(feature = "fault-injection"))]
    pub fault_injection: bool,
    /// TOML file with any of these settings (keys as the flags, with `_`).
    /// It is re-read on SIGHUP and when it changes: `log`,
    /// `transaction_check_ms` and `max_record_bytes` take effect at once
    /// (unless a flag or env variable sets them); other changes are logged
    /// as needing a restart; an invalid file is rejected and logged.
    #[arg(long, env = "PETREL_CONFIG")]
    pub config: Option<PathBuf>,
    /// Raft heartbeat interval in milliseconds; it is also how long a
    /// replication call may take before openraft resends it [default: 500].
    #[arg(long, env = "PETREL_HEARTBEAT_MS")]
    pub heartbeat_ms: Option<u64>,
    /// Minimum Raft election timeout in milliseconds; the maximum is twice
    /// this [default: 1000].
    #[arg(long, env = "PETREL_ELECTION_TIMEOUT_MS")]
    pub election_timeout_ms: Option<u64>,
    /// Take a state snapshot (and purge the Raft log) every N entries per
    /// group [default: 20000].
    #[arg(long, env = "PETREL_SNAPSHOT_EVERY")]
    pub snapshot_every: Option<u64>,
    /// Largest record accepted, in bytes [default: 4194304].
    #[arg(long, env = "PETREL_MAX_RECORD_BYTES")]
    pub max_record_bytes: Option<usize>,
    /// Log filter, e.g. `info` or `petrel_broker=debug,openraft=info`
    /// [default: info,openraft=error,openraft::replication=off].
    #[arg(long, env = "PETREL_LOG")]
    pub log: Option<String>,
    /// Ask a producer's checker about a transaction left open this long,
    /// then again at this interval; after 5 unanswered checks it is rolled
    /// back [default: 5000].
    #[arg(long, env = "PETREL_TRANSACTION_CHECK_MS")]
    pub transaction_check_ms: Option<u64>,
    /// Most consumer groups one queue of a topic keeps state for: a
    /// receive or offset commit by a group new to a full queue gets
    /// `limit_exceeded` (delete unused groups with `petrel group delete`)
    /// [default: 10000].
    #[arg(long, env = "PETREL_MAX_CONSUMER_GROUPS")]
    pub max_consumer_groups: Option<usize>,
    /// Serve the admin HTTP endpoint (/metrics, /healthz, /readyz) on this
    /// address, e.g. 0.0.0.0:9400 [default: off].
    #[arg(long, env = "PETREL_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// Serve the admin endpoint over HTTPS with this certificate chain
    /// (PEM); with --admin-tls-key. Re-read when it changes.
    #[arg(long, env = "PETREL_ADMIN_TLS_CERT", requires = "admin_tls_key")]
    pub admin_tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --admin-tls-cert.
    #[arg(long, env = "PETREL_ADMIN_TLS_KEY", requires = "admin_tls_cert")]
    pub admin_tls_key: Option<PathBuf>,
    /// Serve TLS with this certificate chain (PEM); with --tls-key and
    /// --tls-ca. Every connection to this broker must then present a
    /// certificate of the cluster CA (other brokers, proxies), and this
    /// broker dials its peers with this certificate. Files are re-read
    /// when they change.
    #[arg(long, env = "PETREL_TLS_CERT", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "PETREL_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The cluster CA (PEM): peers' certificates are checked against it.
    #[arg(long, env = "PETREL_TLS_CA", requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,
    /// Log lines as `text` (coloured only when stderr is a terminal) or
    /// `json` (one object per line, for log collectors). Flag or
    /// environment only, not in the config file.
    #[arg(long, env = "PETREL_LOG_FORMAT", default_value = "text")]
    pub log_format: petrel_admin::logging::LogFormat,
    /// Print the effective configuration (flags, environment and file) as
    /// TOML, in the `--config` file's keys, and exit.
    #[arg(long)]
    pub print_config: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    id: Option<u64>,
    data_dir: Option<PathBuf>,
    listen: Option<SocketAddr>,
    advertise: Option<String>,
    peers: Option<String>,
    join: Option<String>,
    heartbeat_ms: Option<u64>,
    election_timeout_ms: Option<u64>,
    snapshot_every: Option<u64>,
    max_record_bytes: Option<usize>,
    log: Option<String>,
    transaction_check_ms: Option<u64>,
    max_consumer_groups: Option<usize>,
    admin_listen: Option<SocketAddr>,
}

/// Default first check (and re-check interval) of an open transaction.
pub const DEFAULT_TRANSACTION_CHECK_MS: u64 = 5000;
/// Unanswered checks after which an open transaction is rolled back.
pub const TRANSACTION_MAX_CHECKS: u32 = 5;
/// Default cap on consumer groups per queue.
pub const DEFAULT_MAX_CONSUMER_GROUPS: usize = 10_000;

/// Validated, effective configuration.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub id: u64,
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub advertise: String,
    /// id → address, including this broker.
    pub peers: BTreeMap<u64, String>,
    /// Seed brokers to join through (empty: a founding member).
    pub join: Vec<String>,
    pub fault_injection: bool,
    pub heartbeat_ms: u64,
    pub election_timeout_ms: u64,
    pub snapshot_every: u64,
    pub max_record_bytes: usize,
    pub log: String,
    pub transaction_check_ms: u64,
    /// Most consumer groups per queue.
    pub max_consumer_groups: usize,
    pub admin_listen: Option<SocketAddr>,
    /// HTTPS on the admin endpoint: (certificate chain, key).
    pub admin_tls: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// Mutual TLS on the broker port and to peers (cluster CA).
    pub tls: Option<petrel_proto::tls::TlsFiles>,
}

impl BrokerConfig {
    /// The effective configuration as TOML, in the `--config` file's keys
    /// (so the output can be used as a config file).
    pub fn to_toml(&self) -> String {
        let mut t = toml::Table::new();
        t.insert("id".into(), (self.id as i64).into());
        t.insert(
            "data_dir".into(),
            self.data_dir.display().to_string().into(),
        );
        t.insert("listen".into(), self.listen.to_string().into());
        t.insert("advertise".into(), self.advertise.clone().into());
        let peers: Vec<String> = self
            .peers
            .iter()
            .map(|(id, a)| format!("{id}={a}"))
            .collect();
        t.insert("peers".into(), peers.join(",").into());
        if !self.join.is_empty() {
            t.insert("join".into(), self.join.join(",").into());
        }
        t.insert("heartbeat_ms".into(), (self.heartbeat_ms as i64).into());
        t.insert(
            "election_timeout_ms".into(),
            (self.election_timeout_ms as i64).into(),
        );
        t.insert("snapshot_every".into(), (self.snapshot_every as i64).into());
        t.insert(
            "max_record_bytes".into(),
            (self.max_record_bytes as i64).into(),
        );
        t.insert("log".into(), self.log.clone().into());
        t.insert(
            "transaction_check_ms".into(),
            (self.transaction_check_ms as i64).into(),
        );
        t.insert(
            "max_consumer_groups".into(),
            (self.max_consumer_groups as i64).into(),
        );
        if let Some(a) = self.admin_listen {
            t.insert("admin_listen".into(), a.to_string().into());
        }
        toml::to_string(&t).unwrap_or_default()
    }
}

/// The settings a running broker takes from a reloaded config file at once.
/// The rest of [`BrokerConfig`] is fixed for the life of the process.
#[derive(Debug)]
pub struct Runtime {
    transaction_check_ms: AtomicU64,
    max_record_bytes: AtomicUsize,
    log: Mutex<String>,
}

/// What a reload changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reloaded {
    /// Settings now in effect with new values.
    pub applied: Vec<&'static str>,
    /// Settings whose new values wait for a restart.
    pub need_restart: Vec<&'static str>,
}

impl Runtime {
    pub fn new(c: &BrokerConfig) -> Self {
        Self {
            transaction_check_ms: AtomicU64::new(c.transaction_check_ms),
            max_record_bytes: AtomicUsize::new(c.max_record_bytes),
            log: Mutex::new(c.log.clone()),
        }
    }

    pub fn transaction_check_ms(&self) -> u64 {
        self.transaction_check_ms.load(Ordering::Relaxed)
    }

    pub fn max_record_bytes(&self) -> usize {
        self.max_record_bytes.load(Ordering::Relaxed)
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Takes the reloadable settings of `new` (already validated); names
    /// what changed, and what differs from the running process's fixed
    /// settings (`started`) and so waits for a restart.
    pub fn apply(&self, started: &BrokerConfig, new: &BrokerConfig) -> Reloaded {
        let mut r = Reloaded::default();
        if self
            .transaction_check_ms
            .swap(new.transaction_check_ms, Ordering::Relaxed)
            != new.transaction_check_ms
        {
            r.applied.push("transaction_check_ms");
        }
        if self
            .max_record_bytes
            .swap(new.max_record_bytes, Ordering::Relaxed)
            != new.max_record_bytes
        {
            r.applied.push("max_record_bytes");
        }
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        if *log != new.log {
            *log = new.log.clone();
            r.applied.push("log");
        }
        let fixed: [(&'static str, bool); 11] = [
            ("id", started.id != new.id),
            ("data_dir", started.data_dir != new.data_dir),
            ("listen", started.listen != new.listen),
            ("advertise", started.advertise != new.advertise),
            ("peers", started.peers != new.peers),
            ("join", started.join != new.join),
            ("heartbeat_ms", started.heartbeat_ms != new.heartbeat_ms),
            (
                "election_timeout_ms",
                started.election_timeout_ms != new.election_timeout_ms,
            ),
            (
                "snapshot_every",
                started.snapshot_every != new.snapshot_every,
            ),
            ("admin_listen", started.admin_listen != new.admin_listen),
            (
                "fault_injection",
                started.fault_injection != new.fault_injection,
            ),
        ];
        r.need_restart = fixed.iter().filter(|(_, d)| *d).map(|(k, _)| *k).collect();
        r
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("missing required setting --{0}")]
    Missing(&'static str),
    #[error("invalid --peers entry {0:?}: expected ID=HOST:PORT")]
    BadPeer(String),
    #[error("{0}")]
    Invalid(String),
    #[error("reading config file {path}: {reason}")]
    File { path: PathBuf, reason: String },
}

pub fn parse_peers(s: &str) -> Result<BTreeMap<u64, String>, ConfigError> {
    let mut out = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part
            .split_once('=')
            .ok_or_else(|| ConfigError::BadPeer(part.into()))?;
        let id: u64 = id
            .trim()
            .parse()
            .map_err(|_| ConfigError::BadPeer(part.into()))?;
        let addr = addr.trim();
        if id == 0 || addr.is_empty() || !addr.contains(':') {
            return Err(ConfigError::BadPeer(part.into()));
        }
        if out.insert(id, addr.to_string()).is_some() {
            return Err(ConfigError::Invalid(format!(
                "broker id {id} appears twice in --peers"
            )));
        }
    }
    Ok(out)
}

impl BrokerArgs {
    /// Reads the `--config` file (if any) and resolves flags, environment
    /// and file into the effective configuration.
    pub fn resolve(self) -> Result<BrokerConfig, ConfigError> {
        let text = match &self.config {
            None => None,
            Some(p) => Some(std::fs::read_to_string(p).map_err(|e| ConfigError::File {
                path: p.clone(),
                reason: e.to_string(),
            })?),
        };
        self.resolve_with(text.as_deref())
    }

    /// [`resolve`](Self::resolve) with the config file's text given (a
    /// reload re-resolves the same flags against the file's new text).
    pub fn resolve_with(self, text: Option<&str>) -> Result<BrokerConfig, ConfigError> {
        let file: FileConfig = match (text, &self.config) {
            (Some(t), p) => toml::from_str(t).map_err(|e| ConfigError::File {
                path: p.clone().unwrap_or_default(),
                reason: e.to_string(),
            })?,
            (None, _) => FileConfig::default(),
        };
        let id = self.id.or(file.id).ok_or(ConfigError::Missing("id"))?;
        if id == 0 {
            return Err(ConfigError::Invalid("--id must be positive".into()));
        }
        let data_dir = self
            .data_dir
            .or(file.data_dir)
            .ok_or(ConfigError::Missing("data-dir"))?;
        let listen = self
            .listen
            .or(file.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("valid default"));
        let mut peers = match self.peers.or(file.peers) {
            Some(p) => parse_peers(&p)?,
            None => BTreeMap::new(),
        };
        let advertise = match self.advertise.or(file.advertise) {
            Some(a) => a,
            None => match peers.get(&id) {
                Some(a) => a.clone(),
                None if listen.ip().is_unspecified() => {
                    return Err(ConfigError::Invalid(
                        "--advertise is required when listening on an unspecified address".into(),
                    ))
                }
                None => listen.to_string(),
            },
        };
        match peers.get(&id) {
            Some(a) if *a != advertise => {
                return Err(ConfigError::Invalid(format!(
                    "--peers says broker {id} is at {a} but it advertises {advertise}"
                )))
            }
            Some(_) => {}
            None => {
                peers.insert(id, advertise.clone());
            }
        }
        let join: Vec<String> = self
            .join
            .or(file.join)
            .map(|j| {
                j.split(',')
                    .map(str::trim)
                    .filter(|a| !a.is_empty())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default();
        if let Some(bad) = join.iter().find(|a| !a.contains(':')) {
            return Err(ConfigError::Invalid(format!(
                "invalid --join address {bad:?}: expected HOST:PORT"
            )));
        }
        let heartbeat_ms = self
            .heartbeat_ms
            .or(file.heartbeat_ms)
            .unwrap_or(DEFAULT_HEARTBEAT_MS);
        let election_timeout_ms = self
            .election_timeout_ms
            .or(file.election_timeout_ms)
            .unwrap_or(DEFAULT_ELECTION_TIMEOUT_MS);
        if heartbeat_ms == 0 || election_timeout_ms <= heartbeat_ms {
            return Err(ConfigError::Invalid(
                "--election-timeout-ms must be greater than --heartbeat-ms (> 0)".into(),
            ));
        }
        let max_record_bytes = self
            .max_record_bytes
            .or(file.max_record_bytes)
            .unwrap_or(DEFAULT_MAX_RECORD_BYTES);
        if max_record_bytes == 0 || max_record_bytes > petrel_proto::validate::MAX_RECORD_BYTES {
            return Err(ConfigError::Invalid(
                "--max-record-bytes must be 1..=63MiB".into(),
            ));
        }
        if self.fault_injection && !cfg!(feature = "fault-injection") {
            return Err(ConfigError::Invalid(
                "--fault-injection: this broker was built without fault injection (the \
                 `fault-injection` cargo feature, for the test suite only)"
                    .into(),
            ));
        }
        let log = self.log.or(file.log).unwrap_or_else(|| DEFAULT_LOG.into());
        tracing_subscriber::EnvFilter::try_new(&log)
            .map_err(|e| ConfigError::Invalid(format!("log filter {log:?}: {e}")))?;
        Ok(BrokerConfig {
            id,
            data_dir,
            listen,
            advertise,
            peers,
            join,
            fault_injection: self.fault_injection,
            heartbeat_ms,
            election_timeout_ms,
            snapshot_every: self
                .snapshot_every
                .or(file.snapshot_every)
                .unwrap_or(DEFAULT_SNAPSHOT_EVERY)
                .max(100),
            max_record_bytes,
            log,
            transaction_check_ms: self
                .transaction_check_ms
                .or(file.transaction_check_ms)
                .unwrap_or(DEFAULT_TRANSACTION_CHECK_MS)
                .clamp(100, 3_600_000),
            max_consumer_groups: self
                .max_consumer_groups
                .or(file.max_consumer_groups)
                .unwrap_or(DEFAULT_MAX_CONSUMER_GROUPS)
                .max(1),
            admin_listen: self.admin_listen.or(file.admin_listen),
            admin_tls: self.admin_tls_cert.zip(self.admin_tls_key),
            tls: match (self.tls_cert, self.tls_key, self.tls_ca) {
                (Some(cert), Some(key), Some(ca)) => Some(petrel_proto::tls::TlsFiles {
                    cert,
                    key,
                    ca: Some(ca),
                }),
                (None, None, None) => None,
                _ => {
                    return Err(ConfigError::Invalid(
                        "--tls-cert, --tls-key and --tls-ca go together".into(),
                    ))
                }
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_parse_and_reject_garbage() {
        let p = parse_peers("1=127.0.0.1:1, 2=h:2,3=h:3").unwrap();
        assert_eq!(p.len(), 3);
        for bad in ["1", "x=h:1", "0=h:1", "1=", "1=h:1,1=h:2", "1=nohost"] {
            assert!(parse_peers(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn resolve_requires_id_and_checks_advertise() {
        assert!(BrokerArgs::default().resolve().is_err());
        let a = BrokerArgs {
            id: Some(2),
            data_dir: Some("/tmp/x".into()),
            peers: Some("1=h:1,2=h:2".into()),
            ..Default::default()
        };
        let c = a.clone().resolve().unwrap();
        assert_eq!(c.advertise, "h:2");
        let bad = BrokerArgs {
            advertise: Some("other:9".into()),
            ..a
        };
        assert!(bad.resolve().is_err());
    }

    #[test]
    fn reload_applies_runtime_settings_and_names_the_rest() {
        let args = BrokerArgs {
            id: Some(1),
            data_dir: Some("/tmp/x".into()),
            config: Some("/etc/petrel/broker.toml".into()),
            ..Default::default()
        };
        let start = args
            .clone()
            .resolve_with(Some("transaction_check_ms = 5000\n"))
            .unwrap();
        let rt = Runtime::new(&start);
        let new = args
            .clone()
            .resolve_with(Some(
                "transaction_check_ms = 700\nlog = \"debug\"\nheartbeat_ms = 100\n",
            ))
            .unwrap();
        let r = rt.apply(&start, &new);
        assert_eq!(r.applied, vec!["transaction_check_ms", "log"]);
        assert_eq!(r.need_restart, vec!["heartbeat_ms"]);
        assert_eq!(rt.transaction_check_ms(), 700);
        assert_eq!(rt.log(), "debug");
        assert_eq!(
            rt.apply(&start, &new),
            Reloaded {
                applied: vec![],
                need_restart: vec!["heartbeat_ms"]
            }
        );
        for bad in [
            "transaction_check_ms = \"soon\"",
            "unknown_key = 1",
            "log = \"=[\"",
            "max_record_bytes = 0",
            "heartbeat_ms = 5000",
            "not toml at all [",
        ] {
            assert!(args.clone().resolve_with(Some(bad)).is_err(), "{bad}");
        }
        // A flag wins over the file, on reload as at start.
        let flagged = BrokerArgs {
            transaction_check_ms: Some(9000),
            ..args
        };
        let c = flagged
            .resolve_with(Some("transaction_check_ms = 700\n"))
            .unwrap();
        assert_eq!(c.transaction_check_ms, 9000);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 256, failure_persistence: None, ..Default::default() })]

        /// Whatever a broker config file says: a configuration, or an error
        /// that names the problem; never a panic.
        #[test]
        fn any_config_file_text_resolves_or_is_refused_with_a_reason(
            text in proptest::prelude::prop_oneof![
                "[ -~\n]{0,200}",
                "((id|listen|advertise|peers|join|heartbeat_ms|election_timeout_ms|snapshot_every|max_record_bytes|log|transaction_check_ms|max_consumer_groups|admin_listen|data_dir) = (\"[ -~]{0,16}\"|-?[0-9]{1,20}|true|\\[1\\])\n){1,4}",
            ]
        ) {
            let args = BrokerArgs {
                config: Some("/etc/petrel/broker.toml".into()),
                ..Default::default()
            };
            if let Err(e) = args.resolve_with(Some(&text)) {
                proptest::prop_assert!(!e.to_string().is_empty());
            }
        }
    }
}
