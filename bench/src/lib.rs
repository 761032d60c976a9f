//! cartscore's latency harness, as a library: open-loop load with
//! coordinated-omission correction ([`load`]) against the binary protocol
//! ([`tcp`]) or any HTTP endpoint ([`http`]), request bodies ([`requests`],
//! [`render`]), and what a run prints and writes ([`report`]). [`modes`] are
//! the `cartscore-bench` commands, [`soak`] the long run; the Kafka producer (`cartscore-producer`)
//! reuses the rendering and the reports.

pub mod engine;
pub mod http;
pub mod load;
pub mod modes;
pub mod render;
pub mod report;
pub mod requests;
pub mod soak;
pub mod tcp;
