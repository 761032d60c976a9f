//! The ingest stage on one core: decode JSON messages, validate them with
//! `core`, apply them to LMDB in write transactions of 1,000 events that also
//! record a stream offset. Messages are the real slice's events as flat JSON
//! (the form the stream carries), replayed under fresh session ids each round
//! so every round does the full work of new state. The second case adds the
//! closed loop as it runs with Kafka: every cart of the round is recorded
//! (as if scored just before it arrived) in the transaction of its batch,
//! into the prediction log's outbox too, and later events of its session
//! resolve it.
//!
//! `cargo bench -p cartscore-appliance --bench ingest`
#![allow(clippy::unwrap_used)]

use std::hint::black_box;
use std::path::{Path, PathBuf};

use cartscore_appliance::config::StoreConfig;

use cartscore_appliance::store::{CartRecord, OffsetKind, SessionText, Store, StreamOffset};
use cartscore_core::{Event, EventType, FEATURE_COUNT};
use criterion::{Criterion, Throughput};

const BATCH: usize = 1_000;

// The daemon's allocator, so the stage is measured as it runs there.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn messages() -> Vec<Vec<u8>> {
    let dataset = std::env::var_os("CARTSCORE_DATASET")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/2019-Oct-head.csv")
        });
    let (events, _invalid) = cartscore_core::dataset::read_all(&dataset)
        .unwrap_or_else(|e| panic!("{e} (set CARTSCORE_DATASET)"));
    events
        .iter()
        .map(|e| e.to_json().to_string().into_bytes())
        .collect()
}

/// One round: the messages under fresh session ids, 1,000 per transaction,
/// each cart recorded in its batch's transaction when `record`.
fn round(store: &Store, messages: &[Vec<u8>], round: u64, offset: &mut i64, record: bool) {
    let prefix = format!("r{round}-");
    let version: &'static str = "bench";
    for chunk in messages.chunks(BATCH) {
        let events: Vec<Event> = chunk
            .iter()
            .map(|m| {
                let mut e = Event::from_json(m).unwrap();
                e.user_session.insert_str(0, &prefix);
                e
            })
            .collect();
        let records: Vec<CartRecord> = if record {
            events
                .iter()
                .filter(|e| e.event_type == EventType::Cart)
                .map(|e| CartRecord {
                    user_id: e.user_id,
                    user_session: SessionText::new(&e.user_session),
                    product_id: e.product_id,
                    cart_time: e.event_time,
                    model_version: version,
                    probability: 0.5,
                    features: [0.0; FEATURE_COUNT],
                    scored_at_ms: 0,
                    paired: None,
                    canary: false,
                })
                .collect()
        } else {
            Vec::new()
        };
        *offset += events.len() as i64;
        let position = StreamOffset {
            topic: "tracking.raw_user_behavior".into(),
            partition: 0,
            next_offset: *offset,
            kind: OffsetKind::Applied,
        };
        black_box(
            store
                .apply_with(&events, &[position], &records, None)
                .unwrap(),
        );
    }
}

fn open(dir: &Path, name: &str, log: bool) -> Store {
    Store::open(&StoreConfig {
        path: dir.join(name),
        map_size_mib: std::num::NonZeroU64::new(8192).unwrap(),
        sync: false,
        ..StoreConfig::default()
    })
    .unwrap()
    .with_prediction_log(log)
}

fn main() {
    let messages = messages();
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), "plain", false);
    let closed_loop = open(dir.path(), "closed-loop", true);
    let mut criterion = Criterion::default().configure_from_args();
    let mut group = criterion.benchmark_group("ingest");
    group.throughput(Throughput::Elements(messages.len() as u64));
    group.sample_size(10);
    let (mut rounds, mut offset) = (0u64, 0i64);
    group.bench_function(
        "decode + validate + apply + offsets (real slice, 1000/txn)",
        |b| {
            b.iter(|| {
                rounds += 1;
                round(&store, &messages, rounds, &mut offset, false);
            })
        },
    );
    let (mut rounds, mut offset) = (0u64, 0i64);
    group.bench_function(
        "the same with every cart recorded, logged and resolved",
        |b| {
            b.iter(|| {
                rounds += 1;
                round(&closed_loop, &messages, rounds, &mut offset, true);
            })
        },
    );
    group.finish();
    criterion.final_summary();
}
