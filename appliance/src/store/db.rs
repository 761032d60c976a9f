//! The LMDB environment: open, apply a batch of events with the offsets it
//! consumed in one write transaction, and read snapshots.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use cartscore_core::state::{ArchivedSessionState, ArchivedUserState, apply};
use cartscore_core::{Event, SessionKey};
use cartscore_core::{SessionState, Timestamp, UserState};
use heed::byteorder::BigEndian;
use heed::types::{Bytes, I64, Str, U64};
use heed::{CommitOrAbort, Database, Env, EnvOpenOptions, RoTxn, WithoutTls};
use rkyv::rancor;

use super::codec::{Archiver, read_session, read_user};
use super::error::{StoreError, lmdb};
use super::keys::{SessionKeyBytes, describe_session_key, session_prefix};
use super::log::LogPositions;
use super::offsets::StreamOffset;
use super::outcomes::{CartRecord, Outcome, OutcomesDb, ScoredDb};
use crate::config::StoreConfig;

const MIB: u64 = 1024 * 1024;
const WATERMARK: &str = "watermark";

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AppliedBatch {
    pub events: usize,
    pub sessions_written: usize,
    pub users_written: usize,
    /// Scored-cart records stored, and refused (the store holds its most).
    pub records_stored: usize,
    pub records_refused: usize,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Expiry {
    pub(super) session_micros: i64,
    pub(super) user_micros: i64,
    pub(super) sweep_batch: usize,
}

pub struct Store {
    pub(super) env: Env<WithoutTls>,
    path: PathBuf,
    map_size_mib: u64,
    pub(super) expiry: Expiry,
    pub(super) sessions: Database<'static, Bytes, Bytes>,
    pub(super) users: Database<'static, U64<BigEndian>, Bytes>,
    /// Where the sweep pass stands in each database (last key examined).
    pub(super) sweep_cursor: Mutex<SweepCursor>,
    pub(super) offsets: Database<'static, Str, I64<BigEndian>>,
    pub(super) meta: Database<'static, Str, I64<BigEndian>>,
    /// Scored carts and their resolved outcomes (see [`super::outcomes`]).
    pub(super) scored: ScoredDb,
    pub(super) outcomes: OutcomesDb,
    pub(super) outcome_limits: OutcomeLimits,
    /// The prediction log's outbox (see [`super::log`]).
    pub(super) predictions: OutcomesDb,
    pub(super) log_predictions: bool,
}

/// How much of the closed loop the store keeps.
#[derive(Debug, Clone, Copy)]
pub(super) struct OutcomeLimits {
    /// Most scored-cart records held (resolved or not); more are refused.
    pub(super) max_records: u64,
    /// Most resolved outcomes kept; the oldest go first.
    pub(super) max_outcomes: usize,
    /// Resolved records older than this (event time, µs) are deleted.
    pub(super) record_max_age_micros: i64,
}

#[derive(Debug, Default)]
pub(super) struct SweepCursor {
    pub(super) session: Option<Vec<u8>>,
    pub(super) user: Option<Vec<u8>>,
    pub(super) record: Option<Vec<u8>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

impl Store {
    /// Opens (or creates) the store to serve from: the whole map is
    /// reserved on disk (see [`reserve`]).
    pub fn open(config: &StoreConfig) -> Result<Self, StoreError> {
        let store = Self::open_with(config)?;
        reserve(&store.path, store.map_size_mib)?;
        Ok(store)
    }

    /// Opens an existing store beside the process that serves it (`cartscore
    /// inspect`): with the map as large as its file, whatever the
    /// configuration says, so that the serving process's map is not resized
    /// under it, and nothing reserved.
    pub fn open_existing(config: &StoreConfig) -> Result<Self, StoreError> {
        let data = config.path.join("data.mdb");
        let size = std::fs::metadata(&data).map_err(|source| StoreError::Open {
            path: config.path.clone(),
            source: heed::Error::Io(source),
        })?;
        let mib = size.len().div_ceil(MIB).max(1);
        let config = StoreConfig {
            map_size_mib: std::num::NonZeroU64::new(mib).unwrap_or(std::num::NonZeroU64::MIN),
            ..config.clone()
        };
        Self::open_with(&config)
    }

    fn open_with(config: &StoreConfig) -> Result<Self, StoreError> {
        let path = config.path.clone();
        let open_error = |source| StoreError::Open {
            path: path.clone(),
            source,
        };
        refuse_foreign_folder(&path)?;
        std::fs::create_dir_all(&path).map_err(|e| open_error(heed::Error::Io(e)))?;
        let mut options = EnvOpenOptions::new().read_txn_without_tls();
        options
            .map_size((config.map_size_mib.get() * MIB) as usize)
            .max_dbs(8)
            .max_readers(1024);
        // WRITE_MAP: dirty pages are written in the map instead of being
        // copied from malloc'd buffers at commit, which doubled ingest
        // throughput. NO_SYNC only drops the fsync at commit; LMDB stays
        // consistent after a process crash either way.
        let mut flags = heed::EnvFlags::WRITE_MAP;
        if !config.sync {
            flags |= heed::EnvFlags::NO_SYNC;
        }
        // SAFETY: with WRITE_MAP a stray write through a pointer into the map
        // could corrupt the store; values are only ever written through
        // LMDB's put, and readers get shared slices.
        #[allow(unsafe_code)]
        unsafe {
            options.flags(flags);
        }
        // SAFETY: LMDB forbids opening the same environment twice in one
        // process; the appliance opens its store exactly once, at start-up.
        #[allow(unsafe_code)]
        let env = unsafe { options.open(&path) }.map_err(open_error)?;
        let wtxn = env.write_txn().map_err(open_error)?;
        let (sessions, users, offsets, meta, scored, outcomes, predictions) = env
            .create_databases_and_commit(wtxn, |opener, wtxn| -> heed::Result<_> {
                Ok(CommitOrAbort::<_, ()>::Commit((
                    opener.create_database::<Bytes, Bytes>(wtxn, Some("sessions"))?,
                    opener.create_database::<U64<BigEndian>, Bytes>(wtxn, Some("users"))?,
                    opener.create_database::<Str, I64<BigEndian>>(wtxn, Some("offsets"))?,
                    opener.create_database::<Str, I64<BigEndian>>(wtxn, Some("meta"))?,
                    opener.create_database::<Bytes, Bytes>(wtxn, Some("scored"))?,
                    opener.create_database::<U64<BigEndian>, Bytes>(wtxn, Some("outcomes"))?,
                    opener.create_database::<U64<BigEndian>, Bytes>(wtxn, Some("predictions"))?,
                )))
            })
            .map_err(open_error)?
            .unwrap_commit();
        let store = Self {
            env,
            path,
            map_size_mib: config.map_size_mib.get(),
            expiry: Expiry {
                session_micros: (config.session_idle_expiry_secs + config.allowed_lateness_secs)
                    as i64
                    * 1_000_000,
                user_micros: (config.user_idle_expiry_secs + config.allowed_lateness_secs) as i64
                    * 1_000_000,
                sweep_batch: config.sweep_batch.get(),
            },
            sessions,
            users,
            sweep_cursor: Mutex::default(),
            offsets,
            meta,
            scored,
            outcomes,
            outcome_limits: OutcomeLimits {
                max_records: config.max_scored_records.get() as u64,
                max_outcomes: config.max_outcomes.get(),
                record_max_age_micros: (config.scored_record_max_age_secs as i64)
                    .saturating_mul(1_000_000),
            },
            predictions,
            log_predictions: false,
        };
        // A store of a layout this build cannot read is refused (its stream
        // offsets would resume past events whose state it cannot read).
        store.check_layout()?;
        Ok(store)
    }

    /// Keeps every new scored-cart record in the prediction log's outbox
    /// too (with a Kafka prediction log).
    #[must_use]
    pub fn with_prediction_log(mut self, enabled: bool) -> Self {
        self.log_predictions = enabled;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(super) fn err(&self, operation: &'static str) -> impl Fn(heed::Error) -> StoreError {
        lmdb(operation, self.map_size_mib)
    }

    /// A consistent snapshot for reads; cheap, and never blocks the writer.
    /// Keep it short-lived: an open snapshot pins the pages it sees.
    pub fn reader(&self) -> Result<StoreReader<'_>, StoreError> {
        Ok(StoreReader {
            store: self,
            txn: self.env.read_txn().map_err(self.err("read_txn"))?,
        })
    }

    pub(super) fn watermark(&self, txn: &RoTxn) -> Result<i64, StoreError> {
        Ok(self
            .meta
            .get(txn, WATERMARK)
            .map_err(self.err("get watermark"))?
            .unwrap_or(i64::MIN))
    }

    /// Applies `events` in order and records `offsets`, all in one write
    /// transaction: either everything is stored or nothing is.
    /// Takes iterators so the writer can apply several queued batches as one
    /// without copying their events.
    pub fn apply<'a>(
        &self,
        events: impl IntoIterator<Item = &'a Event>,
        offsets: impl IntoIterator<Item = &'a StreamOffset>,
    ) -> Result<AppliedBatch, StoreError> {
        self.apply_with(events, offsets, &[], None)
            .map(|(applied, _)| applied)
    }

    /// [`Store::apply`], storing `records` (scored carts) first and
    /// resolving the records the events decide, in the same transaction,
    /// with the prediction log's `delivered` positions; returns the
    /// outcomes it resolved.
    pub fn apply_with<'a>(
        &self,
        events: impl IntoIterator<Item = &'a Event>,
        offsets: impl IntoIterator<Item = &'a StreamOffset>,
        records: &[CartRecord],
        delivered: Option<LogPositions>,
    ) -> Result<(AppliedBatch, Vec<Outcome>), StoreError> {
        let mut wtxn = self.env.write_txn().map_err(self.err("write_txn"))?;
        if let Some(delivered) = delivered {
            self.put_log_delivered(&mut wtxn, delivered)?;
        }
        let mut watermark = self.watermark(&wtxn)?;
        let mut archiver = Archiver::default();
        let (records_stored, records_refused, held) =
            self.put_records(&mut wtxn, records, &mut archiver)?;
        // No record, nothing to resolve: ingest pays one stat read.
        let resolving = held > 0;
        let mut resolver = self.resolver(&wtxn)?;
        // Each touched state is decoded once, updated in memory for the whole
        // batch and written back once.
        let mut sessions: HashMap<SessionKey<'a>, SessionState> = HashMap::new();
        let mut users: HashMap<u64, UserState> = HashMap::new();
        let mut applied_events = 0;
        for event in events {
            applied_events += 1;
            let session = match sessions.entry(SessionKey::of(event)) {
                Entry::Occupied(slot) => slot.into_mut(),
                Entry::Vacant(slot) => {
                    let loaded = self.load_session(&wtxn, *slot.key())?;
                    slot.insert(loaded.unwrap_or_default())
                }
            };
            let user = match users.entry(event.user_id) {
                Entry::Occupied(slot) => slot.into_mut(),
                Entry::Vacant(slot) => {
                    slot.insert(self.load_user(&wtxn, event.user_id)?.unwrap_or_default())
                }
            };
            if resolving && session.events > 0 {
                self.decide(&mut wtxn, &mut resolver, session, event)?;
            }
            apply(session, user, event);
            watermark = watermark.max(event.event_time.micros());
        }
        self.finish_resolver(&mut wtxn, &resolver)?;
        let applied = AppliedBatch {
            events: applied_events,
            sessions_written: sessions.len(),
            users_written: users.len(),
            records_stored,
            records_refused,
        };
        // In key order: consecutive puts then walk mostly the same B-tree
        // pages, which measured ~15% faster than hash order.
        let mut sessions: Vec<_> = sessions
            .into_iter()
            .filter_map(|(key, state)| Some((SessionKeyBytes::new(key)?, state)))
            .collect();
        sessions.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        let mut users: Vec<_> = users.into_iter().collect();
        users.sort_unstable_by_key(|u| u.0);
        for (key, state) in &sessions {
            let bytes = archiver.archive(state, "session state")?;
            self.sessions
                .put(&mut wtxn, key.as_bytes(), bytes)
                .map_err(self.err("put session"))?;
        }
        for (key, state) in &users {
            let bytes = archiver.archive(state, "user state")?;
            self.users
                .put(&mut wtxn, key, bytes)
                .map_err(self.err("put user"))?;
        }
        let mut offsets_written = 0;
        for offset in offsets {
            self.offsets
                .put(&mut wtxn, &offset.key(), &offset.next_offset)
                .map_err(self.err("put offset"))?;
            offsets_written += 1;
        }
        if watermark != i64::MIN {
            self.meta
                .put(&mut wtxn, WATERMARK, &watermark)
                .map_err(self.err("put watermark"))?;
        }
        // Nothing changed (carts scored again, say): no commit, no fsync.
        if applied_events == 0
            && offsets_written == 0
            && records_stored == 0
            && resolver.resolved.is_empty()
            && delivered.is_none()
        {
            wtxn.abort();
        } else {
            wtxn.commit().map_err(self.err("commit"))?;
        }
        Ok((applied, resolver.resolved))
    }

    /// The trainer's label, decided by `event` for the records of its
    /// session (before `event` is applied): a purchase in the live session
    /// makes its product's carts positive; an event that finds the session
    /// expired makes every earlier cart of it negative.
    fn decide(
        &self,
        txn: &mut heed::RwTxn,
        resolver: &mut super::outcomes::Resolver,
        session: &SessionState,
        event: &Event,
    ) -> Result<(), StoreError> {
        let at = event.event_time.micros();
        let live = session.is_live_at(event.event_time);
        if live && event.event_type != cartscore_core::EventType::Purchase {
            return Ok(());
        }
        let Some(key) = SessionKeyBytes::new(SessionKey::of(event)) else {
            return Ok(());
        };
        if live {
            let mut prefix = key.as_bytes().to_vec();
            prefix.extend_from_slice(&event.product_id.to_be_bytes());
            let from = session.started_at.micros();
            self.resolve_prefix(txn, resolver, &prefix, (from, at), true, at)
        } else {
            self.resolve_prefix(txn, resolver, key.as_bytes(), (i64::MIN, at - 1), false, at)
        }
    }

    /// Every recorded stream position.
    pub fn offsets(&self) -> Result<Vec<StreamOffset>, StoreError> {
        let txn = self.env.read_txn().map_err(self.err("read_txn"))?;
        let mut out = Vec::new();
        for entry in self
            .offsets
            .iter(&txn)
            .map_err(self.err("iterate offsets"))?
        {
            let (key, next_offset) = entry.map_err(self.err("iterate offsets"))?;
            out.extend(StreamOffset::from_entry(key, next_offset));
        }
        Ok(out)
    }

    fn load_session(
        &self,
        txn: &RoTxn,
        key: SessionKey<'_>,
    ) -> Result<Option<SessionState>, StoreError> {
        // Validation bounds session ids; an over-long one cannot be stored.
        let Some(key) = SessionKeyBytes::new(key) else {
            return Ok(None);
        };
        let Some(bytes) = self
            .sessions
            .get(txn, key.as_bytes())
            .map_err(self.err("get session"))?
        else {
            return Ok(None);
        };
        let archived = read_session(bytes, key.as_bytes())?;
        rkyv::deserialize::<SessionState, rancor::Error>(archived)
            .map(Some)
            .map_err(|source| StoreError::Corrupt {
                database: "sessions",
                key: describe_session_key(key.as_bytes()),
                source,
            })
    }

    fn load_user(&self, txn: &RoTxn, key: u64) -> Result<Option<UserState>, StoreError> {
        let Some(bytes) = self.users.get(txn, &key).map_err(self.err("get user"))? else {
            return Ok(None);
        };
        let archived = read_user(bytes, key)?;
        rkyv::deserialize::<UserState, rancor::Error>(archived)
            .map(Some)
            .map_err(|source| StoreError::Corrupt {
                database: "users",
                key: key.to_string(),
                source,
            })
    }
}

/// A read snapshot of the store.
pub struct StoreReader<'a> {
    store: &'a Store,
    txn: RoTxn<'a, WithoutTls>,
}

impl std::fmt::Debug for StoreReader<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreReader").finish_non_exhaustive()
    }
}

// Inlined into the scoring path: as a call of its own (the store and the
// scoring code sit in different codegen units) the full score measured ~5%
// slower in the in-process bench.
impl StoreReader<'_> {
    #[inline]
    pub fn session(
        &self,
        key: SessionKey<'_>,
    ) -> Result<Option<&ArchivedSessionState>, StoreError> {
        let Some(key) = SessionKeyBytes::new(key) else {
            return Ok(None);
        };
        self.store
            .sessions
            .get(&self.txn, key.as_bytes())
            .map_err(self.store.err("get session"))?
            .map(|bytes| read_session(bytes, key.as_bytes()))
            .transpose()
    }

    /// Every stored session with id `id`, whatever its user (the same id
    /// under two users is two sessions), in user order.
    pub fn sessions_with_id(
        &self,
        id: &str,
    ) -> Result<Vec<(u64, &ArchivedSessionState)>, StoreError> {
        let prefix = session_prefix(id);
        let mut found = Vec::new();
        for entry in self
            .store
            .sessions
            .prefix_iter(&self.txn, &prefix)
            .map_err(self.store.err("find session"))?
        {
            let (key, bytes) = entry.map_err(self.store.err("find session"))?;
            let Some(user) = super::keys::session_user(key) else {
                continue;
            };
            found.push((user, read_session(bytes, key)?));
        }
        Ok(found)
    }

    #[inline]
    pub fn user(&self, id: u64) -> Result<Option<&ArchivedUserState>, StoreError> {
        self.store
            .users
            .get(&self.txn, &id)
            .map_err(self.store.err("get user"))?
            .map(|bytes| read_user(bytes, id))
            .transpose()
    }

    /// Latest event time applied, if any event was.
    pub fn watermark(&self) -> Result<Option<Timestamp>, StoreError> {
        let w = self.store.watermark(&self.txn)?;
        Ok((w != i64::MIN).then_some(Timestamp(w)))
    }
}

/// A folder with files in it but no `data.mdb` is someone else's: LMDB
/// would add its files to it.
fn refuse_foreign_folder(path: &Path) -> Result<(), StoreError> {
    let Ok(entries) = std::fs::read_dir(path) else {
        // Missing (created next) or unreadable (LMDB says why).
        return Ok(());
    };
    let names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if names.is_empty() || names.iter().any(|n| n == "data.mdb") {
        return Ok(());
    }
    let mut found: Vec<&str> = names.iter().map(String::as_str).take(3).collect();
    found.sort_unstable();
    Err(StoreError::NotAStore {
        path: path.to_owned(),
        found: found.join(", ") + if names.len() > 3 { ", …" } else { "" },
    })
}

/// Allocates the whole map on disk. With `WRITE_MAP` LMDB writes pages
/// through the memory map into a sparse file, and a page the file system
/// cannot allocate (a full disk) is a SIGBUS, not an error: reserved, the
/// map's pages always have their blocks, so a full disk is found here, at
/// start, with a message, and never while serving.
fn reserve(path: &Path, map_size_mib: u64) -> Result<(), StoreError> {
    let data = path.join("data.mdb");
    let failed = |source| StoreError::Reserve {
        path: data.clone(),
        map_size_mib,
        source,
    };
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&data)
        .map_err(failed)?;
    let bytes = i64::try_from(map_size_mib * MIB).unwrap_or(i64::MAX);
    nix::fcntl::posix_fallocate(&file, 0, bytes).map_err(|errno| failed(errno.into()))
}

#[cfg(test)]
impl Store {
    pub(super) fn set_layout(&self, version: i64) -> Result<(), StoreError> {
        let mut wtxn = self.env.write_txn().map_err(self.err("write_txn"))?;
        self.meta
            .put(&mut wtxn, super::migrate::LAYOUT, &version)
            .map_err(self.err("put layout"))?;
        wtxn.commit().map_err(self.err("commit"))
    }
}
