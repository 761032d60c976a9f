//! The PostgreSQL warehouse: versioned migrations and the bronze loader.
//!
//! Migrations are SQL files embedded in the binary, applied in order, each
//! in its own transaction, and recorded with a checksum so an edited
//! migration that already ran is refused instead of silently diverging.
//! The loader streams a CSV file into `bronze.events` with COPY and records
//! the file's BLAKE3 checksum in `bronze.load_manifest` in the same
//! transaction: a file is loaded completely or not at all, and a re-run
//! skips what is already there.

use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use postgres::{Client, NoTls};
use thiserror::Error;

/// The embedded migrations, in order.
pub const MIGRATIONS: &[(i32, &str, &str)] =
    &[(1, "bronze", include_str!("../migrations/0001_bronze.sql"))];

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
    #[error("{path} line {line}: {reason}")]
    Csv {
        path: PathBuf,
        line: u64,
        reason: String,
    },
}

/// A connection that remembers where it points (for error messages) without
/// the password.
pub struct Warehouse {
    client: Client,
    endpoint: String,
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

#[derive(Debug, Clone, serde::Serialize)]
pub struct FileLoad {
    pub file: PathBuf,
    pub checksum: String,
    /// Rows copied; 0 when the file was already loaded.
    pub rows: u64,
    pub already_loaded: bool,
    pub seconds: f64,
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

    /// Loads each CSV file into `bronze.events` unless its checksum is in
    /// the manifest.
    pub fn load_bronze(&mut self, files: &[PathBuf]) -> Result<Vec<FileLoad>, WarehouseError> {
        files.iter().map(|file| self.load_file(file)).collect()
    }

    fn load_file(&mut self, path: &Path) -> Result<FileLoad, WarehouseError> {
        let started = Instant::now();
        let checksum = file_checksum(path)?;
        let name = path.display().to_string();
        let endpoint = self.endpoint.as_str();
        let err = |what: &str| query_error(endpoint, what);
        let mut tx = self.client.transaction().map_err(err("BEGIN"))?;
        // Serialises loads of the same file; the loser finds it in the manifest.
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
            &[&checksum],
        )
        .map_err(err("taking the load lock"))?;
        let done = tx
            .query_opt(
                "SELECT rows FROM bronze.load_manifest WHERE checksum = $1",
                &[&checksum],
            )
            .map_err(err("reading bronze.load_manifest"))?;
        if done.is_some() {
            return Ok(FileLoad {
                file: path.into(),
                checksum,
                rows: 0,
                already_loaded: true,
                seconds: started.elapsed().as_secs_f64(),
            });
        }
        let mut writer = tx
            .copy_in(
                "COPY bronze.events (source_file, source_line, event_time, event_type, product_id, category_id, \
                 category_code, brand, price, user_id, user_session) FROM STDIN WITH (FORMAT text)",
            )
            .map_err(err(&format!("COPY into bronze.events from {name}")))?;
        let rows = copy_rows(path, &name, &mut writer)?;
        writer
            .finish()
            .map_err(err(&format!("COPY into bronze.events from {name}")))?;
        tx.execute(
            "INSERT INTO bronze.load_manifest (checksum, source_file, rows) VALUES ($1, $2, $3)",
            &[&checksum, &name, &(rows as i64)],
        )
        .map_err(err("recording the load in bronze.load_manifest"))?;
        tx.commit().map_err(err("COMMIT"))?;
        Ok(FileLoad {
            file: path.into(),
            checksum,
            rows,
            already_loaded: false,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Rows in `bronze.events`.
    pub fn bronze_rows(&mut self) -> Result<i64, WarehouseError> {
        let endpoint = self.endpoint.as_str();
        let err = |what: &str| query_error(endpoint, what);
        let row = self
            .client
            .query_one("SELECT count(*) FROM bronze.events", &[])
            .map_err(err("counting bronze.events"))?;
        Ok(row.get(0))
    }
}

/// Maps a failed query on `endpoint` to an error saying what it was doing.
fn query_error(
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

fn file_checksum(path: &Path) -> Result<String, WarehouseError> {
    let read = |source| WarehouseError::Read {
        path: path.into(),
        source,
    };
    let mut hasher = blake3::Hasher::new();
    let mut file = std::fs::File::open(path).map_err(read)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(read)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().to_hex().to_string())
}

/// Streams the data rows of a CSV file as COPY text rows; the header line is
/// checked and skipped. Missing fields become NULL; bronze keeps every row.
fn copy_rows(path: &Path, name: &str, out: &mut impl Write) -> Result<u64, WarehouseError> {
    let read = |source| WarehouseError::Read {
        path: path.into(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read)?;
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(true)
        .from_reader(BufReader::with_capacity(1 << 20, file));
    let mut record = csv::ByteRecord::new();
    let mut line_buf = Vec::with_capacity(512);
    let file_field = escape_text(name.as_bytes());
    let mut rows = 0u64;
    loop {
        match reader.read_byte_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {}
            Err(error) => {
                return Err(WarehouseError::Csv {
                    path: path.into(),
                    line: error.position().map_or(0, |p| p.line()),
                    reason: error.to_string(),
                });
            }
        }
        let line = record.position().map_or(rows + 2, |p| p.line());
        line_buf.clear();
        line_buf.extend_from_slice(&file_field);
        line_buf.push(b'\t');
        line_buf.extend_from_slice(itoa::Buffer::new().format(line).as_bytes());
        for index in 0..9 {
            line_buf.push(b'\t');
            match record.get(index) {
                Some(field) => line_buf.extend_from_slice(&escape_text(field)),
                None => line_buf.extend_from_slice(b"\\N"),
            }
        }
        line_buf.push(b'\n');
        out.write_all(&line_buf).map_err(read)?;
        rows += 1;
    }
    Ok(rows)
}

/// COPY text format escaping (backslash, tab, newline, carriage return).
fn escape_text(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    for &b in field {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            _ => out.push(b),
        }
    }
    out
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

    #[test]
    fn copy_rows_escape_and_keep_short_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e.csv");
        std::fs::write(
            &path,
            "event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session\n\
             2019-10-01 00:00:00 UTC,view,1,2,a\\b,\"x\ty\",1.5,3,s1\n\
             2019-10-01 00:00:01 UTC,view,1\n",
        )
        .unwrap();
        let mut out = Vec::new();
        let rows = copy_rows(&path, "f", &mut out).unwrap();
        assert_eq!(rows, 2);
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "f\t2\t2019-10-01 00:00:00 UTC\tview\t1\t2\ta\\\\b\tx\\ty\t1.5\t3\ts1"
        );
        assert_eq!(
            lines[1],
            "f\t3\t2019-10-01 00:00:01 UTC\tview\t1\t\\N\t\\N\t\\N\t\\N\t\\N\t\\N"
        );
    }
}
