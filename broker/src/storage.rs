//! The one module that owns RocksDB: it opens the database, declares every
//! column family, and hands out typed handles.
//!
//! ```text
//!  raft_log    WAL on, group-committed fsync   Raft entries of every group
//!  raft_state  WAL on, fsync per write         votes, purge/commit marks
//!  records     WAL off                         queue records by offset
//!  sm_state    WAL off                         applied marks, consumer and
//!                                              de-duplication state, cluster map
//!  indexes     WAL off                         key index: [group][len][key][offset]
//!  timers      WAL off                         delayed records held: offset → due time
//! ```
//!
//! # Invariants
//! - A record's bytes are fsynced once per replica on the write path: in the
//!   Raft log entry. Applying writes them to `records` with the WAL off; the
//!   Raft log is their durability until a flush puts them in an SST file.
//! - `records`, `sm_state`, `timers` and `indexes` are flushed atomically (`atomic_flush`), so
//!   after a crash they always describe the same applied prefix, and the
//!   applied mark tells openraft where to resume replaying the log.
//! - The log of a group is purged only up to a snapshot, and a snapshot is
//!   taken only right after an explicit flush of the state CFs, so no entry
//!   whose effects are still only in a memtable is ever purged.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use rocksdb::{
    ColumnFamily, ColumnFamilyDescriptor, FlushOptions, Options, WriteBatch, WriteOptions, DB,
};

pub const CF_RAFT_LOG: &str = "raft_log";
pub const CF_RAFT_STATE: &str = "raft_state";
pub const CF_RECORDS: &str = "records";
pub const CF_SM_STATE: &str = "sm_state";
pub const CF_INDEXES: &str = "indexes";
pub const CF_TIMERS: &str = "timers";

const ALL_CFS: [&str; 6] = [
    CF_RAFT_LOG,
    CF_RAFT_STATE,
    CF_RECORDS,
    CF_SM_STATE,
    CF_INDEXES,
    CF_TIMERS,
];

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("decode {what}: {source}")]
    Decode {
        what: &'static str,
        source: bincode::Error,
    },
    #[error("record at group {group} offset {offset} is corrupt: {reason}")]
    Corrupt {
        group: u64,
        offset: u64,
        reason: String,
    },
}

impl StorageError {
    /// Whether the stored bytes are damaged: RocksDB's own `Corruption`
    /// (a block checksum, a broken SST) or a record that failed its CRC.
    /// Typed, so no caller matches on error text.
    pub fn is_corruption(&self) -> bool {
        match self {
            Self::Rocks(e) => e.kind() == rocksdb::ErrorKind::Corruption,
            Self::Corrupt { .. } => true,
            Self::Io { .. } | Self::Decode { .. } => false,
        }
    }
}

/// Handle to the broker's database. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: Arc<DB>,
    syncer: Arc<Syncer>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

fn db_options() -> Options {
    let mut o = Options::default();
    o.create_if_missing(true);
    o.create_missing_column_families(true);
    // Keeps records and sm_state consistent with each other across crashes.
    o.set_atomic_flush(true);
    o.set_max_background_jobs(2);
    o.set_bytes_per_sync(1 << 20);
    o.increase_parallelism(2);
    // Raft appends, applies and the syncer write from different threads;
    // RocksDB's default makes a waiting writer spin (sched_yield) for up to
    // 100 µs, which on a small box takes the core from the writer it waits
    // for. Block at once instead.
    o.set_enable_write_thread_adaptive_yield(false);
    o
}

fn cf_options(name: &str) -> Options {
    let mut o = Options::default();
    if name == CF_RECORDS || name == CF_RAFT_LOG {
        o.set_write_buffer_size(64 << 20);
        o.set_compression_type(rocksdb::DBCompressionType::Lz4);
    }
    o
}

impl Store {
    pub fn open(dir: &Path) -> Result<Self, StorageError> {
        std::fs::create_dir_all(dir).map_err(|e| StorageError::Io {
            path: dir.display().to_string(),
            source: e,
        })?;
        let cfs = ALL_CFS
            .iter()
            .map(|n| ColumnFamilyDescriptor::new(*n, cf_options(n)));
        let db = Arc::new(DB::open_cf_descriptors(&db_options(), dir, cfs)?);
        let syncer = Syncer::start(db.clone());
        Ok(Self { db, syncer })
    }

    pub fn cf(&self, name: &'static str) -> &ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("every column family is created at open")
    }

    pub fn db(&self) -> &DB {
        &self.db
    }

    /// Write with the WAL on, not synced (the caller syncs via [`Store::sync_then`]).
    pub fn write_logged(&self, batch: WriteBatch) -> Result<(), StorageError> {
        let mut o = WriteOptions::default();
        o.set_sync(false);
        self.db.write_opt(batch, &o)?;
        Ok(())
    }

    /// Write with the WAL on and fsynced before returning (votes). The
    /// fsync waits on the disk, so it runs as blocking work ([`blocking`]).
    pub fn write_synced(&self, batch: WriteBatch) -> Result<(), StorageError> {
        let mut o = WriteOptions::default();
        o.set_sync(true);
        blocking(|| self.db.write_opt(batch, &o))?;
        Ok(())
    }

    /// Write state-machine data with the WAL off (see module invariants).
    pub fn write_unlogged(&self, batch: WriteBatch) -> Result<(), StorageError> {
        let mut o = WriteOptions::default();
        o.disable_wal(true);
        self.db.write_opt(batch, &o)?;
        Ok(())
    }

    /// Flushes the state-machine column families (atomically) to SST files.
    pub fn flush_state(&self) -> Result<(), StorageError> {
        let mut fo = FlushOptions::default();
        fo.set_wait(true);
        blocking(|| {
            self.db.flush_cfs_opt(
                &[
                    self.cf(CF_RECORDS),
                    self.cf(CF_SM_STATE),
                    self.cf(CF_TIMERS),
                    self.cf(CF_INDEXES),
                ],
                &fo,
            )
        })?;
        Ok(())
    }

    /// Runs `done` once the WAL has been fsynced past every write made before
    /// this call. One fsync serves every caller queued meanwhile (group
    /// commit across all Raft groups).
    pub fn sync_then(&self, done: Box<dyn FnOnce(Result<(), std::io::Error>) + Send>) {
        self.syncer.submit(done);
    }

    pub fn get(&self, cf: &'static str, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.db.get_cf(&self.cf(cf), key)?)
    }

    /// Deletes every key of `group` in every column family.
    pub fn delete_group(&self, group: u64) -> Result<(), StorageError> {
        let mut b = WriteBatch::default();
        for name in ALL_CFS {
            b.delete_range_cf(
                &self.cf(name),
                &crate::keys::group_start(group)[..],
                &crate::keys::group_end(group)[..],
            );
        }
        self.write_synced(b)
    }
}

/// Runs `f`, which waits on the disk (an fsync, a flush), as blocking work:
/// on a multi-threaded Tokio runtime the worker hands its other tasks
/// (other groups' heartbeats, requests) to another thread first, so a slow
/// disk stalls only the caller. Elsewhere (a current-thread runtime in a
/// test, or no runtime) it simply runs `f`.
pub fn blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

type Done = Box<dyn FnOnce(Result<(), std::io::Error>) + Send>;

/// The group-commit syncer: one thread, one fsync for everything queued.
struct Syncer {
    tx: std::sync::Mutex<Option<std::sync::mpsc::Sender<Done>>>,
}

impl Syncer {
    fn start(db: Arc<DB>) -> Arc<Self> {
        let (tx, rx) = std::sync::mpsc::channel::<Done>();
        let weak = Arc::downgrade(&db);
        drop(db);
        std::thread::Builder::new()
            .name("petrel-wal-sync".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut batch = vec![first];
                    while let Ok(more) = rx.try_recv() {
                        batch.push(more);
                    }
                    let started = Instant::now();
                    let res = match weak.upgrade() {
                        Some(db) => db.flush_wal(true).map_err(std::io::Error::other),
                        None => Err(std::io::Error::other("database closed")),
                    };
                    tracing::trace!(
                        n = batch.len(),
                        us = started.elapsed().as_micros() as u64,
                        "wal fsync"
                    );
                    metrics::histogram!("petrel_broker_fsync_seconds")
                        .record(started.elapsed().as_secs_f64());
                    for done in batch {
                        done(match &res {
                            Ok(()) => Ok(()),
                            Err(e) => Err(std::io::Error::other(e.to_string())),
                        });
                    }
                }
            })
            .expect("spawn syncer thread");
        Arc::new(Self {
            tx: std::sync::Mutex::new(Some(tx)),
        })
    }

    fn submit(&self, done: Done) {
        let guard = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        match guard.as_ref() {
            Some(tx) => {
                if let Err(e) = tx.send(done) {
                    (e.0)(Err(std::io::Error::other("syncer stopped")));
                }
            }
            None => done(Err(std::io::Error::other("syncer stopped"))),
        }
    }
}

/// Test and repair support: overwrite a stored record's bytes in place,
/// flipping one bit of its body, in a broker's database directory that no
/// process has open. Used to prove that corruption is detected on read.
pub fn corrupt_record_for_test(dir: &Path, group: u64, offset: u64) -> Result<bool, StorageError> {
    let store = Store::open(dir)?;
    let key = crate::keys::record_key(group, offset);
    let Some(mut v) = store.get(CF_RECORDS, &key)? else {
        return Ok(false);
    };
    let last = v.len() - 1;
    v[last] ^= 0x01;
    let mut b = WriteBatch::default();
    b.put_cf(&store.cf(CF_RECORDS), key, v);
    store.write_synced(b)?;
    store.flush_state()?;
    Ok(true)
}

/// Test and repair support: the offsets stored for `group` in a broker's
/// database directory that no process has open, with whether each passes
/// its CRC.
pub fn stored_offsets_for_test(dir: &Path, group: u64) -> Result<Vec<(u64, bool)>, StorageError> {
    let store = Store::open(dir)?;
    let from = crate::keys::record_key(group, 0);
    let mut out = Vec::new();
    let it = store.db().iterator_cf(
        store.cf(CF_RECORDS),
        rocksdb::IteratorMode::From(&from, rocksdb::Direction::Forward),
    );
    for kv in it {
        let (k, v) = kv?;
        match crate::keys::decode_group_u64(&k) {
            Some((g, off)) if g == group => {
                out.push((off, petrel_proto::record::verify(&v).is_ok()))
            }
            _ => break,
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_damaged_bytes_count_as_corruption() {
        let crc = StorageError::Corrupt {
            group: 1,
            offset: 2,
            reason: "crc mismatch".into(),
        };
        assert!(crc.is_corruption());
        let io = StorageError::Io {
            path: "/data".into(),
            source: std::io::Error::other("disk full"),
        };
        assert!(!io.is_corruption());

        // RocksDB's own kind: a data block whose bytes were flipped on disk.
        let dir = tempfile::tempdir().unwrap();
        {
            let db = DB::open_default(dir.path()).unwrap();
            for i in 0..2000u32 {
                db.put(i.to_be_bytes(), vec![b'v'; 100]).unwrap();
            }
            db.flush().unwrap();
        }
        let sst = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|x| x == "sst"))
            .expect("an SST file");
        let mut bytes = std::fs::read(&sst).unwrap();
        for b in &mut bytes[100..4000] {
            *b ^= 0x5a;
        }
        std::fs::write(&sst, bytes).unwrap();
        let err = match DB::open_default(dir.path()) {
            // Opening may already check the damaged file.
            Err(e) => e,
            Ok(db) => (0..2000u32)
                .find_map(|i| db.get(i.to_be_bytes()).err())
                .expect("reading a damaged block fails"),
        };
        let e = StorageError::from(err);
        assert!(e.is_corruption(), "{e}");
    }
}
