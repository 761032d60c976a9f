//! The thread-per-core binary-protocol server. Each core runs its own monoio
//! runtime (io_uring, or epoll where io_uring is unavailable) with its own
//! SO_REUSEPORT listener, so the kernel spreads connections and a request
//! never crosses threads. Requests are read in batches; all complete frames
//! in a read are answered from one store snapshot and one model handle, and
//! their responses leave in one write (pipelining for free).

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use monoio::buf::IoBufMut;
use monoio::io::{AsyncWriteRentExt, CancelableAsyncReadRent, Canceller};
use monoio::net::{ListenerOpts, TcpListener, TcpStream};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;

use cartscore_protocol::{self as protocol, Kind, Redirect, ScoreFrame, Status};

use crate::config::{IoDriver, TcpConfig};
use crate::error::{Code, ErrorCode};
use crate::ingest::Recorder;
use crate::model::ModelSet;
use crate::model::reload::{ModelCache, ModelRegistry};
use crate::ops::heartbeat::{HEARTBEAT_EVERY, Heartbeats};
use crate::ops::metrics::{ApiLabels, ConnectionLabels, Metrics, OutcomeLabels, ReasonLabels};
use crate::serve::score;
use crate::shard::Ownership;
use crate::store::{Store, StoreReader};
use cartscore_core::Event;
use cartscore_core::shap::Explanation;
use prometheus_client::metrics::family::Family;

const READ_CHUNK: usize = 16 * 1024;
const STOP_POLL: Duration = Duration::from_millis(100);

/// What every core shares.
#[derive(Debug)]
pub struct Shared {
    pub store: Arc<Store>,
    pub models: Arc<ModelRegistry>,
    pub metrics: Arc<Metrics>,
    pub stop: Arc<AtomicBool>,
    pub max_frame: usize,
    pub grace: Duration,
    /// Each core stamps its slot from its own runtime (the watchdog reads them).
    pub heartbeats: Arc<Heartbeats>,
    /// Shard mode: who owns which user.
    pub ownership: Option<Arc<Ownership>>,
    /// Every scored cart goes to the writer through it.
    pub recorder: Recorder,
    /// Connections open over all cores, and the most held.
    pub open: std::sync::atomic::AtomicUsize,
    pub max_connections: usize,
    /// No complete frame for this long closes a connection (None: never).
    pub idle_timeout: Option<Duration>,
    /// Answers that cannot be written for this long close it.
    pub write_timeout: Duration,
}

/// Per-core state: this core's handle on the model set (it follows a swap at
/// the next batch of requests) and metric handles resolved once, so a
/// request touches no shared map and no lock.
struct Core {
    shared: Arc<Shared>,
    model: RefCell<ModelCache>,
    open_connections: Cell<usize>,
    outcomes: [Counter; Status::ALL.len()],
    redirects: Counter,
    duration: Histogram,
    refused: Counter,
    idle_closed: Counter,
    write_closed: Counter,
}

impl Core {
    fn new(shared: Arc<Shared>) -> Self {
        let outcome = |status: Status| {
            shared
                .metrics
                .tcp_requests
                .get_or_create(&OutcomeLabels {
                    outcome: status.label(),
                })
                .clone()
        };
        let outcomes = Status::ALL.map(outcome);
        let duration = shared.metrics.tcp_duration.clone();
        let redirects = shared
            .metrics
            .shard
            .redirects
            .get_or_create(&ApiLabels { api: "tcp" })
            .clone();
        let connections = |family: &Family<ConnectionLabels, Counter>, reason| {
            family
                .get_or_create(&ConnectionLabels { api: "tcp", reason })
                .clone()
        };
        let metrics = &shared.metrics;
        Self {
            refused: connections(&metrics.connections_refused, "max_connections"),
            idle_closed: connections(&metrics.connections_closed, "idle_timeout"),
            write_closed: connections(&metrics.connections_closed, "write_timeout"),
            model: RefCell::new(shared.models.cache()),
            shared,
            open_connections: Cell::new(0),
            outcomes,
            redirects,
            duration,
        }
    }
}

/// What a core does with the bytes it read, without the network: the frame
/// decoder and the request handling, answering into a buffer (the fuzzer
/// and tests drive it directly). Not `Send`: one per thread, like a core.
pub struct FrameHandler(Core);

impl std::fmt::Debug for FrameHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameHandler").finish_non_exhaustive()
    }
}

impl FrameHandler {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self(Core::new(shared))
    }

    /// Answers every complete frame in `input` (and removes it); true when
    /// the connection would be closed (a malformed frame).
    pub fn answer(&self, input: &mut Vec<u8>, output: &mut Vec<u8>) -> bool {
        answer_frames(&self.0, input, output)
    }
}

#[derive(Debug)]
pub struct TcpServer {
    pub local_addr: SocketAddr,
    pub driver: &'static str,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl TcpServer {
    /// Binds one listener per core and starts serving. Errors (address in
    /// use, no permission) are returned before anything serves.
    pub fn start(config: &TcpConfig, shared: Arc<Shared>) -> std::io::Result<Self> {
        let mut threads = Vec::with_capacity(config.cores);
        let mut addr = config.listen;
        let mut driver_name = "";
        for core in 0..config.cores {
            let (bound_tx, bound_rx) = std::sync::mpsc::channel();
            let shared = Arc::clone(&shared);
            let driver = config.driver;
            let thread = std::thread::Builder::new()
                .name(format!("tcp-core-{core}"))
                .spawn(move || run_core(core, driver, addr, shared, bound_tx))?;
            let (bound, name) = bound_rx
                .recv()
                .map_err(|_| std::io::Error::other("serving core exited while binding"))??;
            // With port 0 the first core picks the port; the others share it.
            addr = bound;
            driver_name = name;
            threads.push(thread);
        }
        tracing::info!(%addr, cores = config.cores, driver = driver_name, "binary protocol listening");
        Ok(Self {
            local_addr: addr,
            driver: driver_name,
            threads,
        })
    }

    /// Waits for every core to finish draining (after `stop` was set).
    pub fn join(self) {
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}

type Bound = std::io::Result<(SocketAddr, &'static str)>;

fn run_core(
    index: usize,
    driver: IoDriver,
    addr: SocketAddr,
    shared: Arc<Shared>,
    bound: std::sync::mpsc::Sender<Bound>,
) {
    let uring = driver == IoDriver::Auto && monoio::utils::detect_uring();
    let name = if uring { "io_uring" } else { "epoll" };
    let serve = serve_core(index, addr, shared, bound.clone(), name);
    let runtime = if uring {
        monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
            .enable_timer()
            .build()
            .map(|mut rt| rt.block_on(serve))
    } else {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .map(|mut rt| rt.block_on(serve))
    };
    if let Err(error) = runtime {
        let _ = bound.send(Err(error));
    }
}

async fn serve_core(
    index: usize,
    addr: SocketAddr,
    shared: Arc<Shared>,
    bound: std::sync::mpsc::Sender<Bound>,
    driver: &'static str,
) {
    let opts = ListenerOpts::new()
        .reuse_port(true)
        .reuse_addr(true)
        .backlog(1024);
    let listener = match TcpListener::bind_with_config(addr, &opts) {
        Ok(listener) => listener,
        Err(error) => {
            let _ = bound.send(Err(std::io::Error::new(
                error.kind(),
                format!("cannot listen on {addr}: {error}"),
            )));
            return;
        }
    };
    let local = listener.local_addr().unwrap_or(addr);
    let _ = bound.send(Ok((local, driver)));
    let core = Rc::new(Core::new(shared));
    monoio::spawn(heartbeat(index, Rc::clone(&core)));
    loop {
        monoio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    if core.shared.open.load(Ordering::Relaxed) >= core.shared.max_connections {
                        core.refused.inc();
                        drop(stream);
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    monoio::spawn(serve_connection(stream, Rc::clone(&core)));
                }
                Err(error) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(%error, "accept failed");
                    monoio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            () = stopped(&core.shared.stop) => break,
        }
    }
    drop(listener);
    let deadline = Instant::now() + core.shared.grace;
    while core.open_connections.get() > 0 && Instant::now() < deadline {
        monoio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Runs on the core's own runtime: when the core is wedged, it stops.
async fn heartbeat(index: usize, core: Rc<Core>) {
    while !core.shared.stop.load(Ordering::Relaxed) {
        core.shared.heartbeats.beat(index);
        monoio::time::sleep(HEARTBEAT_EVERY).await;
    }
}

async fn stopped(stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        monoio::time::sleep(STOP_POLL).await;
    }
}

struct OpenConnection<'a>(&'a Core);

impl<'a> OpenConnection<'a> {
    fn new(core: &'a Core) -> Self {
        core.open_connections.set(core.open_connections.get() + 1);
        core.shared.open.fetch_add(1, Ordering::Relaxed);
        core.shared.metrics.tcp_connections.inc();
        Self(core)
    }
}

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        self.0
            .open_connections
            .set(self.0.open_connections.get() - 1);
        self.0.shared.open.fetch_sub(1, Ordering::Relaxed);
        self.0.shared.metrics.tcp_connections.dec();
    }
}

/// Resolves after `limit` (never without one).
async fn idle(limit: Option<Duration>) {
    match limit {
        Some(limit) => monoio::time::sleep(limit).await,
        None => std::future::pending().await,
    }
}

async fn serve_connection(mut stream: TcpStream, core: Rc<Core>) {
    let _open = OpenConnection::new(&core);
    let mut input: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    let mut output: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    // A frame answered moves the deadline; bytes that make no whole frame
    // (one a minute) do not.
    let mut deadline = core.shared.idle_timeout.map(|t| Instant::now() + t);
    loop {
        if input.capacity() - input.len() < READ_CHUNK / 4 {
            input.reserve(READ_CHUNK);
        }
        let filled = input.len();
        let mut timed_out = false;
        let (result, slice) = {
            let canceller = Canceller::new();
            let read = stream.cancelable_read(input.slice_mut(filled..), canceller.handle());
            let mut read = std::pin::pin!(read);
            monoio::select! {
                biased;
                done = &mut read => done,
                () = stopped(&core.shared.stop) => {
                    // Draining: take what already arrived, then close.
                    let _canceller = canceller.cancel();
                    (&mut read).await
                }
                () = idle(deadline.map(|d| d.saturating_duration_since(Instant::now()))) => {
                    timed_out = true;
                    let _canceller = canceller.cancel();
                    (&mut read).await
                }
            }
        };
        input = slice.into_inner();
        // End of stream, an error, or (draining) a cancelled read that found
        // nothing more to answer.
        match result {
            Ok(0) | Err(_) => {
                if timed_out {
                    core.idle_closed.inc();
                }
                return;
            }
            Ok(_) => {}
        }
        let close = answer_frames(&core, &mut input, &mut output);
        if !output.is_empty() {
            deadline = core.shared.idle_timeout.map(|t| Instant::now() + t);
            // A client that does not read its answers is closed, not
            // waited for: its unread answers are all it holds of ours.
            match monoio::time::timeout(core.shared.write_timeout, stream.write_all(output)).await {
                Ok((written, buf)) => {
                    output = buf;
                    output.clear();
                    if written.is_err() {
                        return;
                    }
                }
                Err(_) => {
                    core.write_closed.inc();
                    return;
                }
            }
        }
        // While draining, keep answering what the client already sent; the
        // next read that finds nothing ends the connection.
        if close {
            return;
        }
    }
}

/// Answers every complete frame in `input` and removes them from it.
/// Returns true when the connection must close (a malformed frame).
fn answer_frames(core: &Core, input: &mut Vec<u8>, output: &mut Vec<u8>) -> bool {
    let set = core.model.borrow_mut().load().clone();
    let shared = &core.shared;
    let mut reader: Option<StoreReader<'_>> = None;
    let started = Instant::now();
    let mut frames = Vec::new();
    let mut consumed = 0;
    let mut malformed = None;
    loop {
        match protocol::parse_request(&input[consumed..], shared.max_frame) {
            Ok(Some((frame, used))) => {
                frames.push(frame);
                consumed += used;
            }
            Ok(None) => break,
            Err(error) => {
                malformed = Some(error);
                break;
            }
        }
    }
    // The frames of one read are scored together: one model call per model
    // for all of them (the compiled evaluator walks several rows at once).
    let statuses = if frames.len() > 1 {
        answer_batch(core, &set, &mut reader, &frames, output)
    } else {
        frames
            .iter()
            .map(|frame| answer(core, &set, &mut reader, frame, output))
            .collect()
    };
    let seconds = started.elapsed().as_secs_f64();
    for status in statuses {
        core.outcomes[status as usize].inc();
        if status == Status::NotOwner {
            core.redirects.inc();
        }
        core.duration.observe(seconds);
    }
    let close = malformed.is_some();
    if let Some(error) = malformed {
        let version = set.primary().map_or("", |m| m.version());
        protocol::encode_response(
            output,
            &protocol::Answer {
                request_id: 0,
                status: error.status(),
                session_known: false,
                probability: f32::NAN,
                model_version: version,
                message: &error.to_string(),
                explanation: None,
            },
        );
        core.outcomes[error.status() as usize].inc();
        shared
            .metrics
            .tcp_frame_errors
            .get_or_create(&ReasonLabels {
                reason: error.reason(),
            })
            .inc();
        let closed = match error {
            protocol::FrameError::TooLarge { .. } => "frame_too_large",
            _ => "malformed_frame",
        };
        shared
            .metrics
            .connections_closed
            .get_or_create(&ConnectionLabels {
                api: "tcp",
                reason: closed,
            })
            .inc();
    }
    drop(frames);
    input.drain(..consumed);
    close
}

/// Why a request got no score: its status and what to tell the client.
struct Refusal {
    status: Status,
    message: String,
}

fn refuse(error: &dyn ErrorCode) -> Refusal {
    Refusal {
        status: error.error_code().tcp(),
        // A redirect's message is machine-read by clients (`Redirect::parse`).
        message: error
            .redirect()
            .map_or_else(|| error.to_string(), Redirect::to_message),
    }
}

fn answer<'s>(
    core: &'s Core,
    set: &ModelSet,
    reader: &mut Option<StoreReader<'s>>,
    frame: &ScoreFrame<'_>,
    output: &mut Vec<u8>,
) -> Status {
    let primary = set.primary().map_or("", |m| m.version());
    let result = score_frame(core, set, reader, frame);
    encode_result(output, frame.request_id, primary, result)
}

/// Answers `frames` in order, scoring their carts as one batch.
fn answer_batch<'s>(
    core: &'s Core,
    set: &ModelSet,
    reader: &mut Option<StoreReader<'s>>,
    frames: &[ScoreFrame<'_>],
    output: &mut Vec<u8>,
) -> Vec<Status> {
    let primary = set.primary().map_or("", |m| m.version());
    let events: Vec<Result<Event, Refusal>> = frames
        .iter()
        .map(|frame| {
            let event = frame.to_event().map_err(|e| refuse(&e))?;
            if set.primary().is_none() {
                return Err(Refusal {
                    status: Code::ModelUnavailable.tcp(),
                    message: "no model is loaded".into(),
                });
            }
            Ok(event)
        })
        .collect();
    let shared = &core.shared;
    let valid: Vec<&Event> = events.iter().filter_map(|e| e.as_ref().ok()).collect();
    let mut answers = if valid.is_empty() {
        Vec::new()
    } else {
        if reader.is_none() {
            match shared.store.reader() {
                Ok(snapshot) => *reader = Some(snapshot),
                Err(error) => {
                    let refusal = refuse(&error);
                    return frames
                        .iter()
                        .map(|frame| {
                            encode_refusal(output, frame.request_id, primary, &refusal);
                            refusal.status
                        })
                        .collect();
                }
            }
        }
        let Some(snapshot) = reader.as_ref() else {
            return Vec::new();
        };
        score::answer_batch(
            set,
            snapshot,
            shared.ownership.as_deref(),
            &valid,
            &shared.metrics.challenger,
        )
    }
    .into_iter();
    frames
        .iter()
        .zip(&events)
        .map(|(frame, event)| {
            let result = match event {
                Err(refusal) => Err(Refusal {
                    status: refusal.status,
                    message: refusal.message.clone(),
                }),
                Ok(event) => match answers.next() {
                    Some(Ok(answer)) => {
                        shared.recorder.record(|| score::record_of(event, &answer));
                        explain_frame(core, frame, answer)
                    }
                    Some(Err(error)) => Err(refuse(&error)),
                    None => Err(Refusal {
                        status: Status::InternalError,
                        message: "no answer".into(),
                    }),
                },
            };
            encode_result(output, frame.request_id, primary, result)
        })
        .collect()
}

fn encode_refusal(output: &mut Vec<u8>, request_id: u64, version: &str, refusal: &Refusal) {
    protocol::encode_response(
        output,
        &protocol::Answer {
            request_id,
            status: refusal.status,
            session_known: false,
            probability: f32::NAN,
            model_version: version,
            message: &refusal.message,
            explanation: None,
        },
    );
}

/// Encodes a scored (and maybe explained) answer or a refusal; its status.
fn encode_result(
    output: &mut Vec<u8>,
    request_id: u64,
    primary: &str,
    result: Result<(score::Answer<'_>, Option<Explanation>), Refusal>,
) -> Status {
    match result {
        Ok((answer, explanation)) => {
            protocol::encode_response(
                output,
                &protocol::Answer {
                    request_id,
                    status: Status::Ok,
                    session_known: answer.scored.session_known,
                    probability: answer.scored.probability,
                    model_version: answer.served.version(),
                    message: "",
                    explanation: explanation
                        .as_ref()
                        .map(|e| (e.base_value, e.contributions.as_slice())),
                },
            );
            Status::Ok
        }
        Err(refusal) => {
            encode_refusal(output, request_id, primary, &refusal);
            refusal.status
        }
    }
}

/// The answer, with its explanation for an explain request.
fn explain_frame<'m>(
    core: &Core,
    frame: &ScoreFrame<'_>,
    answer: score::Answer<'m>,
) -> Result<(score::Answer<'m>, Option<Explanation>), Refusal> {
    match frame.kind {
        Kind::Score => Ok((answer, None)),
        Kind::Explain => {
            let explanation = answer
                .served
                .explain(&answer.scored.row)
                .map_err(|e| refuse(&e))?;
            core.shared.metrics.challenger.explanations.inc();
            Ok((answer, Some(explanation)))
        }
    }
}

/// The frame's cart scored (and explained, for an explain request) from
/// one snapshot (opened by the first request of a read and shared by the
/// rest).
fn score_frame<'s, 'm>(
    core: &'s Core,
    set: &'m ModelSet,
    reader: &mut Option<StoreReader<'s>>,
    frame: &ScoreFrame<'_>,
) -> Result<(score::Answer<'m>, Option<Explanation>), Refusal> {
    let event = frame.to_event().map_err(|e| refuse(&e))?;
    if set.primary().is_none() {
        return Err(Refusal {
            status: Code::ModelUnavailable.tcp(),
            message: "no model is loaded".into(),
        });
    }
    if reader.is_none() {
        *reader = Some(core.shared.store.reader().map_err(|e| refuse(&e))?);
    }
    let Some(snapshot) = reader.as_ref() else {
        return Err(Refusal {
            status: Status::InternalError,
            message: "no store snapshot".into(),
        });
    };
    let shared = &core.shared;
    let answer = score::answer(
        set,
        snapshot,
        shared.ownership.as_deref(),
        &event,
        &shared.metrics.challenger,
    )
    .map_err(|e| refuse(&e))?;
    shared.recorder.record(|| score::record_of(&event, &answer));
    explain_frame(core, frame, answer)
}
