//! Input validation shared by every receiver. Senders are trusted by no one.

use crate::PetrelError;

/// Longest topic or consumer-group name.
pub const MAX_NAME_LEN: usize = 127;
/// Default largest record (body + key + tag + properties).
pub const DEFAULT_MAX_RECORD_BYTES: usize = 4 * 1024 * 1024;
/// The most any proxy or broker may be configured to accept: a record must
/// fit a 64 MiB gRPC message with its envelope. Clients check only this
/// ceiling and leave the configured limit to the servers.
pub const MAX_RECORD_BYTES: usize = 63 * 1024 * 1024;
/// Default most messages in one send request.
pub const DEFAULT_MAX_BATCH_MESSAGES: usize = 10_000;
pub const MAX_KEY_LEN: usize = 1024;
pub const MAX_TAG_LEN: usize = 256;
pub const MAX_PROPERTIES: usize = 128;
pub const MAX_QUEUES: u32 = 1024;
pub const MAX_REPLICATION_FACTOR: u32 = 5;

fn name(kind: &str, s: &str) -> Result<(), PetrelError> {
    if s.is_empty() {
        return Err(PetrelError::InvalidArgument(format!(
            "{kind} name is empty"
        )));
    }
    if s.len() > MAX_NAME_LEN {
        return Err(PetrelError::InvalidArgument(format!(
            "{kind} name is {} bytes, longer than {MAX_NAME_LEN}",
            s.len()
        )));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
    {
        return Err(PetrelError::InvalidArgument(format!(
            "{kind} name {s:?} contains {c:?}; allowed: letters, digits, '_', '-', '.'"
        )));
    }
    if s.starts_with('.') {
        return Err(PetrelError::InvalidArgument(format!(
            "{kind} name {s:?} must not start with '.'"
        )));
    }
    Ok(())
}

pub fn topic_name(s: &str) -> Result<(), PetrelError> {
    name("topic", s)
}

pub fn group_name(s: &str) -> Result<(), PetrelError> {
    name("consumer group", s)
}

/// Transaction ids: up to 128 bytes of printable ASCII (empty = none).
pub fn transaction_id(s: &str) -> Result<(), PetrelError> {
    if s.len() > 128 || s.bytes().any(|b| !(0x21..=0x7e).contains(&b)) {
        return Err(PetrelError::InvalidArgument(
            "transaction id must be at most 128 printable ASCII characters".into(),
        ));
    }
    Ok(())
}

pub fn producer_id(s: &str) -> Result<(), PetrelError> {
    if s.len() > MAX_NAME_LEN {
        return Err(PetrelError::InvalidArgument(format!(
            "producer id longer than {MAX_NAME_LEN} bytes"
        )));
    }
    Ok(())
}

pub fn topic_shape(queues: u32, replicas: u32, brokers: usize) -> Result<(), PetrelError> {
    if queues == 0 || queues > MAX_QUEUES {
        return Err(PetrelError::InvalidArgument(format!(
            "queue count must be 1..={MAX_QUEUES}, got {queues}"
        )));
    }
    if replicas == 0 || replicas > MAX_REPLICATION_FACTOR {
        return Err(PetrelError::InvalidArgument(format!(
            "replication factor must be 1..={MAX_REPLICATION_FACTOR}, got {replicas}"
        )));
    }
    if replicas as usize > brokers {
        return Err(PetrelError::InvalidArgument(format!(
            "replication factor {replicas} exceeds the {brokers} brokers in the cluster"
        )));
    }
    Ok(())
}

/// Validates one produced message against the size limit.
pub fn message(m: &crate::pb::Message, max_record_bytes: usize) -> Result<(), PetrelError> {
    if m.key.len() > MAX_KEY_LEN {
        return Err(PetrelError::InvalidArgument(format!(
            "key is {} bytes, longer than {MAX_KEY_LEN}",
            m.key.len()
        )));
    }
    if m.tag.len() > MAX_TAG_LEN {
        return Err(PetrelError::InvalidArgument(format!(
            "tag is {} bytes, longer than {MAX_TAG_LEN}",
            m.tag.len()
        )));
    }
    if m.message_group.len() > MAX_KEY_LEN {
        return Err(PetrelError::InvalidArgument(format!(
            "message group is {} bytes, longer than {MAX_KEY_LEN}",
            m.message_group.len()
        )));
    }
    if m.deliver_at_ms < 0 {
        return Err(PetrelError::InvalidArgument(
            "deliver_at_ms must not be negative".into(),
        ));
    }
    if m.properties.len() > MAX_PROPERTIES {
        return Err(PetrelError::InvalidArgument(format!(
            "{} properties, more than {MAX_PROPERTIES}",
            m.properties.len()
        )));
    }
    if m.properties
        .keys()
        .any(|k| k.is_empty() || k.len() > MAX_TAG_LEN)
    {
        return Err(PetrelError::InvalidArgument(
            "property names must be 1..=256 bytes".into(),
        ));
    }
    let size = m.body.len()
        + m.key.len()
        + m.tag.len()
        + m.properties
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>();
    if size > max_record_bytes {
        return Err(PetrelError::TooLarge(format!(
            "record is {size} bytes, the limit is {max_record_bytes}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "orders", "Orders_2.eu-west", &"x".repeat(127)] {
            topic_name(ok).unwrap();
        }
        for bad in ["", ".hidden", "a/b", "a b", "ü", "a\0", &"x".repeat(128)] {
            assert!(topic_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn shape() {
        assert!(topic_shape(0, 1, 3).is_err());
        assert!(topic_shape(1, 4, 3).is_err());
        assert!(topic_shape(1, 0, 3).is_err());
        topic_shape(8, 3, 3).unwrap();
    }
}

/// Longest delay a DELAY topic accepts (30 days).
pub const MAX_DELAY_MS: u64 = 30 * 24 * 3600 * 1000;

/// Checks that `m` fits a topic of type `t` (each type takes exactly its
/// own fields) and returns the absolute delivery time of a delayed message
/// (0 for every other type). `now_ms` resolves `delay_ms`.
pub fn message_type_fit(
    m: &crate::pb::Message,
    t: crate::pb::MessageType,
    now_ms: i64,
) -> Result<i64, PetrelError> {
    use crate::pb::MessageType as T;
    let wrong = |msg: String| Err(PetrelError::WrongMessageType(msg));
    let delayed = m.deliver_at_ms != 0 || m.delay_ms != 0;
    let name = match t {
        T::Fifo => "FIFO",
        T::Delay => "DELAY",
        T::Transaction => "TRANSACTION",
        _ => "NORMAL",
    };
    if t != T::Fifo && !m.message_group.is_empty() {
        return wrong(format!(
            "a message group is only for FIFO topics; this topic is {name}"
        ));
    }
    if t != T::Transaction && !m.transaction_id.is_empty() {
        return wrong(format!(
            "a transaction id is only for TRANSACTION topics; this topic is {name}"
        ));
    }
    if t == T::Transaction && m.transaction_id.is_empty() {
        return wrong(
            "a TRANSACTION topic takes messages sent in a transaction (Producer::begin)".into(),
        );
    }
    transaction_id(&m.transaction_id)?;
    if t != T::Delay && delayed {
        return wrong(format!(
            "a delivery time or delay is only for DELAY topics; this topic is {name}"
        ));
    }
    match t {
        T::Fifo if m.message_group.is_empty() => {
            wrong("a FIFO topic needs a message group on every message".into())
        }
        T::Delay => {
            if m.deliver_at_ms != 0 && m.delay_ms != 0 {
                return Err(PetrelError::InvalidArgument(
                    "set deliver_at_ms or delay_ms, not both".into(),
                ));
            }
            if !delayed {
                return wrong(
                    "a DELAY topic needs deliver_at_ms or delay_ms on every message".into(),
                );
            }
            if m.delay_ms > MAX_DELAY_MS {
                return Err(PetrelError::InvalidArgument(format!(
                    "delay of {} ms is longer than the {MAX_DELAY_MS} ms limit",
                    m.delay_ms
                )));
            }
            let at = if m.deliver_at_ms != 0 {
                m.deliver_at_ms
            } else {
                now_ms.saturating_add(m.delay_ms as i64)
            };
            if at > now_ms.saturating_add(MAX_DELAY_MS as i64) {
                return Err(PetrelError::InvalidArgument(format!(
                    "deliver_at_ms {at} is more than {MAX_DELAY_MS} ms ahead"
                )));
            }
            Ok(at)
        }
        _ => Ok(0),
    }
}

/// The dead-letter topic of a consumer group: `GROUP.dlq` (a long name is
/// shortened with a hash so the result stays a valid topic name).
pub fn dead_letter_topic(group: &str) -> String {
    if group.len() + 4 <= MAX_NAME_LEN {
        return format!("{group}.dlq");
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in group.as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let mut cut = MAX_NAME_LEN - 21;
    while !group.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}-{h:016x}.dlq", &group[..cut])
}

#[cfg(test)]
mod dlq_tests {
    use super::*;

    #[test]
    fn dead_letter_topics_are_valid_names() {
        assert_eq!(dead_letter_topic("workers"), "workers.dlq");
        let long = "g".repeat(MAX_NAME_LEN);
        let t = dead_letter_topic(&long);
        assert!(t.len() <= MAX_NAME_LEN, "{}", t.len());
        topic_name(&t).unwrap();
        assert_ne!(t, dead_letter_topic(&"g".repeat(MAX_NAME_LEN - 1)));
    }
}
