//! Loading a bundle with tract: the reference reader of every `.onnx` file
//! (feature `tract`). The appliance compiles tree ensembles into its own
//! evaluator, but verifies it against this; the trainer checks its exports
//! against this.

use std::path::Path;

use prost::Message;
use thiserror::Error;
use tract_onnx::prelude::*;

use crate::bundle::{BundleError, BundleMetadata, GoldenError};
use crate::features::FEATURE_COUNT;
use crate::onnx::ModelProto;

#[derive(Debug, Error)]
pub enum ModelError {
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error("tract cannot load the graph: {0}")]
    Load(String),
    #[error("tract failed to run the graph: {0}")]
    Run(String),
    #[error("graph output has shape {shape:?}, expected [batch, 2] probabilities")]
    OutputShape { shape: Vec<usize> },
    #[error("golden vectors do not reproduce: {0}")]
    Golden(String),
}

type Plan = Arc<TypedRunnableModel>;

/// A bundle's graph as tract runs it, plus its metadata.
#[derive(Debug, Clone)]
pub struct TractModel {
    plan: Plan,
    pub metadata: BundleMetadata,
    /// The decoded file, for whoever compiles the graph itself.
    pub proto: ModelProto,
}

impl TractModel {
    /// Decodes, checks the contract, optimises and verifies the golden vectors.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ModelError> {
        let proto = ModelProto::decode(bytes)
            .map_err(|e| ModelError::Load(format!("not a valid ONNX protobuf: {e}")))?;
        let metadata = BundleMetadata::from_metadata_props(&proto.metadata_props)?;
        metadata.check_contract()?;
        // tract decodes the file with its own copy of the schema.
        let plan = tract_onnx::onnx()
            .model_for_read(&mut &bytes[..])
            .and_then(|m| m.into_optimized())
            .and_then(|m| m.into_runnable())
            .map_err(|e| ModelError::Load(format!("{e:#}")))?;
        let model = Self {
            plan,
            metadata,
            proto,
        };
        model
            .metadata
            .verify_golden(|row| model.predict(row).map(|p| f64::from(p[0])))
            .map_err(|e| match e {
                GoldenError::Model(m) => m,
                GoldenError::Bundle(b) => ModelError::Golden(b.to_string()),
            })?;
        Ok(model)
    }

    pub fn load(path: &Path) -> Result<Self, ModelError> {
        let bytes = std::fs::read(path).map_err(|source| BundleError::Read {
            path: path.into(),
            source,
        })?;
        Self::from_bytes(&bytes)
    }

    /// Probabilities of the positive class for a row-major batch of rows.
    pub fn predict(&self, rows: &[f32]) -> Result<Vec<f32>, ModelError> {
        let batch = rows.len() / FEATURE_COUNT;
        let input = Tensor::from_shape(&[batch, FEATURE_COUNT], rows)
            .map_err(|e| ModelError::Run(e.to_string()))?;
        let outputs = self
            .plan
            .run(tvec!(input.into()))
            .map_err(|e| ModelError::Run(format!("{e:#}")))?;
        let probabilities = outputs
            .iter()
            .find(|o| o.datum_type() == f32::datum_type() && o.rank() == 2)
            .ok_or_else(|| ModelError::OutputShape { shape: Vec::new() })?;
        let shape = probabilities.shape().to_vec();
        if shape.len() != 2 || shape[0] != batch || shape[1] != 2 {
            return Err(ModelError::OutputShape { shape });
        }
        let view = probabilities
            .to_plain_array_view::<f32>()
            .map_err(|e| ModelError::Run(e.to_string()))?;
        Ok((0..batch).map(|i| view[[i, 1]]).collect())
    }
}
