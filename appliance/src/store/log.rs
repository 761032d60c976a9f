//! The prediction log's outbox. With a Kafka prediction log, every new
//! scored-cart record is also appended to `predictions` under a sequence
//! number, in the transaction that stores it; resolved outcomes already are
//! (`outcomes`). The publisher reads both from its delivered positions,
//! which the writer stores with its next transaction, like the consumer's
//! delivered offsets: a restart sends again what the broker had not
//! acknowledged, so the log is at least once, and the state never waits
//! for it. Delivered predictions are deleted; without a broker the outbox
//! holds at most `store.max_scored_records` (the oldest go first, and the
//! publisher counts them as lost).

use cartscore_core::FEATURE_COUNT;
use heed::RwTxn;
use rkyv::rancor;

use super::codec::Archiver;
use super::db::Store;
use super::error::StoreError;
use super::outcomes::{CartRecord, Outcome, PairedScore};

const PREDICTION_SEQ: &str = "prediction_seq";
const DELIVERED_PREDICTIONS: &str = "log_delivered_predictions";
const DELIVERED_OUTCOMES: &str = "log_delivered_outcomes";

/// The first sequence number of each log the broker has not acknowledged
/// (everything below it was delivered).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogPositions {
    pub predictions: u64,
    pub outcomes: u64,
}

/// A scored cart as the outbox holds it.
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Prediction {
    pub user_id: u64,
    pub user_session: String,
    pub product_id: u64,
    pub cart_time_micros: i64,
    pub model_version: String,
    pub probability: f32,
    pub features: Vec<f32>,
    pub scored_at_ms: i64,
    pub paired: Option<PairedScore>,
    pub canary: bool,
}

impl Prediction {
    pub fn features(&self) -> Option<&[f32; FEATURE_COUNT]> {
        self.features.as_slice().try_into().ok()
    }
}

impl Store {
    /// Appends the records just stored to the outbox (a no-op without a
    /// prediction log) and keeps at most `store.max_scored_records`.
    pub(super) fn append_predictions<'r>(
        &self,
        txn: &mut RwTxn,
        stored: impl IntoIterator<Item = &'r CartRecord>,
        archiver: &mut Archiver,
    ) -> Result<(), StoreError> {
        if !self.log_predictions {
            return Ok(());
        }
        let first = self.meta_u64(txn, PREDICTION_SEQ)?;
        let mut next = first;
        for record in stored {
            let prediction = Prediction {
                user_id: record.user_id,
                user_session: record.user_session.to_string(),
                product_id: record.product_id,
                cart_time_micros: record.cart_time.micros(),
                model_version: record.model_version.to_string(),
                probability: record.probability,
                features: record.features.to_vec(),
                scored_at_ms: record.scored_at_ms,
                paired: PairedScore::of(record),
                canary: record.canary,
            };
            let bytes = archiver.archive(&prediction, "prediction")?;
            self.predictions
                .put(txn, &next, bytes)
                .map_err(self.err("put prediction"))?;
            next += 1;
        }
        if next == first {
            return Ok(());
        }
        self.meta
            .put(txn, PREDICTION_SEQ, &(next as i64))
            .map_err(self.err("put prediction_seq"))?;
        let keep = self.outcome_limits.max_records;
        if next > keep {
            self.predictions
                .delete_range(txn, &(..next - keep))
                .map_err(self.err("trim predictions"))?;
        }
        Ok(())
    }

    /// Stores the publisher's delivered positions and deletes the
    /// predictions below them.
    pub(super) fn put_log_delivered(
        &self,
        txn: &mut RwTxn,
        delivered: LogPositions,
    ) -> Result<(), StoreError> {
        for (key, seq) in [
            (DELIVERED_PREDICTIONS, delivered.predictions),
            (DELIVERED_OUTCOMES, delivered.outcomes),
        ] {
            self.meta
                .put(txn, key, &(seq as i64))
                .map_err(self.err("put log position"))?;
        }
        self.predictions
            .delete_range(txn, &(..delivered.predictions))
            .map_err(self.err("delete delivered predictions"))?;
        Ok(())
    }

    /// Where the publisher resumes.
    pub fn log_delivered(&self) -> Result<LogPositions, StoreError> {
        let txn = self.env.read_txn().map_err(self.err("read_txn"))?;
        Ok(LogPositions {
            predictions: self.meta_u64(&txn, DELIVERED_PREDICTIONS)?,
            outcomes: self.meta_u64(&txn, DELIVERED_OUTCOMES)?,
        })
    }

    /// Up to `limit` outbox predictions from sequence number `since` on.
    pub fn predictions_since(
        &self,
        since: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Prediction)>, StoreError> {
        let txn = self.env.read_txn().map_err(self.err("read_txn"))?;
        let entries = self
            .predictions
            .range(&txn, &(since..))
            .map_err(self.err("iterate predictions"))?;
        decode_page(
            entries,
            limit,
            "predictions",
            self.err("iterate predictions"),
        )
    }

    /// Up to `limit` outcomes from sequence number `since` on, in order
    /// (`GET /v1/outcomes`, the outcomes log).
    pub fn outcomes_since(
        &self,
        since: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Outcome)>, StoreError> {
        let txn = self.env.read_txn().map_err(self.err("read_txn"))?;
        let entries = self
            .outcomes
            .range(&txn, &(since..))
            .map_err(self.err("iterate outcomes"))?;
        decode_page(entries, limit, "outcomes", self.err("iterate outcomes"))
    }

    /// The newest `limit` outcomes (oldest first), for the live window at
    /// start-up.
    pub fn recent_outcomes(&self, limit: usize) -> Result<Vec<(u64, Outcome)>, StoreError> {
        let txn = self.env.read_txn().map_err(self.err("read_txn"))?;
        let entries = self
            .outcomes
            .rev_iter(&txn)
            .map_err(self.err("iterate outcomes"))?;
        let mut out = decode_page(entries, limit, "outcomes", self.err("iterate outcomes"))?;
        out.reverse();
        Ok(out)
    }

    fn meta_u64(&self, txn: &heed::RoTxn, key: &'static str) -> Result<u64, StoreError> {
        Ok(self
            .meta
            .get(txn, key)
            .map_err(self.err("get log sequence"))?
            .unwrap_or(0)
            .max(0) as u64)
    }
}

/// Decodes up to `limit` sequence-keyed archives of `database`.
fn decode_page<'t, T>(
    entries: impl Iterator<Item = heed::Result<(u64, &'t [u8])>>,
    limit: usize,
    database: &'static str,
    lmdb: impl Fn(heed::Error) -> StoreError,
) -> Result<Vec<(u64, T)>, StoreError>
where
    T: rkyv::Archive,
    T::Archived: for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, rancor::Error>>
        + rkyv::Deserialize<T, rkyv::api::high::HighDeserializer<rancor::Error>>,
{
    let mut out = Vec::new();
    for entry in entries.take(limit) {
        let (seq, bytes) = entry.map_err(&lmdb)?;
        let value =
            rkyv::from_bytes::<T, rancor::Error>(bytes).map_err(|source| StoreError::Corrupt {
                database,
                key: seq.to_string(),
                source,
            })?;
        out.push((seq, value));
    }
    Ok(out)
}
