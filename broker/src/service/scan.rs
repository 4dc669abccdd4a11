//! Read-only calls of `BrokerData`: record reads, lookups by offset, key
//! or time, and queue statistics. They read RocksDB directly (CRC-checked)
//! and write nothing.

use bytes::Bytes;
use petrel_proto::pb;
use petrel_proto::pb::broker as bpb;
use petrel_proto::{validate, PetrelError};
use rocksdb::{Direction, IteratorMode};
use tonic::{Request, Response as TResponse};

use super::{queue_of, Service, FIND_MAX_BYTES, R};
use crate::keys;
use crate::storage::{StorageError, CF_RECORDS};

impl Service {
    /// Reads `offsets` (ascending runs are read with one iterator seek
    /// each, not one lookup per record, which is most of a backlog drain's
    /// reads), in order, stopping before `max_bytes` (at least one).
    pub(super) fn read_records(
        &self,
        group: u64,
        offsets: &[u64],
        max_bytes: usize,
    ) -> Vec<(u64, Result<Bytes, PetrelError>)> {
        let mut out = Vec::with_capacity(offsets.len());
        let mut bytes = 0usize;
        let mut i = 0;
        while i < offsets.len() {
            let mut run = 1;
            while i + run < offsets.len() && offsets[i + run] == offsets[i] + run as u64 {
                run += 1;
            }
            let got: Vec<(u64, Result<Bytes, PetrelError>)> = if run < 4 {
                offsets[i..i + run]
                    .iter()
                    .map(|o| (*o, self.read_record(group, *o)))
                    .collect()
            } else {
                self.read_run(group, offsets[i], run)
            };
            for (off, r) in got {
                let size = r.as_ref().map(|b| b.len()).unwrap_or(0);
                if !out.is_empty() && bytes + size > max_bytes {
                    return out;
                }
                bytes += size;
                out.push((off, r));
            }
            i += run;
        }
        out
    }

    /// `n` consecutive records from `first`, with one iterator.
    fn read_run(&self, group: u64, first: u64, n: usize) -> Vec<(u64, Result<Bytes, PetrelError>)> {
        let store = &self.node.store;
        let mut opts = rocksdb::ReadOptions::default();
        opts.set_iterate_upper_bound(keys::record_key(group, first + n as u64));
        let mut it = store.db().raw_iterator_cf_opt(&store.cf(CF_RECORDS), opts);
        it.seek(keys::record_key(group, first));
        let mut out = Vec::with_capacity(n);
        for off in first..first + n as u64 {
            let here = it
                .key()
                .and_then(keys::decode_group_u64)
                .filter(|(g, o)| *g == group && *o == off);
            match (here, it.value()) {
                (Some(_), Some(v)) => {
                    out.push((off, Self::checked(group, off, v.to_vec())));
                    it.next();
                }
                _ => {
                    // A gap or an iterator error: fall back to one lookup,
                    // which reports it precisely.
                    if let Err(e) = it.status() {
                        out.push((off, Err(storage_err(group, off, e.into()))));
                        it.seek(keys::record_key(group, off + 1));
                    } else {
                        out.push((off, self.read_record(group, off)));
                    }
                }
            }
        }
        out
    }

    fn checked(group: u64, offset: u64, v: Vec<u8>) -> Result<Bytes, PetrelError> {
        if let Err(e) = petrel_proto::record::verify(&v) {
            tracing::error!(group, offset, error = %e, "corrupt record on read");
            return Err(PetrelError::Corrupt(format!(
                "record at group {group} offset {offset} failed its checksum: {e}"
            )));
        }
        Ok(Bytes::from(v))
    }

    /// Reads stored bytes of `offset`, verifying the CRC.
    pub(super) fn read_record(&self, group: u64, offset: u64) -> Result<Bytes, PetrelError> {
        let v = self
            .node
            .store
            .get(CF_RECORDS, &keys::record_key(group, offset))
            .map_err(|e| storage_err(group, offset, e))?
            .ok_or_else(|| {
                PetrelError::Internal(format!("group {group} offset {offset} is missing"))
            })?;
        Self::checked(group, offset, v)
    }

    pub(super) async fn handle_lookup(
        &self,
        req: Request<bpb::LookupRequest>,
    ) -> R<bpb::LookupResponse> {
        let req = req.into_inner();
        let h = self.leader(req.group_id)?;
        let q = queue_of(&h, req.group_id)?;
        let (start, end) = {
            let st = q.read();
            (st.header.start_offset, st.header.next_offset)
        };
        if req.offset < start || req.offset >= end {
            return Err(PetrelError::NotFound(format!(
                "offset {} is not stored (the queue holds {start}..{end})",
                req.offset
            ))
            .into());
        }
        let encoded = self.read_record(req.group_id, req.offset)?;
        let st = q.read();
        Ok(TResponse::new(bpb::LookupResponse {
            encoded,
            hold: st.hold_of(req.offset).to_string(),
            deliveries: st
                .delivery_states(req.offset)
                .into_iter()
                .map(|(group, state, attempt, until)| pb::DeliveryState {
                    group,
                    state: state.to_string(),
                    attempt,
                    invisible_until_ms: until,
                })
                .collect(),
        }))
    }

    pub(super) async fn handle_find_by_key(
        &self,
        req: Request<bpb::FindByKeyRequest>,
    ) -> R<bpb::FindByKeyResponse> {
        let req = req.into_inner();
        if req.key.is_empty() || req.key.len() > validate::MAX_KEY_LEN {
            return Err(PetrelError::InvalidArgument(format!(
                "key must be 1..={} bytes",
                validate::MAX_KEY_LEN
            ))
            .into());
        }
        let max = if req.max == 0 { 100 } else { req.max.min(1000) } as usize;
        let h = self.leader(req.group_id)?;
        let start = queue_of(&h, req.group_id)?.read().header.start_offset;
        let prefix = if req.client_id {
            keys::client_id_index_prefix(req.group_id, &req.key)
        } else {
            keys::key_index_prefix(req.group_id, &req.key)
        };
        let cf = self.node.store.cf(crate::storage::CF_INDEXES);
        let mut records = Vec::new();
        let mut bytes = 0usize;
        for kv in self
            .node
            .store
            .db()
            .iterator_cf(&cf, IteratorMode::From(&prefix, Direction::Forward))
        {
            let (k, _) = kv.map_err(|e| PetrelError::Internal(e.to_string()))?;
            if !k.starts_with(&prefix) || k.len() != prefix.len() + 8 {
                break;
            }
            let off = u64::from_be_bytes(k[prefix.len()..].try_into().unwrap_or([0; 8]));
            // Index entries of records removed by retention are skipped
            // (they are not range-deleted with the records).
            if off < start {
                continue;
            }
            let encoded = self.read_record(req.group_id, off)?;
            bytes += encoded.len();
            records.push(bpb::StoredRecord {
                offset: off,
                encoded,
            });
            // Bounded in bytes too (at least one record).
            if records.len() >= max || bytes >= FIND_MAX_BYTES {
                break;
            }
        }
        Ok(TResponse::new(bpb::FindByKeyResponse { records }))
    }

    pub(super) async fn handle_read(
        &self,
        req: Request<bpb::BrokerReadRequest>,
    ) -> R<bpb::BrokerReadResponse> {
        let req = req.into_inner();
        let group = req.group_id;
        let h = self.leader(group)?;
        let header = queue_of(&h, group)?.read().header;
        if req.offset > header.next_offset || req.offset < header.start_offset {
            return Err(PetrelError::OffsetOutOfRange(format!(
                "offset {} is outside [{}, {}] of group {group}",
                req.offset, header.start_offset, header.next_offset
            ))
            .into());
        }
        let max_bytes = if req.max_bytes == 0 {
            1 << 20
        } else {
            req.max_bytes.min(32 << 20)
        } as usize;
        let max_n = if req.max_messages == 0 {
            1000
        } else {
            req.max_messages.min(10_000)
        } as usize;
        let cf = self.node.store.cf(CF_RECORDS);
        let from = keys::record_key(group, req.offset);
        let mut records = Vec::new();
        let mut bytes = 0usize;
        let iter = self
            .node
            .store
            .db()
            .iterator_cf(&cf, IteratorMode::From(&from, Direction::Forward));
        for (expect, kv) in (req.offset..).zip(iter) {
            let (k, v) = kv.map_err(|e| storage_err(group, expect, e.into()))?;
            let Some((g, off)) = keys::decode_group_u64(&k) else {
                break;
            };
            if g != group || off >= header.next_offset || records.len() >= max_n {
                break;
            }
            if off != expect {
                return Err(PetrelError::Corrupt(format!(
                    "group {group}: offset {expect} is missing"
                ))
                .into());
            }
            if let Err(e) = petrel_proto::record::verify(&v) {
                tracing::error!(group, offset = off, error = %e, "corrupt record on read");
                return Err(PetrelError::Corrupt(format!(
                    "record at group {group} offset {off} failed its checksum: {e}"
                ))
                .into());
            }
            if !records.is_empty() && bytes + v.len() > max_bytes {
                break;
            }
            bytes += v.len();
            records.push(bpb::StoredRecord {
                offset: off,
                encoded: Bytes::from(Vec::from(v)),
            });
        }
        Ok(TResponse::new(bpb::BrokerReadResponse {
            records,
            start_offset: header.start_offset,
            end_offset: header.next_offset,
        }))
    }

    pub(super) async fn handle_offset_for_time(
        &self,
        req: Request<bpb::BrokerOffsetForTimeRequest>,
    ) -> R<bpb::BrokerOffsetForTimeResponse> {
        let req = req.into_inner();
        let g = req.group_id;
        let h = self.leader(g)?;
        let q = queue_of(&h, g)?;
        let (mut lo, mut hi) = {
            let st = q.read();
            (st.header.start_offset, st.header.next_offset)
        };
        // Store times are assigned in offset order (by the leader of the
        // moment), so the first record at or after the time is found by
        // binary search over the retained range.
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let v = self.read_record(g, mid)?;
            let ts = petrel_proto::record::store_timestamp_ms(&v).unwrap_or(i64::MAX);
            if ts < req.timestamp_ms {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        Ok(TResponse::new(bpb::BrokerOffsetForTimeResponse {
            offset: lo,
        }))
    }

    pub(super) async fn handle_queue_stats(
        &self,
        req: Request<bpb::QueueStatsRequest>,
    ) -> R<bpb::QueueStatsResponse> {
        let req = req.into_inner();
        let mut queues = Vec::with_capacity(req.group_ids.len());
        for g in req.group_ids {
            let h = match self.leader(g) {
                Ok(h) => h,
                Err(e) => {
                    queues.push(bpb::QueueStats {
                        group_id: g,
                        error: Some(e.to_detail()),
                        ..Default::default()
                    });
                    continue;
                }
            };
            let Ok(q) = queue_of(&h, g) else { continue };
            let st = q.read();
            let now = petrel_proto::now_ms();
            let end = st.header.next_offset;
            // Age of the record at `offset` (0 when there is none to wait for).
            let age = |offset: u64| -> u64 {
                if offset >= end {
                    return 0;
                }
                self.node.record_age_ms(g, offset, now)
            };
            queues.push(bpb::QueueStats {
                group_id: g,
                start_age_ms: age(st.header.start_offset),
                start_offset: st.header.start_offset,
                end_offset: st.header.next_offset,
                consumer_groups: st
                    .served()
                    .iter()
                    .filter(|(n, _)| req.consumer_group.is_empty() || **n == req.consumer_group)
                    .map(|(n, c)| bpb::ConsumerGroupStats {
                        name: n.clone(),
                        committed_offset: c.committed,
                        inflight: c.inflight(),
                        skipped: c.skipped,
                        dead_lettered: c.dead_lettered,
                        filtered: c.filtered,
                        scheduled: st.due.len() as u64,
                        uncommitted: st
                            .txns
                            .values()
                            .filter(|t| t.outcome.is_none())
                            .map(|t| t.offsets.len() as u64)
                            .sum(),
                        lag_ms: age(c.committed.max(st.header.start_offset)),
                    })
                    .collect(),
                error: None,
            });
        }
        Ok(TResponse::new(bpb::QueueStatsResponse { queues }))
    }
}

/// A failed storage read as the caller sees it: damaged bytes are
/// `corrupt` (not retried elsewhere as if the broker were busy), anything
/// else `internal`.
fn storage_err(group: u64, offset: u64, e: StorageError) -> PetrelError {
    tracing::error!(group, offset, error = %e, "storage read failed");
    let m = format!("group {group} offset {offset}: {e}");
    if e.is_corruption() {
        PetrelError::Corrupt(m)
    } else {
        PetrelError::Internal(m)
    }
}
