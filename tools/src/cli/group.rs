//! `petrel group` (list, describe, delete, reset) and `petrel commit` /
//! `petrel offset`: a consumer group's state and its position per queue.

use super::format::age;
use super::parse::parse_time;
use super::{CliError, CliResult};
use crate::output::{json_line, line, Table};
use clap::{Args, Subcommand};
use petrel_sdk::{pb, Client, Error as PetrelError};
use serde_json::json;

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

pub(super) async fn commit(client: &Client, a: CommitArgs, json: bool) -> CliResult {
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

pub(super) async fn offset(client: &Client, a: OffsetArgs, json: bool) -> CliResult {
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

/// Where `group reset` moves a queue.
enum ResetTarget {
    Earliest,
    Latest,
    Offset(u64),
    Time(i64),
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

pub(super) async fn group(client: &Client, cmd: GroupCmd, json: bool) -> CliResult {
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
