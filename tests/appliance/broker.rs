//! A real Kafka-compatible broker for the stream tests: tansu with SQLite
//! storage (its memory engine loses and duplicates records when a consumer
//! resumes mid-batch) on a free loopback port, plus small librdkafka
//! producer and reader helpers.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use crate::common::free_port;

/// The tansu binary: `CARTSCORE_TANSU`, else `tansu` on PATH, else cargo's bin folder.
fn tansu() -> PathBuf {
    if let Some(path) = std::env::var_os("CARTSCORE_TANSU") {
        return path.into();
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join("tansu"))
        .find(|p| p.is_file());
    on_path
        .or_else(|| {
            let home = std::env::var_os("HOME")?;
            Some(Path::new(&home).join(".cargo/bin/tansu")).filter(|p| p.is_file())
        })
        .expect("tansu is not installed: run scripts/test.sh (README command 2), or `cargo install tansu --version 0.6.0 --locked --features libsql`")
}

pub struct Broker {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
}

impl Broker {
    /// A private broker in `dir` (its SQLite file lives there, so a restart
    /// keeps every record).
    pub fn start(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let mut broker = Self {
            child: None,
            port: free_port(),
            dir: dir.into(),
        };
        broker.restart();
        broker
    }

    /// The broker all stream tests share: the one scripts/test.sh started
    /// (`CARTSCORE_TEST_KAFKA`), else one started for this test run.
    pub fn shared() -> &'static str {
        static SHARED: OnceLock<String> = OnceLock::new();
        SHARED.get_or_init(|| {
            if let Ok(addr) = std::env::var("CARTSCORE_TEST_KAFKA") {
                return addr;
            }
            let dir = std::env::temp_dir().join(format!("cartscore-tansu-{}", std::process::id()));
            let broker = Box::leak(Box::new(Broker::start(&dir)));
            broker.addr()
        })
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts (again) on the same port and storage.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "the broker is running");
        let url = format!("tcp://{}", self.addr());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("tansu.log"))
            .unwrap();
        let child = Command::new(tansu())
            .current_dir(&self.dir)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "sqlite://tansu.db"])
            .env("RUST_BACKTRACE", "0")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("failed to start tansu");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(self.addr()).is_err() {
            assert!(
                Instant::now() < deadline,
                "tansu did not listen on {}",
                self.addr()
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

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Creates `name` with `partitions` partitions (topics are not auto-created).
pub fn create_topic(brokers: &str, name: &str, partitions: u32) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let output = Command::new(tansu())
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
            .expect("failed to run tansu topic create");
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
