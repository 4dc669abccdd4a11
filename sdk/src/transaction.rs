//! Transactions (half messages) on TRANSACTION topics.
//!
//! ```text
//!  producer.begin() ─▶ txn.send(..) ─▶ records stored, held by each queue
//!                      txn.commit()  ─▶ every queue hands them to consumers
//!                      txn.rollback()─▶ discarded
//!  left open past the check interval: broker ─▶ proxy ─▶ a producer's
//!  checker (any producer of the topic with one) ─▶ commit / rollback
//! ```
//!
//! Consumers never see a record of an open or rolled-back transaction.
//! Commit and rollback are idempotent: a retried call after a lost answer
//! does nothing more.

use std::sync::Arc;
use std::time::Duration;

use crate::message::{Message, ReceivedMessage, SendReceipt};
use crate::producer::Producer;
use crate::{pb, Error, Result};

/// A transaction's answer to a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransactionResolution {
    Commit,
    Rollback,
    /// Not known yet: ask again at the next check.
    Unknown,
}

/// A broker asking what became of a transaction left open.
#[derive(Debug, Clone)]
pub struct TransactionCheck {
    pub topic: String,
    pub transaction_id: String,
    /// When its first record was stored (ms since the Unix epoch).
    pub opened_ms: i64,
    /// 1 for the first check.
    pub check: u32,
    /// Its first record, to help decide.
    pub first: Option<ReceivedMessage>,
}

/// A producer's checker callback.
#[derive(Clone)]
pub(crate) struct Checker(
    pub(crate) Arc<dyn Fn(&TransactionCheck) -> TransactionResolution + Send + Sync + 'static>,
);

impl std::fmt::Debug for Checker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Checker(..)")
    }
}

/// An open transaction; from [`Producer::begin`].
///
/// ```no_run
/// # async fn demo(p: petrel_sdk::Producer) -> petrel_sdk::Result<()> {
/// use petrel_sdk::Message;
/// let txn = p.begin();
/// txn.send(Message::new("debit")).await?;
/// txn.send(Message::new("credit")).await?;
/// txn.commit().await?; // both become visible together
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Transaction {
    producer: Producer,
    id: String,
}

impl Transaction {
    pub(crate) fn new(producer: Producer, id: String) -> Self {
        Self { producer, id }
    }

    /// The transaction id (what a checker is asked about).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Sends one message in this transaction (durable, not yet visible).
    pub async fn send(&self, message: Message) -> Result<SendReceipt> {
        self.producer
            .send_in_txn(vec![message], &self.id)
            .await?
            .pop()
            .ok_or_else(|| Error::Internal("empty send response".into()))
    }

    /// Sends several messages in this transaction as one request.
    pub async fn send_batch(&self, messages: Vec<Message>) -> Result<Vec<SendReceipt>> {
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        self.producer.send_in_txn(messages, &self.id).await
    }

    /// Makes every message of the transaction visible, atomically per
    /// queue. Returns how many records this call committed.
    pub async fn commit(self) -> Result<u64> {
        end(&self.producer, &self.id, true).await
    }

    /// Discards every message of the transaction. Returns how many.
    pub async fn rollback(self) -> Result<u64> {
        end(&self.producer, &self.id, false).await
    }
}

async fn end(p: &Producer, id: &str, commit: bool) -> Result<u64> {
    end_on(p.client(), p.topic(), id, commit).await
}

async fn end_on(client: &crate::Client, topic: &str, id: &str, commit: bool) -> Result<u64> {
    let req = pb::EndTransactionRequest {
        topic: topic.to_string(),
        transaction_id: id.to_string(),
        commit,
    };
    let resp = client
        .call(Duration::ZERO, |mut c| {
            let req = req.clone();
            async move { c.end_transaction(req).await.map(|r| r.into_inner()) }
        })
        .await?;
    Ok(resp.records)
}

/// Keeps a WatchTransactions stream open (reconnecting through any proxy
/// endpoint) and answers each check, until the producer is dropped.
pub(crate) async fn run_checker(
    client: crate::Client,
    topic: String,
    checker: Checker,
    mut alive: tokio::sync::watch::Receiver<()>,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let req = pb::WatchTransactionsRequest {
            topic: topic.clone(),
        };
        let opened = tokio::select! {
            r = client.call(Duration::ZERO, |mut c| {
                let req = req.clone();
                async move { c.watch_transactions(req).await.map(|r| r.into_inner()) }
            }) => r,
            _ = alive.changed() => return,
        };
        match opened {
            Ok(mut stream) => loop {
                let msg = tokio::select! {
                    m = stream.message() => m,
                    _ = alive.changed() => return,
                };
                match msg {
                    Ok(Some(c)) => {
                        backoff = Duration::from_millis(200);
                        let check = TransactionCheck {
                            topic: c.topic,
                            transaction_id: c.transaction_id,
                            opened_ms: c.opened_ms,
                            check: c.check,
                            first: c.first.map(ReceivedMessage::from),
                        };
                        let answer = (checker.0)(&check);
                        let commit = match answer {
                            TransactionResolution::Commit => true,
                            TransactionResolution::Rollback => false,
                            TransactionResolution::Unknown => continue,
                        };
                        if let Err(e) = end_on(&client, &topic, &check.transaction_id, commit).await
                        {
                            tracing::warn!(txn = %check.transaction_id, error = %e, "answering a transaction check");
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(error = %e, "transaction check stream ended");
                        break;
                    }
                }
            },
            Err(e) => tracing::debug!(error = %e, "opening the transaction check stream"),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = alive.changed() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
