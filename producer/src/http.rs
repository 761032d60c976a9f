//! Replaying events into an appliance over its HTTP API, without Kafka: in
//! order, in batches to `POST /v1/events`, and, with `--score-carts`, each
//! add-to-cart scored over `POST /v1/score` just before it is ingested, with
//! everything before it applied, as a shop's checkout would ask. This is how
//! a day of traffic is played against a model (its live outcomes, the
//! shadow's, the drift) on a machine with no broker.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use cartscore_bench::render::{Format, Renderer, load_events, pace};
use cartscore_bench::report::Percentiles;
use cartscore_core::EventType;
use clap::Args;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

#[derive(Debug, Args)]
pub struct HttpArgs {
    /// The appliance's HTTP API.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub appliance: String,
    /// Events in the data set's CSV form: the real slice or `cartscore-trainer synth` output.
    #[arg(long, env = "CARTSCORE_DATASET")]
    pub input: PathBuf,
    /// Events per second; 0 sends as fast as the appliance applies them.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Events per `POST /v1/events`.
    #[arg(long, default_value_t = 500)]
    pub batch: usize,
    /// Score every cart over `POST /v1/score` before it is ingested.
    #[arg(long)]
    pub score_carts: bool,
    /// Stop after this many events.
    #[arg(long)]
    pub limit: Option<u64>,
    /// Prepended to every session id (a fresh namespace per run).
    #[arg(long, default_value = "")]
    pub session_prefix: String,
}

/// The part of the appliance's `POST /v1/events` answer this tool reads.
#[derive(Debug, Deserialize)]
struct Ingested {
    applied: u64,
    rejected: u64,
}

/// What a replay printed as JSON.
#[derive(Debug, Serialize)]
struct HttpSummary {
    sent: u64,
    applied: u64,
    rejected: u64,
    carts_scored: u64,
    seconds: f64,
    events_per_second: f64,
    /// Client-side round trip of each `POST /v1/score`.
    score_round_trip: Percentiles,
}

struct Client {
    agent: ureq::Agent,
    base: String,
}

impl Client {
    fn post(&self, path: &str, body: &str) -> Result<String> {
        let url = format!("{}{path}", self.base);
        let mut response = self
            .agent
            .post(&url)
            .header("content-type", "application/json")
            .send(body)
            .with_context(|| format!("failed to POST {url}"))?;
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .read_to_string()
            .with_context(|| format!("failed to read the answer of POST {url}"))?;
        ensure!(status == 200, "POST {url} answered {status}: {text}");
        Ok(text)
    }
}

pub fn run(args: &HttpArgs) -> Result<()> {
    if args.batch == 0 {
        bail!("--batch must be at least 1");
    }
    let events = load_events(&args.input)?;
    let client = Client {
        agent: ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(60)))
            .http_status_as_error(false)
            .build()
            .new_agent(),
        base: args.appliance.trim_end_matches('/').to_owned(),
    };
    let mut renderer = Renderer::new(Format::Flat);
    let mut round_trips = Histogram::<u64>::new_with_bounds(1_000, 60_000_000_000, 3)?;
    let limit = args.limit.unwrap_or(u64::MAX);
    let mut pending: Vec<u8> = Vec::new();
    let mut in_batch = 0usize;
    let (mut sent, mut applied, mut rejected, mut scored) = (0u64, 0u64, 0u64, 0u64);
    let mut flush = |pending: &mut Vec<u8>, in_batch: &mut usize| -> Result<()> {
        if *in_batch == 0 {
            return Ok(());
        }
        pending.push(b']');
        let text = client.post("/v1/events", std::str::from_utf8(pending)?)?;
        let answer: Ingested = serde_json::from_str(&text)
            .with_context(|| format!("POST /v1/events answered an unexpected body: {text}"))?;
        applied += answer.applied;
        rejected += answer.rejected;
        pending.clear();
        *in_batch = 0;
        Ok(())
    };
    let start = Instant::now();
    for event in events
        .iter()
        .take(usize::try_from(limit).unwrap_or(usize::MAX))
    {
        let session = format!("{}{}", args.session_prefix, event.user_session);
        let payload = renderer.render(event, &session, None);
        pace(start, sent, args.rate);
        if args.score_carts && event.event_type == EventType::Cart {
            flush(&mut pending, &mut in_batch)?;
            let asked = Instant::now();
            client.post("/v1/score", std::str::from_utf8(&payload)?)?;
            round_trips.saturating_record(asked.elapsed().as_nanos() as u64);
            scored += 1;
        }
        pending.push(if in_batch == 0 { b'[' } else { b',' });
        pending.extend_from_slice(&payload);
        in_batch += 1;
        sent += 1;
        if in_batch >= args.batch {
            flush(&mut pending, &mut in_batch)?;
        }
    }
    flush(&mut pending, &mut in_batch)?;
    let seconds = start.elapsed().as_secs_f64();
    let summary = HttpSummary {
        sent,
        applied,
        rejected,
        carts_scored: scored,
        seconds,
        events_per_second: sent as f64 / seconds,
        score_round_trip: Percentiles::of(&round_trips),
    };
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}
