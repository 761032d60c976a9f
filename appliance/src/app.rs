//! The daemon's life: [`build`] opens the store, loads a model and starts
//! every part (writer, stream, reloader, listeners); [`Running::serve`]
//! waits for signals (SIGHUP reloads); [`Running::drain`] stops in the order
//! that loses nothing: listeners, the consumer, in-flight requests, the
//! writer's queue, then telemetry.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::signal::unix::{SignalKind, signal};

use crate::config::{ApplianceConfig, INSTANCE_ID, KafkaMode};
use crate::ingest::kafka::{PredictionLog, StreamConsumer, StreamHealth};
use crate::ingest::{ClosedLoop, EventSource, Ingestor, LogDelivered, Recorder};
use crate::model::ServingModel;
use crate::model::reload::{
    self, ModelDirs, ModelRegistry, ReloadRequest, ReloadResult, ReloadTrigger,
};
use crate::model::serving::{FileIdentity, LoadLimits};
use crate::ops::heartbeat::Heartbeats;
use crate::ops::metrics::Metrics;
use crate::ops::systemd::ServiceManager;
use crate::ops::telemetry::{Mirrors, Telemetry};
use crate::quality::LiveQuality;
use crate::quality::drift::DriftMonitor;
use crate::serve::http::{AppState, router};
use crate::serve::tcp::{Shared, TcpServer};
use crate::shard::{Member, Ownership};
use crate::store::Store;

/// The bundle a start-up would serve: the newest one that verifies.
pub fn newest_valid_model(config: &ApplianceConfig) -> Result<(ServingModel, FileIdentity)> {
    let dir = &config.model.dir;
    let files = reload::candidates(dir)
        .with_context(|| format!("failed to list the model folder {}", dir.display()))?;
    let mut reasons = Vec::new();
    for file in files {
        match ServingModel::load(&file.path, LoadLimits::of(&config.model)) {
            Ok(loaded) => return Ok(loaded),
            Err(error) => reasons.push(error.to_string()),
        }
    }
    if reasons.is_empty() {
        bail!("no *.onnx bundle in {}", dir.display());
    }
    bail!("every bundle was rejected:\n  {}", reasons.join("\n  "))
}

/// Builds, serves until SIGTERM or SIGINT, and drains.
pub async fn run(config: ApplianceConfig) -> Result<()> {
    let running = build(config).await?;
    running.serve().await?;
    running.drain().await;
    Ok(())
}

/// Everything that runs, and what the drain must stop.
pub struct Running {
    config: ApplianceConfig,
    service: ServiceManager,
    store: Arc<Store>,
    models: Arc<ModelRegistry>,
    state: Arc<AppState>,
    telemetry: Telemetry,
    reload: std::sync::mpsc::Sender<ReloadRequest>,
    watcher: Option<notify::RecommendedWatcher>,
    writer: JoinHandle<()>,
    consumer: Option<StreamConsumer>,
    prediction_log: Option<PredictionLog>,
    tcp: Option<TcpServer>,
    /// What the TCP cores share, for [`Running::frame_handler`].
    tcp_shared: Option<Arc<Shared>>,
    http: tokio::task::JoinHandle<std::io::Result<()>>,
    http_addr: SocketAddr,
    drain_http: tokio::sync::oneshot::Sender<()>,
    /// Tells the TCP cores to stop accepting and finish what they hold.
    stop: Arc<AtomicBool>,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("http", &self.http_addr)
            .finish_non_exhaustive()
    }
}

/// Opens the store, loads the newest valid model, and starts the writer,
/// the Kafka consumer (when configured), the reloader and watcher, the TCP
/// cores and the HTTP server. Any failure here is reported before serving.
pub async fn build(config: ApplianceConfig) -> Result<Running> {
    let service = ServiceManager::from_env();
    let metrics = Arc::new(Metrics::new());
    let telemetry = Telemetry::start(
        &config.telemetry,
        &metrics,
        Mirrors {
            reload_outcomes: &ReloadResult::LABELS,
            event_sources: &EventSource::LABELS,
        },
    )
    .context("failed to start OpenTelemetry export")?;
    let store = Arc::new(
        Store::open(&config.store)
            .context("failed to open the store")?
            .with_prediction_log(config.kafka.logs_predictions()),
    );
    std::fs::create_dir_all(&config.model.dir).with_context(|| {
        format!(
            "failed to create the model folder {}",
            config.model.dir.display()
        )
    })?;
    let model_dirs = ModelDirs::of(&config.model);
    let models = Arc::new(ModelRegistry::new(
        model_dirs.clone(),
        LoadLimits::of(&config.model),
        config.model.canary_share,
        Arc::clone(&metrics),
    ));
    let startup = {
        let models = Arc::clone(&models);
        tokio::task::spawn_blocking(move || models.reload(ReloadTrigger::Startup))
            .await
            .context("failed to load the initial model")?
    };
    if startup.serving_version.is_none() {
        tracing::warn!(dir = %config.model.dir.display(), "no valid model bundle: not ready until one is delivered");
    }
    let (reload_tx, reload_rx) = std::sync::mpsc::channel::<ReloadRequest>();
    // The thread stops once every sender is gone.
    reload::spawn_reloader(Arc::clone(&models), reload_rx)
        .context("failed to start the reload thread")?;
    let watcher = if config.model.watch {
        Some(
            reload::watch(&model_dirs, reload_tx.clone())
                .with_context(|| format!("failed to watch {}", config.model.dir.display()))?,
        )
    } else {
        None
    };
    // The closed loop: scorers record every scored cart, the writer stores
    // and resolves them, the live windows start from what the store holds.
    let live = Arc::new(LiveQuality::new(
        config.model.live_window.get(),
        config.model.flip_threshold,
    ));
    live.observe(
        &store
            .recent_outcomes(config.model.live_window.get())
            .context("failed to read the stored outcomes")?
            .into_iter()
            .map(|(_, outcome)| outcome)
            .collect::<Vec<_>>(),
        None,
    );
    let drift = Arc::new(DriftMonitor::new(
        config.model.drift_window.get(),
        Arc::clone(&models),
    ));
    let (recorder, records) = Recorder::with(
        config.store.record_queue.get(),
        config.store.record_scores,
        &metrics,
    );
    let log_delivered = if config.kafka.logs_predictions() {
        let from = store
            .log_delivered()
            .context("failed to read the prediction log's positions")?;
        Some(Arc::new(LogDelivered::new(from)))
    } else {
        None
    };
    let (ingestor, writer) = Ingestor::start(
        Arc::clone(&store),
        Arc::clone(&metrics),
        config.store.max_batch_events.get(),
        ClosedLoop {
            records,
            live: Arc::clone(&live),
            drift: Arc::clone(&drift),
            log: log_delivered.clone(),
        },
    )
    .context("failed to start the store writer")?;
    let prediction_log = match log_delivered {
        Some(delivered) => Some(
            PredictionLog::start(
                &config.kafka,
                Arc::clone(&store),
                delivered,
                Arc::clone(&metrics),
                Duration::from_millis(config.shutdown_grace_ms),
            )
            .context("failed to start the prediction log")?,
        ),
        None => None,
    };

    let stream_health = config.kafka.enabled().then(|| {
        Arc::new(StreamHealth::new(Duration::from_millis(
            config.kafka.stale_after_ms,
        )))
    });
    let ownership = (config.kafka.enabled() && config.kafka.mode == KafkaMode::Shard).then(|| {
        Arc::new(Ownership::new(Member {
            member: config
                .kafka
                .properties
                .get(INSTANCE_ID)
                .cloned()
                .unwrap_or_default(),
            http: config
                .kafka
                .advertise_http
                .clone()
                .unwrap_or_else(|| config.http.listen.to_string()),
            tcp: config
                .kafka
                .advertise_tcp
                .clone()
                .or_else(|| config.tcp.enabled.then(|| config.tcp.listen.to_string())),
        }))
    });
    let consumer = match &stream_health {
        Some(health) => Some(
            StreamConsumer::start(
                &config.kafka,
                Arc::clone(&store),
                ingestor.clone(),
                Arc::clone(&metrics),
                Arc::clone(health),
                ownership.clone(),
            )
            .context("failed to start the Kafka consumer")?,
        ),
        None => None,
    };

    let stop = Arc::new(AtomicBool::new(false));
    let state = Arc::new(AppState {
        store: Arc::clone(&store),
        models: Arc::clone(&models),
        metrics: Arc::clone(&metrics),
        ingestor,
        reload: reload_tx.clone(),
        config: config.http.clone(),
        tcp_ready: AtomicBool::new(!config.tcp.enabled),
        stream: stream_health,
        unready_when_stale: config.kafka.unready_when_stale,
        ownership: ownership.clone(),
        recorder: recorder.clone(),
        live,
        drift,
    });
    let heartbeats = Arc::new(Heartbeats::new(if config.tcp.enabled {
        config.tcp.cores
    } else {
        0
    }));
    let mut tcp_shared = None;
    let tcp = if config.tcp.enabled {
        let shared = Arc::new(Shared {
            store: Arc::clone(&store),
            models: Arc::clone(&models),
            metrics: Arc::clone(&metrics),
            stop: Arc::clone(&stop),
            max_frame: config.tcp.max_frame_bytes as usize,
            grace: Duration::from_millis(config.shutdown_grace_ms),
            heartbeats: Arc::clone(&heartbeats),
            ownership,
            recorder,
            open: std::sync::atomic::AtomicUsize::new(0),
            max_connections: config.tcp.max_connections.get(),
            idle_timeout: (config.tcp.idle_timeout_ms > 0)
                .then(|| Duration::from_millis(config.tcp.idle_timeout_ms)),
            write_timeout: Duration::from_millis(config.tcp.write_timeout_ms),
        });
        tcp_shared = Some(Arc::clone(&shared));
        let server = TcpServer::start(&config.tcp, shared)
            .context("failed to start the binary-protocol server")?;
        state.tcp_ready.store(true, Ordering::Relaxed);
        Some(server)
    } else {
        None
    };
    let listener = tokio::net::TcpListener::bind(config.http.listen)
        .await
        .with_context(|| format!("failed to listen on {} for HTTP", config.http.listen))?;
    let http_addr = listener
        .local_addr()
        .context("failed to read the HTTP address")?;
    tracing::info!(%http_addr, "HTTP API listening");
    let (drain_http, drained) = tokio::sync::oneshot::channel::<()>();
    let http = {
        let (router, config, metrics) = (
            router(Arc::clone(&state)),
            config.http.clone(),
            Arc::clone(&metrics),
        );
        tokio::spawn(async move {
            crate::serve::http::server::serve(listener, router, &config, metrics, drained).await;
            Ok(())
        })
    };

    print_banner(&config, http_addr, tcp.as_ref(), &models);
    let serving = Arc::clone(&models);
    service.spawn_ready_when_serving(
        move || serving.current().map(|m| m.version().to_owned()),
        format!(
            "http {http_addr}, tcp {}",
            tcp.as_ref()
                .map_or_else(|| "disabled".to_owned(), |t| t.local_addr.to_string())
        ),
    );
    let readable = Arc::clone(&store);
    service.spawn_watchdog(heartbeats, move || {
        readable.reader().map(drop).map_err(|e| e.to_string())
    });
    Ok(Running {
        config,
        service,
        store,
        models,
        state,
        telemetry,
        reload: reload_tx,
        watcher,
        writer,
        consumer,
        prediction_log,
        tcp,
        tcp_shared,
        http,
        http_addr,
        drain_http,
        stop,
    })
}

impl Running {
    /// The HTTP API as a service, to call without a socket (the fuzzer).
    pub fn router(&self) -> axum::Router {
        router(Arc::clone(&self.state))
    }

    /// The TCP request handling of one core, without a socket (the fuzzer);
    /// `None` with `tcp.enabled = false`.
    pub fn frame_handler(&self) -> Option<crate::serve::tcp::FrameHandler> {
        self.tcp_shared
            .as_ref()
            .map(|shared| crate::serve::tcp::FrameHandler::new(Arc::clone(shared)))
    }

    /// Serves until SIGTERM or SIGINT; SIGHUP reloads the model folder.
    pub async fn serve(&self) -> Result<()> {
        let mut hangup = signal(SignalKind::hangup()).context("failed to install SIGHUP")?;
        let mut terminate = signal(SignalKind::terminate()).context("failed to install SIGTERM")?;
        let mut interrupt = signal(SignalKind::interrupt()).context("failed to install SIGINT")?;
        loop {
            tokio::select! {
                _ = hangup.recv() => self.reload_on_signal(),
                _ = terminate.recv() => return Ok(()),
                _ = interrupt.recv() => return Ok(()),
            }
        }
    }

    fn reload_on_signal(&self) {
        tracing::info!("SIGHUP: reloading the model folder");
        self.service.reloading();
        let (reply, done) = tokio::sync::oneshot::channel();
        let _ = self.reload.send(ReloadRequest {
            trigger: ReloadTrigger::Signal,
            reply: Some(reply),
        });
        let service = self.service;
        tokio::spawn(async move {
            if let Ok(report) = done.await {
                service.ready(&format!("reloaded: {:?}", report.result));
            }
        });
    }

    /// Stops accepting, answers what was received, applies what is queued,
    /// and flushes telemetry; each step waits at most `shutdown_grace_ms`.
    pub async fn drain(self) {
        let grace = Duration::from_millis(self.config.shutdown_grace_ms);
        tracing::info!(
            grace_ms = self.config.shutdown_grace_ms,
            "draining: no new connections, finishing in-flight requests"
        );
        self.service.stopping();
        self.stop.store(true, Ordering::Relaxed);
        self.state.tcp_ready.store(false, Ordering::Relaxed);
        if let Some(consumer) = self.consumer {
            stop_consumer(consumer, grace).await;
        }
        let _ = self.drain_http.send(());
        match tokio::time::timeout(grace, self.http).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(error))) => tracing::error!(%error, "HTTP server failed"),
            Ok(Err(error)) => tracing::error!(%error, "HTTP server task failed"),
            Err(_) => tracing::warn!("HTTP drain timed out"),
        }
        if let Some(tcp) = self.tcp {
            let _ = tokio::task::spawn_blocking(move || tcp.join()).await;
        }
        // After the scorers, before the writer: its last positions are
        // stored with the writer's last transaction. Bounded by its flush.
        if let Some(log) = self.prediction_log {
            let _ = tokio::task::spawn_blocking(move || log.stop()).await;
        }
        drop(self.watcher);
        drop(self.reload);
        drop(self.state);
        drop(self.models);
        drop(self.store);
        // The writer applies what is queued, then exits when its last handle is gone.
        let writer = self.writer;
        let _ = tokio::task::spawn_blocking(move || writer.join()).await;
        // Last, so the final batches and the drain are exported too.
        let telemetry = self.telemetry;
        let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
        tracing::info!("stopped cleanly");
    }
}

/// Stops the consumer (it applies the batch in hand, so the stored offsets
/// cover it), but waits at most `grace`: with the broker gone, librdkafka's
/// final flush and close can block for minutes, and nothing of the state
/// depends on them (offsets live in the same LMDB transactions as the state;
/// outputs not acknowledged are sent again on restart). A plain thread, not
/// the runtime's blocking pool, which the runtime would wait for on exit.
async fn stop_consumer(consumer: StreamConsumer, grace: Duration) {
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("kafka-stop".into())
        .spawn(move || {
            consumer.stop();
            let _ = done_tx.send(());
        });
    if let Err(error) = spawned {
        tracing::error!(%error, "failed to start the consumer's stop");
        return;
    }
    if tokio::time::timeout(grace, done_rx).await.is_err() {
        tracing::warn!(
            grace_ms = grace.as_millis() as u64,
            "the Kafka client did not close in time (broker unreachable?); exiting without it"
        );
    }
}

fn print_banner(
    config: &ApplianceConfig,
    http: SocketAddr,
    tcp: Option<&TcpServer>,
    models: &ModelRegistry,
) {
    let model = models.current().map_or_else(
        || "NO MODEL (not ready; drop a bundle into the model folder)".to_owned(),
        |m| {
            format!(
                "model {} ({} evaluator, {} trees)",
                m.version(),
                m.evaluator_name(),
                m.trees
            )
        },
    );
    let tcp = tcp.map_or_else(
        || "disabled".to_owned(),
        |t| {
            format!(
                "{} ({}, {} cores)",
                t.local_addr, t.driver, config.tcp.cores
            )
        },
    );
    println!(
        "cartscore {version} is serving {model}\n  \
         HTTP   http://{http}\n  \
         TCP    {tcp}\n  \
         store  {store}   models {dir}\n  \
         events {events}\n\
         Try it:\n  \
         curl -s http://{http}/v1/events -d '{{\"event_time\":\"2019-10-01 09:00:00 UTC\",\"event_type\":\"view\",\"product_id\":1004856,\"category_id\":2053013555631882655,\"category_code\":\"electronics.smartphone\",\"brand\":\"samsung\",\"price\":130.76,\"user_id\":543272936,\"user_session\":\"demo-session\"}}'\n  \
         curl -s 'http://{http}/v1/score?explain=true' -d '{{\"event_time\":\"2019-10-01 09:01:00 UTC\",\"event_type\":\"cart\",\"product_id\":1004856,\"category_id\":2053013555631882655,\"category_code\":\"electronics.smartphone\",\"brand\":\"samsung\",\"price\":130.76,\"user_id\":543272936,\"user_session\":\"demo-session\"}}'\n  \
         curl -s http://{http}/v1/sessions/demo-session\n  \
         curl -s http://{http}/metrics\n\
         Stop with Ctrl-C (SIGTERM drains in-flight requests).",
        version = env!("CARGO_PKG_VERSION"),
        store = config.store.path.display(),
        dir = config.model.dir.display(),
        events = if config.kafka.enabled() {
            format!(
                "Kafka {} group {} topics {}",
                config.kafka.brokers,
                config.kafka.group_id,
                config.kafka.topics.join(",")
            )
        } else {
            "POST /v1/events (no Kafka configured)".to_owned()
        },
    );
}
