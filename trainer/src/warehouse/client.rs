//! A connection to the warehouse that names where it points (never with
//! the password), its errors, and the versioned migrations.
//!
//! Migrations are SQL files embedded in the binary, applied in order, each
//! in its own transaction, and recorded with a checksum so an edited
//! migration that already ran is refused instead of silently diverging.

use std::path::PathBuf;

use postgres::{Client, NoTls};
use thiserror::Error;

/// The embedded migrations, in order.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "bronze",
        include_str!("../../migrations/0001_bronze.sql"),
    ),
    (
        2,
        "silver_warehouse_gold",
        include_str!("../../migrations/0002_silver_warehouse_gold.sql"),
    ),
    (3, "live", include_str!("../../migrations/0003_live.sql")),
];

#[derive(Debug, Error)]
pub enum WarehouseError {
    #[error("cannot connect to PostgreSQL at {endpoint}: {source}")]
    Connect {
        endpoint: String,
        source: postgres::Error,
    },
    #[error("{what} failed on {endpoint}: {source}")]
    Query {
        what: String,
        endpoint: String,
        source: postgres::Error,
    },
    #[error(
        "migration {version} ({name}) was changed after it was applied: checksum {applied} in the database, {embedded} in this binary"
    )]
    ChangedMigration {
        version: i32,
        name: String,
        applied: String,
        embedded: String,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} broke on {endpoint}: {source}")]
    Stream {
        endpoint: String,
        what: &'static str,
        source: std::io::Error,
    },
    #[error(transparent)]
    Csv(#[from] cartscore_core::DatasetError),
}

/// A connection that remembers where it points (for error messages) without
/// the password.
pub struct Warehouse {
    pub(super) client: Client,
    pub(super) endpoint: String,
}

impl std::fmt::Debug for Warehouse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Warehouse")
            .field("endpoint", &self.endpoint)
            .finish()
    }
}

/// `user@host:port/db` of a connection string, never its password.
pub fn endpoint_of(url: &str) -> String {
    match url.parse::<postgres::Config>() {
        Ok(config) => {
            let host = config
                .get_hosts()
                .first()
                .map(|h| match h {
                    postgres::config::Host::Tcp(name) => name.clone(),
                    postgres::config::Host::Unix(path) => path.display().to_string(),
                })
                .unwrap_or_else(|| "localhost".into());
            let port = config.get_ports().first().copied().unwrap_or(5432);
            format!(
                "{}@{host}:{port}/{}",
                config.get_user().unwrap_or(""),
                config.get_dbname().unwrap_or("")
            )
        }
        Err(_) => "an unparsable connection string".into(),
    }
}

impl Warehouse {
    pub fn connect(url: &str) -> Result<Self, WarehouseError> {
        let endpoint = endpoint_of(url);
        let connect = |source| WarehouseError::Connect {
            endpoint: endpoint.clone(),
            source,
        };
        let mut client = Client::connect(url, NoTls).map_err(connect)?;
        // Idempotent DDL ("already exists, skipping") is not news.
        client
            .batch_execute("SET client_min_messages = warning")
            .map_err(connect)?;
        Ok(Self { client, endpoint })
    }

    /// Applies the migrations not yet applied; returns their versions.
    pub fn migrate(&mut self) -> Result<Vec<i32>, WarehouseError> {
        let endpoint = self.endpoint.as_str();
        let err = |what: &str| query_error(endpoint, what);
        self.client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS public.cartscore_migrations (
                     version int PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,
                     applied_at timestamptz NOT NULL DEFAULT now())",
            )
            .map_err(err("creating the migrations table"))?;
        let mut applied = Vec::new();
        for &(version, name, sql) in MIGRATIONS {
            let embedded = blake3::hash(sql.as_bytes()).to_hex().to_string();
            let mut tx = self.client.transaction().map_err(err("BEGIN"))?;
            // One migrator at a time: a second one waits here, then sees the row.
            tx.batch_execute("LOCK TABLE public.cartscore_migrations IN EXCLUSIVE MODE")
                .map_err(err("locking the migrations table"))?;
            let row = tx
                .query_opt(
                    "SELECT checksum FROM public.cartscore_migrations WHERE version = $1",
                    &[&version],
                )
                .map_err(err("reading the migrations table"))?;
            match row {
                Some(row) => {
                    let existing: String = row.get(0);
                    if existing != embedded {
                        return Err(WarehouseError::ChangedMigration {
                            version,
                            name: name.to_owned(),
                            applied: existing,
                            embedded,
                        });
                    }
                }
                None => {
                    tx.batch_execute(sql)
                        .map_err(err(&format!("migration {version} ({name})")))?;
                    tx.execute(
                        "INSERT INTO public.cartscore_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                        &[&version, &name, &embedded],
                    )
                    .map_err(err("recording the migration"))?;
                    applied.push(version);
                }
            }
            tx.commit().map_err(err("COMMIT"))?;
        }
        Ok(applied)
    }

    /// Rows in `bronze.events`.
    pub fn bronze_rows(&mut self) -> Result<i64, WarehouseError> {
        self.count(
            "SELECT count(*) FROM bronze.events",
            "counting bronze.events",
        )
    }

    /// A single number from a query such as `SELECT count(*) …`.
    pub fn count(&mut self, sql: &str, what: &str) -> Result<i64, WarehouseError> {
        let row = self
            .client
            .query_one(sql, &[])
            .map_err(query_error(&self.endpoint, what))?;
        Ok(row.get(0))
    }
}

/// Maps a failed query on `endpoint` to an error saying what it was doing.
pub(super) fn query_error(
    endpoint: &str,
    what: &str,
) -> impl FnOnce(postgres::Error) -> WarehouseError + use<> {
    let (endpoint, what) = (endpoint.to_owned(), what.to_owned());
    move |source| WarehouseError::Query {
        what,
        endpoint,
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_endpoint_never_shows_the_password() {
        let e = endpoint_of("postgres://cartscore:secret@db.example:6543/wh");
        assert_eq!(e, "cartscore@db.example:6543/wh");
        assert_eq!(
            endpoint_of("host=h user=u password=p dbname=d"),
            "u@h:5432/d"
        );
    }
}
