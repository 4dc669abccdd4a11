//! `petrel top`: a refreshing view of produce rates per topic and consume
//! rate, lag and dead letters per consumer group, sampled through the proxy.

use super::format::age;
use super::CliResult;
use crate::output::{json_line, line, Table};
use petrel_sdk::Client;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct TopArgs {
    /// Refresh interval in milliseconds.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    pub interval_ms: u64,
    /// Stop after this many refreshes (default: until Ctrl-C).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub iterations: Option<u64>,
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

pub(super) async fn top(client: &Client, a: TopArgs, json: bool) -> CliResult {
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
