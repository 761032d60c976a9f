//! Hot reload: the newest valid bundle in each slot's folder takes the slot
//! (the primary's, the challenger's, the rollback's; see [`super::set`]).
//! Loading and verification happen on the reload thread, never on a serving
//! core; the new set is swapped in atomically (arc-swap) and each core picks
//! it up between two requests. A bad file is rejected with its reason and
//! the old model keeps its place.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::{ArcSwap, Cache};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use serde::Serialize;

use crate::config::ModelConfig;
use crate::model::serving::{FileIdentity, LoadError, LoadLimits, ServingModel};
use crate::model::set::{Loaded, ModelSet, Slot};
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
    /// The folder the file was in.
    pub slot: Slot,
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
    /// The challenger scoring beside it, and the version a rollback would
    /// return to.
    pub challenger_version: Option<String>,
    pub rollback_version: Option<String>,
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

/// Candidate bundles, newest first (modification time, then name): every
/// entry with a bundle's name, so that one that is not a bundle (a
/// directory, a dangling link or a loop) is refused with its reason, not
/// passed over.
pub fn candidates(dir: &Path) -> std::io::Result<Vec<FileIdentity>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !is_candidate_name(name) {
            continue;
        }
        // An entry can vanish between listing and stat; skip it.
        if let Ok(identity) = FileIdentity::of_entry(&entry.path()) {
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

/// The folders of the three slots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelDirs {
    pub primary: PathBuf,
    pub challenger: PathBuf,
    pub rollback: PathBuf,
}

impl ModelDirs {
    /// `model.dir`, `model.shadow_dir` (default `<dir>/shadow`) and
    /// `<dir>/previous`.
    pub fn of(config: &ModelConfig) -> Self {
        Self {
            primary: config.dir.clone(),
            challenger: config.shadow_dir(),
            rollback: config.dir.join(ROLLBACK_DIR),
        }
    }

    pub fn get(&self, slot: Slot) -> &Path {
        match slot {
            Slot::Primary => &self.primary,
            Slot::Challenger => &self.challenger,
            Slot::Rollback => &self.rollback,
        }
    }
}

/// The rollback slot's folder, inside the model folder.
pub const ROLLBACK_DIR: &str = "previous";

pub type ModelCache = Cache<Arc<ArcSwap<ModelSet>>, Arc<ModelSet>>;

#[derive(Debug)]
pub struct ModelRegistry {
    dirs: ModelDirs,
    limits: LoadLimits,
    set: Arc<ArcSwap<ModelSet>>,
    history: Mutex<ReloadHistory>,
    /// One reload, promote or rollback at a time: each reads the set,
    /// changes files and swaps a new set in.
    pub(super) changing: Mutex<()>,
    pub(super) metrics: Arc<Metrics>,
}

/// What a reload did to one slot.
enum SlotChange {
    Unchanged,
    Loaded(Loaded),
    /// Its folder holds no bundle any more (challenger and rollback only:
    /// the primary keeps serving until another verifies).
    Emptied,
}

impl ModelRegistry {
    pub fn new(
        dirs: ModelDirs,
        limits: LoadLimits,
        canary_share: f64,
        metrics: Arc<Metrics>,
    ) -> Self {
        // Known before the first reload, so `increase()` alerts work at once.
        for outcome in ReloadResult::LABELS {
            let _ = metrics
                .model_reloads
                .get_or_create(&OutcomeLabels { outcome });
        }
        Self {
            dirs,
            limits,
            set: Arc::new(ArcSwap::from_pointee(ModelSet {
                canary_share,
                ..ModelSet::default()
            })),
            history: Mutex::new(ReloadHistory::default()),
            changing: Mutex::new(()),
            metrics,
        }
    }

    /// The primary's folder.
    pub fn dir(&self) -> &Path {
        &self.dirs.primary
    }

    pub fn dirs(&self) -> &ModelDirs {
        &self.dirs
    }

    /// The primary.
    pub fn current(&self) -> Option<Arc<ServingModel>> {
        self.set
            .load()
            .primary
            .as_ref()
            .map(|l| Arc::clone(&l.model))
    }

    /// Everything that serves, as one snapshot.
    pub fn set(&self) -> Arc<ModelSet> {
        self.set.load_full()
    }

    /// A per-core view that costs one atomic load per request while the
    /// set is unchanged and follows a swap at the next request.
    pub fn cache(&self) -> ModelCache {
        Cache::new(Arc::clone(&self.set))
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

    /// Swaps `set` in (one atomic store: a core sees the old set or the new
    /// one, never a mix) and publishes what serves.
    pub(super) fn swap(&self, set: ModelSet) {
        let old = self.set.swap(Arc::new(set));
        let new = self.set.load();
        let changed = |a: Option<&Loaded>, b: Option<&Loaded>| match (a, b) {
            (Some(a), Some(b)) => !Arc::ptr_eq(&a.model, &b.model),
            (None, None) => false,
            _ => true,
        };
        let metrics = &self.metrics;
        if changed(old.primary.as_ref(), new.primary.as_ref()) {
            metrics.model_info.clear();
            if let Some(model) = new.primary() {
                metrics
                    .model_info
                    .get_or_create(&ModelLabels {
                        version: model.version().to_owned(),
                        contract: model.metadata.contract_version.to_string(),
                        evaluator: model.evaluator_name(),
                    })
                    .set(1);
                metrics.model_loaded_timestamp.set(unix_now());
            }
        }
        metrics.challenger.info.clear();
        if let Some(model) = new.challenger() {
            metrics
                .challenger
                .info
                .get_or_create(&VersionLabels {
                    model_version: model.version().to_owned(),
                })
                .set(1);
        }
        // What each serving version's live ROC-AUC is held against (its
        // bundle's test window): the challenger's too, for canary traffic.
        metrics.live.test_roc_auc.clear();
        for model in [new.primary(), new.challenger()].into_iter().flatten() {
            if let Some(auc) = model.metadata.metrics.get("test_roc_auc") {
                metrics
                    .live
                    .test_roc_auc
                    .get_or_create(&VersionLabels {
                        model_version: model.version().to_owned(),
                    })
                    .set(*auc);
            }
        }
    }

    /// The newest valid bundle of `slot`'s folder, unless it is `serving`.
    fn reload_slot(
        &self,
        slot: Slot,
        serving: Option<&Loaded>,
        rejected: &mut Vec<Rejection>,
    ) -> SlotChange {
        let dir = self.dirs.get(slot);
        let files = match candidates(dir) {
            Ok(files) => files,
            // The challenger's and the rollback's folders are optional.
            Err(error) if slot != Slot::Primary && error.kind() == std::io::ErrorKind::NotFound => {
                Vec::new()
            }
            Err(error) => {
                tracing::error!(dir = %dir.display(), %error, "cannot list the model folder");
                rejected.push(Rejection {
                    slot,
                    file: FileIdentity {
                        path: dir.to_path_buf(),
                        size: 0,
                        modified_unix_nanos: 0,
                    },
                    reason: format!("cannot list {}: {error}", dir.display()),
                    at_unix_seconds: unix_now(),
                });
                return SlotChange::Unchanged;
            }
        };
        if files.is_empty() && slot != Slot::Primary {
            return if serving.is_some() {
                SlotChange::Emptied
            } else {
                SlotChange::Unchanged
            };
        }
        for file in files {
            // Older files than the serving one are not candidates.
            if Some(&file) == serving.map(|l| &l.file) {
                break;
            }
            if self.known_bad(&file) {
                continue;
            }
            // A bundle that makes a library panic is refused like any other
            // bad bundle: the reload thread, and the daemon, carry on.
            let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                ServingModel::load(&file.path, self.limits)
            }))
            .unwrap_or_else(|panic| {
                Err(LoadError::Panicked {
                    path: file.path.clone(),
                    message: panic
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_owned())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "no message".to_owned()),
                })
            });
            match loaded {
                Ok((model, file)) => {
                    tracing::info!(
                        slot = slot.label(),
                        version = model.version(),
                        path = %file.path.display(),
                        evaluator = model.evaluator_name(),
                        trees = model.trees,
                        check_rows = model.verified_rows,
                        max_diff = model.verified_max_diff,
                        explains = model.explainer.is_ok(),
                        load_ms = model.load_time.as_secs_f64() * 1e3,
                        "model loaded"
                    );
                    return SlotChange::Loaded(Loaded {
                        model: Arc::new(model),
                        file,
                    });
                }
                Err(error) => {
                    tracing::error!(slot = slot.label(), path = %file.path.display(), %error, "model bundle rejected; the previous model keeps its place");
                    rejected.push(Rejection {
                        slot,
                        file,
                        reason: error.to_string(),
                        at_unix_seconds: unix_now(),
                    });
                }
            }
        }
        SlotChange::Unchanged
    }

    /// Loads the newest valid bundle of each slot's folder that is not the
    /// one in place, and swaps the changed set in at once.
    pub fn reload(&self, trigger: ReloadTrigger) -> ReloadReport {
        let _one_at_a_time = self.changing.lock();
        let mut span = telemetry::span("model.reload");
        let started = Instant::now();
        let before = self.set();
        let mut next = (*before).clone();
        let mut rejected = Vec::new();
        let mut primary_loaded = None;
        let mut changed = false;
        for slot in Slot::ALL {
            match self.reload_slot(slot, before.slot(slot), &mut rejected) {
                SlotChange::Unchanged => {}
                SlotChange::Loaded(loaded) => {
                    if slot == Slot::Primary {
                        primary_loaded = Some(loaded.file.path.clone());
                    }
                    *next.slot_mut(slot) = Some(loaded);
                    changed = true;
                }
                SlotChange::Emptied => {
                    tracing::info!(slot = slot.label(), dir = %self.dirs.get(slot).display(), "the folder holds no bundle any more; the slot is empty");
                    *next.slot_mut(slot) = None;
                    changed = true;
                }
            }
        }
        if changed {
            self.swap(next);
        }
        let now = self.set();
        let result = if primary_loaded.is_some() {
            ReloadResult::Loaded
        } else if !rejected.is_empty() {
            ReloadResult::Rejected
        } else if now.primary.is_none() {
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
        let version = |slot: Slot| now.slot(slot).map(|l| l.model.version().to_owned());
        let report = ReloadReport {
            trigger,
            result,
            at_unix_seconds: unix_now(),
            duration_ms: started.elapsed().as_secs_f64() * 1e3,
            serving_version: version(Slot::Primary),
            challenger_version: version(Slot::Challenger),
            rollback_version: version(Slot::Rollback),
            loaded_path: primary_loaded,
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
        self.remember(report.clone());
        report
    }

    fn remember(&self, report: ReloadReport) {
        if let Ok(mut history) = self.history.lock() {
            for r in report.rejected.iter().cloned() {
                history.rejected.insert(0, r);
            }
            history.rejected.truncate(REMEMBERED_REJECTIONS);
            history.last = Some(report);
        }
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

/// Watches the slots' folders and asks for a reload on every change in
/// them. The challenger's and the rollback's are created if missing, so a
/// bundle dropped into them later is seen.
pub fn watch(
    dirs: &ModelDirs,
    requests: Sender<ReloadRequest>,
) -> notify::Result<RecommendedWatcher> {
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
    // The slots' folders first: creating them inside the primary's folder
    // after it is watched would set off a reload.
    let mut extra = Vec::new();
    for dir in [&dirs.challenger, &dirs.rollback] {
        // A read-only model folder still serves; its slots are then only
        // read at start, on SIGHUP and on /admin/reload.
        match std::fs::create_dir_all(dir) {
            Ok(()) => extra.push(dir),
            Err(error) => {
                tracing::warn!(dir = %dir.display(), %error, "cannot create the folder to watch it");
            }
        }
    }
    watcher.watch(&dirs.primary, RecursiveMode::NonRecursive)?;
    for dir in extra {
        watcher.watch(dir, RecursiveMode::NonRecursive)?;
    }
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
