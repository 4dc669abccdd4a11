//! `petrel user` and `petrel acl`: edit the proxy's users file (see
//! `petrel_proxy::auth`). They work on the file only, never on a running
//! proxy, which re-reads the file when it changes.

use crate::cli::{CliError, CliResult};
use crate::output::{json_line, line, Table};
use base64::Engine as _;
use clap::{Args, Subcommand};
use petrel_proxy::auth::{AuthFile, RuleEntry, UserEntry};
use serde_json::json;
use std::path::{Path, PathBuf};

/// Where the users file is (the proxy's `--auth-file`).
#[derive(Debug, Clone, Args)]
pub struct FileArg {
    /// The users file (created by the first `petrel user add`).
    #[arg(long, env = "PETREL_AUTH_FILE")]
    pub auth_file: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum UserCmd {
    /// Add a user; prints its secret key once (only a key derived from it
    /// is stored). Give the user rules with `petrel acl add`.
    Add {
        /// The user's name, also its access key.
        name: String,
        /// Use this secret instead of a generated one (at least 16 bytes).
        #[arg(long, env = "PETREL_NEW_SECRET", hide_env_values = true)]
        secret: Option<String>,
        #[command(flatten)]
        file: FileArg,
    },
    /// Remove a user and every rule naming it.
    Remove {
        name: String,
        #[command(flatten)]
        file: FileArg,
    },
    /// List the users.
    List {
        #[command(flatten)]
        file: FileArg,
    },
}

#[derive(Debug, Subcommand)]
pub enum AclCmd {
    /// Add a rule; prints its id. Deny wins over allow; with no allowing
    /// rule, nothing is allowed.
    Add(AclAddArgs),
    /// Remove a rule by id.
    Remove {
        id: u64,
        #[command(flatten)]
        file: FileArg,
    },
    /// List the rules.
    List {
        #[command(flatten)]
        file: FileArg,
    },
}

#[derive(Debug, Args)]
pub struct AclAddArgs {
    /// The user the rule is for, or `*` for every user.
    #[arg(long)]
    pub user: String,
    /// `topic:PATTERN`, `group:PATTERN`, `cluster`, or `*`; `*` in a
    /// pattern matches anything (e.g. topic:orders.*).
    #[arg(long)]
    pub resource: String,
    /// Comma-separated: publish, subscribe, create, update, delete,
    /// describe, admin, or *.
    #[arg(long, value_delimiter = ',', required = true)]
    pub actions: Vec<String>,
    /// A deny rule (default: allow).
    #[arg(long)]
    pub deny: bool,
    /// Only calls from this network, e.g. 10.0.0.0/8.
    #[arg(long)]
    pub source: Option<String>,
    #[command(flatten)]
    pub file: FileArg,
}

fn load(path: &Path, create: bool) -> CliResult<AuthFile> {
    match std::fs::read_to_string(path) {
        Ok(text) => AuthFile::parse(&text)
            .map_err(|e| CliError::Other(anyhow::anyhow!("{}: {e}", path.display()))),
        Err(e) if create && e.kind() == std::io::ErrorKind::NotFound => Ok(AuthFile::default()),
        Err(e) => Err(CliError::Other(anyhow::anyhow!(
            "reading {}: {e}",
            path.display()
        ))),
    }
}

/// Checks `f` as the proxy will, then replaces the file atomically
/// (readable by its owner only: it holds signing keys).
fn save(path: &Path, f: &AuthFile) -> CliResult {
    let text = f.to_toml();
    AuthFile::parse(&text).map_err(CliError::Usage)?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut o = std::fs::OpenOptions::new();
        o.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
        std::io::Write::write_all(&mut o.open(&tmp)?, text.as_bytes())?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        CliError::Other(anyhow::anyhow!("writing {}: {e}", path.display()))
    })
}

pub fn user(cmd: UserCmd, json: bool) -> CliResult {
    match cmd {
        UserCmd::Add { name, secret, file } => {
            let mut f = load(&file.auth_file, true)?;
            petrel_proto::validate::group_name(&name)
                .map_err(|e| CliError::Usage(format!("user name: {e}")))?;
            if f.users.iter().any(|u| u.name == name) {
                return Err(CliError::Petrel(petrel_sdk::Error::AlreadyExists(format!(
                    "user {name:?} (remove it first to change its secret)"
                ))));
            }
            let secret = match secret {
                Some(s) if s.len() < 16 => {
                    return Err(CliError::Usage("--secret must be at least 16 bytes".into()))
                }
                Some(s) => s,
                // Letters and digits only (~238 bits): never starts with
                // `-` (which a command line would take for a flag) and
                // needs no quoting.
                None => {
                    use rand::Rng as _;
                    rand::thread_rng()
                        .sample_iter(rand::distributions::Alphanumeric)
                        .take(40)
                        .map(char::from)
                        .collect()
                }
            };
            f.users.push(UserEntry {
                name: name.clone(),
                signing_key: base64::engine::general_purpose::STANDARD
                    .encode(petrel_proto::auth::signing_key(&name, &secret)),
                rocketmq_key: base64::engine::general_purpose::STANDARD
                    .encode(petrel_proto::rmq_auth::pad_states(&secret)),
            });
            save(&file.auth_file, &f)?;
            if json {
                json_line(&json!({"user": name, "access_key": name, "secret_key": secret}))?;
            } else {
                line(&format!("added user {name}"))?;
                line(&format!("access key: {name}"))?;
                line(&format!("secret key: {secret}"))?;
                line("(the secret key is shown only now; clients pass it as --secret-key or PETREL_SECRET_KEY)")?;
            }
            Ok(())
        }
        UserCmd::Remove { name, file } => {
            let mut f = load(&file.auth_file, false)?;
            let before = f.users.len();
            f.users.retain(|u| u.name != name);
            if f.users.len() == before {
                return Err(CliError::Petrel(petrel_sdk::Error::NotFound(format!(
                    "user {name:?}"
                ))));
            }
            let rules = f.rules.len();
            f.rules.retain(|r| r.user != name);
            let dropped = rules - f.rules.len();
            save(&file.auth_file, &f)?;
            if json {
                json_line(&json!({"removed": name, "rules_removed": dropped}))?;
            } else {
                line(&format!("removed user {name} and {dropped} rule(s)"))?;
            }
            Ok(())
        }
        UserCmd::List { file } => {
            let f = load(&file.auth_file, false)?;
            let rules = |n: &str| f.rules.iter().filter(|r| r.user == n).count();
            if json {
                for u in &f.users {
                    json_line(&json!({"user": u.name, "rules": rules(&u.name)}))?;
                }
            } else {
                let mut t = Table::new(&["USER", "RULES"]);
                for u in &f.users {
                    t.row(vec![u.name.clone(), rules(&u.name).to_string()]);
                }
                t.print()?;
            }
            Ok(())
        }
    }
}

fn rule_json(r: &RuleEntry) -> serde_json::Value {
    json!({
        "id": r.id,
        "user": r.user,
        "resource": r.resource,
        "actions": r.actions,
        "effect": r.effect,
        "source": r.source,
    })
}

pub fn acl(cmd: AclCmd, json: bool) -> CliResult {
    match cmd {
        AclCmd::Add(a) => {
            let mut f = load(&a.file.auth_file, false)?;
            let r = RuleEntry {
                id: f.next_rule_id(),
                user: a.user,
                resource: a.resource,
                actions: a.actions.iter().map(|s| s.trim().to_string()).collect(),
                effect: if a.deny { "deny" } else { "allow" }.into(),
                source: a.source,
            };
            f.rules.push(r.clone());
            // The same checks the proxy makes, as a usage error.
            petrel_proxy::auth::Policy::compile(&f).map_err(CliError::Usage)?;
            save(&a.file.auth_file, &f)?;
            if json {
                json_line(&rule_json(&r))?;
            } else {
                line(&format!(
                    "added rule {}: {} {} {} on {}",
                    r.id,
                    r.effect,
                    r.user,
                    r.actions.join(","),
                    r.resource
                ))?;
            }
            Ok(())
        }
        AclCmd::Remove { id, file } => {
            let mut f = load(&file.auth_file, false)?;
            let before = f.rules.len();
            f.rules.retain(|r| r.id != id);
            if f.rules.len() == before {
                return Err(CliError::Petrel(petrel_sdk::Error::NotFound(format!(
                    "rule {id}"
                ))));
            }
            save(&file.auth_file, &f)?;
            if json {
                json_line(&json!({"removed": id}))?;
            } else {
                line(&format!("removed rule {id}"))?;
            }
            Ok(())
        }
        AclCmd::List { file } => {
            let f = load(&file.auth_file, false)?;
            if json {
                for r in &f.rules {
                    json_line(&rule_json(r))?;
                }
            } else {
                let mut t = Table::new(&["ID", "USER", "EFFECT", "ACTIONS", "RESOURCE", "SOURCE"]);
                for r in &f.rules {
                    t.row(vec![
                        r.id.to_string(),
                        r.user.clone(),
                        r.effect.clone(),
                        r.actions.join(","),
                        r.resource.clone(),
                        r.source.clone().unwrap_or_else(|| "any".into()),
                    ]);
                }
                t.print()?;
            }
            Ok(())
        }
    }
}
