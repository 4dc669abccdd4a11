//! Per-leader coalescing of appends: concurrent sends bound for queues led
//! by the same broker travel in one `Append` RPC. A bounded number of RPCs
//! per leader are in flight; whatever queues up meanwhile goes in the next.

use std::sync::Arc;

use dashmap::DashMap;
use petrel_proto::pb;
use petrel_proto::pb::broker as bpb;
use petrel_proto::PetrelError;
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::routes::Router;

/// Appends in flight per leader broker.
const INFLIGHT_PER_LEADER: usize = 2;
/// Most groups' appends coalesced into one RPC.
const MAX_COALESCED: usize = 256;
/// Stop coalescing past this many body bytes.
const MAX_COALESCED_BYTES: usize = 8 << 20;
const QUEUE_DEPTH: usize = 4096;
/// Bound on one coalesced append RPC (the broker bounds its Raft write at 10 s).
const APPEND_RPC_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

pub type AppendResult = Result<(Vec<u64>, Vec<bool>), PetrelError>;

pub struct Pending {
    pub records: bpb::AppendRecords,
    pub reply: oneshot::Sender<AppendResult>,
}

#[derive(Clone)]
pub struct Batcher {
    router: Arc<Router>,
    /// Keyed by (leader, address): a broker that moves gets a new lane.
    lanes: Arc<DashMap<(u64, String), mpsc::Sender<Pending>>>,
}

impl Batcher {
    pub fn new(router: Arc<Router>) -> Self {
        Self {
            router,
            lanes: Arc::new(DashMap::new()),
        }
    }

    /// Appends `records` to its group via `leader` at `addr`.
    pub async fn append(
        &self,
        leader: u64,
        addr: String,
        records: bpb::AppendRecords,
    ) -> AppendResult {
        let (tx, rx) = oneshot::channel();
        let key = (leader, addr.clone());
        let lane = self
            .lanes
            .entry(key.clone())
            .or_insert_with(|| self.spawn_lane(leader, addr))
            .clone();
        if lane.send(Pending { records, reply: tx }).await.is_err() {
            self.lanes.remove(&key);
            return Err(PetrelError::Unavailable("append lane closed".into()));
        }
        rx.await
            .unwrap_or_else(|_| Err(PetrelError::Unavailable("append dropped".into())))
    }

    fn spawn_lane(&self, leader: u64, addr: String) -> mpsc::Sender<Pending> {
        let (tx, mut rx) = mpsc::channel::<Pending>(QUEUE_DEPTH);
        let router = self.router.clone();
        tokio::spawn(async move {
            let permits = Arc::new(Semaphore::new(INFLIGHT_PER_LEADER));
            // An item that would have pushed the last batch over the byte
            // limit opens the next one.
            let mut carry: Option<Pending> = None;
            loop {
                let first = match carry.take() {
                    Some(p) => p,
                    None => match rx.recv().await {
                        Some(p) => p,
                        None => return,
                    },
                };
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    return;
                };
                let mut batch = vec![first];
                let mut bytes: usize = body_bytes(&batch[0].records);
                while batch.len() < MAX_COALESCED {
                    match rx.try_recv() {
                        Ok(p) => {
                            let size = body_bytes(&p.records);
                            if bytes + size > MAX_COALESCED_BYTES {
                                carry = Some(p);
                                break;
                            }
                            bytes += size;
                            batch.push(p);
                        }
                        Err(_) => break,
                    }
                }
                let client = router.channels.client(&addr);
                tokio::spawn(async move {
                    let _permit = permit;
                    let (replies, groups): (Vec<_>, Vec<_>) =
                        batch.into_iter().map(|p| (p.reply, p.records)).unzip();
                    let mut client = match client {
                        Ok(c) => c,
                        Err(e) => {
                            for r in replies {
                                let _ = r.send(Err(e.clone()));
                            }
                            return;
                        }
                    };
                    let mut req = tonic::Request::new(bpb::AppendRequest { groups });
                    req.set_timeout(APPEND_RPC_TIMEOUT);
                    match client.append(req).await {
                        Ok(resp) => {
                            let mut by_pos = resp.into_inner().groups.into_iter();
                            for r in replies {
                                let res = match by_pos.next() {
                                    Some(g) => match g.error {
                                        Some(d) => Err(PetrelError::from_detail(&d)),
                                        None => Ok((g.offsets, g.duplicate)),
                                    },
                                    None => {
                                        Err(PetrelError::Internal("short append response".into()))
                                    }
                                };
                                let _ = r.send(res);
                            }
                        }
                        Err(status) => {
                            let e = PetrelError::from_status(&status);
                            tracing::debug!(leader, error = %e, "append rpc failed");
                            for r in replies {
                                let _ = r.send(Err(e.clone()));
                            }
                        }
                    }
                });
            }
        });
        tx
    }
}

fn body_bytes(r: &bpb::AppendRecords) -> usize {
    r.messages
        .iter()
        .map(|m: &pb::Message| m.body.len() + 64)
        .sum()
}
