//! `petrel-proxy` configuration: flags and `PETREL_*` environment variables.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:7400";
/// Used when no secret is configured: fine for `petrel dev`, not for
/// production, where every proxy of a cluster must share a real secret.
pub const DEV_RECEIPT_SECRET: &str = "petrel-dev-receipt-secret-change-me";

/// Petrel proxy: stateless gRPC front end. Terminates the client protocol,
/// validates requests and routes them to the leader of the right queue.
/// Run as many as you like; kill any at any time.
#[derive(Debug, Clone, Parser)]
#[command(name = "petrel-proxy", version)]
pub struct ProxyArgs {
    /// Address to serve the client API on.
    #[arg(long, env = "PETREL_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Broker addresses to discover the cluster from, comma-separated
    /// (HOST:PORT). Any subset is enough; the rest is learned from the map.
    #[arg(long, env = "PETREL_BROKERS", value_delimiter = ',', required = true)]
    pub brokers: Vec<String>,
    /// Largest record accepted (body + key + tag + properties), in bytes.
    #[arg(long, env = "PETREL_MAX_RECORD_BYTES", default_value_t = petrel_proto::validate::DEFAULT_MAX_RECORD_BYTES)]
    pub max_record_bytes: usize,
    /// Most messages accepted in one send request.
    #[arg(long, env = "PETREL_MAX_BATCH_MESSAGES", default_value_t = petrel_proto::validate::DEFAULT_MAX_BATCH_MESSAGES)]
    pub max_batch_messages: usize,
    /// Secret that signs receipt handles; every proxy of a cluster must use
    /// the same one. Defaults to a fixed development secret (logged as a warning).
    #[arg(long, env = "PETREL_RECEIPT_SECRET", hide_env_values = true)]
    pub receipt_secret: Option<String>,
    /// How often the route table is refreshed from the brokers (it is also
    /// refreshed at once on a not-leader reply).
    #[arg(long, env = "PETREL_ROUTE_REFRESH", default_value = "1s", value_parser = humantime::parse_duration)]
    pub route_refresh: Duration,
    /// How long a request may keep retrying against brokers (leader changes,
    /// unreachable brokers) before it fails with `unavailable`.
    #[arg(long, env = "PETREL_REQUEST_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,
    /// Longest long-poll wait a receive may ask for.
    #[arg(long, env = "PETREL_MAX_WAIT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub max_wait: Duration,
    /// Log filter, e.g. `info` or `petrel_proxy=debug`.
    #[arg(long, env = "PETREL_LOG", default_value = "info")]
    pub log: String,
    /// Serve the admin HTTP endpoint (/metrics, /healthz, /readyz) on this
    /// address, e.g. 0.0.0.0:9400 [default: off].
    #[arg(long, env = "PETREL_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// On SIGTERM: turn not-ready and end open long-polls, wait this long
    /// (for load balancers to notice) while still serving, then stop
    /// taking connections.
    #[arg(long, env = "PETREL_DRAIN_DELAY", default_value = "0s", value_parser = humantime::parse_duration)]
    pub drain_delay: Duration,
    /// Bound on finishing in-flight requests after that; then exit anyway.
    #[arg(long, env = "PETREL_SHUTDOWN_GRACE", default_value = "20s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
    /// TOML file with the settings that can change while running (log
    /// filter, per-topic and per-client rate limits); re-read on SIGHUP and
    /// whenever it changes. See `limits.rs`.
    #[arg(long, env = "PETREL_CONFIG")]
    pub config: Option<std::path::PathBuf>,
    /// Print the effective configuration (flags, environment and file) as
    /// TOML and exit.
    #[arg(long)]
    pub print_config: bool,
}

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub listen: SocketAddr,
    pub brokers: Vec<String>,
    pub max_record_bytes: usize,
    pub max_batch_messages: usize,
    pub receipt_secret: String,
    pub route_refresh: Duration,
    pub request_timeout: Duration,
    pub max_wait: Duration,
    pub log: String,
    pub admin_listen: Option<SocketAddr>,
    pub drain_delay: Duration,
    pub shutdown_grace: Duration,
    /// The `--config` file (re-read on SIGHUP and on change), its text at
    /// start and what it said.
    pub config_path: Option<std::path::PathBuf>,
    pub config_text: Option<String>,
    pub runtime: crate::limits::RuntimeConfig,
    /// The `--log` flag's filter, used when the file sets none.
    pub flag_log: String,
    /// Applies a new log filter (set by the binary; `None` in-process).
    pub set_log: Option<LogHook>,
}

/// Sets the process's log filter; errors name what is wrong with it.
#[derive(Clone)]
pub struct LogHook(pub std::sync::Arc<SetLog>);

/// The function behind a [`LogHook`].
pub type SetLog = dyn Fn(&str) -> Result<(), String> + Send + Sync;

impl std::fmt::Debug for LogHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LogHook(..)")
    }
}

impl ProxyConfig {
    /// The effective configuration as TOML (the receipt secret redacted).
    pub fn to_toml(&self) -> String {
        let mut t = toml::Table::new();
        t.insert("listen".into(), self.listen.to_string().into());
        t.insert("brokers".into(), self.brokers.join(",").into());
        t.insert(
            "max_record_bytes".into(),
            (self.max_record_bytes as i64).into(),
        );
        t.insert(
            "max_batch_messages".into(),
            (self.max_batch_messages as i64).into(),
        );
        let secret = if self.receipt_secret == DEV_RECEIPT_SECRET {
            "(development default)"
        } else {
            "(set, redacted)"
        };
        t.insert("receipt_secret".into(), secret.into());
        for (k, d) in [
            ("route_refresh", self.route_refresh),
            ("request_timeout", self.request_timeout),
            ("max_wait", self.max_wait),
            ("drain_delay", self.drain_delay),
            ("shutdown_grace", self.shutdown_grace),
        ] {
            t.insert(k.into(), humantime::format_duration(d).to_string().into());
        }
        t.insert("log".into(), self.log.clone().into());
        if let Some(a) = self.admin_listen {
            t.insert("admin_listen".into(), a.to_string().into());
        }
        if let Some(p) = &self.config_path {
            t.insert("config".into(), p.display().to_string().into());
        }
        let mut out = toml::to_string(&t).unwrap_or_default();
        out.push_str("\n# runtime settings (reloadable)\n");
        out.push_str(&self.runtime.to_toml());
        out
    }
}

impl ProxyArgs {
    pub fn resolve(self) -> Result<ProxyConfig, String> {
        let brokers: Vec<String> = self
            .brokers
            .into_iter()
            .map(|b| b.trim().to_string())
            .filter(|b| !b.is_empty())
            .collect();
        if brokers.is_empty() {
            return Err("--brokers needs at least one HOST:PORT".into());
        }
        if let Some(b) = brokers.iter().find(|b| !b.contains(':')) {
            return Err(format!("--brokers entry {b:?} is not HOST:PORT"));
        }
        if self.max_record_bytes == 0 || self.max_record_bytes > 64 << 20 {
            return Err("--max-record-bytes must be 1..=64MiB".into());
        }
        if self.max_batch_messages == 0 {
            return Err("--max-batch-messages must be positive".into());
        }
        let receipt_secret = match self.receipt_secret {
            Some(s) if s.len() >= 16 => s,
            Some(_) => return Err("--receipt-secret must be at least 16 bytes".into()),
            None => DEV_RECEIPT_SECRET.to_string(),
        };
        let config_text = match &self.config {
            Some(p) => Some(crate::limits::read(p)?),
            None => None,
        };
        let runtime = match (&config_text, &self.config) {
            (Some(t), Some(p)) => crate::limits::RuntimeConfig::parse(t)
                .map_err(|e| format!("{}: {e}", p.display()))?,
            _ => Default::default(),
        };
        let log = runtime.log.clone().unwrap_or_else(|| self.log.clone());
        Ok(ProxyConfig {
            config_path: self.config,
            config_text,
            runtime,
            flag_log: self.log,
            set_log: None,
            listen: self.listen,
            brokers,
            max_record_bytes: self.max_record_bytes,
            max_batch_messages: self.max_batch_messages,
            receipt_secret,
            route_refresh: self.route_refresh.max(Duration::from_millis(50)),
            request_timeout: self.request_timeout.max(Duration::from_millis(100)),
            max_wait: self.max_wait,
            log,
            admin_listen: self.admin_listen,
            drain_delay: self.drain_delay,
            shutdown_grace: self.shutdown_grace,
        })
    }
}

impl ProxyConfig {
    /// Defaults for an in-process proxy (tests, `petrel dev`).
    pub fn new(listen: SocketAddr, brokers: Vec<String>) -> Self {
        Self {
            listen,
            brokers,
            max_record_bytes: petrel_proto::validate::DEFAULT_MAX_RECORD_BYTES,
            max_batch_messages: petrel_proto::validate::DEFAULT_MAX_BATCH_MESSAGES,
            receipt_secret: DEV_RECEIPT_SECRET.to_string(),
            route_refresh: Duration::from_secs(1),
            request_timeout: Duration::from_secs(10),
            max_wait: Duration::from_secs(30),
            log: "info".into(),
            admin_listen: None,
            drain_delay: Duration::ZERO,
            shutdown_grace: Duration::from_secs(20),
            config_path: None,
            config_text: None,
            runtime: Default::default(),
            flag_log: "info".into(),
            set_log: None,
        }
    }
}
