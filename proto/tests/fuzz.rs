//! Property tests over every decoder a client's bytes reach: stored records,
//! receipt handles, message ids, filter expressions, signed credentials and
//! client messages. Whatever the input: no panic, a typed error for what is
//! malformed, and what is encoded decodes back. Bounded (a few hundred
//! cases each, `PROPTEST_CASES` to change) so it runs in CI.

use bytes::Bytes;
use petrel_proto::filter::{Filter, FilterKind};
use petrel_proto::receipt::{Receipt, ReceiptKey};
use petrel_proto::record::RecordData;
use petrel_proto::{pb, MessageId, PetrelError};
use proptest::prelude::*;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(512),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn text() -> impl Strategy<Value = String> {
    // Mostly printable, sometimes anything (control, multi-byte).
    prop_oneof![
        "[ -~]{0,64}",
        any::<String>().prop_map(|s| s.chars().take(64).collect()),
    ]
}

prop_compose! {
    fn record()(
        producer_id in "[a-z0-9-]{0,40}",
        sequence in any::<u64>(),
        born in any::<i64>(),
        store in any::<i64>(),
        key in text(),
        tag in text(),
        mut properties in prop::collection::vec((text(), text()), 0..6),
        body in prop::collection::vec(any::<u8>(), 0..2048),
        message_group in text(),
        deliver_at in any::<i64>(),
    ) -> RecordData {
        properties.sort();
        RecordData {
            producer_id,
            sequence,
            born_timestamp_ms: born,
            store_timestamp_ms: store,
            key,
            tag,
            properties,
            body: Bytes::from(body),
            message_group,
            deliver_at_ms: deliver_at,
        }
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn records_round_trip_and_any_damage_is_a_typed_error(
        r in record(),
        flip in any::<prop::sample::Index>(),
        bit in 0u8..8,
        cut in any::<prop::sample::Index>(),
    ) {
        let enc = r.encode();
        prop_assert_eq!(RecordData::decode(&enc).unwrap(), r);
        prop_assert!(petrel_proto::record::verify(&enc).is_ok());
        // One flipped bit: the checksum (or a field check) catches it.
        let mut bad = enc.to_vec();
        let i = flip.index(bad.len());
        bad[i] ^= 1 << bit;
        prop_assert!(RecordData::decode(&Bytes::from(bad.clone())).is_err());
        prop_assert!(petrel_proto::record::verify(&bad).is_err());
        // Cut short anywhere.
        let n = cut.index(enc.len());
        prop_assert!(RecordData::decode(&enc.slice(..n)).is_err());
    }

    #[test]
    fn arbitrary_bytes_never_decode_into_a_panic(b in prop::collection::vec(any::<u8>(), 0..512)) {
        let b = Bytes::from(b);
        let _ = RecordData::decode(&b);
        let _ = petrel_proto::record::verify(&b);
        let _ = petrel_proto::record::store_timestamp_ms(&b);
        let _ = petrel_proto::record::key_of(&b);
    }

    #[test]
    fn receipts_verify_only_unaltered_and_garbage_is_refused(
        group_id in any::<u64>(),
        queue in any::<u32>(),
        offset in any::<u64>(),
        lease_id in any::<u64>(),
        deadline_ms in any::<i64>(),
        topic in "[a-z]{1,20}",
        group in "[a-z]{1,20}",
        junk in text(),
        flip in any::<prop::sample::Index>(),
    ) {
        let key = ReceiptKey::new("fuzz-secret-0123456789");
        let r = Receipt { group_id, queue, offset, lease_id, deadline_ms };
        let h = key.encode(&r, &topic, &group);
        prop_assert_eq!(key.decode(&h, &topic, &group).unwrap(), r);
        // Another group, another secret, or an edited handle: refused.
        let other_group = format!("{group}x");
        prop_assert!(key.decode(&h, &topic, &other_group).is_err());
        prop_assert!(ReceiptKey::new("another-secret-0123456789").decode(&h, &topic, &group).is_err());
        let mut chars: Vec<char> = h.chars().collect();
        let i = flip.index(chars.len());
        chars[i] = if chars[i] == 'A' { 'B' } else { 'A' };
        let edited: String = chars.into_iter().collect();
        if edited != h {
            match key.decode(&edited, &topic, &group) {
                // Only the offset may change undetected, and only as itself
                // (it sits outside the MAC; the broker checks the lease).
                Ok(d) => prop_assert_eq!((d.group_id, d.queue, d.lease_id, d.deadline_ms),
                                         (r.group_id, r.queue, r.lease_id, r.deadline_ms)),
                Err(e) => prop_assert!(matches!(e, PetrelError::InvalidArgument(_) | PetrelError::ReceiptExpired(_)), "{e:?}"),
            }
        }
        let _ = key.decode(&junk, &topic, &group);
    }

    #[test]
    fn message_ids_parse_or_are_invalid_arguments(s in text(), topic in "[a-zA-Z0-9][a-zA-Z0-9._-]{0,39}", q in any::<u32>(), o in any::<u64>()) {
        match s.parse::<MessageId>() {
            Ok(id) => prop_assert_eq!(id.to_string().parse::<MessageId>().unwrap(), id),
            Err(e) => prop_assert!(matches!(e, PetrelError::InvalidArgument(_)), "{e:?}"),
        }
        let id = MessageId { topic, queue: q, offset: o };
        prop_assert_eq!(id.to_string().parse::<MessageId>().unwrap(), id);
    }

    #[test]
    fn filter_expressions_parse_or_fail_with_a_reason(
        s in prop_oneof![
            text(),
            // Shaped like SQL, to get past the first token.
            "(NOT )?[a-z]{1,5} (=|<>|>|<|>=|<=|IN|BETWEEN|IS|LIKE) ('[a-z]{0,4}'|[0-9]{1,3}|NULL|\\(|\\))( (AND|OR) [a-z]{1,3} (=|>) [0-9]{1,2})?",
            "[a-z|& ]{0,30}",
        ],
        tag in text(),
        props in prop::collection::vec(("[a-z]{1,3}", "[a-z0-9]{0,3}"), 0..4),
    ) {
        for kind in [FilterKind::Tag, FilterKind::Sql] {
            match Filter::parse(kind, &s) {
                Ok(f) => {
                    let _ = f.matches(&tag, &props);
                }
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
        }
    }

    #[test]
    fn signed_credentials_parse_or_fail_with_a_reason(s in text(), n in text()) {
        if let Ok(p) = petrel_proto::auth::parse_authorization(&s) {
            let _ = petrel_proto::auth::verify(&[0; 32], &p, 0);
        }
        let _ = petrel_proto::auth::parse_nonce(&n);
    }

    #[test]
    fn client_messages_are_accepted_or_refused_with_a_typed_error(
        key in prop_oneof![text(), "k{0,200}", "k{120,200}"],
        tag in text(),
        props in prop::collection::hash_map(text(), text(), 0..8),
        body in prop::collection::vec(any::<u8>(), 0..1024),
        group in text(),
        max in 1usize..4096,
    ) {
        let m = pb::Message {
            key,
            tag,
            properties: props,
            body: Bytes::from(body),
            message_group: group,
            ..Default::default()
        };
        match petrel_proto::validate::message(&m, max) {
            Ok(()) => {}
            Err(e) => prop_assert!(
                matches!(e, PetrelError::InvalidArgument(_) | PetrelError::TooLarge(_)),
                "{e:?}"
            ),
        }
        for name in [&m.key, &m.tag] {
            let _ = petrel_proto::validate::topic_name(name);
            let _ = petrel_proto::validate::group_name(name);
            let _ = petrel_proto::validate::producer_id(name);
        }
    }
}

/// A huge filter expression is refused quickly with a typed error rather
/// than parsed (the 1 MiB tag filter of issue 12).
#[test]
fn an_oversized_filter_expression_is_refused() {
    let big = "a || ".repeat(200_000);
    let t = std::time::Instant::now();
    for kind in [FilterKind::Tag, FilterKind::Sql] {
        assert!(Filter::parse(kind, &big).is_err());
    }
    assert!(t.elapsed() < std::time::Duration::from_secs(5));
}
