//! Garbage collection and inspection: the sweep that deletes state idle
//! past its expiry at the event-time watermark, a slice per transaction, the
//! store's statistics, and a digest of its live state.

use std::collections::BTreeSet;
use std::ops::Bound;

use cartscore_core::shard::partition_of_user;

use heed::RoTxn;
use heed::types::Bytes;

use heed::Database;

use super::codec::{LastEvent, session_last_event, user_last_event};
use super::db::{Store, SweepCursor};
use super::error::StoreError;
use super::keys::session_user;
use super::offsets::StreamOffset;
use super::outcomes::{ArchivedStoredRecord, Outcome, StoredRecord, corrupt, split_record_key};
use rkyv::rancor;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct SweepOutcome {
    pub sessions: usize,
    pub users: usize,
    /// The pass over the store is not finished; call again.
    pub more: bool,
    /// Scored carts whose session ended without their purchase.
    pub outcomes: Vec<Outcome>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct StoreStats {
    pub sessions: u64,
    pub users: u64,
    pub used_bytes: u64,
    pub map_size_bytes: u64,
    pub watermark_micros: i64,
}

/// What a store holds, as numbers two stores can be compared by: the live
/// entries of each database and, for each, the sum (mod 2^128) of one
/// BLAKE3 hash per entry over its key and value. A sum does not depend on
/// order, and the digests of shards that hold disjoint parts of the state
/// add up to the digest of one store holding all of it ([`Self::merge`]);
/// an entry held twice shows in the counts.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoreDigest {
    pub live_sessions: u64,
    pub live_users: u64,
    pub watermark_micros: i64,
    /// 32 hex digits each.
    pub sessions_sum: String,
    pub users_sum: String,
}

impl StoreDigest {
    /// The digest of the union of two stores with disjoint contents.
    pub fn merge(&self, other: &Self) -> Option<Self> {
        let add = |a: &str, b: &str| -> Option<String> {
            let a = u128::from_str_radix(a, 16).ok()?;
            let b = u128::from_str_radix(b, 16).ok()?;
            Some(format!("{:032x}", a.wrapping_add(b)))
        };
        Some(Self {
            live_sessions: self.live_sessions + other.live_sessions,
            live_users: self.live_users + other.live_users,
            watermark_micros: self.watermark_micros.max(other.watermark_micros),
            sessions_sum: add(&self.sessions_sum, &other.sessions_sum)?,
            users_sum: add(&self.users_sum, &other.users_sum)?,
        })
    }
}

/// What a shard dropped when partitions moved away from it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PurgeOutcome {
    pub sessions: usize,
    pub users: usize,
    pub offsets: usize,
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
        let sessions = self.sessions;
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
        let (outcomes, record_next) =
            self.sweep_records(&mut wtxn, cursor.record.as_deref(), watermark, limit)?;
        wtxn.commit().map_err(self.err("commit sweep"))?;
        let more = session_next.is_some() || user_next.is_some() || record_next.is_some();
        // A finished pass starts over from the first key next time.
        *cursor = if more {
            SweepCursor {
                session: session_next,
                user: user_next,
                record: record_next,
            }
        } else {
            SweepCursor::default()
        };
        Ok(SweepOutcome {
            sessions: stale_sessions.len(),
            users: stale_users.len(),
            more,
            outcomes,
        })
    }

    /// The records' part of a sweep step: a record whose session is over at
    /// the watermark (gone, or idle past its expiry and the allowed
    /// lateness, so no purchase can still count) resolves negative; a
    /// resolved one older than `store.scored_record_max_age_secs` goes.
    fn sweep_records(
        &self,
        txn: &mut heed::RwTxn,
        after: Option<&[u8]>,
        watermark: i64,
        limit: usize,
    ) -> Result<(Vec<Outcome>, Option<Vec<u8>>), StoreError> {
        let horizon = watermark - self.expiry.session_micros;
        let age_horizon = watermark.saturating_sub(self.outcome_limits.record_max_age_micros);
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut expired = Vec::new();
        let mut old = Vec::new();
        let mut next = None;
        let mut examined = 0;
        for entry in self
            .scored
            .range(txn, &(start, Bound::Unbounded))
            .map_err(self.err("iterate for sweep"))?
        {
            let (key, bytes) = entry.map_err(self.err("iterate for sweep"))?;
            examined += 1;
            if examined == limit {
                next = Some(key.to_vec());
            }
            let Some((session, _, cart_time)) = split_record_key(key) else {
                continue;
            };
            let record = rkyv::access::<ArchivedStoredRecord, rancor::Error>(bytes)
                .map_err(|e| corrupt(key, e))?;
            if record.resolved {
                if cart_time < age_horizon {
                    old.push(key.to_vec());
                }
            } else {
                let last = match self
                    .sessions
                    .get(txn, session)
                    .map_err(self.err("get session"))?
                {
                    Some(bytes) => session_last_event(session, bytes)?,
                    None => i64::MIN,
                };
                if cart_time.max(last) < horizon {
                    let record = rkyv::deserialize::<StoredRecord, rancor::Error>(record)
                        .map_err(|e| corrupt(key, e))?;
                    expired.push((key.to_vec(), record));
                }
            }
            if next.is_some() {
                break;
            }
        }
        let mut resolver = self.resolver(txn)?;
        for (key, record) in expired {
            self.resolve(txn, &mut resolver, &key, record, false, watermark)?;
        }
        self.finish_resolver(txn, &resolver)?;
        for key in old {
            self.scored
                .delete(txn, &key)
                .map_err(self.err("delete scored"))?;
        }
        Ok((resolver.resolved, next))
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

    /// Deletes, in one transaction, every session, user, scored cart and
    /// stream offset of a partition number not in `owned` (users are placed by
    /// `cartscore_core::shard::partition_of_user` among `partitions`): a
    /// shard keeps only what it is assigned, so every user is held by
    /// exactly one shard, and a partition that comes back is replayed from
    /// its start instead of resuming over a gap.
    pub fn purge_unowned(
        &self,
        partitions: u32,
        owned: &BTreeSet<u32>,
    ) -> Result<PurgeOutcome, StoreError> {
        let moved = |user: Option<u64>| {
            user.is_some_and(|user| !owned.contains(&partition_of_user(user, partitions)))
        };
        let mut wtxn = self.env.write_txn().map_err(self.err("write_txn"))?;
        let mut outcome = PurgeOutcome {
            sessions: self
                .delete_where(&mut wtxn, self.sessions, |key| moved(session_user(key)))?,
            users: self.delete_where(&mut wtxn, self.users.remap_key_type::<Bytes>(), |key| {
                moved(key.try_into().ok().map(u64::from_be_bytes))
            })?,
            offsets: 0,
        };
        // Their scored carts too: the stream that decides them now reaches
        // another shard, and here the sweep would call them negative.
        self.delete_where(&mut wtxn, self.scored, |key| {
            moved(split_record_key(key).and_then(|(session, _, _)| session_user(session)))
        })?;
        let mut offsets = Vec::new();
        for entry in self
            .offsets
            .iter(&wtxn)
            .map_err(self.err("iterate for purge"))?
        {
            let (key, next) = entry.map_err(self.err("iterate for purge"))?;
            if let Some(offset) = StreamOffset::from_entry(key, next)
                && !u32::try_from(offset.partition).is_ok_and(|p| owned.contains(&p))
            {
                offsets.push(key.to_owned());
            }
        }
        outcome.offsets = offsets.len();
        for key in offsets {
            self.offsets
                .delete(&mut wtxn, &key)
                .map_err(self.err("delete offset"))?;
        }
        wtxn.commit().map_err(self.err("commit"))?;
        Ok(outcome)
    }

    /// Deletes the entries of `db` whose key `doomed` picks; how many.
    fn delete_where(
        &self,
        wtxn: &mut heed::RwTxn,
        db: Database<'static, Bytes, Bytes>,
        doomed: impl Fn(&[u8]) -> bool,
    ) -> Result<usize, StoreError> {
        let mut keys = Vec::new();
        for entry in db.iter(wtxn).map_err(self.err("iterate for purge"))? {
            let (key, _) = entry.map_err(self.err("iterate for purge"))?;
            if doomed(key) {
                keys.push(key.to_vec());
            }
        }
        for key in &keys {
            db.delete(wtxn, key).map_err(self.err("delete for purge"))?;
        }
        Ok(keys.len())
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

    /// The digest of every live session and user (see [`StoreDigest`]).
    /// Entries idle past expiry at the watermark are left out: whether the
    /// sweeper has removed them yet depends on timing, and no read sees them.
    pub fn digest(&self) -> Result<StoreDigest, StoreError> {
        self.digest_at(None)
    }

    /// [`Self::digest`] as of event time `as_of` (µs) instead of the
    /// store's own watermark.
    pub fn digest_at(&self, as_of: Option<i64>) -> Result<StoreDigest, StoreError> {
        let txn = self.env.read_txn().map_err(self.err("read_txn"))?;
        let watermark = match as_of {
            Some(at) => at,
            None => self.watermark(&txn)?,
        };
        let hash_live = |db: Database<'static, Bytes, Bytes>,
                         horizon: i64,
                         last_event: LastEvent|
         -> Result<(u64, u128), StoreError> {
            let (mut live, mut sum) = (0, 0u128);
            for entry in db.iter(&txn).map_err(self.err("iterate for digest"))? {
                let (key, bytes) = entry.map_err(self.err("iterate for digest"))?;
                if last_event(key, bytes)? < horizon {
                    continue;
                }
                let mut hasher = blake3::Hasher::new();
                for part in [key, bytes] {
                    hasher.update(&(part.len() as u64).to_le_bytes());
                    hasher.update(part);
                }
                let hash = hasher.finalize();
                let mut low = [0u8; 16];
                low.copy_from_slice(&hash.as_bytes()[..16]);
                sum = sum.wrapping_add(u128::from_le_bytes(low));
                live += 1;
            }
            Ok((live, sum))
        };
        let (sessions, sessions_sum) = hash_live(
            self.sessions,
            watermark.saturating_sub(self.expiry.session_micros),
            session_last_event,
        )?;
        let (users, users_sum) = hash_live(
            self.users.remap_key_type::<Bytes>(),
            watermark.saturating_sub(self.expiry.user_micros),
            user_last_event,
        )?;
        Ok(StoreDigest {
            live_sessions: sessions,
            live_users: users,
            watermark_micros: watermark,
            sessions_sum: format!("{sessions_sum:032x}"),
            users_sum: format!("{users_sum:032x}"),
        })
    }
}
