//! The stored encoding of one record, with a CRC32 over everything after the
//! checksum. Brokers write these bytes into their records column family and
//! return them verbatim; every decode verifies the checksum.
//!
//! ```text
//! [crc32 u32 LE][version u8][store_ts i64][born_ts i64][sequence u64]
//! [producer_id u16+bytes][key u16+bytes][tag u16+bytes]
//! [property count u16]{[name u16+bytes][value u32+bytes]}*[body u32+bytes]
//! version 2 adds: [message_group u16+bytes][deliver_at i64]
//! ```
//!
//! Version 1 records still decode (no message group, not delayed).

use bytes::{Buf, BufMut, Bytes, BytesMut};

pub const VERSION: u8 = 2;
const HEADER: usize = 4 + 1 + 8 + 8 + 8;

/// A decoded record. `body` shares the buffer it was decoded from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RecordData {
    pub producer_id: String,
    pub sequence: u64,
    pub born_timestamp_ms: i64,
    pub store_timestamp_ms: i64,
    pub key: String,
    pub tag: String,
    /// Sorted by name.
    pub properties: Vec<(String, String)>,
    pub body: Bytes,
    /// FIFO message group ("" = none).
    pub message_group: String,
    /// Delayed delivery time (0 = not delayed).
    pub deliver_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum { stored: u32, computed: u32 },
    #[error("truncated record ({0})")]
    Truncated(&'static str),
    #[error("unknown record version {0}")]
    Version(u8),
    #[error("field {0} is not UTF-8")]
    Utf8(&'static str),
}

impl RecordData {
    /// Bytes the encoding takes, used for size limits before encoding.
    pub fn encoded_len(&self) -> usize {
        HEADER
            + 2
            + self.producer_id.len()
            + 2
            + self.key.len()
            + 2
            + self.tag.len()
            + 2
            + self
                .properties
                .iter()
                .map(|(k, v)| 2 + k.len() + 4 + v.len())
                .sum::<usize>()
            + 4
            + self.body.len()
            + 2
            + self.message_group.len()
            + 8
    }

    /// Encodes with a leading CRC32. Strings longer than u16::MAX must have
    /// been rejected by validation; they are truncated here, never panicked on.
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(self.encoded_len());
        b.put_u32_le(0);
        b.put_u8(VERSION);
        b.put_i64_le(self.store_timestamp_ms);
        b.put_i64_le(self.born_timestamp_ms);
        b.put_u64_le(self.sequence);
        put_short(&mut b, &self.producer_id);
        put_short(&mut b, &self.key);
        put_short(&mut b, &self.tag);
        let n = self.properties.len().min(u16::MAX as usize);
        b.put_u16_le(n as u16);
        for (k, v) in self.properties.iter().take(n) {
            put_short(&mut b, k);
            b.put_u32_le(v.len() as u32);
            b.put_slice(v.as_bytes());
        }
        b.put_u32_le(self.body.len() as u32);
        b.put_slice(&self.body);
        put_short(&mut b, &self.message_group);
        b.put_i64_le(self.deliver_at_ms);
        let crc = crc32fast::hash(&b[4..]);
        b[0..4].copy_from_slice(&crc.to_le_bytes());
        b.freeze()
    }

    /// Verifies the checksum and decodes.
    pub fn decode(buf: &Bytes) -> Result<Self, DecodeError> {
        verify(buf)?;
        let mut r = buf.slice(4..);
        let version = r.get_u8();
        if version != 1 && version != 2 {
            return Err(DecodeError::Version(version));
        }
        let store_timestamp_ms = r.get_i64_le();
        let born_timestamp_ms = r.get_i64_le();
        let sequence = r.get_u64_le();
        let producer_id = get_short(&mut r, "producer_id")?;
        let key = get_short(&mut r, "key")?;
        let tag = get_short(&mut r, "tag")?;
        need(&r, 2, "property count")?;
        let n = r.get_u16_le() as usize;
        let mut properties = Vec::with_capacity(n.min(64));
        for _ in 0..n {
            let k = get_short(&mut r, "property name")?;
            need(&r, 4, "property value")?;
            let len = r.get_u32_le() as usize;
            need(&r, len, "property value")?;
            let v = String::from_utf8(r.split_to(len).to_vec())
                .map_err(|_| DecodeError::Utf8("property value"))?;
            properties.push((k, v));
        }
        need(&r, 4, "body length")?;
        let len = r.get_u32_le() as usize;
        need(&r, len, "body")?;
        let body = r.split_to(len);
        let (message_group, deliver_at_ms) = if version >= 2 {
            let g = get_short(&mut r, "message group")?;
            need(&r, 8, "deliver time")?;
            (g, r.get_i64_le())
        } else {
            (String::new(), 0)
        };
        Ok(Self {
            message_group,
            deliver_at_ms,
            producer_id,
            sequence,
            born_timestamp_ms,
            store_timestamp_ms,
            key,
            tag,
            properties,
            body,
        })
    }
}

/// The store timestamp of an encoded record, without decoding the rest
/// (retention reads it for many records). `None` if the buffer is too short.
pub fn store_timestamp_ms(buf: &[u8]) -> Option<i64> {
    let b: [u8; 8] = buf.get(5..13)?.try_into().ok()?;
    Some(i64::from_le_bytes(b))
}

/// The key of an encoded record without checking the CRC or decoding the
/// rest (the broker indexes keys on apply). `None` if malformed.
pub fn key_of(buf: &[u8]) -> Option<&str> {
    let mut at = HEADER;
    let short = |at: &mut usize| -> Option<&[u8]> {
        let len = u16::from_le_bytes(buf.get(*at..*at + 2)?.try_into().ok()?) as usize;
        let s = buf.get(*at + 2..*at + 2 + len)?;
        *at += 2 + len;
        Some(s)
    };
    short(&mut at)?; // producer id
    std::str::from_utf8(short(&mut at)?).ok()
}

/// The property a record keeps its client-generated message id in (a
/// RocketMQ client makes its own ids). Brokers index it on apply, so
/// `message get` finds a record by that id as well as by Petrel's.
pub const CLIENT_ID_PROPERTY: &str = "petrel.rmq.id";

/// The value of property `name` of an encoded record, without checking the
/// CRC or decoding the rest (the broker indexes client ids on apply).
/// `None` if absent or malformed.
pub fn property_of<'a>(buf: &'a [u8], name: &str) -> Option<&'a str> {
    let mut at = HEADER;
    let short = |at: &mut usize| -> Option<&'a [u8]> {
        let len = u16::from_le_bytes(buf.get(*at..*at + 2)?.try_into().ok()?) as usize;
        let s = buf.get(*at + 2..*at + 2 + len)?;
        *at += 2 + len;
        Some(s)
    };
    short(&mut at)?; // producer id
    short(&mut at)?; // key
    short(&mut at)?; // tag
    let n = u16::from_le_bytes(buf.get(at..at + 2)?.try_into().ok()?);
    at += 2;
    for _ in 0..n {
        let k = short(&mut at)?;
        let len = u32::from_le_bytes(buf.get(at..at + 4)?.try_into().ok()?) as usize;
        let v = buf.get(at + 4..at + 4 + len)?;
        at += 4 + len;
        if k == name.as_bytes() {
            return std::str::from_utf8(v).ok();
        }
    }
    None
}

/// Checks the CRC only (used on replication, where the bytes are not needed
/// decoded).
pub fn verify(buf: &[u8]) -> Result<(), DecodeError> {
    if buf.len() < HEADER {
        return Err(DecodeError::Truncated("header"));
    }
    let stored = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
    let computed = crc32fast::hash(&buf[4..]);
    if stored != computed {
        return Err(DecodeError::Checksum { stored, computed });
    }
    Ok(())
}

fn put_short(b: &mut BytesMut, s: &str) {
    let s = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
    b.put_u16_le(s.len() as u16);
    b.put_slice(s);
}

fn need(r: &Bytes, n: usize, what: &'static str) -> Result<(), DecodeError> {
    if r.remaining() < n {
        Err(DecodeError::Truncated(what))
    } else {
        Ok(())
    }
}

fn get_short(r: &mut Bytes, what: &'static str) -> Result<String, DecodeError> {
    need(r, 2, what)?;
    let len = r.get_u16_le() as usize;
    need(r, len, what)?;
    String::from_utf8(r.split_to(len).to_vec()).map_err(|_| DecodeError::Utf8(what))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> RecordData {
        RecordData {
            producer_id: "p-1".into(),
            sequence: 9,
            born_timestamp_ms: 1,
            store_timestamp_ms: 2,
            key: "k".into(),
            tag: "TagA".into(),
            properties: vec![("a".into(), "1".into()), ("region".into(), "eu".into())],
            body: Bytes::from_static(b"hello"),
            message_group: "order-7".into(),
            deliver_at_ms: 123,
        }
    }

    #[test]
    fn round_trip() {
        let r = sample();
        let enc = r.encode();
        assert_eq!(enc.len(), r.encoded_len());
        assert_eq!(RecordData::decode(&enc).unwrap(), r);
    }

    #[test]
    fn property_of_reads_one_property_without_decoding() {
        let enc = sample().encode();
        assert_eq!(property_of(&enc, "a"), Some("1"));
        assert_eq!(property_of(&enc, "region"), Some("eu"));
        assert_eq!(property_of(&enc, "missing"), None);
        // Never past the end of a cut or hostile buffer.
        for cut in 0..enc.len() {
            let _ = property_of(&enc[..cut], "region");
        }
        let mut lying = enc.to_vec();
        // The property count claims far more than the buffer holds.
        let at = HEADER + 2 + 3 + 2 + 1 + 2 + 4;
        lying[at..at + 2].copy_from_slice(&u16::MAX.to_le_bytes());
        assert_eq!(property_of(&lying, "nope"), None);
    }

    #[test]
    fn key_of_reads_the_key_without_decoding() {
        let enc = sample().encode();
        assert_eq!(key_of(&enc), Some("k"));
        assert_eq!(key_of(&enc[..HEADER + 3]), None);
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let enc = sample().encode().to_vec();
        for i in 0..enc.len() * 8 {
            let mut bad = enc.clone();
            bad[i / 8] ^= 1 << (i % 8);
            assert!(RecordData::decode(&Bytes::from(bad)).is_err(), "bit {i}");
        }
    }

    #[test]
    fn truncation_is_an_error_not_a_panic() {
        let enc = sample().encode();
        for n in 0..enc.len() {
            assert!(RecordData::decode(&enc.slice(..n)).is_err());
        }
    }
}
