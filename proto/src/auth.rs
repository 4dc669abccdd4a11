//! Request signing: how a client proves it holds a user's secret key
//! without sending it.
//!
//! ```text
//!  secret ──HMAC-SHA256("petrel-signing-key-v1\n" + access key)──▶ signing key
//!  signing key ──HMAC-SHA256("PETREL1\n" + access key \n date \n nonce)──▶ signature
//! ```
//!
//! Every call carries, as gRPC metadata, `x-petrel-date` (the client's clock,
//! unix milliseconds) and `authorization: PETREL-HMAC-SHA256
//! Credential=<access key>, Nonce=<client id>-<counter>, Signature=<base64>`,
//! the shape of the `authorization` header RocketMQ 5 clients sign. The
//! proxy refuses a date too far from its clock (a stale signature) and a
//! nonce it has seen (a replay): each client instance numbers its calls.
//!
//! The proxy stores only the signing key, a one-way function of the secret:
//! a leaked users file does not reveal the secrets (which users may reuse
//! elsewhere), though it does let its holder sign until the keys are
//! rotated, as with any shared-key scheme.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Metadata key of the signed date (unix milliseconds).
pub const DATE_HEADER: &str = "x-petrel-date";
/// Metadata key of the credential, nonce and signature.
pub const AUTHORIZATION_HEADER: &str = "authorization";
/// The scheme named in [`AUTHORIZATION_HEADER`].
pub const SCHEME: &str = "PETREL-HMAC-SHA256";

type HmacSha256 = Hmac<Sha256>;

/// The key a user's calls are signed with, derived from its secret.
pub fn signing_key(access_key: &str, secret: &str) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(b"petrel-signing-key-v1\n");
    mac.update(access_key.as_bytes());
    mac.finalize().into_bytes().into()
}

fn mac(key: &[u8; 32], access_key: &str, date_ms: i64, nonce: &str) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(key).expect("any key length");
    mac.update(b"PETREL1\n");
    mac.update(access_key.as_bytes());
    mac.update(b"\n");
    mac.update(date_ms.to_string().as_bytes());
    mac.update(b"\n");
    mac.update(nonce.as_bytes());
    mac
}

/// The `authorization` value for one call.
pub fn authorization(key: &[u8; 32], access_key: &str, date_ms: i64, nonce: &str) -> String {
    let sig = mac(key, access_key, date_ms, nonce).finalize().into_bytes();
    format!(
        "{SCHEME} Credential={access_key}, Nonce={nonce}, Signature={}",
        base64::engine::general_purpose::STANDARD.encode(sig)
    )
}

/// An `authorization` value taken apart (not yet verified).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed<'a> {
    pub access_key: &'a str,
    pub nonce: &'a str,
    pub signature: Vec<u8>,
}

/// Parses an `authorization` value; the reason when it is malformed.
pub fn parse_authorization(v: &str) -> Result<Signed<'_>, String> {
    let rest = v
        .strip_prefix(SCHEME)
        .and_then(|r| r.strip_prefix(' '))
        .ok_or_else(|| format!("authorization must start with {SCHEME}"))?;
    let (mut ak, mut nonce, mut sig) = (None, None, None);
    for part in rest.split(',') {
        let (k, v) = part
            .trim()
            .split_once('=')
            .ok_or_else(|| format!("malformed authorization field {part:?}"))?;
        match k {
            "Credential" => ak = Some(v),
            "Nonce" => nonce = Some(v),
            "Signature" => sig = Some(v),
            _ => return Err(format!("unknown authorization field {k:?}")),
        }
    }
    let signature = base64::engine::general_purpose::STANDARD
        .decode(sig.ok_or("authorization has no Signature")?)
        .map_err(|_| "the signature is not base64".to_string())?;
    Ok(Signed {
        access_key: ak
            .filter(|a| !a.is_empty())
            .ok_or("authorization has no Credential")?,
        nonce: nonce
            .filter(|n| !n.is_empty())
            .ok_or("authorization has no Nonce")?,
        signature,
    })
}

/// Whether `s` is a valid signature of the call (constant time).
pub fn verify(key: &[u8; 32], s: &Signed<'_>, date_ms: i64) -> bool {
    mac(key, s.access_key, date_ms, s.nonce)
        .verify_slice(&s.signature)
        .is_ok()
}

/// A nonce's parts: the client instance and its call counter.
pub fn parse_nonce(nonce: &str) -> Option<(u64, u64)> {
    let (c, n) = nonce.split_once('-')?;
    Some((u64::from_str_radix(c, 16).ok()?, n.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_only_for_its_own_fields() {
        let key = signing_key("alice", "s3cret");
        let v = authorization(&key, "alice", 1_000, "00ff-7");
        let s = parse_authorization(&v).unwrap();
        assert_eq!((s.access_key, s.nonce), ("alice", "00ff-7"));
        assert!(verify(&key, &s, 1_000));
        assert!(!verify(&key, &s, 1_001), "another date");
        assert!(!verify(&signing_key("alice", "other"), &s, 1_000));
        let forged = v.replace("Nonce=00ff-7", "Nonce=00ff-8");
        assert!(!verify(&key, &parse_authorization(&forged).unwrap(), 1_000));
        assert_eq!(parse_nonce("00ff-7"), Some((255, 7)));
    }

    #[test]
    fn malformed_authorization_is_refused_with_a_reason() {
        for bad in [
            "",
            "Bearer x",
            "PETREL-HMAC-SHA256",
            "PETREL-HMAC-SHA256 Credential=a, Nonce=1-1",
            "PETREL-HMAC-SHA256 Credential=, Nonce=1-1, Signature=AA==",
            "PETREL-HMAC-SHA256 Credential=a, Nonce=1-1, Signature=!!",
            "PETREL-HMAC-SHA256 Credential=a, Nonce=1-1, Signature=AA==, Extra=1",
            "PETREL-HMAC-SHA256 garbage",
        ] {
            assert!(parse_authorization(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_nonce("zz-1"), None);
        assert_eq!(parse_nonce("1"), None);
    }
}
