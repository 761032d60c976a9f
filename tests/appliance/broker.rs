//! A real Kafka-compatible broker for the stream tests: nisshi (tansu's
//! successor) storing in PostgreSQL, so a killed broker restarts with every
//! record it acknowledged (its memory engine keeps nothing), on a free
//! loopback port; plus small librdkafka producer and reader helpers.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use crate::common::{free_port, postgres_admin, postgres_server, try_postgres_admin};

/// The nisshi binary: `CARTSCORE_NISSHI`, else `nisshi` on PATH, else the
/// cache scripts/stack.sh builds it into.
fn nisshi() -> PathBuf {
    if let Some(path) = std::env::var_os("CARTSCORE_NISSHI") {
        return path.into();
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join("nisshi"))
        .find(|p| p.is_file());
    on_path
        .or_else(|| {
            let home = std::env::var_os("HOME")?;
            Some(Path::new(&home).join(".cache/cartscore/bin/nisshi")).filter(|p| p.is_file())
        })
        .expect("nisshi is not installed: run scripts/test.sh (README command 2) or scripts/stack.sh up")
}

pub struct Broker {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
    server: String,
    database: String,
}

impl Broker {
    /// A private broker with its own new PostgreSQL database (so a restart
    /// keeps every record) and its log in `dir`.
    pub fn start(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let server = postgres_server();
        let database = unique("broker").replace('-', "_");
        let mut admin = postgres_admin();
        admin
            .batch_execute(&format!("CREATE DATABASE {database}"))
            .unwrap();
        // As scripts/stack.sh sets the broker's own database.
        admin
            .batch_execute(&format!(
                "ALTER DATABASE {database} SET synchronous_commit = off"
            ))
            .unwrap();
        let mut broker = Self {
            child: None,
            port: free_port(),
            dir: dir.into(),
            server,
            database,
        };
        broker.restart();
        broker
    }

    /// The broker all stream tests share: the one scripts/stack.sh started
    /// (`CARTSCORE_TEST_KAFKA`), else one started for this test run.
    pub fn shared() -> &'static str {
        static SHARED: OnceLock<String> = OnceLock::new();
        SHARED.get_or_init(|| {
            if let Ok(addr) = std::env::var("CARTSCORE_TEST_KAFKA") {
                return addr;
            }
            let dir = std::env::temp_dir().join(format!("cartscore-broker-{}", std::process::id()));
            let broker = Box::leak(Box::new(Broker::start(&dir)));
            broker.addr()
        })
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn storage(&self) -> String {
        // Debian's server offers a snakeoil certificate nisshi rejects.
        format!("{}/{}?sslmode=disable", self.server, self.database)
    }

    /// Starts (again) on the same port and storage.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "the broker is running");
        let url = format!("tcp://{}", self.addr());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("nisshi.log"))
            .unwrap();
        let child = Command::new(nisshi())
            .current_dir(&self.dir)
            .args(broker_args(&url, &self.storage()))
            .env("RUST_BACKTRACE", "0")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("failed to start nisshi");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(self.addr()).is_err() {
            assert!(
                Instant::now() < deadline,
                "nisshi did not listen on {} (see {})",
                self.addr(),
                self.dir.join("nisshi.log").display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: the broker vanishes mid-stream.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `nisshi broker` listening on `url`, storing in the PostgreSQL database
/// at `storage`.
fn broker_args<'a>(url: &'a str, storage: &'a str) -> [&'a str; 7] {
    [
        "broker",
        "--listener-url",
        url,
        "--advertised-listener-url",
        url,
        "--storage-engine",
        storage,
    ]
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
        // Best effort: a database left behind only takes disk.
        if let Ok(mut admin) = try_postgres_admin() {
            let _ = admin.batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.database
            ));
        }
    }
}

/// Creates `name` with `partitions` partitions (topics are not auto-created).
pub fn create_topic(brokers: &str, name: &str, partitions: u32) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let output = Command::new(nisshi())
            .args([
                "topic",
                "create",
                name,
                "--partitions",
                &partitions.to_string(),
            ])
            .args(["--broker", &format!("tcp://{brokers}")])
            .env("RUST_BACKTRACE", "0")
            .output()
            .expect("failed to run nisshi topic create");
        if output.status.success() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "could not create topic {name}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The appliance settings that consume `topics` from `brokers` as `group`.
pub fn kafka_env(brokers: &str, group: &str, topics: &[&str]) -> Vec<(String, String)> {
    vec![
        ("CARTSCORE_KAFKA__BROKERS".into(), brokers.to_owned()),
        ("CARTSCORE_KAFKA__GROUP_ID".into(), unique(group)),
        (
            "CARTSCORE_KAFKA__TOPICS".into(),
            serde_json::to_string(topics).unwrap(),
        ),
    ]
}

/// A name unique to this test process, so tests sharing a broker never meet.
pub fn unique(name: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{name}-{}-{n}", std::process::id())
}

pub struct TestProducer {
    inner: BaseProducer,
}

impl TestProducer {
    pub fn new(brokers: &str) -> Self {
        let inner = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("linger.ms", "1")
            .create()
            .unwrap();
        Self { inner }
    }

    pub fn send(&self, topic: &str, partition: i32, key: Option<&str>, payload: Option<&[u8]>) {
        let mut record: BaseRecord<'_, str, [u8]> = BaseRecord::to(topic).partition(partition);
        if let Some(key) = key {
            record = record.key(key);
        }
        if let Some(payload) = payload {
            record = record.payload(payload);
        }
        self.inner.send(record).map_err(|(e, _)| e).unwrap();
    }

    pub fn flush(&self) {
        self.inner.flush(Duration::from_secs(60)).unwrap();
    }
}

/// Every record of `topic` from the beginning, once at least `expected` have
/// arrived (panics after 60 s).
pub fn read_topic(
    brokers: &str,
    topic: &str,
    partitions: i32,
    expected: usize,
) -> Vec<OwnedMessage> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while out.len() < expected {
        assert!(
            Instant::now() < deadline,
            "{topic}: {} of {expected} records after 60 s",
            out.len()
        );
        if let Some(message) = consumer.poll(Duration::from_millis(200)) {
            out.push(message.unwrap().detach());
        }
    }
    // Anything beyond `expected` that is already there shows up too.
    while let Some(message) = consumer.poll(Duration::from_millis(500)) {
        out.push(message.unwrap().detach());
    }
    out.sort_by_key(|m| (m.partition(), m.offset()));
    out
}
