//! Every complete row of the real data slice in `../shared/data` parses and
//! validates. The slice was cut at a byte limit: its last line stops inside
//! `user_id` and has no `user_session`, and must be rejected as exactly that.

use std::path::PathBuf;

use cartscore_core::validate::Field;
use cartscore_core::{CsvEvents, EventError, EventType};

fn dataset_path() -> PathBuf {
    match std::env::var_os("CARTSCORE_DATASET") {
        Some(path) => PathBuf::from(path),
        None => {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/2019-Oct-head.csv")
        }
    }
}

#[test]
fn every_row_of_the_real_slice_validates() {
    let path = dataset_path();
    let mut reader = CsvEvents::open(&path)
        .unwrap_or_else(|e| panic!("the data slice {} must be readable: {e}", path.display()));
    let (mut views, mut carts, mut purchases, mut removes, mut rows) = (0, 0, 0, 0, 0);
    let mut max_category_id = 0u64;
    let mut rejected = Vec::new();
    while let Some(row) = reader.next_row().expect("csv record") {
        let event = match row.event() {
            Ok(event) => event,
            Err(err) => {
                rejected.push((row.line, err));
                continue;
            }
        };
        rows += 1;
        max_category_id = max_category_id.max(event.category_id);
        match event.event_type {
            EventType::View => views += 1,
            EventType::Cart => carts += 1,
            EventType::Purchase => purchases += 1,
            EventType::RemoveFromCart => removes += 1,
        }
    }
    assert_eq!(
        rejected,
        vec![(
            17_436,
            EventError::Missing {
                field: Field::UserSession
            }
        )],
        "only the truncated last line may fail"
    );
    assert_eq!(rows, 17_434);
    assert_eq!((views, carts, purchases, removes), (17_055, 165, 214, 0));
    // Ids near 2.2e18 must survive exactly (an f64 detour would round them).
    assert!(
        max_category_id > 2_000_000_000_000_000_000,
        "{max_category_id}"
    );
}
