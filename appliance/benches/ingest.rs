//! The ingest stage on one core: decode JSON messages, validate them with
//! `core`, apply them to LMDB in write transactions of 1,000 events that also
//! record a stream offset. Messages are the real slice's events as flat JSON
//! (the form the stream carries), replayed under fresh session ids each round
//! so every round does the full work of new state.
//!
//! `cargo bench -p cartscore-appliance --bench ingest`
#![allow(clippy::unwrap_used)]

use std::hint::black_box;
use std::path::{Path, PathBuf};

use cartscore_appliance::config::StoreConfig;
use cartscore_appliance::store::{OffsetKind, Store, StreamOffset};
use cartscore_core::Event;
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

fn main() {
    let messages = messages();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&StoreConfig {
        path: dir.path().join("lmdb"),
        map_size_mib: std::num::NonZeroU64::new(8192).unwrap(),
        sync: false,
        ..StoreConfig::default()
    })
    .unwrap();
    let mut criterion = Criterion::default().configure_from_args();
    let mut group = criterion.benchmark_group("ingest");
    group.throughput(Throughput::Elements(messages.len() as u64));
    group.sample_size(10);
    let mut round = 0u64;
    let mut offset = 0i64;
    group.bench_function(
        "decode + validate + apply + offsets (real slice, 1000/txn)",
        |b| {
            b.iter(|| {
                round += 1;
                let prefix = format!("r{round}-");
                for chunk in messages.chunks(BATCH) {
                    let events: Vec<Event> = chunk
                        .iter()
                        .map(|m| {
                            let mut e = Event::from_json(m).unwrap();
                            e.user_session.insert_str(0, &prefix);
                            e
                        })
                        .collect();
                    offset += events.len() as i64;
                    let position = StreamOffset {
                        topic: "tracking.raw_user_behavior".into(),
                        partition: 0,
                        next_offset: offset,
                        kind: OffsetKind::Applied,
                    };
                    black_box(store.apply(&events, &[position]).unwrap());
                }
            })
        },
    );
    group.finish();
    criterion.final_summary();
}
