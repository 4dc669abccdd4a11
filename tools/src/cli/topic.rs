//! `petrel topic`: create, list, describe, update and delete topics, and the
//! topic table and `--json` object they print.

use super::format::id_or_dash;
use super::parse::{parse_bytes, parse_retention};
use super::{CliError, CliResult};
use crate::output::{json_line, line, Table};
use clap::{Args, Subcommand, ValueEnum};
use petrel_sdk::{pb, Client, TopicSpec};
use serde_json::{json, Value};
use std::io::Write;
use std::time::Duration;

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

pub(super) async fn topic(client: &Client, cmd: TopicCmd, json: bool) -> CliResult {
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
