//! Freshness: produce the data set at a fixed rate with probe events mixed
//! in, each under a new session id, and time each probe from its produce call
//! to the first GET /v1/sessions/{id} that finds it.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use clap::Args;
use hdrhistogram::Histogram;
use serde_json::json;

use crate::kafka::EventProducer;
use crate::replay::{Format, Renderer, load_events, pace};

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
}

struct Probe {
    session: String,
    sent: Instant,
}

pub fn run(args: &FreshnessArgs) -> Result<()> {
    ensure!(args.rate > 0, "--rate must be positive");
    ensure!(
        args.probes_per_second > 0 && args.probes_per_second <= args.rate,
        "--probes-per-second must be between 1 and --rate"
    );
    let events = load_events(&args.input)?;
    let producer = EventProducer::connect(&args.brokers, &args.topic, args.linger_ms)?;
    let mut renderer = Renderer::new(Format::Flat);
    let run_id = format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros())
    );
    let (probes_tx, probes_rx) = mpsc::channel::<Probe>();
    let checker = {
        let base = args.http.trim_end_matches('/').to_owned();
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
    let (histogram, lost) = checker
        .join()
        .map_err(|_| anyhow::anyhow!("the probe checker panicked"))??;
    let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1e3;
    println!(
        "{}",
        json!({
            "rate_target": args.rate,
            "rate_achieved": total as f64 / produced_in.as_secs_f64(),
            "events": total,
            "failed_deliveries": deliveries.failed.load(std::sync::atomic::Ordering::Relaxed),
            "probes": histogram.len() + lost,
            "lost": lost,
            "visible_ms": {"p50": ms(0.5), "p90": ms(0.9), "p99": ms(0.99), "max": histogram.max() as f64 / 1e3},
        })
    );
    ensure!(lost == 0, "{lost} probes never became visible");
    Ok(())
}

/// Polls each outstanding probe's session until it is found; microseconds.
fn check_probes(
    base: &str,
    probes: &mpsc::Receiver<Probe>,
    timeout: Duration,
) -> Result<(Histogram<u64>, u64)> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into();
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
        .context("failed to create a histogram")?;
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
                histogram.saturating_record(waited.as_micros() as u64);
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
