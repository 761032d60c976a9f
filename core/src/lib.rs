//! The one implementation of cartscore's data semantics, shared by the trainer
//! (replaying history) and the appliance (live), so that training/serving skew
//! cannot happen by construction.
//!
//! The modules follow the data flow:
//! - [`event`] parses the wire forms (a CSV row, a flat JSON object, the
//!   Kafka Connect envelope) and [`validate`] names what is wrong with one;
//!   [`time`] is the event clock and its text forms; [`dataset`] reads CSV
//!   files of the data set;
//! - [`state`] folds valid events into per-session and per-user state (the
//!   labels and expiry rules included); [`shard`] is the stream's key policy
//!   and partitioner, which keep a user's state on one partition;
//! - [`features`] turns state plus a cart event into a
//!   [`features::FeatureRow`], with the learned string tables of [`encoding`];
//! - [`bundle`] is the deployable model's metadata contract, [`onnx`] the
//!   ONNX schema it travels in, [`compiled`] the flat tree-ensemble evaluator
//!   that serving uses, and [`model`] (feature `tract`) the reference reader
//!   the compiled evaluator and the trainer's exports are checked against;
//!   [`profile`] is the training data's histograms that drift is measured
//!   against; [`shap`] is exact TreeSHAP and [`explain`] the bundle's
//!   explainer built on it (covers from the bundle, checked against
//!   LightGBM's own contributions).

pub mod bundle;
pub mod compiled;
pub mod dataset;
pub mod encoding;
pub mod event;
pub mod explain;
pub mod features;
#[cfg(feature = "tract")]
pub mod model;
pub mod onnx;
pub mod profile;
pub mod rank;
pub mod shap;
pub mod shard;
pub mod state;
pub mod time;
pub mod validate;

pub use bundle::{BundleError, BundleMetadata, GoldenVector, ShapMetadata};
pub use dataset::{CsvEvents, CsvRow, DatasetError};
pub use encoding::{CategoryTable, EncodingTables};
pub use event::{CsvLayout, Event, EventType, HeaderError, SourcePosition};
pub use features::{CONTRACT_VERSION, FEATURE_COUNT, FEATURE_NAMES, FeatureRow};
#[cfg(feature = "tract")]
pub use model::{ModelError, TractModel};
pub use profile::{DataProfile, Histogram};
pub use state::{SessionKey, SessionState, UserState};
pub use time::Timestamp;
pub use validate::EventError;
