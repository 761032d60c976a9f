//! The store's layout version and the migration between versions.
//!
//! - 1: sessions keyed by session id alone. Refused: the key cannot be
//!   rebuilt without the user, so the stream must be replayed.
//! - 2: sessions keyed by session id and user.
//! - 3: scored-cart records, outcomes and the prediction outbox carry the
//!   second model's score (`paired`) and whether the challenger answered
//!   (`canary`). A layout-2 store is migrated in place, in one write
//!   transaction: every such value is read as layout 2 and written as 3.

use heed::types::Bytes;
use heed::{Database, RwTxn};
use rkyv::rancor;

use super::codec::Archiver;
use super::db::Store;
use super::error::StoreError;
use super::keys::describe_session_key;
use super::log::Prediction;
use super::outcomes::{Outcome, StoredRecord};

pub const LAYOUT: &str = "layout";
pub const LAYOUT_VERSION: i64 = 3;

/// Layout 2's values, read once by the migration.
mod v2 {
    #[derive(Debug, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
    pub struct StoredRecord {
        pub model_version: String,
        pub probability: f32,
        pub features: Vec<f32>,
        pub scored_at_ms: i64,
        pub resolved: bool,
    }

    #[derive(Debug, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
    pub struct Outcome {
        pub user_id: u64,
        pub user_session: String,
        pub product_id: u64,
        pub cart_time_micros: i64,
        pub model_version: String,
        pub probability: f32,
        pub label: bool,
        pub resolved_at_micros: i64,
        pub scored_at_ms: i64,
    }

    #[derive(Debug, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
    pub struct Prediction {
        pub user_id: u64,
        pub user_session: String,
        pub product_id: u64,
        pub cart_time_micros: i64,
        pub model_version: String,
        pub probability: f32,
        pub features: Vec<f32>,
        pub scored_at_ms: i64,
    }
}

impl From<v2::StoredRecord> for StoredRecord {
    fn from(r: v2::StoredRecord) -> Self {
        Self {
            model_version: r.model_version,
            probability: r.probability,
            features: r.features,
            scored_at_ms: r.scored_at_ms,
            resolved: r.resolved,
            paired: None,
            canary: false,
        }
    }
}

impl From<v2::Outcome> for Outcome {
    fn from(o: v2::Outcome) -> Self {
        Self {
            user_id: o.user_id,
            user_session: o.user_session,
            product_id: o.product_id,
            cart_time_micros: o.cart_time_micros,
            model_version: o.model_version,
            probability: o.probability,
            label: o.label,
            resolved_at_micros: o.resolved_at_micros,
            scored_at_ms: o.scored_at_ms,
            paired: None,
            canary: false,
        }
    }
}

impl From<v2::Prediction> for Prediction {
    fn from(p: v2::Prediction) -> Self {
        Self {
            user_id: p.user_id,
            user_session: p.user_session,
            product_id: p.product_id,
            cart_time_micros: p.cart_time_micros,
            model_version: p.model_version,
            probability: p.probability,
            features: p.features,
            scored_at_ms: p.scored_at_ms,
            paired: None,
            canary: false,
        }
    }
}

/// Rewrites every value of `db` from `Old` to `New`.
fn rewrite<K, Old, New>(
    txn: &mut RwTxn,
    db: Database<'static, K, Bytes>,
    database: &'static str,
    describe: impl Fn(&[u8]) -> String,
    lmdb: &impl Fn(heed::Error) -> StoreError,
) -> Result<usize, StoreError>
where
    K: 'static,
    Old: rkyv::Archive,
    Old::Archived: for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, rancor::Error>>
        + rkyv::Deserialize<Old, rkyv::api::high::HighDeserializer<rancor::Error>>,
    New: From<Old>
        + for<'a> rkyv::Serialize<
            rkyv::api::high::HighSerializer<
                rkyv::util::AlignedVec,
                rkyv::ser::allocator::ArenaHandle<'a>,
                rancor::Error,
            >,
        >,
{
    let raw = db.remap_key_type::<Bytes>();
    let mut converted = Vec::new();
    for entry in raw.iter(txn).map_err(lmdb)? {
        let (key, bytes) = entry.map_err(lmdb)?;
        let old = rkyv::from_bytes::<Old, rancor::Error>(bytes).map_err(|source| {
            StoreError::Corrupt {
                database,
                key: describe(key),
                source,
            }
        })?;
        converted.push((key.to_vec(), New::from(old)));
    }
    let mut archiver = Archiver::default();
    for (key, value) in &converted {
        let bytes = archiver.archive(value, database)?;
        raw.put(txn, key, bytes).map_err(lmdb)?;
    }
    Ok(converted.len())
}

fn seq_key(key: &[u8]) -> String {
    <[u8; 8]>::try_from(key).map_or_else(
        |_| format!("{key:?}"),
        |k| u64::from_be_bytes(k).to_string(),
    )
}

impl Store {
    /// Refuses a store of a layout it cannot read, migrates layout 2, and
    /// stamps a new store.
    pub(super) fn check_layout(&self) -> Result<(), StoreError> {
        let path = self.path().to_owned();
        let open_error = |source| StoreError::Open {
            path: path.clone(),
            source,
        };
        let mut wtxn = self.env.write_txn().map_err(open_error)?;
        let found = self.meta.get(&wtxn, LAYOUT).map_err(open_error)?;
        match found {
            Some(LAYOUT_VERSION) => Ok(()),
            Some(2) => {
                let lmdb = self.err("migrate to layout 3");
                let records = rewrite::<_, v2::StoredRecord, StoredRecord>(
                    &mut wtxn,
                    self.scored,
                    "scored",
                    describe_session_key,
                    &lmdb,
                )?;
                let outcomes = rewrite::<_, v2::Outcome, Outcome>(
                    &mut wtxn,
                    self.outcomes,
                    "outcomes",
                    seq_key,
                    &lmdb,
                )?;
                let predictions = rewrite::<_, v2::Prediction, Prediction>(
                    &mut wtxn,
                    self.predictions,
                    "predictions",
                    seq_key,
                    &lmdb,
                )?;
                self.meta
                    .put(&mut wtxn, LAYOUT, &LAYOUT_VERSION)
                    .map_err(&lmdb)?;
                wtxn.commit().map_err(&lmdb)?;
                tracing::info!(
                    path = %path.display(),
                    records,
                    outcomes,
                    predictions,
                    "store migrated from layout 2 to 3"
                );
                Ok(())
            }
            Some(other) => Err(StoreError::Layout { path, found: other }),
            None if !self.sessions.is_empty(&wtxn).map_err(open_error)? => {
                Err(StoreError::Layout { path, found: 1 })
            }
            None => {
                self.meta
                    .put(&mut wtxn, LAYOUT, &LAYOUT_VERSION)
                    .map_err(open_error)?;
                wtxn.commit().map_err(open_error)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU64;

    use super::*;
    use crate::config::StoreConfig;

    #[test]
    fn a_layout_2_store_is_migrated_in_place_and_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let config = StoreConfig {
            path: dir.path().join("lmdb"),
            map_size_mib: NonZeroU64::new(16).unwrap(),
            ..StoreConfig::default()
        };
        let record = v2::StoredRecord {
            model_version: "v1".into(),
            probability: 0.25,
            features: vec![1.5; 25],
            scored_at_ms: 7,
            resolved: true,
        };
        let outcome = v2::Outcome {
            user_id: 3,
            user_session: "s".into(),
            product_id: 5,
            cart_time_micros: 11,
            model_version: "v1".into(),
            probability: 0.25,
            label: true,
            resolved_at_micros: 13,
            scored_at_ms: 7,
        };
        let prediction = v2::Prediction {
            user_id: 3,
            user_session: "s".into(),
            product_id: 5,
            cart_time_micros: 11,
            model_version: "v1".into(),
            probability: 0.25,
            features: vec![1.5; 25],
            scored_at_ms: 7,
        };
        {
            // What a layout-2 build left behind.
            let store = Store::open(&config).unwrap();
            store.set_layout(2).unwrap();
            let mut txn = store.env.write_txn().unwrap();
            let key = b"s\xff\0\0\0\0\0\0\0\x03product-and-time";
            let record_bytes = rkyv::to_bytes::<rancor::Error>(&record).unwrap();
            store.scored.put(&mut txn, key, &record_bytes).unwrap();
            let outcome_bytes = rkyv::to_bytes::<rancor::Error>(&outcome).unwrap();
            store.outcomes.put(&mut txn, &0, &outcome_bytes).unwrap();
            let prediction_bytes = rkyv::to_bytes::<rancor::Error>(&prediction).unwrap();
            store
                .predictions
                .put(&mut txn, &0, &prediction_bytes)
                .unwrap();
            txn.commit().unwrap();
        }
        let store = Store::open(&config).unwrap();
        let txn = store.env.read_txn().unwrap();
        assert_eq!(store.meta.get(&txn, LAYOUT).unwrap(), Some(LAYOUT_VERSION));
        let (_, bytes) = store.scored.iter(&txn).unwrap().next().unwrap().unwrap();
        let migrated = rkyv::from_bytes::<StoredRecord, rancor::Error>(bytes).unwrap();
        assert_eq!(migrated, StoredRecord::from(record));
        assert_eq!((migrated.paired, migrated.canary), (None, false));
        drop(txn);
        let outcomes = store.outcomes_since(0, 10).unwrap();
        assert_eq!(outcomes, vec![(0, Outcome::from(outcome))]);
        let predictions = store.predictions_since(0, 10).unwrap();
        assert_eq!(predictions, vec![(0, Prediction::from(prediction))]);
        // Opened again: already layout 3, nothing to do.
        drop(store);
        assert!(Store::open(&config).is_ok());
    }
}
