//! `petrel message`: look up stored messages by id (with their delivery state
//! per consumer group) or by key.

use super::consume::{print_record, record_json};
use super::format::body_text;
use super::CliResult;
use crate::output::{json_line, line, Table};
use clap::Subcommand;
use petrel_sdk::{Client, ReceivedMessage};
use serde_json::{json, Value};
use std::collections::BTreeMap;

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

pub(super) async fn message(client: &Client, cmd: MessageCmd, json: bool) -> CliResult {
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
