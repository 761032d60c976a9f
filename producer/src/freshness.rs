//! The freshness mode (alias `ingest`): produce the data set at a fixed rate through the replay
//! producer with probe events mixed in, each under a new session id. Each
//! probe is timed from its produce call to the first GET /v1/sessions/{id}
//! that finds it (freshness), and the appliance's applied-event counter is
//! read from /metrics before and after, for the applied events per second.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use cartscore_bench::load::{OutputArgs, nanos_histogram};
use cartscore_bench::render::{Format, Renderer, load_events, pace};
use cartscore_bench::report::{self, Percentiles};
use clap::Args;
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::kafka::EventProducer;

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
    /// A probe not visible after this long counts as lost.
    #[arg(long, default_value_t = 10_000)]
    pub timeout_ms: u64,
    #[command(flatten)]
    pub output: OutputArgs,
}

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
    freshness: Percentiles,
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
    let applied_before = applied_total(&agent, &base)?;
    let producer = EventProducer::connect(&args.brokers, &args.topic, args.linger_ms)?;
    let mut renderer = Renderer::new(Format::Flat);
    let run_id = cartscore_bench::load::run_id();
    let (probes_tx, probes_rx) = mpsc::channel::<Probe>();
    let checker = {
        let base = base.clone();
        let timeout = Duration::from_millis(args.timeout_ms);
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
        producer.send(session.as_bytes(), &payload)?;
        if probe {
            // The checker outlives the sends; a closed channel means it failed.
            let _ = probes_tx.send(Probe {
                session,
                sent: Instant::now(),
            });
        }
    }
    let produced_in = start.elapsed();
    drop(probes_tx);
    let deliveries = producer.flush()?;
    let acked = deliveries.acked.load(std::sync::atomic::Ordering::Relaxed);
    let failed = deliveries.failed.load(std::sync::atomic::Ordering::Relaxed);
    // Every acknowledged event is either applied or counted invalid; the
    // data set is valid, so wait for the counter to cover them all.
    let deadline = Instant::now() + Duration::from_millis(args.timeout_ms);
    let applied_in = loop {
        let applied = applied_total(&agent, &base)?.saturating_sub(applied_before);
        if applied >= acked {
            break Some(start.elapsed());
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let (histogram, lost) = checker
        .join()
        .map_err(|_| anyhow::anyhow!("the probe checker panicked"))??;
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
    };
    let table = format!(
        "ingest → {} ({}) and {base}\n\
         rate: asked {}/s, produced {:.0}/s, applied {}   events {total}, acknowledged {acked}, failed {failed}\n\
         {:<34} {:>10} {:>10} {:>10} {:>10} {:>10}\n\
         {:<34} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>10.1}\n\
         probes {}, lost {lost}\n",
        args.brokers,
        args.topic,
        args.rate,
        total as f64 / produced_in.as_secs_f64(),
        applied_in.map_or_else(
            || "NOT ALL within the timeout".to_owned(),
            |d| format!("{:.0}/s", acked as f64 / d.as_secs_f64())
        ),
        "produce → visible (ms)",
        "p50",
        "p90",
        "p99",
        "p99.9",
        "max",
        "",
        freshness.p50_us / 1e3,
        freshness.p90_us / 1e3,
        freshness.p99_us / 1e3,
        freshness.p999_us / 1e3,
        freshness.max_us / 1e3,
        histogram.len() + lost,
    );
    report::emit(
        &args.output,
        &table,
        &summary,
        &[("produce → visible".into(), &histogram)],
    )?;
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

/// `cartscore_events_applied_total{source="kafka"}` from /metrics.
fn applied_total(agent: &ureq::Agent, base: &str) -> Result<u64> {
    let text = agent
        .get(format!("{base}/metrics"))
        .call()
        .with_context(|| format!("GET {base}/metrics failed"))?
        .body_mut()
        .read_to_string()
        .context("failed to read /metrics")?;
    Ok(text
        .lines()
        .find(|l| l.starts_with("cartscore_events_applied_total{source=\"kafka\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |v| v as u64))
}

/// Polls each outstanding probe's session until it is found; nanoseconds.
fn check_probes(
    base: &str,
    probes: &mpsc::Receiver<Probe>,
    timeout: Duration,
) -> Result<(Histogram<u64>, u64)> {
    let agent = agent();
    let mut histogram = nanos_histogram();
    let mut outstanding: VecDeque<Probe> = VecDeque::new();
    let mut senders_done = false;
    let mut lost = 0;
    while !(senders_done && outstanding.is_empty()) {
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
        if outstanding.is_empty() {
            std::thread::sleep(Duration::from_micros(200));
            continue;
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
    }
    Ok((histogram, lost))
}
