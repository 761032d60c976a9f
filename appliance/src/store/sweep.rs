//! Garbage collection and inspection: the sweep that deletes state idle
//! past its expiry at the event-time watermark, a slice per transaction, the
//! store's statistics, and a digest of its live state.

use std::ops::Bound;

use heed::RoTxn;
use heed::types::Bytes;

use heed::Database;

use super::codec::{LastEvent, session_last_event, user_last_event};
use super::db::{Store, SweepCursor};
use super::error::StoreError;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepOutcome {
    pub sessions: usize,
    pub users: usize,
    /// The pass over the store is not finished; call again.
    pub more: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct StoreStats {
    pub sessions: u64,
    pub users: u64,
    pub used_bytes: u64,
    pub map_size_bytes: u64,
    pub watermark_micros: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StoreDigest {
    pub live_sessions: u64,
    pub live_users: u64,
    pub watermark_micros: i64,
    pub blake3: String,
}

/// Keys found stale in one sweep slice, and the last key examined when the
/// database goes on.
type SweepSlice = (Vec<Vec<u8>>, Option<Vec<u8>>);

impl Store {
    /// One step of the garbage-collection pass: examines the next
    /// `sweep_batch` sessions and users in key order and deletes those idle
    /// past their expiry at the event-time watermark. `more` says the pass
    /// has not reached the end of both databases yet.
    pub fn sweep(&self) -> Result<SweepOutcome, StoreError> {
        let mut cursor = self
            .sweep_cursor
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut wtxn = self.env.write_txn().map_err(self.err("write_txn"))?;
        let watermark = self.watermark(&wtxn)?;
        if watermark == i64::MIN {
            return Ok(SweepOutcome::default());
        }
        let limit = self.expiry.sweep_batch;
        let sessions = self.sessions.remap_key_type::<Bytes>();
        let (stale_sessions, session_next) = self.scan_stale(
            &wtxn,
            sessions,
            cursor.session.as_deref(),
            watermark - self.expiry.session_micros,
            limit,
            session_last_event,
        )?;
        let users = self.users.remap_key_type::<Bytes>();
        let (stale_users, user_next) = self.scan_stale(
            &wtxn,
            users,
            cursor.user.as_deref(),
            watermark - self.expiry.user_micros,
            limit,
            user_last_event,
        )?;
        for key in &stale_sessions {
            sessions
                .delete(&mut wtxn, key)
                .map_err(self.err("delete session"))?;
        }
        for key in &stale_users {
            users
                .delete(&mut wtxn, key)
                .map_err(self.err("delete user"))?;
        }
        wtxn.commit().map_err(self.err("commit sweep"))?;
        let more = session_next.is_some() || user_next.is_some();
        // A finished pass starts over from the first key next time.
        *cursor = if more {
            SweepCursor {
                session: session_next,
                user: user_next,
            }
        } else {
            SweepCursor::default()
        };
        Ok(SweepOutcome {
            sessions: stale_sessions.len(),
            users: stale_users.len(),
            more,
        })
    }

    /// Keys idle past `horizon_micros` among the `limit` entries after
    /// `after`, and the last key examined when the database goes on.
    fn scan_stale(
        &self,
        txn: &RoTxn,
        db: Database<'static, Bytes, Bytes>,
        after: Option<&[u8]>,
        horizon_micros: i64,
        limit: usize,
        last_event_micros: LastEvent,
    ) -> Result<SweepSlice, StoreError> {
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut stale = Vec::new();
        let mut examined = 0;
        for entry in db
            .range(txn, &(start, Bound::Unbounded))
            .map_err(self.err("iterate for sweep"))?
        {
            let (key, bytes) = entry.map_err(self.err("iterate for sweep"))?;
            if last_event_micros(key, bytes)? < horizon_micros {
                stale.push(key.to_vec());
            }
            examined += 1;
            if examined == limit {
                return Ok((stale, Some(key.to_vec())));
            }
        }
        Ok((stale, None))
    }

    pub fn stats(&self) -> Result<StoreStats, StoreError> {
        let txn = self.env.read_txn().map_err(self.err("read_txn"))?;
        let info = self.env.info();
        let page_size = u64::from(self.env.unnamed_database_stat().page_size);
        Ok(StoreStats {
            sessions: self
                .sessions
                .len(&txn)
                .map_err(self.err("count sessions"))?,
            users: self.users.len(&txn).map_err(self.err("count users"))?,
            used_bytes: (info.last_page_number as u64 + 1) * page_size,
            map_size_bytes: info.map_size as u64,
            watermark_micros: self.watermark(&txn)?,
        })
    }

    /// A BLAKE3 digest of every live session and user (key and archived
    /// value, in key order), with their counts. Entries idle past expiry at
    /// the watermark are left out: whether the sweeper has removed them yet
    /// depends on timing, and no read sees them.
    pub fn digest(&self) -> Result<StoreDigest, StoreError> {
        let txn = self.env.read_txn().map_err(self.err("read_txn"))?;
        let watermark = self.watermark(&txn)?;
        let mut hasher = blake3::Hasher::new();
        let mut hash_live = |db: Database<'static, Bytes, Bytes>,
                             horizon: i64,
                             last_event: LastEvent|
         -> Result<u64, StoreError> {
            let mut live = 0;
            for entry in db.iter(&txn).map_err(self.err("iterate for digest"))? {
                let (key, bytes) = entry.map_err(self.err("iterate for digest"))?;
                if last_event(key, bytes)? < horizon {
                    continue;
                }
                for part in [key, bytes] {
                    hasher.update(&(part.len() as u64).to_le_bytes());
                    hasher.update(part);
                }
                live += 1;
            }
            Ok(live)
        };
        let sessions = hash_live(
            self.sessions.remap_key_type::<Bytes>(),
            watermark.saturating_sub(self.expiry.session_micros),
            session_last_event,
        )?;
        let users = hash_live(
            self.users.remap_key_type::<Bytes>(),
            watermark.saturating_sub(self.expiry.user_micros),
            user_last_event,
        )?;
        Ok(StoreDigest {
            live_sessions: sessions,
            live_users: users,
            watermark_micros: watermark,
            blake3: hasher.finalize().to_hex().to_string(),
        })
    }
}
