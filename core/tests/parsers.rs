//! Property tests: no input makes a parser panic, and valid events survive a
//! JSON round trip unchanged.

use cartscore_core::{CsvLayout, Event, Timestamp};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn json_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = Event::from_json(&bytes);
    }

    #[test]
    fn json_parser_never_panics_on_near_valid_objects(
        time in "[0-9TZ: -]{0,30}",
        kind in "(view|cart|purchase|remove_from_cart|[a-z]{0,8})",
        id in any::<i64>(),
        price in any::<f64>(),
        session in ".{0,200}",
    ) {
        let text = serde_json::json!({
            "event_time": time, "event_type": kind, "product_id": id, "category_id": id,
            "price": price, "user_id": id, "user_session": session,
        }).to_string();
        let _ = Event::from_json(text.as_bytes());
        let envelope = format!("{{\"schema\":null,\"payload\":{text}}}");
        let _ = Event::from_json(envelope.as_bytes());
    }

    #[test]
    fn csv_parser_never_panics(fields in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..12)) {
        let record = csv::ByteRecord::from(fields);
        let _ = Event::from_csv(&record, &CsvLayout::dataset());
    }

    #[test]
    fn timestamp_parser_never_panics(text in ".{0,40}") {
        let _ = Timestamp::parse(&text);
    }

    #[test]
    fn valid_events_round_trip(
        secs in 946_684_800i64..4_102_444_799,
        product in 1u64..,
        category in 1u64..,
        user in 1u64..,
        cents in 0u64..10_000_000,
        session in "[a-f0-9-]{1,128}",
        brand in "[a-z]{0,12}",
    ) {
        let text = serde_json::json!({
            "event_time": Timestamp::from_secs(secs).to_dataset_form(), "event_type": "view",
            "product_id": product, "category_id": category, "category_code": "a.b.c",
            "brand": brand, "price": cents as f64 / 100.0, "user_id": user, "user_session": session,
        }).to_string();
        let event = Event::from_json(text.as_bytes()).expect("valid");
        prop_assert_eq!(event.category_id, category);
        let again = Event::from_json(event.to_json().to_string().as_bytes()).expect("round trip");
        prop_assert_eq!(again, event);
    }
}
