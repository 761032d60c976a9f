//! Wiring of the daemon: store, models, writer, listeners, signals, drain.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::signal::unix::{SignalKind, signal};

use crate::config::ApplianceConfig;
use crate::http::{AppState, router};
use crate::ingest::Ingestor;
use crate::metrics::Metrics;
use crate::model::ServingModel;
use crate::reload::{self, ModelRegistry, ReloadRequest, ReloadTrigger};
use crate::service::{Heartbeats, ServiceManager};
use crate::store::Store;
use crate::stream::{StreamConsumer, StreamHealth};
use crate::tcp::{Shared, TcpServer};

/// The bundle a start-up would serve: the newest one that verifies.
pub fn newest_valid_model(config: &ApplianceConfig) -> Result<ServingModel> {
    let dir = &config.model.dir;
    let files = reload::candidates(dir)
        .with_context(|| format!("failed to list the model folder {}", dir.display()))?;
    let mut reasons = Vec::new();
    for file in files {
        match ServingModel::load(&file.path, config.model.verify_random_rows) {
            Ok(model) => return Ok(model),
            Err(error) => reasons.push(error.to_string()),
        }
    }
    if reasons.is_empty() {
        bail!("no *.onnx bundle in {}", dir.display());
    }
    bail!("every bundle was rejected:\n  {}", reasons.join("\n  "))
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

pub async fn run(config: ApplianceConfig) -> Result<()> {
    let service = ServiceManager::from_env();
    let metrics = Arc::new(Metrics::new());
    let telemetry = crate::telemetry::Telemetry::start(&config.telemetry, &metrics)
        .context("failed to start OpenTelemetry export")?;
    let store = Arc::new(Store::open(&config.store).context("failed to open the store")?);
    std::fs::create_dir_all(&config.model.dir).with_context(|| {
        format!(
            "failed to create the model folder {}",
            config.model.dir.display()
        )
    })?;
    let models = Arc::new(ModelRegistry::new(
        config.model.dir.clone(),
        config.model.verify_random_rows,
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
    let _reloader = reload::spawn_reloader(Arc::clone(&models), reload_rx)
        .context("failed to start the reload thread")?;
    let watcher = if config.model.watch {
        Some(
            reload::watch(&config.model.dir, reload_tx.clone())
                .with_context(|| format!("failed to watch {}", config.model.dir.display()))?,
        )
    } else {
        None
    };
    let (ingestor, writer) = Ingestor::start(
        Arc::clone(&store),
        Arc::clone(&metrics),
        config.store.max_batch_events,
    )
    .context("failed to start the store writer")?;

    let stream_health = config.kafka.enabled().then(|| {
        Arc::new(StreamHealth::new(Duration::from_millis(
            config.kafka.stale_after_ms,
        )))
    });
    let consumer = match &stream_health {
        Some(health) => Some(
            StreamConsumer::start(
                &config.kafka,
                Arc::clone(&store),
                ingestor.clone(),
                Arc::clone(&metrics),
                Arc::clone(health),
            )
            .context("failed to start the Kafka consumer")?,
        ),
        None => None,
    };

    let stop = Arc::new(AtomicBool::new(false));
    let grace = Duration::from_millis(config.shutdown_grace_ms);
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
    });
    let heartbeats = Arc::new(Heartbeats::new(if config.tcp.enabled {
        config.tcp.cores
    } else {
        0
    }));
    let tcp = if config.tcp.enabled {
        let shared = Arc::new(Shared {
            store: Arc::clone(&store),
            models: Arc::clone(&models),
            metrics: Arc::clone(&metrics),
            stop: Arc::clone(&stop),
            max_frame: config.tcp.max_frame_bytes as usize,
            grace,
            heartbeats: Arc::clone(&heartbeats),
        });
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

    let (drain_tx, drain_rx) = tokio::sync::oneshot::channel::<()>();
    // Without TCP_NODELAY a response written in two segments waits for the
    // client's delayed ACK: latency then tracks the gap between requests
    // (up to 40 ms), which the bench's HTTP mode showed.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, "failed to set TCP_NODELAY");
        }
    });
    let http = tokio::spawn(
        axum::serve(listener, router(Arc::clone(&state)))
            .with_graceful_shutdown(async {
                let _ = drain_rx.await;
            })
            .into_future(),
    );
    print_banner(&config, http_addr, tcp.as_ref(), &models);
    service.spawn_ready_when_serving(
        Arc::clone(&models),
        format!(
            "http {http_addr}, tcp {}",
            tcp.as_ref()
                .map_or_else(|| "disabled".to_owned(), |t| t.local_addr.to_string())
        ),
    );
    service.spawn_watchdog(heartbeats, Arc::clone(&store));

    let mut hangup = signal(SignalKind::hangup()).context("failed to install SIGHUP")?;
    let mut terminate = signal(SignalKind::terminate()).context("failed to install SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("failed to install SIGINT")?;
    loop {
        tokio::select! {
            _ = hangup.recv() => {
                tracing::info!("SIGHUP: reloading the model folder");
                service.reloading();
                let (reply, done) = tokio::sync::oneshot::channel();
                let _ = reload_tx.send(ReloadRequest { trigger: ReloadTrigger::Signal, reply: Some(reply) });
                tokio::spawn(async move {
                    if let Ok(report) = done.await {
                        service.ready(&format!("reloaded: {:?}", report.result));
                    }
                });
            }
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }

    tracing::info!(
        grace_ms = config.shutdown_grace_ms,
        "draining: no new connections, finishing in-flight requests"
    );
    service.stopping();
    stop.store(true, Ordering::Relaxed);
    state.tcp_ready.store(false, Ordering::Relaxed);
    if let Some(consumer) = consumer {
        stop_consumer(consumer, grace).await;
    }
    let _ = drain_tx.send(());
    match tokio::time::timeout(grace, http).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(error))) => tracing::error!(%error, "HTTP server failed"),
        Ok(Err(error)) => tracing::error!(%error, "HTTP server task failed"),
        Err(_) => tracing::warn!("HTTP drain timed out"),
    }
    if let Some(tcp) = tcp {
        let _ = tokio::task::spawn_blocking(move || tcp.join()).await;
    }
    drop(watcher);
    drop(reload_tx);
    drop(state);
    // The writer applies what is queued, then exits when its last handle is gone.
    let _ = tokio::task::spawn_blocking(move || writer.join()).await;
    // Last, so the final batches and the drain are exported too.
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    tracing::info!("stopped cleanly");
    Ok(())
}
