//! Loading CSV files of the data set into bronze and silver.
//!
//! One transaction per file: the raw rows go to `bronze.events`, then every
//! row is validated by cartscore-core (the appliance's code) and lands in a
//! temporary staging table, from which SQL moves valid rows into
//! `silver.events` (exact duplicates kept once), invalid rows into
//! `silver.rejects` with their reason, and refreshes the dimensions. The
//! file's BLAKE3 checksum goes into `bronze.load_manifest` in the same
//! transaction: a file is loaded completely or not at all, a killed load
//! leaves nothing, and a re-run skips what is already there.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use cartscore_core::validate::Field;
use cartscore_core::{CsvEvents, CsvRow, Event, EventError};

use super::client::{Warehouse, WarehouseError, query_error};

#[derive(Debug, Clone, serde::Serialize)]
pub struct FileLoad {
    pub file: PathBuf,
    pub checksum: String,
    /// Data rows copied into bronze; 0 when the file was already loaded.
    pub rows: u64,
    /// Rows that passed validation (duplicates included).
    pub valid: u64,
    /// Rows in silver.rejects, by this load.
    pub rejected: u64,
    /// Valid rows equal to an event already in silver.
    pub duplicates: u64,
    pub already_loaded: bool,
    /// Time to the end of the bronze COPY (the raw load), then in total.
    pub bronze_seconds: f64,
    pub seconds: f64,
}

const STAGING: &str = "CREATE TEMP TABLE silver_staging (
    source_line bigint NOT NULL, event_key bytea, event_time timestamptz, event_type text,
    product_id bigint, category_id bigint, category_code text, brand text, price double precision,
    user_id bigint, user_session text, reason_code text, reason text,
    duplicate boolean NOT NULL DEFAULT false) ON COMMIT DROP";

/// Moves the staged rows of file `$1` on: rejects; then marks the valid
/// rows whose event is already in silver or earlier in this file; then
/// the first of each event into silver (in file order, so silver's heap
/// stays in time order) and the others into silver.duplicates.
const FROM_STAGING: [(&str, &str); 4] = [
    (
        "INSERT INTO silver.rejects (source_file, source_line, reason_code, reason)
         SELECT $1, source_line, reason_code, reason FROM silver_staging WHERE reason_code IS NOT NULL",
        "writing silver.rejects",
    ),
    (
        "UPDATE silver_staging s SET duplicate = true
         FROM (SELECT source_line
               FROM (SELECT source_line,
                            row_number() OVER (PARTITION BY event_time, event_key ORDER BY source_line) AS nth
                     FROM silver_staging WHERE reason_code IS NULL) ranked
               WHERE nth > 1
               UNION
               SELECT source_line FROM silver_staging st
               WHERE reason_code IS NULL AND EXISTS (
                   SELECT 1 FROM silver.events e
                   WHERE e.event_time = st.event_time AND e.event_key = st.event_key)) d
         WHERE s.source_line = d.source_line",
        "finding duplicates",
        // (takes no parameter: `$1` unused would be an untyped parameter)
    ),
    (
        "INSERT INTO silver.events (event_key, event_time, event_type, product_id, category_id,
             category_code, brand, price, user_id, user_session, source_file, source_line)
         SELECT event_key, event_time, event_type, product_id, category_id, category_code, brand,
             price, user_id, user_session, $1, source_line
         FROM silver_staging WHERE reason_code IS NULL AND NOT duplicate ORDER BY source_line",
        "writing silver.events",
    ),
    (
        "INSERT INTO silver.duplicates (source_file, source_line, event_key)
         SELECT $1, source_line, event_key FROM silver_staging WHERE duplicate",
        "writing silver.duplicates",
    ),
];

/// Folds the new events into the dimensions (no parameters).
const DIMENSIONS: [(&str, &str); 5] = [
    (
        // Categories keep their code in the data set; max() picks one
        // deterministically should a category ever be seen with two.
        "INSERT INTO warehouse.dim_category AS d
             (category_id, category_code, level1, level2, level3, first_seen, last_seen)
         SELECT category_id, code,
                NULLIF(split_part(code, '.', 1), ''),
                NULLIF(split_part(code, '.', 2), ''),
                NULLIF(split_part(code, '.', 3), ''), f, l
         FROM (SELECT category_id, max(category_code) AS code, min(event_time) AS f, max(event_time) AS l
               FROM silver_staging WHERE reason_code IS NULL AND NOT duplicate GROUP BY category_id) c
         ON CONFLICT (category_id) DO UPDATE SET
             category_code = COALESCE(EXCLUDED.category_code, d.category_code),
             level1 = COALESCE(EXCLUDED.level1, d.level1),
             level2 = COALESCE(EXCLUDED.level2, d.level2),
             level3 = COALESCE(EXCLUDED.level3, d.level3),
             first_seen = LEAST(d.first_seen, EXCLUDED.first_seen),
             last_seen = GREATEST(d.last_seen, EXCLUDED.last_seen)",
        "refreshing warehouse.dim_category",
    ),
    (
        "INSERT INTO warehouse.dim_brand AS d (brand, first_seen, last_seen)
         SELECT brand, min(event_time), max(event_time) FROM silver_staging
         WHERE reason_code IS NULL AND NOT duplicate AND brand IS NOT NULL GROUP BY brand
         ON CONFLICT (brand) DO UPDATE SET
             first_seen = LEAST(d.first_seen, EXCLUDED.first_seen),
             last_seen = GREATEST(d.last_seen, EXCLUDED.last_seen)",
        "refreshing warehouse.dim_brand",
    ),
    (
        // A product's category, brand and price are those of its last row
        // in load order (one hash aggregate and a join: no sort).
        "INSERT INTO warehouse.dim_product AS d
             (product_id, category_id, brand, last_price, first_seen, last_seen)
         SELECT p.product_id, s.category_id, s.brand, s.price, p.f, p.l
         FROM (SELECT product_id, min(event_time) AS f, max(event_time) AS l, max(source_line) AS last_line
               FROM silver_staging WHERE reason_code IS NULL AND NOT duplicate GROUP BY product_id) p
         JOIN silver_staging s ON s.source_line = p.last_line
         ON CONFLICT (product_id) DO UPDATE SET
             category_id = CASE WHEN EXCLUDED.last_seen >= d.last_seen THEN EXCLUDED.category_id ELSE d.category_id END,
             brand = CASE WHEN EXCLUDED.last_seen >= d.last_seen THEN EXCLUDED.brand ELSE d.brand END,
             last_price = CASE WHEN EXCLUDED.last_seen >= d.last_seen THEN EXCLUDED.last_price ELSE d.last_price END,
             first_seen = LEAST(d.first_seen, EXCLUDED.first_seen),
             last_seen = GREATEST(d.last_seen, EXCLUDED.last_seen)",
        "refreshing warehouse.dim_product",
    ),
    (
        "INSERT INTO warehouse.dim_user AS d (user_id, first_seen, last_seen, events)
         SELECT user_id, min(event_time), max(event_time), count(*) FROM silver_staging
         WHERE reason_code IS NULL AND NOT duplicate GROUP BY user_id
         ON CONFLICT (user_id) DO UPDATE SET
             first_seen = LEAST(d.first_seen, EXCLUDED.first_seen),
             last_seen = GREATEST(d.last_seen, EXCLUDED.last_seen),
             events = d.events + EXCLUDED.events",
        "refreshing warehouse.dim_user",
    ),
    (
        "INSERT INTO warehouse.dim_date (date_key, year, quarter, month, day, iso_week, weekday, is_weekend)
         SELECT d, extract(year FROM d), extract(quarter FROM d), extract(month FROM d),
                extract(day FROM d), extract(week FROM d), extract(isodow FROM d),
                extract(isodow FROM d) >= 6
         FROM (SELECT DISTINCT (event_time AT TIME ZONE 'UTC')::date AS d FROM silver_staging
               WHERE reason_code IS NULL) days
         ON CONFLICT (date_key) DO NOTHING",
        "refreshing warehouse.dim_date",
    ),
];

impl Warehouse {
    /// Loads each CSV file unless its checksum is in the manifest.
    pub fn load(&mut self, files: &[PathBuf]) -> Result<Vec<FileLoad>, WarehouseError> {
        files.iter().map(|file| self.load_file(file)).collect()
    }

    fn load_file(&mut self, path: &Path) -> Result<FileLoad, WarehouseError> {
        let started = Instant::now();
        let checksum =
            crate::files::file_checksum(path).map_err(|source| WarehouseError::Read {
                path: path.into(),
                source,
            })?;
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
        let mut load = FileLoad {
            file: path.into(),
            checksum,
            rows: 0,
            valid: 0,
            rejected: 0,
            duplicates: 0,
            already_loaded: done.is_some(),
            bronze_seconds: 0.0,
            seconds: 0.0,
        };
        if load.already_loaded {
            load.seconds = started.elapsed().as_secs_f64();
            return Ok(load);
        }

        let copy_what = format!("COPY into bronze.events from {name}");
        let mut writer = tx
            .copy_in(
                "COPY bronze.events (source_file, source_line, event_time, event_type, product_id, category_id, \
                 category_code, brand, price, user_id, user_session) FROM STDIN WITH (FORMAT text)",
            )
            .map_err(err(&copy_what))?;
        load.rows = copy_rows(path, &mut writer, &mut BronzeRow::new(&name))?;
        writer.finish().map_err(err(&copy_what))?;
        load.bronze_seconds = started.elapsed().as_secs_f64();

        tx.batch_execute(STAGING)
            .map_err(err("creating the silver staging table"))?;
        let copy_what = format!("COPY of the validated rows of {name}");
        let mut writer = tx
            .copy_in("COPY silver_staging (source_line, event_key, event_time, event_type, product_id, \
                      category_id, category_code, brand, price, user_id, user_session, reason_code, reason) \
                      FROM STDIN WITH (FORMAT text)")
            .map_err(err(&copy_what))?;
        let mut silver = SilverRow::default();
        copy_rows(path, &mut writer, &mut silver)?;
        writer.finish().map_err(err(&copy_what))?;
        (load.valid, load.rejected) = (silver.valid, silver.rejected);
        // Temporary tables are never auto-analysed; the joins below need row counts.
        tx.batch_execute("ANALYZE silver_staging")
            .map_err(err("analysing the staging table"))?;
        tracing::debug!(file = %name, seconds = started.elapsed().as_secs_f64(), "bronze and staging copied");
        // One silver merge at a time, so two files holding the same event
        // cannot both find it new; sorts and hashes of a file stay in memory.
        tx.batch_execute(
            "SELECT pg_advisory_xact_lock(hashtextextended('cartscore.silver', 0));
             SET LOCAL work_mem = '256MB'",
        )
        .map_err(err("taking the silver lock"))?;
        for (sql, what) in FROM_STAGING {
            let step = Instant::now();
            if sql.contains("$1") {
                tx.execute(sql, &[&name]).map_err(err(what))?;
            } else {
                tx.batch_execute(sql).map_err(err(what))?;
            }
            tracing::debug!(file = %name, seconds = step.elapsed().as_secs_f64(), "{what}");
        }
        load.duplicates = tx
            .query_one("SELECT count(*) FROM silver_staging WHERE duplicate", &[])
            .map_err(err("counting duplicates"))?
            .get::<_, i64>(0) as u64;
        for (sql, what) in DIMENSIONS {
            let step = Instant::now();
            tx.batch_execute(sql).map_err(err(what))?;
            tracing::debug!(file = %name, seconds = step.elapsed().as_secs_f64(), "{what}");
        }
        tx.execute(
            "INSERT INTO bronze.load_manifest (checksum, source_file, rows, valid, rejected, duplicates)
             VALUES ($1, $2, $3, $4, $5, $6)",
            &[
                &load.checksum,
                &name,
                &(load.rows as i64),
                &(load.valid as i64),
                &(load.rejected as i64),
                &(load.duplicates as i64),
            ],
        )
        .map_err(err("recording the load in bronze.load_manifest"))?;
        tx.commit().map_err(err("COMMIT"))?;
        load.seconds = started.elapsed().as_secs_f64();
        Ok(load)
    }
}

/// Turns one CSV record into one COPY text line (without the newline).
trait CopyRow {
    fn encode(&mut self, row: &CsvRow<'_>, out: &mut Vec<u8>);
}

/// Bronze keeps every field as it came, as text: a missing field is NULL,
/// bytes that are not UTF-8 are replaced (silver rejects that row by its
/// original bytes).
struct BronzeRow {
    file_field: Vec<u8>,
}

impl BronzeRow {
    fn new(name: &str) -> Self {
        let mut file_field = Vec::new();
        escape_text(name.as_bytes(), &mut file_field);
        Self { file_field }
    }
}

impl CopyRow for BronzeRow {
    fn encode(&mut self, row: &CsvRow<'_>, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.file_field);
        out.push(b'\t');
        out.extend_from_slice(itoa::Buffer::new().format(row.line).as_bytes());
        for field in Field::ALL {
            out.push(b'\t');
            match row.record.get(row.layout.index(field)) {
                Some(bytes) => match std::str::from_utf8(bytes) {
                    Ok(_) => escape_text(bytes, out),
                    Err(_) => escape_text(String::from_utf8_lossy(bytes).as_bytes(), out),
                },
                None => out.extend_from_slice(b"\\N"),
            }
        }
    }
}

/// Silver staging: the validated, typed event with its key, or the reason
/// the row was rejected.
#[derive(Default)]
struct SilverRow {
    valid: u64,
    rejected: u64,
}

impl CopyRow for SilverRow {
    fn encode(&mut self, row: &CsvRow<'_>, out: &mut Vec<u8>) {
        out.extend_from_slice(itoa::Buffer::new().format(row.line).as_bytes());
        let checked = row
            .event()
            .map_err(Rejected::from)
            .and_then(|event| storable(&event).map(|()| event));
        match checked {
            Ok(event) => {
                self.valid += 1;
                encode_event(&event, out);
                out.extend_from_slice(b"\t\\N\t\\N");
            }
            Err(Rejected(code, reason)) => {
                self.rejected += 1;
                out.extend_from_slice(b"\t\\N\t\\N\t\\N\t\\N\t\\N\t\\N\t\\N\t\\N\t\\N\t\\N\t");
                out.extend_from_slice(code.as_bytes());
                out.push(b'\t');
                escape_text(reason.as_bytes(), out);
            }
        }
    }
}

/// A row silver cannot take: a validation error, or a value PostgreSQL's
/// types cannot hold.
struct Rejected(&'static str, String);

impl From<EventError> for Rejected {
    fn from(err: EventError) -> Self {
        Rejected(err.code(), err.to_string())
    }
}

/// What core accepts but a PostgreSQL column cannot store: ids above
/// `bigint`'s range, and NUL characters in text.
fn storable(event: &Event) -> Result<(), Rejected> {
    for (field, value) in [
        ("product_id", event.product_id),
        ("category_id", event.category_id),
        ("user_id", event.user_id),
    ] {
        if i64::try_from(value).is_err() {
            return Err(Rejected(
                "id_out_of_range",
                format!("{field} {value} is above the warehouse's bigint range"),
            ));
        }
    }
    let texts = [
        event.category_code.as_deref(),
        event.brand.as_deref(),
        Some(event.user_session.as_str()),
    ];
    if texts.iter().flatten().any(|t| t.contains('\0')) {
        return Err(Rejected(
            "nul_character",
            "a text field holds a NUL character, which PostgreSQL text cannot store".into(),
        ));
    }
    Ok(())
}

/// The identity of an event: a hash of every validated field, so exact
/// duplicates (whatever file or line they came from) share a key.
pub fn event_key(event: &Event) -> [u8; 16] {
    let mut h = blake3::Hasher::new();
    h.update(&event.event_time.micros().to_le_bytes());
    h.update(event.event_type.as_str().as_bytes());
    h.update(&event.product_id.to_le_bytes());
    h.update(&event.category_id.to_le_bytes());
    for text in [event.category_code.as_deref(), event.brand.as_deref()] {
        match text {
            Some(t) => {
                h.update(&(t.len() as u64).to_le_bytes());
                h.update(t.as_bytes());
            }
            None => {
                h.update(&u64::MAX.to_le_bytes());
            }
        }
    }
    h.update(&event.price.to_bits().to_le_bytes());
    h.update(&event.user_id.to_le_bytes());
    h.update(event.user_session.as_bytes());
    let mut key = [0u8; 16];
    key.copy_from_slice(&h.finalize().as_bytes()[..16]);
    key
}

/// The staging columns after `source_line`, up to `user_session`.
fn encode_event(event: &Event, out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.extend_from_slice(b"\t\\\\x");
    for b in event_key(event) {
        out.push(HEX[usize::from(b >> 4)]);
        out.push(HEX[usize::from(b & 15)]);
    }
    out.push(b'\t');
    out.extend_from_slice(event.event_time.to_rfc3339().as_bytes());
    out.push(b'\t');
    out.extend_from_slice(event.event_type.as_str().as_bytes());
    let mut ints = itoa::Buffer::new();
    for id in [event.product_id, event.category_id] {
        out.push(b'\t');
        out.extend_from_slice(ints.format(id).as_bytes());
    }
    for text in [event.category_code.as_deref(), event.brand.as_deref()] {
        out.push(b'\t');
        match text {
            Some(t) => escape_text(t.as_bytes(), out),
            None => out.extend_from_slice(b"\\N"),
        }
    }
    out.push(b'\t');
    // Display prints the shortest text that reads back as the same f64.
    let _ = write!(out, "{}", event.price);
    out.push(b'\t');
    out.extend_from_slice(ints.format(event.user_id).as_bytes());
    out.push(b'\t');
    escape_text(event.user_session.as_bytes(), out);
}

/// Reads `path` as a CSV file of the data set and writes one COPY line per
/// data row. A file that cannot be read as CSV at all is an error of the file
/// (the load is rolled back); a row that reads but does not validate is the
/// encoder's business.
fn copy_rows(
    path: &Path,
    out: &mut impl Write,
    encoder: &mut impl CopyRow,
) -> Result<u64, WarehouseError> {
    let mut rows = CsvEvents::open(path)?;
    let mut line_buf = Vec::with_capacity(512);
    let mut count = 0u64;
    while let Some(row) = rows.next_row()? {
        line_buf.clear();
        encoder.encode(&row, &mut line_buf);
        line_buf.push(b'\n');
        out.write_all(&line_buf)
            .map_err(|source| WarehouseError::Read {
                path: path.into(),
                source,
            })?;
        count += 1;
    }
    Ok(count)
}

/// COPY text format escaping (backslash, tab, newline, carriage return).
pub(super) fn escape_text(field: &[u8], out: &mut Vec<u8>) {
    for &b in field {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            _ => out.push(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use cartscore_core::CsvLayout;

    use super::*;

    fn encode(encoder: &mut impl CopyRow, line: &[u8]) -> String {
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            .from_reader(line);
        let mut record = csv::ByteRecord::new();
        reader.read_byte_record(&mut record).unwrap();
        let mut out = Vec::new();
        let layout = CsvLayout::dataset();
        let row = CsvRow {
            line: 7,
            record: &record,
            layout: &layout,
        };
        encoder.encode(&row, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn bronze_rows_escape_and_keep_short_rows() {
        let mut bronze = BronzeRow::new("f\tx");
        assert_eq!(
            encode(
                &mut bronze,
                b"2019-10-01 00:00:00 UTC,view,1,2,a\\b,\"x\ty\",1.5,3,s1"
            ),
            "f\\tx\t7\t2019-10-01 00:00:00 UTC\tview\t1\t2\ta\\\\b\tx\\ty\t1.5\t3\ts1"
        );
        assert_eq!(
            encode(&mut bronze, b"2019-10-01 00:00:01 UTC,view,1"),
            "f\\tx\t7\t2019-10-01 00:00:01 UTC\tview\t1\t\\N\t\\N\t\\N\t\\N\t\\N\t\\N"
        );
    }

    #[test]
    fn silver_rows_are_typed_or_rejected_with_the_reason() {
        let mut silver = SilverRow::default();
        let valid = encode(
            &mut silver,
            b"2019-10-01 00:00:00 UTC,cart,5,2053013555631882655,,Apple,1.50,3,s1",
        );
        let fields: Vec<&str> = valid.split('\t').collect();
        assert_eq!(fields.len(), 13, "{valid}");
        assert_eq!(fields[0], "7");
        assert!(
            fields[1].starts_with("\\\\x") && fields[1].len() == 35,
            "{}",
            fields[1]
        );
        assert_eq!(
            &fields[2..],
            [
                "2019-10-01T00:00:00.000000Z",
                "cart",
                "5",
                "2053013555631882655",
                "\\N",
                "apple",
                "1.5",
                "3",
                "s1",
                "\\N",
                "\\N"
            ]
        );
        let rejected = encode(&mut silver, b"2019-10-01 00:00:00 UTC,cart,5,2,,,1.5,3,");
        let message = EventError::EmptySession.to_string();
        assert_eq!(
            rejected,
            format!(
                "7\t\\N\t\\N\t\\N\t\\N\t\\N\t\\N\t\\N\t\\N\t\\N\t\\N\tempty_session\t{message}"
            )
        );
        assert_eq!((silver.valid, silver.rejected), (1, 1));
    }

    #[test]
    fn equal_events_share_a_key_and_any_difference_changes_it() {
        let layout = CsvLayout::dataset();
        let event = |line: &[u8]| {
            let mut reader = csv::ReaderBuilder::new()
                .has_headers(false)
                .from_reader(line);
            let mut record = csv::ByteRecord::new();
            reader.read_byte_record(&mut record).unwrap();
            Event::from_csv(&record, &layout).unwrap()
        };
        let a = event(b"2019-10-01 00:00:00 UTC,view,5,2,a.b,x,1.5,3,s1");
        assert_eq!(event_key(&a), event_key(&a.clone()));
        for other in [
            &b"2019-10-01 00:00:01 UTC,view,5,2,a.b,x,1.5,3,s1"[..],
            b"2019-10-01 00:00:00 UTC,view,5,2,a.b,,1.5,3,s1",
            b"2019-10-01 00:00:00 UTC,view,5,2,,a.b,1.5,3,s1",
            b"2019-10-01 00:00:00 UTC,view,5,2,a.b,x,1.51,3,s1",
            b"2019-10-01 00:00:00 UTC,view,5,2,a.b,x,1.5,3,s2",
        ] {
            assert_ne!(event_key(&a), event_key(&event(other)));
        }
    }
}
