//! Models: [`serving`] makes a bundle ready to serve (tract checks it, a
//! plain tree ensemble is compiled and verified against tract, and gets an
//! explainer when its bundle carries covers), [`set`] is what serves (the
//! primary, the challenger beside it, the rollback) and who answers a cart,
//! [`reload`] keeps the newest valid bundle of each slot's folder in place
//! and swaps it in without a failed request, [`promote`] moves the
//! challenger into the primary's place and back.

pub mod promote;
pub mod reload;
pub mod serving;
pub mod set;

pub use promote::{Change, ChangeError, ChangeReport};
pub use reload::{
    ModelDirs, ModelRegistry, ReloadReport, ReloadRequest, ReloadResult, ReloadTrigger,
};
pub use serving::{CannotExplain, LoadError, LoadLimits, ServingModel};
pub use set::{Loaded, ModelSet, Route, Slot};
