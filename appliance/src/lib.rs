//! The cartscore appliance: scores add-to-cart events in microseconds from
//! per-session state in LMDB, over a thread-per-core binary protocol and a
//! JSON API, with models hot-reloaded from a folder.
//!
//! The modules follow the data: events arrive through [`ingest`] (the Kafka
//! stream, or `POST /v1/events`) and the single writer applies them to the
//! [`store`]; [`model`] keeps the newest valid bundle serving; [`serve`]
//! scores carts from the store with the model and answers over TCP and HTTP,
//! after [`shard`] says this shard owns the cart's user (`kafka.mode = shard`).
//! [`config`] (settings), [`error`] (the table of error codes) and [`ops`]
//! (metrics, telemetry, heartbeats, systemd) sit below them all, and [`app`]
//! builds, runs and drains the whole; [`cli`] is the command line.

pub mod app;
pub mod cli;
pub mod config;
pub mod error;
pub mod ingest;
pub mod model;
pub mod ops;
pub mod quality;
pub mod serve;
pub mod shard;
pub mod store;
