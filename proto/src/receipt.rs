//! Receipt handles: opaque, tamper-evident tokens naming one lease, so that
//! any proxy can route an ack to the right queue leader without state.
//!
//! Layout before base64url: `[version u8][group u64][queue u32][offset u64]
//! [lease u64][deadline i64][mac 16]`, where `mac` is HMAC-SHA256 truncated
//! to 16 bytes over the fields plus the topic and consumer-group names, keyed
//! by a secret shared by the proxies. A flipped bit, a handle from another
//! topic or group, or a forged handle fails verification.

use crate::PetrelError;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

const VERSION: u8 = 1;
const BODY: usize = 1 + 8 + 4 + 8 + 8 + 8;
const MAC: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Receipt {
    pub group_id: u64,
    pub queue: u32,
    pub offset: u64,
    pub lease_id: u64,
    pub deadline_ms: i64,
}

/// Signs and verifies receipt handles with one key.
#[derive(Clone)]
pub struct ReceiptKey {
    key: Vec<u8>,
}

impl std::fmt::Debug for ReceiptKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReceiptKey(..)")
    }
}

impl ReceiptKey {
    pub fn new(secret: impl AsRef<[u8]>) -> Self {
        Self {
            key: secret.as_ref().to_vec(),
        }
    }

    fn mac(&self, body: &[u8], topic: &str, group: &str) -> [u8; MAC] {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.key)
            .expect("HMAC accepts keys of any length");
        m.update(body);
        m.update(&(topic.len() as u32).to_le_bytes());
        m.update(topic.as_bytes());
        m.update(group.as_bytes());
        let full = m.finalize().into_bytes();
        let mut out = [0u8; MAC];
        out.copy_from_slice(&full[..MAC]);
        out
    }

    pub fn encode(&self, r: &Receipt, topic: &str, group: &str) -> String {
        let mut b = Vec::with_capacity(BODY + MAC);
        b.push(VERSION);
        b.extend_from_slice(&r.group_id.to_le_bytes());
        b.extend_from_slice(&r.queue.to_le_bytes());
        b.extend_from_slice(&r.offset.to_le_bytes());
        b.extend_from_slice(&r.lease_id.to_le_bytes());
        b.extend_from_slice(&r.deadline_ms.to_le_bytes());
        let mac = self.mac(&b, topic, group);
        b.extend_from_slice(&mac);
        URL_SAFE_NO_PAD.encode(b)
    }

    pub fn decode(&self, handle: &str, topic: &str, group: &str) -> Result<Receipt, PetrelError> {
        let bad =
            |why: &str| PetrelError::InvalidArgument(format!("invalid receipt handle: {why}"));
        if handle.len() > 128 {
            return Err(bad("too long"));
        }
        let b = URL_SAFE_NO_PAD
            .decode(handle.as_bytes())
            .map_err(|_| bad("not base64url"))?;
        if b.len() != BODY + MAC || b[0] != VERSION {
            return Err(bad("wrong length or version"));
        }
        let expect = self.mac(&b[..BODY], topic, group);
        // Constant-time compare.
        let diff = expect
            .iter()
            .zip(&b[BODY..])
            .fold(0u8, |acc, (x, y)| acc | (x ^ y));
        if diff != 0 {
            return Err(bad(
                "signature mismatch (forged, or for another topic/group)",
            ));
        }
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or([0; 8]));
        Ok(Receipt {
            group_id: u64_at(1),
            queue: u32::from_le_bytes(b[9..13].try_into().unwrap_or([0; 4])),
            offset: u64_at(13),
            lease_id: u64_at(21),
            deadline_ms: u64_at(29) as i64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_tamper_evidence() {
        let k = ReceiptKey::new("s3cret");
        let r = Receipt {
            group_id: 5,
            queue: 2,
            offset: 77,
            lease_id: 1234,
            deadline_ms: 99,
        };
        let h = k.encode(&r, "t", "g");
        assert_eq!(k.decode(&h, "t", "g").unwrap(), r);
        assert!(k.decode(&h, "t", "other").is_err());
        assert!(k.decode(&h, "t2", "g").is_err());
        assert!(ReceiptKey::new("x").decode(&h, "t", "g").is_err());
        let mut chars: Vec<char> = h.chars().collect();
        chars[3] = if chars[3] == 'A' { 'B' } else { 'A' };
        let tampered: String = chars.into_iter().collect();
        assert!(k.decode(&tampered, "t", "g").is_err());
        for junk in ["", "garbage", "!!!!", &"A".repeat(500)] {
            assert!(matches!(
                k.decode(junk, "t", "g"),
                Err(PetrelError::InvalidArgument(_))
            ));
        }
    }
}
