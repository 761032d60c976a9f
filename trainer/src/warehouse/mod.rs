//! The PostgreSQL warehouse: the connection and the versioned migrations
//! ([`client`]), the bronze/silver loader ([`load`]), the time-ordered event
//! stream the trainer replays ([`read`]), the gold feature rows it writes
//! back ([`gold`]) and the appliance's resolved outcomes ([`live`]).

mod client;
mod gold;
mod live;
mod load;
mod read;

pub use client::{MIGRATIONS, Warehouse, WarehouseError, endpoint_of};
pub use gold::{GoldRow, GoldRun};
pub use read::WarehouseEvents;
