//! Argument parsing (clap derive) and the implementation of every
//! subcommand. Commands talk to the cluster only through `petrel_sdk`.

#[cfg(feature = "dev")]
use crate::dev::DevArgs;
use crate::output::{json_line, line, Table};
use base64::Engine as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use futures::{stream, Stream, StreamExt};
use petrel_sdk::{pb, Client, Error as PetrelError, Message, ReceivedMessage, TopicSpec};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::Write;
use std::pin::Pin;
use std::process::ExitCode;
use std::time::Duration;
use tokio::io::AsyncBufReadExt;

/// Default proxy endpoint of `petrel dev`.
const DEFAULT_ENDPOINT: &str = "127.0.0.1:7400";
/// Largest receive batch of `petrel consume`.
const CONSUME_BATCH: u64 = 256;
/// Ack (or nack) calls of `petrel consume` in flight at once.
const CONSUME_ACKS_IN_FLIGHT: usize = 8;
/// Long-poll wait per receive when `--wait-ms` is not given (consume then
/// runs until `--max` or Ctrl-C).
const FOREVER_POLL_WAIT: Duration = Duration::from_secs(5);
/// Bytes asked for per read request by `petrel read`.
const READ_MAX_BYTES: u32 = 1 << 20;

/// Petrel admin, produce/consume and dev CLI.
///
/// Talks to Petrel proxies (never to brokers). Exit codes: 0 success, 1 error,
/// 2 usage error.
#[derive(Debug, Parser)]
#[command(name = "petrel", version)]
pub struct Cli {
    /// Proxy endpoint(s), comma-separated (e.g. 10.0.0.1:7400,10.0.0.2:7400);
    /// requests fail over between them.
    #[arg(
        long,
        global = true,
        env = "PETREL_ENDPOINT",
        default_value = DEFAULT_ENDPOINT,
        value_delimiter = ','
    )]
    pub endpoint: Vec<String>,

    /// Print one JSON object per line on stdout (for scripts); a failure
    /// prints one line on stderr: {"error":{"code":..,"message":..}}.
    #[arg(long, global = true)]
    pub json: bool,

    /// Total time budget of each request including retries and failover
    /// (e.g. 500ms, 30s, 2m).
    #[arg(long, global = true, default_value = "30s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,

    /// Sign calls as this user (a proxy started with --auth-file requires
    /// it); needs --secret-key.
    #[arg(long, global = true, env = "PETREL_ACCESS_KEY")]
    pub access_key: Option<String>,

    /// The user's secret key (better given as PETREL_SECRET_KEY, which
    /// stays out of the process list).
    #[arg(long, global = true, env = "PETREL_SECRET_KEY", hide_env_values = true)]
    pub secret_key: Option<String>,

    /// The CA (PEM file) that signed the proxies' certificates, for
    /// https:// endpoints.
    #[arg(long, global = true, env = "PETREL_CA_CERT")]
    pub ca_cert: Option<std::path::PathBuf>,

    /// A client certificate (PEM file) to present over TLS; with
    /// --client-key.
    #[arg(
        long,
        global = true,
        env = "PETREL_CLIENT_CERT",
        requires = "client_key"
    )]
    pub client_cert: Option<std::path::PathBuf>,

    /// The private key (PEM file) of --client-cert.
    #[arg(
        long,
        global = true,
        env = "PETREL_CLIENT_KEY",
        requires = "client_cert"
    )]
    pub client_key: Option<std::path::PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run an embedded local cluster (brokers + a proxy) for development.
    #[cfg(feature = "dev")]
    Dev(DevArgs),
    /// Create, list, describe, update and delete topics.
    #[command(subcommand)]
    Topic(TopicCmd),
    /// Produce messages: generated (--count/--size) or one per stdin line.
    Produce(ProduceArgs),
    /// Consume in pop mode (receive, print, ack).
    Consume(ConsumeArgs),
    /// Read one queue by offset (offset mode); does not commit.
    Read(ReadArgs),
    /// Commit a consumer group's offset for one queue.
    Commit(CommitArgs),
    /// Show a consumer group's committed offset for one queue.
    Offset(OffsetArgs),
    /// List and describe consumer groups.
    #[command(subcommand)]
    Group(GroupCmd),
    /// Show the cluster's brokers and leadership.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Look up stored messages: by id, or by key.
    #[command(subcommand)]
    Message(MessageCmd),
    /// A refreshing view of produce rates per topic and consume rate, lag
    /// and dead letters per consumer group (read through the proxy).
    Top(TopArgs),
    /// Add, remove and list the users of a proxy's --auth-file.
    #[command(subcommand)]
    User(crate::users::UserCmd),
    /// Add, remove and list the permission rules of a proxy's --auth-file.
    #[command(subcommand)]
    Acl(crate::users::AclCmd),
    /// Print a shell completion script, e.g. `petrel completions bash >
    /// ~/.local/share/bash-completion/completions/petrel`, `petrel
    /// completions zsh > "${fpath[1]}/_petrel"`, `petrel completions fish >
    /// ~/.config/fish/completions/petrel.fish`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, clap::Args)]
pub struct TopArgs {
    /// Refresh interval in milliseconds.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    pub interval_ms: u64,
    /// Stop after this many refreshes (default: until Ctrl-C).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub iterations: Option<u64>,
}

#[derive(Debug, Subcommand)]
pub enum MessageCmd {
    /// One message by id: body, properties, and its delivery state in
    /// every consumer group.
    Get {
        /// Message id: Petrel's (TOPIC/QUEUE/OFFSET, as printed by
        /// `produce`) or the id a RocketMQ client gave the message.
        id: String,
        /// For a RocketMQ client's id: the topic to look in [default: every
        /// topic you may describe].
        #[arg(long)]
        topic: Option<String>,
    },
    /// Messages of a topic with a key (from the brokers' key index),
    /// oldest first.
    Find {
        #[arg(long)]
        topic: String,
        #[arg(long)]
        key: String,
        /// Most messages shown.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1000))]
        max: u32,
    },
}

#[derive(Debug, Subcommand)]
pub enum TopicCmd {
    /// Create a topic.
    Create(TopicCreateArgs),
    /// List all topics.
    List,
    /// Show a topic and each queue's replicas, leader and offsets.
    Describe {
        /// Topic name.
        name: String,
    },
    /// Change a topic's queue count (grow only) or retention.
    Update(TopicUpdateArgs),
    /// Delete a topic and all its records.
    Delete {
        /// Topic name.
        name: String,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum MessageTypeArg {
    Normal,
    Fifo,
    Delay,
    Transaction,
}

impl From<MessageTypeArg> for pb::MessageType {
    fn from(t: MessageTypeArg) -> Self {
        match t {
            MessageTypeArg::Normal => pb::MessageType::Normal,
            MessageTypeArg::Fifo => pb::MessageType::Fifo,
            MessageTypeArg::Delay => pb::MessageType::Delay,
            MessageTypeArg::Transaction => pb::MessageType::Transaction,
        }
    }
}

#[derive(Debug, Args)]
pub struct TopicCreateArgs {
    /// Topic name (letters, digits, '_', '-', '.').
    pub name: String,
    /// Number of queues (the unit of parallelism and of leadership; can
    /// grow later with `topic update --queues`).
    #[arg(long, default_value_t = petrel_sdk::defaults::DEFAULT_QUEUES)]
    pub queues: u32,
    /// Replicas per queue (at most the number of brokers) [default: 3, or
    /// the number of brokers if fewer].
    #[arg(long)]
    pub replicas: Option<u32>,
    /// How long records are kept (e.g. 7d, 12h); "forever" or 0 = no limit.
    #[arg(long, value_parser = parse_retention)]
    pub retention: Option<Duration>,
    /// Most bytes kept per queue (e.g. 1073741824, 10GiB, 500MB); 0 = no limit.
    #[arg(long, value_parser = parse_bytes)]
    pub retention_bytes: Option<u64>,
    /// Message type.
    #[arg(long = "type", value_enum, default_value_t = MessageTypeArg::Normal)]
    pub message_type: MessageTypeArg,
}

#[derive(Debug, Args)]
pub struct TopicUpdateArgs {
    /// Topic name.
    pub name: String,
    /// New queue count (must not be lower than the current one).
    #[arg(long)]
    pub queues: Option<u32>,
    /// New retention time (e.g. 7d); "forever" or 0 = no limit.
    #[arg(long, value_parser = parse_retention)]
    pub retention: Option<Duration>,
    /// New retention size per queue (e.g. 10GiB); 0 = no limit.
    #[arg(long, value_parser = parse_bytes)]
    pub retention_bytes: Option<u64>,
}

#[derive(Debug, Args)]
pub struct ProduceArgs {
    /// Topic to produce to.
    #[arg(long)]
    pub topic: String,
    /// Key of every message (routing / ordering).
    #[arg(long)]
    pub key: Option<String>,
    /// Tag of every message.
    #[arg(long)]
    pub tag: Option<String>,
    /// FIFO topics: the message group of every message.
    #[arg(long)]
    pub message_group: Option<String>,
    /// DELAY topics: deliver this many milliseconds after sending.
    #[arg(long, conflicts_with = "deliver_at")]
    pub delay_ms: Option<u64>,
    /// DELAY topics: deliver at this time (RFC 3339 or ms since the epoch).
    #[arg(long)]
    pub deliver_at: Option<String>,
    /// A property NAME=VALUE of every message; repeat for several.
    #[arg(long = "property", value_name = "NAME=VALUE", value_parser = parse_property)]
    pub properties: Vec<(String, String)>,
    /// Send N generated messages instead of reading stdin. Without it, every
    /// stdin line (without its line ending) is one message; an empty line is
    /// an empty body, which is allowed.
    #[arg(long)]
    pub count: Option<u64>,
    /// Body size in bytes of generated messages (printable text containing
    /// the message index).
    #[arg(long, default_value_t = 100, requires = "count")]
    pub size: usize,
    /// Most sends in flight at once (acknowledged ids still print in input order).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=65536))]
    pub concurrency: u64,
    /// Producer id for de-duplication of retried sends (default: random).
    #[arg(long)]
    pub producer_id: Option<String>,
}

#[derive(Debug, Args)]
pub struct ConsumeArgs {
    /// Topic to consume.
    #[arg(long)]
    pub topic: String,
    /// Consumer group.
    #[arg(long)]
    pub group: String,
    /// Exit after printing this many records.
    #[arg(long)]
    pub max: Option<u64>,
    /// Long-poll wait of each receive, in ms; exit once a receive gets
    /// nothing within it. Without --wait-ms and --max, run until Ctrl-C.
    #[arg(long)]
    pub wait_ms: Option<u64>,
    /// Do not acknowledge: records are redelivered once their lease expires.
    #[arg(long)]
    pub no_ack: bool,
    /// Lease of each received record, in ms (redelivered if not acked by then).
    #[arg(long, default_value_t = 30_000)]
    pub invisible_ms: u64,
    /// Only records whose tag matches: `*`, `TagA || TagB`.
    #[arg(long, conflicts_with = "filter_sql")]
    pub filter_tag: Option<String>,
    /// Only records whose properties match, e.g. "region = 'eu' AND amount > 100".
    #[arg(long)]
    pub filter_sql: Option<String>,
    /// Deliveries before a record moves to the group's dead-letter topic
    /// (GROUP.dlq); default 16.
    #[arg(long)]
    pub max_attempts: Option<u32>,
    /// Nack every received record instead of acking it (with this reason):
    /// exercises retries and dead letters.
    #[arg(long, conflicts_with = "no_ack")]
    pub nack: Option<String>,
}

#[derive(Debug, Args)]
pub struct ReadArgs {
    /// Topic to read.
    #[arg(long)]
    pub topic: String,
    /// Queue number.
    #[arg(long)]
    pub queue: u32,
    /// First offset to read.
    #[arg(long, default_value_t = 0)]
    pub offset: u64,
    /// Print at most this many records (default: up to the current end of the queue).
    #[arg(long)]
    pub max: Option<u64>,
}

#[derive(Debug, Args)]
pub struct CommitArgs {
    /// Topic.
    #[arg(long)]
    pub topic: String,
    /// Consumer group.
    #[arg(long)]
    pub group: String,
    /// Queue number.
    #[arg(long)]
    pub queue: u32,
    /// Offset to commit (the next offset to process).
    #[arg(long)]
    pub offset: u64,
}

#[derive(Debug, Args)]
pub struct OffsetArgs {
    /// Topic.
    #[arg(long)]
    pub topic: String,
    /// Consumer group.
    #[arg(long)]
    pub group: String,
    /// Queue number.
    #[arg(long)]
    pub queue: u32,
}

#[derive(Debug, Subcommand)]
pub enum GroupCmd {
    /// List consumer groups and the topics they consume.
    List,
    /// Show a group's committed offset, end offset, lag and in-flight count
    /// per topic and queue.
    Describe {
        /// Consumer group.
        group: String,
    },
    /// Delete a consumer group's state: its position, in-flight leases and
    /// dead letters not yet stored, on every queue of one topic (or of
    /// every topic). Frees room under the broker's --max-consumer-groups.
    /// Consumers still running recreate the group from the earliest
    /// retained record on their next receive.
    Delete {
        /// Consumer group.
        group: String,
        /// Only this topic (default: every topic).
        #[arg(long)]
        topic: Option<String>,
    },
    /// Move a group's position on a topic's queues: to the earliest
    /// retained record, the end, an offset, or the first record stored at
    /// or after a time. Leases in flight below the new position are dropped;
    /// moving back redelivers.
    Reset {
        /// Consumer group.
        group: String,
        /// Topic whose queues to reset.
        #[arg(long)]
        topic: String,
        /// `earliest`, `latest`, or an offset.
        #[arg(long, required_unless_present = "to_time", conflicts_with = "to_time")]
        to: Option<String>,
        /// A time: RFC 3339 (`2026-11-26T10:00:00Z`) or milliseconds since
        /// the Unix epoch.
        #[arg(long)]
        to_time: Option<String>,
        /// Only this queue (default: every queue of the topic).
        #[arg(long)]
        queue: Option<u32>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ClusterCmd {
    /// Show brokers (address, state, reachability, meta voter, leader and
    /// replica counts) and the meta-group leader.
    Describe,
    /// Balance queue leaderships over the brokers now (the controller also
    /// does it on its own every few seconds).
    Rebalance,
    /// Register a new broker; start it with `petrel-broker --join` (or
    /// `--peers`). New queues and moved replicas can then go to it.
    AddBroker {
        /// The new broker's id (a positive integer unused in the cluster).
        id: u64,
        /// Address the broker advertises, HOST:PORT.
        address: String,
    },
    /// Move every replica and leadership off a broker so it can be removed.
    /// Returns at once; `cluster describe` shows its counts fall to zero.
    Drain {
        /// Broker id.
        broker: u64,
    },
    /// Make a drained broker eligible for replicas and leaderships again.
    Undrain {
        /// Broker id.
        broker: u64,
    },
    /// Forget a broker that holds no replicas (drain it first).
    RemoveBroker {
        /// Broker id.
        broker: u64,
    },
}

/// Why a command failed.
#[derive(Debug)]
pub enum CliError {
    /// A typed error from the cluster or the SDK.
    Petrel(PetrelError),
    /// Bad command-line usage (exit code 2).
    Usage(String),
    /// Anything else (I/O, `petrel dev`).
    Other(anyhow::Error),
    /// Stdout was closed: end quietly.
    BrokenPipe,
}

impl From<PetrelError> for CliError {
    fn from(e: PetrelError) -> Self {
        Self::Petrel(e)
    }
}

impl From<std::io::Error> for CliError {
    fn from(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            Self::BrokenPipe
        } else {
            Self::Other(e.into())
        }
    }
}

impl CliError {
    fn code_name(&self) -> &'static str {
        match self {
            Self::Petrel(e) => e.code_name(),
            Self::Usage(_) => "usage",
            Self::Other(_) | Self::BrokenPipe => "error",
        }
    }

    fn message(&self) -> String {
        match self {
            Self::Petrel(e) => e.to_string(),
            Self::Usage(m) => m.clone(),
            // One line: the outermost context and its causes.
            Self::Other(e) => format!("{e:#}").replace('\n', " "),
            Self::BrokenPipe => "broken pipe".to_string(),
        }
    }

    fn exit_code(&self) -> u8 {
        match self {
            Self::BrokenPipe => 0,
            Self::Usage(_) => 2,
            _ => 1,
        }
    }
}

pub(crate) type CliResult<T = ()> = Result<T, CliError>;

/// Installs the log subscriber on stderr: `RUST_LOG` if set, else `info` for
/// `petrel dev` and `warn` otherwise. Safe to call once more (later calls do
/// nothing), so `dev` code must not rely on installing its own.
pub fn init_tracing(cli: &Cli) {
    let default = match cli.command {
        // Petrel's own start/stop lines; openraft's chatter only on request.
        #[cfg(feature = "dev")]
        Command::Dev(_) => "warn,openraft=error,petrel_proxy=error",
        _ => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// A clap usage error as rendered over several lines, folded into one
/// line: (what is wrong, the usage line). The first line's text, the
/// argument lines under it and any `tip:` make up the message; the
/// `Usage: ...` line is kept apart; "For more information" is dropped.
pub fn one_line_usage_error(rendered: &str) -> (String, String) {
    let mut message: Vec<String> = Vec::new();
    let mut usage = String::new();
    for l in rendered.lines() {
        let t = l.trim();
        if t.is_empty() || t.starts_with("For more information") {
            continue;
        }
        if let Some(u) = t.strip_prefix("Usage:") {
            usage = format!("Usage: {}", u.trim());
            continue;
        }
        let t = t.strip_prefix("error: ").unwrap_or(t);
        message.push(t.to_string());
    }
    // "...were not provided:" is followed by the arguments, one per line:
    // they become a comma-separated list; other lines join with "; ".
    let mut out = String::new();
    let mut list: Option<bool> = None; // Some(first item still to come)
    for part in message {
        let item = list.is_some() && !part.starts_with("tip:");
        if out.is_empty() {
            out = part.clone();
        } else if item {
            out.push_str(if list == Some(true) { " " } else { ", " });
            out.push_str(&part);
        } else {
            out.push_str("; ");
            out.push_str(&part);
        }
        list = if part.ends_with(':') {
            Some(true)
        } else if item {
            Some(false)
        } else {
            None
        };
    }
    let message = if out.is_empty() {
        "invalid usage".to_string()
    } else {
        out
    };
    (message, usage)
}

/// Runs the parsed command; prints any error as one line on stderr.
pub async fn run(cli: Cli) -> ExitCode {
    let json = cli.json;
    match execute(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = e.exit_code();
            if code != 0 {
                // Exactly one line: plain text, or with --json one JSON
                // object a script can parse.
                let mut err = std::io::stderr().lock();
                if json {
                    let v = json!({"error": {"code": e.code_name(), "message": e.message()}});
                    let _ = writeln!(err, "{v}");
                } else {
                    let _ = writeln!(err, "error: {}", e.message());
                }
            }
            ExitCode::from(code)
        }
    }
}

async fn execute(cli: Cli) -> CliResult {
    let json = cli.json;
    let command = match cli.command {
        #[cfg(feature = "dev")]
        Command::Dev(args) => return crate::dev::run(args, json).await.map_err(CliError::Other),
        Command::User(cmd) => return crate::users::user(cmd, json),
        Command::Acl(cmd) => return crate::users::acl(cmd, json),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "petrel", &mut out);
            std::io::stdout().lock().write_all(&out)?;
            return Ok(());
        }
        c => c,
    };
    let endpoints: Vec<String> = cli
        .endpoint
        .iter()
        .map(|e| e.trim().to_string())
        .filter(|e| !e.is_empty())
        .collect();
    if endpoints.is_empty() {
        return Err(CliError::Usage("--endpoint is empty".to_string()));
    }
    let mut builder = Client::builder(endpoints).request_timeout(cli.timeout);
    match (cli.access_key, cli.secret_key) {
        (Some(ak), Some(sk)) => builder = builder.credentials(ak, sk),
        (None, None) => {}
        (Some(_), None) => {
            return Err(CliError::Usage(
                "--access-key needs --secret-key (or PETREL_SECRET_KEY)".into(),
            ))
        }
        (None, Some(_)) => {
            return Err(CliError::Usage(
                "--secret-key needs --access-key (or PETREL_ACCESS_KEY)".into(),
            ))
        }
    }
    let pem = |p: &std::path::Path| {
        std::fs::read(p).map_err(|e| CliError::Usage(format!("reading {}: {e}", p.display())))
    };
    if let Some(ca) = &cli.ca_cert {
        builder = builder.ca_certificate(pem(ca)?);
    }
    if let (Some(cert), Some(key)) = (&cli.client_cert, &cli.client_key) {
        builder = builder.identity(pem(cert)?, pem(key)?);
    }
    let client = builder.build()?;
    match command {
        #[cfg(feature = "dev")]
        Command::Dev(_) => Ok(()),
        Command::User(_) | Command::Acl(_) | Command::Completions { .. } => Ok(()),
        Command::Topic(cmd) => topic(&client, cmd, json).await,
        Command::Produce(args) => produce(&client, args, json).await,
        Command::Consume(args) => consume(&client, args, json).await,
        Command::Read(args) => read(&client, args, json).await,
        Command::Commit(args) => commit(&client, args, json).await,
        Command::Offset(args) => offset(&client, args, json).await,
        Command::Group(cmd) => group(&client, cmd, json).await,
        Command::Cluster(ClusterCmd::Describe) => cluster(&client, json).await,
        Command::Cluster(cmd) => cluster_admin(&client, cmd, json).await,
        Command::Message(cmd) => message(&client, cmd, json).await,
        Command::Top(args) => top(&client, args, json).await,
    }
}

/// One `top` sample: per topic the end offsets; per (group, topic) the
/// committed offsets, lag, in flight, dead letters.
struct TopSample {
    at: std::time::Instant,
    topics: BTreeMap<String, u64>,
    groups: BTreeMap<(String, String), GroupSample>,
}

/// One consumer group on one topic in a `top` sample (summed over queues;
/// `lag_ms` is the worst queue's).
#[derive(Default, Clone, Copy)]
struct GroupSample {
    committed: u64,
    lag: u64,
    inflight: u64,
    dead: u64,
    lag_ms: u64,
}

async fn top_sample(client: &Client) -> CliResult<TopSample> {
    let admin = client.admin();
    let mut topics = BTreeMap::new();
    for t in admin.list_topics().await?.topics {
        let name = t.config.map(|c| c.name).unwrap_or_default();
        topics.insert(name, t.queues.iter().map(|q| q.end_offset).sum());
    }
    let mut groups = BTreeMap::new();
    for g in admin.list_groups().await?.groups {
        let Ok(d) = admin.describe_group(g.name.clone()).await else {
            continue;
        };
        for q in d.queues {
            let e: &mut GroupSample = groups.entry((g.name.clone(), q.topic)).or_default();
            e.committed += q.committed_offset;
            e.lag += q.lag;
            e.inflight += q.inflight;
            e.dead += q.dead_lettered;
            e.lag_ms = e.lag_ms.max(q.lag_ms);
        }
    }
    Ok(TopSample {
        at: std::time::Instant::now(),
        topics,
        groups,
    })
}

async fn top(client: &Client, a: TopArgs, json: bool) -> CliResult {
    let interval = Duration::from_millis(a.interval_ms);
    let mut prev = top_sample(client).await?;
    let mut n = 0u64;
    loop {
        if a.iterations.is_some_and(|max| n >= max) {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
        let cur = top_sample(client).await?;
        let dt = cur.at.duration_since(prev.at).as_secs_f64().max(1e-3);
        let rate = |now: u64, before: u64| now.saturating_sub(before) as f64 / dt;
        if json {
            let topics: Vec<Value> = cur
                .topics
                .iter()
                .map(|(t, end)| {
                    json!({"topic": t, "end_offset": end,
                           "produce_per_sec": rate(*end, prev.topics.get(t).copied().unwrap_or(*end))})
                })
                .collect();
            let groups: Vec<Value> = cur
                .groups
                .iter()
                .map(|((g, t), s)| {
                    let before = prev
                        .groups
                        .get(&(g.clone(), t.clone()))
                        .map_or(s.committed, |x| x.committed);
                    json!({"group": g, "topic": t, "consume_per_sec": rate(s.committed, before),
                           "lag": s.lag, "lag_ms": s.lag_ms, "inflight": s.inflight,
                           "dead_lettered": s.dead})
                })
                .collect();
            json_line(&json!({"topics": topics, "groups": groups}))?;
        } else {
            // Clear the screen and go home, then draw both tables.
            print!("\x1b[2J\x1b[H");
            let mut tab = Table::new(&["TOPIC", "END", "PRODUCE/S"]);
            for (t, end) in &cur.topics {
                let before = prev.topics.get(t).copied().unwrap_or(*end);
                tab.row(vec![
                    t.clone(),
                    end.to_string(),
                    format!("{:.1}", rate(*end, before)),
                ]);
            }
            tab.print()?;
            line("")?;
            let mut tab = Table::new(&[
                "GROUP",
                "TOPIC",
                "CONSUME/S",
                "LAG",
                "LAG_AGE",
                "INFLIGHT",
                "DEAD",
            ]);
            for ((g, t), s) in &cur.groups {
                let before = prev
                    .groups
                    .get(&(g.clone(), t.clone()))
                    .map_or(s.committed, |x| x.committed);
                tab.row(vec![
                    g.clone(),
                    t.clone(),
                    format!("{:.1}", rate(s.committed, before)),
                    s.lag.to_string(),
                    age(s.lag_ms),
                    s.inflight.to_string(),
                    s.dead.to_string(),
                ]);
            }
            tab.print()?;
        }
        prev = cur;
        n += 1;
    }
}

async fn message(client: &Client, cmd: MessageCmd, json: bool) -> CliResult {
    let admin = client.admin();
    match cmd {
        MessageCmd::Get { id, topic } => {
            let r = admin.get_message_in(topic.unwrap_or_default(), id).await?;
            let m = ReceivedMessage::from(r.record.unwrap_or_default());
            let deliveries: Vec<Value> = r
                .deliveries
                .iter()
                .map(|d| {
                    json!({
                        "group": d.group,
                        "state": d.state,
                        "attempt": d.attempt,
                        "invisible_until_ms": d.invisible_until_ms,
                    })
                })
                .collect();
            if json {
                let mut v = record_json(&m);
                v["hold"] = json!(r.hold);
                v["deliveries"] = json!(deliveries);
                return Ok(json_line(&v)?);
            }
            let (body, enc) = body_text(&m.body);
            line(&format!("id:         {}", m.message_id))?;
            line(&format!("key:        {}", m.key))?;
            line(&format!("tag:        {}", m.tag))?;
            if !m.message_group.is_empty() {
                line(&format!("group:      {}", m.message_group))?;
            }
            if m.deliver_at_ms != 0 {
                line(&format!("deliver at: {} ms", m.deliver_at_ms))?;
            }
            if !r.hold.is_empty() {
                line(&format!("held:       {}", r.hold))?;
            }
            line(&format!("stored at:  {} ms", m.store_timestamp_ms))?;
            let props: BTreeMap<&String, &String> = m.properties.iter().collect();
            for (k, v) in props {
                line(&format!("property:   {k}={v}"))?;
            }
            line(&format!("body ({enc}): {body}"))?;
            let mut tab = Table::new(&["GROUP", "STATE", "ATTEMPT", "INVISIBLE_UNTIL_MS"]);
            for d in r.deliveries {
                tab.row(vec![
                    d.group,
                    d.state,
                    d.attempt.to_string(),
                    d.invisible_until_ms.to_string(),
                ]);
            }
            Ok(tab.print()?)
        }
        MessageCmd::Find { topic, key, max } => {
            for m in admin.find_messages(topic, key, max).await? {
                print_record(&m, json)?;
            }
            Ok(())
        }
    }
}

// ---------------------------------------------------------------- parsing

/// `NAME=VALUE`; the value may contain '='.
pub fn parse_property(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected NAME=VALUE, got {s:?}")),
    }
}

/// A humantime duration, or "forever" / "0" for no limit (zero).
pub fn parse_retention(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("forever") || t == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(t).map_err(|e| format!("{e} (try 7d, 12h or forever)"))
}

/// A byte count with an optional unit: B, K/KiB, M/MiB, G/GiB, T/TiB
/// (binary) or KB, MB, GB, TB (decimal).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("expected a byte count like 1048576 or 10GiB, got {s:?}"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        other => return Err(format!("unknown unit {other:?} in {s:?}")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// A deterministic printable body of exactly `size` bytes containing `index`.
pub fn generated_body(index: u64, size: usize) -> Vec<u8> {
    const FILL: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut b = format!("msg-{index:012} ").into_bytes();
    b.truncate(size);
    let mut i = 0;
    while b.len() < size {
        b.push(FILL[i % FILL.len()]);
        i += 1;
    }
    b
}

fn retention_text(ms: u64) -> String {
    if ms == 0 {
        "forever".to_string()
    } else {
        humantime::format_duration(Duration::from_millis(ms)).to_string()
    }
}

fn bytes_text(n: u64) -> String {
    if n == 0 {
        "unlimited".to_string()
    } else {
        n.to_string()
    }
}

fn message_type_name(t: i32) -> &'static str {
    match pb::MessageType::try_from(t) {
        Ok(pb::MessageType::Normal) => "normal",
        Ok(pb::MessageType::Fifo) => "fifo",
        Ok(pb::MessageType::Delay) => "delay",
        Ok(pb::MessageType::Transaction) => "transaction",
        _ => "unspecified",
    }
}

fn id_or_dash(id: u64) -> String {
    if id == 0 {
        "-".to_string()
    } else {
        id.to_string()
    }
}

// ---------------------------------------------------------------- topics

fn topic_json(t: &pb::TopicInfo) -> Value {
    let c = t.config.clone().unwrap_or_default();
    json!({
        "name": c.name,
        "queue_count": c.queue_count,
        "replication_factor": c.replication_factor,
        "message_type": message_type_name(c.message_type),
        "retention_ms": c.retention_ms,
        "retention_bytes": c.retention_bytes,
        "queues": t.queues.iter().map(|q| json!({
            "queue": q.queue,
            "group_id": q.group_id,
            "replicas": q.replicas,
            "leader": q.leader,
            "start_offset": q.start_offset,
            "end_offset": q.end_offset,
        })).collect::<Vec<_>>(),
    })
}

fn print_topic(t: &pb::TopicInfo, json: bool) -> CliResult {
    if json {
        return Ok(json_line(&topic_json(t))?);
    }
    let c = t.config.clone().unwrap_or_default();
    let mut head = Table::new(&["", ""]);
    head.row(vec!["topic:".into(), c.name.clone()]);
    head.row(vec!["queues:".into(), c.queue_count.to_string()]);
    head.row(vec!["replicas:".into(), c.replication_factor.to_string()]);
    head.row(vec![
        "type:".into(),
        message_type_name(c.message_type).into(),
    ]);
    head.row(vec!["retention:".into(), retention_text(c.retention_ms)]);
    head.row(vec![
        "retention bytes:".into(),
        bytes_text(c.retention_bytes),
    ]);
    // Skip the (empty) header row of the key/value table.
    let text = head.render();
    let mut out = text.lines().skip(1).collect::<Vec<_>>().join("\n");
    out.push('\n');
    std::io::stdout().lock().write_all(out.as_bytes())?;
    if !t.queues.is_empty() {
        line("")?;
        let mut tab = Table::new(&["QUEUE", "GROUP", "REPLICAS", "LEADER", "START", "END"]);
        for q in &t.queues {
            tab.row(vec![
                q.queue.to_string(),
                q.group_id.to_string(),
                q.replicas
                    .iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
                id_or_dash(q.leader),
                q.start_offset.to_string(),
                q.end_offset.to_string(),
            ]);
        }
        tab.print()?;
    }
    Ok(())
}

async fn topic(client: &Client, cmd: TopicCmd, json: bool) -> CliResult {
    let admin = client.admin();
    match cmd {
        TopicCmd::Create(a) => {
            let replicas = match a.replicas {
                Some(r) => r,
                None => {
                    let brokers = admin
                        .describe_cluster()
                        .await?
                        .brokers
                        .iter()
                        .filter(|b| b.state != "draining")
                        .count() as u32;
                    petrel_sdk::defaults::DEFAULT_REPLICAS.min(brokers.max(1))
                }
            };
            let mut spec = TopicSpec::new(a.name)
                .queues(a.queues)
                .replicas(replicas)
                .message_type(a.message_type.into());
            if let Some(r) = a.retention {
                spec = spec.retention(r);
            }
            if let Some(b) = a.retention_bytes {
                spec = spec.retention_bytes(b);
            }
            let info = admin.create_topic(spec).await?;
            print_topic(&info, json)?;
            if !json && a.replicas.is_none() {
                line(&format!(
                    "(replicas: the default, {replicas} = min({}, brokers); --replicas sets it)",
                    petrel_sdk::defaults::DEFAULT_REPLICAS
                ))?;
            }
            Ok(())
        }
        TopicCmd::List => {
            let topics = admin.list_topics().await?.topics;
            if json {
                for t in &topics {
                    json_line(&topic_json(t))?;
                }
                return Ok(());
            }
            let mut tab = Table::new(&[
                "NAME",
                "QUEUES",
                "REPLICAS",
                "TYPE",
                "RETENTION",
                "RETENTION_BYTES",
            ]);
            for t in &topics {
                let c = t.config.clone().unwrap_or_default();
                tab.row(vec![
                    c.name,
                    c.queue_count.to_string(),
                    c.replication_factor.to_string(),
                    message_type_name(c.message_type).into(),
                    retention_text(c.retention_ms),
                    bytes_text(c.retention_bytes),
                ]);
            }
            Ok(tab.print()?)
        }
        TopicCmd::Describe { name } => {
            let info = admin.describe_topic(name).await?;
            print_topic(&info, json)
        }
        TopicCmd::Update(a) => {
            if a.queues.is_none() && a.retention.is_none() && a.retention_bytes.is_none() {
                return Err(CliError::Usage(
                    "nothing to update: give --queues, --retention or --retention-bytes"
                        .to_string(),
                ));
            }
            let req = pb::UpdateTopicRequest {
                name: a.name,
                queue_count: a.queues.unwrap_or(0),
                retention_ms: a
                    .retention
                    .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                retention_bytes: a.retention_bytes,
            };
            let info = admin.update_topic(req).await?;
            print_topic(&info, json)
        }
        TopicCmd::Delete { name } => {
            admin.delete_topic(name.clone()).await?;
            if json {
                Ok(json_line(&json!({"deleted": name}))?)
            } else {
                Ok(line(&format!("deleted topic {name}"))?)
            }
        }
    }
}

// ---------------------------------------------------------------- produce

type MessageStream = Pin<Box<dyn Stream<Item = CliResult<Message>> + Send>>;

fn stdin_messages() -> MessageStream {
    let reader = tokio::io::BufReader::new(tokio::io::stdin());
    Box::pin(stream::unfold(Some(reader), |reader| async move {
        let mut reader = reader?;
        let mut buf = Vec::new();
        match reader.read_until(b'\n', &mut buf).await {
            Ok(0) => None,
            Ok(_) => {
                if buf.last() == Some(&b'\n') {
                    buf.pop();
                    if buf.last() == Some(&b'\r') {
                        buf.pop();
                    }
                }
                Some((Ok(Message::new(buf)), Some(reader)))
            }
            Err(e) => Some((Err(CliError::Other(e.into())), None)),
        }
    }))
}

/// A progress line on stderr every `PROGRESS_EVERY` for commands that run
/// until their input or Ctrl-C ends (produce from stdin, consume without
/// --max): records so far and the recent rate. Only when both stdout and
/// stderr are a terminal and --json is off: piped output and scripts see
/// nothing but records.
struct Progress {
    on: bool,
    verb: &'static str,
    start: std::time::Instant,
    last: std::time::Instant,
    last_n: u64,
    n: u64,
}

const PROGRESS_EVERY: Duration = Duration::from_secs(2);

impl Progress {
    fn new(verb: &'static str, wanted: bool, json: bool) -> Self {
        use std::io::IsTerminal;
        let now = std::time::Instant::now();
        Self {
            on: wanted
                && !json
                && std::io::stdout().is_terminal()
                && std::io::stderr().is_terminal(),
            verb,
            start: now,
            last: now,
            last_n: 0,
            n: 0,
        }
    }

    fn add(&mut self, k: u64) {
        self.n += k;
        if !self.on || self.last.elapsed() < PROGRESS_EVERY {
            return;
        }
        let rate = (self.n - self.last_n) as f64 / self.last.elapsed().as_secs_f64();
        eprintln!("-- {} {} records ({rate:.0}/s)", self.verb, self.n);
        self.last = std::time::Instant::now();
        self.last_n = self.n;
    }

    fn finish(&self) {
        if self.on && self.n > 0 {
            let secs = self.start.elapsed().as_secs_f64();
            eprintln!(
                "-- {} {} records in {secs:.1} s ({:.0}/s)",
                self.verb,
                self.n,
                self.n as f64 / secs.max(1e-3)
            );
        }
    }
}

async fn produce(client: &Client, a: ProduceArgs, json: bool) -> CliResult {
    // One request in flight: what arrives meanwhile batches behind it, and
    // records (stdin lines above all) are stored in the order given. Two
    // requests in flight may reach a queue's leader in either order.
    let mut builder = client.producer(a.topic.clone()).max_in_flight(1);
    if let Some(id) = &a.producer_id {
        builder = builder.producer_id(id.clone());
    }
    let producer = builder.build();
    let bodies: MessageStream = match a.count {
        Some(n) => {
            let size = a.size;
            Box::pin(stream::iter(0..n).map(move |i| Ok(Message::new(generated_body(i, size)))))
        }
        None => stdin_messages(),
    };
    let deliver_at = match &a.deliver_at {
        Some(t) => Some(parse_time(t)?),
        None => None,
    };
    let (key, tag, props) = (a.key, a.tag, a.properties);
    let (mgroup, delay_ms) = (a.message_group, a.delay_ms);
    let decorate = move |mut m: Message| {
        if let Some(g) = &mgroup {
            m = m.with_message_group(g.clone());
        }
        if let Some(d) = delay_ms {
            m = m.with_delay(Duration::from_millis(d));
        }
        if let Some(at) = deliver_at {
            m = m.with_deliver_at(at);
        }
        if let Some(k) = &key {
            m = m.with_key(k.clone());
        }
        if let Some(t) = &tag {
            m = m.with_tag(t.clone());
        }
        for (k, v) in &props {
            m = m.with_property(k.clone(), v.clone());
        }
        m
    };
    let p = producer.clone();
    // Messages enter the batcher one after another, in input order; their
    // receipts are awaited `--concurrency` at a time.
    let acks = bodies
        .then(move |m| {
            let p = p.clone();
            let m = m.map(&decorate);
            async move {
                match m {
                    Ok(m) => p.enqueue(m).await.map_err(CliError::from),
                    Err(e) => Err(e),
                }
            }
        })
        .map(|queued| async move { queued?.await.map_err(CliError::from) })
        .buffered(a.concurrency as usize);
    let mut acks = std::pin::pin!(acks);
    let mut progress = Progress::new("produced", a.count.is_none(), json);
    while let Some(r) = acks.next().await {
        let r = r?;
        progress.add(1);
        if json {
            json_line(&json!({
                "id": r.message_id,
                "queue": r.queue,
                "offset": r.offset,
                "duplicate": r.duplicate,
            }))?;
        } else {
            line(&r.message_id)?;
        }
    }
    producer.close().await;
    progress.finish();
    Ok(())
}

// ---------------------------------------------------------------- consume / read

/// The body as text when it is UTF-8, else base64; with the encoding name.
pub fn body_text(body: &[u8]) -> (String, &'static str) {
    match std::str::from_utf8(body) {
        Ok(s) => (s.to_string(), "utf8"),
        Err(_) => (
            base64::engine::general_purpose::STANDARD.encode(body),
            "base64",
        ),
    }
}

fn record_json(m: &ReceivedMessage) -> Value {
    let (body, enc) = body_text(&m.body);
    let props: BTreeMap<&String, &String> = m.properties.iter().collect();
    json!({
        "id": m.message_id,
        "queue": m.queue,
        "offset": m.offset,
        "key": m.key,
        "tag": m.tag,
        "attempt": m.attempt,
        "message_group": m.message_group,
        "deliver_at_ms": m.deliver_at_ms,
        "store_timestamp_ms": m.store_timestamp_ms,
        "properties": props,
        "body": body,
        "body_encoding": enc,
    })
}

/// `id<TAB>body`: the body verbatim when it is UTF-8 without control
/// characters, else `base64:<...>`, so each record stays on one line.
fn record_plain(m: &ReceivedMessage) -> String {
    let body = match std::str::from_utf8(&m.body) {
        Ok(s) if !s.chars().any(char::is_control) => s.to_string(),
        _ => format!(
            "base64:{}",
            base64::engine::general_purpose::STANDARD.encode(&m.body)
        ),
    };
    format!("{}\t{}", m.message_id, body)
}

fn print_record(m: &ReceivedMessage, json: bool) -> CliResult {
    if json {
        Ok(json_line(&record_json(m))?)
    } else {
        Ok(line(&record_plain(m))?)
    }
}

async fn consume(client: &Client, a: ConsumeArgs, json: bool) -> CliResult {
    let mut builder = client.simple_consumer(a.topic.clone(), a.group.clone());
    if let Some(f) = &a.filter_tag {
        builder = builder.filter_tag(f.clone());
    }
    if let Some(f) = &a.filter_sql {
        builder = builder.filter_sql(f.clone());
    }
    if let Some(n) = a.max_attempts {
        builder = builder.retry_policy(petrel_sdk::RetryPolicy {
            max_attempts: n,
            ..Default::default()
        });
    }
    let consumer = builder.build();
    let invisible = Duration::from_millis(a.invisible_ms);
    let wait = a.wait_ms.map(Duration::from_millis);
    // Pipelined so printing, not waiting, bounds it: the next receive is
    // in flight while a batch prints, and acks (or nacks) go in the
    // background, at most `CONSUME_ACKS_IN_FLIGHT` at once. One receive at
    // a time keeps each queue's records in offset order on the output,
    // and it never asks for more than `--max` leaves to print, so it
    // leases nothing it will not print.
    let progress = std::sync::Mutex::new(Progress::new("consumed", a.max.is_none(), json));
    let work = async {
        let mut printed: u64 = 0;
        let want = |printed: u64| match a.max {
            Some(max) => (max - printed).min(CONSUME_BATCH),
            None => CONSUME_BATCH,
        };
        let receive = |n: u64| {
            let consumer = consumer.clone();
            tokio::spawn(async move {
                consumer
                    .receive_with(n as u32, invisible, wait.unwrap_or(FOREVER_POLL_WAIT))
                    .await
            })
        };
        let acks = std::sync::Arc::new(tokio::sync::Semaphore::new(CONSUME_ACKS_IN_FLIGHT));
        let mut acking = tokio::task::JoinSet::new();
        let mut next = (want(0) > 0).then(|| receive(want(0)));
        let mut failed: Option<petrel_sdk::Error> = None;
        while let Some(pending) = next.take() {
            let batch = match pending.await {
                Ok(Ok(b)) => b,
                Ok(Err(e)) => {
                    failed = Some(e);
                    break;
                }
                Err(e) => return Err(CliError::Other(anyhow::anyhow!("receive task failed: {e}"))),
            };
            if batch.is_empty() {
                if wait.is_some() {
                    break;
                }
                next = Some(receive(want(printed)));
                continue;
            }
            printed += batch.len() as u64;
            if want(printed) > 0 {
                next = Some(receive(want(printed)));
            }
            for m in &batch {
                print_record(m, json)?;
            }
            progress
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .add(batch.len() as u64);
            let Ok(permit) = acks.clone().acquire_owned().await else {
                break;
            };
            let (consumer, nack, no_ack) = (consumer.clone(), a.nack.clone(), a.no_ack);
            acking.spawn(async move {
                let _permit = permit;
                if let Some(reason) = nack {
                    for m in &batch {
                        if let Err(e) = consumer.nack(m, &reason).await {
                            tracing::warn!(id = %m.message_id, error = %e, "nack failed");
                        }
                    }
                } else if !no_ack {
                    for (m, r) in batch.iter().zip(consumer.ack_many(&batch).await?) {
                        if let Err(e) = r {
                            tracing::warn!(id = %m.message_id, error = %e, "ack failed; the record will be redelivered");
                        }
                    }
                }
                Ok::<(), petrel_sdk::Error>(())
            });
            // Reap finished acks, and stop at the first that failed whole.
            while let Some(r) = acking.try_join_next() {
                if let Ok(Err(e)) = r {
                    failed.get_or_insert(e);
                }
            }
            if failed.is_some() {
                break;
            }
        }
        while let Some(r) = acking.join_next().await {
            if let Ok(Err(e)) = r {
                failed.get_or_insert(e);
            }
        }
        match failed {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    };
    let interrupted = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let r = tokio::select! {
        r = work => r,
        _ = interrupted => Ok(()),
    };
    progress.lock().unwrap_or_else(|e| e.into_inner()).finish();
    r
}

async fn read(client: &Client, a: ReadArgs, json: bool) -> CliResult {
    let pull = client.pull_consumer(a.topic.clone(), String::new());
    let mut offset = a.offset;
    let mut printed: u64 = 0;
    loop {
        let want = match a.max {
            Some(max) if printed >= max => return Ok(()),
            Some(max) => (max - printed).min(u64::from(u32::MAX)) as u32,
            None => 0,
        };
        let batch = pull.read(a.queue, offset, READ_MAX_BYTES, want).await?;
        let limit = if want == 0 { usize::MAX } else { want as usize };
        for m in batch.records.iter().take(limit) {
            print_record(m, json)?;
            printed += 1;
        }
        let progressed = batch.next_offset > offset;
        offset = batch.next_offset;
        // Stop at the queue's current end, or if the server made no progress.
        if offset >= batch.end_offset || !progressed {
            return Ok(());
        }
    }
}

async fn commit(client: &Client, a: CommitArgs, json: bool) -> CliResult {
    let pull = client.pull_consumer(a.topic.clone(), a.group.clone());
    pull.commit(a.queue, a.offset).await?;
    if json {
        Ok(json_line(&json!({
            "topic": a.topic, "group": a.group, "queue": a.queue, "offset": a.offset,
        }))?)
    } else {
        Ok(line(&format!(
            "committed offset {} for group {} on {}/{}",
            a.offset, a.group, a.topic, a.queue
        ))?)
    }
}

async fn offset(client: &Client, a: OffsetArgs, json: bool) -> CliResult {
    let pull = client.pull_consumer(a.topic.clone(), a.group.clone());
    let o = pull.committed(a.queue).await?;
    let lag = o
        .end_offset
        .saturating_sub(o.committed_offset.max(o.start_offset));
    if json {
        return Ok(json_line(&json!({
            "topic": a.topic, "group": a.group, "queue": a.queue,
            "committed_offset": o.committed_offset,
            "start_offset": o.start_offset,
            "end_offset": o.end_offset,
            "lag": lag,
        }))?);
    }
    let mut tab = Table::new(&[
        "TOPIC",
        "GROUP",
        "QUEUE",
        "COMMITTED",
        "START",
        "END",
        "LAG",
    ]);
    tab.row(vec![
        a.topic,
        a.group,
        a.queue.to_string(),
        o.committed_offset.to_string(),
        o.start_offset.to_string(),
        o.end_offset.to_string(),
        lag.to_string(),
    ]);
    Ok(tab.print()?)
}

// ---------------------------------------------------------------- groups / cluster

/// Where `group reset` moves a queue.
enum ResetTarget {
    Earliest,
    Latest,
    Offset(u64),
    Time(i64),
}

/// A time given as epoch ms or RFC 3339, as epoch ms.
fn parse_time(t: &str) -> CliResult<i64> {
    if let Ok(ms) = t.parse::<i64>() {
        return Ok(ms);
    }
    let at = humantime::parse_rfc3339_weak(t).map_err(|e| {
        CliError::Usage(format!(
            "time {t:?}: {e} (use RFC 3339 like 2026-11-26T10:00:00Z, or epoch ms)"
        ))
    })?;
    Ok(at
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| CliError::Usage(format!("time {t:?} is before 1970")))?
        .as_millis() as i64)
}

fn reset_target(to: Option<String>, to_time: Option<String>) -> CliResult<ResetTarget> {
    match (to.as_deref(), to_time) {
        (Some("earliest"), None) => Ok(ResetTarget::Earliest),
        (Some("latest"), None) => Ok(ResetTarget::Latest),
        (Some(n), None) => n.parse().map(ResetTarget::Offset).map_err(|_| {
            CliError::Usage(format!(
                "--to must be earliest, latest or an offset, not {n:?}"
            ))
        }),
        (None, Some(t)) => Ok(ResetTarget::Time(parse_time(&t)?)),
        _ => Err(CliError::Usage(
            "give exactly one of --to or --to-time".to_string(),
        )),
    }
}

async fn group_reset(
    client: &Client,
    group: String,
    topic: String,
    to: Option<String>,
    to_time: Option<String>,
    queue: Option<u32>,
    json: bool,
) -> CliResult {
    let target = reset_target(to, to_time)?;
    let info = client.admin().describe_topic(topic.clone()).await?;
    let pull = client.pull_consumer(topic.clone(), group.clone());
    let queues: Vec<&pb::QueueInfo> = info
        .queues
        .iter()
        .filter(|q| queue.is_none_or(|n| n == q.queue))
        .collect();
    if queues.is_empty() {
        return Err(PetrelError::NotFound(format!(
            "topic {topic:?} has no queue {}",
            queue.unwrap_or_default()
        ))
        .into());
    }
    let mut tab = Table::new(&["TOPIC", "QUEUE", "OFFSET"]);
    for q in queues {
        let offset = match target {
            ResetTarget::Earliest => q.start_offset,
            ResetTarget::Latest => q.end_offset,
            ResetTarget::Offset(n) => n,
            ResetTarget::Time(ms) => pull.offset_for_time(q.queue, ms).await?,
        };
        pull.commit(q.queue, offset).await?;
        if json {
            json_line(&json!({
                "group": group,
                "topic": topic,
                "queue": q.queue,
                "offset": offset,
            }))?;
        } else {
            tab.row(vec![topic.clone(), q.queue.to_string(), offset.to_string()]);
        }
    }
    if json {
        return Ok(());
    }
    Ok(tab.print()?)
}

async fn group(client: &Client, cmd: GroupCmd, json: bool) -> CliResult {
    let admin = client.admin();
    match cmd {
        GroupCmd::Reset {
            group,
            topic,
            to,
            to_time,
            queue,
        } => group_reset(client, group, topic, to, to_time, queue, json).await,
        GroupCmd::Delete { group, topic } => {
            let r = admin.delete_group(group.clone(), topic).await?;
            if json {
                return Ok(json_line(
                    &json!({"deleted": group, "topics": r.topics, "queues": r.queues}),
                )?);
            }
            if r.queues == 0 {
                return Ok(line(&format!(
                    "consumer group {group} had no state; nothing to delete"
                ))?);
            }
            Ok(line(&format!(
                "deleted consumer group {group} on {} queue(s) of {}",
                r.queues,
                r.topics.join(", ")
            ))?)
        }
        GroupCmd::List => {
            let groups = admin.list_groups().await?.groups;
            if json {
                for g in &groups {
                    json_line(&json!({"group": g.name, "topics": g.topics}))?;
                }
                return Ok(());
            }
            let mut tab = Table::new(&["GROUP", "TOPICS"]);
            for g in groups {
                tab.row(vec![g.name, g.topics.join(",")]);
            }
            Ok(tab.print()?)
        }
        GroupCmd::Describe { group } => {
            let d = admin.describe_group(group).await?;
            if json {
                for q in &d.queues {
                    json_line(&json!({
                        "group": d.group,
                        "topic": q.topic,
                        "queue": q.queue,
                        "committed_offset": q.committed_offset,
                        "end_offset": q.end_offset,
                        "lag": q.lag,
                        "lag_ms": q.lag_ms,
                        "inflight": q.inflight,
                        "skipped": q.skipped,
                        "dead_lettered": q.dead_lettered,
                        "filtered": q.filtered,
                        "scheduled": q.scheduled,
                        "uncommitted": q.uncommitted,
                    }))?;
                }
                return Ok(());
            }
            let mut tab = Table::new(&[
                "TOPIC",
                "QUEUE",
                "COMMITTED",
                "END",
                "LAG",
                "LAG_AGE",
                "INFLIGHT",
                "SKIPPED",
                "DEAD",
                "FILTERED",
                "SCHEDULED",
            ]);
            for q in d.queues {
                tab.row(vec![
                    q.topic,
                    q.queue.to_string(),
                    q.committed_offset.to_string(),
                    q.end_offset.to_string(),
                    q.lag.to_string(),
                    age(q.lag_ms),
                    q.inflight.to_string(),
                    q.skipped.to_string(),
                    q.dead_lettered.to_string(),
                    q.filtered.to_string(),
                    q.scheduled.to_string(),
                ]);
            }
            Ok(tab.print()?)
        }
    }
}

async fn cluster(client: &Client, json: bool) -> CliResult {
    let c = client.admin().describe_cluster().await?;
    if json {
        return Ok(json_line(&json!({
            "meta_leader": c.meta_leader,
            "topic_count": c.topic_count,
            "queue_count": c.queue_count,
            "map_version": c.map_version,
            "brokers": c.brokers.iter().map(|b| json!({
                "id": b.id,
                "address": b.address,
                "reachable": b.reachable,
                "leader_count": b.leader_count,
                "replica_count": b.replica_count,
                "state": b.state,
                "meta_voter": b.meta_voter,
            })).collect::<Vec<_>>(),
        }))?);
    }
    line(&format!(
        "meta leader: {}   topics: {}   queues: {}   map version: {}",
        id_or_dash(c.meta_leader),
        c.topic_count,
        c.queue_count,
        c.map_version
    ))?;
    line("")?;
    let mut tab = Table::new(&[
        "ID",
        "ADDRESS",
        "STATE",
        "REACHABLE",
        "META",
        "LEADERS",
        "REPLICAS",
    ]);
    for b in c.brokers {
        tab.row(vec![
            b.id.to_string(),
            b.address,
            b.state,
            if b.reachable { "yes" } else { "no" }.to_string(),
            if b.meta_voter { "voter" } else { "learner" }.to_string(),
            b.leader_count.to_string(),
            b.replica_count.to_string(),
        ]);
    }
    Ok(tab.print()?)
}

async fn cluster_admin(client: &Client, cmd: ClusterCmd, json: bool) -> CliResult {
    let admin = client.admin();
    let (r, what) = match cmd {
        ClusterCmd::Describe => unreachable!("handled by cluster()"),
        ClusterCmd::Rebalance => (admin.rebalance().await?, "rebalance".to_string()),
        ClusterCmd::AddBroker { id, address } => (
            admin.add_broker(id, address.clone()).await?,
            format!("added broker {id} at {address}"),
        ),
        ClusterCmd::Drain { broker } => (
            admin.drain_broker(broker).await?,
            format!("draining broker {broker}"),
        ),
        ClusterCmd::Undrain { broker } => (
            admin.undrain_broker(broker).await?,
            format!("broker {broker} is active again"),
        ),
        ClusterCmd::RemoveBroker { broker } => (
            admin.remove_broker(broker).await?,
            format!("removed broker {broker}"),
        ),
    };
    if json {
        return Ok(json_line(&json!({
            "ok": true,
            "map_version": r.map_version,
            "moves": r.moves,
        }))?);
    }
    if what == "rebalance" {
        Ok(line(&format!("started {} leadership moves", r.moves))?)
    } else {
        Ok(line(&what)?)
    }
}

/// A lag age for people: `-` for none, else ms / s / m / h.
fn age(ms: u64) -> String {
    match ms {
        0 => "-".to_string(),
        1..=999 => format!("{ms}ms"),
        1_000..=59_999 => format!("{:.1}s", ms as f64 / 1000.0),
        60_000..=3_599_999 => format!("{:.1}m", ms as f64 / 60_000.0),
        _ => format!("{:.1}h", ms as f64 / 3_600_000.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_valid() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn endpoint_list_is_comma_separated() {
        let c = Cli::try_parse_from(["petrel", "--endpoint", "a:1,b:2", "topic", "list"]).unwrap();
        assert_eq!(c.endpoint, vec!["a:1", "b:2"]);
    }

    #[test]
    fn properties_and_sizes_parse() {
        assert_eq!(
            parse_property("a=b=c").unwrap(),
            ("a".to_string(), "b=c".to_string())
        );
        assert!(parse_property("=x").is_err());
        assert!(parse_property("novalue").is_err());
        assert_eq!(parse_bytes("10GiB").unwrap(), 10 << 30);
        assert_eq!(parse_bytes("5MB").unwrap(), 5_000_000);
        assert_eq!(parse_bytes("42").unwrap(), 42);
        assert!(parse_bytes("x").is_err());
        assert!(parse_bytes("99999999999T").is_err());
        assert_eq!(parse_retention("forever").unwrap(), Duration::ZERO);
        assert_eq!(
            parse_retention("7d").unwrap(),
            Duration::from_secs(7 * 86400)
        );
    }

    #[test]
    fn generated_bodies_have_exact_size_and_index() {
        let b = generated_body(42, 64);
        assert_eq!(b.len(), 64);
        assert!(std::str::from_utf8(&b).unwrap().contains("000000000042"));
        assert_eq!(generated_body(1, 0).len(), 0);
        assert_eq!(generated_body(1, 3), b"msg");
        assert_ne!(generated_body(1, 32), generated_body(2, 32));
    }

    #[test]
    fn bodies_are_utf8_or_base64() {
        assert_eq!(body_text(b"hi"), ("hi".to_string(), "utf8"));
        assert_eq!(body_text(&[0xff, 0x00]), ("/wA=".to_string(), "base64"));
    }
}
