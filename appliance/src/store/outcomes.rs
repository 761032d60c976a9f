//! Scored carts and their outcomes, in the same LMDB environment as the
//! state they are decided by.
//!
//! Every scored cart is a record in `scored`, keyed by its session key,
//! product and cart time. The stream resolves it with the trainer's label
//! (`core`'s definition: the same session purchases the same product while
//! it is live): positive in the transaction that applies such a purchase,
//! negative in the transaction that finds the session expired (a later event
//! of the session, or the sweep once the watermark has passed its expiry and
//! the allowed lateness). A resolved outcome is appended to `outcomes`
//! under a sequence number, and its record stays (marked resolved, so the
//! same cart scored again keeps its first record) until the sweep ages it
//! out. All of it happens in the deciding transaction, so no crash resolves
//! an outcome twice or loses one.

use cartscore_core::{FEATURE_COUNT, SessionKey, Timestamp};
use heed::RwTxn;
use heed::byteorder::BigEndian;
use heed::types::{Bytes, U64};
use rkyv::rancor;

use super::codec::Archiver;
use super::db::Store;
use super::error::StoreError;
use super::inline::SessionText;
use super::keys::{SessionKeyBytes, describe_session_key};

/// What a scorer hands to the writer for one scored cart.
#[derive(Debug, Clone, PartialEq)]
pub struct CartRecord {
    pub user_id: u64,
    pub user_session: SessionText,
    pub product_id: u64,
    pub cart_time: Timestamp,
    /// The model that answered (interned by the model: no allocation).
    pub model_version: &'static str,
    pub probability: f32,
    /// The row the answering model saw.
    pub features: [f32; FEATURE_COUNT],
    pub scored_at_ms: i64,
    /// The other model's score of the same cart, when two serve.
    pub paired: Option<PairedRecord>,
    /// The challenger answered (a canary session).
    pub canary: bool,
}

/// The second model's score, as the scorer hands it over.
#[derive(Debug, Clone, PartialEq)]
pub struct PairedRecord {
    pub model_version: &'static str,
    pub probability: f32,
}

/// The other model's score of a cart, as stored: the challenger's when the
/// primary answered, the primary's when the challenger did (canary).
#[derive(
    Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, serde::Serialize,
)]
pub struct PairedScore {
    pub model_version: String,
    pub probability: f32,
}

impl PairedScore {
    pub(super) fn of(record: &CartRecord) -> Option<Self> {
        record.paired.as_ref().map(|p| Self {
            model_version: p.model_version.to_string(),
            probability: p.probability,
        })
    }
}

/// A scored cart as stored (layout 3; [`super::migrate`] has layout 2's).
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct StoredRecord {
    pub model_version: String,
    pub probability: f32,
    pub features: Vec<f32>,
    pub scored_at_ms: i64,
    pub resolved: bool,
    pub paired: Option<PairedScore>,
    pub canary: bool,
}

/// A resolved cart.
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Outcome {
    pub user_id: u64,
    pub user_session: String,
    pub product_id: u64,
    pub cart_time_micros: i64,
    /// The model that answered, and its probability.
    pub model_version: String,
    pub probability: f32,
    pub label: bool,
    /// Event time of what decided it (a purchase, a later event, or the
    /// watermark that expired the session).
    pub resolved_at_micros: i64,
    pub scored_at_ms: i64,
    pub paired: Option<PairedScore>,
    pub canary: bool,
}

/// A model's version and its probability of a cart.
pub type VersionedScore<'a> = (&'a str, f32);

impl Outcome {
    /// (champion, challenger) versions and probabilities, when two models
    /// scored the cart.
    pub fn pair(&self) -> Option<(VersionedScore<'_>, VersionedScore<'_>)> {
        let paired = self.paired.as_ref()?;
        let answered = (self.model_version.as_str(), self.probability);
        let other = (paired.model_version.as_str(), paired.probability);
        Some(if self.canary {
            (other, answered)
        } else {
            (answered, other)
        })
    }
}

/// `scored` key: the session key, the product and the cart time (both
/// big-endian, the time with its sign bit flipped so keys sort by time).
fn record_key(session: &[u8], product_id: u64, cart_time_micros: i64) -> Vec<u8> {
    let mut key = Vec::with_capacity(session.len() + 16);
    key.extend_from_slice(session);
    key.extend_from_slice(&product_id.to_be_bytes());
    key.extend_from_slice(&((cart_time_micros as u64) ^ (1 << 63)).to_be_bytes());
    key
}

/// The parts of a `scored` key: session key bytes, product, cart time.
pub(super) fn split_record_key(key: &[u8]) -> Option<(&[u8], u64, i64)> {
    let split = key.len().checked_sub(16)?;
    let mut product = [0u8; 8];
    product.copy_from_slice(&key[split..split + 8]);
    let mut time = [0u8; 8];
    time.copy_from_slice(&key[split + 8..]);
    Some((
        &key[..split],
        u64::from_be_bytes(product),
        (u64::from_be_bytes(time) ^ (1 << 63)) as i64,
    ))
}

const OUTCOME_SEQ: &str = "outcome_seq";

/// A `scored` value that is not a valid archive.
pub(super) fn corrupt(key: &[u8], source: rancor::Error) -> StoreError {
    StoreError::Corrupt {
        database: "scored",
        key: describe_session_key(key),
        source,
    }
}

/// Resolves inside one write transaction and collects what it resolved.
pub(super) struct Resolver {
    next_seq: u64,
    pub(super) resolved: Vec<Outcome>,
    archiver: Archiver,
}

impl Store {
    pub(super) fn resolver(&self, txn: &RwTxn) -> Result<Resolver, StoreError> {
        let next_seq = self
            .meta
            .get(txn, OUTCOME_SEQ)
            .map_err(self.err("get outcome_seq"))?
            .unwrap_or(0) as u64;
        Ok(Resolver {
            next_seq,
            resolved: Vec::new(),
            archiver: Archiver::default(),
        })
    }

    /// Stores new records; a cart that already has one keeps its first.
    /// Returns how many were new, how many were refused (past
    /// `store.max_scored_records`; the caller counts them as dropped) and
    /// how many the store holds now.
    pub(super) fn put_records(
        &self,
        txn: &mut RwTxn,
        records: &[CartRecord],
        archiver: &mut Archiver,
    ) -> Result<(usize, usize, u64), StoreError> {
        let (mut stored, mut refused) = (Vec::new(), 0);
        let mut held = self.scored.len(txn).map_err(self.err("count scored"))?;
        for record in records {
            let Some(session) = SessionKeyBytes::new(SessionKey {
                user_id: record.user_id,
                user_session: &record.user_session,
            }) else {
                refused += 1;
                continue;
            };
            let key = record_key(
                session.as_bytes(),
                record.product_id,
                record.cart_time.micros(),
            );
            if self
                .scored
                .get(txn, &key)
                .map_err(self.err("get scored"))?
                .is_some()
            {
                continue;
            }
            if held >= self.outcome_limits.max_records {
                refused += 1;
                continue;
            }
            let value = StoredRecord {
                model_version: record.model_version.to_string(),
                probability: record.probability,
                features: record.features.to_vec(),
                scored_at_ms: record.scored_at_ms,
                resolved: false,
                paired: PairedScore::of(record),
                canary: record.canary,
            };
            let bytes = archiver.archive(&value, "scored record")?;
            self.scored
                .put(txn, &key, bytes)
                .map_err(self.err("put scored"))?;
            held += 1;
            stored.push(record);
        }
        let new = stored.len();
        self.append_predictions(txn, stored, archiver)?;
        Ok((new, refused, held))
    }

    /// Resolves the unresolved records under `prefix` whose cart time is in
    /// `from..=to` (µs) with `label`, decided at `at`.
    pub(super) fn resolve_prefix(
        &self,
        txn: &mut RwTxn,
        resolver: &mut Resolver,
        prefix: &[u8],
        (from, to): (i64, i64),
        label: bool,
        at: i64,
    ) -> Result<(), StoreError> {
        let mut found = Vec::new();
        for entry in self
            .scored
            .prefix_iter(txn, prefix)
            .map_err(self.err("find scored"))?
        {
            let (key, bytes) = entry.map_err(self.err("find scored"))?;
            let Some((_, _, cart_time)) = split_record_key(key) else {
                continue;
            };
            if cart_time < from || cart_time > to {
                continue;
            }
            let record = rkyv::access::<ArchivedStoredRecord, rancor::Error>(bytes)
                .map_err(|e| corrupt(key, e))?;
            if record.resolved {
                continue;
            }
            let record: StoredRecord = rkyv::deserialize::<StoredRecord, rancor::Error>(record)
                .map_err(|e| corrupt(key, e))?;
            found.push((key.to_vec(), record));
        }
        for (key, record) in found {
            self.resolve(txn, resolver, &key, record, label, at)?;
        }
        Ok(())
    }

    /// Marks one record resolved and appends its outcome.
    pub(super) fn resolve(
        &self,
        txn: &mut RwTxn,
        resolver: &mut Resolver,
        key: &[u8],
        mut record: StoredRecord,
        label: bool,
        at: i64,
    ) -> Result<(), StoreError> {
        let Some((session, product_id, cart_time)) = split_record_key(key) else {
            return Ok(());
        };
        // Only put_records writes these keys, from a valid session key.
        let Some((user_session, user_id)) = super::keys::split_session_key(session) else {
            return Ok(());
        };
        let outcome = Outcome {
            user_id,
            user_session: user_session.to_owned(),
            product_id,
            cart_time_micros: cart_time,
            model_version: record.model_version.clone(),
            probability: record.probability,
            label,
            resolved_at_micros: at,
            scored_at_ms: record.scored_at_ms,
            paired: record.paired.clone(),
            canary: record.canary,
        };
        record.resolved = true;
        let bytes = resolver.archiver.archive(&record, "scored record")?;
        self.scored
            .put(txn, key, bytes)
            .map_err(self.err("put scored"))?;
        let bytes = resolver.archiver.archive(&outcome, "outcome")?;
        self.outcomes
            .put(txn, &resolver.next_seq, bytes)
            .map_err(self.err("put outcome"))?;
        resolver.next_seq += 1;
        resolver.resolved.push(outcome);
        Ok(())
    }

    /// Stores the sequence and keeps at most `max_outcomes` outcomes.
    pub(super) fn finish_resolver(
        &self,
        txn: &mut RwTxn,
        resolver: &Resolver,
    ) -> Result<(), StoreError> {
        if resolver.resolved.is_empty() {
            return Ok(());
        }
        self.meta
            .put(txn, OUTCOME_SEQ, &(resolver.next_seq as i64))
            .map_err(self.err("put outcome_seq"))?;
        let keep = self.outcome_limits.max_outcomes as u64;
        if resolver.next_seq > keep {
            let below = resolver.next_seq - keep;
            self.outcomes
                .delete_range(txn, &(..below))
                .map_err(self.err("trim outcomes"))?;
        }
        Ok(())
    }

    /// Records not resolved yet.
    pub fn pending_records(&self) -> Result<u64, StoreError> {
        let txn = self.env.read_txn().map_err(self.err("read_txn"))?;
        let mut pending = 0;
        for entry in self.scored.iter(&txn).map_err(self.err("iterate scored"))? {
            let (key, bytes) = entry.map_err(self.err("iterate scored"))?;
            let record = rkyv::access::<ArchivedStoredRecord, rancor::Error>(bytes)
                .map_err(|e| corrupt(key, e))?;
            pending += u64::from(!record.resolved);
        }
        Ok(pending)
    }
}

/// The databases this module owns, as the store opens them.
pub(super) type ScoredDb = heed::Database<'static, Bytes, Bytes>;
pub(super) type OutcomesDb = heed::Database<'static, U64<BigEndian>, Bytes>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_key_splits_back_and_sorts_by_time() {
        let session = b"s\xff\0\0\0\0\0\0\0\x07";
        let early = record_key(session, 5, -10);
        let late = record_key(session, 5, 1_569_888_000_000_000);
        assert!(early < late);
        assert_eq!(
            split_record_key(&late),
            Some((&session[..], 5, 1_569_888_000_000_000))
        );
        assert_eq!(split_record_key(&early), Some((&session[..], 5, -10)));
    }
}
