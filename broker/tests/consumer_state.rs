//! A queue's consumer state as the state machine persists it: one key per
//! lease plus the rest of the group's state, written by checkpoints and
//! loaded back whole when the broker restarts.

use std::sync::atomic::AtomicI64;
use std::sync::Arc;

use bytes::Bytes;
use openraft::storage::RaftStateMachine;
use openraft::{CommittedLeaderId, EntryPayload};
use petrel_broker::queue::{Checkpoint, ConsumerOp, ConsumerOps, Lease};
use petrel_broker::sm::{Kind, QueueShared, StateMachine};
use petrel_broker::storage::Store;
use petrel_broker::types::{Command, Entry, LogId};
use petrel_proto::record::RecordData;

const GROUP: u64 = 7;

fn entry(index: u64, cmd: Command) -> Entry {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(cmd),
    }
}

fn open(store: &Store) -> (StateMachine, Arc<QueueShared>) {
    let q = Arc::new(QueueShared::new(GROUP, Arc::new(AtomicI64::new(i64::MAX))));
    let sm = StateMachine::open(GROUP, store.clone(), Kind::Queue(q.clone())).expect("open");
    (sm, q)
}

fn lease(id: u64) -> Lease {
    Lease {
        attempt: 1,
        lease_id: id,
        deadline_ms: 5_000,
        prev_lease_id: 0,
        retry_at_ms: 5_000,
        mgroup: 0,
        reason: String::new(),
    }
}

fn checkpoint(ops: Vec<ConsumerOp>) -> Command {
    Command::Checkpoint(Checkpoint {
        // Made by another replica's memory: this one applies the ops.
        origin: 1,
        batches: vec![ConsumerOps {
            consumer: "g".into(),
            ops,
        }],
    })
}

#[tokio::test]
async fn checkpointed_leases_and_acks_survive_a_restart_and_a_reset_drops_them() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let (mut sm, q) = open(&store);
    let records: Vec<(u64, Bytes)> = (0..10)
        .map(|i| {
            let r = RecordData {
                producer_id: "p".into(),
                sequence: i,
                body: Bytes::from(vec![b'x'; 10]),
                ..Default::default()
            };
            (i, r.encode())
        })
        .collect();
    let append = Command::Append {
        producer_id: "p".into(),
        records,
        deliver_at: Vec::new(),
        txn: None,
    };
    let mut ops: Vec<ConsumerOp> = (0..6)
        .map(|o| ConsumerOp::Lease(o, lease(100 + o)))
        .collect();
    ops.push(ConsumerOp::Scan {
        to: 6,
        filtered: 0,
        passed: Vec::new(),
        held: Vec::new(),
    });
    ops.push(ConsumerOp::Done(0));
    ops.push(ConsumerOp::Done(3));
    sm.apply([entry(1, append), entry(2, checkpoint(ops))])
        .await
        .unwrap();
    // A second checkpoint touching one lease only.
    sm.apply([entry(3, checkpoint(vec![ConsumerOp::Done(1)]))])
        .await
        .unwrap();
    let before = q.read().consumers["g"].clone();
    assert_eq!(
        before.leases.keys().copied().collect::<Vec<_>>(),
        vec![2, 4, 5]
    );
    assert_eq!((before.committed, before.next_fresh), (2, 6));
    drop(sm);

    let (mut sm, q2) = open(&store);
    assert_eq!(q2.read().consumers["g"], before, "loaded as persisted");

    sm.apply([entry(4, checkpoint(vec![ConsumerOp::Reset(8)]))])
        .await
        .unwrap();
    drop(sm);
    let (_sm, q3) = open(&store);
    let after = q3.read().consumers["g"].clone();
    assert!(
        after.leases.is_empty(),
        "a reset forward drops leases below it"
    );
    assert_eq!((after.committed, after.next_fresh), (8, 8));
}
