//! Periodic work a queue's leader does for the queues it leads: retention,
//! releasing due delayed records, rolling back abandoned transactions, and
//! the broker's lag and RocksDB gauges.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::{GroupHandle, Node};
use crate::config::TRANSACTION_MAX_CHECKS;
use crate::types::Command;

/// How often each queue leader checks retention.
pub const RETENTION_EVERY: Duration = Duration::from_secs(2);
/// How often the broker's gauges (lag, leaders, RocksDB) are refreshed.
const GAUGES_EVERY: Duration = Duration::from_secs(2);
/// How often queue leaders release due delayed records (their accuracy).
const RELEASE_EVERY: Duration = Duration::from_millis(50);
/// Delayed records released per command.
const RELEASE_BATCH: u32 = 10_000;
/// Records examined per queue per retention round.
const RETENTION_SCAN: usize = 100_000;

impl Node {
    /// Retention, on each queue's leader every `RETENTION_EVERY`: finds the
    /// first record to keep (younger than `retention_ms` and within
    /// `retention_bytes` of the end) and replicates `Truncate`, so every
    /// replica range-deletes the same prefix. At most
    /// `RETENTION_SCAN` records are examined per queue per round.
    pub(super) async fn retention_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(RETENTION_EVERY);
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let map = self.map_rx.borrow().clone();
            for t in map.topics.values() {
                let (age_ms, max_bytes) = (t.spec.retention_ms, t.spec.retention_bytes);
                if age_ms == 0 && max_bytes == 0 {
                    continue;
                }
                for q in &t.queues {
                    let Some(h) = self.group(q.group_id) else {
                        continue;
                    };
                    if self.serving(&h).is_none() {
                        continue;
                    }
                    let Some(shared) = h.queue.clone() else {
                        continue;
                    };
                    let header = shared.read().header;
                    let Some((before, freed)) =
                        self.retention_cut(q.group_id, header, age_ms, max_bytes)
                    else {
                        continue;
                    };
                    let cmd = Command::Truncate {
                        before,
                        freed_bytes: freed,
                    };
                    match self.write(q.group_id, &h, cmd).await {
                        Ok(_) => tracing::info!(
                            group = q.group_id,
                            removed = before - header.start_offset,
                            freed_bytes = freed,
                            "retention removed records"
                        ),
                        Err(e) => tracing::warn!(group = q.group_id, error = %e, "retention"),
                    }
                }
            }
        }
    }

    /// Delayed delivery, on each queue's leader every `RELEASE_EVERY`:
    /// replicates `Release` for queues whose earliest held record is due,
    /// so every replica hands the same records to the consumer groups. A
    /// new leader picks up where the old one stopped: the held set is
    /// replicated state.
    pub(super) async fn release_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(RELEASE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now = petrel_proto::now_ms();
            // Nothing held anywhere is due yet: no need to look at every
            // queue. The hint only ever moves down between scans (every
            // apply lowers it to its queue's earliest), and a scan resets
            // it to the earliest it finds.
            if self.earliest_due.load(Ordering::Acquire) > now {
                continue;
            }
            self.earliest_due.store(i64::MAX, Ordering::Release);
            let mut earliest = i64::MAX;
            let due: Vec<(u64, GroupHandle)> = self
                .groups
                .iter()
                .filter(|e| {
                    let next = e.queue.as_ref().and_then(|q| q.next_due());
                    if let Some(t) = next {
                        earliest = earliest.min(t);
                    }
                    next.is_some_and(|t| t <= now)
                })
                .map(|e| (*e.key(), e.clone()))
                .filter(|(_, h)| self.serving(h).is_some())
                .collect();
            let writes = due.into_iter().map(|(g, h)| {
                let node = self.clone();
                async move {
                    let cmd = Command::Release {
                        now_ms: now,
                        max: RELEASE_BATCH,
                    };
                    if let Err(e) = node.write(g, &h, cmd).await {
                        tracing::debug!(group = g, error = %e, "release delayed records");
                    }
                }
            });
            futures::future::join_all(writes).await;
            // Released queues lowered the hint again as they applied.
            self.earliest_due
                .fetch_min(earliest.max(now + 1), Ordering::AcqRel);
        }
    }

    /// Every `GAUGES_EVERY`: this broker's leader count, and for the queues
    /// it leads, per topic and consumer group, lag in records and in time
    /// (age of the oldest record not done), in-flight leases; RocksDB write
    /// stalls and pending compaction. Series this broker no longer
    /// reports (e.g. a leadership moved) are set to 0.
    pub(super) async fn gauges_loop(self: Arc<Self>) {
        let broker = self.id.to_string();
        let mut tick = tokio::time::interval(GAUGES_EVERY);
        let mut last: BTreeSet<(String, String)> = BTreeSet::new();
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let map = self.map_rx.borrow().clone();
            let now = petrel_proto::now_ms();
            let mut leaders = 0u64;
            // (topic, group) -> (lag records, oldest age ms, inflight)
            let mut per: BTreeMap<(String, String), (u64, u64, u64)> = BTreeMap::new();
            for t in map.topics.values() {
                // The groups consuming this topic, as every replica hosted
                // here knows them: a group that never popped a queue this
                // broker leads still lags on it (from the queue's start).
                let consuming: BTreeSet<String> = t
                    .queues
                    .iter()
                    .filter_map(|q| self.group(q.group_id))
                    .filter_map(|h| h.queue.clone())
                    .flat_map(|q| q.read().consumers.keys().cloned().collect::<Vec<_>>())
                    .collect();
                for q in &t.queues {
                    let Some(h) = self.group(q.group_id) else {
                        continue;
                    };
                    if self.serving(&h).is_none() {
                        continue;
                    }
                    leaders += 1;
                    let Some(shared) = h.queue.as_ref() else {
                        continue;
                    };
                    let st = shared.read();
                    let (start, end) = (st.header.start_offset, st.header.next_offset);
                    for name in &consuming {
                        let (committed, inflight) = match st.served().get(name) {
                            Some(c) => (c.committed.max(start), c.inflight_at(now)),
                            None => (start, 0),
                        };
                        let lag = end.saturating_sub(committed);
                        let age = if committed < end {
                            self.record_age_ms(q.group_id, committed, now)
                        } else {
                            0
                        };
                        let e = per.entry((t.spec.name.clone(), name.clone())).or_default();
                        e.0 += lag;
                        e.1 = e.1.max(age);
                        e.2 += inflight;
                    }
                }
            }
            metrics::gauge!("petrel_broker_leader_count", "broker" => broker.clone())
                .set(leaders as f64);
            let keys: BTreeSet<(String, String)> = per.keys().cloned().collect();
            for (topic, group) in last.difference(&keys) {
                per.insert((topic.clone(), group.clone()), (0, 0, 0));
            }
            for ((topic, group), (lag, age, inflight)) in &per {
                let l = [
                    ("topic", topic.clone()),
                    ("group", group.clone()),
                    ("broker", broker.clone()),
                ];
                metrics::gauge!("petrel_consumer_lag_records", &l).set(*lag as f64);
                metrics::gauge!("petrel_consumer_lag_seconds", &l).set(*age as f64 / 1000.0);
                metrics::gauge!("petrel_inflight_leases", &l).set(*inflight as f64);
            }
            last = keys;
            let db = self.store.db();
            let prop = |p: &str| db.property_int_value(p).ok().flatten().unwrap_or(0) as f64;
            metrics::gauge!("petrel_broker_rocksdb_write_stopped", "broker" => broker.clone())
                .set(prop("rocksdb.is-write-stopped"));
            metrics::gauge!("petrel_broker_rocksdb_delayed_write_rate", "broker" => broker.clone())
                .set(prop("rocksdb.actual-delayed-write-rate"));
            metrics::gauge!("petrel_broker_rocksdb_pending_compaction_bytes", "broker" => broker.clone())
                .set(prop("rocksdb.estimate-pending-compaction-bytes"));
        }
    }

    /// Transactions nobody resolves: on each queue's leader, a transaction
    /// still open after `TRANSACTION_MAX_CHECKS` check intervals past its
    /// last check is rolled back (its records are discarded).
    pub(super) async fn txn_timeout_loop(self: Arc<Self>) {
        loop {
            // Re-read each round: a config reload may change it.
            let interval = self.runtime.transaction_check_ms();
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(interval.clamp(100, 1000))) => {}
            }
            let now = petrel_proto::now_ms();
            let expired: Vec<(u64, GroupHandle, String)> = self
                .groups
                .iter()
                .filter(|e| self.serving(e).is_some())
                .flat_map(|e| {
                    let (g, h) = (*e.key(), e.clone());
                    let ids: Vec<String> = e
                        .queue
                        .as_ref()
                        .map(|q| {
                            q.read()
                                .stale_txns(now)
                                .into_iter()
                                .filter(|(_, t)| abandoned(t.checks, t.opened_ms, now, interval))
                                .map(|(id, _)| id)
                                .collect()
                        })
                        .unwrap_or_default();
                    ids.into_iter().map(move |id| (g, h.clone(), id))
                })
                .collect();
            for (g, h, id) in expired {
                let cmd = Command::EndTxn {
                    id: id.clone(),
                    commit: false,
                };
                match self.write(g, &h, cmd).await {
                    Ok(_) => {
                        tracing::info!(group = g, txn = %id, "rolled back an unresolved transaction")
                    }
                    Err(e) => tracing::debug!(group = g, error = %e, "rolling back a transaction"),
                }
            }
        }
    }

    /// `(first offset to keep, bytes before it)` if anything is due.
    fn retention_cut(
        &self,
        group: u64,
        header: crate::queue::QueueHeader,
        age_ms: u64,
        max_bytes: u64,
    ) -> Option<(u64, u64)> {
        let cutoff = petrel_proto::now_ms().saturating_sub(age_ms as i64);
        let excess = if max_bytes > 0 {
            header.bytes.saturating_sub(max_bytes)
        } else {
            0
        };
        let cf = self.store.cf(crate::storage::CF_RECORDS);
        let from = crate::keys::record_key(group, header.start_offset);
        let iter = self.store.db().iterator_cf(
            cf,
            rocksdb::IteratorMode::From(&from, rocksdb::Direction::Forward),
        );
        let mut before = header.start_offset;
        let mut freed = 0u64;
        for item in iter.take(RETENTION_SCAN) {
            let Ok((k, v)) = item else { break };
            let Some((g, off)) = crate::keys::decode_group_u64(&k) else {
                break;
            };
            if g != group || off >= header.next_offset {
                break;
            }
            let expired = age_ms > 0
                && petrel_proto::record::store_timestamp_ms(&v).is_some_and(|ts| ts < cutoff);
            if !expired && freed >= excess {
                break;
            }
            before = off + 1;
            freed += v.len() as u64;
        }
        (before > header.start_offset).then_some((before, freed))
    }

    /// How long ago the record at `offset` of `group` was stored (0 when it
    /// cannot be read): the lag in time of a consumer waiting on it.
    pub fn record_age_ms(&self, group: u64, offset: u64, now_ms: i64) -> u64 {
        self.store
            .get(
                crate::storage::CF_RECORDS,
                &crate::keys::record_key(group, offset),
            )
            .ok()
            .flatten()
            .and_then(|v| petrel_proto::record::store_timestamp_ms(&v))
            .map_or(0, |ts| (now_ms - ts).max(0) as u64)
    }
}

/// Whether an open transaction whose check is due is rolled back: it was
/// checked `TRANSACTION_MAX_CHECKS` times, or it has been open longer than
/// that many check intervals (`interval_ms`) and two more.
fn abandoned(checks: u32, opened_ms: i64, now_ms: i64, interval_ms: u64) -> bool {
    checks >= TRANSACTION_MAX_CHECKS
        || now_ms - opened_ms > (interval_ms as i64) * (TRANSACTION_MAX_CHECKS as i64 + 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transactions_nobody_resolves_are_rolled_back() {
        let max = TRANSACTION_MAX_CHECKS;
        // (checks, opened, now, interval, rolled back)
        let cases = [
            (0, 0, 1_000, 1_000, false),
            (max - 1, 0, 1_000, 1_000, false),
            (max, 0, 1_000, 1_000, true),
            // Checks that never reached a producer still end it in time.
            (0, 0, 7_000, 1_000, false),
            (0, 0, 7_001, 1_000, true),
        ];
        for (checks, opened, now, interval, want) in cases {
            assert_eq!(
                abandoned(checks, opened, now, interval),
                want,
                "{checks} {now}"
            );
        }
    }
}
