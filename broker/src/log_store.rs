//! openraft log storage for every group, on the shared `raft_log` and
//! `raft_state` column families. Appends are written at once and completed
//! by the shared group-commit syncer after one fsync.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};

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
}

fn read_err(e: impl std::error::Error + 'static) -> RaftStorageError {
    StorageIOError::read_logs(&e).into()
}

fn write_err(e: impl std::error::Error + 'static) -> RaftStorageError {
    StorageIOError::write_logs(&e).into()
}

impl LogStore {
    pub fn new(group: u64, store: Store) -> Self {
        Self { group, store }
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
        for e in entries {
            let v = bincode::serialize(&e).map_err(write_err)?;
            b.put_cf(&cf, keys::log_key(self.group, e.log_id.index), v);
        }
        self.store.write_logged(b).map_err(write_err)?;
        self.store
            .sync_then(Box::new(move |res| callback.log_io_completed(res)));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), RaftStorageError> {
        let mut b = WriteBatch::default();
        b.delete_range_cf(
            &self.store.cf(CF_RAFT_LOG),
            &keys::log_key(self.group, log_id.index)[..],
            &keys::group_end(self.group)[..],
        );
        self.store.write_synced(b).map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), RaftStorageError> {
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
