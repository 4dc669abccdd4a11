//! Consumers: [`SimpleConsumer`] (pop mode: receive → ack, with leases kept
//! by brokers) and [`PullConsumer`] (offset mode: read → commit).
//!
//! # Delivery
//! Pop mode is at-least-once: a record that is not acked before its lease
//! (`invisible_duration`) expires is delivered again with `attempt + 1`. A
//! receive that fails part-way may leave leased records undelivered; they
//! come back once their lease expires.

use crate::client::Client;
use crate::message::ReceivedMessage;
use crate::{pb, Error, Result};
use std::time::Duration;

/// Default lease of a received message.
pub const DEFAULT_INVISIBLE_DURATION: Duration = Duration::from_secs(30);
/// Default long-poll wait of a receive.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(5);

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Configures a [`SimpleConsumer`]; from [`Client::simple_consumer`].
///
/// ```no_run
/// # fn demo(client: petrel_sdk::Client) {
/// use std::time::Duration;
/// let consumer = client
///     .simple_consumer("orders", "billing")
///     .invisible_duration(Duration::from_secs(60))
///     .wait(Duration::from_secs(10))
///     .build();
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct SimpleConsumerBuilder {
    client: Client,
    topic: String,
    group: String,
    invisible_duration: Duration,
    wait: Duration,
    filter: Option<pb::FilterExpression>,
    retry: Option<pb::RetryPolicy>,
}

/// A consumer group's redelivery policy: attempts before a record moves
/// to the group's dead-letter topic (`GROUP.dlq`), and the back-off after a
/// nack, `initial * 2^(attempt-1)` capped at `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    /// 16 attempts; 1 s doubling to 60 s.
    fn default() -> Self {
        Self {
            max_attempts: 16,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    fn to_pb(self) -> pb::RetryPolicy {
        pb::RetryPolicy {
            max_attempts: self.max_attempts,
            initial_backoff_ms: ms(self.initial_backoff),
            max_backoff_ms: ms(self.max_backoff),
        }
    }
}

impl SimpleConsumerBuilder {
    pub(crate) fn new(client: Client, topic: String, group: String) -> Self {
        Self {
            client,
            topic,
            group,
            invisible_duration: DEFAULT_INVISIBLE_DURATION,
            wait: DEFAULT_WAIT,
            filter: None,
            retry: None,
        }
    }

    /// Receive only records whose tag matches: `*`, `TagA`, `TagA || TagB`.
    /// Filtering happens on the broker; a bad expression fails the first
    /// receive with [`Error::InvalidFilter`](crate::Error).
    pub fn filter_tag(mut self, expr: impl Into<String>) -> Self {
        self.filter = Some(pb::FilterExpression {
            r#type: pb::FilterType::Tag as i32,
            expression: expr.into(),
        });
        self
    }

    /// Receive only records whose properties match a SQL-92-style
    /// expression, e.g. `region = 'eu' AND amount > 100`.
    pub fn filter_sql(mut self, expr: impl Into<String>) -> Self {
        self.filter = Some(pb::FilterExpression {
            r#type: pb::FilterType::Sql as i32,
            expression: expr.into(),
        });
        self
    }

    /// The group's redelivery policy (default [`RetryPolicy::default`]).
    pub fn retry_policy(mut self, p: RetryPolicy) -> Self {
        self.retry = Some(p.to_pb());
        self
    }

    /// How long received messages stay leased before redelivery (default 30 s).
    pub fn invisible_duration(mut self, d: Duration) -> Self {
        self.invisible_duration = d;
        self
    }

    /// Long-poll: how long a receive waits for a first message (default 5 s).
    pub fn wait(mut self, d: Duration) -> Self {
        self.wait = d;
        self
    }

    pub fn build(self) -> SimpleConsumer {
        SimpleConsumer {
            client: self.client,
            topic: self.topic,
            group: self.group,
            invisible_duration: self.invisible_duration,
            wait: self.wait,
            filter: self.filter,
            retry: self.retry,
        }
    }
}

/// A pop-mode consumer: message-level load balancing, no rebalancing.
/// Any number of consumers of one group share its messages.
///
/// ```no_run
/// # async fn demo(client: petrel_sdk::Client) -> petrel_sdk::Result<()> {
/// let consumer = client.simple_consumer("orders", "billing").build();
/// loop {
///     let batch = consumer.receive(32).await?;
///     for m in &batch {
///         println!("{}: {}", m.message_id, String::from_utf8_lossy(&m.body));
///     }
///     for r in consumer.ack_many(&batch).await? {
///         if let Err(e) = r {
///             eprintln!("ack failed (will be redelivered): {e}");
///         }
///     }
/// }
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct SimpleConsumer {
    client: Client,
    topic: String,
    group: String,
    invisible_duration: Duration,
    wait: Duration,
    filter: Option<pb::FilterExpression>,
    retry: Option<pb::RetryPolicy>,
}

impl SimpleConsumer {
    pub fn topic(&self) -> &str {
        &self.topic
    }

    pub fn group(&self) -> &str {
        &self.group
    }

    /// Receives up to `max` messages with the configured lease and wait.
    pub async fn receive(&self, max: u32) -> Result<Vec<ReceivedMessage>> {
        self.receive_with(max, self.invisible_duration, self.wait)
            .await
    }

    /// Receives up to `max` messages, leasing them for `invisible`, waiting up
    /// to `wait` for the first. Returns an empty vector when nothing arrived.
    pub async fn receive_with(
        &self,
        max: u32,
        invisible: Duration,
        wait: Duration,
    ) -> Result<Vec<ReceivedMessage>> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let req = pb::ReceiveRequest {
            topic: self.topic.clone(),
            group: self.group.clone(),
            max_messages: max,
            invisible_duration_ms: ms(invisible),
            wait_ms: ms(wait),
            filter: self.filter.clone(),
            retry: self.retry,
        };
        let records = self
            .client
            .call(wait, |mut c| {
                let req = req.clone();
                async move {
                    let mut stream = c.receive(req).await?.into_inner();
                    let mut out: Vec<pb::Record> = Vec::new();
                    loop {
                        match stream.message().await {
                            Ok(Some(batch)) => out.extend(batch.records),
                            Ok(None) => break,
                            // Keep what was delivered: those are leased to us.
                            Err(e) if !out.is_empty() => {
                                tracing::debug!(error = %e, "receive stream ended early");
                                break;
                            }
                            Err(e) => return Err(e),
                        }
                    }
                    Ok(out)
                }
            })
            .await?;
        Ok(records.into_iter().map(ReceivedMessage::from).collect())
    }

    /// Acknowledges one message: it will not be delivered again.
    pub async fn ack(&self, message: &ReceivedMessage) -> Result<()> {
        self.ack_many(std::slice::from_ref(message))
            .await?
            .pop()
            .unwrap_or_else(|| Err(Error::Internal("empty ack response".to_string())))
    }

    /// Acknowledges several messages in one request. The outer error is for
    /// the request; the inner results are per message, in order (e.g.
    /// [`Error::ReceiptExpired`] when a lease ran out first).
    pub async fn ack_many(&self, messages: &[ReceivedMessage]) -> Result<Vec<Result<()>>> {
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let req = pb::AckRequest {
            topic: self.topic.clone(),
            group: self.group.clone(),
            receipt_handles: messages.iter().map(|m| m.receipt_handle.clone()).collect(),
        };
        let resp = self
            .client
            .call(Duration::ZERO, |mut c| {
                let req = req.clone();
                async move { c.ack(req).await.map(|r| r.into_inner()) }
            })
            .await?;
        ack_results(resp, messages.len())
    }

    /// Processing failed: the message comes back after the group's back-off
    /// for its attempt, or, if this was its last attempt, moves to the
    /// group's dead-letter topic with `reason`. Returns when it will be
    /// redelivered (ms since the Unix epoch), `None` if dead-lettered.
    pub async fn nack(&self, message: &ReceivedMessage, reason: &str) -> Result<Option<i64>> {
        self.nack_inner(message, reason, false).await
    }

    /// Gives up on a message now, whatever attempts it has left (a poison
    /// message no retry will fix): it leaves the group and is stored in the
    /// group's dead-letter topic (`GROUP.dlq`) with `reason`, as after its
    /// last attempt.
    pub async fn dead_letter(&self, message: &ReceivedMessage, reason: &str) -> Result<()> {
        self.nack_inner(message, reason, true).await.map(|_| ())
    }

    async fn nack_inner(
        &self,
        message: &ReceivedMessage,
        reason: &str,
        dead_letter: bool,
    ) -> Result<Option<i64>> {
        let req = pb::NackRequest {
            topic: self.topic.clone(),
            group: self.group.clone(),
            receipt_handle: message.receipt_handle.clone(),
            reason: reason.to_string(),
            dead_letter,
        };
        let resp = self
            .client
            .call(Duration::ZERO, |mut c| {
                let req = req.clone();
                async move { c.nack(req).await.map(|r| r.into_inner()) }
            })
            .await?;
        Ok((resp.redeliver_at_ms != 0).then_some(resp.redeliver_at_ms))
    }

    /// Extends (or shortens) the lease of a received message. Returns a copy
    /// with the new receipt handle and `invisible_until_ms`; use that copy
    /// for the ack.
    pub async fn change_invisible_duration(
        &self,
        message: &ReceivedMessage,
        invisible: Duration,
    ) -> Result<ReceivedMessage> {
        let req = pb::ChangeInvisibleDurationRequest {
            topic: self.topic.clone(),
            group: self.group.clone(),
            receipt_handle: message.receipt_handle.clone(),
            invisible_duration_ms: ms(invisible),
        };
        let resp = self
            .client
            .call(Duration::ZERO, |mut c| {
                let req = req.clone();
                async move {
                    c.change_invisible_duration(req)
                        .await
                        .map(|r| r.into_inner())
                }
            })
            .await?;
        let mut out = message.clone();
        out.receipt_handle = resp.receipt_handle;
        out.invisible_until_ms = resp.invisible_until_ms;
        Ok(out)
    }
}

/// Maps an ack response to one result per handle.
pub(crate) fn ack_results(resp: pb::AckResponse, expected: usize) -> Result<Vec<Result<()>>> {
    if resp.results.len() != expected {
        return Err(Error::Internal(format!(
            "proxy answered {} ack results for {expected} receipt handles",
            resp.results.len()
        )));
    }
    Ok(resp.results.iter().map(status_result).collect())
}

/// One `pb::Status` as a result: `ERROR_CODE_UNSPECIFIED` is success.
pub(crate) fn status_result(s: &pb::Status) -> Result<()> {
    if s.code == pb::ErrorCode::Unspecified as i32 {
        return Ok(());
    }
    Err(Error::from_detail(&pb::ErrorDetail {
        code: s.code,
        message: s.message.clone(),
        leader_hint: 0,
        group_id: 0,
    }))
}

/// One `read` answer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReadBatch {
    pub records: Vec<ReceivedMessage>,
    /// The offset to read next.
    pub next_offset: u64,
    /// The queue's first retained offset.
    pub start_offset: u64,
    /// One past the queue's last offset.
    pub end_offset: u64,
}

/// An offset-mode consumer: reads any queue from any offset and commits
/// progress for its group. Nothing is leased; the caller tracks offsets.
///
/// ```no_run
/// # async fn demo(client: petrel_sdk::Client) -> petrel_sdk::Result<()> {
/// let pull = client.pull_consumer("orders", "analytics");
/// let mut offset = pull.committed(0).await?.committed_offset;
/// loop {
///     let batch = pull.read(0, offset, 1 << 20, 500).await?;
///     for r in &batch.records {
///         println!("{} {:?}", r.offset, r.body);
///     }
///     offset = batch.next_offset;
///     pull.commit(0, offset).await?;
///     if batch.records.is_empty() {
///         tokio::time::sleep(std::time::Duration::from_millis(200)).await;
///     }
/// }
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct PullConsumer {
    client: Client,
    topic: String,
    group: String,
}

impl PullConsumer {
    pub(crate) fn new(client: Client, topic: String, group: String) -> Self {
        Self {
            client,
            topic,
            group,
        }
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    pub fn group(&self) -> &str {
        &self.group
    }

    /// The first offset of `queue` stored at or after `timestamp_ms`
    /// (milliseconds since the Unix epoch), or the queue's end if none:
    /// read from a point in time, or `commit` it to reset the group there.
    pub async fn offset_for_time(&self, queue: u32, timestamp_ms: i64) -> Result<u64> {
        let req = pb::OffsetForTimeRequest {
            topic: self.topic.clone(),
            queue,
            timestamp_ms,
        };
        let r = self
            .client
            .call(Duration::ZERO, |mut c| {
                let req = req.clone();
                async move { c.offset_for_time(req).await.map(|r| r.into_inner()) }
            })
            .await?;
        Ok(r.offset)
    }

    /// Reads records of `queue` from `offset`, up to `max_bytes` and
    /// `max_messages` (0 = the server's default).
    pub async fn read(
        &self,
        queue: u32,
        offset: u64,
        max_bytes: u32,
        max_messages: u32,
    ) -> Result<ReadBatch> {
        let req = pb::ReadRequest {
            topic: self.topic.clone(),
            queue,
            offset,
            max_bytes,
            max_messages,
        };
        let resp = self
            .client
            .call(Duration::ZERO, |mut c| {
                let req = req.clone();
                async move { c.read(req).await.map(|r| r.into_inner()) }
            })
            .await?;
        Ok(ReadBatch {
            records: resp
                .records
                .into_iter()
                .map(ReceivedMessage::from)
                .collect(),
            next_offset: resp.next_offset,
            start_offset: resp.start_offset,
            end_offset: resp.end_offset,
        })
    }

    /// Commits the group's offset for `queue` (the next offset to process).
    pub async fn commit(&self, queue: u32, offset: u64) -> Result<()> {
        let req = pb::CommitOffsetRequest {
            topic: self.topic.clone(),
            group: self.group.clone(),
            queue,
            offset,
        };
        self.client
            .call(Duration::ZERO, |mut c| {
                let req = req.clone();
                async move { c.commit_offset(req).await.map(|_| ()) }
            })
            .await
    }

    /// The group's committed offset for `queue`, with the queue's bounds.
    pub async fn committed(&self, queue: u32) -> Result<pb::GetOffsetResponse> {
        let req = pb::GetOffsetRequest {
            topic: self.topic.clone(),
            group: self.group.clone(),
            queue,
        };
        self.client
            .call(Duration::ZERO, |mut c| {
                let req = req.clone();
                async move { c.get_offset(req).await.map(|r| r.into_inner()) }
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(code: pb::ErrorCode, m: &str) -> pb::Status {
        pb::Status {
            code: code as i32,
            message: m.to_string(),
        }
    }

    #[test]
    fn ack_statuses_map_to_typed_results() {
        let resp = pb::AckResponse {
            results: vec![
                st(pb::ErrorCode::Unspecified, ""),
                st(pb::ErrorCode::ReceiptExpired, "lease over"),
                st(pb::ErrorCode::InvalidArgument, "bad handle"),
                pb::Status {
                    code: 9999,
                    message: "future code".into(),
                },
            ],
        };
        let r = ack_results(resp, 4).unwrap();
        assert_eq!(r[0], Ok(()));
        assert_eq!(r[1], Err(Error::ReceiptExpired("lease over".into())));
        assert_eq!(r[2], Err(Error::InvalidArgument("bad handle".into())));
        assert_eq!(r[3], Err(Error::Internal("future code".into())));
    }

    #[test]
    fn ack_result_count_mismatch_is_an_error() {
        let resp = pb::AckResponse {
            results: vec![st(pb::ErrorCode::Unspecified, "")],
        };
        assert!(matches!(ack_results(resp, 2), Err(Error::Internal(_))));
    }

    #[test]
    fn durations_saturate() {
        assert_eq!(ms(Duration::from_millis(1500)), 1500);
        assert_eq!(ms(Duration::MAX), u64::MAX);
    }
}
