//! Promote and roll back, through the model folder's files so that the
//! state survives a restart and an operator reads it with `ls`:
//!
//! - promote: the challenger's file moves from `shadow/` into the model
//!   folder as its newest bundle, and the primary's file moves into
//!   `previous/`;
//! - rollback: the newest bundle of `previous/` moves back into the model
//!   folder as its newest, and the primary's file takes its place in
//!   `previous/` (a second rollback undoes the first).
//!
//! The models were verified when they were loaded, so no bundle is loaded
//! again: the files are moved, then the new set is swapped in with one
//! atomic store, and no request sees a model missing. Each move is a rename
//! (the file's time set to now first, so it is the newest where it lands),
//! and the folders are synced. A crash between the two moves leaves the new
//! primary serving and the old one as an older bundle of the model folder.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use serde::Serialize;
use thiserror::Error;

use crate::error::{Code, ErrorCode};
use crate::model::reload::ModelRegistry;
use crate::model::serving::{FileIdentity, ServingModel};
use crate::model::set::{Loaded, ModelSet, Slot};
use crate::ops::metrics::ChangeLabels;

#[derive(Debug, Error)]
pub enum ChangeError {
    #[error("there is no challenger to promote: drop a bundle into {dir}")]
    NoChallenger { dir: PathBuf },
    #[error("there is no previous primary to roll back to: {dir} holds no valid bundle")]
    NothingToRollBack { dir: PathBuf },
    #[error(
        "{candidate} has feature contract {found} and the primary {primary} has {expected}: it cannot take the primary's place"
    )]
    ContractDiffers {
        candidate: String,
        primary: String,
        found: String,
        expected: String,
    },
    #[error("failed to move {from} to {to}: {source}")]
    Move {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ErrorCode for ChangeError {
    fn error_code(&self) -> Code {
        match self {
            Self::Move { .. } => Code::ModelChangeFailed,
            _ => Code::ModelChangeRefused,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    Promote,
    Rollback,
}

impl Change {
    pub const LABELS: [&'static str; 2] = ["promote", "rollback"];

    pub fn label(self) -> &'static str {
        Self::LABELS[self as usize]
    }
}

/// What a promote or a rollback left in place.
#[derive(Debug, Clone, Serialize)]
pub struct ChangeReport {
    pub action: Change,
    pub primary_version: String,
    pub primary_path: PathBuf,
    /// Where a rollback would return to.
    pub rollback_version: Option<String>,
    pub rollback_path: Option<PathBuf>,
    pub challenger_version: Option<String>,
    pub duration_ms: f64,
}

/// A model that may take the primary's place: same contract.
fn check_contract(candidate: &ServingModel, primary: Option<&Loaded>) -> Result<(), ChangeError> {
    let Some(primary) = primary else {
        return Ok(());
    };
    if candidate.same_contract(&primary.model) {
        return Ok(());
    }
    let contract = |m: &ServingModel| {
        format!(
            "{} ({} features)",
            m.metadata.contract_version,
            m.metadata.feature_names.len()
        )
    };
    Err(ChangeError::ContractDiffers {
        candidate: candidate.version().to_owned(),
        primary: primary.model.version().to_owned(),
        found: contract(candidate),
        expected: contract(&primary.model),
    })
}

/// A name in `dir` for `from`'s file: its own, unless another file has it.
fn target_in(dir: &Path, from: &Path) -> PathBuf {
    let name = from.file_name().map(PathBuf::from).unwrap_or_default();
    let target = dir.join(&name);
    if !target.exists() {
        return target;
    }
    let stem = name
        .file_stem()
        .map_or_else(String::new, |s| s.to_string_lossy().into_owned());
    let stamp = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    dir.join(format!("{stem}.{stamp}.onnx"))
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Moves the bundle at `from` into `dir` as its newest file and returns its
/// identity there. A rename within a file system; a copy (synced, then
/// renamed into place) and a delete across two.
pub fn move_newest(from: &Path, dir: &Path) -> Result<FileIdentity, ChangeError> {
    let to = target_in(dir, from);
    let failed = |source| ChangeError::Move {
        from: from.to_owned(),
        to: to.clone(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(failed)?;
    // The time first: the rename then lands the newest file at once.
    std::fs::File::options()
        .write(true)
        .open(from)
        .and_then(|f| f.set_modified(SystemTime::now()))
        .map_err(failed)?;
    match std::fs::rename(from, &to) {
        Ok(()) => {}
        Err(error) if error.kind() == ErrorKind::CrossesDevices => {
            let temp = dir.join(format!(
                ".{}.tmp",
                to.file_name().unwrap_or_default().to_string_lossy()
            ));
            std::fs::copy(from, &temp)
                .and_then(|_| std::fs::File::open(&temp)?.sync_all())
                .and_then(|()| std::fs::rename(&temp, &to))
                .and_then(|()| std::fs::remove_file(from))
                .map_err(failed)?;
        }
        Err(error) => return Err(failed(error)),
    }
    for folder in [Some(dir), from.parent()].into_iter().flatten() {
        sync_dir(folder).map_err(failed)?;
    }
    FileIdentity::of(&to).map_err(failed)
}

impl ModelRegistry {
    /// Makes the challenger the primary; the primary becomes the rollback.
    pub fn promote(&self) -> Result<ChangeReport, ChangeError> {
        self.change(Change::Promote)
    }

    /// Returns to the previous primary; the primary becomes the rollback.
    pub fn rollback(&self) -> Result<ChangeReport, ChangeError> {
        self.change(Change::Rollback)
    }

    fn change(&self, action: Change) -> Result<ChangeReport, ChangeError> {
        let started = Instant::now();
        let result = {
            let _one_at_a_time = self.changing.lock();
            self.change_files(action)
        };
        let outcome = match &result {
            Ok(_) => "done",
            Err(error) if error.error_code() == Code::ModelChangeRefused => "refused",
            Err(_) => "failed",
        };
        self.metrics
            .challenger
            .changes
            .get_or_create(&ChangeLabels {
                action: action.label(),
                outcome,
            })
            .inc();
        match result {
            Ok(set) => {
                let report = report(action, &set, started);
                tracing::info!(
                    action = action.label(),
                    primary = report.primary_version,
                    path = %report.primary_path.display(),
                    rollback = report.rollback_version.as_deref().unwrap_or("-"),
                    "model {}d",
                    match action {
                        Change::Promote => "promote",
                        Change::Rollback => "rolled back; the demoted model is the next rollback",
                    }
                );
                Ok(report)
            }
            Err(error) => {
                tracing::warn!(action = action.label(), %error, "model change not done");
                Err(error)
            }
        }
    }

    /// Moves the files, then swaps the set; returns the new set.
    fn change_files(&self, action: Change) -> Result<Arc<ModelSet>, ChangeError> {
        let set = self.set();
        let dirs = self.dirs();
        let incoming = match action {
            Change::Promote => set
                .challenger
                .clone()
                .ok_or_else(|| ChangeError::NoChallenger {
                    dir: dirs.challenger.clone(),
                })?,
            Change::Rollback => {
                set.rollback
                    .clone()
                    .ok_or_else(|| ChangeError::NothingToRollBack {
                        dir: dirs.rollback.clone(),
                    })?
            }
        };
        check_contract(&incoming.model, set.primary.as_ref())?;
        let file = move_newest(&incoming.file.path, &dirs.primary)?;
        let mut next = (*set).clone();
        next.primary = Some(Loaded {
            model: Arc::clone(&incoming.model),
            file,
        });
        let source = match action {
            Change::Promote => Slot::Challenger,
            Change::Rollback => Slot::Rollback,
        };
        *next.slot_mut(source) = None;
        if let Some(outgoing) = &set.primary {
            match move_newest(&outgoing.file.path, &dirs.rollback) {
                Ok(file) => {
                    next.rollback = Some(Loaded {
                        model: Arc::clone(&outgoing.model),
                        file,
                    });
                }
                // The new primary serves (its file is in place); the old one
                // stays an older bundle of the model folder.
                Err(error) => {
                    tracing::error!(%error, "the replaced primary stays in the model folder; it is not the rollback");
                }
            }
        }
        self.swap(next);
        Ok(self.set())
    }
}

fn report(action: Change, set: &ModelSet, started: Instant) -> ChangeReport {
    let version = |slot: Slot| set.slot(slot).map(|l| l.model.version().to_owned());
    let path = |slot: Slot| set.slot(slot).map(|l| l.file.path.clone());
    ChangeReport {
        action,
        primary_version: version(Slot::Primary).unwrap_or_default(),
        primary_path: path(Slot::Primary).unwrap_or_default(),
        rollback_version: version(Slot::Rollback),
        rollback_path: path(Slot::Rollback),
        challenger_version: version(Slot::Challenger),
        duration_ms: started.elapsed().as_secs_f64() * 1e3,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_moved_bundle_is_the_newest_of_its_new_folder_and_keeps_others() {
        let work = tempfile::tempdir().unwrap();
        let (shadow, models) = (work.path().join("shadow"), work.path().join("models"));
        std::fs::create_dir_all(&shadow).unwrap();
        std::fs::create_dir_all(&models).unwrap();
        std::fs::write(shadow.join("v2.onnx"), b"two").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(models.join("v1.onnx"), b"one").unwrap();
        // Same name already there: the mover picks another, nothing is lost.
        std::fs::write(models.join("v2.onnx"), b"older two").unwrap();
        let moved = move_newest(&shadow.join("v2.onnx"), &models).unwrap();
        assert!(!shadow.join("v2.onnx").exists());
        assert_ne!(moved.path, models.join("v2.onnx"));
        assert_eq!(std::fs::read(&moved.path).unwrap(), b"two");
        assert_eq!(std::fs::read(models.join("v2.onnx")).unwrap(), b"older two");
        let newest = crate::model::reload::candidates(&models).unwrap();
        assert_eq!(newest[0], moved, "the moved file is the newest");
        let error = move_newest(&shadow.join("missing.onnx"), &models).unwrap_err();
        assert_eq!(error.error_code(), Code::ModelChangeFailed);
        assert!(error.to_string().contains("missing.onnx"), "{error}");
    }
}
