//! The client-side views of a record: [`Message`] (what a producer sends),
//! [`SendReceipt`] (what it gets back) and [`ReceivedMessage`] (what a
//! consumer sees).

use crate::pb;
use bytes::Bytes;
use std::collections::HashMap;

/// A message to produce.
///
/// ```no_run
/// use petrel_sdk::Message;
/// let m = Message::new("order 42 created")
///     .with_key("customer-7")
///     .with_tag("created")
///     .with_property("region", "eu");
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message {
    /// Routing / ordering key; empty = none.
    pub key: String,
    /// Filter tag; empty = none.
    pub tag: String,
    /// Free-form string properties.
    pub properties: HashMap<String, String>,
    /// The payload.
    pub body: Bytes,
    /// Client-side creation time (ms since the Unix epoch); 0 = stamped
    /// when the producer accepts the message.
    pub born_timestamp_ms: i64,
    /// FIFO topics: records of one message group are delivered one at a
    /// time, in send order. Required on FIFO topics, refused on others.
    pub message_group: String,
    /// DELAY topics: deliver at this time (ms since the Unix epoch).
    pub deliver_at_ms: i64,
    /// DELAY topics: deliver this long after the proxy receives it.
    pub delay_ms: u64,
}

impl Message {
    /// A message with this body and nothing else set.
    pub fn new(body: impl Into<Bytes>) -> Self {
        Self {
            body: body.into(),
            ..Self::default()
        }
    }

    /// Sets the key.
    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.key = key.into();
        self
    }

    /// Sets the tag.
    pub fn with_tag(mut self, tag: impl Into<String>) -> Self {
        self.tag = tag.into();
        self
    }

    /// Sets the FIFO message group.
    pub fn with_message_group(mut self, group: impl Into<String>) -> Self {
        self.message_group = group.into();
        self
    }

    /// Delays delivery by `d` (DELAY topics).
    pub fn with_delay(mut self, d: std::time::Duration) -> Self {
        self.delay_ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        self.deliver_at_ms = 0;
        self
    }

    /// Delivers at `ms` since the Unix epoch (DELAY topics).
    pub fn with_deliver_at(mut self, ms: i64) -> Self {
        self.deliver_at_ms = ms;
        self.delay_ms = 0;
        self
    }

    /// Adds (or replaces) one property.
    pub fn with_property(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.properties.insert(name.into(), value.into());
        self
    }

    /// The wire form with the given producer sequence.
    pub(crate) fn into_pb(self, sequence: u64) -> pb::Message {
        pb::Message {
            key: self.key,
            tag: self.tag,
            properties: self.properties,
            body: self.body,
            sequence,
            born_timestamp_ms: if self.born_timestamp_ms == 0 {
                petrel_proto::now_ms()
            } else {
                self.born_timestamp_ms
            },
            message_group: self.message_group,
            deliver_at_ms: self.deliver_at_ms,
            delay_ms: self.delay_ms,
            transaction_id: String::new(),
        }
    }
}

/// The acknowledgement of one produced message: it is durable on a quorum.
///
/// ```no_run
/// # async fn demo(p: petrel_sdk::Producer) -> petrel_sdk::Result<()> {
/// let r = p.send(petrel_sdk::Message::new("hi")).await?;
/// println!("{} stored at queue {} offset {}", r.message_id, r.queue, r.offset);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SendReceipt {
    /// `topic/queue/offset`, see [`petrel_proto::MessageId`].
    pub message_id: String,
    pub queue: u32,
    pub offset: u64,
    /// True when the broker had already stored this message (a retried send
    /// that had succeeded before); the id is that of the original.
    pub duplicate: bool,
}

impl From<pb::SendResult> for SendReceipt {
    fn from(r: pb::SendResult) -> Self {
        Self {
            message_id: r.message_id,
            queue: r.queue,
            offset: r.offset,
            duplicate: r.duplicate,
        }
    }
}

/// A record delivered to a consumer.
///
/// In pop mode ([`SimpleConsumer`](crate::SimpleConsumer)) it carries a
/// lease: `receipt_handle`, `attempt` and `invisible_until_ms`. In offset
/// mode ([`PullConsumer`](crate::PullConsumer)) those are empty / zero.
///
/// ```no_run
/// # async fn demo(c: petrel_sdk::SimpleConsumer) -> petrel_sdk::Result<()> {
/// for m in c.receive(16).await? {
///     println!("{} attempt {}: {:?}", m.message_id, m.attempt, m.body);
///     c.ack(&m).await?;
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReceivedMessage {
    pub message_id: String,
    pub topic: String,
    pub queue: u32,
    pub offset: u64,
    pub key: String,
    pub tag: String,
    pub properties: HashMap<String, String>,
    pub body: Bytes,
    pub producer_id: String,
    pub sequence: u64,
    pub born_timestamp_ms: i64,
    pub store_timestamp_ms: i64,
    /// Delivery attempt, 1 for the first delivery (pop mode only).
    pub attempt: u32,
    /// Opaque token for ack / change-invisible (pop mode only).
    pub receipt_handle: String,
    /// When the lease expires, ms since the Unix epoch (pop mode only).
    pub invisible_until_ms: i64,
    /// FIFO message group ("" = none).
    pub message_group: String,
    /// When a delayed message became deliverable (0 = not delayed).
    pub deliver_at_ms: i64,
}

impl From<pb::Record> for ReceivedMessage {
    fn from(r: pb::Record) -> Self {
        Self {
            message_id: r.message_id,
            topic: r.topic,
            queue: r.queue,
            offset: r.offset,
            key: r.key,
            tag: r.tag,
            properties: r.properties,
            body: r.body,
            producer_id: r.producer_id,
            sequence: r.sequence,
            born_timestamp_ms: r.born_timestamp_ms,
            store_timestamp_ms: r.store_timestamp_ms,
            attempt: r.attempt,
            receipt_handle: r.receipt_handle,
            invisible_until_ms: r.invisible_until_ms,
            message_group: r.message_group,
            deliver_at_ms: r.deliver_at_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_sets_fields_and_pb_stamps_birth_time() {
        let m = Message::new("b")
            .with_key("k")
            .with_tag("t")
            .with_property("a", "1")
            .with_property("a", "2");
        assert_eq!(m.properties.len(), 1);
        let p = m.into_pb(7);
        assert_eq!(p.sequence, 7);
        assert_eq!(p.key, "k");
        assert_eq!(p.tag, "t");
        assert_eq!(p.properties["a"], "2");
        assert_eq!(&p.body[..], b"b");
        assert!(p.born_timestamp_ms > 0);

        let mut m = Message::new(vec![1u8, 2]);
        m.born_timestamp_ms = 5;
        assert_eq!(m.into_pb(1).born_timestamp_ms, 5);
    }
}
