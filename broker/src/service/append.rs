//! The producer calls of `BrokerData`: appends (validated, encoded and
//! handed to the group's append lane) and the transaction calls that end
//! or check a transaction's records.

use petrel_proto::pb::broker as bpb;
use petrel_proto::record::RecordData;
use petrel_proto::{validate, PetrelError};
use tonic::{Request, Response as TResponse};

use super::{queue_of, Service, POP_MAX_BYTES, R};
use crate::queue::TxnOpen;
use crate::types::{AppendPart, Command};

impl Service {
    async fn append_one(&self, g: bpb::AppendRecords) -> bpb::AppendedOffsets {
        let group = g.group_id;
        match self.append_inner(g).await {
            Ok(v) => bpb::AppendedOffsets {
                group_id: group,
                error: None,
                offsets: v.iter().map(|x| x.0).collect(),
                duplicate: v.iter().map(|x| x.1).collect(),
            },
            Err(e) => bpb::AppendedOffsets {
                group_id: group,
                error: Some(e.to_detail()),
                offsets: vec![],
                duplicate: vec![],
            },
        }
    }

    async fn append_inner(&self, g: bpb::AppendRecords) -> Result<Vec<(u64, bool)>, PetrelError> {
        let h = self.leader(g.group_id)?;
        validate::producer_id(&g.producer_id)?;
        if g.messages.is_empty() {
            return Ok(vec![]);
        }
        let now = petrel_proto::now_ms();
        let mt = self.message_type_of(g.group_id);
        let txn_id = g.messages[0].transaction_id.clone();
        if g.messages.iter().any(|m| m.transaction_id != txn_id) {
            return Err(PetrelError::InvalidArgument(
                "all messages of one request must belong to the same transaction".into(),
            ));
        }
        let txn = if txn_id.is_empty() {
            None
        } else {
            let q = queue_of(&h, g.group_id)?;
            if let Some(t) = q.read().txns.get(&txn_id) {
                if let Some(committed) = t.outcome {
                    let how = if committed {
                        "committed"
                    } else {
                        "rolled back"
                    };
                    return Err(PetrelError::InvalidArgument(format!(
                        "transaction {txn_id:?} was already {how}"
                    )));
                }
            }
            Some(TxnOpen {
                id: txn_id,
                now_ms: now,
                check_ms: self.node.runtime.transaction_check_ms(),
            })
        };
        let mut records = Vec::with_capacity(g.messages.len());
        let mut bytes = 0u64;
        let mut deliver_at = Vec::new();
        for m in g.messages {
            validate::message(&m, self.node.runtime.max_record_bytes())?;
            let at = validate::message_type_fit(&m, mt, now)?;
            // Already due: stored as a plain record, delivered at once.
            let hold = if at > now { at } else { 0 };
            deliver_at.push(hold);
            let mut properties: Vec<(String, String)> = m.properties.into_iter().collect();
            properties.sort();
            let rec = RecordData {
                producer_id: g.producer_id.clone(),
                sequence: m.sequence,
                born_timestamp_ms: m.born_timestamp_ms,
                store_timestamp_ms: now,
                key: m.key,
                tag: m.tag,
                properties,
                body: m.body,
                message_group: m.message_group,
                deliver_at_ms: at,
            };
            let enc = rec.encode();
            bytes += enc.len() as u64;
            records.push((m.sequence, enc));
        }
        if deliver_at.iter().all(|t| *t == 0) {
            deliver_at.clear();
        }
        let part = AppendPart {
            producer_id: g.producer_id,
            records,
            deliver_at,
            txn,
        };
        let v = self.node.append(g.group_id, &h, part).await?;
        let topic = self.topic_name_of(g.group_id);
        let new = v.iter().filter(|(_, dup)| !dup).count() as u64;
        metrics::counter!("petrel_broker_appended_records_total", "topic" => topic.clone())
            .increment(new);
        metrics::counter!("petrel_broker_appended_bytes_total", "topic" => topic).increment(bytes);
        Ok(v)
    }

    pub(super) async fn handle_append(
        &self,
        req: Request<bpb::AppendRequest>,
    ) -> R<bpb::AppendResponse> {
        let req = req.into_inner();
        let futs = req.groups.into_iter().map(|g| self.append_one(g));
        let groups = futures::future::join_all(futs).await;
        Ok(TResponse::new(bpb::AppendResponse { groups }))
    }

    pub(super) async fn handle_end_transaction(
        &self,
        req: Request<bpb::BrokerEndTransactionRequest>,
    ) -> R<bpb::BrokerEndTransactionResponse> {
        let req = req.into_inner();
        validate::transaction_id(&req.transaction_id)?;
        let h = self.leader(req.group_id)?;
        let cmd = Command::EndTxn {
            id: req.transaction_id,
            commit: req.commit,
        };
        let n = self.node.write(req.group_id, &h, cmd).await?.into_count()?;
        Ok(TResponse::new(bpb::BrokerEndTransactionResponse {
            records: n,
        }))
    }

    pub(super) async fn handle_stale_transactions(
        &self,
        req: Request<bpb::StaleTransactionsRequest>,
    ) -> R<bpb::StaleTransactionsResponse> {
        let group = req.into_inner().group_id;
        let h = self.leader(group)?;
        let now = petrel_proto::now_ms();
        // Past the last check, the broker's own timeout rolls it back.
        let mut stale: Vec<_> = queue_of(&h, group)?
            .read()
            .stale_txns(now)
            .into_iter()
            .filter(|(_, t)| t.checks < crate::config::TRANSACTION_MAX_CHECKS)
            .collect();
        if stale.is_empty() {
            return Ok(TResponse::new(bpb::StaleTransactionsResponse::default()));
        }
        stale.truncate(256);
        // Each check carries the transaction's first record: as many as fit
        // one answer's byte budget (at least one); the rest are handed out
        // by the next call.
        let mut transactions = Vec::with_capacity(stale.len());
        let mut bytes = 0usize;
        for (id, t) in stale {
            let first = t.offsets.first().copied();
            let first_encoded = first
                .and_then(|o| self.read_record(group, o).ok())
                .unwrap_or_default();
            bytes += first_encoded.len() + id.len() + 64;
            if bytes > POP_MAX_BYTES && !transactions.is_empty() {
                break;
            }
            transactions.push(bpb::StaleTransaction {
                transaction_id: id,
                opened_ms: t.opened_ms,
                check: t.checks + 1,
                first_offset: first.unwrap_or(0),
                first_encoded,
            });
        }
        // Record the checks before handing them out, so each is handed out
        // once per interval.
        let cmd = Command::TxnChecked {
            ids: transactions
                .iter()
                .map(|t| t.transaction_id.clone())
                .collect(),
            now_ms: now,
            interval_ms: self.node.runtime.transaction_check_ms(),
        };
        self.node.write(group, &h, cmd).await?;
        Ok(TResponse::new(bpb::StaleTransactionsResponse {
            transactions,
        }))
    }
}
