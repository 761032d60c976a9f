//! Streaming `silver.events` back in replay order with COPY TO STDOUT: a
//! reader thread owns the connection and parses rows into batches on a
//! bounded channel, so memory stays flat however large the table is and
//! parsing overlaps the replay.

use std::borrow::Cow;
use std::io::{BufRead, BufReader};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use cartscore_core::event::{RawEvent, RawValue};
use cartscore_core::{Event, EventError};

use super::client::{Warehouse, WarehouseError, query_error};

/// Silver in the order the trainer replays it; ties keep the source files'
/// order, as a replay of the files themselves would.
const SILVER_IN_TIME_ORDER: &str = "COPY (
    SELECT (extract(epoch FROM event_time) * 1000000)::bigint, event_type, product_id,
           category_id, category_code, brand, price, user_id, user_session
    FROM silver.events
    ORDER BY event_time, source_file COLLATE \"C\", source_line) TO STDOUT WITH (FORMAT text)";

const BATCH: usize = 8192;
/// Batches in flight between the reader thread and the replay.
const DEPTH: usize = 8;

type Batch = Vec<Result<Event, EventError>>;

/// The events of `silver.events`, in time order.
#[derive(Debug)]
pub struct WarehouseEvents {
    batches: Receiver<Result<Batch, WarehouseError>>,
    current: std::vec::IntoIter<Result<Event, EventError>>,
    reader: Option<JoinHandle<()>>,
}

impl WarehouseEvents {
    /// Connects (so an unreachable server fails here, by name) and starts
    /// the reader thread.
    pub fn open(url: &str) -> Result<Self, WarehouseError> {
        let warehouse = Warehouse::connect(url)?;
        let (tx, rx) = sync_channel(DEPTH);
        let reader = std::thread::Builder::new()
            .name("silver-reader".into())
            .spawn(move || {
                if let Err(err) = stream(warehouse, &tx) {
                    let _ = tx.send(Err(err));
                }
            })
            .map_err(|source| WarehouseError::Read {
                path: "silver-reader thread".into(),
                source,
            })?;
        Ok(Self {
            batches: rx,
            current: Vec::new().into_iter(),
            reader: Some(reader),
        })
    }

    /// The next row: `Ok(None)` at the end, `Err` when the stream broke.
    /// A row that fails validation here (silver holds only valid rows, so
    /// it would mean the table was edited by hand) is returned as such.
    pub fn next_row(&mut self) -> Result<Option<Result<Event, EventError>>, WarehouseError> {
        loop {
            if let Some(row) = self.current.next() {
                return Ok(Some(row));
            }
            match self.batches.recv() {
                Ok(batch) => self.current = batch?.into_iter(),
                Err(_) => {
                    if let Some(reader) = self.reader.take() {
                        let _ = reader.join();
                    }
                    return Ok(None);
                }
            }
        }
    }
}

fn stream(
    mut warehouse: Warehouse,
    tx: &SyncSender<Result<Batch, WarehouseError>>,
) -> Result<(), WarehouseError> {
    let what = "COPY of silver.events in time order";
    let reader = warehouse
        .client
        .copy_out(SILVER_IN_TIME_ORDER)
        .map_err(query_error(&warehouse.endpoint, what))?;
    let mut reader = BufReader::with_capacity(1 << 20, reader);
    let mut line = Vec::with_capacity(512);
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        line.clear();
        let n = reader
            .read_until(b'\n', &mut line)
            .map_err(|source| WarehouseError::Stream {
                endpoint: warehouse.endpoint.clone(),
                what,
                source,
            })?;
        if n == 0 {
            break;
        }
        if line.last() == Some(&b'\n') {
            line.pop();
        }
        batch.push(parse_row(&line));
        if batch.len() == BATCH {
            let full = std::mem::replace(&mut batch, Vec::with_capacity(BATCH));
            if tx.send(Ok(full)).is_err() {
                // The replay stopped reading (it failed): stop quietly.
                return Ok(());
            }
        }
    }
    if !batch.is_empty() {
        let _ = tx.send(Ok(batch));
    }
    Ok(())
}

/// One COPY text row of [`SILVER_IN_TIME_ORDER`] through core's validation.
fn parse_row(line: &[u8]) -> Result<Event, EventError> {
    let text = std::str::from_utf8(line).map_err(|_| EventError::NotUtf8)?;
    let mut fields = text.split('\t').map(|f| match f {
        "\\N" => RawValue::Null,
        f => RawValue::Str(unescape(f)),
    });
    let mut next = || fields.next().unwrap_or(RawValue::Missing);
    let event_time = match next() {
        RawValue::Str(micros) => micros
            .parse::<i64>()
            .map(RawValue::Signed)
            .unwrap_or(RawValue::Str(micros)),
        other => other,
    };
    RawEvent {
        event_time,
        event_type: next(),
        product_id: next(),
        category_id: next(),
        category_code: next(),
        brand: next(),
        price: next(),
        user_id: next(),
        user_session: next(),
        deleted: false,
        updated: false,
    }
    .validate()
}

/// Undoes COPY text escaping; borrows when there is nothing to undo.
fn unescape(field: &str) -> Cow<'_, str> {
    if !field.contains('\\') {
        return Cow::Borrowed(field);
    }
    let mut out = String::with_capacity(field.len());
    let mut chars = field.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('t') => out.push('\t'),
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('b') => out.push('\u{8}'),
            Some('f') => out.push('\u{c}'),
            Some('v') => out.push('\u{b}'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_parse_through_core_validation() {
        let event = parse_row(
            b"1569888000000000\tcart\t5\t2053013555631882655\ta.b\\tc\t\\N\t1.5\t7\ts\\\\1",
        )
        .unwrap();
        assert_eq!(event.event_time.micros(), 1_569_888_000_000_000);
        assert_eq!(event.category_id, 2_053_013_555_631_882_655);
        assert_eq!(event.category_code.as_deref(), Some("a.b\tc"));
        assert_eq!(event.brand, None);
        assert_eq!(event.user_session, "s\\1");
        assert!(parse_row(b"1569888000000000\tbuy\t5\t2\t\\N\t\\N\t1\t7\ts").is_err());
    }
}
