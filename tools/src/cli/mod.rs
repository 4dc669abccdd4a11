//! Argument parsing (clap derive), the errors every command shares and the
//! dispatch to each subcommand group's module. Commands talk to the cluster
//! only through `petrel_sdk`.

#[cfg(feature = "dev")]
use crate::dev::DevArgs;
use clap::{Parser, Subcommand};
use petrel_sdk::{Client, Error as PetrelError};
use serde_json::json;
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

mod cluster;
mod consume;
mod format;
mod group;
mod message;
mod parse;
mod produce;
mod progress;
mod top;
mod topic;

pub use cluster::ClusterCmd;
pub use consume::{ConsumeArgs, ReadArgs};
pub use format::body_text;
pub use group::{CommitArgs, GroupCmd, OffsetArgs};
pub use message::MessageCmd;
pub use parse::{parse_bytes, parse_property, parse_retention};
pub use produce::{generated_body, ProduceArgs};
pub use top::TopArgs;
pub use topic::{MessageTypeArg, TopicCmd, TopicCreateArgs, TopicUpdateArgs};

use cluster::{cluster, cluster_admin};
use consume::{consume, read};
use group::{commit, group, offset};
use message::message;
use produce::produce;
use top::top;
use topic::topic;

/// Default proxy endpoint of `petrel dev`.
const DEFAULT_ENDPOINT: &str = "127.0.0.1:7400";

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

/// Installs the log subscriber on stderr: `RUST_LOG` if set, else `warn`
/// (for `petrel dev` also without openraft's and the proxy's warnings). Safe to call once more (later calls do
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
}
