//! `petrel consume` (pop mode: receive, print, ack) and `petrel read` (one
//! queue by offset), and the record printing `petrel message` shares.

use super::format::body_text;
use super::progress::Progress;
use super::{CliError, CliResult};
use crate::output::{json_line, line};
use base64::Engine as _;
use clap::Args;
use petrel_sdk::{Client, ReceivedMessage};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::Duration;

/// Largest receive batch of `petrel consume`.
const CONSUME_BATCH: u64 = 256;
/// Ack (or nack) calls of `petrel consume` in flight at once.
const CONSUME_ACKS_IN_FLIGHT: usize = 8;
/// Long-poll wait per receive when `--wait-ms` is not given (consume then
/// runs until `--max` or Ctrl-C).
const FOREVER_POLL_WAIT: Duration = Duration::from_secs(5);
/// Bytes asked for per read request by `petrel read`.
const READ_MAX_BYTES: u32 = 1 << 20;

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

pub(super) fn record_json(m: &ReceivedMessage) -> Value {
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

pub(super) fn print_record(m: &ReceivedMessage, json: bool) -> CliResult {
    if json {
        Ok(json_line(&record_json(m))?)
    } else {
        Ok(line(&record_plain(m))?)
    }
}

pub(super) async fn consume(client: &Client, a: ConsumeArgs, json: bool) -> CliResult {
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

pub(super) async fn read(client: &Client, a: ReadArgs, json: bool) -> CliResult {
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
