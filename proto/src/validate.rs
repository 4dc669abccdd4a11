//! Input validation shared by every receiver. Senders are trusted by no one.

use crate::PetrelError;

/// Longest topic or consumer-group name.
pub const MAX_NAME_LEN: usize = 127;
/// Default largest record (body + key + tag + properties).
pub const DEFAULT_MAX_RECORD_BYTES: usize = 4 * 1024 * 1024;
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
