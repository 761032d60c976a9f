//! The open-loop load engine shared by the `tcp`, `http`, `reload` and
//! `sweep` modes.
//!
//! Each connection has a writer thread that sends request `i` at its
//! scheduled time `start + offset + i / rate` whether or not earlier requests
//! were answered, and a reader thread that takes the responses in order.
//! Latency is measured from the *scheduled* send time (wrk2's correction for
//! coordinated omission): when the server stalls, every request that should
//! have been sent during the stall is charged the time it waited, instead of
//! the harness quietly sending less. The time from the actual send is kept
//! too (service time), and so is how late the harness itself sent, so a run
//! shows whether the load generator kept up.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::Args;
use hdrhistogram::Histogram;

/// Flags every latency mode shares.
#[derive(Debug, Clone, Args)]
pub struct LoadArgs {
    /// Target request rate per second, over all connections (open loop).
    #[arg(long, default_value_t = 10_000.0)]
    pub rate: f64,
    /// Seconds measured, after the warm-up.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds of load before measuring starts.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Connections, each with its own writer and reader thread.
    #[arg(long, default_value_t = 2)]
    pub connections: usize,
    /// Requests a connection may have in flight (1 = no pipelining).
    #[arg(long, default_value_t = 16)]
    pub pipeline: usize,
    /// A response not received after this long fails its connection.
    #[arg(long, default_value_t = 5_000)]
    pub timeout_ms: u64,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// Where a run's results go besides the table on stdout.
#[derive(Debug, Clone, Default, Args)]
pub struct OutputArgs {
    /// Write the summary as JSON.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
    /// Write the full HDR percentile distribution (HdrHistogram's `.hgrm`
    /// text, readable by its online plotter).
    #[arg(long)]
    pub hdr: Option<std::path::PathBuf>,
    /// Write a PNG of the latency percentile curve.
    #[arg(long)]
    pub plot: Option<std::path::PathBuf>,
    /// A TrueType font for the plot's labels.
    #[arg(
        long,
        default_value = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
    )]
    pub font: std::path::PathBuf,
}

impl LoadArgs {
    pub fn plan(&self) -> Result<LoadPlan> {
        ensure!(
            self.rate.is_finite() && self.rate > 0.0,
            "--rate must be positive, got {}",
            self.rate
        );
        ensure!(
            self.duration.is_finite() && self.duration > 0.0,
            "--duration must be positive, got {}",
            self.duration
        );
        ensure!(
            self.warmup.is_finite() && self.warmup >= 0.0,
            "--warmup must be zero or more, got {}",
            self.warmup
        );
        ensure!(
            (1..=1024).contains(&self.connections),
            "--connections must be 1 to 1024, got {}",
            self.connections
        );
        ensure!(
            (1..=65_536).contains(&self.pipeline),
            "--pipeline must be 1 to 65536, got {}",
            self.pipeline
        );
        Ok(LoadPlan {
            rate: self.rate,
            warmup: Duration::from_secs_f64(self.warmup),
            duration: Some(Duration::from_secs_f64(self.duration)),
            connections: self.connections,
            pipeline: self.pipeline,
            timeout: Duration::from_millis(self.timeout_ms),
        })
    }
}

#[derive(Debug, Clone)]
pub struct LoadPlan {
    pub rate: f64,
    pub warmup: Duration,
    /// `None`: until the stop flag is raised (the reload mode).
    pub duration: Option<Duration>,
    pub connections: usize,
    pub pipeline: usize,
    pub timeout: Duration,
}

/// What came back for one request.
#[derive(Debug)]
pub enum Reply {
    Ok {
        version: Option<String>,
    },
    /// An answer that is not a success (a status, an error frame).
    Failed(String),
}

/// Queues request number `seq` (the target picks its payload from it);
/// `flush` writes what is queued.
pub trait RequestSink: Send + 'static {
    fn queue(&mut self, seq: u64);
    fn flush(&mut self) -> Result<()>;
}

/// The next response in request order; an error ends the connection.
pub trait ReplySource: Send + 'static {
    fn recv(&mut self) -> Result<Reply>;
}

/// Something the engine can open connections to.
pub trait Target: Send + Sync {
    fn describe(&self) -> String;
    fn connect(&self, timeout: Duration) -> Result<(Box<dyn RequestSink>, Box<dyn ReplySource>)>;
}

/// Called by reader threads with each reply and when it arrived.
pub type Observer = Arc<dyn Fn(&Reply, Instant) + Send + Sync>;

const HIGHEST_NANOS: u64 = 3_600_000_000_000;

pub fn nanos_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIGHEST_NANOS, 3).expect("constant histogram bounds are valid")
}

/// Histograms and counts of one run (or one connection, before merging).
#[derive(Debug, Clone)]
pub struct LoadResult {
    /// From the scheduled send to the response (coordinated-omission corrected).
    pub latency: Histogram<u64>,
    /// From the actual send to the response.
    pub service: Histogram<u64>,
    /// How late the harness sent, behind schedule.
    pub send_lateness: Histogram<u64>,
    pub ok: u64,
    pub errors: BTreeMap<String, u64>,
    /// Requests scheduled in the measured window.
    pub scheduled: u64,
    /// From the start of the measured window to its last response.
    pub measured: Duration,
}

impl LoadResult {
    fn new() -> Self {
        Self {
            latency: nanos_histogram(),
            service: nanos_histogram(),
            send_lateness: nanos_histogram(),
            ok: 0,
            errors: BTreeMap::new(),
            scheduled: 0,
            measured: Duration::ZERO,
        }
    }

    fn error(&mut self, kind: &str, count: u64) {
        if count > 0 {
            *self.errors.entry(kind.to_owned()).or_default() += count;
        }
    }

    fn merge(&mut self, other: LoadResult) -> Result<()> {
        self.latency
            .add(&other.latency)
            .context("failed to merge histograms")?;
        self.service
            .add(&other.service)
            .context("failed to merge histograms")?;
        self.send_lateness
            .add(&other.send_lateness)
            .context("failed to merge histograms")?;
        self.ok += other.ok;
        for (kind, count) in other.errors {
            self.error(&kind, count);
        }
        self.scheduled += other.scheduled;
        self.measured = self.measured.max(other.measured);
        Ok(())
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    pub fn completed(&self) -> u64 {
        self.ok + self.error_count()
    }

    /// Responses per second over the measured window.
    pub fn achieved_rate(&self) -> f64 {
        let secs = self.measured.as_secs_f64();
        if secs > 0.0 {
            self.completed() as f64 / secs
        } else {
            0.0
        }
    }
}

struct InFlight {
    scheduled: Instant,
    sent: Instant,
}

/// Runs the plan against the target; `stop` ends an open-ended plan.
pub fn run(
    target: &dyn Target,
    plan: &LoadPlan,
    observer: Option<Observer>,
    stop: Arc<AtomicBool>,
) -> Result<LoadResult> {
    let mut halves = Vec::with_capacity(plan.connections);
    for index in 0..plan.connections {
        halves.push(target.connect(plan.timeout).with_context(|| {
            format!("failed to open connection {index} to {}", target.describe())
        })?);
    }
    // Every connection starts on the same clock; connection c is offset by
    // c / rate so the merged schedule is evenly spaced.
    let start = Instant::now() + Duration::from_millis(20);
    let measure_from = start + plan.warmup;
    let end = plan.duration.map(|d| measure_from + d);
    let per_connection = plan.rate / plan.connections as f64;
    let mut threads = Vec::new();
    for (index, (sink, source)) in halves.into_iter().enumerate() {
        let offset = Duration::from_secs_f64(index as f64 / plan.rate);
        let interval = 1.0 / per_connection;
        let (permits_tx, permits_rx) = mpsc::sync_channel::<()>(plan.pipeline);
        for _ in 0..plan.pipeline {
            permits_tx
                .send(())
                .context("failed to set up the in-flight window")?;
        }
        let (flight_tx, flight_rx) = mpsc::channel::<InFlight>();
        let stop_writer = Arc::clone(&stop);
        let writer = std::thread::Builder::new()
            .name(format!("load-w{index}"))
            .spawn(move || {
                write_loop(
                    sink,
                    Schedule {
                        start: start + offset,
                        interval,
                        end,
                    },
                    &permits_rx,
                    &flight_tx,
                    &stop_writer,
                )
            })
            .context("failed to start a writer thread")?;
        let observer = observer.clone();
        let reader = std::thread::Builder::new()
            .name(format!("load-r{index}"))
            .spawn(move || read_loop(source, &flight_rx, &permits_tx, measure_from, observer))
            .context("failed to start a reader thread")?;
        threads.push((writer, reader));
    }
    let mut total = LoadResult::new();
    let mut failures = Vec::new();
    for (writer, reader) in threads {
        let lateness = match writer.join() {
            Ok(Ok(histogram)) => Some(histogram),
            Ok(Err(error)) => {
                failures.push(format!("{error:#}"));
                None
            }
            Err(_) => bail!("a writer thread panicked"),
        };
        let mut result = reader
            .join()
            .map_err(|_| anyhow::anyhow!("a reader thread panicked"))?;
        if let Some(histogram) = lateness {
            result.send_lateness = histogram;
        }
        total.merge(result)?;
    }
    if !failures.is_empty() {
        total.error("connection_failed", failures.len() as u64);
        eprintln!("connections that failed: {}", failures.join("; "));
    }
    Ok(total)
}

struct Schedule {
    start: Instant,
    interval: f64,
    end: Option<Instant>,
}

impl Schedule {
    fn at(&self, i: u64) -> Instant {
        self.start + Duration::from_secs_f64(i as f64 * self.interval)
    }
}

fn write_loop(
    mut sink: Box<dyn RequestSink>,
    schedule: Schedule,
    permits: &mpsc::Receiver<()>,
    flights: &mpsc::Sender<InFlight>,
    stop: &AtomicBool,
) -> Result<Histogram<u64>> {
    // The default 50 µs timer slack would make every sleep overshoot by
    // about that much, and the overshoot is charged to the server.
    let _ = nix::sys::prctl::set_timerslack(1);
    let mut lateness = nanos_histogram();
    let mut seq = 0u64;
    let over = |scheduled: Instant| {
        schedule.end.is_some_and(|end| scheduled >= end) || stop.load(Ordering::Relaxed)
    };
    let mut due = schedule.at(seq);
    loop {
        if over(due) {
            return Ok(lateness);
        }
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        if permits.recv().is_err() {
            // The reader ended (its connection failed); it counted why.
            return Ok(lateness);
        }
        // Everything already due leaves in one write: a woken writer that
        // sent one request per syscall would fall further behind, and the
        // schedule, not the send, is what latency is measured from.
        let mut queued = 0;
        loop {
            let sent = Instant::now();
            lateness.saturating_record(sent.saturating_duration_since(due).as_nanos() as u64);
            if flights
                .send(InFlight {
                    scheduled: due,
                    sent,
                })
                .is_err()
            {
                return Ok(lateness);
            }
            sink.queue(seq);
            seq += 1;
            queued += 1;
            due = schedule.at(seq);
            if queued >= 64 || due > Instant::now() || over(due) || permits.try_recv().is_err() {
                break;
            }
        }
        sink.flush()?;
    }
}

fn read_loop(
    mut source: Box<dyn ReplySource>,
    flights: &mpsc::Receiver<InFlight>,
    permits: &mpsc::SyncSender<()>,
    measure_from: Instant,
    observer: Option<Observer>,
) -> LoadResult {
    let mut result = LoadResult::new();
    let mut last = measure_from;
    while let Ok(flight) = flights.recv() {
        let reply = match source.recv() {
            Ok(reply) => reply,
            Err(error) => {
                // This request and every one still in flight are lost.
                let lost = 1 + flights.try_iter().count() as u64;
                result.error("connection_lost", lost);
                eprintln!("connection lost: {error:#}");
                break;
            }
        };
        let now = Instant::now();
        let _ = permits.send(());
        if let Some(observer) = &observer {
            observer(&reply, now);
        }
        if flight.scheduled < measure_from {
            continue;
        }
        result.scheduled += 1;
        last = now;
        result
            .latency
            .saturating_record(now.duration_since(flight.scheduled).as_nanos() as u64);
        result
            .service
            .saturating_record(now.duration_since(flight.sent).as_nanos() as u64);
        match reply {
            Reply::Ok { .. } => result.ok += 1,
            Reply::Failed(kind) => result.error(&kind, 1),
        }
    }
    result.measured = last.saturating_duration_since(measure_from);
    result
}

/// A name for this run (hex microseconds), so sessions and bundles of two
/// runs never collide.
pub fn run_id() -> String {
    let micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    format!("{micros:x}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// An in-memory target whose replies take `delay` after the request was
    /// sent, one at a time (a single-threaded server).
    struct Loopback {
        delay: Duration,
        fail_every: u64,
    }

    struct LoopSink(mpsc::Sender<(u64, Instant)>);
    struct LoopSource {
        requests: mpsc::Receiver<(u64, Instant)>,
        delay: Duration,
        fail_every: u64,
        free_at: Instant,
    }

    impl RequestSink for LoopSink {
        fn queue(&mut self, seq: u64) {
            let _ = self.0.send((seq, Instant::now()));
        }
        fn flush(&mut self) -> Result<()> {
            Ok(())
        }
    }

    impl ReplySource for LoopSource {
        fn recv(&mut self) -> Result<Reply> {
            let (seq, sent) = self.requests.recv()?;
            let done = sent.max(self.free_at) + self.delay;
            self.free_at = done;
            let now = Instant::now();
            if done > now {
                std::thread::sleep(done - now);
            }
            Ok(if self.fail_every > 0 && seq % self.fail_every == 0 {
                Reply::Failed("status_500".into())
            } else {
                Reply::Ok { version: None }
            })
        }
    }

    impl Target for Loopback {
        fn describe(&self) -> String {
            "loopback".into()
        }
        fn connect(&self, _: Duration) -> Result<(Box<dyn RequestSink>, Box<dyn ReplySource>)> {
            let (tx, rx) = mpsc::channel();
            Ok((
                Box::new(LoopSink(tx)),
                Box::new(LoopSource {
                    requests: rx,
                    delay: self.delay,
                    fail_every: self.fail_every,
                    free_at: Instant::now(),
                }),
            ))
        }
    }

    fn plan(rate: f64, seconds: f64, pipeline: usize) -> LoadPlan {
        LoadPlan {
            rate,
            warmup: Duration::from_millis(100),
            duration: Some(Duration::from_secs_f64(seconds)),
            connections: 1,
            pipeline,
            timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn an_idle_server_is_measured_at_its_service_time_and_the_asked_rate() {
        let target = Loopback {
            delay: Duration::from_micros(500),
            fail_every: 0,
        };
        let result = run(&target, &plan(200.0, 1.0, 4), None, Arc::default()).unwrap();
        assert!(
            (195..=205).contains(&result.scheduled),
            "{}",
            result.scheduled
        );
        assert_eq!(result.error_count(), 0);
        assert!(
            (150.0..=250.0).contains(&result.achieved_rate()),
            "{}",
            result.achieved_rate()
        );
        assert!(result.latency.value_at_quantile(0.5) >= 500_000);
    }

    #[test]
    fn an_overloaded_server_is_charged_the_queueing_the_schedule_implies() {
        // 2 ms per request at 1,000/s offered: the server can do 500/s, so a
        // request scheduled at t waits about t/2. A closed-loop client would
        // report 2 ms; the corrected latency must grow with the run.
        let target = Loopback {
            delay: Duration::from_millis(2),
            fail_every: 0,
        };
        let result = run(&target, &plan(1000.0, 1.0, 1), None, Arc::default()).unwrap();
        let p50 = result.latency.value_at_quantile(0.5);
        let service_p50 = result.service.value_at_quantile(0.5);
        assert!(service_p50 < 5_000_000, "service p50 {service_p50} ns");
        assert!(
            p50 > 100_000_000,
            "corrected p50 {p50} ns shows no queueing"
        );
        assert!(result.achieved_rate() < 600.0, "{}", result.achieved_rate());
    }

    #[test]
    fn failed_replies_are_counted_by_kind_and_observed() {
        let target = Loopback {
            delay: Duration::ZERO,
            fail_every: 10,
        };
        let seen = Arc::new(Mutex::new(0u64));
        let observer: Observer = {
            let seen = Arc::clone(&seen);
            Arc::new(move |_: &Reply, _| *seen.lock().unwrap() += 1)
        };
        let result = run(
            &target,
            &plan(1000.0, 0.5, 8),
            Some(observer),
            Arc::default(),
        )
        .unwrap();
        let failed = result.errors.get("status_500").copied().unwrap_or(0);
        assert!(
            (45..=55).contains(&failed),
            "{failed} of {}",
            result.scheduled
        );
        assert_eq!(result.ok + failed, result.scheduled);
        assert!(*seen.lock().unwrap() >= result.scheduled);
    }
}
