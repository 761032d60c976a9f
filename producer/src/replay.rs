//! The event producer of the original stack, done properly: the data set's
//! CSV rows as Kafka messages keyed by user (the key policy shards rely on,
//! `cartscore_core::shard`), at a fixed rate or as fast as
//! the broker takes them, optionally with a share of corrupted events.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Result, bail, ensure};
use cartscore_bench::render::{Corruption, Format, Renderer, load_events, pace};
use cartscore_bench::report::Percentiles;
use cartscore_core::shard::stream_key;
use clap::Args;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::kafka::EventProducer;

#[derive(Debug, Args)]
pub struct ReplayArgs {
    #[arg(long, default_value = "127.0.0.1:9092")]
    pub brokers: String,
    #[arg(long, default_value = "tracking.raw_user_behavior")]
    pub topic: String,
    /// Events in the data set's CSV form: the real slice or `cartscore-trainer synth` output.
    #[arg(long, env = "CARTSCORE_DATASET")]
    pub input: PathBuf,
    /// Events per second; 0 produces as fast as the broker acknowledges.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    #[arg(long, value_enum, default_value = "flat")]
    pub format: Format,
    /// Share of events to corrupt, 0 to 1 (the original stack injected ~0.1).
    #[arg(long, default_value_t = 0.0)]
    pub corrupt: f64,
    /// Seed of the corruption choices: the same seed corrupts the same events.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Passes over the input; pass k > 0 prefixes session ids with `k.` so
    /// every pass makes new sessions.
    #[arg(long, default_value_t = 1)]
    pub repeat: u32,
    /// Stop after this many events.
    #[arg(long)]
    pub limit: Option<u64>,
    /// Prepended to every session id (a fresh namespace per run).
    #[arg(long, default_value = "")]
    pub session_prefix: String,
    /// The record key: `user` (the user id, the policy) or `session` (the
    /// session id, which splits a user over partitions: for comparison and
    /// for testing the appliance's key check).
    #[arg(long, value_enum, default_value = "user")]
    pub key: KeyBy,
    /// librdkafka linger.ms: batching delay of the producer.
    #[arg(long, default_value_t = 5)]
    pub linger_ms: u32,
    /// A librdkafka producer setting, `key=value` (repeatable), e.g.
    /// `-X max.in.flight.requests.per.connection=5`.
    #[arg(short = 'X', value_parser = crate::kafka::property)]
    pub producer_property: Vec<(String, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KeyBy {
    User,
    Session,
}

/// What a replay printed as JSON: sent, acknowledged, corrupted.
#[derive(Debug, Serialize)]
struct ReplaySummary<'a> {
    topic: &'a str,
    format: String,
    produced: u64,
    acknowledged: u64,
    failed: u64,
    corrupted: u64,
    corrupted_by_kind: BTreeMap<&'static str, u64>,
    queue_seconds: f64,
    seconds: f64,
    events_per_second: f64,
    /// Send call → broker acknowledgement, every acknowledged event.
    acknowledged_after: Percentiles,
}

pub fn run(args: &ReplayArgs) -> Result<()> {
    if !(0.0..=1.0).contains(&args.corrupt) {
        bail!("--corrupt must be between 0 and 1, not {}", args.corrupt);
    }
    let events = load_events(&args.input)?;
    let producer = EventProducer::connect(
        &args.brokers,
        &args.topic,
        args.linger_ms,
        &args.producer_property,
    )?;
    let mut renderer = Renderer::new(args.format);
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    let limit = args.limit.unwrap_or(u64::MAX);
    let mut corrupted = [0u64; Corruption::ALL.len()];
    let mut sent = 0u64;
    let start = Instant::now();
    'passes: for pass in 0..args.repeat {
        let pass_prefix = if pass == 0 {
            String::new()
        } else {
            format!("{pass}.")
        };
        for event in &events {
            if sent == limit {
                break 'passes;
            }
            let session = format!("{}{pass_prefix}{}", args.session_prefix, event.user_session);
            let corruption = (args.corrupt > 0.0 && rng.random_bool(args.corrupt)).then(|| {
                let kind = rng.random_range(0..Corruption::ALL.len());
                corrupted[kind] += 1;
                Corruption::ALL[kind]
            });
            let payload = renderer.render(event, &session, corruption);
            pace(start, sent, args.rate);
            match args.key {
                KeyBy::User => {
                    producer.send(stream_key(event.user_id).as_bytes(), &payload, None)?;
                }
                KeyBy::Session => producer.send(session.as_bytes(), &payload, None)?,
            }
            sent += 1;
        }
    }
    let queued_in = start.elapsed();
    let deliveries = producer.flush()?;
    let elapsed = start.elapsed();
    let acked = deliveries.acked.load(std::sync::atomic::Ordering::Relaxed);
    let failed = deliveries.failed.load(std::sync::atomic::Ordering::Relaxed);
    let summary = ReplaySummary {
        topic: &args.topic,
        format: format!("{:?}", args.format).to_lowercase(),
        produced: sent,
        acknowledged: acked,
        failed,
        corrupted: corrupted.iter().sum(),
        corrupted_by_kind: Corruption::ALL
            .iter()
            .zip(corrupted)
            .map(|(kind, n)| (kind.name(), n))
            .collect(),
        queue_seconds: queued_in.as_secs_f64(),
        seconds: elapsed.as_secs_f64(),
        events_per_second: sent as f64 / elapsed.as_secs_f64(),
        acknowledged_after: Percentiles::of(&deliveries.ack_latency()),
    };
    println!("{}", serde_json::to_string(&summary)?);
    ensure!(
        failed == 0,
        "{failed} of {sent} events were not acknowledged"
    );
    Ok(())
}
