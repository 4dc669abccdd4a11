//! Raft type configuration shared by the meta group and every queue group,
//! and the commands they replicate.

use std::io::Cursor;

use bytes::Bytes;
use petrel_proto::PetrelError;
use serde::{Deserialize, Serialize};

pub use crate::apply_error::ApplyError;
pub use crate::meta::META_GROUP;
use crate::meta::{QueuePlacement, TopicSpec};
pub use crate::queue::LeaseInfo;
use crate::queue::{PopOutcome, RetryPolicy, TxnOpen};

openraft::declare_raft_types!(
    /// One type configuration for every group: one transport, one log store.
    pub TypeConfig:
        D = Command,
        R = Response,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type LogId = openraft::LogId<u64>;
pub type Vote = openraft::Vote<u64>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type StoredMembership = openraft::StoredMembership<u64, openraft::BasicNode>;
pub type SnapshotMeta = openraft::SnapshotMeta<u64, openraft::BasicNode>;
pub type RaftStorageError = openraft::StorageError<u64>;

/// A replicated command. Time-dependent commands carry the leader's clock so
/// that every replica applies them identically.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Command {
    // ---- queue groups ----
    /// Append records. `records[i].0` is the producer sequence (0 = none).
    Append {
        producer_id: String,
        records: Vec<(u64, Bytes)>,
        /// Per record: hold until then (DELAY topics; empty = none held).
        deliver_at: Vec<i64>,
        /// TRANSACTION topics: the transaction these records belong to.
        txn: Option<TxnOpen>,
    },
    /// Commit or roll back a transaction's records in this queue.
    EndTxn {
        id: String,
        commit: bool,
    },
    /// These open transactions were handed to a checker at `now_ms`.
    TxnChecked {
        ids: Vec<String>,
        now_ms: i64,
        interval_ms: u64,
    },
    /// Lease up to `max` deliverable records to a consumer group.
    Pop {
        consumer: String,
        max: u32,
        now_ms: i64,
        invisible_ms: u64,
        /// (`pb::FilterType` as i32, expression); validated by the leader.
        filter: Option<(i32, String)>,
        /// FIFO topic: one lease at a time per message group.
        fifo: bool,
        policy: RetryPolicy,
    },
    /// A consumer failed a record: back off, or dead-letter it.
    Nack {
        consumer: String,
        offset: u64,
        lease_id: u64,
        reason: String,
        now_ms: i64,
    },
    /// These dead letters are stored in the dead-letter topic.
    DeadLettered {
        consumer: String,
        offsets: Vec<u64>,
    },
    /// Hand delayed records due at `now_ms` (at most `max`) to consumers.
    Release {
        now_ms: i64,
        max: u32,
    },
    Ack {
        consumer: String,
        leases: Vec<(u64, u64)>,
    },
    ChangeInvisible {
        consumer: String,
        offset: u64,
        lease_id: u64,
        now_ms: i64,
        invisible_ms: u64,
    },
    CommitOffset {
        consumer: String,
        offset: u64,
    },
    /// Retention: drop records below `before` (`freed_bytes` of them).
    Truncate {
        before: u64,
        freed_bytes: u64,
    },
    // ---- meta group ----
    RegisterBroker {
        id: u64,
        address: String,
    },
    CreateTopic {
        spec: TopicSpec,
        placements: Vec<QueuePlacement>,
        now_ms: i64,
    },
    UpdateTopic {
        name: String,
        retention_ms: Option<u64>,
        retention_bytes: Option<u64>,
        /// Queue count wanted; queues are added only up to it, so applying
        /// a retried update twice adds nothing the second time.
        target_queue_count: u32,
        /// Placements for the queues to add, first ones first.
        add_queues: Vec<QueuePlacement>,
    },
    DeleteTopic {
        name: String,
    },
    /// Mark a broker draining (or active again).
    SetDraining {
        id: u64,
        draining: bool,
    },
    /// Forget a broker that hosts nothing.
    RemoveBroker {
        id: u64,
    },
    /// Replace replica `from` of `group` by `to` (controller).
    MoveReplica {
        group: u64,
        from: u64,
        to: u64,
    },
    /// The group's membership matches generation `generation` (its leader).
    SettleReplicas {
        group: u64,
        generation: u64,
    },
    // ---- queue groups (added last: variant indexes of logged entries
    // must not move) ----
    /// Appends that arrived together, in one Raft entry: applied in order,
    /// each exactly as its own `Append` would be.
    AppendBatch(Vec<AppendPart>),
    /// Consumer ops the queue leader took in memory (receives, acks, nacks,
    /// invisibility changes, dead-letter decisions), batched.
    Checkpoint(crate::queue::Checkpoint),
}

/// One request's records inside an [`Command::AppendBatch`]; the fields of
/// [`Command::Append`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppendPart {
    pub producer_id: String,
    pub records: Vec<(u64, Bytes)>,
    pub deliver_at: Vec<i64>,
    pub txn: Option<TxnOpen>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub enum Response {
    /// Membership changes and blank entries.
    #[default]
    None,
    Appended(Vec<(u64, bool)>),
    Leased(PopOutcome),
    /// A count (records a transaction end affected).
    Count(u64),
    /// Nack: when the record comes back (`None`: dead-lettered).
    Nacked(Result<Option<i64>, ApplyError>),
    Acked(Vec<Result<(), ApplyError>>),
    Lease(Result<LeaseInfo, ApplyError>),
    Done(Result<(), ApplyError>),
    /// Meta: the map version after the change.
    Meta(Result<u64, ApplyError>),
    /// `AppendBatch`: per part, (offset, duplicate) per record.
    AppendedBatch(Vec<Vec<(u64, bool)>>),
}

/// What each command's caller takes out of its [`Response`]. A response of
/// another kind is a bug; it becomes the one `internal` error below.
impl Response {
    /// `Append` or `AppendBatch`: per part, (offset, duplicate) per record.
    pub fn into_appended(self) -> Result<Vec<Vec<(u64, bool)>>, PetrelError> {
        match self {
            Response::Appended(v) => Ok(vec![v]),
            Response::AppendedBatch(v) => Ok(v),
            other => Err(other.unexpected()),
        }
    }

    /// `EndTxn`: the records the transaction end affected.
    pub fn into_count(self) -> Result<u64, PetrelError> {
        match self {
            Response::Count(n) => Ok(n),
            other => Err(other.unexpected()),
        }
    }

    /// Commands answered `Done` (`Checkpoint`, `CommitOffset`, ...).
    pub fn into_done(self) -> Result<(), PetrelError> {
        match self {
            Response::Done(r) => r.map_err(PetrelError::from),
            other => Err(other.unexpected()),
        }
    }

    /// Meta-group commands: the map version after the change.
    pub fn into_meta_version(self) -> Result<u64, PetrelError> {
        match self {
            Response::Meta(r) => r.map_err(PetrelError::from),
            other => Err(other.unexpected()),
        }
    }

    fn unexpected(self) -> PetrelError {
        PetrelError::Internal(format!("unexpected response {self:?}"))
    }
}
