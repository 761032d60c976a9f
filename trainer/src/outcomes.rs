//! Copying the appliance's resolved outcomes into the warehouse: pages of
//! `GET /v1/outcomes` from the warehouse's cursor on, each page and the
//! cursor after it in one transaction (`live.outcomes`, `live.cursors`).

use std::time::Duration;

use cartscore_protocol::records::OutcomesPage;
use serde::Serialize;

use crate::warehouse::{Warehouse, WarehouseError};

#[derive(Debug, thiserror::Error)]
pub enum OutcomesError {
    #[error("GET {url} failed: {reason}")]
    Fetch { url: String, reason: String },
    #[error("GET {url} answered {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error("GET {url} answered a body that is not an outcomes page: {source}")]
    Decode {
        url: String,
        source: serde_json::Error,
    },
    #[error(transparent)]
    Warehouse(#[from] WarehouseError),
}

/// What one copy did (printed as JSON).
#[derive(Debug, Default, Serialize)]
pub struct CopySummary {
    pub source: String,
    pub pages: u64,
    pub fetched: u64,
    /// Outcomes that were not in the warehouse yet.
    pub added: u64,
    pub next_seq: u64,
}

/// Largest page the appliance serves.
const PAGE: usize = 10_000;

/// Copies every outcome `appliance` holds past the cursor of `source`.
pub fn copy(
    warehouse: &mut Warehouse,
    appliance: &str,
    source: &str,
) -> Result<CopySummary, OutcomesError> {
    let agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(30)))
        .http_status_as_error(false)
        .build()
        .new_agent();
    let base = appliance.trim_end_matches('/');
    let mut summary = CopySummary {
        source: source.to_owned(),
        next_seq: warehouse.live_cursor(source)?,
        ..CopySummary::default()
    };
    loop {
        let url = format!("{base}/v1/outcomes?since={}&limit={PAGE}", summary.next_seq);
        let page = fetch(&agent, &url)?;
        if page.outcomes.is_empty() {
            return Ok(summary);
        }
        summary.added += warehouse.write_outcomes(source, &page.outcomes, page.next)?;
        summary.pages += 1;
        summary.fetched += page.outcomes.len() as u64;
        summary.next_seq = page.next;
    }
}

fn fetch(agent: &ureq::Agent, url: &str) -> Result<OutcomesPage, OutcomesError> {
    let fail = |reason: String| OutcomesError::Fetch {
        url: url.to_owned(),
        reason,
    };
    let mut response = agent.get(url).call().map_err(|e| fail(e.to_string()))?;
    let status = response.status().as_u16();
    let body = response
        .body_mut()
        .with_config()
        .limit(256 << 20)
        .read_to_string()
        .map_err(|e| fail(e.to_string()))?;
    if status != 200 {
        return Err(OutcomesError::Status {
            url: url.to_owned(),
            status,
            body: body.chars().take(500).collect(),
        });
    }
    serde_json::from_str(&body).map_err(|source| OutcomesError::Decode {
        url: url.to_owned(),
        source,
    })
}
