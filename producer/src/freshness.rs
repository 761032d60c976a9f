//! The freshness mode (alias `ingest`): produce the data set at a fixed rate
//! through the replay producer with probe events mixed in, each under a new
//! session id, and time each probe from its produce call to:
//!
//! - the broker's acknowledgement (every event, not only probes);
//! - its arrival at a plain librdkafka consumer reading the same topic in
//!   the same run, with the appliance's fetch settings: what the broker
//!   and the client library cost without the appliance;
//! - the first `GET /v1/sessions/{id}` that finds it (freshness).
//!
//! The appliance's own share is read from its /metrics (batch durations and
//! the applied-event counter, before and after), so the split shows which
//! side limits.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use cartscore_bench::load::{OutputArgs, nanos_histogram};
use cartscore_bench::render::{Format, Renderer, load_events, pace};
use cartscore_bench::report::{self, Percentiles};
use cartscore_core::shard::stream_key;
use clap::Args;
use hdrhistogram::Histogram;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde::Serialize;

use crate::kafka::{self, EventProducer};

#[derive(Debug, Args)]
pub struct FreshnessArgs {
    #[arg(long, default_value = "127.0.0.1:9092")]
    pub brokers: String,
    #[arg(long, default_value = "tracking.raw_user_behavior")]
    pub topic: String,
    /// The appliance's HTTP address.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub http: String,
    /// Background events, in the data set's CSV form.
    #[arg(long, env = "CARTSCORE_DATASET")]
    pub input: PathBuf,
    /// Events per second, probes included.
    #[arg(long, default_value_t = 10_000)]
    pub rate: u64,
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Probe events per second.
    #[arg(long, default_value_t = 50)]
    pub probes_per_second: u64,
    /// librdkafka linger.ms of the producer (part of what is measured).
    #[arg(long, default_value_t = 1)]
    pub linger_ms: u32,
    /// A librdkafka producer setting, `key=value` (repeatable), e.g.
    /// `-X max.in.flight.requests.per.connection=5`.
    #[arg(short = 'X', value_parser = crate::kafka::property)]
    pub producer_property: Vec<(String, String)>,
    /// A probe not visible after this long counts as lost.
    #[arg(long, default_value_t = 10_000)]
    pub timeout_ms: u64,
    /// fetch.wait.max.ms of the plain consumer (the appliance's default).
    #[arg(long, default_value_t = 50)]
    pub plain_fetch_wait_ms: u32,
    /// Leave out the plain consumer (it shares the machine with the appliance).
    #[arg(long)]
    pub no_plain_consumer: bool,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// When each outstanding probe was produced, by its session id.
type SentAt = Arc<Mutex<HashMap<String, Instant>>>;

struct Probe {
    session: String,
    sent: Instant,
}

/// The JSON summary of a run.
#[derive(Debug, Serialize)]
struct FreshnessSummary<'a> {
    mode: &'static str,
    brokers: &'a str,
    topic: &'a str,
    asked_rate: u64,
    produced_rate: f64,
    events: u64,
    acknowledged: u64,
    failed_deliveries: u64,
    applied_rate: Option<f64>,
    all_applied_after_seconds: Option<f64>,
    probes: u64,
    lost_probes: u64,
    /// Produce → visible in GET /v1/sessions/{id}, probes.
    freshness: Percentiles,
    /// Produce → acknowledged by the broker, every event.
    acknowledged_after: Percentiles,
    /// Produce → received by a plain consumer beside the appliance, probes.
    plain_consumer: Option<PlainConsumerSummary>,
    /// The appliance's write batches during the run, from its /metrics.
    appliance_batches: BatchSummary,
    /// How long a round of GETs over the outstanding probes took: the
    /// resolution of `freshness`.
    check_rounds: Percentiles,
}

#[derive(Debug, Serialize)]
struct PlainConsumerSummary {
    received: Percentiles,
    lost_probes: u64,
}

#[derive(Debug, Serialize)]
struct BatchSummary {
    batches: u64,
    mean_duration_ms: f64,
    /// From a batch's oldest message timestamp to its state being readable.
    mean_apply_delay_ms: f64,
}

pub fn run(args: &FreshnessArgs) -> Result<()> {
    ensure!(args.rate > 0, "--rate must be positive");
    ensure!(
        args.probes_per_second > 0 && args.probes_per_second <= args.rate,
        "--probes-per-second must be between 1 and --rate"
    );
    let events = load_events(&args.input)?;
    let base = args.http.trim_end_matches('/').to_owned();
    let agent = agent();
    let before = ApplianceCounters::read(&agent, &base)?;
    let producer = EventProducer::connect(
        &args.brokers,
        &args.topic,
        args.linger_ms,
        &args.producer_property,
    )?;
    let timeout = Duration::from_millis(args.timeout_ms);
    let sent_at: SentAt = Arc::default();
    let producing = Arc::new(AtomicBool::new(true));
    let plain = if args.no_plain_consumer {
        None
    } else {
        let consumer = plain_consumer(args)?;
        let (sent_at, producing) = (sent_at.clone(), producing.clone());
        Some(
            std::thread::Builder::new()
                .name("plain-consumer".into())
                .spawn(move || receive_probes(&consumer, &sent_at, &producing, timeout))
                .context("failed to start the plain consumer")?,
        )
    };
    let mut renderer = Renderer::new(Format::Flat);
    let run_id = cartscore_bench::load::run_id();
    let (probes_tx, probes_rx) = mpsc::channel::<Probe>();
    let checker = {
        let base = base.clone();
        std::thread::Builder::new()
            .name("probe-checker".into())
            .spawn(move || check_probes(&base, &probes_rx, timeout))
            .context("failed to start the probe checker")?
    };
    let total = args.rate * args.seconds;
    let probe_every = args.rate / args.probes_per_second;
    let start = Instant::now();
    for sent in 0..total {
        let event = &events[(sent as usize) % events.len()];
        let probe = sent % probe_every == 0;
        let session = if probe {
            format!("probe-{run_id}-{sent}")
        } else {
            format!("fresh-{run_id}-{}", event.user_session)
        };
        let payload = renderer.render(event, &session, None);
        pace(start, sent, args.rate);
        let now = Instant::now();
        if probe && let Ok(mut outstanding) = sent_at.lock() {
            outstanding.insert(session.clone(), now);
        }
        let key = stream_key(event.user_id);
        producer.send(key.as_bytes(), &payload, probe.then_some(session.as_str()))?;
        if probe {
            // The checker outlives the sends; a closed channel means it failed.
            let _ = probes_tx.send(Probe { session, sent: now });
        }
    }
    let produced_in = start.elapsed();
    drop(probes_tx);
    producing.store(false, Ordering::Relaxed);
    let deliveries = producer.flush()?;
    let acked = deliveries.acked.load(Ordering::Relaxed);
    let failed = deliveries.failed.load(Ordering::Relaxed);
    // Every acknowledged event is either applied or counted invalid; the
    // data set is valid, so wait for the counter to cover them all.
    let deadline = Instant::now() + timeout;
    let applied_in = loop {
        let applied = ApplianceCounters::read(&agent, &base)?
            .applied
            .saturating_sub(before.applied);
        if applied >= acked {
            break Some(start.elapsed());
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let Checked {
        visible: histogram,
        lost,
        rounds,
    } = checker
        .join()
        .map_err(|_| anyhow::anyhow!("the probe checker panicked"))??;
    let plain = plain
        .map(|thread| {
            thread
                .join()
                .map_err(|_| anyhow::anyhow!("the plain consumer panicked"))
        })
        .transpose()?;
    let after = ApplianceCounters::read(&agent, &base)?;
    let ack_latency = deliveries.ack_latency();
    let batches = after.batches.saturating_sub(before.batches);
    let per_batch_ms = |sum_after: f64, sum_before: f64| {
        if batches == 0 {
            0.0
        } else {
            (sum_after - sum_before) * 1e3 / batches as f64
        }
    };
    let appliance_batches = BatchSummary {
        batches,
        mean_duration_ms: per_batch_ms(after.batch_seconds, before.batch_seconds),
        mean_apply_delay_ms: per_batch_ms(after.apply_delay_seconds, before.apply_delay_seconds),
    };
    let freshness = Percentiles::of(&histogram);
    let summary = FreshnessSummary {
        mode: "ingest",
        brokers: &args.brokers,
        topic: &args.topic,
        asked_rate: args.rate,
        produced_rate: total as f64 / produced_in.as_secs_f64(),
        events: total,
        acknowledged: acked,
        failed_deliveries: failed,
        applied_rate: applied_in.map(|d| acked as f64 / d.as_secs_f64()),
        all_applied_after_seconds: applied_in.map(|d| d.as_secs_f64()),
        probes: histogram.len() + lost,
        lost_probes: lost,
        freshness,
        acknowledged_after: Percentiles::of(&ack_latency),
        plain_consumer: plain.as_ref().map(|(received, lost)| PlainConsumerSummary {
            received: Percentiles::of(received),
            lost_probes: *lost,
        }),
        appliance_batches,
        check_rounds: Percentiles::of(&rounds),
    };
    let row = |label: &str, p: &Percentiles| {
        format!(
            "{label:<36} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9}\n",
            p.p50_us / 1e3,
            p.p90_us / 1e3,
            p.p99_us / 1e3,
            p.p999_us / 1e3,
            p.max_us / 1e3,
            p.count
        )
    };
    let mut table = format!(
        "ingest → {} ({}) and {base}\n\
         rate: asked {}/s, produced {:.0}/s, applied {}   events {total}, acknowledged {acked}, failed {failed}\n\
         {:<36} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}\n",
        args.brokers,
        args.topic,
        args.rate,
        summary.produced_rate,
        applied_in.map_or_else(
            || "NOT ALL within the timeout".to_owned(),
            |d| format!("{:.0}/s", acked as f64 / d.as_secs_f64())
        ),
        "from produce (ms)",
        "p50",
        "p90",
        "p99",
        "p99.9",
        "max",
        "count",
    );
    table.push_str(&row(
        "acknowledged by the broker",
        &summary.acknowledged_after,
    ));
    if let Some(plain) = &summary.plain_consumer {
        table.push_str(&row("received by a plain consumer", &plain.received));
    }
    table.push_str(&row("visible in the appliance", &freshness));
    table.push_str(&format!(
        "appliance: {} batches, {:.2} ms each on average, oldest message → readable {:.1} ms on average\n\
         probes {}, lost {lost}{}; a round of GETs took {:.2} ms at p50, {:.2} ms at p99\n",
        summary.appliance_batches.batches,
        summary.appliance_batches.mean_duration_ms,
        summary.appliance_batches.mean_apply_delay_ms,
        summary.probes,
        summary
            .plain_consumer
            .as_ref()
            .map_or_else(String::new, |p| format!(
                " (never reached the plain consumer: {})",
                p.lost_probes
            )),
        summary.check_rounds.p50_us / 1e3,
        summary.check_rounds.p99_us / 1e3,
    ));
    let mut curves = vec![
        ("produce → visible".to_owned(), &histogram),
        ("produce → acknowledged".to_owned(), &ack_latency),
    ];
    if let Some((received, _)) = &plain {
        curves.push(("produce → plain consumer".to_owned(), received));
    }
    report::emit(&args.output, &table, &summary, &curves)?;
    ensure!(lost == 0, "{lost} probes never became visible");
    ensure!(
        applied_in.is_some(),
        "not every acknowledged event was applied within {} ms",
        args.timeout_ms
    );
    Ok(())
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into()
}

/// What the appliance's /metrics says of its Kafka ingest.
#[derive(Debug, Default)]
struct ApplianceCounters {
    /// `cartscore_events_applied_total{source="kafka"}`.
    applied: u64,
    batches: u64,
    batch_seconds: f64,
    apply_delay_seconds: f64,
}

impl ApplianceCounters {
    fn read(agent: &ureq::Agent, base: &str) -> Result<Self> {
        let text = agent
            .get(format!("{base}/metrics"))
            .call()
            .with_context(|| format!("GET {base}/metrics failed"))?
            .body_mut()
            .read_to_string()
            .context("failed to read /metrics")?;
        Ok(Self::parse(&text))
    }

    fn parse(text: &str) -> Self {
        let value = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        Self {
            applied: value("cartscore_events_applied_total{source=\"kafka\"}") as u64,
            batches: value("cartscore_stream_batch_duration_seconds_count") as u64,
            batch_seconds: value("cartscore_stream_batch_duration_seconds_sum"),
            apply_delay_seconds: value("cartscore_stream_apply_delay_seconds_sum"),
        }
    }
}

/// A consumer outside any group, on every partition of the topic from its
/// current end, with the appliance's fetch settings.
fn plain_consumer(args: &FreshnessArgs) -> Result<BaseConsumer> {
    let consumer = kafka::plain_consumer(
        &args.brokers,
        "cartscore-freshness-plain",
        args.plain_fetch_wait_ms,
        &[],
    )?;
    let mut assignment = TopicPartitionList::new();
    for (partition, _, high) in kafka::partition_ends(&consumer, &args.topic)? {
        // From the end as it is now, so no probe produced afterwards is
        // missed while the fetcher starts.
        assignment
            .add_partition_offset(&args.topic, partition, Offset::Offset(high))
            .context("failed to list a partition")?;
    }
    consumer
        .assign(&assignment)
        .context("failed to assign the plain consumer")?;
    Ok(consumer)
}

/// Times every probe the consumer receives; ends when production is over
/// and every probe arrived or waited `timeout`. Nanoseconds; lost probes.
fn receive_probes(
    consumer: &BaseConsumer,
    sent_at: &SentAt,
    producing: &AtomicBool,
    timeout: Duration,
) -> (Histogram<u64>, u64) {
    let mut histogram = nanos_histogram();
    let mut last_arrival = Instant::now();
    loop {
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(50)) {
            let arrived = Instant::now();
            last_arrival = arrived;
            let sent = message
                .headers()
                .and_then(|headers| headers.iter().find(|h| h.key == kafka::PROBE_HEADER))
                .and_then(|header| std::str::from_utf8(header.value?).ok())
                .and_then(|probe| sent_at.lock().ok()?.remove(probe));
            if let Some(sent) = sent {
                histogram.saturating_record(arrived.duration_since(sent).as_nanos() as u64);
            }
        }
        // Only once production is over: every message takes the lock otherwise.
        if !producing.load(Ordering::Relaxed) {
            let waiting = sent_at.lock().map_or(0, |outstanding| outstanding.len());
            if waiting == 0 || last_arrival.elapsed() > timeout {
                return (histogram, waiting as u64);
            }
        }
    }
}

/// What the probe checker saw, in nanoseconds.
struct Checked {
    visible: Histogram<u64>,
    lost: u64,
    /// The duration of each round of GETs with probes outstanding.
    rounds: Histogram<u64>,
}

/// Polls each outstanding probe's session until it is found. A round of
/// GETs every millisecond at most, so the checker does not take a core from
/// the appliance it measures.
fn check_probes(base: &str, probes: &mpsc::Receiver<Probe>, timeout: Duration) -> Result<Checked> {
    const ROUND: Duration = Duration::from_millis(1);
    let agent = agent();
    let mut histogram = nanos_histogram();
    let mut rounds = nanos_histogram();
    let mut outstanding: VecDeque<Probe> = VecDeque::new();
    let mut senders_done = false;
    let mut lost = 0;
    while !(senders_done && outstanding.is_empty()) {
        let round = Instant::now();
        loop {
            match probes.try_recv() {
                Ok(probe) => outstanding.push_back(probe),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    senders_done = true;
                    break;
                }
            }
        }
        let mut still = VecDeque::with_capacity(outstanding.len());
        for probe in outstanding.drain(..) {
            let response = agent
                .get(format!("{base}/v1/sessions/{}", probe.session))
                .call()
                .with_context(|| format!("GET {base}/v1/sessions failed"))?;
            let waited = probe.sent.elapsed();
            if response.status() == 200 {
                histogram.saturating_record(waited.as_nanos() as u64);
            } else if waited > timeout {
                lost += 1;
            } else {
                still.push_back(probe);
            }
        }
        outstanding = still;
        if !outstanding.is_empty() {
            rounds.saturating_record(round.elapsed().as_nanos() as u64);
        }
        if let Some(rest) = ROUND.checked_sub(round.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    Ok(Checked {
        visible: histogram,
        lost,
        rounds,
    })
}

#[cfg(test)]
mod tests {
    use super::ApplianceCounters;

    #[test]
    fn the_appliance_counters_are_read_from_its_metrics() {
        let text = "# HELP x\n\
            cartscore_events_applied_total{source=\"http\"} 5\n\
            cartscore_events_applied_total{source=\"kafka\"} 1200\n\
            cartscore_stream_batch_duration_seconds_sum 0.25\n\
            cartscore_stream_batch_duration_seconds_count 50\n\
            cartscore_stream_batch_duration_seconds_bucket{le=\"0.005\"} 40\n\
            cartscore_stream_apply_delay_seconds_sum 1.5\n";
        let counters = ApplianceCounters::parse(text);
        assert_eq!(counters.applied, 1200);
        assert_eq!(counters.batches, 50);
        assert!((counters.batch_seconds - 0.25).abs() < 1e-12);
        assert!((counters.apply_delay_seconds - 1.5).abs() < 1e-12);
    }
}
