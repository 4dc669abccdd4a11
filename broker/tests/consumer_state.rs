//! A queue's consumer state as the state machine persists it: one key per
//! lease plus the rest of the group's state, written by checkpoints and
//! loaded back whole when the broker restarts; and what becomes of a
//! leader's ops whose term ends before they commit.

use std::sync::atomic::AtomicI64;
use std::sync::Arc;

use bytes::Bytes;
use openraft::storage::RaftStateMachine;
use openraft::{CommittedLeaderId, EntryPayload};
use petrel_broker::queue::{Changes, Checkpoint, ConsumerOp, ConsumerOps, Lease};
use petrel_broker::sm::{Kind, QueueShared, StateMachine, KEYED_LEASES_ABOVE};
use petrel_broker::storage::Store;
use petrel_broker::types::{ApplyError, Command, Entry, LogId, Response};
use petrel_proto::record::RecordData;

const GROUP: u64 = 7;

fn entry(index: u64, cmd: Command) -> Entry {
    entry_of_term(1, index, cmd)
}

fn entry_of_term(term: u64, index: u64, cmd: Command) -> Entry {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
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
        // Taken by the leader of term 1, the term of `entry`'s log ids.
        term: 1,
        batches: vec![ConsumerOps {
            consumer: "g".into(),
            ops,
        }],
    })
}

fn append(n: u64) -> Command {
    let records: Vec<(u64, Bytes)> = (0..n)
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
    Command::Append {
        producer_id: "p".into(),
        records,
        deliver_at: Vec::new(),
        txn: None,
    }
}

#[tokio::test]
async fn checkpointed_leases_and_acks_survive_a_restart_and_a_reset_drops_them() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let (mut sm, q) = open(&store);
    let append = append(10);
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

/// Many leases are persisted one key each (a checkpoint writes what it
/// touched); when they fall back to a few, inside the group's state again.
/// Every form loads back to the same state.
#[tokio::test]
async fn many_leases_are_keyed_and_every_form_loads_back() {
    let n = KEYED_LEASES_ABOVE as u64 + 100;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let (mut sm, q) = open(&store);
    let mut ops: Vec<ConsumerOp> = (0..n).map(|o| ConsumerOp::Lease(o, lease(o))).collect();
    ops.push(ConsumerOp::Scan {
        to: n,
        filtered: 0,
        passed: Vec::new(),
        held: Vec::new(),
    });
    sm.apply([entry(1, append(n)), entry(2, checkpoint(ops))])
        .await
        .unwrap();
    // Touches a few leases of a keyed group.
    let done: Vec<ConsumerOp> = (10..20).map(ConsumerOp::Done).collect();
    sm.apply([entry(3, checkpoint(done))]).await.unwrap();
    let keyed = q.read().consumers["g"].clone();
    assert_eq!(keyed.leases.len() as u64, n - 10);
    drop(sm);
    let (mut sm, q2) = open(&store);
    assert_eq!(q2.read().consumers["g"], keyed, "keyed form loads back");

    // Most are acked: back inside the group's state.
    let done: Vec<ConsumerOp> = (100..n).map(ConsumerOp::Done).collect();
    sm.apply([entry(4, checkpoint(done))]).await.unwrap();
    let few = q2.read().consumers["g"].clone();
    assert_eq!(few.leases.len(), 90);
    drop(sm);
    let (_sm, q3) = open(&store);
    assert_eq!(q3.read().consumers["g"], few, "no stale lease key survives");
}

/// A leader's ops live in its served state until their checkpoint
/// commits. If its term ends first, they must vanish: the served state is
/// dropped when an entry of a later term is applied, and the checkpoint,
/// should it reach the log in a later term (a late proposal), is refused.
/// Otherwise a lease no consumer was told of, or one from before an ack,
/// could come back and redeliver an acked record.
#[tokio::test]
async fn ops_of_an_ended_term_never_reach_the_committed_state() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let (mut sm, q) = open(&store);
    sm.apply([entry(1, append(4))]).await.unwrap();
    let ops = vec![
        ConsumerOp::Lease(0, lease(1 << 40)),
        ConsumerOp::Scan {
            to: 1,
            filtered: 0,
            passed: Vec::new(),
            held: Vec::new(),
        },
    ];
    let batch = ConsumerOps {
        consumer: "g".into(),
        ops: ops.clone(),
    };
    // The leader of term 1 takes them in memory.
    q.write()
        .serve(1, |st| {
            st.apply_consumer_ops(&batch, &mut Changes::default())
        })
        .unwrap();
    assert_eq!(q.read().served()["g"].leases.len(), 1);
    assert!(q
        .read()
        .consumers
        .get("g")
        .is_none_or(|c| c.leases.is_empty()));

    // Their checkpoint lands in term 2's log: refused, nothing changes.
    let out = sm
        .apply([entry_of_term(2, 2, checkpoint(ops.clone()))])
        .await
        .unwrap();
    assert!(
        matches!(&out[0], Response::Done(Err(ApplyError::StaleTerm(_)))),
        "{out:?}"
    );
    assert!(q.read().serving.is_none(), "term 1's served state is gone");
    assert!(q
        .read()
        .consumers
        .get("g")
        .is_none_or(|c| c.leases.is_empty()));
    drop(sm);
    let (_sm, q2) = open(&store);
    assert!(
        q2.read()
            .consumers
            .get("g")
            .is_none_or(|c| c.leases.is_empty()),
        "nor was it persisted"
    );

    // The same ops in their own term's entry apply.
    let (mut sm, q3) = open(&store);
    sm.apply([entry_of_term(2, 3, {
        let Command::Checkpoint(mut cp) = checkpoint(ops) else {
            unreachable!()
        };
        cp.term = 2;
        Command::Checkpoint(cp)
    })])
    .await
    .unwrap();
    assert_eq!(q3.read().consumers["g"].leases.len(), 1);
}
