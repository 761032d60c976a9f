//! Change data capture for real: the CDC bridge (cdc/bridge.py: the Debezium
//! embedded engine on PostgreSQL's logical replication) captures a table
//! into the broker, and the appliance applies each valid insert exactly once,
//! across kill -9 of the bridge (which then re-sends) and of the appliance.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::broker::{Broker, create_topic, read_topic, unique};
use crate::common::{Appliance, Options, model_dir_with_demo, repo_root};
use crate::stream::{KillSchedule, inspect, stored_offsets, wait_until};

const TABLE: &str = "CREATE TABLE public.events (
  id bigserial PRIMARY KEY, event_time timestamptz, event_type text, product_id bigint,
  category_id bigint, category_code text, brand text, price double precision,
  user_id bigint, user_session text)";

/// `postgres://user:password@host:port/db` of the test server.
struct Server {
    user: String,
    password: String,
    host: String,
    port: u16,
}

impl Server {
    fn from_env() -> Self {
        let url = std::env::var("CARTSCORE_TEST_POSTGRES")
            .unwrap_or_else(|_| "postgres://cartscore:cartscore@127.0.0.1:5432/postgres".into());
        let rest = url.trim_start_matches("postgres://");
        let (credentials, address) = rest.split_once('@').unwrap();
        let (user, password) = credentials.split_once(':').unwrap();
        let address = address.split('/').next().unwrap();
        let (host, port) = address.split_once(':').unwrap();
        Self {
            user: user.into(),
            password: password.into(),
            host: host.into(),
            port: port.parse().unwrap(),
        }
    }

    fn url(&self, database: &str) -> String {
        format!(
            "postgres://{}:{}@{}:{}/{database}",
            self.user, self.password, self.host, self.port
        )
    }

    fn connect(&self, database: &str) -> postgres::Client {
        postgres::Client::connect(&self.url(database), postgres::NoTls).unwrap()
    }
}

/// A database of the test's own with the events table; dropped (with the
/// bridge's slot and publication) at the end.
struct Source {
    server: Server,
    database: String,
}

impl Source {
    fn create() -> Self {
        let server = Server::from_env();
        let database = unique("cdc").replace('-', "_");
        server
            .connect("postgres")
            .batch_execute(&format!("CREATE DATABASE {database}"))
            .unwrap();
        server.connect(&database).batch_execute(TABLE).unwrap();
        Self { server, database }
    }

    fn client(&self) -> postgres::Client {
        self.server.connect(&self.database)
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        let mut admin = self.server.connect("postgres");
        let _ = admin.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = $1",
            &[&self.database],
        );
        let _ = admin.batch_execute(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.database
        ));
    }
}

/// The bridge as a child process with its own offset file.
struct Bridge {
    child: Option<Child>,
    command: Vec<String>,
    log: PathBuf,
}

impl Bridge {
    fn start(source: &Source, brokers: &str, topic: &str, dir: &Path) -> Self {
        let command = vec![
            repo_root().join("cdc/bridge.py").display().to_string(),
            "--postgres-host".into(),
            source.server.host.clone(),
            "--postgres-port".into(),
            source.server.port.to_string(),
            "--postgres-user".into(),
            source.server.user.clone(),
            "--postgres-password".into(),
            source.server.password.clone(),
            "--database".into(),
            source.database.clone(),
            "--brokers".into(),
            brokers.into(),
            "--topic".into(),
            topic.into(),
            "--offsets".into(),
            dir.join("offsets.dat").display().to_string(),
            "--slot".into(),
            source.database.clone(),
            "--publication".into(),
            source.database.clone(),
        ];
        let mut bridge = Self {
            child: None,
            command,
            log: dir.join("bridge.log"),
        };
        bridge.restart();
        bridge
    }

    /// Starts the bridge and waits until Debezium streams. Right after a
    /// kill PostgreSQL may still hold the slot for the old connection: then
    /// the engine gives up, and it is started again.
    fn restart(&mut self) {
        assert!(self.child.is_none());
        for _ in 0..10 {
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.log)
                .unwrap();
            let mark = std::fs::metadata(&self.log).map_or(0, |m| m.len()) as usize;
            let mut child = Command::new("python3")
                .args(&self.command)
                // Debezium logs (log4j) to stdout, the bridge to stderr.
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("failed to start cdc/bridge.py");
            let deadline = Instant::now() + Duration::from_secs(90);
            loop {
                let text = std::fs::read_to_string(&self.log).unwrap_or_default();
                if text
                    .get(mark..)
                    .is_some_and(|t| t.contains("Processing messages"))
                {
                    self.child = Some(child);
                    return;
                }
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the bridge did not start:\n{text}"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        panic!(
            "the bridge kept failing:\n{}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        self.kill();
    }
}

struct Topics {
    cdc: String,
    invalid: String,
}

impl Topics {
    fn create(brokers: &str) -> Self {
        let topics = Self {
            cdc: unique("cdc-events"),
            invalid: unique("cdc-invalid"),
        };
        create_topic(brokers, &topics.cdc, 1);
        create_topic(brokers, &topics.invalid, 1);
        topics
    }

    fn options(&self, brokers: &str, group: &str) -> Options {
        Options {
            env: [
                ("CARTSCORE_KAFKA__BROKERS", brokers.to_owned()),
                ("CARTSCORE_KAFKA__GROUP_ID", unique(group)),
                ("CARTSCORE_KAFKA__TOPICS", format!("[\"{}\"]", self.cdc)),
                ("CARTSCORE_KAFKA__INVALID_TOPIC", self.invalid.clone()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
            ..Options::default()
        }
    }
}

fn insert(db: &mut postgres::Client, secs: i64, kind: &str, price: f64, user: i64, session: &str) {
    db.execute(
        "INSERT INTO events (event_time, event_type, product_id, category_id, category_code, brand, price, user_id, user_session)
         VALUES (to_timestamp($1::bigint), $2, 1004856, 2053013555631882655, 'electronics.smartphone', 'samsung', $3, $4, $5)",
        &[&(1_569_920_400 + secs), &kind, &price, &user, &session],
    )
    .unwrap();
}

fn session_events(app: &Appliance, session: &str) -> Option<u64> {
    let (status, answer) = app.get(&format!("/v1/sessions/{session}"));
    (status == 200).then(|| answer["session"]["events"].as_u64().unwrap())
}

#[test]
fn debezium_captures_the_table_and_only_valid_inserts_are_applied() {
    let brokers = Broker::shared();
    let work = tempfile::tempdir().unwrap();
    let source = Source::create();
    let topics = Topics::create(brokers);
    let models = model_dir_with_demo(work.path());
    let app = Appliance::start(work.path(), &models, &topics.options(brokers, "cdc"));
    let _bridge = Bridge::start(&source, brokers, &topics.cdc, work.path());

    let mut db = source.client();
    insert(&mut db, 0, "view", 130.76, 42, "cdc-a");
    insert(&mut db, 5, "cart", 130.76, 42, "cdc-a");
    insert(&mut db, 6, "view", -1.0, 42, "cdc-a");
    insert(&mut db, 7, "teleport", 1.0, 42, "cdc-a");
    db.batch_execute("UPDATE events SET price = 99 WHERE id = 1; DELETE FROM events WHERE id = 2")
        .unwrap();
    wait_until("six changes applied", Duration::from_secs(60), || {
        stored_offsets(&app.store_dir, &topics.cdc, "applied") >= 6
    });
    assert_eq!(session_events(&app, "cdc-a"), Some(2), "{}", app.log());
    let invalid = read_topic(brokers, &topics.invalid, 1, 4);
    let codes: Vec<String> = invalid
        .iter()
        .map(|m| {
            let record: Value =
                serde_json::from_slice(rdkafka::Message::payload(m).unwrap()).unwrap();
            record["error"]["code"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(
        codes,
        [
            "negative_price",
            "unknown_event_type",
            "updated_row",
            "deleted_row"
        ]
    );

    // Insert to visible: one new session per row, its first GET that finds it.
    let mut visible = Vec::new();
    for i in 0..40 {
        let session = format!("cdc-latency-{i}");
        let inserted = Instant::now();
        insert(&mut db, 100 + i, "view", 10.0, 1000 + i, &session);
        while session_events(&app, &session).is_none() {
            assert!(
                inserted.elapsed() < Duration::from_secs(30),
                "{session} never visible"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        visible.push(inserted.elapsed());
    }
    visible.sort();
    eprintln!(
        "CDC insert to visible over {} rows: p50 {:?}, p99 {:?}, max {:?}",
        visible.len(),
        visible[visible.len() / 2],
        visible[visible.len() * 99 / 100],
        visible[visible.len() - 1]
    );
}

#[test]
fn cdc_is_exactly_once_across_kill_9_of_the_bridge_and_the_appliance() {
    let brokers = Broker::shared();
    let work = tempfile::tempdir().unwrap();
    let source = Source::create();
    let topics = Topics::create(brokers);
    let models = model_dir_with_demo(work.path());
    let killed_dir = work.path().join("killed");
    std::fs::create_dir_all(&killed_dir).unwrap();
    let options = topics.options(brokers, "cdc-killed");
    let mut app = Appliance::start(&killed_dir, &models, &options);
    let mut bridge = Bridge::start(&source, brokers, &topics.cdc, work.path());

    // 1,200 rows in small transactions at ~100 rows/s, 30 users.
    let rows = 1200;
    let inserter = {
        let mut db = source.client();
        std::thread::spawn(move || {
            for i in 0..rows {
                let kind = ["view", "view", "cart", "purchase"][(i % 4) as usize];
                insert(
                    &mut db,
                    i,
                    kind,
                    5.0 + (i % 7) as f64,
                    1 + i % 30,
                    &format!("s{}", i % 90),
                );
                std::thread::sleep(Duration::from_millis(8));
            }
        })
    };
    let mut schedule = KillSchedule::from_clock();
    let mut kills = (0, 0);
    while !inserter.is_finished() {
        let draw = schedule.next();
        std::thread::sleep(Duration::from_millis(300 + draw % 900));
        // In turn (the appliance first: it restarts in a second, the
        // bridge's JVM in several), so both are killed while rows flow.
        if (kills.0 + kills.1) % 2 == 1 {
            bridge.kill();
            bridge.restart();
            kills.0 += 1;
        } else {
            app.kill();
            app = Appliance::start(&killed_dir, &models, &options);
            kills.1 += 1;
        }
    }
    inserter.join().unwrap();
    // One more of each after the last insert.
    bridge.kill();
    app.kill();
    bridge.restart();
    let app = Appliance::start(&killed_dir, &models, &options);

    // The reference: the table's rows, in commit (id) order, applied once
    // by an appliance of its own.
    let reference_dir = work.path().join("reference");
    std::fs::create_dir_all(&reference_dir).unwrap();
    let reference = Appliance::start(&reference_dir, &models, &Options::default());
    let lines: Vec<String> = source
        .client()
        .query(
            "SELECT to_char(event_time AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') || ' UTC', event_type, product_id, category_id, category_code, brand, price, user_id, user_session FROM events ORDER BY id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| {
            json!({
                "event_time": r.get::<_, String>(0), "event_type": r.get::<_, String>(1),
                "product_id": r.get::<_, i64>(2), "category_id": r.get::<_, i64>(3),
                "category_code": r.get::<_, String>(4), "brand": r.get::<_, String>(5),
                "price": r.get::<_, f64>(6), "user_id": r.get::<_, i64>(7),
                "user_session": r.get::<_, String>(8),
            })
            .to_string()
        })
        .collect();
    assert_eq!(lines.len(), rows as usize);
    let (status, answer) = reference.post("/v1/events", lines.join("\n"));
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["applied"], rows);
    let expected = inspect(&reference.store_dir)["digest"].clone();

    wait_until(
        "the killed appliance to hold every row once",
        Duration::from_secs(120),
        || inspect(&app.store_dir)["digest"] == expected,
    );
    let duplicates = app.metric(&format!(
        "cartscore_stream_cdc_duplicates_total{{topic=\"{}\"}}",
        topics.cdc
    ));
    let captured = stored_offsets(&app.store_dir, &topics.cdc, "applied");
    eprintln!(
        "CDC kill test: {} bridge and {} appliance kills; {captured} records captured for {rows} rows (the rest re-sent), {duplicates} duplicates seen by the last run",
        kills.0, kills.1
    );
    assert!(kills.0 >= 1 && kills.1 >= 1, "{kills:?}");
    assert!(captured >= rows);
}
