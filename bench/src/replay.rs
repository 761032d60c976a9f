//! The event producer of the original stack, done properly: the data set's
//! CSV rows as Kafka messages keyed by session, at a fixed rate or as fast as
//! the broker takes them, optionally with a share of corrupted events.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use cartscore_core::{CsvLayout, Event};
use clap::{Args, ValueEnum};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};

use crate::kafka::EventProducer;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// A flat JSON object per event.
    Flat,
    /// The Kafka Connect JsonConverter `{"schema", "payload"}` envelope.
    Envelope,
    /// A Debezium ExtractNewRecordState row in the envelope (event_time as
    /// an ISO-8601 ZonedTimestamp, plus `__op`, `__table`, `__deleted`, `id`).
    Debezium,
}

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
    /// librdkafka linger.ms: batching delay of the producer.
    #[arg(long, default_value_t = 5)]
    pub linger_ms: u32,
}

/// How an event is broken, as an upstream bug would break it.
const CORRUPTIONS: [&str; 6] = [
    "negative_price",
    "text_price",
    "missing_session",
    "unknown_event_type",
    "zero_user_id",
    "truncated_json",
];

pub fn load_events(path: &Path) -> Result<Vec<Event>> {
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .from_path(path)
        .with_context(|| format!("failed to open {}", path.display()))?;
    let header = reader
        .byte_headers()
        .with_context(|| format!("failed to read the header of {}", path.display()))?
        .clone();
    let layout = CsvLayout::from_header(&header)
        .with_context(|| format!("{} is not in the data set's CSV form", path.display()))?;
    let mut events = Vec::new();
    for (line, record) in reader.byte_records().enumerate() {
        let record = record.with_context(|| format!("{}: row {}", path.display(), line + 2))?;
        // Corruption is chosen, not inherited: a bad input row (the slice's
        // last line is cut mid-row) is reported and left out.
        match Event::from_csv(&record, &layout) {
            Ok(event) => events.push(event),
            Err(error) => eprintln!("{}: row {} left out: {error}", path.display(), line + 2),
        }
    }
    ensure!(!events.is_empty(), "{} holds no events", path.display());
    Ok(events)
}

/// Renders events in one wire form.
pub struct Renderer {
    format: Format,
    schema: Value,
    next_id: u64,
}

impl Renderer {
    pub fn new(format: Format) -> Self {
        let field = |name: &str, kind: &str, optional: bool| json!({"field": name, "type": kind, "optional": optional});
        let time = if format == Format::Debezium {
            json!({"field": "event_time", "type": "string", "optional": false,
                   "name": "io.debezium.time.ZonedTimestamp", "version": 1})
        } else {
            field("event_time", "string", false)
        };
        let mut fields = vec![
            time,
            field("event_type", "string", false),
            field("product_id", "int64", false),
            field("category_id", "int64", false),
            field("category_code", "string", true),
            field("brand", "string", true),
            field("price", "double", false),
            field("user_id", "int64", false),
            field("user_session", "string", false),
        ];
        if format == Format::Debezium {
            fields.insert(0, field("id", "int64", false));
            fields.push(field("__op", "string", true));
            fields.push(field("__table", "string", true));
            fields.push(field("__deleted", "string", true));
        }
        Self {
            format,
            schema: json!({"type": "struct", "optional": false, "name": "events.Value", "fields": fields}),
            next_id: 1,
        }
    }

    /// The message for `event`, broken as `corruption` says when given.
    pub fn render(&mut self, event: &Event, session: &str, corruption: Option<&str>) -> Vec<u8> {
        let mut row = event.to_json();
        row["user_session"] = json!(session);
        if self.format == Format::Debezium {
            row["event_time"] = json!(event.event_time.to_rfc3339());
            row["id"] = json!(self.next_id);
            row["__op"] = json!("c");
            row["__table"] = json!("events");
            row["__deleted"] = json!("false");
            self.next_id += 1;
        }
        match corruption {
            Some("negative_price") => row["price"] = json!(-event.price - 1.0),
            Some("text_price") => row["price"] = json!("n/a"),
            Some("missing_session") => {
                if let Some(map) = row.as_object_mut() {
                    map.remove("user_session");
                }
            }
            Some("unknown_event_type") => row["event_type"] = json!("click"),
            Some("zero_user_id") => row["user_id"] = json!(0),
            _ => {}
        }
        let message = match self.format {
            Format::Flat => row,
            Format::Envelope | Format::Debezium => {
                json!({"schema": self.schema, "payload": row})
            }
        };
        let mut bytes = message.to_string().into_bytes();
        if corruption == Some("truncated_json") {
            bytes.truncate(bytes.len() / 2);
        }
        bytes
    }
}

/// Waits until `sent` events are due at `rate` per second since `start`.
pub fn pace(start: Instant, sent: u64, rate: u64) {
    if rate == 0 {
        return;
    }
    let due = start + Duration::from_secs_f64(sent as f64 / rate as f64);
    let now = Instant::now();
    if due > now {
        std::thread::sleep(due - now);
    }
}

pub fn run(args: &ReplayArgs) -> Result<()> {
    if !(0.0..=1.0).contains(&args.corrupt) {
        bail!("--corrupt must be between 0 and 1, not {}", args.corrupt);
    }
    let events = load_events(&args.input)?;
    let producer = EventProducer::connect(&args.brokers, &args.topic, args.linger_ms)?;
    let mut renderer = Renderer::new(args.format);
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    let limit = args.limit.unwrap_or(u64::MAX);
    let mut corrupted = [0u64; CORRUPTIONS.len()];
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
                let kind = rng.random_range(0..CORRUPTIONS.len());
                corrupted[kind] += 1;
                CORRUPTIONS[kind]
            });
            let payload = renderer.render(event, &session, corruption);
            pace(start, sent, args.rate);
            producer.send(session.as_bytes(), &payload)?;
            sent += 1;
        }
    }
    let queued_in = start.elapsed();
    let deliveries = producer.flush()?;
    let elapsed = start.elapsed();
    let acked = deliveries.acked.load(std::sync::atomic::Ordering::Relaxed);
    let failed = deliveries.failed.load(std::sync::atomic::Ordering::Relaxed);
    let by_kind: serde_json::Map<String, Value> = CORRUPTIONS
        .iter()
        .zip(corrupted)
        .map(|(k, n)| ((*k).to_owned(), json!(n)))
        .collect();
    println!(
        "{}",
        json!({
            "topic": args.topic,
            "format": format!("{:?}", args.format).to_lowercase(),
            "produced": sent,
            "acknowledged": acked,
            "failed": failed,
            "corrupted": corrupted.iter().sum::<u64>(),
            "corrupted_by_kind": by_kind,
            "queue_seconds": queued_in.as_secs_f64(),
            "seconds": elapsed.as_secs_f64(),
            "events_per_second": sent as f64 / elapsed.as_secs_f64(),
        })
    );
    ensure!(
        failed == 0,
        "{failed} of {sent} events were not acknowledged"
    );
    Ok(())
}
