//! The model registry in S3: a training run's bundle and reports under
//! `models/<version>/`, and the way back into an appliance's model folder.

use std::path::Path;

use super::client::{Lake, LakeError};

/// The files of a bundle in the registry; the model goes last, so a
/// version whose `model.onnx` exists is complete.
const REGISTRY_FILES: [&str; 3] = ["report.json", "report.txt", "model.onnx"];

impl Lake {
    /// Publishes a training output folder under `models/<version>/`.
    pub fn publish_model(&self, version: &str, out: &Path) -> Result<Vec<String>, LakeError> {
        let mut keys = Vec::new();
        for name in REGISTRY_FILES {
            let file = out.join(name);
            let bytes = std::fs::read(&file).map_err(|e| LakeError::Read {
                path: file.clone(),
                reason: e.to_string(),
            })?;
            let key = self.key(&format!("models/{version}/{name}"));
            self.put(&key, bytes)?;
            keys.push(self.url(&key));
        }
        Ok(keys)
    }

    /// The versions in the registry, oldest first (by when their model was
    /// published).
    pub fn model_versions(&self) -> Result<Vec<String>, LakeError> {
        let prefix = self.key("models");
        let mut found: Vec<(chrono::DateTime<chrono::Utc>, String)> = self
            .list(&prefix)?
            .into_iter()
            .filter_map(|(key, modified)| {
                let rest = key.strip_prefix(&prefix)?.trim_start_matches('/');
                let version = rest.strip_suffix("/model.onnx")?;
                (!version.contains('/')).then(|| (modified, version.to_owned()))
            })
            .collect();
        found.sort();
        Ok(found.into_iter().map(|(_, v)| v).collect())
    }

    /// Streams `models/<version>/model.onnx` into `to`; `latest` picks the
    /// most recently published version. Returns the version.
    pub fn fetch_model(&self, version: &str, to: &Path) -> Result<String, LakeError> {
        let version = if version == "latest" {
            self.model_versions()?
                .pop()
                .ok_or_else(|| LakeError::Read {
                    path: self.url(&self.key("models/")).into(),
                    reason: "the registry holds no model".into(),
                })?
        } else {
            version.to_owned()
        };
        self.download(&self.key(&format!("models/{version}/model.onnx")), to)?;
        Ok(version)
    }
}
