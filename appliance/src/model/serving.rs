//! A bundle made ready to serve: tract loads and checks it (contract, golden
//! vectors), then a plain tree ensemble is compiled into the flat evaluator
//! and must agree with tract on the golden vectors and on random rows before
//! it may serve. Any other graph is served by tract itself. A compiled
//! ensemble whose bundle carries node covers also gets an explainer, once it
//! reproduces LightGBM's own contributions of the golden vectors; a bundle
//! without them serves, and says so when asked to explain.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use cartscore_core::bundle::GOLDEN_TOLERANCE;
use cartscore_core::compiled::{CompileError, CompiledEnsemble, check_rows};
use cartscore_core::explain::{ExplainError, Explainer};
use cartscore_core::features::CategoricalKeys;
use cartscore_core::shap::Explanation;
use cartscore_core::{BundleMetadata, FeatureRow, ModelError, TractModel};
use thiserror::Error;

use crate::config::ModelConfig;
use crate::error::{Code, ErrorCode};

#[derive(Debug, Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is a directory, not a bundle")]
    NotAFile { path: PathBuf },
    #[error(
        "{path} is empty (0 bytes): nothing was delivered; write the bundle under a hidden temporary name, then rename it"
    )]
    Empty { path: PathBuf },
    #[error("{path} is {size} bytes, over model.max_bundle_bytes ({limit}): refused unread")]
    TooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("{path}: loading the bundle panicked ({message}); refused")]
    Panicked { path: PathBuf, message: String },
    #[error("{path}: a malformed tree ensemble: {source}")]
    Ensemble {
        path: PathBuf,
        #[source]
        source: cartscore_core::compiled::CompileError,
    },
    #[error("{path}: {source}")]
    Bundle {
        path: PathBuf,
        #[source]
        source: ModelError,
    },
    #[error("{path}: the bundle has no golden vectors to verify it with")]
    NoGoldenVectors { path: PathBuf },
    #[error(
        "{path}: the compiled ensemble differs from tract by {diff:e} on {rows} check rows (tolerance {GOLDEN_TOLERANCE:e})"
    )]
    CompiledMismatch {
        path: PathBuf,
        diff: f64,
        rows: usize,
    },
    #[error(
        "{path}: the model returns {value} for a check row; probabilities must be finite and in [0, 1]"
    )]
    NotAProbability { path: PathBuf, value: f32 },
}

impl ErrorCode for LoadError {
    fn error_code(&self) -> Code {
        Code::ModelRejected
    }
}

impl ErrorCode for ModelError {
    fn error_code(&self) -> Code {
        Code::ModelFailed
    }
}

/// A request to explain a score the serving model cannot explain.
#[derive(Debug, Error)]
#[error("model {version} cannot explain its scores: {reason}")]
pub struct CannotExplain {
    pub version: String,
    pub reason: String,
}

impl ErrorCode for CannotExplain {
    fn error_code(&self) -> Code {
        Code::ExplainUnavailable
    }
}

/// How the serving path evaluates rows.
#[derive(Debug)]
pub enum Evaluator {
    Compiled(Box<CompiledEnsemble>),
    Tract(Box<TractModel>),
}

/// Identity of a file on disk, to tell a changed file from an unchanged one.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FileIdentity {
    pub path: PathBuf,
    pub size: u64,
    pub modified_unix_nanos: u128,
}

impl FileIdentity {
    /// The file `path` names, through symbolic links.
    pub fn of(path: &Path) -> std::io::Result<Self> {
        Self::from_metadata(path, &std::fs::metadata(path)?)
    }

    /// The file, or the link itself when it leads nowhere (dangling, a
    /// loop): such an entry is a candidate that loading then refuses with
    /// its reason, once, rather than one passed over without a word.
    pub fn of_entry(path: &Path) -> std::io::Result<Self> {
        Self::of(path).or_else(|_| Self::from_metadata(path, &std::fs::symlink_metadata(path)?))
    }

    fn from_metadata(path: &Path, meta: &std::fs::Metadata) -> std::io::Result<Self> {
        let modified = meta
            .modified()?
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        Ok(Self {
            path: path.into(),
            size: meta.len(),
            modified_unix_nanos: modified.as_nanos(),
        })
    }
}

#[derive(Debug)]
pub struct ServingModel {
    pub metadata: BundleMetadata,
    pub evaluator: Evaluator,
    /// The bundle's size as loaded.
    pub size_bytes: u64,
    pub blake3: String,
    pub loaded_at: SystemTime,
    pub load_time: Duration,
    /// Largest |compiled - tract| over the check rows (0 for tract).
    pub verified_max_diff: f64,
    pub verified_rows: usize,
    pub trees: usize,
    /// Exact TreeSHAP, or why this model cannot explain.
    pub explainer: Result<Explainer, ExplainError>,
    /// The version, interned: every scored cart's record names it.
    version: &'static str,
}

/// Model versions seen by this process, each kept once for its lifetime, so
/// that a scored cart's record names its model with a plain pointer: no
/// allocation, and no reference count bounced between the scoring cores
/// and the writer. A process holds a few (one per bundle loaded).
fn intern(version: &str) -> &'static str {
    static VERSIONS: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());
    let mut versions = VERSIONS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(known) = versions.iter().find(|v| **v == version) {
        return known;
    }
    let leaked: &'static str = Box::leak(version.into());
    versions.push(leaked);
    leaked
}

/// What a bundle must meet before it is read and trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadLimits {
    /// Random rows the compiled ensemble must match tract on.
    pub verify_rows: usize,
    /// Larger files are refused before they are read.
    pub max_bytes: u64,
}

impl LoadLimits {
    pub fn of(config: &ModelConfig) -> Self {
        Self {
            verify_rows: config.verify_random_rows,
            max_bytes: config.max_bundle_bytes,
        }
    }
}

impl ServingModel {
    /// Loads and verifies the bundle at `path`; returns it with the identity
    /// of the file it was read from.
    pub fn load(path: &Path, limits: LoadLimits) -> Result<(Self, FileIdentity), LoadError> {
        let started = Instant::now();
        let read_error = |source| LoadError::Read {
            path: path.into(),
            source,
        };
        let file = FileIdentity::of(path).map_err(read_error)?;
        let meta = std::fs::metadata(path).map_err(read_error)?;
        if meta.is_dir() {
            return Err(LoadError::NotAFile { path: path.into() });
        }
        if meta.len() == 0 {
            return Err(LoadError::Empty { path: path.into() });
        }
        if meta.len() > limits.max_bytes {
            return Err(LoadError::TooLarge {
                path: path.into(),
                size: meta.len(),
                limit: limits.max_bytes,
            });
        }
        // Read through a bounded handle: a file that grows after the check
        // is still cut at the limit (and then fails to decode).
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        std::fs::File::open(path)
            .and_then(|f| {
                std::io::Read::read_to_end(
                    &mut std::io::Read::take(f, limits.max_bytes + 1),
                    &mut bytes,
                )
            })
            .map_err(read_error)?;
        if bytes.len() as u64 > limits.max_bytes {
            return Err(LoadError::TooLarge {
                path: path.into(),
                size: bytes.len() as u64,
                limit: limits.max_bytes,
            });
        }
        let bundle_error = |source| LoadError::Bundle {
            path: path.into(),
            source,
        };
        // Decodes, checks the contract version and the golden vectors.
        let tract = TractModel::from_bytes(&bytes).map_err(bundle_error)?;
        if tract.metadata.golden_vectors.is_empty() {
            return Err(LoadError::NoGoldenVectors { path: path.into() });
        }
        let golden = tract.metadata.golden_rows();
        let mut rows: Vec<f32> = golden.iter().flatten().copied().collect();
        let hash = blake3::hash(&bytes);
        let seed = u64::from_le_bytes(hash.as_bytes()[..8].try_into().unwrap_or([0; 8]));
        rows.extend(check_rows(&golden, limits.verify_rows, seed));
        let reference = tract.predict(&rows).map_err(bundle_error)?;
        if let Some(&value) = reference.iter().find(|p| !(0.0..=1.0).contains(*p)) {
            return Err(LoadError::NotAProbability {
                path: path.into(),
                value,
            });
        }
        let check_count = reference.len();
        let mut explainer = Err(ExplainError::NotATreeEnsemble);
        let (evaluator, diff, trees) = match CompiledEnsemble::compile(&tract.proto) {
            Ok(compiled) => {
                let diff = f64::from(compiled.max_difference(&rows, &reference));
                if diff.is_nan() || diff > GOLDEN_TOLERANCE {
                    return Err(LoadError::CompiledMismatch {
                        path: path.into(),
                        diff,
                        rows: check_count,
                    });
                }
                let trees = compiled.trees();
                explainer = Explainer::verified(&compiled, &tract.metadata);
                match &explainer {
                    Ok(e) => {
                        tracing::debug!(path = %path.display(), max_diff = e.verified_max_diff, "explainer verified against LightGBM's contributions")
                    }
                    Err(ExplainError::NoCovers) => {}
                    Err(reason) => {
                        tracing::warn!(path = %path.display(), %reason, "the bundle serves, but its scores cannot be explained")
                    }
                }
                (Evaluator::Compiled(Box::new(compiled)), diff, trees)
            }
            // Another graph, or an ensemble in a form this evaluator does
            // not compile: tract serves it.
            Err(
                reason @ (CompileError::NotATreeEnsemble { .. } | CompileError::Unsupported { .. }),
            ) => {
                tracing::warn!(
                    path = %path.display(),
                    %reason,
                    "graph is not a plain tree ensemble; serving it with tract (slower)"
                );
                (Evaluator::Tract(Box::new(tract.clone())), 0.0, 0)
            }
            // A tree ensemble that is broken (a feature past the row, a
            // child out of its tree, an infinite leaf): never served.
            Err(source) => {
                return Err(LoadError::Ensemble {
                    path: path.into(),
                    source,
                });
            }
        };
        let model = Self {
            version: intern(&tract.metadata.model_version),
            metadata: tract.metadata,
            evaluator,
            size_bytes: bytes.len() as u64,
            blake3: hash.to_hex().to_string(),
            loaded_at: SystemTime::now(),
            load_time: started.elapsed(),
            verified_max_diff: diff,
            verified_rows: check_count,
            trees,
            explainer,
        };
        Ok((model, file))
    }

    /// The TreeSHAP attribution of `row`'s score.
    pub fn explain(&self, row: &FeatureRow) -> Result<Explanation, CannotExplain> {
        match &self.explainer {
            Ok(explainer) => Ok(explainer.explain(&row.0)),
            Err(reason) => Err(CannotExplain {
                version: self.version().to_owned(),
                reason: reason.to_string(),
            }),
        }
    }

    /// The same contract as `other`: version and feature names.
    pub fn same_contract(&self, other: &Self) -> bool {
        self.metadata.contract_version == other.metadata.contract_version
            && self.metadata.feature_names == other.metadata.feature_names
    }

    /// The version, for as long as the process runs.
    pub fn static_version(&self) -> &'static str {
        self.version
    }

    pub fn version(&self) -> &str {
        &self.metadata.model_version
    }

    pub fn evaluator_name(&self) -> &'static str {
        match self.evaluator {
            Evaluator::Compiled(_) => "compiled",
            Evaluator::Tract(_) => "tract",
        }
    }

    /// Fills the encoded string columns of a state-built row.
    pub fn encode(&self, row: &mut FeatureRow, keys: CategoricalKeys<'_>) {
        row.encode(keys, &self.metadata.encodings);
    }

    /// Probability of purchase for one complete row.
    pub fn predict(&self, row: &FeatureRow) -> Result<f32, ModelError> {
        match &self.evaluator {
            Evaluator::Compiled(compiled) => Ok(compiled.predict(&row.0)),
            Evaluator::Tract(tract) => tract
                .predict(&row.0)
                .map(|p| p.first().copied().unwrap_or(f32::NAN)),
        }
    }

    /// Probabilities for a row-major batch.
    pub fn predict_batch(&self, rows: &[f32]) -> Result<Vec<f32>, ModelError> {
        match &self.evaluator {
            Evaluator::Compiled(compiled) => Ok(compiled.predict_rows(rows)),
            Evaluator::Tract(tract) => tract.predict(rows),
        }
    }
}
