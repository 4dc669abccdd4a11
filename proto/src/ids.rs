//! Message ids: `topic/queue/offset`. An id names where a record lives, so an
//! ack or a lookup can be routed without a central index.

use crate::PetrelError;
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MessageId {
    pub topic: String,
    pub queue: u32,
    pub offset: u64,
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.topic, self.queue, self.offset)
    }
}

impl std::str::FromStr for MessageId {
    type Err = PetrelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || PetrelError::InvalidArgument(format!("malformed message id {s:?}"));
        let mut it = s.rsplitn(3, '/');
        let offset = it.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
        let queue = it.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
        let topic = it.next().ok_or_else(bad)?.to_string();
        crate::validate::topic_name(&topic)?;
        Ok(Self {
            topic,
            queue,
            offset,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejects_garbage() {
        let id = MessageId {
            topic: "orders.eu".into(),
            queue: 3,
            offset: 42,
        };
        assert_eq!(id.to_string().parse::<MessageId>().unwrap(), id);
        for bad in ["", "a/b", "t/1/x", "/1/2", "t/-1/2"] {
            assert!(bad.parse::<MessageId>().is_err(), "{bad}");
        }
    }
}
