//! openraft log storage for every group, on the shared `raft_log` and
//! `raft_state` column families. Appends are written at once and completed
//! by the shared group-commit syncer after one fsync.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader, StorageIOError};
use rocksdb::{Direction, IteratorMode, WriteBatch};

use crate::keys::{self, raft_state};
use crate::storage::{Store, CF_RAFT_LOG, CF_RAFT_STATE};
use crate::types::{Entry, LogId, RaftStorageError, TypeConfig, Vote};

#[derive(Clone, Debug)]
pub struct LogStore {
    group: u64,
    store: Store,
    /// The newest entries, shared with the log readers openraft hands to
    /// replication: a follower catching up with fresh entries is served
    /// from memory, not re-read and re-decoded from RocksDB.
    tail: Arc<Mutex<Tail>>,
}

/// Most entries kept in memory per group. Followers are normally a few
/// entries behind; one further back is served from RocksDB.
const TAIL_ENTRIES: usize = 256;
/// Most command bytes kept in memory per group (records dominate).
const TAIL_BYTES: usize = 4 << 20;
/// Most bytes kept by every group's tail together (process-wide): with
/// thousands of groups the per-group bound alone is not a bound. Past it, a
/// group that appends keeps only its newest entry.
const TAIL_BYTES_TOTAL: usize = 256 << 20;
static TAIL_TOTAL: AtomicUsize = AtomicUsize::new(0);

/// A contiguous run of the newest log entries (indexes `first..first+len`).
#[derive(Debug, Default)]
struct Tail {
    entries: VecDeque<(Entry, usize)>,
    bytes: usize,
}

impl Tail {
    fn first(&self) -> Option<u64> {
        self.entries.front().map(|(e, _)| e.log_id.index)
    }

    fn push(&mut self, e: Entry) {
        // Appends are contiguous; anything else (a gap after a purge or a
        // snapshot install) starts the run afresh.
        let next = self.entries.back().map(|(b, _)| b.log_id.index + 1);
        if next.is_some_and(|n| n != e.log_id.index) {
            self.clear();
        }
        let size = entry_size(&e);
        self.bytes += size;
        TAIL_TOTAL.fetch_add(size, Ordering::Relaxed);
        self.entries.push_back((e, size));
        while self.entries.len() > TAIL_ENTRIES
            || (self.entries.len() > 1
                && (self.bytes > TAIL_BYTES
                    || TAIL_TOTAL.load(Ordering::Relaxed) > TAIL_BYTES_TOTAL))
        {
            self.pop_front();
        }
    }

    fn pop_front(&mut self) {
        if let Some((_, s)) = self.entries.pop_front() {
            self.forget(s);
        }
    }

    /// Accounts for an entry of `size` bytes leaving the tail.
    fn forget(&mut self, size: usize) {
        self.bytes -= size;
        TAIL_TOTAL.fetch_sub(size, Ordering::Relaxed);
    }

    /// Drops entries with index >= `from`.
    fn truncate(&mut self, from: u64) {
        while self
            .entries
            .back()
            .is_some_and(|(e, _)| e.log_id.index >= from)
        {
            if let Some((_, s)) = self.entries.pop_back() {
                self.forget(s);
            }
        }
    }

    /// Drops entries with index <= `upto`.
    fn purge(&mut self, upto: u64) {
        while self
            .entries
            .front()
            .is_some_and(|(e, _)| e.log_id.index <= upto)
        {
            self.pop_front();
        }
    }

    fn clear(&mut self) {
        TAIL_TOTAL.fetch_sub(self.bytes, Ordering::Relaxed);
        self.entries.clear();
        self.bytes = 0;
    }

    /// The entries of `start..end` if the tail holds all of them.
    fn get(&self, start: u64, end: u64) -> Option<Vec<Entry>> {
        let first = self.first()?;
        let last = first + self.entries.len() as u64; // exclusive
        if start < first || end > last || start > end {
            return None;
        }
        let from = (start - first) as usize;
        let to = (end - first) as usize;
        Some(
            self.entries
                .range(from..to)
                .map(|(e, _)| e.clone())
                .collect(),
        )
    }
}

impl Drop for Tail {
    fn drop(&mut self) {
        TAIL_TOTAL.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// Approximate memory of an entry: its records' bytes plus a little.
fn entry_size(e: &Entry) -> usize {
    use crate::types::Command;
    let body = match &e.payload {
        openraft::EntryPayload::Normal(Command::Append { records, .. }) => {
            records.iter().map(|(_, b)| b.len() + 16).sum()
        }
        openraft::EntryPayload::Normal(Command::AppendBatch(parts)) => parts
            .iter()
            .flat_map(|p| p.records.iter())
            .map(|(_, b)| b.len() + 16)
            .sum(),
        _ => 0,
    };
    body + 128
}

fn read_err(e: impl std::error::Error + 'static) -> RaftStorageError {
    StorageIOError::read_logs(&e).into()
}

fn write_err(e: impl std::error::Error + 'static) -> RaftStorageError {
    StorageIOError::write_logs(&e).into()
}

impl LogStore {
    pub fn new(group: u64, store: Store) -> Self {
        Self {
            group,
            store,
            tail: Arc::default(),
        }
    }

    fn tail(&self) -> std::sync::MutexGuard<'_, Tail> {
        self.tail.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drops the in-memory tail (a quiet group: every follower holds every
    /// entry, so nothing will be replicated from it). The tail is shared
    /// with the clone openraft owns.
    pub fn forget_tail(&self) {
        self.tail().clear();
    }

    fn get_meta<T: serde::de::DeserializeOwned>(
        &self,
        kind: u8,
    ) -> Result<Option<T>, RaftStorageError> {
        let key = keys::state_key(self.group, kind);
        match self.store.get(CF_RAFT_STATE, &key).map_err(read_err)? {
            None => Ok(None),
            Some(v) => Ok(Some(bincode::deserialize(&v).map_err(read_err)?)),
        }
    }

    fn last_log_id(&self) -> Result<Option<LogId>, RaftStorageError> {
        let cf = self.store.cf(CF_RAFT_LOG);
        let end = keys::log_key(self.group, u64::MAX);
        let mut it = self
            .store
            .db()
            .iterator_cf(&cf, IteratorMode::From(&end, Direction::Reverse));
        match it.next() {
            None => Ok(None),
            Some(kv) => {
                let (k, v) = kv.map_err(read_err)?;
                match keys::decode_group_u64(&k) {
                    Some((g, _)) if g == self.group => {
                        let e: Entry = bincode::deserialize(&v).map_err(read_err)?;
                        Ok(Some(e.log_id))
                    }
                    _ => Ok(None),
                }
            }
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, RaftStorageError> {
        let start = match range.start_bound() {
            Bound::Included(x) => *x,
            Bound::Excluded(x) => x + 1,
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(x) => Some(x + 1),
            Bound::Excluded(x) => Some(*x),
            Bound::Unbounded => None,
        };
        if let Some(end) = end {
            if let Some(hit) = self.tail().get(start, end) {
                return Ok(hit);
            }
        }
        let cf = self.store.cf(CF_RAFT_LOG);
        let from = keys::log_key(self.group, start);
        let it = self
            .store
            .db()
            .iterator_cf(&cf, IteratorMode::From(&from, Direction::Forward));
        let mut out = Vec::new();
        for kv in it {
            let (k, v) = kv.map_err(read_err)?;
            let Some((g, idx)) = keys::decode_group_u64(&k) else {
                break;
            };
            if g != self.group || !range.contains(&idx) {
                break;
            }
            out.push(bincode::deserialize::<Entry>(&v).map_err(read_err)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, RaftStorageError> {
        let last_purged: Option<LogId> = self.get_meta(raft_state::LAST_PURGED)?.flatten();
        let last = self.last_log_id()?.or(last_purged);
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), RaftStorageError> {
        let mut b = WriteBatch::default();
        let v = bincode::serialize(vote).map_err(|e| StorageIOError::write_vote(&e))?;
        b.put_cf(
            &self.store.cf(CF_RAFT_STATE),
            keys::state_key(self.group, raft_state::VOTE),
            v,
        );
        self.store
            .write_synced(b)
            .map_err(|e| StorageIOError::write_vote(&e).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, RaftStorageError> {
        self.get_meta(raft_state::VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), RaftStorageError> {
        let mut b = WriteBatch::default();
        let v = bincode::serialize(&committed).map_err(write_err)?;
        b.put_cf(
            &self.store.cf(CF_RAFT_STATE),
            keys::state_key(self.group, raft_state::COMMITTED),
            v,
        );
        self.store.write_logged(b).map_err(write_err)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, RaftStorageError> {
        Ok(self.get_meta(raft_state::COMMITTED)?.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), RaftStorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let cf = self.store.cf(CF_RAFT_LOG);
        let mut b = WriteBatch::default();
        let mut fresh = Vec::new();
        for e in entries {
            let v = bincode::serialize(&e).map_err(write_err)?;
            b.put_cf(&cf, keys::log_key(self.group, e.log_id.index), v);
            fresh.push(e);
        }
        self.store.write_logged(b).map_err(write_err)?;
        {
            let mut tail = self.tail();
            for e in fresh {
                tail.push(e);
            }
        }
        self.store
            .sync_then(Box::new(move |res| callback.log_io_completed(res)));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), RaftStorageError> {
        self.tail().truncate(log_id.index);
        let mut b = WriteBatch::default();
        b.delete_range_cf(
            &self.store.cf(CF_RAFT_LOG),
            &keys::log_key(self.group, log_id.index)[..],
            &keys::group_end(self.group)[..],
        );
        self.store.write_synced(b).map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), RaftStorageError> {
        self.tail().purge(log_id.index);
        let mut b = WriteBatch::default();
        let v = bincode::serialize(&Some(log_id)).map_err(write_err)?;
        b.put_cf(
            &self.store.cf(CF_RAFT_STATE),
            keys::state_key(self.group, raft_state::LAST_PURGED),
            v,
        );
        b.delete_range_cf(
            &self.store.cf(CF_RAFT_LOG),
            keys::log_key(self.group, 0),
            keys::log_key(self.group, log_id.index + 1),
        );
        self.store.write_logged(b).map_err(write_err)
    }
}
