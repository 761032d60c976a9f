//! Hot reload: the newest valid bundle in the model folder serves. Loading
//! and verification happen on the reload thread, never on a serving core;
//! the result is swapped in atomically (arc-swap) and each core picks it up
//! between two requests. A bad file is rejected with its reason and the old
//! model keeps serving.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::{ArcSwapOption, Cache};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use serde::Serialize;

use crate::model::serving::{FileIdentity, ServingModel};
use crate::ops::metrics::{Metrics, ModelLabels, OutcomeLabels, VersionLabels};
use crate::ops::telemetry;

/// How long file events are coalesced before a reload: a rename arrives as
/// several events, and an editor may write a file in a few steps.
const DEBOUNCE: Duration = Duration::from_millis(50);
const REMEMBERED_REJECTIONS: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReloadTrigger {
    Startup,
    Watch,
    Signal,
    Admin,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReloadResult {
    /// A new bundle was verified and now serves.
    Loaded,
    /// The newest valid bundle is the one already serving.
    Unchanged,
    /// A newer bundle was refused; the previous model (if any) still serves.
    Rejected,
    /// No loadable bundle in the folder and none serving.
    NoModel,
}

impl ReloadResult {
    pub const LABELS: [&'static str; 4] = ["loaded", "unchanged", "rejected", "no_model"];

    pub fn label(self) -> &'static str {
        Self::LABELS[self as usize]
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Rejection {
    pub file: FileIdentity,
    pub reason: String,
    pub at_unix_seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReloadReport {
    pub trigger: ReloadTrigger,
    pub result: ReloadResult,
    pub at_unix_seconds: f64,
    pub duration_ms: f64,
    /// The version serving after this reload.
    pub serving_version: Option<String>,
    pub loaded_path: Option<PathBuf>,
    /// Files refused by this reload, newest first.
    pub rejected: Vec<Rejection>,
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// A name the appliance will load: `*.onnx`, not hidden. Anything else
/// (`.model.onnx.tmp`, `model.onnx.partial`, `model.onnx~`) is a file still
/// being delivered or not a bundle at all.
pub fn is_candidate_name(name: &str) -> bool {
    !name.starts_with('.') && name.ends_with(".onnx") && name.len() > ".onnx".len()
}

/// Candidate bundles, newest first (modification time, then name).
pub fn candidates(dir: &Path) -> std::io::Result<Vec<FileIdentity>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !is_candidate_name(name) || !entry.file_type()?.is_file() {
            continue;
        }
        // A file can vanish between listing and stat; skip it.
        if let Ok(identity) = FileIdentity::of(&entry.path()) {
            files.push(identity);
        }
    }
    files.sort_by(|a, b| (b.modified_unix_nanos, &b.path).cmp(&(a.modified_unix_nanos, &a.path)));
    Ok(files)
}

#[derive(Debug, Default)]
struct ReloadHistory {
    last: Option<ReloadReport>,
    rejected: Vec<Rejection>,
}

pub type ModelCache = Cache<Arc<ArcSwapOption<ServingModel>>, Option<Arc<ServingModel>>>;

#[derive(Debug)]
pub struct ModelRegistry {
    dir: PathBuf,
    verify_rows: usize,
    active: Arc<ArcSwapOption<ServingModel>>,
    history: Mutex<ReloadHistory>,
    reloading: Mutex<()>,
    metrics: Arc<Metrics>,
}

impl ModelRegistry {
    pub fn new(dir: PathBuf, verify_rows: usize, metrics: Arc<Metrics>) -> Self {
        // Known before the first reload, so `increase()` alerts work at once.
        for outcome in ReloadResult::LABELS {
            let _ = metrics
                .model_reloads
                .get_or_create(&OutcomeLabels { outcome });
        }
        Self {
            dir,
            verify_rows,
            active: Arc::new(ArcSwapOption::empty()),
            history: Mutex::new(ReloadHistory::default()),
            reloading: Mutex::new(()),
            metrics,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn current(&self) -> Option<Arc<ServingModel>> {
        self.active.load_full()
    }

    /// A per-core view that costs one atomic load per request while the
    /// model is unchanged and follows a swap at the next request.
    pub fn cache(&self) -> ModelCache {
        Cache::new(Arc::clone(&self.active))
    }

    pub fn last_report(&self) -> Option<ReloadReport> {
        self.history.lock().ok().and_then(|h| h.last.clone())
    }

    pub fn recent_rejections(&self) -> Vec<Rejection> {
        self.history
            .lock()
            .map(|h| h.rejected.clone())
            .unwrap_or_default()
    }

    fn known_bad(&self, file: &FileIdentity) -> bool {
        self.history
            .lock()
            .map(|h| h.rejected.iter().any(|r| &r.file == file))
            .unwrap_or(false)
    }

    /// Loads the newest valid bundle if it is not the one serving.
    pub fn reload(&self, trigger: ReloadTrigger) -> ReloadReport {
        let _one_at_a_time = self.reloading.lock();
        let mut span = telemetry::span("model.reload");
        let started = Instant::now();
        let serving_file = self.current().map(|m| m.file.clone());
        let mut rejected = Vec::new();
        let mut loaded: Option<Arc<ServingModel>> = None;
        match candidates(&self.dir) {
            Ok(files) => {
                for file in files {
                    // Older files than the serving one are not candidates.
                    if Some(&file) == serving_file.as_ref() {
                        break;
                    }
                    if self.known_bad(&file) {
                        continue;
                    }
                    match ServingModel::load(&file.path, self.verify_rows) {
                        Ok(model) => {
                            loaded = Some(Arc::new(model));
                            break;
                        }
                        Err(error) => {
                            tracing::error!(path = %file.path.display(), %error, "model bundle rejected; the previous model keeps serving");
                            rejected.push(Rejection {
                                file,
                                reason: error.to_string(),
                                at_unix_seconds: unix_now(),
                            });
                        }
                    }
                }
            }
            Err(error) => {
                tracing::error!(dir = %self.dir.display(), %error, "cannot list the model folder");
                rejected.push(Rejection {
                    file: FileIdentity {
                        path: self.dir.clone(),
                        size: 0,
                        modified_unix_nanos: 0,
                    },
                    reason: format!("cannot list {}: {error}", self.dir.display()),
                    at_unix_seconds: unix_now(),
                });
            }
        }
        if let Some(model) = &loaded {
            self.active.store(Some(Arc::clone(model)));
            self.metrics.model_info.clear();
            self.metrics
                .model_info
                .get_or_create(&ModelLabels {
                    version: model.version().to_owned(),
                    contract: model.metadata.contract_version.to_string(),
                    evaluator: model.evaluator_name(),
                })
                .set(1);
            self.metrics.model_loaded_timestamp.set(unix_now());
            // What the live ROC-AUC is held against (the bundle's test window).
            self.metrics.live.test_roc_auc.clear();
            if let Some(auc) = model.metadata.metrics.get("test_roc_auc") {
                self.metrics
                    .live
                    .test_roc_auc
                    .get_or_create(&VersionLabels {
                        model_version: model.version().to_owned(),
                    })
                    .set(*auc);
            }
            tracing::info!(
                version = model.version(),
                path = %model.file.path.display(),
                evaluator = model.evaluator_name(),
                trees = model.trees,
                check_rows = model.verified_rows,
                max_diff = model.verified_max_diff,
                load_ms = model.load_time.as_secs_f64() * 1e3,
                "model loaded and serving"
            );
        }
        let now_serving = self.current();
        let result = if loaded.is_some() {
            ReloadResult::Loaded
        } else if !rejected.is_empty() {
            ReloadResult::Rejected
        } else if now_serving.is_none() {
            ReloadResult::NoModel
        } else {
            ReloadResult::Unchanged
        };
        self.metrics
            .model_reloads
            .get_or_create(&OutcomeLabels {
                outcome: result.label(),
            })
            .inc();
        let report = ReloadReport {
            trigger,
            result,
            at_unix_seconds: unix_now(),
            duration_ms: started.elapsed().as_secs_f64() * 1e3,
            serving_version: now_serving.map(|m| m.version().to_owned()),
            loaded_path: loaded.map(|m| m.file.path.clone()),
            rejected: rejected.clone(),
        };
        if let Some(span) = &mut span {
            span.attr(
                "cartscore.reload.trigger",
                format!("{trigger:?}").to_lowercase(),
            );
            span.attr("cartscore.reload.result", result.label());
            span.attr("cartscore.reload.rejected", rejected.len() as i64);
            if let Some(version) = &report.serving_version {
                span.attr("cartscore.model.version", version.clone());
            }
        }
        if let Ok(mut history) = self.history.lock() {
            for r in rejected {
                history.rejected.insert(0, r);
            }
            history.rejected.truncate(REMEMBERED_REJECTIONS);
            history.last = Some(report.clone());
        }
        report
    }
}

/// A reload request; `reply` receives the result when the caller waits.
#[derive(Debug)]
pub struct ReloadRequest {
    pub trigger: ReloadTrigger,
    pub reply: Option<tokio::sync::oneshot::Sender<ReloadReport>>,
}

/// Runs reloads on its own thread; dropping every sender stops it.
pub fn spawn_reloader(
    registry: Arc<ModelRegistry>,
    requests: Receiver<ReloadRequest>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("model-reload".into())
        .spawn(move || {
            while let Ok(first) = requests.recv() {
                let mut batch = vec![first];
                // Coalesce the burst of events one delivery makes.
                loop {
                    match requests.recv_timeout(DEBOUNCE) {
                        Ok(more) => batch.push(more),
                        Err(RecvTimeoutError::Timeout) => break,
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                }
                let trigger = batch
                    .iter()
                    .map(|r| r.trigger)
                    .find(|t| *t != ReloadTrigger::Watch)
                    .unwrap_or(ReloadTrigger::Watch);
                let report = registry.reload(trigger);
                for request in batch {
                    if let Some(reply) = request.reply {
                        let _ = reply.send(report.clone());
                    }
                }
            }
        })
}

/// Watches the model folder and asks for a reload on every change in it.
pub fn watch(dir: &Path, requests: Sender<ReloadRequest>) -> notify::Result<RecommendedWatcher> {
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let relevant = match &event {
            Ok(e) => !matches!(e.kind, EventKind::Access(_)),
            Err(_) => true,
        };
        if relevant {
            let _ = requests.send(ReloadRequest {
                trigger: ReloadTrigger::Watch,
                reply: None,
            });
        }
    })?;
    watcher.watch(dir, RecursiveMode::NonRecursive)?;
    Ok(watcher)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_finished_bundles_are_candidates() {
        for good in ["model.onnx", "v2.onnx", "2026-11-25-demo.onnx"] {
            assert!(is_candidate_name(good), "{good}");
        }
        for bad in [
            ".model.onnx",
            ".model.onnx.tmp",
            "model.onnx.tmp",
            "model.onnx.partial",
            "model.onnx~",
            ".onnx",
            "report.json",
        ] {
            assert!(!is_candidate_name(bad), "{bad}");
        }
    }
}
