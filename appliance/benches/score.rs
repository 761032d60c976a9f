//! The in-process score path (LMDB snapshot + state lookup + features +
//! compiled ensemble) next to the model alone and to tract, on the demo
//! bundle, with the state of the real data slice in the store.
//!
//! `cargo bench -p cartscore-appliance --bench score` runs criterion, then
//! times 200,000 single calls of the full path into an HDR histogram and
//! prints its percentiles (criterion reports means, the target is a p99),
//! then the same with the closed loop's recording on and off in turn, and
//! with a challenger scoring beside the primary (shadow).
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
    c.bench_function("explain only: exact TreeSHAP, one row", |b| {
        b.iter(|| {
            i = (i + 1) % rows.len();
            black_box(s.model().explain(&rows[i]).unwrap())
        })
    });
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

fn main() {
    let setup = setup();
    let mut criterion = Criterion::default().configure_from_args();
    benches(&mut criterion, &setup);
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
