//! The in-process score path (LMDB snapshot + state lookup + features +
//! compiled ensemble) next to the model alone and to tract, on the demo
//! bundle, with the state of the real data slice in the store.
//!
//! `cargo bench -p cartscore-appliance --bench score` runs criterion, then
//! times 200,000 single calls of the full path into an HDR histogram and
//! prints its percentiles (criterion reports means, the target is a p99),
//! then the same with the closed loop's recording on and off in turn, and
//! with a challenger scoring beside the primary (shadow). Criterion's groups:
//! the full path and its parts; `batch`, the model alone on 1, 16 and 1,024
//! rows at a time; `many sessions`, the full path against a store of a
//! million sessions (its lookups leave the cache).
//! ONNX Runtime on the same bundle: `python3 appliance/benches/onnxruntime_latency.py`.
#![allow(clippy::unwrap_used)]

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::Instant;

use cartscore_appliance::config::StoreConfig;
use cartscore_appliance::ingest::Recorder;
use cartscore_appliance::model::{LoadLimits, Loaded, ModelSet, ServingModel};
use cartscore_appliance::ops::metrics::Metrics;
use cartscore_appliance::serve::score;
use cartscore_appliance::store::Store;
use cartscore_core::{Event, EventType, FEATURE_COUNT, TractModel};
use criterion::Criterion;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

struct Setup {
    _dir: tempfile::TempDir,
    store: Store,
    /// The demo bundle as the primary, alone.
    set: ModelSet,
    /// The same with a challenger (the demo bundle again) beside it.
    shadowed: ModelSet,
    tract: TractModel,
    carts: Vec<Event>,
    metrics: Metrics,
}

impl Setup {
    fn model(&self) -> &ServingModel {
        self.set.primary().unwrap()
    }
}

fn loaded(bundle: &Path) -> Loaded {
    let limits = LoadLimits {
        verify_rows: 256,
        max_bytes: 1 << 30,
    };
    let (model, file) = ServingModel::load(bundle, limits).unwrap();
    Loaded {
        model: std::sync::Arc::new(model),
        file,
    }
}

fn setup() -> Setup {
    let dataset = std::env::var_os("CARTSCORE_DATASET")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("../shared/data/2019-Oct-head.csv"));
    let (events, _invalid) = cartscore_core::dataset::read_all(&dataset)
        .unwrap_or_else(|e| panic!("{e} (set CARTSCORE_DATASET)"));
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&StoreConfig {
        path: dir.path().join("lmdb"),
        map_size_mib: std::num::NonZeroU64::new(256).unwrap(),
        sync: false,
        ..StoreConfig::default()
    })
    .unwrap();
    for chunk in events.chunks(1000) {
        store.apply(chunk, &[]).unwrap();
    }
    let carts: Vec<Event> = events
        .into_iter()
        .filter(|e| e.event_type == EventType::Cart)
        .collect();
    let bundle = repo().join("models/demo/model.onnx");
    let set = ModelSet {
        primary: Some(loaded(&bundle)),
        ..ModelSet::default()
    };
    let shadowed = ModelSet {
        challenger: Some(loaded(&bundle)),
        ..set.clone()
    };
    Setup {
        _dir: dir,
        store,
        set,
        shadowed,
        tract: TractModel::load(&bundle).unwrap(),
        carts,
        metrics: Metrics::new(),
    }
}

/// Times `calls` single scores; with `recorder`, each also records its cart
/// for the closed loop, as the servers do.
fn percentiles(s: &Setup, set: &ModelSet, calls: usize, recorder: Option<&Recorder>) {
    let mut histogram = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 10_000_000, 3).unwrap();
    let metrics = &s.metrics.challenger;
    for i in 0..calls {
        let cart = &s.carts[i % s.carts.len()];
        let started = Instant::now();
        let reader = s.store.reader().unwrap();
        let answer = score::answer(set, &reader, None, cart, metrics).unwrap();
        drop(reader);
        if let Some(recorder) = recorder {
            recorder.record(|| score::record_of(cart, &answer));
        }
        let nanos = started.elapsed().as_nanos() as u64;
        black_box(answer);
        histogram.record(nanos.max(1)).unwrap();
    }
    println!(
        "\nfull score path{}{}, {calls} single calls ({} distinct carts of the real slice, {} trees):",
        if set.challenger.is_some() {
            " with a challenger beside"
        } else {
            ""
        },
        if recorder.is_some() {
            " with recording"
        } else {
            ""
        },
        s.carts.len(),
        s.model().trees
    );
    for q in [50.0, 90.0, 99.0, 99.9] {
        println!(
            "  p{q:<5} {:>7.2} µs",
            histogram.value_at_percentile(q) as f64 / 1e3
        );
    }
    println!("  max    {:>7.2} µs", histogram.max() as f64 / 1e3);
}

fn benches(c: &mut Criterion, s: &Setup) {
    let mut i = 0;
    let metrics = &s.metrics.challenger;
    c.bench_function("score: snapshot + state + features + compiled model", |b| {
        b.iter(|| {
            i = (i + 1) % s.carts.len();
            let reader = s.store.reader().unwrap();
            black_box(score::answer(&s.set, &reader, None, &s.carts[i], metrics).unwrap())
        })
    });
    c.bench_function("score with a challenger beside (shadow)", |b| {
        b.iter(|| {
            i = (i + 1) % s.carts.len();
            let reader = s.store.reader().unwrap();
            black_box(score::answer(&s.shadowed, &reader, None, &s.carts[i], metrics).unwrap())
        })
    });
    let reader = s.store.reader().unwrap();
    let rows: Vec<_> = s
        .carts
        .iter()
        .map(|cart| score::features(s.model(), &reader, cart).unwrap().0)
        .collect();
    drop(reader);
    c.bench_function("features only: snapshot + state + features", |b| {
        b.iter(|| {
            i = (i + 1) % s.carts.len();
            let reader = s.store.reader().unwrap();
            black_box(score::features(s.model(), &reader, &s.carts[i]).unwrap())
        })
    });
    c.bench_function("model only: compiled ensemble, one row", |b| {
        b.iter(|| {
            i = (i + 1) % rows.len();
            black_box(s.model().predict(&rows[i]).unwrap())
        })
    });
    if let cartscore_appliance::model::serving::Evaluator::Compiled(compiled) = &s.model().evaluator
    {
        c.bench_function("model only: plain walk, one tree at a time", |b| {
            b.iter(|| {
                i = (i + 1) % rows.len();
                black_box(compiled.raw_score_plain(&rows[i].0))
            })
        });
    }
    c.bench_function("explain only: exact TreeSHAP, one row", |b| {
        b.iter(|| {
            i = (i + 1) % rows.len();
            black_box(s.model().explain(&rows[i]).unwrap())
        })
    });
    let mut batch = c.benchmark_group("batch");
    let model = s.model();
    for size in [1usize, 16, 1024] {
        let flat: Vec<f32> = rows.iter().cycle().take(size).flat_map(|r| r.0).collect();
        batch.throughput(criterion::Throughput::Elements(size as u64));
        batch.bench_function(
            format!("model only: compiled ensemble, {size} rows at a time"),
            |b| b.iter(|| black_box(model.predict_batch(black_box(&flat)).unwrap())),
        );
    }
    batch.finish();
    let mut group = c.benchmark_group("reference");
    group.sample_size(10);
    group.bench_function("model only: tract TreeEnsembleClassifier, one row", |b| {
        b.iter(|| {
            i = (i + 1) % rows.len();
            black_box(s.tract.predict(&rows[i].0[..FEATURE_COUNT]).unwrap())
        })
    });
    group.finish();
}

/// A store of `sessions` sessions (one view each, a user each), and carts
/// of those sessions spread over it.
fn many_sessions(sessions: u64) -> (tempfile::TempDir, Store, Vec<Event>) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&StoreConfig {
        path: dir.path().join("lmdb"),
        map_size_mib: std::num::NonZeroU64::new(4096).unwrap(),
        sync: false,
        ..StoreConfig::default()
    })
    .unwrap();
    let event = |i: u64, kind: EventType| Event {
        event_time: cartscore_core::Timestamp::from_secs(1_569_888_000 + (i % 3_600) as i64),
        event_type: kind,
        product_id: 1 + i % 50_000,
        category_id: 2_053_013_555_631_882_655,
        category_code: Some("electronics.smartphone".into()),
        brand: Some("samsung".into()),
        price: 10.0 + (i % 500) as f64,
        user_id: 1 + i,
        user_session: format!("many-{i:08}"),
    };
    let mut batch = Vec::with_capacity(1_000);
    for i in 0..sessions {
        batch.push(event(i, EventType::View));
        if batch.len() == 1_000 {
            store.apply(&batch, &[]).unwrap();
            batch.clear();
        }
    }
    store.apply(&batch, &[]).unwrap();
    // A multiplicative hash spreads the carts over the whole key space.
    let carts = (0..10_000u64)
        .map(|k| {
            let mut cart = event((k * 2_654_435_761) % sessions, EventType::Cart);
            cart.event_time = cartscore_core::Timestamp(cart.event_time.micros() + 60_000_000);
            cart
        })
        .collect();
    (dir, store, carts)
}

fn many_sessions_bench(c: &mut Criterion, s: &Setup) {
    let (_dir, store, carts) = many_sessions(1_000_000);
    let metrics = &s.metrics.challenger;
    let mut i = 0;
    let mut group = c.benchmark_group("many sessions");
    group.bench_function("score: 1,000,000 sessions in the store", |b| {
        b.iter(|| {
            i = (i + 1) % carts.len();
            let reader = store.reader().unwrap();
            black_box(score::answer(&s.set, &reader, None, &carts[i], metrics).unwrap())
        })
    });
    group.finish();
}

fn main() {
    let setup = setup();
    let mut criterion = Criterion::default().configure_from_args();
    benches(&mut criterion, &setup);
    many_sessions_bench(&mut criterion, &setup);
    criterion.final_summary();
    percentiles(&setup, &setup.set, 200_000, None);
    // Recording off and on in alternating blocks, so both see the same
    // machine; a thread drains the records as the writer does (it polls the
    // queue between transactions, so a send never wakes it).
    let metrics = Metrics::new();
    let (recorder, records) = Recorder::new(65_536, &metrics);
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let drain = {
        let done = std::sync::Arc::clone(&done);
        std::thread::spawn(move || {
            let mut drained = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                drained += records.try_iter().count();
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            drained + records.try_iter().count()
        })
    };
    for _ in 0..2 {
        percentiles(&setup, &setup.set, 100_000, None);
        percentiles(&setup, &setup.set, 100_000, Some(&recorder));
    }
    percentiles(&setup, &setup.shadowed, 100_000, Some(&recorder));
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    drop(recorder);
    let recorded = drain.join().unwrap();
    let dropped = metrics.closed_loop.dropped_total();
    println!("recorded {recorded} carts, {dropped} dropped (queue full)");
}
