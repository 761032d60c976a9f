//! The PostgreSQL warehouse against a real server (scripts/test.sh starts
//! PostgreSQL and exports CARTSCORE_TEST_POSTGRES): each test gets its own
//! database.
#![allow(clippy::unwrap_used)]

mod common;

use serde_json::Value;

use common::{dataset, trainer};

fn admin_url() -> String {
    std::env::var("CARTSCORE_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://cartscore:cartscore@127.0.0.1:5432/postgres".into())
}

/// A fresh database, dropped when the guard goes.
struct TestDb {
    name: String,
    url: String,
}

impl TestDb {
    fn new(tag: &str) -> Self {
        let name = format!("cartscore_{tag}_{}", std::process::id());
        let mut admin = postgres::Client::connect(&admin_url(), postgres::NoTls)
            .unwrap_or_else(|e| panic!("PostgreSQL at {} (set CARTSCORE_TEST_POSTGRES; scripts/test.sh starts one): {e}", admin_url()));
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name}"))
            .unwrap();
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap();
        let base = admin_url();
        let url = format!("{}/{name}", &base[..base.rfind('/').unwrap()]);
        Self { name, url }
    }

    fn client(&self) -> postgres::Client {
        postgres::Client::connect(&self.url, postgres::NoTls).unwrap()
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

/// Runs the trainer, requires success, returns its JSON summary.
fn ok(args: &[&str]) -> Value {
    serde_json::from_str(&common::ok(args)).unwrap()
}

/// A single number from a query such as `SELECT count(*) …`.
fn count(client: &mut postgres::Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).unwrap().get(0)
}

#[test]
fn migrations_apply_once_and_refuse_an_edited_history() {
    let db = TestDb::new("migrate");
    let first = ok(&["migrate", "--postgres", &db.url]);
    assert_eq!(first["applied"], serde_json::json!([1]), "{first}");
    let again = ok(&["migrate", "--postgres", &db.url]);
    assert_eq!(again["applied"], serde_json::json!([]), "{again}");
    let tables = count(
        &mut db.client(),
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'bronze'",
    );
    assert_eq!(tables, 2);

    db.client()
        .batch_execute(
            "UPDATE public.cartscore_migrations SET checksum = 'edited' WHERE version = 1",
        )
        .unwrap();
    let refused = trainer(&["migrate", "--postgres", &db.url]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        stderr.contains("migration 1 (bronze) was changed after it was applied"),
        "{stderr}"
    );
}

#[test]
fn loading_is_complete_and_idempotent() {
    let db = TestDb::new("load");
    let data = dataset();
    let first = ok(&[
        "load",
        "--input",
        data.to_str().unwrap(),
        "--postgres",
        &db.url,
    ]);
    // Bronze keeps every data line, the truncated last one too (with NULLs).
    assert_eq!(first["rows_loaded"], 17_435, "{first}");
    assert_eq!(first["bronze_rows"], 17_435);

    // The same file again, and the same bytes under another name: nothing added.
    let work = tempfile::tempdir().unwrap();
    let copy = work.path().join("copy.csv");
    std::fs::copy(&data, &copy).unwrap();
    let again = ok(&[
        "load",
        "--input",
        data.to_str().unwrap(),
        "--input",
        copy.to_str().unwrap(),
        "--postgres",
        &db.url,
    ]);
    assert_eq!(again["rows_loaded"], 0, "{again}");
    assert_eq!(again["bronze_rows"], 17_435);
    assert!(
        again["files"]
            .as_array()
            .unwrap()
            .iter()
            .all(|f| f["already_loaded"] == true)
    );

    let mut client = db.client();
    let row = client
        .query_one(
            "SELECT event_type, price, user_session FROM bronze.events WHERE source_line = 2",
            &[],
        )
        .unwrap();
    let (kind, price): (String, String) = (row.get(0), row.get(1));
    assert_eq!(kind, "view");
    assert!(price.parse::<f64>().is_ok(), "{price}");
    let truncated = count(
        &mut client,
        "SELECT count(*) FROM bronze.events WHERE user_session IS NULL",
    );
    assert_eq!(truncated, 1);
}

#[test]
fn a_load_that_fails_midway_leaves_nothing_behind() {
    let db = TestDb::new("partial");
    let work = tempfile::tempdir().unwrap();
    let data = std::fs::read(dataset()).unwrap();
    // The first 5,000 lines, then a byte PostgreSQL refuses (not UTF-8).
    let mut broken: Vec<u8> = data
        .split_inclusive(|b| *b == b'\n')
        .take(5_000)
        .flatten()
        .copied()
        .collect();
    broken.extend_from_slice(b"2019-10-01 09:00:00 UTC,view,1,2,,bad\xff,1.0,3,s\n");
    let path = work.path().join("broken.csv");
    std::fs::write(&path, &broken).unwrap();
    let failed = trainer(&[
        "load",
        "--input",
        path.to_str().unwrap(),
        "--postgres",
        &db.url,
    ]);
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(!failed.status.success(), "a broken file must fail the load");
    assert!(
        stderr.contains("broken.csv"),
        "the error names the file: {stderr}"
    );
    let mut client = db.client();
    let rows = count(&mut client, "SELECT count(*) FROM bronze.events");
    let files = count(&mut client, "SELECT count(*) FROM bronze.load_manifest");
    assert_eq!((rows, files), (0, 0), "half a file was left in bronze");

    // Fixed, it loads in full.
    std::fs::write(
        &path,
        data.split_inclusive(|b| *b == b'\n')
            .take(5_000)
            .flatten()
            .copied()
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    let fixed = ok(&[
        "load",
        "--input",
        path.to_str().unwrap(),
        "--postgres",
        &db.url,
    ]);
    assert_eq!(fixed["rows_loaded"], 4_999, "{fixed}");
}

#[test]
fn an_unreachable_database_is_named_without_its_password() {
    let out = trainer(&[
        "migrate",
        "--postgres",
        "postgres://cartscore:hunter2@127.0.0.1:1/warehouse",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("cannot connect to PostgreSQL at cartscore@127.0.0.1:1/warehouse"),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2"), "{stderr}");
}
