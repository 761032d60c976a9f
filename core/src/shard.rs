//! The stream's key policy: every event is keyed by its `user_id` (decimal
//! text), so a user's sessions and history share one partition, and shards
//! that divide the partitions each hold whole users. A session belongs to
//! its user: the same `user_session` id under another `user_id` is another
//! session (see [`crate::state`]), which keeps every piece of state on one
//! partition.
//!
//! The partition of a key is Kafka's default (the Java client's `murmur2`,
//! librdkafka's `murmur2_random` for keyed records), so producers in any
//! language, the appliance and the scoring client agree on it.

/// Most bytes of a stream key: a `u64` in decimal.
pub const MAX_KEY_LEN: usize = 20;

/// The record key for a user's events.
pub fn stream_key(user_id: u64) -> StreamKey {
    let mut buf = [0u8; MAX_KEY_LEN];
    let mut n = user_id;
    let mut start = MAX_KEY_LEN;
    loop {
        start -= 1;
        buf[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    StreamKey { buf, start }
}

/// A stream key without an allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamKey {
    buf: [u8; MAX_KEY_LEN],
    start: usize,
}

impl StreamKey {
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[self.start..]
    }
}

/// Why a record's key does not follow the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyMismatch {
    /// The record has no key: the producer's partitioner chose at random.
    Missing,
    /// The key is not the event's `user_id` (a session key, for example).
    Other,
}

impl KeyMismatch {
    pub const ALL: [Self; 2] = [Self::Missing, Self::Other];

    pub fn label(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Other => "not_user_id",
        }
    }
}

/// Checks a consumed record's key against the policy for its event.
pub fn check_key(key: Option<&[u8]>, user_id: u64) -> Result<(), KeyMismatch> {
    match key {
        None => Err(KeyMismatch::Missing),
        Some(key) if key == stream_key(user_id).as_bytes() => Ok(()),
        Some(_) => Err(KeyMismatch::Other),
    }
}

/// Kafka's murmur2 (the Java client's `Utils.murmur2`, seed 0x9747b28c).
pub fn murmur2(data: &[u8]) -> u32 {
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if tail.len() >= 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if let Some(&first) = tail.first() {
        h ^= u32::from(first);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

/// The partition Kafka's default partitioner picks for `key` among
/// `partitions` (`toPositive(murmur2(key)) % partitions`).
pub fn partition_of_key(key: &[u8], partitions: u32) -> u32 {
    (murmur2(key) & 0x7fff_ffff) % partitions.max(1)
}

/// The partition that holds `user_id`'s events and state.
pub fn partition_of_user(user_id: u64, partitions: u32) -> u32 {
    partition_of_key(stream_key(user_id).as_bytes(), partitions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn murmur2_matches_the_java_client() {
        // Kafka's own test vectors (clients/src/test/.../UtilsTest.java).
        let cases: [(&str, i32); 6] = [
            ("21", -973_932_308),
            ("foobar", -790_332_482),
            ("a-little-bit-long-string", -985_981_536),
            ("a-little-bit-longer-string", -1_486_304_829),
            (
                "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            ("abc", 479_470_107),
        ];
        for (text, expected) in cases {
            assert_eq!(murmur2(text.as_bytes()) as i32, expected, "{text}");
        }
    }

    #[test]
    fn the_key_is_the_decimal_user_id() {
        assert_eq!(stream_key(0).as_bytes(), b"0");
        assert_eq!(stream_key(555_463_292).as_bytes(), b"555463292");
        assert_eq!(
            stream_key(u64::MAX).as_bytes(),
            u64::MAX.to_string().as_bytes()
        );
        assert_eq!(check_key(Some(b"555463292"), 555_463_292), Ok(()));
        assert_eq!(check_key(None, 1), Err(KeyMismatch::Missing));
        assert_eq!(
            check_key(Some(b"2759bd71-1333"), 1),
            Err(KeyMismatch::Other)
        );
    }

    proptest! {
        #[test]
        fn stream_keys_are_to_string(user in any::<u64>(), partitions in 1u32..64) {
            let (key, text) = (stream_key(user), user.to_string());
            prop_assert_eq!(key.as_bytes(), text.as_bytes());
            prop_assert!(partition_of_user(user, partitions) < partitions);
        }
    }
}
