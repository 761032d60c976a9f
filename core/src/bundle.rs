//! The model bundle's metadata contract. A bundle is one `.onnx` file; every
//! piece of metadata the appliance needs to trust and use it travels in the
//! ONNX `metadata_props`, one JSON-encoded value per `cartscore.*` key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::onnx::{ModelProto, StringStringEntryProto};
use prost::Message;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::encoding::EncodingTables;
use crate::features::{CONTRACT_VERSION, FEATURE_COUNT, FEATURE_NAMES};
use crate::profile::{DataProfile, ProfileError};

/// Golden vectors must reproduce within this absolute difference.
pub const GOLDEN_TOLERANCE: f64 = 1e-5;

const PREFIX: &str = "cartscore.";

#[derive(Debug, Error)]
pub enum BundleError {
    #[error("cannot read model file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid ONNX model: {source}")]
    Decode {
        path: PathBuf,
        source: prost::DecodeError,
    },
    #[error("metadata key `{key}` is missing")]
    MissingKey { key: String },
    #[error("metadata key `{key}` does not parse: {source}")]
    BadValue {
        key: String,
        source: serde_json::Error,
    },
    #[error("bundle has contract version {found}, this build serves contract version {expected}")]
    ContractVersion { found: u32, expected: u32 },
    #[error(
        "bundle's feature names differ from the contract at column {column}: {found:?} vs {expected:?}"
    )]
    FeatureNames {
        column: usize,
        found: String,
        expected: String,
    },
    #[error("bundle has {found} features, the contract has {expected}")]
    FeatureCount { found: usize, expected: usize },
    #[error("golden vector {index} has {found} values, expected {expected}")]
    GoldenShape {
        index: usize,
        found: usize,
        expected: usize,
    },
    #[error("bundle has no golden vectors")]
    NoGoldenVectors,
    #[error(
        "golden vector {index}: model gives {actual}, bundle expects {expected} (|diff| {diff:e} > {tolerance:e})"
    )]
    GoldenMismatch {
        index: usize,
        expected: f64,
        actual: f64,
        diff: f64,
        tolerance: f64,
    },
    #[error("golden vector {index}: model output {actual} is not a probability")]
    NotAProbability { index: usize, actual: f64 },
    #[error("the bundle's data profile is unusable: {0}")]
    Profile(#[from] ProfileError),
}

/// A feature row with the probability the trainer computed for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GoldenVector {
    pub features: Vec<f32>,
    pub probability: f64,
}

/// Everything the bundle says about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BundleMetadata {
    pub model_version: String,
    pub contract_version: u32,
    pub feature_names: Vec<String>,
    pub encodings: EncodingTables,
    /// Hash of the training input, so two bundles from the same data are recognisable.
    pub data_fingerprint: String,
    /// Test-window metrics, e.g. `roc_auc`, `pr_auc`, `log_loss`, `brier`.
    pub metrics: BTreeMap<String, f64>,
    /// Hyper-parameters and trainer identity.
    pub params: serde_json::Value,
    pub golden_vectors: Vec<GoldenVector>,
    /// The training data's profile, for drift; bundles made before it have
    /// none, and their drift is not reported.
    pub profile: Option<DataProfile>,
    /// What explaining a score needs; bundles made before it have none, and
    /// serve without explanations.
    pub shap: Option<ShapMetadata>,
}

/// The trees' training covers and LightGBM's own attributions of the golden
/// vectors: the ONNX graph holds neither, and exact TreeSHAP needs the first
/// (`crate::explain` checks the explainer against the second).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShapMetadata {
    /// Training rows that reached each node, by ONNX tree id, then node id.
    pub covers: Vec<Vec<u64>>,
    /// LightGBM's `predict_contrib` of each golden vector, in its layout:
    /// one log-odds contribution per feature, then the expected value.
    pub golden_contributions: Vec<Vec<f64>>,
}

impl BundleMetadata {
    pub fn to_metadata_props(&self) -> Vec<StringStringEntryProto> {
        let entry = |name: &str, value: String| StringStringEntryProto {
            key: format!("{PREFIX}{name}"),
            value,
        };
        let mut props = vec![
            entry("model_version", self.model_version.clone()),
            entry("contract_version", self.contract_version.to_string()),
            entry("feature_names", json(&self.feature_names)),
            entry("encodings", json(&self.encodings)),
            entry("data_fingerprint", self.data_fingerprint.clone()),
            entry("metrics", json(&self.metrics)),
            entry("params", json(&self.params)),
            entry("golden_vectors", json(&self.golden_vectors)),
        ];
        if let Some(profile) = &self.profile {
            props.push(entry("profile", json(profile)));
        }
        if let Some(shap) = &self.shap {
            props.push(entry("shap", json(shap)));
        }
        props
    }

    /// The golden vectors' feature rows.
    pub fn golden_rows(&self) -> Vec<Vec<f32>> {
        self.golden_vectors
            .iter()
            .map(|g| g.features.clone())
            .collect()
    }

    pub fn from_metadata_props(props: &[StringStringEntryProto]) -> Result<Self, BundleError> {
        let get = |name: &str| -> Result<&str, BundleError> {
            let key = format!("{PREFIX}{name}");
            props
                .iter()
                .find(|e| e.key == key)
                .map(|e| e.value.as_str())
                .ok_or(BundleError::MissingKey { key })
        };
        fn parse<T: DeserializeOwned>(name: &str, text: &str) -> Result<T, BundleError> {
            serde_json::from_str(text).map_err(|source| BundleError::BadValue {
                key: format!("{PREFIX}{name}"),
                source,
            })
        }
        Ok(Self {
            model_version: get("model_version")?.to_owned(),
            contract_version: parse("contract_version", get("contract_version")?)?,
            feature_names: parse("feature_names", get("feature_names")?)?,
            encodings: parse("encodings", get("encodings")?)?,
            data_fingerprint: get("data_fingerprint")?.to_owned(),
            metrics: parse("metrics", get("metrics")?)?,
            params: parse("params", get("params")?)?,
            golden_vectors: parse("golden_vectors", get("golden_vectors")?)?,
            profile: match get("profile") {
                Ok(text) => Some(parse("profile", text)?),
                Err(_) => None,
            },
            shap: match get("shap") {
                Ok(text) => Some(parse("shap", text)?),
                Err(_) => None,
            },
        })
    }

    /// Reads the metadata of an `.onnx` file without building its graph.
    pub fn read_file(path: &Path) -> Result<(ModelProto, Self), BundleError> {
        let bytes = std::fs::read(path).map_err(|source| BundleError::Read {
            path: path.into(),
            source,
        })?;
        let proto = ModelProto::decode(bytes.as_slice()).map_err(|source| BundleError::Decode {
            path: path.into(),
            source,
        })?;
        let meta = Self::from_metadata_props(&proto.metadata_props)?;
        Ok((proto, meta))
    }

    /// Refuses a bundle built for another feature contract.
    pub fn check_contract(&self) -> Result<(), BundleError> {
        if self.contract_version != CONTRACT_VERSION {
            return Err(BundleError::ContractVersion {
                found: self.contract_version,
                expected: CONTRACT_VERSION,
            });
        }
        if self.feature_names.len() != FEATURE_COUNT {
            return Err(BundleError::FeatureCount {
                found: self.feature_names.len(),
                expected: FEATURE_COUNT,
            });
        }
        for (column, (found, expected)) in self.feature_names.iter().zip(FEATURE_NAMES).enumerate()
        {
            if found != expected {
                return Err(BundleError::FeatureNames {
                    column,
                    found: found.clone(),
                    expected: expected.into(),
                });
            }
        }
        if self.golden_vectors.is_empty() {
            return Err(BundleError::NoGoldenVectors);
        }
        for (index, g) in self.golden_vectors.iter().enumerate() {
            if g.features.len() != FEATURE_COUNT {
                return Err(BundleError::GoldenShape {
                    index,
                    found: g.features.len(),
                    expected: FEATURE_COUNT,
                });
            }
        }
        if let Some(profile) = &self.profile {
            profile.check()?;
        }
        Ok(())
    }

    /// Runs `score` on every golden vector and demands the recorded
    /// probability within [`GOLDEN_TOLERANCE`]; returns the largest difference.
    pub fn verify_golden<E>(
        &self,
        mut score: impl FnMut(&[f32]) -> Result<f64, E>,
    ) -> Result<f64, GoldenError<E>> {
        let mut worst = 0f64;
        for (index, g) in self.golden_vectors.iter().enumerate() {
            let actual = score(&g.features).map_err(GoldenError::Model)?;
            if !(0.0..=1.0).contains(&actual) {
                return Err(GoldenError::Bundle(BundleError::NotAProbability {
                    index,
                    actual,
                }));
            }
            let diff = (actual - g.probability).abs();
            if diff > GOLDEN_TOLERANCE {
                return Err(GoldenError::Bundle(BundleError::GoldenMismatch {
                    index,
                    expected: g.probability,
                    actual,
                    diff,
                    tolerance: GOLDEN_TOLERANCE,
                }));
            }
            worst = worst.max(diff);
        }
        Ok(worst)
    }
}

/// A golden-vector check failed, either in the model or in the comparison.
#[derive(Debug, Error)]
pub enum GoldenError<E> {
    #[error("model failed on a golden vector: {0}")]
    Model(E),
    #[error(transparent)]
    Bundle(BundleError),
}

fn json<T: Serialize>(value: &T) -> String {
    // Plain data (strings, numbers, maps with string keys) always serializes.
    serde_json::to_string(value).unwrap_or_else(|_| "null".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> BundleMetadata {
        BundleMetadata {
            model_version: "test-1".into(),
            contract_version: CONTRACT_VERSION,
            feature_names: FEATURE_NAMES.iter().map(|s| s.to_string()).collect(),
            encodings: EncodingTables::default(),
            data_fingerprint: "abc".into(),
            metrics: BTreeMap::from([("roc_auc".to_string(), 0.8)]),
            params: serde_json::json!({"num_leaves": 15}),
            golden_vectors: vec![GoldenVector {
                features: vec![0.5; FEATURE_COUNT],
                probability: 0.25,
            }],
            profile: Some(DataProfile::of(&[0.5; FEATURE_COUNT * 4], &[0.1, 0.2, 0.3])),
            shap: Some(ShapMetadata {
                covers: vec![vec![10, 4, 6]],
                golden_contributions: vec![vec![0.0; FEATURE_COUNT + 1]],
            }),
        }
    }

    #[test]
    fn metadata_props_round_trip() {
        let meta = sample();
        let props = meta.to_metadata_props();
        assert!(props.iter().all(|e| e.key.starts_with("cartscore.")));
        assert_eq!(BundleMetadata::from_metadata_props(&props).unwrap(), meta);
        // A bundle from before profiles still reads, without one.
        let older: Vec<_> = props
            .into_iter()
            .filter(|e| e.key != "cartscore.profile" && e.key != "cartscore.shap")
            .collect();
        let read = BundleMetadata::from_metadata_props(&older).unwrap();
        assert_eq!(read.profile, None);
        assert_eq!(read.shap, None);
        assert!(read.check_contract().is_ok());
    }

    #[test]
    fn contract_checks_name_the_problem() {
        let mut meta = sample();
        meta.contract_version = 99;
        assert!(matches!(
            meta.check_contract(),
            Err(BundleError::ContractVersion { found: 99, .. })
        ));
        let mut meta = sample();
        meta.feature_names[3] = "weekday_renamed".into();
        assert!(matches!(
            meta.check_contract(),
            Err(BundleError::FeatureNames { column: 3, .. })
        ));
        let mut meta = sample();
        if let Some(profile) = &mut meta.profile {
            profile.features.pop();
        }
        assert!(matches!(
            meta.check_contract(),
            Err(BundleError::Profile(ProfileError::FeatureCount { .. }))
        ));
        let mut props = sample().to_metadata_props();
        props.retain(|e| e.key != "cartscore.encodings");
        assert!(matches!(
            BundleMetadata::from_metadata_props(&props),
            Err(BundleError::MissingKey { .. })
        ));
    }

    #[test]
    fn golden_vectors_are_enforced() {
        let meta = sample();
        assert!(meta.verify_golden(|_| Ok::<_, String>(0.25 + 5e-6)).is_ok());
        assert!(matches!(
            meta.verify_golden(|_| Ok::<_, String>(0.2501)),
            Err(GoldenError::Bundle(BundleError::GoldenMismatch { .. }))
        ));
        assert!(matches!(
            meta.verify_golden(|_| Ok::<_, String>(f64::NAN)),
            Err(GoldenError::Bundle(BundleError::NotAProbability { .. }))
        ));
    }
}
