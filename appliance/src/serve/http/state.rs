//! What every handler shares: the store, the models, the writer, the
//! metrics and the readiness of the other listeners.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use axum::extract::State;

use crate::config::HttpConfig;
use crate::ingest::kafka::StreamHealth;
use crate::ingest::{Ingestor, Recorder};
use crate::model::{ModelRegistry, ReloadRequest};
use crate::ops::metrics::Metrics;
use crate::quality::LiveQuality;
use crate::quality::drift::DriftMonitor;
use crate::shard::Ownership;
use crate::store::Store;

#[derive(Debug)]
pub struct AppState {
    pub store: Arc<Store>,
    pub models: Arc<ModelRegistry>,
    pub metrics: Arc<Metrics>,
    pub ingestor: Ingestor,
    pub reload: std::sync::mpsc::Sender<ReloadRequest>,
    pub config: HttpConfig,
    /// The binary-protocol listeners are up (or disabled).
    pub tcp_ready: AtomicBool,
    /// The Kafka consumer's health, when one runs.
    pub stream: Option<Arc<StreamHealth>>,
    /// A stale stream makes /readyz fail (`kafka.unready_when_stale`).
    pub unready_when_stale: bool,
    /// Shard mode: who owns which user.
    pub ownership: Option<Arc<Ownership>>,
    /// Every scored cart goes to the writer through it.
    pub recorder: Recorder,
    /// The serving models' live quality.
    pub live: Arc<LiveQuality>,
    /// The serving model's feature drift.
    pub drift: Arc<DriftMonitor>,
}

/// What every handler extracts.
pub type App = State<Arc<AppState>>;
