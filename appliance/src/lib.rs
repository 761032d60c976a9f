//! The cartscore appliance: scores add-to-cart events in microseconds from
//! per-session state in LMDB, over a thread-per-core binary protocol and a
//! JSON API, with models hot-reloaded from a folder.
//!
//! Data flow: [`stream`] (Kafka) or [`http`] -> `core` validation ->
//! [`ingest`] -> [`store`]; scoring reads [`store`] -> `core` features ->
//! [`model`] (compiled ensemble) -> [`score`]. [`reload`] swaps models in.

pub mod app;
pub mod cli;
pub mod client;
pub mod config;
pub mod http;
pub mod ingest;
pub mod metrics;
pub mod model;
pub mod protocol;
pub mod reload;
pub mod score;
pub mod service;
pub mod store;
pub mod stream;
pub mod tcp;
pub mod telemetry;
