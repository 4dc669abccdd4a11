//! RocketMQ 5 clients' request signature, checked without keeping their
//! secret:
//!
//! ```text
//! authorization: MQv2-HMAC-SHA1 Credential=<access key>, SignedHeaders=x-mq-date-time, Signature=<hex>
//! <hex> = HMAC-SHA1(key = secret, message = the x-mq-date-time header as sent)
//! ```
//!
//! HMAC-SHA1 only ever uses its key through two SHA-1 states: after one
//! block of `key ^ ipad` and one of `key ^ opad` (RFC 2104, section 4). The
//! users file keeps those ([`pad_states`], 40 bytes) instead of the secret:
//! one-way like Petrel's own signing key, and enough to verify.

use sha1::digest::generic_array::GenericArray;
use sha1::{Digest, Sha1};

/// The scheme RocketMQ clients name in `authorization`.
pub const SCHEME: &str = "MQv2-HMAC-SHA1";
/// The signed header.
pub const DATE_HEADER: &str = "x-mq-date-time";

const INIT: [u32; 5] = [
    0x6745_2301,
    0xEFCD_AB89,
    0x98BA_DCFE,
    0x1032_5476,
    0xC3D2_E1F0,
];

/// The SHA-1 states after `key ^ ipad` and `key ^ opad`, big-endian (40
/// bytes): what the users file stores for RocketMQ clients.
pub fn pad_states(secret: &str) -> [u8; 40] {
    let mut k = [0u8; 64];
    let s = secret.as_bytes();
    if s.len() > 64 {
        k[..20].copy_from_slice(&Sha1::digest(s));
    } else {
        k[..s.len()].copy_from_slice(s);
    }
    let mut out = [0u8; 40];
    for (i, pad) in [0x36u8, 0x5c].into_iter().enumerate() {
        let mut block = [0u8; 64];
        for (b, k) in block.iter_mut().zip(k) {
            *b = k ^ pad;
        }
        let mut st = INIT;
        sha1::compress(&mut st, &[GenericArray::from(block)]);
        for (j, w) in st.iter().enumerate() {
            out[i * 20 + j * 4..i * 20 + j * 4 + 4].copy_from_slice(&w.to_be_bytes());
        }
    }
    out
}

/// SHA-1 from a state that has absorbed one 64-byte block, over `data`.
fn finish(state: &[u8], data: &[u8]) -> [u8; 20] {
    let mut st = [0u32; 5];
    for (j, w) in st.iter_mut().enumerate() {
        *w = u32::from_be_bytes(state[j * 4..j * 4 + 4].try_into().expect("4 bytes"));
    }
    let bits = ((64 + data.len()) as u64) * 8;
    let mut msg = data.to_vec();
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&bits.to_be_bytes());
    let blocks: Vec<GenericArray<u8, _>> = msg
        .chunks_exact(64)
        .map(GenericArray::clone_from_slice)
        .collect();
    sha1::compress(&mut st, &blocks);
    let mut out = [0u8; 20];
    for (j, w) in st.iter().enumerate() {
        out[j * 4..j * 4 + 4].copy_from_slice(&w.to_be_bytes());
    }
    out
}

/// HMAC-SHA1 of `message` under the key whose [`pad_states`] are given.
pub fn hmac_sha1(states: &[u8; 40], message: &[u8]) -> [u8; 20] {
    let inner = finish(&states[..20], message);
    finish(&states[20..], &inner)
}

/// An `authorization` header's access key and signature bytes.
pub fn parse(header: &str) -> Result<(&str, Vec<u8>), String> {
    let (scheme, rest) = header
        .split_once(' ')
        .ok_or("the authorization header has no scheme")?;
    if scheme != SCHEME {
        return Err(format!("unknown signature scheme {scheme:?}"));
    }
    let (mut ak, mut sig) = (None, None);
    for part in rest.split(',') {
        let Some((k, v)) = part.trim().split_once('=') else {
            continue;
        };
        match k.trim() {
            "Credential" => ak = Some(v.split('/').next().unwrap_or(v).trim()),
            "Signature" => sig = Some(v.trim()),
            _ => {}
        }
    }
    let ak = ak.filter(|a| !a.is_empty()).ok_or("no Credential")?;
    let sig = sig.ok_or("no Signature")?;
    let bytes = hex_decode(sig).ok_or("the Signature is not hex")?;
    Ok((ak, bytes))
}

/// Hex, either case (Rust clients send lowercase, Java uppercase).
fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Whether `signature` is the HMAC of `date` under `states` (constant
/// time: the comparison is `digest`'s `CtOutput`, built on `subtle`).
pub fn verify(states: &[u8; 40], date: &str, signature: &[u8]) -> bool {
    use sha1::digest::CtOutput;
    type Out = CtOutput<hmac::Hmac<Sha1>>;
    if signature.len() != 20 {
        return false;
    }
    let want = Out::new(GenericArray::from(hmac_sha1(states, date.as_bytes())));
    let got = Out::new(GenericArray::clone_from_slice(signature));
    want == got
}

#[cfg(test)]
mod tests {
    use super::*;
    use hmac::Mac;

    #[test]
    fn matches_rocketmq_clients_and_the_hmac_crate() {
        let st = pad_states("my-secret");
        let sig = hmac_sha1(&st, b"2024-05-06T07:08:09.123456789Z");
        assert_eq!(
            sig.iter().map(|b| format!("{b:02x}")).collect::<String>(),
            "92ebbce49346552919a5a6400d18d12f62d04b0a"
        );
        for (secret, msg) in [
            ("", "x"),
            ("k", ""),
            (
                "a-long-secret-a-long-secret-a-long-secret-a-long-secret-a-long-secret!",
                "20240506T070809Z",
            ),
            ("s", &"m".repeat(200)),
        ] {
            let mut m = hmac::Hmac::<Sha1>::new_from_slice(secret.as_bytes()).unwrap();
            m.update(msg.as_bytes());
            let want: [u8; 20] = m.finalize().into_bytes().into();
            assert_eq!(
                hmac_sha1(&pad_states(secret), msg.as_bytes()),
                want,
                "{secret:?} {msg:?}"
            );
        }
    }

    #[test]
    fn headers_parse_in_either_case_and_garbage_is_refused() {
        let st = pad_states("sk");
        let sig = hmac_sha1(&st, b"d");
        let hex: String = sig.iter().map(|b| format!("{b:02X}")).collect();
        let h = format!("{SCHEME} Credential=ak, SignedHeaders={DATE_HEADER}, Signature={hex}");
        let (ak, s) = parse(&h).unwrap();
        assert_eq!(ak, "ak");
        assert!(verify(&st, "d", &s));
        assert!(!verify(&st, "e", &s));
        for bad in [
            "",
            "MQv2-HMAC-SHA1",
            "Basic x",
            "MQv2-HMAC-SHA1 Credential=, Signature=00",
            "MQv2-HMAC-SHA1 Credential=a, Signature=zz",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
