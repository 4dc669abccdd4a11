//! `petrel-proxy` configuration: flags and `PETREL_*` environment variables.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:7400";
pub const DEFAULT_MAX_RECEIVES_PER_CLIENT: u32 = 1000;
/// Default cap on one client's calls in progress at once (all kinds).
pub const DEFAULT_MAX_REQUESTS_PER_CLIENT: u32 = 2000;
pub const DEFAULT_MAX_STREAMS_PER_CONNECTION: u32 = 1024;

/// Petrel proxy: stateless gRPC front end. Terminates the client protocol,
/// validates requests and routes them to the leader of the right queue.
/// Run as many as you like; kill any at any time.
#[derive(Debug, Clone, Parser)]
#[command(name = "petrel-proxy", version)]
pub struct ProxyArgs {
    /// Address to serve the client API on.
    #[arg(long, env = "PETREL_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Also serve on this address (e.g. 0.0.0.0:8081, where RocketMQ
    /// clients look by default): the same services, Petrel's and RocketMQ
    /// 5's (`apache.rocketmq.v2.MessagingService`), with the same TLS.
    #[arg(long, env = "PETREL_ROCKETMQ_LISTEN")]
    pub rocketmq_listen: Option<SocketAddr>,
    /// Broker addresses to discover the cluster from, comma-separated
    /// (HOST:PORT). Any subset is enough; the rest is learned from the map.
    /// Required here or as `brokers` in the config file.
    #[arg(long, env = "PETREL_BROKERS", value_delimiter = ',')]
    pub brokers: Vec<String>,
    /// Largest record accepted (body + key + tag + properties), in bytes.
    #[arg(long, env = "PETREL_MAX_RECORD_BYTES", default_value_t = petrel_proto::validate::DEFAULT_MAX_RECORD_BYTES)]
    pub max_record_bytes: usize,
    /// Most messages accepted in one send request.
    #[arg(long, env = "PETREL_MAX_BATCH_MESSAGES", default_value_t = petrel_proto::validate::DEFAULT_MAX_BATCH_MESSAGES)]
    pub max_batch_messages: usize,
    /// Secret that signs receipt handles (at least 16 bytes); every proxy
    /// of a cluster must use the same one. Required: there is no default
    /// (`petrel dev` makes a random one).
    #[arg(long, env = "PETREL_RECEIPT_SECRET", hide_env_values = true)]
    pub receipt_secret: Option<String>,
    /// Users and permissions file (create it with `petrel user add`): every
    /// call must then be signed by a user a rule allows. Re-read whenever
    /// it changes. One of this or --allow-anonymous is required.
    #[arg(long, env = "PETREL_AUTH_FILE", conflicts_with = "allow_anonymous")]
    pub auth_file: Option<std::path::PathBuf>,
    /// Let anyone who reaches the proxy do anything, without credentials
    /// (development and closed networks only).
    #[arg(long, env = "PETREL_ALLOW_ANONYMOUS")]
    pub allow_anonymous: bool,
    /// Serve clients over TLS with this certificate chain (PEM; with
    /// --tls-key). Clients then use https:// endpoints. Re-read when it
    /// changes.
    #[arg(long, env = "PETREL_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "PETREL_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// Verify client certificates against this CA (PEM) when clients
    /// present one (needs --tls-cert).
    #[arg(long, env = "PETREL_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<std::path::PathBuf>,
    /// Dial brokers over mutual TLS: this proxy's cluster certificate (PEM;
    /// with --cluster-key and --cluster-ca), as brokers started with
    /// --tls-cert require.
    #[arg(long, env = "PETREL_CLUSTER_CERT", requires_all = ["cluster_key", "cluster_ca"])]
    pub cluster_cert: Option<std::path::PathBuf>,
    /// The private key (PEM) of --cluster-cert.
    #[arg(long, env = "PETREL_CLUSTER_KEY", requires = "cluster_cert")]
    pub cluster_key: Option<std::path::PathBuf>,
    /// The cluster CA (PEM) brokers' certificates are checked against.
    #[arg(long, env = "PETREL_CLUSTER_CA", requires = "cluster_cert")]
    pub cluster_ca: Option<std::path::PathBuf>,
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
    /// Receives (long-polls) one client may have open at once on this
    /// proxy; more get `rate_limited`. A client is its user, or its
    /// address when anonymous.
    #[arg(long, env = "PETREL_MAX_RECEIVES_PER_CLIENT", default_value_t = DEFAULT_MAX_RECEIVES_PER_CLIENT,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_receives_per_client: u32,
    /// Calls of any kind one client may have in progress at once on this
    /// proxy (over all its connections); more get `rate_limited`. A client
    /// is its user, or its address when anonymous.
    #[arg(long, env = "PETREL_MAX_REQUESTS_PER_CLIENT", default_value_t = DEFAULT_MAX_REQUESTS_PER_CLIENT,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_requests_per_client: u32,
    /// HTTP/2 streams (calls) one connection may have open at once.
    #[arg(long, env = "PETREL_MAX_STREAMS_PER_CONNECTION", default_value_t = DEFAULT_MAX_STREAMS_PER_CONNECTION,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_streams_per_connection: u32,
    /// Log filter, e.g. `info` or `petrel_proxy=debug` [default: the config
    /// file's `log`, else info]. Given here, it wins over the file.
    #[arg(long, env = "PETREL_LOG")]
    pub log: Option<String>,
    /// Serve the admin HTTP endpoint (/metrics, /healthz, /readyz) on this
    /// address, e.g. 0.0.0.0:9400 [default: off].
    #[arg(long, env = "PETREL_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// Serve the admin endpoint over HTTPS with this certificate chain
    /// (PEM); with --admin-tls-key. Re-read when it changes.
    #[arg(long, env = "PETREL_ADMIN_TLS_CERT", requires = "admin_tls_key")]
    pub admin_tls_cert: Option<std::path::PathBuf>,
    /// The private key (PEM) of --admin-tls-cert.
    #[arg(long, env = "PETREL_ADMIN_TLS_KEY", requires = "admin_tls_cert")]
    pub admin_tls_key: Option<std::path::PathBuf>,
    /// On SIGTERM: turn not-ready and end open long-polls, wait this long
    /// (for load balancers to notice) while still serving, then stop
    /// taking connections.
    #[arg(long, env = "PETREL_DRAIN_DELAY", default_value = "0s", value_parser = humantime::parse_duration)]
    pub drain_delay: Duration,
    /// Bound on finishing in-flight requests after that; then exit anyway.
    #[arg(long, env = "PETREL_SHUTDOWN_GRACE", default_value = "20s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
    /// TOML file with any of these settings (keys as the flags, with `_`;
    /// flags and env win over it) plus `[rate_limits]`. Re-read on SIGHUP
    /// and whenever it changes: `log` and the rate limits take effect at
    /// once; other changed keys are logged as needing a restart; an invalid
    /// file is rejected and logged. `--print-config` output is a valid file.
    #[arg(long, env = "PETREL_CONFIG")]
    pub config: Option<std::path::PathBuf>,
    /// Log lines as `text` (coloured only when stderr is a terminal) or
    /// `json` (one object per line, for log collectors). Flag or
    /// environment only, not in the config file.
    #[arg(long, env = "PETREL_LOG_FORMAT", default_value = "text")]
    pub log_format: petrel_admin::logging::LogFormat,
    /// Print the effective configuration (flags, environment and file) as
    /// TOML and exit.
    #[arg(long)]
    pub print_config: bool,
}

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub listen: SocketAddr,
    /// A second port for the same services (RocketMQ clients' default).
    pub rocketmq_listen: Option<SocketAddr>,
    pub brokers: Vec<String>,
    pub max_record_bytes: usize,
    pub max_batch_messages: usize,
    pub receipt_secret: String,
    /// Who may call, and what they may do.
    pub auth: AuthMode,
    /// TLS for clients (certificate, key, optional client CA).
    pub tls: Option<petrel_proto::tls::TlsFiles>,
    /// Mutual TLS to brokers.
    pub cluster_tls: Option<petrel_proto::tls::TlsFiles>,
    pub route_refresh: Duration,
    pub request_timeout: Duration,
    pub max_wait: Duration,
    pub max_receives_per_client: u32,
    pub max_requests_per_client: u32,
    pub max_streams_per_connection: u32,
    pub log: String,
    pub admin_listen: Option<SocketAddr>,
    /// HTTPS on the admin endpoint: (certificate chain, key).
    pub admin_tls: Option<(std::path::PathBuf, std::path::PathBuf)>,
    pub drain_delay: Duration,
    pub shutdown_grace: Duration,
    /// The `--config` file (re-read on SIGHUP and on change), its text at
    /// start and what it said.
    pub config_path: Option<std::path::PathBuf>,
    pub config_text: Option<String>,
    pub runtime: crate::limits::RuntimeConfig,
    /// The `--log` flag's (or `PETREL_LOG`'s) filter: wins over the file.
    pub flag_log: Option<String>,
    /// The static settings the file gave at start (a reload that changes
    /// them is logged as needing a restart).
    pub file_static: FileStatic,
    /// Applies a new log filter (set by the binary; `None` in-process).
    pub set_log: Option<LogHook>,
}

/// How the proxy authenticates calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthMode {
    /// Every call allowed (`--allow-anonymous`, `petrel dev`).
    Anonymous,
    /// Users and rules from this file (its text at start).
    File {
        path: std::path::PathBuf,
        text: String,
    },
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
    /// The effective configuration as TOML, in the `--config` file's keys
    /// (so it can be used as one). The receipt secret is never printed.
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
        match &self.auth {
            AuthMode::Anonymous => {
                t.insert("allow_anonymous".into(), true.into());
            }
            AuthMode::File { path, .. } => {
                t.insert("auth_file".into(), path.display().to_string().into());
            }
        }
        let mut out = "# receipt_secret: set (redacted)\n".to_string();
        if let Some(p) = &self.config_path {
            out.push_str(&format!("# config file: {}\n", p.display()));
        }
        out.push_str(&toml::to_string(&t).unwrap_or_default());
        let limits = toml::to_string(&crate::limits::RuntimeConfig {
            log: None,
            rate_limits: self.runtime.rate_limits.clone(),
            receive_limits: self.runtime.receive_limits.clone(),
        })
        .unwrap_or_default();
        out.push_str("\n# reloaded while running: log (above) and\n");
        out.push_str(&limits);
        out
    }
}

/// The static (restart-only) keys a proxy config file may hold.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileStatic {
    pub listen: Option<SocketAddr>,
    /// `"HOST:PORT,HOST:PORT"` or a list.
    pub brokers: Option<StringOrList>,
    pub max_record_bytes: Option<usize>,
    pub max_batch_messages: Option<usize>,
    pub receipt_secret: Option<String>,
    pub auth_file: Option<std::path::PathBuf>,
    pub allow_anonymous: Option<bool>,
    pub route_refresh: Option<String>,
    pub request_timeout: Option<String>,
    pub max_wait: Option<String>,
    pub admin_listen: Option<SocketAddr>,
    pub drain_delay: Option<String>,
    pub shutdown_grace: Option<String>,
}

#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(untagged)]
pub enum StringOrList {
    One(String),
    List(Vec<String>),
}

impl StringOrList {
    fn items(&self) -> Vec<String> {
        match self {
            StringOrList::One(s) => s.split(',').map(String::from).collect(),
            StringOrList::List(l) => l.clone(),
        }
    }
}

/// The keys of a proxy config file that a running proxy takes at once.
const RUNTIME_KEYS: [&str; 3] = ["log", "rate_limits", "receive_limits"];

/// Splits a proxy config file into its static and runtime parts, each
/// validated (unknown keys are errors).
pub fn parse_file(text: &str) -> Result<(FileStatic, crate::limits::RuntimeConfig), String> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| e.to_string())?;
    let (mut runtime, mut fixed) = (toml::Table::new(), toml::Table::new());
    for (k, v) in table {
        if RUNTIME_KEYS.contains(&k.as_str()) {
            runtime.insert(k, v);
        } else {
            fixed.insert(k, v);
        }
    }
    let fixed: FileStatic = fixed
        .try_into()
        .map_err(|e: toml::de::Error| e.to_string())?;
    for (k, d) in [
        ("route_refresh", &fixed.route_refresh),
        ("request_timeout", &fixed.request_timeout),
        ("max_wait", &fixed.max_wait),
        ("drain_delay", &fixed.drain_delay),
        ("shutdown_grace", &fixed.shutdown_grace),
    ] {
        if let Some(d) = d {
            humantime::parse_duration(d).map_err(|e| format!("{k} = {d:?}: {e}"))?;
        }
    }
    let runtime = crate::limits::RuntimeConfig::parse(
        &toml::to_string(&runtime).map_err(|e| e.to_string())?,
    )?;
    Ok((fixed, runtime))
}

/// Which arguments were given on the command line or in the environment
/// (they win over the config file; defaults do not).
pub type Explicit = std::collections::BTreeSet<String>;

/// The arguments of `m` given on the command line or in the environment.
pub fn explicit_in(m: &clap::ArgMatches) -> Explicit {
    m.ids()
        .filter(|id| {
            matches!(
                m.value_source(id.as_str()),
                Some(clap::parser::ValueSource::CommandLine)
                    | Some(clap::parser::ValueSource::EnvVariable)
            )
        })
        .map(|id| id.as_str().to_string())
        .collect()
}

impl ProxyArgs {
    /// Parses the process's arguments and environment, noting which were
    /// given explicitly.
    pub fn from_env() -> (Self, Explicit) {
        use clap::{CommandFactory, FromArgMatches};
        let matches = Self::command().get_matches();
        let args = Self::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
        (args, explicit_in(&matches))
    }

    /// Reads the `--config` file (if any) and resolves; every argument
    /// counts as explicit (tests and embedding).
    pub fn resolve(self) -> Result<ProxyConfig, String> {
        let text = match &self.config {
            Some(p) => Some(crate::limits::read(p)?),
            None => None,
        };
        use clap::CommandFactory;
        let all: Explicit = Self::command()
            .get_arguments()
            .map(|a| a.get_id().to_string())
            .collect();
        self.resolve_with(text, &all)
    }

    /// Flags and env given explicitly win over the file (`text`), which
    /// wins over the defaults.
    pub fn resolve_with(
        self,
        text: Option<String>,
        explicit: &Explicit,
    ) -> Result<ProxyConfig, String> {
        let (file, runtime) = match (&text, &self.config) {
            (Some(t), p) => parse_file(t).map_err(|e| match p {
                Some(p) => format!("{}: {e}", p.display()),
                None => e,
            })?,
            (None, _) => Default::default(),
        };
        let flag = |id: &str| explicit.contains(id);
        let dur = |id: &str, v: Duration, f: &Option<String>| -> Duration {
            match f {
                Some(d) if !flag(id) => humantime::parse_duration(d).unwrap_or(v),
                _ => v,
            }
        };
        let brokers: Vec<String> = match (&file.brokers, flag("brokers")) {
            (Some(b), false) if self.brokers.is_empty() => b.items(),
            _ => self.brokers.clone(),
        }
        .into_iter()
        .map(|b| b.trim().to_string())
        .filter(|b| !b.is_empty())
        .collect();
        if brokers.is_empty() {
            return Err(
                "--brokers (or `brokers` in the config file) needs at least one HOST:PORT".into(),
            );
        }
        if let Some(b) = brokers.iter().find(|b| !b.contains(':')) {
            return Err(format!("--brokers entry {b:?} is not HOST:PORT"));
        }
        let pick = |id: &str, v: usize, f: Option<usize>| match f {
            Some(x) if !flag(id) => x,
            _ => v,
        };
        let max_record_bytes = pick(
            "max_record_bytes",
            self.max_record_bytes,
            file.max_record_bytes,
        );
        if max_record_bytes == 0 || max_record_bytes > petrel_proto::validate::MAX_RECORD_BYTES {
            return Err("--max-record-bytes must be 1..=63MiB".into());
        }
        let max_batch_messages = pick(
            "max_batch_messages",
            self.max_batch_messages,
            file.max_batch_messages,
        );
        if max_batch_messages == 0 {
            return Err("--max-batch-messages must be positive".into());
        }
        let receipt_secret = match self.receipt_secret.clone().or(file.receipt_secret.clone()) {
            Some(s) if s.len() >= 16 => s,
            Some(_) => return Err("--receipt-secret must be at least 16 bytes".into()),
            None => {
                return Err(
                    "--receipt-secret (or PETREL_RECEIPT_SECRET, or receipt_secret in the \
                            config file) is required: at least 16 random bytes, the same on every \
                            proxy of the cluster (e.g. `openssl rand -base64 32`)"
                        .into(),
                )
            }
        };
        let auth_file = self.auth_file.clone().or(file.auth_file.clone());
        let anonymous = self.allow_anonymous || file.allow_anonymous.unwrap_or(false);
        let auth = match (auth_file, anonymous) {
            (Some(_), true) => {
                return Err("--auth-file and --allow-anonymous exclude each other".into())
            }
            (Some(path), false) => {
                let text = crate::limits::read(&path)?;
                crate::auth::AuthFile::parse(&text)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                AuthMode::File { path, text }
            }
            (None, true) => AuthMode::Anonymous,
            (None, false) => {
                return Err(
                    "refusing to start without users: give --auth-file FILE (make one \
                            with `petrel user add NAME --auth-file FILE` and `petrel acl add`), \
                            or --allow-anonymous to let anyone who reaches the proxy do anything"
                        .into(),
                )
            }
        };
        let listen = match file.listen {
            Some(l) if !flag("listen") => l,
            _ => self.listen,
        };
        let admin_listen = self.admin_listen.or(file.admin_listen);
        let log = self
            .log
            .clone()
            .or_else(|| runtime.log.clone())
            .unwrap_or_else(|| "info".into());
        Ok(ProxyConfig {
            config_path: self.config,
            config_text: text,
            flag_log: self.log,
            listen,
            rocketmq_listen: self.rocketmq_listen,
            brokers,
            max_record_bytes,
            max_batch_messages,
            receipt_secret,
            auth,
            tls: match (self.tls_cert, self.tls_key) {
                (Some(cert), Some(key)) => Some(petrel_proto::tls::TlsFiles {
                    cert,
                    key,
                    ca: self.tls_client_ca,
                }),
                _ => None,
            },
            cluster_tls: match (self.cluster_cert, self.cluster_key, self.cluster_ca) {
                (Some(cert), Some(key), Some(ca)) => Some(petrel_proto::tls::TlsFiles {
                    cert,
                    key,
                    ca: Some(ca),
                }),
                _ => None,
            },
            route_refresh: dur("route_refresh", self.route_refresh, &file.route_refresh)
                .max(Duration::from_millis(50)),
            request_timeout: dur(
                "request_timeout",
                self.request_timeout,
                &file.request_timeout,
            )
            .max(Duration::from_millis(100)),
            max_wait: dur("max_wait", self.max_wait, &file.max_wait),
            max_receives_per_client: self.max_receives_per_client,
            max_requests_per_client: self.max_requests_per_client,
            max_streams_per_connection: self.max_streams_per_connection,
            log,
            admin_listen,
            admin_tls: self.admin_tls_cert.zip(self.admin_tls_key),
            drain_delay: dur("drain_delay", self.drain_delay, &file.drain_delay),
            shutdown_grace: dur("shutdown_grace", self.shutdown_grace, &file.shutdown_grace),
            file_static: file,
            runtime,
            set_log: None,
        })
    }
}

impl ProxyConfig {
    /// Defaults for an in-process development proxy (`petrel dev`):
    /// anonymous, with a random receipt secret.
    pub fn new(listen: SocketAddr, brokers: Vec<String>) -> Self {
        Self {
            listen,
            rocketmq_listen: None,
            brokers,
            max_record_bytes: petrel_proto::validate::DEFAULT_MAX_RECORD_BYTES,
            max_batch_messages: petrel_proto::validate::DEFAULT_MAX_BATCH_MESSAGES,
            receipt_secret: format!("dev-{:032x}", rand::random::<u128>()),
            auth: AuthMode::Anonymous,
            tls: None,
            cluster_tls: None,
            route_refresh: Duration::from_secs(1),
            request_timeout: Duration::from_secs(10),
            max_wait: Duration::from_secs(30),
            max_receives_per_client: DEFAULT_MAX_RECEIVES_PER_CLIENT,
            max_requests_per_client: DEFAULT_MAX_REQUESTS_PER_CLIENT,
            max_streams_per_connection: DEFAULT_MAX_STREAMS_PER_CONNECTION,
            log: "info".into(),
            admin_listen: None,
            admin_tls: None,
            drain_delay: Duration::ZERO,
            shutdown_grace: Duration::from_secs(20),
            config_path: None,
            config_text: None,
            runtime: Default::default(),
            flag_log: None,
            file_static: Default::default(),
            set_log: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(cli: &[&str]) -> (ProxyArgs, Explicit) {
        use clap::{CommandFactory, FromArgMatches};
        // Every case but the ones about them has a secret and anonymous access.
        let base: &[&str] = if cli.contains(&"--no-defaults") {
            &[]
        } else {
            &["--receipt-secret", "0123456789abcdef", "--allow-anonymous"]
        };
        let m = ProxyArgs::command()
            .try_get_matches_from(
                std::iter::once("petrel-proxy")
                    .chain(base.iter().copied())
                    .chain(cli.iter().copied().filter(|a| *a != "--no-defaults")),
            )
            .unwrap();
        (ProxyArgs::from_arg_matches(&m).unwrap(), explicit_in(&m))
    }

    #[test]
    fn file_gives_static_keys_and_flags_win() {
        let file = "listen = \"127.0.0.1:9000\"\nbrokers = [\"b1:1\", \"b2:2\"]\nmax_wait = \"5s\"\nlog = \"debug\"\n[rate_limits.topics]\norders = 7\n";
        let (a, e) = args(&["--config", "x.toml"]);
        let c = a.resolve_with(Some(file.into()), &e).unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.brokers, vec!["b1:1", "b2:2"]);
        assert_eq!(c.max_wait, Duration::from_secs(5));
        assert_eq!(c.log, "debug");
        assert_eq!(c.runtime.rate_limits.topics["orders"], 7);
        let (a, e) = args(&[
            "--config",
            "x.toml",
            "--listen",
            "127.0.0.1:9100",
            "--log",
            "warn",
            "--brokers",
            "b9:9",
        ]);
        let c = a.resolve_with(Some(file.into()), &e).unwrap();
        assert_eq!(c.listen.port(), 9100, "the flag wins");
        assert_eq!(c.log, "warn", "the flag wins over the file's log");
        assert_eq!(c.brokers, vec!["b9:9"]);
    }

    #[test]
    fn print_config_output_is_a_valid_config_file() {
        let file = "brokers = \"b1:1\"\nreceipt_secret = \"0123456789abcdef-secret\"\nlog = \"info\"\n[rate_limits]\nper_client_records_per_sec = 3\n[rate_limits.clients]\n\"ip:10.0.0.1\" = 2\n";
        let (a, e) = args(&["--config", "x.toml"]);
        let c = a.resolve_with(Some(file.into()), &e).unwrap();
        let printed = c.to_toml();
        assert!(
            !printed.contains("0123456789abcdef"),
            "secret printed: {printed}"
        );
        let (a, e) = args(&["--config", "y.toml"]);
        let again = a.resolve_with(Some(printed.clone()), &e).unwrap();
        assert_eq!(again.runtime, c.runtime, "{printed}");
        assert_eq!(again.brokers, c.brokers);
        assert_eq!(again.max_wait, c.max_wait);
    }

    #[test]
    fn bad_files_are_rejected_with_the_key() {
        for (bad, what) in [
            ("listen = 5", "listen"),
            ("bogus = 1", "bogus"),
            ("max_wait = \"soon\"", "max_wait"),
            ("[rate_limits]\nwhatever = 1", "whatever"),
            ("log = \"=[\"", "log"),
            ("brokers = \"nohostport\"", "HOST:PORT"),
            ("max_record_bytes = 0", "max-record-bytes"),
        ] {
            let (a, e) = args(&["--config", "x.toml", "--brokers", "b:1"]);
            let a = if bad.starts_with("brokers") {
                args(&["--config", "x.toml"]).0
            } else {
                a
            };
            match a.resolve_with(Some(bad.into()), &e) {
                Err(m) => assert!(m.contains(what), "{bad}: {m}"),
                Ok(_) => panic!("{bad} accepted"),
            }
        }
        let (a, e) = args(&[]);
        assert!(a.resolve_with(None, &e).unwrap_err().contains("brokers"));
    }

    #[test]
    fn a_receipt_secret_and_an_auth_choice_are_required() {
        let (a, e) = args(&["--no-defaults", "--brokers", "b:1"]);
        assert!(a
            .resolve_with(None, &e)
            .unwrap_err()
            .contains("--receipt-secret"));
        let (a, e) = args(&[
            "--no-defaults",
            "--brokers",
            "b:1",
            "--receipt-secret",
            "0123456789abcdef",
        ]);
        let m = a.resolve_with(None, &e).unwrap_err();
        assert!(
            m.contains("--auth-file") && m.contains("--allow-anonymous"),
            "{m}"
        );
        let (a, e) = args(&["--brokers", "b:1"]);
        assert_eq!(a.resolve_with(None, &e).unwrap().auth, AuthMode::Anonymous);
        // From the file too.
        let (a, e) = args(&["--no-defaults", "--config", "x.toml"]);
        let c = a
            .resolve_with(
                Some("brokers = \"b:1\"\nreceipt_secret = \"0123456789abcdef\"\nallow_anonymous = true\n".into()),
                &e,
            )
            .unwrap();
        assert_eq!(c.auth, AuthMode::Anonymous);
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("users.toml");
        std::fs::write(&f, "[[users]]\nname = \"a\"\nsigning_key = \"bad\"\n").unwrap();
        let p = f.to_str().unwrap();
        let (a, e) = args(&[
            "--no-defaults",
            "--brokers",
            "b:1",
            "--receipt-secret",
            "0123456789abcdef",
            "--auth-file",
            p,
        ]);
        assert!(a.resolve_with(None, &e).unwrap_err().contains("32 bytes"));
    }
}
