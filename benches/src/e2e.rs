//! `petrel-bench e2e`: publish-to-receive latency at a fixed rate.
//!
//! One publisher task sends `--rate` records per second for `--seconds`
//! seconds through one default [`Producer`](petrel_sdk::Producer), one
//! `send` per record. It is paced by a 1 ms ticker: each tick issues the
//! records due by then (`rate × elapsed`), each `send` in a task of its
//! own so that slow acks do not slow the pacing; at most
//! `--max-outstanding` sends are in flight, and a record due while that
//! many are is dropped and counted as an error.
//!
//! Each body starts with the wall-clock time at which the publisher issued
//! its send (µs since the Unix epoch, 8 bytes little endian), padded to
//! `--size` bytes. `--receivers` receivers (up to `--batch` records per
//! receive, long-poll 1 s, lease 30 s) receive and ack continuously, and
//! record `receive time − body time` of every first delivery in the
//! histogram: p50/p99/p999 are publish-to-receive latency (the publisher
//! and the receivers share this machine's clock).
//!
//! Receiving stops once every record whose send succeeded was received, or
//! [`GRACE`] after the publisher finished (every send resolved). The group
//! (`--group`, default a fresh one) is moved to the end of every queue
//! first, so it receives only this run's records.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use clap::Args;
use hdrhistogram::Histogram;
use petrel_sdk::{Message, Producer};
use tokio::sync::Semaphore;

use crate::{
    connect, fresh_group, make_body, new_histogram, start_group_at_end, Common, Counters, Report,
    Run, Stop, MAX_LATENCY_US,
};

/// Long-poll wait of each receive.
pub const WAIT: Duration = Duration::from_millis(1_000);
/// Lease of each received record.
pub const INVISIBLE: Duration = Duration::from_secs(30);
/// How long the receivers go on after the publisher finished when records
/// are still missing.
pub const GRACE: Duration = Duration::from_secs(10);
/// Pacing tick of the publisher.
const TICK: Duration = Duration::from_millis(1);
/// Bytes of the timestamp at the start of every body.
pub const STAMP_LEN: usize = 8;

#[derive(Debug, Clone, Args)]
pub struct E2eArgs {
    #[command(flatten)]
    pub common: Common,
    /// Consumer group [default: a fresh one, `e2e-MS-PID`]; it is moved to
    /// the end of every queue first.
    #[arg(long)]
    pub group: Option<String>,
    /// Records published per second.
    #[arg(long, default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub rate: u64,
    /// Seconds of publishing.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub seconds: u64,
    /// Body size of each record in bytes (at least 8: the timestamp).
    #[arg(long, default_value_t = 1024, value_parser = parse_size)]
    pub size: usize,
    /// Concurrent receivers.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub receivers: u64,
    /// Most records per receive.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch: u32,
    /// Most sends in flight; a record due while this many are is dropped
    /// (and counted as an error).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_outstanding: u32,
}

fn parse_size(s: &str) -> Result<usize, String> {
    let n: usize = s.parse().map_err(|e| format!("{e}"))?;
    if n < STAMP_LEN {
        return Err(format!("at least {STAMP_LEN} bytes (the send timestamp)"));
    }
    Ok(n)
}

/// Microseconds since the Unix epoch, now.
pub fn unix_now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// A body: `sent_us` (8 bytes little endian), then `template` from its 9th
/// byte on; `template.len()` bytes long, at least 8.
pub fn encode_body(sent_us: u64, template: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(template.len().max(STAMP_LEN));
    b.put_u64_le(sent_us);
    b.put_slice(template.get(STAMP_LEN..).unwrap_or_default());
    b.freeze()
}

/// The send time at the start of a body; `None` when it is shorter than
/// 8 bytes.
pub fn decode_body(body: &[u8]) -> Option<u64> {
    let stamp: [u8; STAMP_LEN] = body.get(..STAMP_LEN)?.try_into().ok()?;
    Some(u64::from_le_bytes(stamp))
}

/// Publish-to-receive latency in µs for the histogram: 1 µs at least (a
/// clock step backwards gives 1, not a wrap), at most [`MAX_LATENCY_US`].
pub fn latency_us(sent_us: u64, received_us: u64) -> u64 {
    received_us.saturating_sub(sent_us).clamp(1, MAX_LATENCY_US)
}

/// Records due `elapsed` into publishing at `rate` per second, capped at
/// `total`.
pub fn due_by(rate: u64, elapsed: Duration, total: u64) -> u64 {
    let due = u128::from(rate).saturating_mul(elapsed.as_micros()) / 1_000_000;
    u64::try_from(due).unwrap_or(u64::MAX).min(total)
}

/// What the publisher did.
#[derive(Debug, Default)]
struct Published {
    /// Records due (sent or dropped).
    issued: u64,
    /// Sends that succeeded.
    acked: Arc<AtomicU64>,
    /// Records dropped because `--max-outstanding` sends were in flight.
    dropped: u64,
}

/// Sends `rate × seconds` records, paced; returns once every send resolved.
/// Failed sends and drops are counted in `c.errors`.
async fn publish_paced(
    producer: Producer,
    a: &E2eArgs,
    c: Arc<Counters>,
    acked: Arc<AtomicU64>,
) -> Published {
    let total = a.rate.saturating_mul(a.seconds);
    let template = make_body(a.size);
    let permits = Arc::new(Semaphore::new(a.max_outstanding as usize));
    let mut out = Published {
        acked,
        ..Published::default()
    };
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let start = Instant::now();
    while out.issued < total {
        tick.tick().await;
        let due = due_by(a.rate, start.elapsed(), total);
        while out.issued < due {
            out.issued += 1;
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                if out.dropped == 0 {
                    eprintln!(
                        "e2e: {} sends in flight; dropping records until one completes",
                        a.max_outstanding
                    );
                }
                out.dropped += 1;
                c.errors.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let body = encode_body(unix_now_us(), &template);
            let (producer, c, acked) = (producer.clone(), c.clone(), out.acked.clone());
            tokio::spawn(async move {
                match producer.send(Message::new(body)).await {
                    Ok(_) => {
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        c.errors.fetch_add(1, Ordering::Relaxed);
                        eprintln!("e2e: send failed: {e}");
                    }
                }
                drop(permit);
            });
        }
    }
    // Every permit back: every send resolved.
    let _ = permits.acquire_many(a.max_outstanding).await;
    out
}

/// Runs the workload; see the module docs.
pub async fn run(a: &E2eArgs, endpoint: &[String], pids: Option<&[u32]>) -> anyhow::Result<Report> {
    let client = connect(endpoint, &a.common).await?;
    let topic = a.common.topic.clone();
    let group = a.group.clone().unwrap_or_else(|| fresh_group("e2e"));
    let skipped = start_group_at_end(&client, &topic, &group).await?;
    if skipped > 0 {
        eprintln!("e2e: group {group} moved past {skipped} older records of {topic}");
    }
    let producer = client.producer(topic.clone()).build();
    let consumer = client.simple_consumer(topic, group).build();
    let stop = Stop::new();
    let run = Run::start("e2e", pids);
    let mut workers: Vec<tokio::task::JoinHandle<anyhow::Result<Histogram<u64>>>> = Vec::new();
    for _ in 0..a.receivers {
        let (consumer, c, stop) = (consumer.clone(), run.counters.clone(), stop.clone());
        let batch = a.batch;
        workers.push(tokio::spawn(async move {
            let mut h = new_histogram()?;
            while !stop.is_stopped() {
                let msgs = match crate::receive_or_stop(
                    &consumer, batch, INVISIBLE, WAIT, &stop, &c, "e2e",
                )
                .await
                {
                    crate::Received::Stopped => break,
                    crate::Received::Failed => continue,
                    crate::Received::Got(m) => m,
                };
                if msgs.is_empty() {
                    continue;
                }
                let now_us = unix_now_us();
                for m in &msgs {
                    // A redelivery was counted at its first delivery.
                    if m.attempt > 1 {
                        continue;
                    }
                    match decode_body(&m.body) {
                        Some(sent_us) => {
                            h.saturating_record(latency_us(sent_us, now_us));
                            c.records.fetch_add(1, Ordering::Relaxed);
                            c.bytes.fetch_add(m.body.len() as u64, Ordering::Relaxed);
                        }
                        None => {
                            c.errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                match consumer.ack_many(&msgs).await {
                    Ok(results) => {
                        let failed = results.iter().filter(|r| r.is_err()).count();
                        c.errors.fetch_add(failed as u64, Ordering::Relaxed);
                    }
                    Err(e) => {
                        c.errors.fetch_add(1, Ordering::Relaxed);
                        eprintln!("e2e: ack failed: {e}");
                    }
                }
            }
            anyhow::Ok(h)
        }));
    }
    // The publisher, then the wait for the receivers to catch up.
    let (c, stop, a2) = (run.counters.clone(), stop.clone(), a.clone());
    workers.push(tokio::spawn(async move {
        let acked = Arc::new(AtomicU64::new(0));
        let published = publish_paced(producer, &a2, c.clone(), acked).await;
        let sent = published.acked.load(Ordering::Relaxed);
        eprintln!(
            "e2e: publisher done: {sent} of {} records sent ({} dropped); waiting for the receivers",
            published.issued, published.dropped
        );
        let finished = Instant::now();
        loop {
            let received = c.records.load(Ordering::Relaxed);
            if received >= sent {
                break;
            }
            if finished.elapsed() >= GRACE {
                eprintln!(
                    "e2e: {received} of {sent} records received {GRACE:?} after the publisher \
                     finished; stopping"
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        stop.stop();
        new_histogram()
    }));
    run.finish(workers).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_carries_the_send_time_then_the_padding() {
        let template = make_body(1024);
        let t = 1_764_500_000_123_456u64;
        let b = encode_body(t, &template);
        assert_eq!(b.len(), 1024);
        assert_eq!(&b[..8], &t.to_le_bytes());
        assert_eq!(&b[8..], &template[8..]);
        assert_eq!(decode_body(&b), Some(t));
    }

    #[test]
    fn smallest_body_is_the_stamp_alone() {
        let b = encode_body(u64::MAX, &make_body(8));
        assert_eq!(b.len(), 8);
        assert_eq!(decode_body(&b), Some(u64::MAX));
        // A template shorter than the stamp still gives a whole stamp.
        let b = encode_body(7, b"abc");
        assert_eq!(b.len(), 8);
        assert_eq!(decode_body(&b), Some(7));
    }

    #[test]
    fn short_or_foreign_bodies_have_no_stamp() {
        assert_eq!(decode_body(b""), None);
        assert_eq!(decode_body(b"1234567"), None);
        assert_eq!(decode_body(&[1, 0, 0, 0, 0, 0, 0, 0, 9]), Some(1));
    }

    #[test]
    fn latency_is_clamped_to_the_histogram() {
        assert_eq!(latency_us(1_000, 3_500), 2_500);
        assert_eq!(latency_us(1_000, 1_000), 1);
        // Clock stepped backwards: 1 µs, not a wrap.
        assert_eq!(latency_us(5_000, 1_000), 1);
        assert_eq!(latency_us(0, u64::MAX), MAX_LATENCY_US);
    }

    #[test]
    fn pacing_spreads_the_rate_over_time() {
        let total = 5_000 * 10;
        assert_eq!(due_by(5_000, Duration::ZERO, total), 0);
        assert_eq!(due_by(5_000, Duration::from_millis(1), total), 5);
        assert_eq!(due_by(5_000, Duration::from_micros(1_999), total), 9);
        assert_eq!(due_by(5_000, Duration::from_secs(1), total), 5_000);
        assert_eq!(due_by(5_000, Duration::from_secs(10), total), total);
        // Never past the total, however late the last tick.
        assert_eq!(due_by(5_000, Duration::from_secs(3_600), total), total);
        assert_eq!(due_by(3, Duration::from_millis(500), 100), 1);
        assert_eq!(due_by(u64::MAX, Duration::MAX, u64::MAX), u64::MAX);
    }

    #[test]
    fn size_must_hold_the_stamp() {
        assert_eq!(parse_size("8"), Ok(8));
        assert_eq!(parse_size("1024"), Ok(1024));
        assert!(parse_size("7").is_err());
        assert!(parse_size("x").is_err());
    }

    #[test]
    fn now_is_after_2020() {
        assert!(unix_now_us() > 1_577_836_800_000_000);
    }
}
