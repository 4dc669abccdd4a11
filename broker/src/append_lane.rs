//! Group commit of appends, per queue: concurrent appends to one queue
//! become one Raft entry.
//!
//! Self-clocking, with no timer: an append goes to Raft at once while fewer
//! than [`LANE_DEPTH`] writes of its queue are in flight; otherwise it waits
//! behind them, and when one completes everything that waited goes as one
//! [`Command::AppendBatch`] entry. A lone append therefore never waits, and
//! under load the cost of a Raft entry (proposal, log write, replication,
//! apply) is paid once per batch instead of once per request.
//!
//! Each part is applied exactly as its own `Append` would be (de-dup,
//! holds, transactions), and each caller gets its own part's result; an
//! error of the whole write (lost leadership, timeout) goes to every part,
//! as it would have to each request alone.

use std::sync::{Arc, Mutex};

use petrel_proto::PetrelError;
use tokio::sync::oneshot;

use crate::node::{GroupHandle, Node};
use crate::types::{AppendPart, Command};

/// Raft writes of appends in flight per queue before appends coalesce.
pub const LANE_DEPTH: usize = 1;
/// Most requests in one batched entry.
const MAX_PARTS: usize = 1024;
/// Stop adding requests to a batched entry past this many record bytes.
const MAX_BATCH_BYTES: usize = 8 << 20;

pub type AppendResult = Result<Vec<(u64, bool)>, PetrelError>;

type Waiter = (AppendPart, oneshot::Sender<AppendResult>);

/// One queue's lane (the node keeps one per queue group it has led).
#[derive(Default)]
pub struct Lane {
    st: Mutex<LaneState>,
}

#[derive(Default)]
struct LaneState {
    in_flight: usize,
    waiting: Vec<Waiter>,
}

impl Lane {
    fn lock(&self) -> std::sync::MutexGuard<'_, LaneState> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn part_bytes(p: &AppendPart) -> usize {
    p.records.iter().map(|(_, b)| b.len()).sum()
}

/// Runs `Node::lane_next` when dropped.
struct LaneNext(Option<(Arc<Node>, u64, GroupHandle, Arc<Lane>)>);

impl Drop for LaneNext {
    fn drop(&mut self) {
        if let Some((node, group, h, lane)) = self.0.take() {
            node.lane_next(group, h, lane);
        }
    }
}

impl Node {
    /// Appends `part` to queue `group` (led here, `h`), coalesced with
    /// concurrent appends to the same queue.
    pub async fn append(
        self: &Arc<Self>,
        group: u64,
        h: &GroupHandle,
        part: AppendPart,
    ) -> AppendResult {
        let lane = self.append_lanes.entry(group).or_default().clone();
        let wait = {
            let mut st = lane.lock();
            if st.in_flight < LANE_DEPTH && st.waiting.is_empty() {
                st.in_flight += 1;
                Ok(part)
            } else {
                let (tx, rx) = oneshot::channel();
                st.waiting.push((part, tx));
                Err(rx)
            }
        };
        match wait {
            Ok(part) => {
                // Hands the slot on however this future ends: a request
                // dropped mid-write (client gone, RPC deadline) must not
                // leave the queue's lane held for good.
                let _next = LaneNext(Some((self.clone(), group, h.clone(), lane)));
                self.write_parts(group, h, vec![part])
                    .await
                    .map(|mut v| v.pop().unwrap_or_default())
            }
            Err(rx) => rx.await.unwrap_or_else(|_| {
                Err(PetrelError::Unavailable(format!(
                    "group {group}: the append was dropped before it was written"
                )))
            }),
        }
    }

    /// A write of `lane` finished: send what waited behind it as one entry
    /// (keeping the slot), or give the slot back.
    fn lane_next(self: Arc<Self>, group: u64, h: GroupHandle, lane: Arc<Lane>) {
        let batch: Vec<Waiter> = {
            let mut st = lane.lock();
            if st.waiting.is_empty() {
                st.in_flight -= 1;
                return;
            }
            let mut bytes = 0;
            let mut n = 0;
            for w in &st.waiting {
                if n == MAX_PARTS || (n > 0 && bytes + part_bytes(&w.0) > MAX_BATCH_BYTES) {
                    break;
                }
                bytes += part_bytes(&w.0);
                n += 1;
            }
            st.waiting.drain(..n).collect()
        };
        // Outside a runtime (shutting down) the waiters' senders drop and
        // they get `unavailable`.
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(async move {
            let (parts, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
            match self.write_parts(group, &h, parts).await {
                Ok(results) => {
                    for (reply, r) in replies.into_iter().zip(results) {
                        let _ = reply.send(Ok(r));
                    }
                }
                Err(e) => {
                    for reply in replies {
                        let _ = reply.send(Err(e.clone()));
                    }
                }
            }
            self.lane_next(group, h, lane);
        });
    }

    /// One Raft entry for `parts`: a plain `Append` for one, else a batch.
    async fn write_parts(
        &self,
        group: u64,
        h: &GroupHandle,
        mut parts: Vec<AppendPart>,
    ) -> Result<Vec<Vec<(u64, bool)>>, PetrelError> {
        let n = parts.len();
        let cmd = if n == 1 {
            let p = parts.pop().expect("one part");
            Command::Append {
                producer_id: p.producer_id,
                records: p.records,
                deliver_at: p.deliver_at,
                txn: p.txn,
            }
        } else {
            Command::AppendBatch(parts)
        };
        let results = self.write(group, h, cmd).await?.into_appended()?;
        if results.len() != n {
            return Err(PetrelError::Internal(format!(
                "append of {n} requests answered {} of them",
                results.len()
            )));
        }
        Ok(results)
    }
}
