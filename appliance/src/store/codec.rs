//! Values as stored: rkyv archives written through reused buffers and read
//! in place, checked on every read.

use cartscore_core::state::{ArchivedSessionState, ArchivedUserState};
use rkyv::rancor;
use rkyv::ser::allocator::Arena;
use rkyv::util::AlignedVec;

use super::error::StoreError;
use super::keys::describe_session_key;

/// Serialises into reused buffers: the writer archives every touched state
/// of every batch, and fresh allocations per value showed in the profile.
#[derive(Default)]
pub(super) struct Archiver {
    bytes: AlignedVec,
    arena: Arena,
}

impl Archiver {
    pub(super) fn archive<T>(&mut self, value: &T, what: &'static str) -> Result<&[u8], StoreError>
    where
        T: for<'a> rkyv::Serialize<
                rkyv::api::high::HighSerializer<
                    AlignedVec,
                    rkyv::ser::allocator::ArenaHandle<'a>,
                    rancor::Error,
                >,
            >,
    {
        let mut bytes = std::mem::take(&mut self.bytes);
        bytes.clear();
        self.bytes = rkyv::api::high::to_bytes_in_with_alloc(value, bytes, self.arena.acquire())
            .map_err(|source| StoreError::Encode { what, source })?;
        Ok(&self.bytes)
    }
}

pub(super) fn read_session<'a>(
    bytes: &'a [u8],
    key: &[u8],
) -> Result<&'a ArchivedSessionState, StoreError> {
    rkyv::access::<ArchivedSessionState, rancor::Error>(bytes).map_err(|source| {
        StoreError::Corrupt {
            database: "sessions",
            key: describe_session_key(key),
            source,
        }
    })
}

pub(super) fn read_user(bytes: &[u8], key: u64) -> Result<&ArchivedUserState, StoreError> {
    rkyv::access::<ArchivedUserState, rancor::Error>(bytes).map_err(|source| StoreError::Corrupt {
        database: "users",
        key: key.to_string(),
        source,
    })
}

/// Reads the last event time (µs) of a raw database entry.
pub(super) type LastEvent = fn(&[u8], &[u8]) -> Result<i64, StoreError>;

/// Last event time (µs) of a raw `sessions` entry.
pub(super) fn session_last_event(key: &[u8], bytes: &[u8]) -> Result<i64, StoreError> {
    Ok(read_session(bytes, key)?.last_event_at.get().micros())
}

/// Last event time (µs) of a raw `users` entry.
pub(super) fn user_last_event(key: &[u8], bytes: &[u8]) -> Result<i64, StoreError> {
    let id = key.try_into().map(u64::from_be_bytes).unwrap_or_default();
    Ok(read_user(bytes, id)?.last_event_at.get().micros())
}
