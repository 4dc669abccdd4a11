//! Receipt handles: opaque, tamper-evident tokens naming one lease, so that
//! any proxy can route an ack to the right queue leader without state.
//!
//! Layout before base64url: `[version u8][group u64][queue u32][offset u64]
//! [lease u64][deadline i64][mac 16]`, where `mac` is HMAC-SHA256 truncated
//! to 16 bytes, keyed by a secret shared by the proxies, over the fields
//! but the offset (version 2; version 1, still accepted, covered the offset
//! too) plus the topic and consumer-group names. A flipped bit in a signed
//! field, a handle from another topic or group, or a forged handle fails
//! verification.
//!
//! Why the offset is outside the signature: every record of one receive
//! shares its lease id and deadline, so one MAC signs the whole receive
//! instead of one per record. Changing a handle's offset only names
//! another record leased under the same lease id, which the queue leader
//! issues once per receive (nacks and invisibility changes issue new
//! ones): the same client already holds a handle for it, so nothing is
//! gained that it did not have.

use crate::PetrelError;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

const VERSION: u8 = 2;
const VERSION_1: u8 = 1;
/// Where the offset sits in the body.
const OFFSET: std::ops::Range<usize> = 13..21;
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
    /// HMAC state with the key already absorbed (cloned per MAC).
    keyed: Hmac<Sha256>,
}

impl std::fmt::Debug for ReceiptKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReceiptKey(..)")
    }
}

impl ReceiptKey {
    pub fn new(secret: impl AsRef<[u8]>) -> Self {
        Self {
            keyed: <Hmac<Sha256> as Mac>::new_from_slice(secret.as_ref())
                .expect("HMAC accepts keys of any length"),
        }
    }

    /// MAC of `body` (version 2: without the offset) and the names.
    fn mac(&self, body: &[u8], topic: &str, group: &str) -> [u8; MAC] {
        let mut m = self.keyed.clone();
        if body[0] == VERSION_1 {
            m.update(body);
        } else {
            m.update(&body[..OFFSET.start]);
            m.update(&body[OFFSET.end..]);
        }
        m.update(&(topic.len() as u32).to_le_bytes());
        m.update(topic.as_bytes());
        m.update(group.as_bytes());
        let full = m.finalize().into_bytes();
        let mut out = [0u8; MAC];
        out.copy_from_slice(&full[..MAC]);
        out
    }

    fn body(r: &Receipt) -> Vec<u8> {
        let mut b = Vec::with_capacity(BODY + MAC);
        b.push(VERSION);
        b.extend_from_slice(&r.group_id.to_le_bytes());
        b.extend_from_slice(&r.queue.to_le_bytes());
        b.extend_from_slice(&r.offset.to_le_bytes());
        b.extend_from_slice(&r.lease_id.to_le_bytes());
        b.extend_from_slice(&r.deadline_ms.to_le_bytes());
        b
    }

    pub fn encode(&self, r: &Receipt, topic: &str, group: &str) -> String {
        self.signer(topic, group).sign(r)
    }

    /// Signs the handles of one receive: one MAC per lease id and deadline,
    /// not one per record.
    pub fn signer<'a>(&'a self, topic: &'a str, group: &'a str) -> Signer<'a> {
        Signer {
            key: self,
            topic,
            group,
            last: None,
        }
    }

    pub fn decode(&self, handle: &str, topic: &str, group: &str) -> Result<Receipt, PetrelError> {
        self.decode_cached(handle, topic, group, &mut None)
    }

    /// Verifies the handles of one ack: one MAC per run of handles with the
    /// same signed part.
    pub fn decode_many<'h>(
        &self,
        handles: impl IntoIterator<Item = &'h str>,
        topic: &str,
        group: &str,
    ) -> Vec<Result<Receipt, PetrelError>> {
        let mut last = None;
        handles
            .into_iter()
            .map(|h| self.decode_cached(h, topic, group, &mut last))
            .collect()
    }

    fn decode_cached(
        &self,
        handle: &str,
        topic: &str,
        group: &str,
        last: &mut Option<([u8; BODY], [u8; MAC])>,
    ) -> Result<Receipt, PetrelError> {
        let bad =
            |why: &str| PetrelError::InvalidArgument(format!("invalid receipt handle: {why}"));
        if handle.len() > 128 {
            return Err(bad("too long"));
        }
        let b = URL_SAFE_NO_PAD
            .decode(handle.as_bytes())
            .map_err(|_| bad("not base64url"))?;
        if b.len() != BODY + MAC || (b[0] != VERSION && b[0] != VERSION_1) {
            return Err(bad("wrong length or version"));
        }
        // The signed part (version 2: all but the offset) and the MAC
        // expected for it, reused while handles share it.
        let body = &b[..BODY];
        let same_signed = |prev: &[u8; BODY]| {
            prev[..OFFSET.start] == body[..OFFSET.start]
                && prev[OFFSET.end..] == body[OFFSET.end..]
                && (body[0] == VERSION || prev[OFFSET] == body[OFFSET])
        };
        let expect = match last {
            Some((prev, m)) if same_signed(prev) => *m,
            _ => {
                let m = self.mac(body, topic, group);
                let mut prev = [0u8; BODY];
                prev.copy_from_slice(body);
                *last = Some((prev, m));
                m
            }
        };
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

/// What one MAC of a version-2 handle covers besides the names: group,
/// queue, lease id, deadline.
type Signed = (u64, u32, u64, i64);

/// Signs the handles of one receive (see [`ReceiptKey::signer`]).
pub struct Signer<'a> {
    key: &'a ReceiptKey,
    topic: &'a str,
    group: &'a str,
    /// (group, queue, lease, deadline) of the last MAC, and the MAC.
    last: Option<(Signed, [u8; MAC])>,
}

impl Signer<'_> {
    pub fn sign(&mut self, r: &Receipt) -> String {
        let mut b = ReceiptKey::body(r);
        let id: Signed = (r.group_id, r.queue, r.lease_id, r.deadline_ms);
        let mac = match self.last {
            Some((l, m)) if l == id => m,
            _ => {
                let m = self.key.mac(&b, self.topic, self.group);
                self.last = Some((id, m));
                m
            }
        };
        b.extend_from_slice(&mac);
        URL_SAFE_NO_PAD.encode(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_receive_is_signed_once_and_verified_in_a_batch() {
        let k = ReceiptKey::new("s3cret");
        let mut signer = k.signer("t", "g");
        let rs: Vec<Receipt> = (0..5)
            .map(|o| Receipt {
                group_id: 5,
                queue: 2,
                offset: 100 + o,
                lease_id: if o < 3 { 7 } else { 8 },
                deadline_ms: 99,
            })
            .collect();
        let hs: Vec<String> = rs.iter().map(|r| signer.sign(r)).collect();
        let back = k.decode_many(hs.iter().map(|h| h.as_str()), "t", "g");
        assert_eq!(back.into_iter().map(|r| r.unwrap()).collect::<Vec<_>>(), rs);
        // A bad handle in the middle of a batch fails alone.
        let mut mixed: Vec<&str> = hs.iter().map(|h| h.as_str()).collect();
        mixed.insert(2, "garbage");
        let out = k.decode_many(mixed, "t", "g");
        assert!(out[2].is_err() && out.iter().filter(|r| r.is_ok()).count() == 5);
        // Handles of version 1 (offset signed too) still verify.
        let r = rs[0];
        let mut v1 = ReceiptKey::body(&r);
        v1[0] = VERSION_1;
        let mac = k.mac(&v1, "t", "g");
        v1.extend_from_slice(&mac);
        assert_eq!(k.decode(&URL_SAFE_NO_PAD.encode(&v1), "t", "g").unwrap(), r);
    }

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
        // Tampering with a signed field after the offset fails too.
        let mut raw = URL_SAFE_NO_PAD.decode(&h).unwrap();
        raw[22] ^= 1; // the lease id
        assert!(k.decode(&URL_SAFE_NO_PAD.encode(&raw), "t", "g").is_err());
        for junk in ["", "garbage", "!!!!", &"A".repeat(500)] {
            assert!(matches!(
                k.decode(junk, "t", "g"),
                Err(PetrelError::InvalidArgument(_))
            ));
        }
    }
}
