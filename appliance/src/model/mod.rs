//! Models: [`serving`] makes a bundle ready to serve (tract checks it, a
//! plain tree ensemble is compiled and verified against tract), [`reload`]
//! keeps the newest valid bundle of the model folder serving and swaps it in
//! without a failed request.

pub mod reload;
pub mod serving;

pub use reload::{ModelRegistry, ReloadReport, ReloadRequest, ReloadResult, ReloadTrigger};
pub use serving::{LoadError, ServingModel};
