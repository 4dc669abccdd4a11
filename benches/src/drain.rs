//! `petrel-bench drain`: how fast a backlog empties.
//!
//! Phase 1 (not timed in the report) fills the topic with `--count`
//! records: `send_batch` of `--fill-batch` records, `--fill-inflight`
//! requests at once; its rate goes to stderr. Phase 2, timed, with the
//! server CPU sampler started at its beginning only: `--inflight`
//! receivers, each in a loop receiving up to `--batch` records (long-poll
//! 1 s, lease 30 s) and acking what it got with one `ack_many`, until every
//! record filled in phase 1 is acked, or nothing arrived for `--idle-ms`.
//!
//! The consumer group (`--group`, default a fresh one) is moved to the end
//! of every queue before phase 1, so the backlog is exactly what phase 1
//! produced. The report's latency is per round trip (one receive that
//! returned records plus the ack of them); `records` counts acked records.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;

use crate::{
    connect, fresh_group, new_histogram, record_latency, run_produce, start_group_at_end, Common,
    ProduceArgs, Report, Run, Stop,
};

/// Long-poll wait of each receive.
pub const WAIT: Duration = Duration::from_millis(1_000);
/// Lease of each received record.
pub const INVISIBLE: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Args)]
pub struct DrainArgs {
    #[command(flatten)]
    pub common: Common,
    /// Consumer group [default: a fresh one, `drain-MS-PID`]; it is moved to
    /// the end of every queue first.
    #[arg(long)]
    pub group: Option<String>,
    /// Body size of each record in bytes.
    #[arg(long, default_value_t = 1024)]
    pub size: usize,
    /// Records in the backlog.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub count: u64,
    /// Most records per receive.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch: u32,
    /// Concurrent receivers.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub inflight: u64,
    /// Records per request while filling the backlog (one `send_batch`).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub fill_batch: u64,
    /// Concurrent requests while filling the backlog.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub fill_inflight: u64,
    /// Stop when nothing was received for this long, in ms.
    #[arg(long, default_value_t = 10_000)]
    pub idle_ms: u64,
}

/// Records to ask for in the next receive: at most `batch`, and no more
/// than are still unclaimed out of `target` (0 when all are claimed).
pub fn receive_size(target: u64, claimed: u64, batch: u32) -> u32 {
    target.saturating_sub(claimed).min(u64::from(batch)) as u32
}

/// Fills the backlog, then drains it; see the module docs.
pub async fn run(
    a: &DrainArgs,
    endpoint: &[String],
    pids: Option<&[u32]>,
) -> anyhow::Result<Report> {
    let client = connect(endpoint, &a.common).await?;
    let topic = a.common.topic.clone();
    let group = a.group.clone().unwrap_or_else(|| fresh_group("drain"));
    let skipped = start_group_at_end(&client, &topic, &group).await?;
    if skipped > 0 {
        eprintln!("drain: group {group} moved past {skipped} older records of {topic}");
    }

    // Phase 1: the backlog (its own report on stderr only).
    let fill = run_produce(
        "drain fill",
        &client,
        &ProduceArgs {
            common: a.common.clone(),
            size: a.size,
            count: a.count,
            inflight: a.fill_inflight,
            batch: a.fill_batch,
        },
        pids,
    )
    .await?;
    eprintln!(
        "drain: backlog of {} records filled in {:.2} s ({:.0} records/s, {} failed requests); \
         not part of the report",
        fill.records, fill.seconds, fill.records_per_sec, fill.errors
    );
    let target = fill.records;
    if target < a.count {
        eprintln!(
            "drain: {} of {} records failed to fill; draining {target}",
            a.count - target,
            a.count
        );
    }

    // Phase 2: timed.
    let consumer = client.simple_consumer(topic, group).build();
    let claimed = Arc::new(AtomicU64::new(0));
    let last_seen_ms = Arc::new(AtomicU64::new(0));
    let stop = Stop::new();
    let run = Run::start("drain", pids);
    // Failed fill requests show up in the report's errors too.
    run.counters.errors.store(fill.errors, Ordering::Relaxed);
    let start = run.start;
    let mut workers = Vec::new();
    for _ in 0..a.inflight {
        let (consumer, c, claimed, last_seen_ms, stop) = (
            consumer.clone(),
            run.counters.clone(),
            claimed.clone(),
            last_seen_ms.clone(),
            stop.clone(),
        );
        let (batch, idle_ms) = (a.batch, a.idle_ms);
        workers.push(tokio::spawn(async move {
            let mut h = new_histogram()?;
            while !stop.is_stopped() {
                let want = receive_size(target, claimed.load(Ordering::Relaxed), batch);
                if want == 0 {
                    break;
                }
                let t = Instant::now();
                // Every record claimed: stop long-polling for more.
                let msgs = match crate::receive_or_stop(
                    &consumer, want, INVISIBLE, WAIT, &stop, &c, "drain",
                )
                .await
                {
                    crate::Received::Stopped => break,
                    crate::Received::Failed => continue,
                    crate::Received::Got(m) => m,
                };
                let now_ms = start.elapsed().as_millis() as u64;
                if msgs.is_empty() {
                    if now_ms.saturating_sub(last_seen_ms.load(Ordering::Relaxed)) >= idle_ms {
                        eprintln!("drain: nothing received for {idle_ms} ms, stopping");
                        stop.stop();
                    }
                    continue;
                }
                last_seen_ms.fetch_max(now_ms, Ordering::Relaxed);
                let n = msgs.len() as u64;
                if claimed.fetch_add(n, Ordering::Relaxed) + n >= target {
                    stop.stop();
                }
                if crate::ack_and_count(&consumer, &msgs, &c, "drain").await {
                    record_latency(&mut h, t);
                }
            }
            anyhow::Ok(h)
        }));
    }
    run.finish(workers).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receive_size_never_asks_past_the_backlog() {
        assert_eq!(receive_size(1000, 0, 256), 256);
        assert_eq!(receive_size(1000, 900, 256), 100);
        assert_eq!(receive_size(1000, 1000, 256), 0);
        // Over-claimed (records beyond the backlog): nothing more.
        assert_eq!(receive_size(1000, 1200, 256), 0);
        assert_eq!(receive_size(u64::MAX, 0, u32::MAX), u32::MAX);
    }
}
