//! Every key layout in the broker's RocksDB, in one place.
//!
//! All Raft groups share the column families; every key starts with the
//! group id (u64 big-endian) so one group's data is one contiguous range that
//! a range delete can drop. Integers are big-endian so byte order is numeric
//! order.

/// Length of a `[group][u64]` key.
pub const GROUP_U64_KEY_LEN: usize = 16;

/// `raft_log` CF: `[group][log index]` → bincode(openraft Entry).
pub fn log_key(group: u64, index: u64) -> [u8; GROUP_U64_KEY_LEN] {
    group_u64(group, index)
}

/// `records` CF: `[group][queue offset]` → encoded record (see
/// `petrel_proto::record`).
pub fn record_key(group: u64, offset: u64) -> [u8; GROUP_U64_KEY_LEN] {
    group_u64(group, offset)
}

/// `indexes` CF: `[group][key len u16][key][offset]` → empty. One entry
/// per keyed record; a lookup scans `[group][len][key]`.
pub fn key_index_key(group: u64, key: &str, offset: u64) -> Vec<u8> {
    let mut k = key_index_prefix(group, key);
    k.extend_from_slice(&offset.to_be_bytes());
    k
}

/// The prefix of every index entry of `key` in `group`.
pub fn key_index_prefix(group: u64, key: &str) -> Vec<u8> {
    let key = &key.as_bytes()[..key.len().min(u16::MAX as usize)];
    let mut k = Vec::with_capacity(8 + 2 + key.len() + 8);
    k.extend_from_slice(&group.to_be_bytes());
    k.extend_from_slice(&(key.len() as u16).to_be_bytes());
    k.extend_from_slice(key);
    k
}

/// `indexes` CF: `[group][0xFFFF][id len u16][id][offset]` → empty. One
/// entry per record carrying a client-generated message id (property
/// `petrel_proto::record::CLIENT_ID_PROPERTY`). Keys are at most
/// `MAX_KEY_LEN` (1,024) bytes, so the 0xFFFF marker, where a key index
/// entry has its key's length, never meets a key's entries.
pub fn client_id_index_key(group: u64, id: &str, offset: u64) -> Vec<u8> {
    let mut k = client_id_index_prefix(group, id);
    k.extend_from_slice(&offset.to_be_bytes());
    k
}

/// The prefix of the index entries of client message id `id` in `group`.
/// Ids are indexed in uppercase: RocketMQ clients spell their hexadecimal
/// ids in mixed case (an uppercase prefix, a lowercase tail), and people
/// retype them.
pub fn client_id_index_prefix(group: u64, id: &str) -> Vec<u8> {
    let id = &id.as_bytes()[..id.len().min(u16::MAX as usize)];
    let mut k = Vec::with_capacity(8 + 2 + 2 + id.len() + 8);
    k.extend_from_slice(&group.to_be_bytes());
    k.extend_from_slice(&u16::MAX.to_be_bytes());
    k.extend_from_slice(&(id.len() as u16).to_be_bytes());
    k.extend(id.iter().map(u8::to_ascii_uppercase));
    k
}

/// Decodes the index/offset half of a `[group][u64]` key.
pub fn decode_group_u64(key: &[u8]) -> Option<(u64, u64)> {
    if key.len() != GROUP_U64_KEY_LEN {
        return None;
    }
    let g = u64::from_be_bytes(key[0..8].try_into().ok()?);
    let v = u64::from_be_bytes(key[8..16].try_into().ok()?);
    Some((g, v))
}

fn group_u64(group: u64, v: u64) -> [u8; GROUP_U64_KEY_LEN] {
    let mut k = [0u8; GROUP_U64_KEY_LEN];
    k[0..8].copy_from_slice(&group.to_be_bytes());
    k[8..16].copy_from_slice(&v.to_be_bytes());
    k
}

/// First key of a group's range in any CF.
pub fn group_start(group: u64) -> [u8; 8] {
    group.to_be_bytes()
}

/// First key after a group's range in any CF (exclusive end).
pub fn group_end(group: u64) -> [u8; 9] {
    // [group][0xFF..] is not enough for variable-length suffixes, so use
    // [group + 1] with a trailing zero: every key of `group` sorts before it.
    let mut k = [0u8; 9];
    k[0..8].copy_from_slice(&group.wrapping_add(1).to_be_bytes());
    if group == u64::MAX {
        k = [0xFF; 9];
    }
    k
}

/// `raft_state` CF suffixes: one small value each per group.
pub mod raft_state {
    /// `bincode(Vote)`
    pub const VOTE: u8 = 1;
    /// `bincode(Option<LogId>)` of the last purged log entry.
    pub const LAST_PURGED: u8 = 2;
    /// `bincode(Option<LogId>)` of the last committed entry.
    pub const COMMITTED: u8 = 3;
}

/// `sm_state` CF suffixes. Written with the WAL off together with the
/// records CF; atomic flush keeps them consistent with each other.
pub mod sm_state {
    /// `bincode((Option<LogId>, StoredMembership))`: last applied + membership.
    pub const APPLIED: u8 = 1;
    /// `bincode(QueueHeader)`: start and next offset.
    pub const QUEUE_HEADER: u8 = 2;
    /// `[group][3][consumer group name]` → bincode(ConsumerState) without
    /// its leases (see `CONSUMER_LEASE`).
    pub const CONSUMER: u8 = 3;
    /// Retired: `[group][4][producer id]` held the whole de-dup window,
    /// rewritten on every append (replaced by 7 and 8). Never reused.
    pub const PRODUCER_WINDOW_RETIRED: u8 = 4;
    /// `bincode(ClusterMap)`, meta group only.
    pub const CLUSTER_MAP: u8 = 5;
    /// `[group][6][transaction id]` → bincode(Txn).
    pub const TXN: u8 = 6;
    /// `[group][7][u16 len][producer id][sequence]` → offset (u64 BE): one
    /// de-duplication entry per key, so an append writes what it adds.
    pub const PRODUCER_SEQ: u8 = 7;
    /// `[group][8][producer id]` → last_seen log index (u64 BE).
    pub const PRODUCER_SEEN: u8 = 8;
    /// `[group][9][u16 len][consumer group][offset]` → bincode(Lease): one
    /// key per lease, so a checkpoint writes the leases it changed. The
    /// group's other state stays under `CONSUMER` (its `leases` empty;
    /// state written before this key existed keeps them there, and loads).
    pub const CONSUMER_LEASE: u8 = 9;
}

/// `[group][kind][u16 len][name]`: the prefix of one name's u64-keyed
/// entries (the length keeps one name's range from containing another's).
fn name_u64_prefix(group: u64, kind: u8, name: &str) -> Vec<u8> {
    let name = name.as_bytes();
    let len = u16::try_from(name.len()).unwrap_or(u16::MAX);
    let mut k = Vec::with_capacity(11 + name.len() + 8);
    k.extend_from_slice(&state_key(group, kind));
    k.extend_from_slice(&len.to_be_bytes());
    k.extend_from_slice(&name[..usize::from(len)]);
    k
}

/// `[group][kind][u16 len][name][n]`
fn name_u64_key(group: u64, kind: u8, name: &str, n: u64) -> Vec<u8> {
    let mut k = name_u64_prefix(group, kind, name);
    k.extend_from_slice(&n.to_be_bytes());
    k
}

/// Exclusive end of one name's entries.
fn name_u64_end(group: u64, kind: u8, name: &str) -> Vec<u8> {
    let mut k = name_u64_prefix(group, kind, name);
    k.extend_from_slice(&[0xFF; 9]);
    k
}

/// Decodes a `name_u64_key` of `group` and `kind` into (name, n).
fn decode_name_u64_key(group: u64, kind: u8, k: &[u8]) -> Option<(String, u64)> {
    let head = state_key(group, kind);
    let rest = k.strip_prefix(&head[..])?;
    let len = usize::from(u16::from_be_bytes(rest.get(..2)?.try_into().ok()?));
    let name = rest.get(2..2 + len)?;
    let n = rest.get(2 + len..)?;
    let n = u64::from_be_bytes(n.try_into().ok()?);
    Some((String::from_utf8_lossy(name).into_owned(), n))
}

/// `[group][PRODUCER_SEQ][u16 len][producer]`: one producer's
/// de-duplication entries.
pub fn producer_seq_prefix(group: u64, producer: &str) -> Vec<u8> {
    name_u64_prefix(group, sm_state::PRODUCER_SEQ, producer)
}

/// `[group][PRODUCER_SEQ][u16 len][producer][sequence]`
pub fn producer_seq_key(group: u64, producer: &str, seq: u64) -> Vec<u8> {
    name_u64_key(group, sm_state::PRODUCER_SEQ, producer, seq)
}

/// Exclusive end of one producer's de-duplication entries.
pub fn producer_seq_end(group: u64, producer: &str) -> Vec<u8> {
    name_u64_end(group, sm_state::PRODUCER_SEQ, producer)
}

/// Decodes a `producer_seq_key` of `group` into (producer, sequence).
pub fn decode_producer_seq_key(group: u64, k: &[u8]) -> Option<(String, u64)> {
    decode_name_u64_key(group, sm_state::PRODUCER_SEQ, k)
}

/// `[group][CONSUMER_LEASE][u16 len][consumer group][offset]`
pub fn consumer_lease_key(group: u64, consumer: &str, offset: u64) -> Vec<u8> {
    name_u64_key(group, sm_state::CONSUMER_LEASE, consumer, offset)
}

/// One consumer group's lease keys: `[start, end)`.
pub fn consumer_lease_range(group: u64, consumer: &str) -> (Vec<u8>, Vec<u8>) {
    (
        name_u64_prefix(group, sm_state::CONSUMER_LEASE, consumer),
        name_u64_end(group, sm_state::CONSUMER_LEASE, consumer),
    )
}

/// Decodes a `consumer_lease_key` of `group` into (consumer group, offset).
pub fn decode_consumer_lease_key(group: u64, k: &[u8]) -> Option<(String, u64)> {
    decode_name_u64_key(group, sm_state::CONSUMER_LEASE, k)
}

/// `[group][kind]`
pub fn state_key(group: u64, kind: u8) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0..8].copy_from_slice(&group.to_be_bytes());
    k[8] = kind;
    k
}

/// `[group][kind][name]`
pub fn named_state_key(group: u64, kind: u8, name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(9 + name.len());
    k.extend_from_slice(&state_key(group, kind));
    k.extend_from_slice(name.as_bytes());
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_numerically_and_stay_in_group_range() {
        assert!(log_key(1, 255) < log_key(1, 256));
        assert!(log_key(1, u64::MAX) < log_key(2, 0));
        assert_eq!(decode_group_u64(&log_key(7, 9)), Some((7, 9)));
        let end = group_end(1);
        assert!(log_key(1, u64::MAX).as_slice() < end.as_slice());
        assert!(named_state_key(1, 3, "zzzz").as_slice() < end.as_slice());
        assert!(log_key(2, 0).as_slice() >= end.as_slice());
        assert!(group_start(1).as_slice() <= log_key(1, 0).as_slice());
    }

    #[test]
    fn producer_seq_keys_round_trip_and_ranges_do_not_overlap() {
        let k = producer_seq_key(3, "p-1", 42);
        assert_eq!(decode_producer_seq_key(3, &k), Some(("p-1".into(), 42)));
        assert_eq!(decode_producer_seq_key(4, &k), None);
        // Every key of "p" is inside its range; "p-1" and "q" are not.
        let (start, end) = (producer_seq_prefix(3, "p"), producer_seq_end(3, "p"));
        for seq in [0, 1, u64::MAX] {
            let k = producer_seq_key(3, "p", seq);
            assert!(start <= k && k < end);
        }
        for other in [producer_seq_key(3, "p-1", 0), producer_seq_key(3, "q", 0)] {
            assert!(!(start <= other && other < end));
        }
        assert!(producer_seq_key(3, "p", u64::MAX).as_slice() < group_end(3).as_slice());
    }
}
