//! Transactions: `EndTransaction` on every queue of the topic, and the
//! check-back that hands transactions left open to the producers watching
//! their topic (`WatchTransactions`).

use std::sync::Arc;
use std::time::Duration;

use petrel_proto::pb;
use petrel_proto::pb::broker as bpb;
use petrel_proto::{validate, PetrelError};
use tokio::sync::mpsc;
use tonic::{Request, Response};

use super::{CheckSender, CheckStream, Inner, R};
use crate::auth::{Action, Resource};

/// How often the proxy asks brokers for transactions due for a check.
const TXN_CHECK_POLL: Duration = Duration::from_secs(1);

pub(super) async fn end_transaction(
    s: &Arc<Inner>,
    req: Request<pb::EndTransactionRequest>,
) -> R<pb::EndTransactionResponse> {
    let _call = Inner::enter(
        s,
        &req,
        &[(Resource::Topic(&req.get_ref().topic), Action::Publish)],
    )?;
    let req = req.into_inner();
    validate::transaction_id(&req.transaction_id)?;
    if req.transaction_id.is_empty() {
        return Err(PetrelError::InvalidArgument("empty transaction id".into()).into());
    }
    let t = s.topic(&req.topic).await?;
    // A transaction may span queues; every queue ends its own part
    // (idempotent: a queue without it, or where it ended, does nothing).
    let futs = t.queues.iter().map(|q| {
        let breq = bpb::BrokerEndTransactionRequest {
            group_id: q.group_id,
            transaction_id: req.transaction_id.clone(),
            commit: req.commit,
        };
        s.on_leader(q.group_id, move |_, _, mut c| {
            let breq = breq.clone();
            async move {
                c.end_transaction(breq)
                    .await
                    .map(|r| r.into_inner().records)
                    .map_err(|s| PetrelError::from_status(&s))
            }
        })
    });
    let mut records = 0;
    for r in futures::future::join_all(futs).await {
        records += r?;
    }
    Ok(Response::new(pb::EndTransactionResponse { records }))
}

pub(super) async fn watch_transactions(
    s: &Arc<Inner>,
    req: Request<pb::WatchTransactionsRequest>,
) -> R<CheckStream> {
    let s = s.clone();
    let _call = Inner::enter(
        &s,
        &req,
        &[(Resource::Topic(&req.get_ref().topic), Action::Publish)],
    )?;
    let req = req.into_inner();
    let t = s.topic(&req.topic).await?;
    let mt = t.config.as_ref().map(|c| c.message_type).unwrap_or(0);
    if mt != pb::MessageType::Transaction as i32 {
        return Err(PetrelError::WrongMessageType(format!(
            "topic {:?} is not a TRANSACTION topic",
            req.topic
        ))
        .into());
    }
    if s.shutdown.is_cancelled() {
        return Err(PetrelError::Unavailable("proxy is shutting down".into()).into());
    }
    let (tx, rx) = mpsc::channel(64);
    s.checkers
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(req.topic)
        .or_default()
        .push(tx);
    let bg = s.clone();
    s.checker_loop.call_once(|| {
        tokio::spawn(bg.check_transactions());
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    Ok(Response::new(Box::pin(stream)))
}

impl Inner {
    /// Hands each transaction due for a check to one checker of its topic
    /// connected to this proxy (round robin), every `TXN_CHECK_POLL`.
    async fn check_transactions(self: Arc<Self>) {
        let mut n = 0usize;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(TXN_CHECK_POLL) => {}
                _ = self.shutdown.cancelled() => {
                    // Dropping the senders ends every check stream.
                    self.checkers.lock().unwrap_or_else(|e| e.into_inner()).clear();
                    return;
                }
            }
            let topics: Vec<String> = {
                let mut m = self.checkers.lock().unwrap_or_else(|e| e.into_inner());
                m.retain(|_, v| {
                    v.retain(|tx| !tx.is_closed());
                    !v.is_empty()
                });
                m.keys().cloned().collect()
            };
            for topic in topics {
                let Ok(t) = self.topic(&topic).await else {
                    continue;
                };
                for q in &t.queues {
                    let req = bpb::StaleTransactionsRequest {
                        group_id: q.group_id,
                    };
                    let stale = self
                        .on_leader_within(
                            q.group_id,
                            Duration::from_secs(2),
                            |_, _, mut c| async move {
                                c.stale_transactions(req)
                                    .await
                                    .map(|r| r.into_inner())
                                    .map_err(|s| PetrelError::from_status(&s))
                            },
                        )
                        .await;
                    let Ok(stale) = stale else { continue };
                    for st in stale.transactions {
                        let first = (!st.first_encoded.is_empty())
                            .then(|| {
                                self.to_record(&topic, q.queue, st.first_offset, &st.first_encoded)
                                    .ok()
                            })
                            .flatten();
                        let check = pb::TransactionCheck {
                            topic: topic.clone(),
                            transaction_id: st.transaction_id,
                            opened_ms: st.opened_ms,
                            check: st.check,
                            first,
                        };
                        let senders: Vec<CheckSender> = self
                            .checkers
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .get(&topic)
                            .cloned()
                            .unwrap_or_default();
                        // Unanswered checks are asked again next interval.
                        for i in 0..senders.len() {
                            n = n.wrapping_add(1);
                            let tx = &senders[(n + i) % senders.len()];
                            if tx.try_send(Ok(check.clone())).is_ok() {
                                break;
                            }
                        }
                    }
                }
            }
        }
    }
}
