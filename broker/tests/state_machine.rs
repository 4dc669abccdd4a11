//! The queue state machine as a replica runs it (`sm.rs`): appends get
//! consecutive offsets and are stored once per producer sequence, a batched
//! entry answers each part as its own append would, delayed records are
//! held, and all of it survives a reload from RocksDB and travels whole in
//! a snapshot to a replica that starts empty.

use std::io::Cursor;
use std::sync::atomic::AtomicI64;
use std::sync::Arc;

use bytes::Bytes;
use openraft::storage::RaftStateMachine;
use openraft::{CommittedLeaderId, EntryPayload};
use petrel_broker::keys;
use petrel_broker::sm::{Kind, QueueShared, StateMachine};
use petrel_broker::storage::{Store, CF_RECORDS};
use petrel_broker::types::{AppendPart, Command, Entry, LogId, Response};
use petrel_proto::record::RecordData;

const GROUP: u64 = 3;

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

/// Records of `producer` with these sequences, bodies naming the sequence.
fn records(producer: &str, seqs: &[u64]) -> Vec<(u64, Bytes)> {
    seqs.iter()
        .map(|&s| {
            let r = RecordData {
                producer_id: producer.into(),
                sequence: s,
                body: Bytes::from(format!("{producer}-{s}")),
                ..Default::default()
            };
            (s, r.encode())
        })
        .collect()
}

fn append(producer: &str, seqs: &[u64]) -> Command {
    Command::Append {
        producer_id: producer.into(),
        records: records(producer, seqs),
        deliver_at: Vec::new(),
        txn: None,
    }
}

async fn apply_one(sm: &mut StateMachine, index: u64, cmd: Command) -> Response {
    let mut out = sm.apply([entry(index, cmd)]).await.expect("apply");
    assert_eq!(out.len(), 1, "one response per entry");
    out.pop().unwrap()
}

fn appended(r: Response) -> Vec<(u64, bool)> {
    match r {
        Response::Appended(v) => v,
        other => panic!("expected Appended, got {other:?}"),
    }
}

/// The body stored at `offset`, decoded from the records column family.
fn stored_body(store: &Store, offset: u64) -> Option<Bytes> {
    let v = store
        .get(CF_RECORDS, &keys::record_key(GROUP, offset))
        .expect("read");
    v.map(|b| RecordData::decode(&Bytes::from(b)).expect("decodes").body)
}

#[tokio::test]
async fn appends_take_consecutive_offsets_and_a_retried_sequence_is_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let (mut sm, q) = open(&store);

    let first = appended(apply_one(&mut sm, 1, append("p", &[1, 2, 3])).await);
    assert_eq!(first, vec![(0, false), (1, false), (2, false)]);
    // The same request again (a producer's retry): the offsets it got
    // the first time, marked duplicate, and nothing new is stored.
    let again = appended(apply_one(&mut sm, 2, append("p", &[1, 2, 3])).await);
    assert_eq!(again, vec![(0, true), (1, true), (2, true)]);
    // A retry that overlaps new sequences stores only the new ones.
    let mixed = appended(apply_one(&mut sm, 3, append("p", &[3, 4])).await);
    assert_eq!(mixed, vec![(2, true), (3, false)]);
    // Another producer's sequence 1 is its own.
    let other = appended(apply_one(&mut sm, 4, append("other", &[1])).await);
    assert_eq!(other, vec![(4, false)]);
    // Sequence 0 means "no de-duplication": stored every time.
    let anon = appended(apply_one(&mut sm, 5, append("", &[0, 0])).await);
    assert_eq!(anon, vec![(5, false), (6, false)]);

    assert_eq!(q.read().header.next_offset, 7);
    assert_eq!(stored_body(&store, 3).as_deref(), Some(&b"p-4"[..]));
    assert_eq!(stored_body(&store, 4).as_deref(), Some(&b"other-1"[..]));
    assert_eq!(stored_body(&store, 7), None, "nothing past the end");
}

#[tokio::test]
async fn a_batched_entry_answers_each_part_as_its_own_append_would() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let (mut sm, q) = open(&store);
    let part = |producer: &str, seqs: &[u64]| AppendPart {
        producer_id: producer.into(),
        records: records(producer, seqs),
        deliver_at: Vec::new(),
        txn: None,
    };
    let r = apply_one(
        &mut sm,
        1,
        Command::AppendBatch(vec![
            part("a", &[1, 2]),
            part("b", &[1]),
            part("a", &[2, 3]),
        ]),
    )
    .await;
    let Response::AppendedBatch(parts) = r else {
        panic!("expected AppendedBatch, got {r:?}");
    };
    // The third part repeats a's sequence 2 from the first part of the
    // same entry: a duplicate, exactly as two separate appends.
    assert_eq!(
        parts,
        vec![
            vec![(0, false), (1, false)],
            vec![(2, false)],
            vec![(1, true), (3, false)],
        ]
    );
    assert_eq!(q.read().header.next_offset, 4);
}

#[tokio::test]
async fn delayed_records_are_held_and_everything_survives_a_reload() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let (mut sm, q) = open(&store);
    let due = petrel_proto::now_ms() + 3_600_000;
    let delayed = Command::Append {
        producer_id: "p".into(),
        records: records("p", &[1, 2]),
        deliver_at: vec![due, 0],
        txn: None,
    };
    apply_one(&mut sm, 1, delayed).await;
    apply_one(&mut sm, 2, append("p", &[3])).await;
    {
        let st = q.read();
        assert_eq!(st.held.get(&0), Some(&due), "the delayed record is held");
        assert!(!st.held.contains_key(&1), "deliver_at 0 is not delayed");
    }
    let before_header = q.read().header;
    drop(sm);

    let (mut sm, q2) = open(&store);
    {
        let st = q2.read();
        assert_eq!(st.header.next_offset, before_header.next_offset);
        assert_eq!(st.header.bytes, before_header.bytes);
        assert_eq!(st.held.get(&0), Some(&due), "held across the reload");
    }
    // The de-duplication window came back too: a retry after the reload
    // is still recognised.
    let retry = appended(apply_one(&mut sm, 3, append("p", &[2, 3])).await);
    assert_eq!(retry, vec![(1, true), (2, true)]);
    let (applied, _) = sm.applied_state().await.unwrap();
    assert_eq!(applied.map(|l| l.index), Some(3));
}

#[tokio::test]
async fn a_snapshot_brings_an_empty_replica_to_the_same_queue() {
    let src_dir = tempfile::tempdir().unwrap();
    let src_store = Store::open(src_dir.path()).unwrap();
    let (mut src, src_q) = open(&src_store);
    apply_one(&mut src, 1, append("p", &[1, 2, 3, 4])).await;
    let due = petrel_proto::now_ms() + 3_600_000;
    apply_one(
        &mut src,
        2,
        Command::Append {
            producer_id: "p".into(),
            records: records("p", &[5]),
            deliver_at: vec![due],
            txn: None,
        },
    )
    .await;
    // The first call is openraft's start-up read of the snapshot meta and
    // gets a flush mark without data (installing it is refused); calls
    // after it are for a lagging replica and carry the whole queue.
    let mark = src.get_current_snapshot().await.unwrap().expect("a mark");
    let empty_dir = tempfile::tempdir().unwrap();
    let (mut empty, _) = open(&Store::open(empty_dir.path()).unwrap());
    let refused = empty
        .install_snapshot(
            &mark.meta,
            Box::new(Cursor::new(mark.snapshot.into_inner())),
        )
        .await;
    assert!(refused.is_err(), "a flush mark carries no records");
    let snap = src
        .get_current_snapshot()
        .await
        .unwrap()
        .expect("a group with applied entries has a snapshot");

    let dst_dir = tempfile::tempdir().unwrap();
    let dst_store = Store::open(dst_dir.path()).unwrap();
    let (mut dst, dst_q) = open(&dst_store);
    let data = Box::new(Cursor::new(snap.snapshot.into_inner()));
    dst.install_snapshot(&snap.meta, data).await.unwrap();

    {
        let (a, b) = (src_q.read(), dst_q.read());
        assert_eq!(b.header.next_offset, a.header.next_offset);
        assert_eq!(b.header.bytes, a.header.bytes);
        assert_eq!(b.held, a.held);
    }
    for off in 0..5 {
        assert_eq!(
            stored_body(&dst_store, off),
            stored_body(&src_store, off),
            "record {off}"
        );
    }
    let (applied, _) = dst.applied_state().await.unwrap();
    assert_eq!(applied, snap.meta.last_log_id);
    // The replica de-duplicates like its source.
    let retry = appended(apply_one(&mut dst, 3, append("p", &[4, 6])).await);
    assert_eq!(retry, vec![(3, true), (5, false)]);
}
