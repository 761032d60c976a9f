//! Starts the real `cartscore` binary on free loopback ports with its own
//! store and model folder, and talks to it over HTTP and TCP.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cartscore_core::onnx::ModelProto;
use cartscore_core::{BundleMetadata, Event};
use cartscore_protocol::Status;
use cartscore_protocol::client::TcpClient;
use prost::Message;
use serde_json::Value;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The real data slice (`CARTSCORE_DATASET` overrides its place).
pub fn dataset() -> PathBuf {
    let path = std::env::var_os("CARTSCORE_DATASET")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("../shared/data/2019-Oct-head.csv"));
    assert!(
        path.exists(),
        "the real data slice {} is missing; set CARTSCORE_DATASET",
        path.display()
    );
    path
}

/// A binary of the workspace from the same target folder and profile as
/// this test (scripts/test.sh builds every binary first); built on demand
/// when only the tests were built.
pub fn binary(name: &str) -> PathBuf {
    static BUILD: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/appliance-<hash> -> target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let path = dir.join(name);
    let _one_build_at_a_time = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    if !path.exists() {
        let package = match name {
            "cartscore" => "cartscore-appliance",
            other => other,
        };
        let mut build = Command::new(env!("CARGO"));
        build.args(["build", "-p", package, "--bin", name]);
        if dir.file_name().is_some_and(|p| p == "release") {
            build.arg("--release");
        }
        assert!(
            build.status().unwrap().success(),
            "failed to build {name} ({package})"
        );
    }
    path
}

/// The appliance, `cartscore`.
pub fn appliance_binary() -> PathBuf {
    binary("cartscore")
}

pub fn trainer() -> PathBuf {
    binary("cartscore-trainer")
}

pub fn bench_binary() -> PathBuf {
    binary("cartscore-bench")
}

pub fn producer_binary() -> PathBuf {
    binary("cartscore-producer")
}

pub fn demo_model() -> PathBuf {
    repo_root().join("models/demo/model.onnx")
}

/// Runs `command` (backtraces off) and returns its stdout; fails the test
/// with both outputs when it does not succeed.
pub fn run_ok(command: &mut Command) -> String {
    let output = command.env("RUST_BACKTRACE", "0").output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// `N` different free ports: each listener is held until all are bound (one
/// dropped before the next is asked for can be handed out again).
pub fn free_ports<const N: usize>() -> [u16; N] {
    let listeners: [TcpListener; N] =
        std::array::from_fn(|_| TcpListener::bind("127.0.0.1:0").unwrap());
    listeners.map(|l| l.local_addr().unwrap().port())
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The PostgreSQL server of the tests (from scripts/stack.sh), as a URL
/// without the database.
pub fn postgres_server() -> String {
    let url = std::env::var("CARTSCORE_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://cartscore:cartscore@127.0.0.1:5432/postgres".into());
    match url.rsplit_once('/') {
        Some((server, _database)) => server.to_owned(),
        None => url,
    }
}

/// A connection to the test server's maintenance database, to create and
/// drop the tests' own databases.
pub fn postgres_admin() -> postgres::Client {
    try_postgres_admin().unwrap_or_else(|e| {
        panic!(
            "PostgreSQL at {} (set CARTSCORE_TEST_POSTGRES; scripts/stack.sh starts one): {e}",
            postgres_server()
        )
    })
}

/// [`postgres_admin`] for clean-ups, which must not panic.
pub fn try_postgres_admin() -> Result<postgres::Client, postgres::Error> {
    postgres::Client::connect(&format!("{}/postgres", postgres_server()), postgres::NoTls)
}

/// A database of the test's own on the test server, dropped at the end.
pub struct TestDatabase {
    pub name: String,
    pub url: String,
}

impl TestDatabase {
    pub fn new(tag: &str) -> Self {
        let name = format!("cartscore_{tag}_{}", std::process::id());
        let mut admin = postgres_admin();
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .unwrap();
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap();
        let url = format!("{}/{name}", postgres_server());
        Self { name, url }
    }

    pub fn client(&self) -> postgres::Client {
        postgres::Client::connect(&self.url, postgres::NoTls).unwrap()
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if let Ok(mut admin) = try_postgres_admin() {
            let _ = admin.batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ));
        }
    }
}

pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into()
}

#[derive(Debug, Default, Clone)]
pub struct Options {
    /// Extra `CARTSCORE_*` settings.
    pub env: Vec<(String, String)>,
    /// Wait for /readyz (a model is expected) rather than /healthz.
    pub expect_no_model: bool,
}

pub struct Appliance {
    child: Option<Child>,
    pub http: String,
    pub tcp: SocketAddr,
    pub model_dir: PathBuf,
    pub store_dir: PathBuf,
    stderr: PathBuf,
    agent: ureq::Agent,
}

impl Appliance {
    /// Starts `cartscore` with the model folder `model_dir` and the store under `work`.
    pub fn start(work: &Path, model_dir: &Path, options: &Options) -> Self {
        // A free port can be taken before the appliance binds it (by any
        // outgoing connection of a test running beside this one): try others.
        for _ in 0..3 {
            match Self::try_start(work, model_dir, options) {
                Ok(appliance) => return appliance,
                Err(log) if log.contains("Address already in use") => {
                    eprintln!("a port was taken during start-up; trying others");
                }
                Err(log) => panic!("cartscore exited during start-up:\n{log}"),
            }
        }
        panic!("cartscore could not bind free ports three times")
    }

    fn try_start(work: &Path, model_dir: &Path, options: &Options) -> Result<Self, String> {
        let [http, tcp] = free_ports().map(|port| SocketAddr::from(([127, 0, 0, 1], port)));
        let store_dir = work.join("store");
        let stderr = work.join(format!("cartscore-{}.log", http.port()));
        let mut command = Command::new(appliance_binary());
        command
            .args(["--http-listen", &http.to_string()])
            .args(["--tcp-listen", &tcp.to_string()])
            .arg("--store-path")
            .arg(&store_dir)
            .arg("--model-dir")
            .arg(model_dir)
            .env("RUST_BACKTRACE", "0")
            .env("RUST_LOG", "info")
            .env("CARTSCORE_STORE__SYNC", "false")
            // The store reserves its map on disk: the tests' data needs a
            // fraction of the default 1 GiB.
            .env("CARTSCORE_STORE__MAP_SIZE_MIB", "256")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap());
        for (key, value) in &options.env {
            command.env(key, value);
        }
        let child = command.spawn().expect("failed to start cartscore");
        let mut appliance = Self {
            child: Some(child),
            http: format!("http://{http}"),
            tcp,
            model_dir: model_dir.into(),
            store_dir,
            stderr,
            agent: agent(),
        };
        let probe = if options.expect_no_model {
            "/healthz"
        } else {
            "/readyz"
        };
        appliance.wait_for(probe)?;
        Ok(appliance)
    }

    /// Waits for `path` to answer 200; the log when the process exits first.
    fn wait_for(&mut self, path: &str) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = self.child.as_mut().unwrap().try_wait() {
                self.child = None;
                return Err(format!("exit {status}:\n{}", self.log()));
            }
            if let Ok(response) = self.agent.get(format!("{}{path}", self.http)).call()
                && response.status() == 200
            {
                return Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "cartscore did not become ready:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn get(&self, path: &str) -> (u16, Value) {
        let mut response = self
            .agent
            .get(format!("{}{path}", self.http))
            .call()
            .unwrap();
        let text = response.body_mut().read_to_string().unwrap();
        (
            response.status().as_u16(),
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub fn get_text(&self, path: &str) -> String {
        let mut response = self
            .agent
            .get(format!("{}{path}", self.http))
            .call()
            .unwrap();
        response.body_mut().read_to_string().unwrap()
    }

    pub fn post(&self, path: &str, body: impl AsRef<[u8]>) -> (u16, Value) {
        self.post_with(path, body, &[])
    }

    pub fn post_with(
        &self,
        path: &str,
        body: impl AsRef<[u8]>,
        headers: &[(&str, &str)],
    ) -> (u16, Value) {
        let mut request = self.agent.post(format!("{}{path}", self.http));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let mut response = request.send(body.as_ref()).unwrap();
        let text = response.body_mut().read_to_string().unwrap();
        (
            response.status().as_u16(),
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// The value of one sample in /metrics, 0 when absent.
    pub fn metric(&self, sample: &str) -> f64 {
        self.get_text("/metrics")
            .lines()
            .find_map(|line| {
                line.strip_prefix(sample)?
                    .strip_prefix(' ')?
                    .trim()
                    .parse()
                    .ok()
            })
            .unwrap_or(0.0)
    }

    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// SIGKILL: no drain, no chance to finish a write transaction.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// SIGTERM, then waits for the exit.
    pub fn stop(mut self) -> (ExitStatus, String) {
        self.signal("TERM");
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return (status, self.log());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "cartscore did not stop within 30 s after SIGTERM:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn serving_version(&self) -> Option<String> {
        let (_, model) = self.get("/v1/model");
        model["model"]["model_version"].as_str().map(str::to_owned)
    }

    /// Waits until `version` serves, or panics after `timeout`.
    pub fn wait_for_version(&self, version: &str, timeout: Duration) -> Duration {
        let started = Instant::now();
        while self.serving_version().as_deref() != Some(version) {
            assert!(
                started.elapsed() < timeout,
                "{version} did not start serving; /v1/model: {}",
                self.get("/v1/model").1
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        started.elapsed()
    }
}

impl Drop for Appliance {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Delivers a bundle the documented way: a hidden temp file in the folder,
/// then an atomic rename.
pub fn deliver(dir: &Path, name: &str, bytes: &[u8]) {
    let temp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&temp, bytes).unwrap();
    std::fs::rename(&temp, dir.join(name)).unwrap();
}

/// The demo bundle with its graph changed by `edit` (metadata untouched).
pub fn demo_graph_variant(edit: impl FnOnce(&mut ModelProto)) -> Vec<u8> {
    let bytes = std::fs::read(demo_model()).unwrap();
    let mut proto = ModelProto::decode(bytes.as_slice()).unwrap();
    edit(&mut proto);
    proto.encode_to_vec()
}

/// The demo bundle with its metadata changed by `edit` (still a valid
/// graph; golden vectors untouched unless `edit` changes them).
pub fn demo_variant(edit: impl FnOnce(&mut BundleMetadata)) -> Vec<u8> {
    let bytes = std::fs::read(demo_model()).unwrap();
    let mut proto = ModelProto::decode(bytes.as_slice()).unwrap();
    let mut metadata = BundleMetadata::from_metadata_props(&proto.metadata_props).unwrap();
    edit(&mut metadata);
    proto.metadata_props = metadata.to_metadata_props();
    proto.encode_to_vec()
}

/// A model folder holding a copy of the demo bundle.
pub fn model_dir_with_demo(work: &Path) -> PathBuf {
    let dir = work.join("models");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(demo_model(), dir.join("model.onnx")).unwrap();
    dir
}

/// A cart event as JSON, for HTTP.
pub fn cart_json(session: &str, secs: i64, product: u64, price: f64) -> String {
    format!(
        r#"{{"event_time":{micros},"event_type":"cart","product_id":{product},"category_id":2053013555631882655,"category_code":"electronics.smartphone","brand":"samsung","price":{price},"user_id":543272936,"user_session":"{session}"}}"#,
        micros = (1_569_920_400 + secs) * 1_000_000
    )
}

pub fn view_json(session: &str, secs: i64, product: u64, price: f64) -> String {
    cart_json(session, secs, product, price).replace("\"cart\"", "\"view\"")
}

/// Scores over TCP (pipelined) and HTTP until `stop`; counts answers by
/// version and failures.
pub struct Load {
    stop: Arc<AtomicBool>,
    failed: Arc<AtomicU64>,
    answered: Arc<Mutex<HashMap<String, u64>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    pub fn start(app: &Appliance) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let failed = Arc::new(AtomicU64::new(0));
        let answered: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
        let cart = Event::from_json(cart_json("load", 30, 11, 100.0).as_bytes()).unwrap();
        let mut threads = Vec::new();
        let tcp = app.tcp;
        {
            let (stop, failed, answered, cart) =
                (stop.clone(), failed.clone(), answered.clone(), cart.clone());
            threads.push(std::thread::spawn(move || {
                let mut client = TcpClient::connect(tcp).unwrap();
                while !stop.load(Ordering::Relaxed) {
                    for _ in 0..16 {
                        client.send(&cart);
                    }
                    client.flush().unwrap();
                    for _ in 0..16 {
                        match client.recv() {
                            Ok(r) if r.status == Status::Ok => {
                                *answered.lock().unwrap().entry(r.model_version).or_default() += 1;
                            }
                            _ => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                *answered
                                    .lock()
                                    .unwrap()
                                    .entry("failed over TCP".into())
                                    .or_default() += 1;
                            }
                        }
                    }
                }
            }));
        }
        {
            let (stop, failed, answered) = (stop.clone(), failed.clone(), answered.clone());
            let url = format!("{}/v1/score", app.http);
            let body = cart_json("load", 30, 11, 100.0);
            threads.push(std::thread::spawn(move || {
                let agent = agent();
                while !stop.load(Ordering::Relaxed) {
                    match agent.post(&url).send(body.as_bytes()) {
                        Ok(mut r) if r.status() == 200 => {
                            let answer: Value =
                                serde_json::from_str(&r.body_mut().read_to_string().unwrap())
                                    .unwrap();
                            let version = answer["model_version"]
                                .as_str()
                                .unwrap_or_default()
                                .to_owned();
                            *answered.lock().unwrap().entry(version).or_default() += 1;
                        }
                        other => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            let what = match other {
                                Ok(r) => format!("failed over HTTP: status {}", r.status()),
                                Err(e) => format!("failed over HTTP: {e}"),
                            };
                            *answered.lock().unwrap().entry(what).or_default() += 1;
                        }
                    }
                }
            }));
        }
        Self {
            stop,
            failed,
            answered,
            threads,
        }
    }

    pub fn finish(self) -> (u64, HashMap<String, u64>) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads {
            thread.join().unwrap();
        }
        let answered = self.answered.lock().unwrap().clone();
        (self.failed.load(Ordering::Relaxed), answered)
    }
}
