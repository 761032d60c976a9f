//! Event parsing and validation, every wire form: a flat JSON object, the
//! Kafka Connect JsonConverter envelope, a Debezium row (with its source
//! position), and a CSV row of the data set. A rejected input names its
//! rule; an accepted event, written back as JSON, parses to the same event.
#![no_main]

use cartscore_core::{CsvLayout, Event, EventError};
use libfuzzer_sys::fuzz_target;

fn check(result: Result<Event, EventError>) {
    match result {
        Ok(event) => {
            let text = event.to_json().to_string();
            let again = Event::from_json(text.as_bytes())
                .unwrap_or_else(|e| panic!("{text} no longer parses: {e}"));
            assert_eq!(again, event, "{text} parses to another event");
        }
        Err(error) => {
            assert!(!error.code().is_empty(), "{error:?} has no code");
            assert!(!error.to_string().is_empty(), "{error:?} has no message");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    check(Event::from_json_with_source(data).map(|(event, _)| event));
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(data);
    let mut record = csv::ByteRecord::new();
    if let Ok(true) = reader.read_byte_record(&mut record) {
        check(Event::from_csv(&record, &CsvLayout::dataset()));
    }
});
