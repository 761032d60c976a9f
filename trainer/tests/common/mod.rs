//! What the trainer's end-to-end test binaries share: running the binary,
//! the data slice, and per-test databases and buckets on the real
//! PostgreSQL and S3 servers that scripts/test.sh starts.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output};

/// The S3-compatible server of the tests (SeaweedFS from scripts/test.sh).
pub fn s3_endpoint() -> String {
    std::env::var("CARTSCORE_TEST_S3").unwrap_or_else(|_| "http://127.0.0.1:8333".into())
}

/// The MLflow tracking server of the tests (from scripts/test.sh).
pub fn mlflow_url() -> String {
    std::env::var("CARTSCORE_TEST_MLFLOW").unwrap_or_else(|_| "http://127.0.0.1:5000".into())
}

/// Runs the trainer with the S3 settings a deployment would have in its
/// environment.
pub fn trainer(args: &[&str]) -> Output {
    trainer_at(args, &s3_endpoint())
}

/// Runs the trainer against the S3 endpoint `s3`.
pub fn trainer_at(args: &[&str], s3: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cartscore-trainer"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .env("AWS_ENDPOINT_URL", s3)
        .env("AWS_ACCESS_KEY_ID", "cartscore")
        .env("AWS_SECRET_ACCESS_KEY", "cartscore")
        .env("AWS_REGION", "us-east-1")
        .output()
        .expect("run cartscore-trainer")
}

/// Runs the trainer, requires failure, returns its stderr.
pub fn fails(args: &[&str]) -> String {
    failed(trainer(args), args)
}

/// Runs the trainer against the S3 endpoint `s3`, requires failure,
/// returns its stderr.
pub fn fails_at(args: &[&str], s3: &str) -> String {
    failed(trainer_at(args, s3), args)
}

fn failed(output: Output, args: &[&str]) -> String {
    assert!(
        !output.status.success(),
        "cartscore-trainer {args:?} should have failed"
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Runs the trainer, requires success, returns its stdout.
pub fn ok(args: &[&str]) -> String {
    let output = trainer(args);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "cartscore-trainer {args:?} failed:\n{}\n{stderr}",
        String::from_utf8_lossy(&output.stdout),
    );
    // Its log went to a pipe, not a terminal: plain text, no colour escapes.
    assert!(
        !stderr.contains('\u{1b}'),
        "colour in a piped log: {stderr:?}"
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The JSON summary a `load` prints.
pub fn ok_json(args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&ok(args)).expect("load prints JSON")
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The real data slice (`CARTSCORE_DATASET` overrides).
pub fn dataset() -> PathBuf {
    std::env::var("CARTSCORE_DATASET")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo().join("../shared/data/2019-Oct-head.csv"))
}

pub fn admin_url() -> String {
    std::env::var("CARTSCORE_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://cartscore:cartscore@127.0.0.1:5432/postgres".into())
}

/// A fresh database, dropped when the guard goes.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub fn new(tag: &str) -> Self {
        let name = format!("cartscore_{tag}_{}", std::process::id());
        let mut admin = postgres::Client::connect(&admin_url(), postgres::NoTls)
            .unwrap_or_else(|e| panic!("PostgreSQL at {} (set CARTSCORE_TEST_POSTGRES; scripts/test.sh starts one): {e}", admin_url()));
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .unwrap();
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap();
        let base = admin_url();
        let url = format!("{}/{name}", &base[..base.rfind('/').unwrap()]);
        Self { name, url }
    }

    pub fn client(&self) -> postgres::Client {
        postgres::Client::connect(&self.url, postgres::NoTls).unwrap()
    }

    /// A single number from a query such as `SELECT count(*) …`.
    pub fn count(&self, sql: &str) -> i64 {
        self.client().query_one(sql, &[]).unwrap().get(0)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Ok(mut admin) = postgres::Client::connect(&admin_url(), postgres::NoTls) {
            let _ = admin.batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ));
        }
    }
}

/// A fresh bucket on the test S3 server. Created with a plain S3
/// CreateBucket request (the test server takes anonymous requests); the
/// trainer itself signs its requests with the AWS credentials it is given.
pub struct TestBucket {
    pub name: String,
}

impl TestBucket {
    pub fn new(tag: &str) -> Self {
        let name = format!("cartscore-{tag}-{}", std::process::id());
        let url = format!("{}/{name}", s3_endpoint());
        let response = ureq::put(&url).send_empty().unwrap_or_else(|e| {
            panic!(
                "S3 server at {} (set CARTSCORE_TEST_S3; scripts/test.sh starts one): {e}",
                s3_endpoint()
            )
        });
        assert!(response.status().is_success(), "CreateBucket {url}");
        Self { name }
    }

    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{}/{prefix}", self.name)
    }

    /// The keys under `prefix` (S3 ListObjectsV2, first 1,000).
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        let url = format!(
            "{}/{}?list-type=2&prefix={prefix}",
            s3_endpoint(),
            self.name
        );
        let body = ureq::get(&url)
            .call()
            .unwrap()
            .body_mut()
            .read_to_string()
            .unwrap();
        body.split("<Key>")
            .skip(1)
            .filter_map(|s| s.split_once("</Key>").map(|(k, _)| k.to_owned()))
            .collect()
    }

    pub fn get(&self, key: &str) -> Vec<u8> {
        let url = format!("{}/{}/{key}", s3_endpoint(), self.name);
        ureq::get(&url)
            .call()
            .unwrap()
            .body_mut()
            .read_to_vec()
            .unwrap()
    }
}
