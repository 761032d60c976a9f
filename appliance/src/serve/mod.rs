//! Answering callers: [`score`] is the read-only scoring path (state lookup,
//! the shared features, the model), [`tcp`] the thread-per-core binary
//! protocol and [`http`] the JSON APIs.

pub mod http;
pub mod score;
pub mod tcp;
