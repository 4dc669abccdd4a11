//! `petrel produce`: send generated messages (`--count`/`--size`) or one per
//! stdin line, and print each acknowledged id in input order.

use super::parse::{parse_property, parse_time};
use super::progress::Progress;
use super::{CliError, CliResult};
use crate::output::{json_line, line};
use clap::Args;
use futures::{stream, Stream, StreamExt};
use petrel_sdk::{Client, Message};
use serde_json::json;
use std::pin::Pin;
use std::time::Duration;
use tokio::io::AsyncBufReadExt;

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

pub(super) async fn produce(client: &Client, a: ProduceArgs, json: bool) -> CliResult {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_bodies_have_exact_size_and_index() {
        let b = generated_body(42, 64);
        assert_eq!(b.len(), 64);
        assert!(std::str::from_utf8(&b).unwrap().contains("000000000042"));
        assert_eq!(generated_body(1, 0).len(), 0);
        assert_eq!(generated_body(1, 3), b"msg");
        assert_ne!(generated_body(1, 32), generated_body(2, 32));
    }
}
