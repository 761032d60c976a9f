//! The PostgreSQL warehouse against a real server (scripts/test.sh starts
//! PostgreSQL and exports CARTSCORE_TEST_POSTGRES): each test gets its own
//! database.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{TestDb, dataset, fails, ok, ok_json};

fn load(input: &str, db: &TestDb) -> serde_json::Value {
    ok_json(&["load", "--input", input, "--postgres", &db.url])["postgres"].clone()
}

#[test]
fn migrations_apply_once_and_refuse_an_edited_history() {
    let db = TestDb::new("migrate");
    let first = ok_json(&["migrate", "--postgres", &db.url]);
    assert_eq!(first["applied"], serde_json::json!([1, 2, 3]), "{first}");
    let again = ok_json(&["migrate", "--postgres", &db.url]);
    assert_eq!(again["applied"], serde_json::json!([]), "{again}");
    for (schema, tables) in [
        ("bronze", 2),
        ("silver", 3),
        ("warehouse", 7),
        ("gold", 2),
        ("live", 5),
    ] {
        let found = db.count(&format!(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = '{schema}'"
        ));
        assert_eq!(found, tables, "tables and views in {schema}");
    }

    db.client()
        .batch_execute(
            "UPDATE public.cartscore_migrations SET checksum = 'edited' WHERE version = 1",
        )
        .unwrap();
    let stderr = fails(&["migrate", "--postgres", &db.url]);
    assert!(
        stderr.contains("migration 1 (bronze) was changed after it was applied"),
        "{stderr}"
    );
}

#[test]
fn the_slice_lands_in_bronze_silver_and_the_dimensions_once() {
    let db = TestDb::new("load");
    let data = dataset();
    let first = load(data.to_str().unwrap(), &db);
    // Bronze keeps every data line, the truncated last one too (with NULLs);
    // silver takes the valid ones once: the slice holds 5 exact duplicates.
    assert_eq!(first["rows_loaded"], 17_435, "{first}");
    assert_eq!(first["bronze_rows"], 17_435);
    assert_eq!(first["silver_rows"], 17_429);
    assert_eq!(first["duplicates"], 5);
    assert_eq!(first["rejects"], 1);
    let file = &first["files"][0];
    assert_eq!(
        (&file["valid"], &file["rejected"]),
        (&17_434.into(), &1.into())
    );

    // The same file again, and the same bytes under another name: nothing added.
    let work = tempfile::tempdir().unwrap();
    let copy = work.path().join("copy.csv");
    std::fs::copy(&data, &copy).unwrap();
    let again = ok_json(&[
        "load",
        "--input",
        data.to_str().unwrap(),
        "--input",
        copy.to_str().unwrap(),
        "--postgres",
        &db.url,
    ])["postgres"]
        .clone();
    assert_eq!(again["rows_loaded"], 0, "{again}");
    assert_eq!(again["silver_rows"], 17_429);
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
            "SELECT reason_code, reason, source_line FROM silver.rejects",
            &[],
        )
        .unwrap();
    let (code, reason, line): (String, String, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(code, "missing_field");
    assert!(reason.contains("user_session"), "{reason}");
    assert_eq!(line, 17_436, "the truncated row is the file's last line");
    // Bronze line numbers are file lines: line 2 is the first data row.
    let first_row: String = client
        .query_one(
            "SELECT event_time FROM bronze.events WHERE source_line = 2",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(first_row, "2019-10-01 00:00:00 UTC");
    // Silver is typed: ids beyond 2^53 survive exactly.
    let big: i64 = client
        .query_one("SELECT max(category_id) FROM silver.events", &[])
        .unwrap()
        .get(0);
    assert!(big > 2_053_013_552_000_000_000, "{big}");

    // Dimensions and facts.
    assert_eq!(
        db.count(
            "SELECT count(*) FROM warehouse.dim_date WHERE date_key = '2019-10-01' AND weekday = 2"
        ),
        1,
        "2019-10-01 was a Tuesday"
    );
    assert_eq!(
        db.count("SELECT count(DISTINCT product_id) FROM silver.events"),
        db.count("SELECT count(*) FROM warehouse.dim_product")
    );
    assert_eq!(
        db.count("SELECT count(DISTINCT user_id) FROM silver.events"),
        db.count("SELECT sum(1) FROM warehouse.dim_user")
    );
    assert_eq!(
        db.count("SELECT sum(events)::bigint FROM warehouse.dim_user"),
        17_429
    );
    assert_eq!(
        db.count("SELECT count(*) FROM warehouse.dim_category WHERE category_code = 'appliances.environment.water_heater' AND level3 = 'water_heater'"),
        1
    );
    assert_eq!(
        db.count("SELECT count(*) FROM warehouse.fact_events"),
        17_429
    );
    assert_eq!(
        db.count("SELECT count(*) FROM warehouse.fact_cart_outcomes"),
        db.count("SELECT count(*) FROM silver.events WHERE event_type = 'cart'")
    );
}

#[test]
fn bad_rows_go_to_rejects_with_their_reason_and_never_abort_a_load() {
    let db = TestDb::new("rejects");
    let work = tempfile::tempdir().unwrap();
    let path = work.path().join("mixed.csv");
    let mut data = b"event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session\n".to_vec();
    data.extend_from_slice(b"2019-10-01 00:00:00 UTC,view,1,2,,,1.0,3,s\n");
    data.extend_from_slice(b"2019-10-01 00:00:01 UTC,view,1,2,,bad\xff,1.0,3,s\n");
    data.extend_from_slice(b"2019-10-01 00:00:02 UTC,click,1,2,,,1.0,3,s\n");
    data.extend_from_slice(b"2019-10-01 00:00:03 UTC,view,1,2,,,-4,3,s\n");
    data.extend_from_slice(b"2019-10-01 00:00:04 UTC,view,18446744073709551615,2,,,1.0,3,s\n");
    data.extend_from_slice(b"2019-10-01 00:00:05 UTC,view,1,2,,a\\b\tc,1.0,3,s\n");
    std::fs::write(&path, &data).unwrap();
    let loaded = load(path.to_str().unwrap(), &db);
    assert_eq!(loaded["bronze_rows"], 6, "{loaded}");
    assert_eq!(loaded["silver_rows"], 2);
    assert_eq!(loaded["rejects"], 4);
    let mut client = db.client();
    let reasons: Vec<(i64, String)> = client
        .query(
            "SELECT source_line, reason_code FROM silver.rejects ORDER BY source_line",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        reasons,
        [
            (3, "not_utf8".to_string()),
            (4, "unknown_event_type".to_string()),
            (5, "negative_price".to_string()),
            (6, "id_out_of_range".to_string()),
        ]
    );
    // Escaping round-trips: a backslash and a tab in a brand.
    let brand: String = client
        .query_one("SELECT brand FROM silver.events WHERE source_line = 7", &[])
        .unwrap()
        .get(0);
    assert_eq!(brand, "a\\b\tc");
}

#[test]
fn a_load_killed_midway_leaves_nothing_and_the_rerun_loads_once() {
    let db = TestDb::new("killed");
    let work = tempfile::tempdir().unwrap();
    let path = work.path().join("big.csv");
    ok(&[
        "synth",
        "--events",
        "400000",
        "--seed",
        "5",
        "--out",
        path.to_str().unwrap(),
    ]);
    ok(&["migrate", "--postgres", &db.url]);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_cartscore-trainer"))
        .args([
            "load",
            "--input",
            path.to_str().unwrap(),
            "--postgres",
            &db.url,
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once PostgreSQL reports the COPY under way.
    let mut admin = db.client();
    let started = Instant::now();
    loop {
        let copying = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_progress_copy WHERE tuples_processed > 10000",
                &[],
            )
            .unwrap()
            .get::<_, i64>(0);
        if copying > 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the load never started copying"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the load ended before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    drop(admin);
    // The server rolls the transaction back once it sees the connection gone.
    let started = Instant::now();
    while db.count("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()") > 0 {
        assert!(started.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(50));
    }
    for table in [
        "bronze.events",
        "bronze.load_manifest",
        "silver.events",
        "silver.rejects",
    ] {
        assert_eq!(
            db.count(&format!("SELECT count(*) FROM {table}")),
            0,
            "{table} after the kill"
        );
    }
    let rerun = load(path.to_str().unwrap(), &db);
    assert_eq!(rerun["bronze_rows"], 400_000, "{rerun}");
    assert_eq!(rerun["silver_rows"], 400_000);
}

#[test]
fn training_from_the_warehouse_writes_the_feature_rows_to_gold() {
    let db = TestDb::new("gold");
    load(dataset().to_str().unwrap(), &db);
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("model");
    ok(&[
        "train",
        "--source",
        &db.url,
        "--out",
        out.to_str().unwrap(),
        "--trials",
        "2",
        "--max-iterations",
        "30",
        "--threads",
        "2",
    ]);
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    let version = report["model_version"].as_str().unwrap();
    let examples = report["replay"]["cart_examples"].as_i64().unwrap();
    assert_eq!(report["input"]["rows"], 17_429, "silver, de-duplicated");
    assert_eq!(report["gold"]["rows"], examples);
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM gold.feature_rows WHERE model_version = '{version}'"
        )),
        examples
    );
    for split in ["train", "validation", "test"] {
        assert_eq!(
            db.count(&format!(
                "SELECT count(*) FROM gold.feature_rows WHERE split = '{split}'"
            )),
            report["rows"][split].as_i64().unwrap(),
            "{split} rows"
        );
    }
    // The label the replay computed is the warehouse's cart outcome.
    assert_eq!(
        db.count(
            "SELECT count(*) FROM gold.feature_rows g JOIN warehouse.fact_cart_outcomes f
               ON f.event_time = g.event_time AND f.user_session = g.user_session AND f.product_id = g.product_id
             WHERE f.purchased <> g.label"
        ),
        0
    );
    assert_eq!(
        db.count("SELECT count(*) FILTER (WHERE label) FROM gold.feature_rows"),
        db.count("SELECT count(*) FILTER (WHERE purchased) FROM warehouse.fact_cart_outcomes")
    );
    // What the model saw: the rows are the bundle's test window rows.
    let (run_source, contract): (String, i32) = {
        let row = db
            .client()
            .query_one(
                "SELECT source, contract_version FROM gold.training_runs",
                &[],
            )
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert!(
        run_source.contains("silver.events") && !run_source.contains("cartscore:cartscore"),
        "{run_source}"
    );
    assert_eq!(contract, 1);
    assert_eq!(
        db.count("SELECT count(*) FROM gold.feature_rows WHERE price < 0 OR session_events < 1"),
        0
    );
}

#[test]
fn an_unreachable_database_is_named_without_its_password() {
    let stderr = fails(&[
        "migrate",
        "--postgres",
        "postgres://cartscore:hunter2@127.0.0.1:1/warehouse",
    ]);
    assert!(
        stderr.contains("cannot connect to PostgreSQL at cartscore@127.0.0.1:1/warehouse"),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2"), "{stderr}");
    let stderr = fails(&[
        "train",
        "--source",
        "postgres://cartscore:hunter2@127.0.0.1:1/warehouse",
        "--out",
        "/tmp/never",
    ]);
    assert!(
        stderr.contains("cartscore@127.0.0.1:1/warehouse") && !stderr.contains("hunter2"),
        "{stderr}"
    );
}
