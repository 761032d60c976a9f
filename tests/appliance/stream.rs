//! The Kafka path against a real broker (nisshi on PostgreSQL): routing of valid
//! and invalid messages, exactly-once state across SIGKILL, and a broker
//! outage.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use rdkafka::message::{Headers, Message};
use serde_json::{Value, json};

use cartscore_core::{CsvLayout, Event, EventType, FEATURE_NAMES, Timestamp};

use crate::broker::{Broker, TestProducer, create_topic, read_topic, unique};
use crate::closed_loop::resolve_all;
use crate::common::{Appliance, Options, cart_json, dataset, model_dir_with_demo, producer_binary};

pub(crate) struct Topics {
    pub(crate) raw: String,
    cdc: String,
    validated: String,
    invalid: String,
    predictions: String,
    outcomes: String,
}

impl Topics {
    fn create(brokers: &str, raw_partitions: u32) -> Self {
        let topics = Self {
            raw: unique("raw"),
            cdc: unique("cdc"),
            validated: unique("validated"),
            invalid: unique("invalid"),
            predictions: unique("predictions"),
            outcomes: unique("outcomes"),
        };
        for (topic, partitions) in [
            (&topics.raw, raw_partitions),
            (&topics.cdc, 1),
            (&topics.validated, 1),
            (&topics.invalid, 1),
            (&topics.predictions, 1),
            (&topics.outcomes, 1),
        ] {
            create_topic(brokers, topic, partitions);
        }
        topics
    }

    /// The same raw topics with a prediction log of their own.
    fn with_own_log(&self, brokers: &str) -> Self {
        let log = Self {
            raw: self.raw.clone(),
            cdc: self.cdc.clone(),
            validated: self.validated.clone(),
            invalid: self.invalid.clone(),
            predictions: unique("predictions"),
            outcomes: unique("outcomes"),
        };
        create_topic(brokers, &log.predictions, 1);
        create_topic(brokers, &log.outcomes, 1);
        log
    }

    fn env(&self, brokers: &str, group: &str, forward: bool) -> Vec<(String, String)> {
        [
            ("CARTSCORE_KAFKA__BROKERS", brokers.to_owned()),
            ("CARTSCORE_KAFKA__GROUP_ID", group.to_owned()),
            (
                "CARTSCORE_KAFKA__TOPICS",
                format!("[\"{}\",\"{}\"]", self.raw, self.cdc),
            ),
            ("CARTSCORE_KAFKA__VALIDATED_TOPIC", self.validated.clone()),
            ("CARTSCORE_KAFKA__INVALID_TOPIC", self.invalid.clone()),
            ("CARTSCORE_KAFKA__FORWARD_VALIDATED", forward.to_string()),
            (
                "CARTSCORE_KAFKA__PREDICTIONS_TOPIC",
                self.predictions.clone(),
            ),
            ("CARTSCORE_KAFKA__OUTCOMES_TOPIC", self.outcomes.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    /// An appliance in `work` (the demo model, a store of its own) consuming
    /// these topics as a new group named after `group`.
    fn start_appliance(&self, work: &Path, brokers: &str, group: &str, forward: bool) -> Appliance {
        let models = model_dir_with_demo(work);
        Appliance::start(
            work,
            &models,
            &Options {
                env: self.env(brokers, &unique(group), forward),
                ..Options::default()
            },
        )
    }
}

/// Runs `cartscore-producer replay` with `args`; returns its summary.
pub(crate) fn replay(brokers: &str, topic: &str, args: &[&str]) -> Value {
    let output = Command::new(producer_binary())
        .args(["replay", "--brokers", brokers, "--topic", topic, "--input"])
        .arg(dataset())
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(output.status.success(), "replay failed: {output:?}");
    serde_json::from_slice(&output.stdout).unwrap()
}

/// `cartscore inspect` on a store folder.
pub(crate) fn inspect(store: &Path) -> Value {
    let output = Command::new(crate::common::appliance_binary())
        .arg("inspect")
        .arg("--store-path")
        .arg(store)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert!(output.status.success(), "inspect failed: {output:?}");
    serde_json::from_slice(&output.stdout).unwrap()
}

pub(crate) fn stored_offsets(store: &Path, topic: &str, kind: &str) -> i64 {
    inspect(store)["offsets"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["topic"] == topic && o["kind"] == kind)
        .map(|o| o["next_offset"].as_i64().unwrap())
        .sum()
}

fn applied_offsets(store: &Path, topic: &str) -> i64 {
    stored_offsets(store, topic, "applied")
}

/// Random points to kill at, reproducible from the seed it prints.
pub(crate) struct KillSchedule(u64);

impl KillSchedule {
    pub(crate) fn from_clock() -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        eprintln!("kill schedule seed {seed}");
        Self(u64::from(seed) | 1)
    }

    /// The next draw (xorshift).
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

pub(crate) fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the store's offsets say `count` messages of `topic` are applied.
fn wait_applied(app: &Appliance, topic: &str, count: i64) {
    wait_until(
        &format!("{count} messages of {topic} applied"),
        Duration::from_secs(120),
        || applied_offsets(&app.store_dir, topic) >= count,
    );
}

const DEMO_VERSION: &str = "demo-1";
const T0: i64 = 1_569_920_400; // 2019-10-01 09:00:00 UTC

fn flat(session: &str, secs: i64, kind: &str, price: f64) -> String {
    cart_json(session, secs, 1_004_856, price).replace("\"cart\"", &format!("\"{kind}\""))
}

#[test]
fn stream_routes_valid_and_invalid_messages_and_keeps_arrival_order() {
    let brokers = Broker::shared();
    let topics = Topics::create(brokers, 2);
    let work = tempfile::tempdir().unwrap();
    let app = topics.start_appliance(work.path(), brokers, "route", true);

    let huge = format!(r#"{{"event_type":"view","pad":"{}"}}"#, "x".repeat(200_000));
    let binary: &[u8] = &[0xff, 0xfe, 0x00, 0x9c, b'{'];
    let truncated = br#"{"event_time": "2019-10-01 00:00:00 UTC", "event_ty"#;
    let envelope = format!(
        r#"{{"schema":{{"type":"struct","fields":[]}},"payload":{}}}"#,
        flat("route-a", 10, "cart", 130.76)
    );
    let debezium = json!({
        "schema": {"type": "struct", "fields": []},
        "payload": {"id": 7, "event_time": "2019-10-01T09:00:03Z", "event_type": "view",
                    "product_id": 5, "category_id": 2053013555631882655_u64, "category_code": "",
                    "brand": "apple", "price": 10.5, "user_id": 42, "user_session": "route-cdc",
                    "__op": "c", "__table": "events", "__deleted": "false"}
    })
    .to_string();
    let deleted = debezium.replace("\"__deleted\":\"false\"", "\"__deleted\":\"true\"");
    let producer = TestProducer::new(brokers);
    // All on one partition, poison first: valid messages behind it must flow.
    let raw: Vec<(&str, Option<Vec<u8>>)> = vec![
        (
            "route-a",
            Some(flat("route-a", 0, "view", 130.76).into_bytes()),
        ),
        ("huge", Some(huge.clone().into_bytes())),
        ("binary", Some(binary.to_vec())),
        ("truncated", Some(truncated.to_vec())),
        ("tombstone", None),
        (
            "route-a",
            Some(flat("route-a", 1, "view", -1.0).into_bytes()),
        ),
        ("route-a", Some(envelope.into_bytes())),
        // Late: event time before the cart that arrived earlier.
        (
            "route-a",
            Some(flat("route-a", 5, "view", 120.0).into_bytes()),
        ),
    ];
    for (key, payload) in &raw {
        producer.send(&topics.raw, 0, Some(key), payload.as_deref());
    }
    producer.send(&topics.cdc, 0, Some("route-cdc"), Some(debezium.as_bytes()));
    producer.send(&topics.cdc, 0, Some("route-cdc"), Some(deleted.as_bytes()));
    producer.flush();
    wait_applied(&app, &topics.raw, 8);
    wait_applied(&app, &topics.cdc, 2);
    // Keyed by session, not by user: the key policy shards rely on is
    // broken by each of the three valid raw events, and counted.
    let mismatches = format!(
        "cartscore_stream_key_mismatches_total{{topic=\"{}\",reason=\"not_user_id\"}}",
        topics.raw
    );
    assert_eq!(app.metric(&mismatches), 3.0);

    // Arrival order decides; the late view counts but does not move the clock back.
    let (status, session) = app.get("/v1/sessions/route-a");
    assert_eq!(status, 200, "{session}\n{}", app.log());
    let s = &session["session"];
    assert_eq!(
        (
            s["events"].as_u64(),
            s["views"].as_u64(),
            s["carts"].as_u64()
        ),
        (Some(3), Some(2), Some(1)),
        "{session}"
    );
    assert_eq!(
        s["last_event_at"], "2019-10-01T09:00:10.000000Z",
        "{session}"
    );
    assert_eq!(s["started_at"], "2019-10-01T09:00:00.000000Z", "{session}");
    let (status, cdc) = app.get("/v1/sessions/route-cdc");
    assert_eq!(status, 200, "{cdc}");
    assert_eq!(cdc["session"]["events"], 1);

    // Invalid: reason, source coordinates and the original bytes, unchanged.
    let invalid = read_topic(brokers, &topics.invalid, 1, 6);
    assert_eq!(invalid.len(), 6, "exactly the six invalid messages");
    let records: Vec<Value> = invalid
        .iter()
        .map(|m| serde_json::from_slice(m.payload().unwrap()).unwrap())
        .collect();
    let by_offset = |topic: &str, offset: i64| {
        records
            .iter()
            .find(|r| r["source"]["topic"] == topic && r["source"]["offset"] == offset)
            .unwrap_or_else(|| panic!("no invalid record for {topic}@{offset}: {records:?}"))
    };
    let huge_record = by_offset(&topics.raw, 1);
    assert_eq!(huge_record["error"]["code"], "oversize");
    assert_eq!(huge_record["original"], huge);
    assert_eq!(huge_record["original_truncated"], false);
    let binary_record = by_offset(&topics.raw, 2);
    assert_eq!(binary_record["error"]["code"], "not_utf8");
    assert_eq!(binary_record["original_encoding"], "base64");
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(binary_record["original"].as_str().unwrap())
        .unwrap();
    assert_eq!(decoded, binary);
    let truncated_record = by_offset(&topics.raw, 3);
    assert_eq!(truncated_record["error"]["code"], "malformed");
    assert_eq!(
        truncated_record["original"].as_str().unwrap().as_bytes(),
        truncated
    );
    assert_eq!(by_offset(&topics.raw, 4)["error"]["code"], "malformed");
    assert_eq!(by_offset(&topics.raw, 5)["error"]["code"], "negative_price");
    assert_eq!(by_offset(&topics.raw, 5)["source"]["partition"], 0);
    assert_eq!(by_offset(&topics.cdc, 1)["error"]["code"], "deleted_row");
    for (reason, count) in [
        ("oversize", 1.0),
        ("not_utf8", 1.0),
        ("malformed", 2.0),
        ("negative_price", 1.0),
        ("deleted_row", 1.0),
    ] {
        assert_eq!(
            app.metric(&format!(
                "cartscore_events_invalid_total{{source=\"kafka\",reason=\"{reason}\"}}"
            )),
            count,
            "{reason}"
        );
    }

    // Validated: the four valid events, normalised, keyed by user (the key
    // policy), with their source in headers.
    let validated = read_topic(brokers, &topics.validated, 1, 4);
    assert_eq!(validated.len(), 4);
    for message in &validated {
        let event = cartscore_core::Event::from_json(message.payload().unwrap()).unwrap();
        assert_eq!(message.key().unwrap(), event.user_id.to_string().as_bytes());
        let headers = message.headers().unwrap();
        let names: Vec<&str> = headers.iter().map(|h| h.key).collect();
        assert!(names.contains(&"cartscore-source-offset"), "{names:?}");
    }
    assert_eq!(
        app.metric("cartscore_events_applied_total{source=\"kafka\"}"),
        4.0
    );

    // The replay producer end to end: every corrupted event is routed to
    // the invalid topic, every other one applied.
    let summary = replay(
        brokers,
        &topics.raw,
        &[
            "--limit",
            "3000",
            "--corrupt",
            "0.1",
            "--format",
            "envelope",
            "--session-prefix",
            "replay-",
        ],
    );
    let corrupted = summary["corrupted"].as_f64().unwrap();
    assert!(corrupted > 200.0, "{summary}");
    assert_eq!(summary["acknowledged"], 3000);
    wait_applied(&app, &topics.raw, 3008);
    assert_eq!(
        app.metric("cartscore_events_applied_total{source=\"kafka\"}"),
        4.0 + 3000.0 - corrupted
    );
    let invalid = read_topic(brokers, &topics.invalid, 1, 6 + corrupted as usize);
    assert_eq!(invalid.len(), 6 + corrupted as usize);
    // Acknowledged outputs move the delivered position up to the applied one.
    wait_until("outputs delivered", Duration::from_secs(30), || {
        stored_offsets(&app.store_dir, &topics.raw, "delivered") == 3008
    });
    let (_, ready) = app.get("/readyz");
    assert_eq!(ready["checks"]["stream"]["connected"], true, "{ready}");
}

/// The carts of `passes` replays of the real slice (`cartscore-producer
/// replay --repeat`, which names pass p's sessions `p.` + the session), as
/// JSON events, and how many distinct carts (session, product, time) they
/// are: the store keeps one record each.
fn slice_carts(passes: u32) -> (Vec<String>, usize) {
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .from_path(dataset())
        .unwrap();
    let layout = CsvLayout::from_header(reader.byte_headers().unwrap()).unwrap();
    let mut carts = Vec::new();
    let mut record = csv::ByteRecord::new();
    while reader.read_byte_record(&mut record).unwrap() {
        if let Ok(event) = Event::from_csv(&record, &layout)
            && event.event_type == EventType::Cart
        {
            carts.push(event);
        }
    }
    let mut distinct = HashSet::new();
    let mut json = Vec::new();
    for pass in 0..passes {
        for cart in &carts {
            let mut cart = cart.clone();
            if pass > 0 {
                cart.user_session = format!("{pass}.{}", cart.user_session);
            }
            distinct.insert((
                cart.user_id,
                cart.user_session.clone(),
                cart.product_id,
                cart.event_time.micros(),
            ));
            json.push(cart.to_json().to_string());
        }
    }
    (json, distinct.len())
}

fn score_batches(agent: &ureq::Agent, http: &str, carts: &[String]) -> Result<(), ureq::Error> {
    for chunk in carts.chunks(1_000) {
        agent
            .post(format!("{http}/v1/score"))
            .send(format!("{{\"events\":[{}]}}", chunk.join(",")))?;
    }
    Ok(())
}

/// Scores every cart before the stream brings any event (so the features,
/// and the scores, do not depend on timing) and waits until the store holds
/// a record of each.
fn score_before_the_stream(app: &Appliance, carts: &[String], distinct: usize) {
    score_batches(&crate::common::agent(), &app.http, carts).unwrap();
    wait_until(
        &format!("{distinct} scored carts recorded"),
        Duration::from_secs(30),
        || app.get("/v1/model").1["outcomes_pending"] == distinct,
    );
}

/// Scores the same carts again and again (each keeps its first record)
/// at whatever address the appliance has now, through its kills.
struct KeepScoring {
    http: Arc<Mutex<String>>,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl KeepScoring {
    fn start(http: &str, carts: Vec<String>) -> Self {
        let http = Arc::new(Mutex::new(http.to_owned()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (http, stop) = (Arc::clone(&http), Arc::clone(&stop));
            std::thread::spawn(move || {
                let agent = crate::common::agent();
                let mut rounds = 0;
                while !stop.load(Ordering::Relaxed) {
                    let url = http.lock().unwrap().clone();
                    rounds += u64::from(score_batches(&agent, &url, &carts).is_ok());
                }
                rounds
            })
        };
        Self { http, stop, thread }
    }

    fn now_at(&self, http: &str) {
        http.clone_into(&mut self.http.lock().unwrap());
    }

    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// A store's resolved outcomes as (cart, label, probability), sorted.
fn resolved_outcomes(app: &Appliance) -> Vec<(String, u64, String, bool, u32)> {
    let (status, page) = app.get("/v1/outcomes?limit=10000");
    assert_eq!(status, 200, "{page}");
    let mut outcomes: Vec<_> = page["outcomes"]
        .as_array()
        .unwrap()
        .iter()
        .map(outcome_key)
        .collect();
    outcomes.sort();
    outcomes
}

fn outcome_key(o: &Value) -> (String, u64, String, bool, u32) {
    (
        o["user_session"].as_str().unwrap().to_owned(),
        o["product_id"].as_u64().unwrap(),
        o["cart_time"].as_str().unwrap().to_owned(),
        o["label"].as_bool().unwrap(),
        (o["probability"].as_f64().unwrap() as f32).to_bits(),
    )
}

/// The distinct records of a prediction-log topic by sequence number,
/// checking that copies of one (at least once) are identical but for
/// nothing.
fn log_by_seq(brokers: &str, topic: &str, distinct: usize) -> BTreeMap<u64, Value> {
    let mut by_seq = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        for message in read_topic(brokers, topic, 1, distinct) {
            let record: Value = serde_json::from_slice(message.payload().unwrap()).unwrap();
            let seq = record["seq"].as_u64().unwrap();
            if let Some(before) = by_seq.insert(seq, record.clone()) {
                assert_eq!(before, record, "{topic}: two copies of {seq} differ");
            }
        }
        if by_seq.len() >= distinct {
            return by_seq;
        }
        assert!(
            Instant::now() < deadline,
            "{topic}: {} of {distinct} records",
            by_seq.len()
        );
    }
}

#[test]
fn stream_applies_each_event_exactly_once_across_sigkill() {
    let brokers = Broker::shared();
    let topics = Topics::create(brokers, 3);
    let work = tempfile::tempdir().unwrap();
    let models = model_dir_with_demo(work.path());
    let killed_dir = work.path().join("killed");
    let clean_dir = work.path().join("clean");
    std::fs::create_dir_all(&killed_dir).unwrap();
    std::fs::create_dir_all(&clean_dir).unwrap();
    let options = Options {
        env: topics.env(brokers, &unique("killed"), false),
        ..Options::default()
    };
    let mut app = Appliance::start(&killed_dir, &models, &options);
    let (carts, distinct) = slice_carts(3);
    score_before_the_stream(&app, &carts, distinct);
    let scoring = KeepScoring::start(&app.http, carts.clone());

    // Three passes over the real slice at 15k events/s (~3.5 s), killed at
    // random points while it flows and while the carts are scored again;
    // the stream resolves the recorded carts as it goes.
    let producer = {
        let (brokers, topic) = (brokers.to_owned(), topics.raw.clone());
        std::thread::spawn(move || replay(&brokers, &topic, &["--repeat", "3", "--rate", "15000"]))
    };
    let mut schedule = KillSchedule::from_clock();
    let mut kills = 0;
    while !producer.is_finished() && kills < 5 {
        std::thread::sleep(Duration::from_millis(150 + schedule.next() % 600));
        app.kill();
        kills += 1;
        app = Appliance::start(&killed_dir, &models, &options);
        scoring.now_at(&app.http);
    }
    let summary = producer.join().unwrap();
    let produced = summary["acknowledged"].as_i64().unwrap();
    assert_eq!(produced, 3 * 17_434);
    assert!(kills >= 2, "the stream ended before two kills ({kills})");
    // One more kill after the last message, before it is all applied.
    app.kill();
    let app = Appliance::start(&killed_dir, &models, &options);
    scoring.now_at(&app.http);
    wait_applied(&app, &topics.raw, produced);
    assert!(scoring.stop() > 0, "no scoring round succeeded");
    let last = Timestamp::parse("2019-10-01 03:00:00 UTC")
        .unwrap()
        .micros();
    let killed_live = resolve_all(&app, last, DEMO_VERSION);
    let killed_outcomes = resolved_outcomes(&app);
    let (status, log) = app.stop();
    assert!(status.success(), "{log}");

    // The reference: the same carts scored, then one clean pass over the
    // same topic, another group (it first consumes an empty topic, so the
    // scoring comes before any event, as above).
    let clean_topics = topics.with_own_log(brokers);
    let idle = unique("idle");
    create_topic(brokers, &idle, 1);
    let mut idle_env = clean_topics.env(brokers, &unique("clean"), false);
    idle_env.retain(|(k, _)| k != "CARTSCORE_KAFKA__TOPICS");
    idle_env.push(("CARTSCORE_KAFKA__TOPICS".into(), format!("[\"{idle}\"]")));
    let clean = Appliance::start(
        &clean_dir,
        &models,
        &Options {
            env: idle_env,
            ..Options::default()
        },
    );
    score_before_the_stream(&clean, &carts, distinct);
    let (status, log) = clean.stop();
    assert!(status.success(), "{log}");
    let clean = Appliance::start(
        &clean_dir,
        &models,
        &Options {
            env: clean_topics.env(brokers, &unique("clean"), false),
            ..Options::default()
        },
    );
    wait_applied(&clean, &topics.raw, produced);
    let clean_live = resolve_all(&clean, last, DEMO_VERSION);
    let clean_outcomes = resolved_outcomes(&clean);
    let clean_store = clean.store_dir.clone();
    let (status, log) = clean.stop();
    assert!(status.success(), "{log}");

    let killed = inspect(&killed_dir.join("store"));
    let reference = inspect(&clean_store);
    assert_eq!(killed["digest"], reference["digest"], "after {kills} kills");
    assert_eq!(killed["offsets"], reference["offsets"]);
    // The sessions expired with the sentinel that resolved the carts.
    assert!(reference["digest"]["live_users"].as_u64().unwrap() > 3_000);
    // Every recorded cart resolved once, to the clean run's label, and the
    // live quality is the clean run's.
    assert_eq!(killed_outcomes.len(), distinct);
    assert_eq!(killed_outcomes, clean_outcomes, "after {kills} kills");
    for field in ["count", "positives", "roc_auc"] {
        assert_eq!(
            killed_live[field], clean_live[field],
            "{field} after {kills} kills"
        );
    }
    // Sums over the window: the kills change the order outcomes resolve
    // in (not which), and with it the last bits of a float sum.
    for field in ["log_loss", "brier", "expected_calibration_error"] {
        let (a, b) = (
            killed_live[field].as_f64().unwrap(),
            clean_live[field].as_f64().unwrap(),
        );
        assert!(
            (a - b).abs() <= 1e-12,
            "{field} after {kills} kills: {a} vs {b}"
        );
    }
    assert!(
        killed_live["positives"].as_u64().unwrap() > 0,
        "{killed_live}"
    );
    eprintln!(
        "{distinct} carts resolved after {kills} kills: {} positive, live ROC-AUC {}",
        killed_live["positives"], killed_live["roc_auc"]
    );

    // The prediction log: every record and every outcome at least once,
    // copies identical, the outcomes those the store resolved.
    let predictions = log_by_seq(brokers, &topics.predictions, distinct);
    assert_eq!(
        predictions.keys().copied().collect::<Vec<_>>(),
        (0..distinct as u64).collect::<Vec<_>>()
    );
    let first = &predictions[&0];
    assert_eq!(first["model_version"], DEMO_VERSION, "{first}");
    assert_eq!(
        first["features"].as_object().unwrap().len(),
        FEATURE_NAMES.len()
    );
    let outcomes = log_by_seq(brokers, &topics.outcomes, distinct);
    assert_eq!(
        outcomes.keys().copied().collect::<Vec<_>>(),
        (0..distinct as u64).collect::<Vec<_>>()
    );
    let mut logged: Vec<_> = outcomes.values().map(outcome_key).collect();
    logged.sort();
    assert_eq!(logged, killed_outcomes);
}

/// A broker of the test's own (it gets killed), its topics, and an appliance
/// that has applied 500 events from it.
pub(crate) fn private_broker_with_500_applied(
    work: &Path,
    group: &str,
    extra_env: &[(&str, &str)],
) -> (Broker, Topics, Appliance) {
    let broker = Broker::start(&work.join("broker"));
    let brokers = broker.addr();
    let topics = Topics::create(&brokers, 1);
    let models = model_dir_with_demo(work);
    let mut env = topics.env(&brokers, group, false);
    env.extend(
        extra_env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    let app = Appliance::start(
        work,
        &models,
        &Options {
            env,
            ..Options::default()
        },
    );
    replay(
        &brokers,
        &topics.raw,
        &["--limit", "500", "--session-prefix", "before-"],
    );
    wait_applied(&app, &topics.raw, 500);
    (broker, topics, app)
}

#[test]
fn stream_outage_keeps_scoring_reports_staleness_and_resumes() {
    let work = tempfile::tempdir().unwrap();
    let (mut broker, topics, app) = private_broker_with_500_applied(
        work.path(),
        "outage",
        &[("CARTSCORE_KAFKA__STALE_AFTER_MS", "1500")],
    );
    let brokers = broker.addr();
    wait_until("the stream to be current", Duration::from_secs(30), || {
        app.get("/readyz").1["checks"]["stream"]["stale"] == false
    });

    broker.kill();
    wait_until("the outage to show", Duration::from_secs(30), || {
        let stream = &app.get("/readyz").1["checks"]["stream"];
        stream["connected"] == false && stream["stale"] == true
    });
    let (status, ready) = app.get("/readyz");
    assert_eq!(
        status, 200,
        "a stale stream reports, it does not unready: {ready}"
    );
    assert!(
        ready["checks"]["stream"]["staleness_seconds"]
            .as_f64()
            .unwrap()
            > 1.5
    );
    assert_eq!(app.metric("cartscore_stream_connected"), 0.0);
    assert!(app.metric("cartscore_stream_staleness_seconds") > 1.5);
    let (status, score) = app.post("/v1/score", cart_json("before-x", 0, 1_004_856, 130.76));
    assert_eq!(status, 200, "scoring goes on without the broker: {score}");

    broker.restart();
    replay(
        &brokers,
        &topics.raw,
        &["--limit", "500", "--session-prefix", "after-"],
    );
    wait_applied(&app, &topics.raw, 1000);
    wait_until(
        "the stream to be current again",
        Duration::from_secs(30),
        || {
            let stream = &app.get("/readyz").1["checks"]["stream"];
            stream["connected"] == true && stream["stale"] == false
        },
    );
    assert_eq!(
        app.metric("cartscore_events_applied_total{source=\"kafka\"}"),
        1000.0
    );
    assert_eq!(applied_offsets(&app.store_dir, &topics.raw), 1000);
    assert!(
        app.get_text("/metrics")
            .contains("cartscore_stream_consumer_lag{")
    );
}

#[test]
fn sigterm_with_the_broker_down_still_exits_within_the_grace_period() {
    let work = tempfile::tempdir().unwrap();
    let (mut broker, _topics, app) = private_broker_with_500_applied(work.path(), "down-stop", &[]);
    broker.kill();
    wait_until("the outage to show", Duration::from_secs(30), || {
        app.get("/readyz").1["checks"]["stream"]["connected"] == false
    });
    let store = app.store_dir.clone();
    let started = Instant::now();
    let (status, log) = app.stop();
    let took = started.elapsed();
    assert!(status.success(), "{status}\n{log}");
    assert!(
        // The default grace is 10 s; librdkafka alone blocks for minutes.
        took < Duration::from_secs(15),
        "exit took {took:?}\n{log}"
    );
    // Offsets are in the store with the state: nothing is lost by not closing.
    let offsets = inspect(&store)["offsets"].clone();
    assert!(
        offsets
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o["next_offset"] == 500),
        "{offsets}"
    );
}

/// A stream at a modest rate is written as one record per batch, which a
/// consumer that fell behind must read back fast: the producer's drain mode
/// and the appliance both catch up a backlog of them from the start.
#[test]
fn a_backlog_of_one_record_batches_is_drained_and_caught_up() {
    let brokers = Broker::shared();
    let topics = Topics::create(brokers, 2);
    let sent = replay(
        brokers,
        &topics.raw,
        &["--limit", "3000", "-X", "batch.num.messages=1"],
    );
    assert_eq!(sent["acknowledged"], 3000, "{sent}");
    assert_eq!(sent["acknowledged_after"]["count"], 3000, "{sent}");

    let output = Command::new(producer_binary())
        .args(["drain", "--brokers", brokers, "--topic", &topics.raw])
        .args(["--seconds", "60"])
        .env("RUST_BACKTRACE", "0")
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(output.status.success(), "drain failed: {output:?}");
    let drained: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(drained["backlog"], 3000, "{drained}");
    assert_eq!(drained["read"], 3000, "{drained}");
    assert_eq!(drained["drained"], true, "{drained}");

    let work = tempfile::tempdir().unwrap();
    let app = topics.start_appliance(work.path(), brokers, "backlog", false);
    wait_applied(&app, &topics.raw, 3000);
    assert_eq!(
        app.metric("cartscore_events_applied_total{source=\"kafka\"}"),
        3000.0
    );
}

/// A Debezium ExtractNewRecordState row of `public.events` at source
/// position (`commit`, `lsn`), keyed by user.
fn cdc_row(id: u64, secs: i64, commit: u64, lsn: u64) -> String {
    json!({
        "id": id, "event_time": format!("2019-10-01T09:00:{secs:02}Z"), "event_type": "view",
        "product_id": 5, "category_id": 2053013555631882655_u64, "category_code": "",
        "brand": "apple", "price": 10.5, "user_id": 42, "user_session": "cdc-resent",
        "__op": "c", "__table": "events", "__deleted": "false",
        "__source_sequence": format!("[\"{commit}\",\"{lsn}\"]"), "__source_lsn": lsn
    })
    .to_string()
}

#[test]
fn cdc_rows_resent_by_debezium_are_applied_once_across_a_restart() {
    let brokers = Broker::shared();
    let topics = Topics::create(brokers, 1);
    let work = tempfile::tempdir().unwrap();
    let models = model_dir_with_demo(work.path());
    let options = Options {
        env: topics.env(brokers, &unique("cdc-dedupe"), false),
        ..Options::default()
    };
    let mut app = Appliance::start(work.path(), &models, &options);
    let producer = TestProducer::new(brokers);
    let send = |row: &str| producer.send(&topics.cdc, 0, Some("42"), Some(row.as_bytes()));
    // Two transactions; the second's change has a lower LSN than the
    // first's (it began earlier, committed later): both are new.
    send(&cdc_row(1, 0, 100, 180));
    send(&cdc_row(2, 1, 200, 150));
    // A restarted Debezium sends the second again.
    send(&cdc_row(2, 1, 200, 150));
    producer.flush();
    wait_applied(&app, &topics.cdc, 3);
    let events = |app: &Appliance| {
        let (status, session) = app.get("/v1/sessions/cdc-resent");
        assert_eq!(status, 200, "{session}");
        session["session"]["events"].as_u64().unwrap()
    };
    assert_eq!(events(&app), 2);
    let duplicates = format!(
        "cartscore_stream_cdc_duplicates_total{{topic=\"{}\"}}",
        topics.cdc
    );
    assert_eq!(app.metric(&duplicates), 1.0);

    // The position is stored with the state: after kill -9 a re-sent row is
    // still known, a new one is applied.
    app.kill();
    let app = Appliance::start(work.path(), &models, &options);
    send(&cdc_row(1, 0, 100, 180));
    send(&cdc_row(2, 1, 200, 150));
    send(&cdc_row(3, 2, 300, 310));
    producer.flush();
    wait_applied(&app, &topics.cdc, 6);
    assert_eq!(events(&app), 3);
    assert_eq!(app.metric(&duplicates), 2.0);
}

#[test]
fn a_full_map_refuses_writes_while_scoring_goes_on_and_a_larger_map_resumes_exactly_once() {
    let brokers = Broker::shared();
    let topics = Topics::create(brokers, 2);
    let work = tempfile::tempdir().unwrap();
    let models = model_dir_with_demo(work.path());
    let full_dir = work.path().join("full");
    let clean_dir = work.path().join("clean");
    std::fs::create_dir_all(&full_dir).unwrap();
    std::fs::create_dir_all(&clean_dir).unwrap();
    let summary = replay(brokers, &topics.raw, &["--repeat", "3"]);
    let produced = summary["acknowledged"].as_i64().unwrap();
    let group = unique("full");
    let with_map = |mib: &str| Options {
        env: topics
            .env(brokers, &group, false)
            .into_iter()
            .chain([("CARTSCORE_STORE__MAP_SIZE_MIB".to_owned(), mib.to_owned())])
            .collect(),
        ..Options::default()
    };
    // A map too small for the three passes: the stream fills it.
    let app = Appliance::start(&full_dir, &models, &with_map("2"));
    wait_until("the map to fill", Duration::from_secs(120), || {
        app.metric("cartscore_store_map_full_total") >= 1.0
    });
    let applied_when_full = applied_offsets(&app.store_dir, &topics.raw);
    assert!(applied_when_full < produced, "all {produced} fit in 2 MiB");
    // Writes are refused (a batch that no longer fits is consumed again from
    // the stored offsets, never skipped) and scoring goes on.
    for i in 0..20 {
        let (status, body) = app.post("/v1/score", flat(&format!("full-{i}"), i, "cart", 10.0));
        assert_eq!(status, 200, "{body}");
    }
    assert!(
        app.metric("cartscore_stream_batch_retries_total{reason=\"map_full\"}") >= 1.0,
        "{}",
        app.get_text("/metrics")
    );
    let (status, log) = app.stop();
    assert!(status.success(), "{log}");
    // A larger map and a restart: the stream resumes where the store stood.
    let app = Appliance::start(&full_dir, &models, &with_map("64"));
    wait_applied(&app, &topics.raw, produced);
    let (status, log) = app.stop();
    assert!(status.success(), "{log}");

    // The reference: one clean pass with room from the start.
    let clean = Appliance::start(
        &clean_dir,
        &models,
        &Options {
            env: topics.env(brokers, &unique("clean"), false),
            ..Options::default()
        },
    );
    wait_applied(&clean, &topics.raw, produced);
    let clean_store = clean.store_dir.clone();
    let (status, log) = clean.stop();
    assert!(status.success(), "{log}");
    let resumed = inspect(&full_dir.join("store"));
    let reference = inspect(&clean_store);
    assert_eq!(resumed["digest"], reference["digest"]);
    assert_eq!(resumed["offsets"], reference["offsets"]);
    println!(
        "map full after {applied_when_full} of {produced} events; scoring went on; resumed with a larger map to the clean pass's digest"
    );
}
