//! Keys as stored. A session is its user's (`core::SessionKey`), so the
//! `sessions` key is the session id, a 0xFF byte (never part of UTF-8 text,
//! so one id's entries are exactly one key prefix) and the user id as 8
//! big-endian bytes: `GET /v1/sessions/{id}` finds a session by its id alone
//! with a prefix scan, and every key names the user, hence the partition,
//! it belongs to.

use cartscore_core::SessionKey;
use cartscore_core::validate::MAX_SESSION_BYTES;

const SEPARATOR: u8 = 0xFF;
const MAX_SESSION_KEY: usize = MAX_SESSION_BYTES + 1 + 8;

/// A `sessions` key on the stack: built on every score.
pub(crate) struct SessionKeyBytes {
    buf: [u8; MAX_SESSION_KEY],
    len: usize,
}

impl SessionKeyBytes {
    /// None for a session id longer than any valid event carries (it cannot
    /// be stored, and LMDB refuses over-long keys).
    pub(crate) fn new(key: SessionKey<'_>) -> Option<Self> {
        let id = key.user_session.as_bytes();
        if id.len() > MAX_SESSION_BYTES {
            return None;
        }
        let mut buf = [0u8; MAX_SESSION_KEY];
        buf[..id.len()].copy_from_slice(id);
        buf[id.len()] = SEPARATOR;
        buf[id.len() + 1..id.len() + 9].copy_from_slice(&key.user_id.to_be_bytes());
        Some(Self {
            buf,
            len: id.len() + 9,
        })
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// The prefix every key of session `id` starts with.
pub(crate) fn session_prefix(id: &str) -> Vec<u8> {
    let mut prefix = Vec::with_capacity(id.len() + 1);
    prefix.extend_from_slice(id.as_bytes());
    prefix.push(SEPARATOR);
    prefix
}

/// The user a `sessions` key belongs to.
pub(crate) fn session_user(key: &[u8]) -> Option<u64> {
    let split = key.len().checked_sub(9)?;
    (key[split] == SEPARATOR).then(|| {
        let mut id = [0u8; 8];
        id.copy_from_slice(&key[split + 1..]);
        u64::from_be_bytes(id)
    })
}

/// The session id and user of a `sessions` key.
pub(crate) fn split_session_key(key: &[u8]) -> Option<(&str, u64)> {
    let user = session_user(key)?;
    let id = std::str::from_utf8(&key[..key.len() - 9]).ok()?;
    Some((id, user))
}

/// A `sessions` key as text, for errors and logs: `session@user`.
pub(crate) fn describe_session_key(key: &[u8]) -> String {
    match session_user(key) {
        Some(user) => format!("{}@{user}", String::from_utf8_lossy(&key[..key.len() - 9])),
        None => String::from_utf8_lossy(key).into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_key_names_its_user_and_only_its_id_has_its_prefix() {
        let key = SessionKey {
            user_id: 555_463_292,
            user_session: "2759bd71",
        };
        let bytes = SessionKeyBytes::new(key).unwrap();
        assert_eq!(session_user(bytes.as_bytes()), Some(555_463_292));
        assert_eq!(describe_session_key(bytes.as_bytes()), "2759bd71@555463292");
        assert!(bytes.as_bytes().starts_with(&session_prefix("2759bd71")));
        assert!(!bytes.as_bytes().starts_with(&session_prefix("2759bd7")));
        let long = "x".repeat(MAX_SESSION_BYTES + 1);
        assert!(
            SessionKeyBytes::new(SessionKey {
                user_id: 1,
                user_session: &long
            })
            .is_none()
        );
        let longest = "x".repeat(MAX_SESSION_BYTES);
        let key = SessionKeyBytes::new(SessionKey {
            user_id: u64::MAX,
            user_session: &longest,
        })
        .unwrap();
        assert_eq!(session_user(key.as_bytes()), Some(u64::MAX));
    }
}
