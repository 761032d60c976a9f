//! The one implementation of cartscore's data semantics, shared by the trainer
//! (replaying history) and the appliance (live), so that training/serving skew
//! cannot happen by construction.
//!
//! The modules follow the data flow: [`event`] parses raw bytes, [`validate`]
//! names what is wrong with them, [`state`] folds valid events into per-session
//! and per-user state, [`features`] turns state plus a cart event into a
//! [`features::FeatureRow`], [`encoding`] holds the learned string tables, and
//! [`bundle`] is the deployable model's metadata contract.

pub mod bundle;
pub mod compiled;
pub mod encoding;
pub mod event;
pub mod features;
pub mod model;
pub mod state;
pub mod time;
pub mod validate;

pub use bundle::{BundleError, BundleMetadata, GoldenVector};
pub use encoding::{CategoryTable, EncodingTables};
pub use event::{CsvLayout, Event, EventType};
pub use features::{CONTRACT_VERSION, FEATURE_COUNT, FEATURE_NAMES, FeatureRow};
pub use model::{ModelError, TractModel};
pub use state::{SessionState, UserState};
pub use time::Timestamp;
pub use validate::EventError;
