//! Gold: the point-in-time feature rows a training run computed, written
//! back with COPY so analysts can query exactly what the model saw.

use std::io::Write;

use cartscore_core::FEATURE_COUNT;
use cartscore_core::Timestamp;

use super::client::{Warehouse, WarehouseError, query_error};

/// One training run, as recorded in `gold.training_runs`.
#[derive(Debug)]
pub struct GoldRun<'a> {
    pub model_version: &'a str,
    pub data_fingerprint: &'a str,
    pub contract_version: u32,
    pub source: &'a str,
    pub report: &'a crate::report::TrainReport,
}

/// One cart event's model row.
#[derive(Debug)]
pub struct GoldRow<'a> {
    pub time: Timestamp,
    pub session: &'a str,
    pub product_id: u64,
    pub split: &'static str,
    pub label: bool,
    pub features: &'a [f32; FEATURE_COUNT],
}

impl Warehouse {
    /// Replaces the run's rows (a re-run of the same version writes the
    /// same rows), in one transaction. Returns the rows written.
    pub fn write_gold<'a>(
        &mut self,
        run: &GoldRun<'_>,
        rows: impl IntoIterator<Item = GoldRow<'a>>,
    ) -> Result<u64, WarehouseError> {
        let endpoint = self.endpoint.as_str();
        let err = |what: &str| query_error(endpoint, what);
        let mut tx = self.client.transaction().map_err(err("BEGIN"))?;
        tx.execute(
            "DELETE FROM gold.training_runs WHERE model_version = $1",
            &[&run.model_version],
        )
        .map_err(err("replacing the gold run"))?;
        let examples = run.report.replay.cart_examples as i64;
        tx.execute(
            "INSERT INTO gold.training_runs (model_version, data_fingerprint, contract_version, source, examples, report)
             VALUES ($1, $2, $3, $4, $5, $6::text::jsonb)",
            &[
                &run.model_version,
                &run.data_fingerprint,
                &(run.contract_version as i32),
                &run.source,
                &examples,
                &serde_json::to_string(run.report).unwrap_or_default(),
            ],
        )
        .map_err(err("recording the run in gold.training_runs"))?;
        let columns = cartscore_core::FEATURE_NAMES.join(", ");
        let copy = format!(
            "COPY gold.feature_rows (model_version, example, event_time, user_session, product_id, split, label, {columns}) \
             FROM STDIN WITH (FORMAT text)"
        );
        let what = "COPY into gold.feature_rows";
        let mut writer = tx.copy_in(&copy).map_err(err(what))?;
        let mut line = Vec::with_capacity(512);
        let mut written = 0u64;
        let mut version = Vec::new();
        super::load::escape_text(run.model_version.as_bytes(), &mut version);
        for (example, row) in rows.into_iter().enumerate() {
            line.clear();
            line.extend_from_slice(&version);
            let mut ints = itoa::Buffer::new();
            line.push(b'\t');
            line.extend_from_slice(ints.format(example).as_bytes());
            line.push(b'\t');
            line.extend_from_slice(row.time.to_rfc3339().as_bytes());
            line.push(b'\t');
            super::load::escape_text(row.session.as_bytes(), &mut line);
            line.push(b'\t');
            line.extend_from_slice(ints.format(row.product_id).as_bytes());
            line.push(b'\t');
            line.extend_from_slice(row.split.as_bytes());
            line.extend_from_slice(if row.label { b"\tt" } else { b"\tf" });
            for value in row.features {
                // Display prints the shortest text that reads back as the same f32.
                let _ = write!(line, "\t{value}");
            }
            line.push(b'\n');
            writer
                .write_all(&line)
                .map_err(|source| WarehouseError::Stream {
                    endpoint: endpoint.to_owned(),
                    what,
                    source,
                })?;
            written += 1;
        }
        writer.finish().map_err(err(what))?;
        tx.commit().map_err(err("COMMIT"))?;
        Ok(written)
    }
}
