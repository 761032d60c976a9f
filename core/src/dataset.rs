//! Files in the data set's CSV form: one reader for everything that reads
//! them (the trainer's file source, the lake and warehouse loaders, the
//! replay producer), so header rules, line numbers and read errors are the
//! same everywhere.
//!
//! Lines are counted here rather than taken from the csv crate, whose
//! positions are one short on CRLF files (the data set's form): the header is
//! line 1 and every record one line after it. With byte records and flexible
//! rows the csv crate has no row-level errors, so any error it reports is the
//! file's (an I/O error); a short or broken row is the validation's business.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::event::{CsvLayout, Event, HeaderError};
use crate::validate::EventError;

/// Buffer of the file and of the CSV parser: large reads keep a multi-GB
/// month file streaming at disk speed.
const BUFFER_BYTES: usize = 1 << 20;

#[derive(Debug, Error)]
pub enum DatasetError {
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {path} at line {line}: {source}")]
    Read {
        path: PathBuf,
        line: u64,
        #[source]
        source: csv::Error,
    },
    #[error("{path}: {source}")]
    Header {
        path: PathBuf,
        #[source]
        source: HeaderError,
    },
}

impl DatasetError {
    /// The line the error is about (1 = the header).
    pub fn line(&self) -> u64 {
        match self {
            Self::Open { .. } | Self::Header { .. } => 1,
            Self::Read { line, .. } => *line,
        }
    }
}

/// A CSV file of the data set, read one record at a time.
pub struct CsvEvents<R = BufReader<File>> {
    path: PathBuf,
    reader: csv::Reader<R>,
    layout: CsvLayout,
    record: csv::ByteRecord,
    line: u64,
}

impl<R> std::fmt::Debug for CsvEvents<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CsvEvents")
            .field("path", &self.path)
            .field("line", &self.line)
            .finish_non_exhaustive()
    }
}

/// One record and where it was.
#[derive(Debug, Clone, Copy)]
pub struct CsvRow<'a> {
    /// Its line in the file (the first record is line 2).
    pub line: u64,
    pub record: &'a csv::ByteRecord,
    pub layout: &'a CsvLayout,
}

impl CsvRow<'_> {
    /// The record validated as an event.
    pub fn event(&self) -> Result<Event, EventError> {
        Event::from_csv(self.record, self.layout)
    }
}

impl CsvEvents {
    /// Opens `path` and reads its header.
    pub fn open(path: &Path) -> Result<Self, DatasetError> {
        let file = File::open(path).map_err(|source| DatasetError::Open {
            path: path.into(),
            source,
        })?;
        Self::from_reader(path, BufReader::with_capacity(BUFFER_BYTES, file))
    }
}

impl<R: Read> CsvEvents<R> {
    /// Reads CSV from `input`; `path` names it in errors.
    pub fn from_reader(path: &Path, input: R) -> Result<Self, DatasetError> {
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(true)
            .flexible(true)
            .buffer_capacity(BUFFER_BYTES)
            .from_reader(input);
        let header = reader.byte_headers().map_err(|source| DatasetError::Read {
            path: path.into(),
            line: 1,
            source,
        })?;
        let layout = CsvLayout::from_header(header).map_err(|source| DatasetError::Header {
            path: path.into(),
            source,
        })?;
        Ok(Self {
            path: path.into(),
            reader,
            layout,
            record: csv::ByteRecord::new(),
            line: 1,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn layout(&self) -> &CsvLayout {
        &self.layout
    }

    /// The next record, or `None` at the end of the file.
    pub fn next_row(&mut self) -> Result<Option<CsvRow<'_>>, DatasetError> {
        let more = self
            .reader
            .read_byte_record(&mut self.record)
            .map_err(|source| DatasetError::Read {
                path: self.path.clone(),
                line: self.line + 1,
                source,
            })?;
        if !more {
            return Ok(None);
        }
        self.line += 1;
        Ok(Some(CsvRow {
            line: self.line,
            record: &self.record,
            layout: &self.layout,
        }))
    }
}

/// Rows that failed validation: their line and why.
pub type Rejected = Vec<(u64, EventError)>;

/// Every valid event of a file in file order, with the line and reason of
/// every row that failed validation (for tools that load a whole file).
pub fn read_all(path: &Path) -> Result<(Vec<Event>, Rejected), DatasetError> {
    let mut rows = CsvEvents::open(path)?;
    let (mut events, mut invalid) = (Vec::new(), Vec::new());
    while let Some(row) = rows.next_row()? {
        match row.event() {
            Ok(event) => events.push(event),
            Err(error) => invalid.push((row.line, error)),
        }
    }
    Ok((events, invalid))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = "event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session";

    type Rows = Vec<(u64, Result<Event, EventError>)>;

    fn rows(text: &str) -> Result<Rows, DatasetError> {
        let mut events = CsvEvents::from_reader(Path::new("t.csv"), text.as_bytes())?;
        let mut out = Vec::new();
        while let Some(row) = events.next_row()? {
            out.push((row.line, row.event()));
        }
        Ok(out)
    }

    #[test]
    fn counts_lines_on_crlf_files_and_reports_bad_rows_by_line() {
        let text = format!(
            "{HEADER}\r\n2019-10-01 00:00:00 UTC,view,1,2,,,1.0,3,s\r\n2019-10-01 00:00:01 UTC,view,1,2,,,-1.0,3,s\r\n2019-10-01 00:00:02 UTC,cart,1\r\n"
        );
        let rows = rows(&text).unwrap();
        let lines: Vec<u64> = rows.iter().map(|(line, _)| *line).collect();
        assert_eq!(lines, [2, 3, 4]);
        assert!(rows[0].1.is_ok());
        assert_eq!(rows[1].1.as_ref().unwrap_err().code(), "negative_price");
        assert_eq!(rows[2].1.as_ref().unwrap_err().code(), "missing_field");
    }

    #[test]
    fn columns_may_come_in_any_order_with_extras() {
        let text = "user_session,extra,price,event_time,event_type,product_id,category_id,category_code,brand,user_id\ns,x,2.5,2019-10-01 00:00:00 UTC,view,1,2,,,3\n";
        let rows = rows(text).unwrap();
        let event = rows[0].1.as_ref().unwrap();
        assert_eq!((event.price, event.user_session.as_str()), (2.5, "s"));
    }

    #[test]
    fn a_headerless_file_is_named_as_such_with_the_columns_it_needs() {
        let err = rows("2019-10-01 00:00:00 UTC,view,1,2,,,1.0,3,s\n").unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(
                err,
                DatasetError::Header {
                    source: HeaderError::NoHeader { .. },
                    ..
                }
            ),
            "{text}"
        );
        assert!(
            text.contains("t.csv: the first line is not a header row"),
            "{text}"
        );
        assert!(text.contains(HEADER), "{text}");
        assert!(text.contains("2019-10-01 00:00:00 UTC,view"), "{text}");
    }

    #[test]
    fn a_header_without_a_column_names_it() {
        let err = rows(
            "event_time,event_type,product_id,category_id,category_code,brand,price,user_id\n",
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("the header row has no column `user_session`"),
            "{err}"
        );
    }
}
