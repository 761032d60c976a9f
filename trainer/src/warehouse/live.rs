//! Live: the appliance's resolved outcomes in `live.outcomes`, each page
//! written with the cursor that follows it in one transaction, so a copy
//! that is interrupted and run again adds every outcome exactly once.

use cartscore_protocol::records::OutcomeRecord;

use super::client::{Warehouse, WarehouseError, query_error};

impl Warehouse {
    /// The first sequence number of `source` not copied yet.
    pub fn live_cursor(&mut self, source: &str) -> Result<u64, WarehouseError> {
        let row = self
            .client
            .query_opt(
                "SELECT next_seq FROM live.cursors WHERE source = $1",
                &[&source],
            )
            .map_err(query_error(&self.endpoint, "reading live.cursors"))?;
        Ok(row.map_or(0, |r| r.get::<_, i64>(0).max(0) as u64))
    }

    /// Adds a page of outcomes and moves the cursor to `next`, in one
    /// transaction. Returns the rows that were new.
    pub fn write_outcomes(
        &mut self,
        source: &str,
        page: &[OutcomeRecord],
        next: u64,
    ) -> Result<u64, WarehouseError> {
        let endpoint = self.endpoint.as_str();
        let err = |what: &str| query_error(endpoint, what);
        let mut tx = self.client.transaction().map_err(err("BEGIN"))?;
        let insert = tx
            .prepare(
                "INSERT INTO live.outcomes (source, seq, user_id, user_session, product_id, cart_time,
                     model_version, probability, scored_at, canary, paired_model_version,
                     paired_probability, label, resolved_at, resolution_delay_seconds)
                 VALUES ($1, $2, $3, $4, $5, $6::text::timestamptz, $7, $8,
                     to_timestamp($9::bigint / 1000.0), $10, $11, $12, $13, $14::text::timestamptz, $15)
                 ON CONFLICT (source, seq) DO NOTHING",
            )
            .map_err(err("preparing the insert into live.outcomes"))?;
        let mut added = 0;
        for outcome in page {
            let o = &outcome.cart;
            added += tx
                .execute(
                    &insert,
                    &[
                        &source,
                        &(o.seq as i64),
                        &(o.user_id as i64),
                        &o.user_session,
                        &(o.product_id as i64),
                        &o.cart_time,
                        &o.model_version,
                        &f64::from(o.probability),
                        &o.scored_at_unix_ms,
                        &o.canary,
                        &o.paired.as_ref().map(|p| p.model_version.as_str()),
                        &o.paired.as_ref().map(|p| f64::from(p.probability)),
                        &outcome.label,
                        &outcome.resolved_at,
                        &outcome.resolution_delay_seconds,
                    ],
                )
                .map_err(err(&format!("adding outcome {} of {source}", o.seq)))?;
        }
        tx.execute(
            "INSERT INTO live.cursors (source, next_seq) VALUES ($1, $2)
             ON CONFLICT (source) DO UPDATE SET next_seq = excluded.next_seq, copied_at = now()",
            &[&source, &(next as i64)],
        )
        .map_err(err("moving the cursor in live.cursors"))?;
        tx.commit().map_err(err("COMMIT"))?;
        Ok(added)
    }
}
