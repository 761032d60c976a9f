//! End-to-end tests of the appliance: each starts the real `cartscore`
//! binary (the skew test also runs `cartscore-trainer predict`) on free
//! loopback ports, with its own store and model folder; the stream tests
//! also run a real Kafka-compatible broker (nisshi on PostgreSQL).
#![allow(clippy::unwrap_used, dead_code)]

mod broker;
mod common;

mod api;
mod bench;
mod cdc;
mod challenger;
mod closed_loop;
mod hostile;
mod lifecycle;
mod observability;
mod operator;
mod reload;
mod shard;
mod skew;
mod stream;
mod superset;
mod systemd;
mod telemetry;
