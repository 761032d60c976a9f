//! Superset over the warehouse, for real: the dashboards of
//! `configs/superset/dashboards` imported into a fresh Superset
//! (`scripts/superset.sh init`, SQLite metadata) over a warehouse that the
//! whole loop filled: events loaded by the trainer, two models trained from
//! them, the appliance scoring the later days with the challenger in
//! shadow, and the resolved outcomes copied back by `cartscore-trainer
//! outcomes`. Every chart of the dashboard is asked for its data through
//! Superset's API: rows come back, no error.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cartscore_core::Timestamp;
use serde_json::Value;

use crate::closed_loop::resolve_all;

use crate::common::{
    Appliance, Options, TestDatabase, agent, free_port, producer_binary, repo_root, run_ok, trainer,
};

/// Runs a cartscore binary to success and returns its stdout as JSON
/// (`Null` when it prints none).
fn run_json(binary: &Path, args: &[&str]) -> Value {
    serde_json::from_str(&run_ok(Command::new(binary).args(args))).unwrap_or(Value::Null)
}

/// `scripts/superset.sh` (`scripts/test.sh` installs Superset).
fn superset_script(args: &[&str], password: &str) {
    run_ok(
        Command::new(repo_root().join("scripts/superset.sh"))
            .args(args)
            .env("CARTSCORE_SUPERSET_PASSWORD", password),
    );
}

/// `scripts/superset.sh serve` (gunicorn) in its own process group, so
/// that dropping it stops the workers too.
struct Superset {
    child: Child,
    url: String,
}

impl Superset {
    fn serve(home: &Path) -> Self {
        let port = free_port();
        let log = home.join("serve.log");
        let child = Command::new(repo_root().join("scripts/superset.sh"))
            .arg("serve")
            .arg(home)
            .arg(port.to_string())
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let superset = Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let agent = agent();
        let deadline = Instant::now() + Duration::from_secs(180);
        while agent
            .get(format!("{}/health", superset.url))
            .call()
            .map_or(true, |r| r.status() != 200)
        {
            assert!(
                Instant::now() < deadline,
                "Superset did not answer /health:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        superset
    }
}

impl Drop for Superset {
    fn drop(&mut self) {
        // SIGTERM to the group: gunicorn's master stops its workers.
        let _ = Command::new("kill")
            .args(["-TERM", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.wait();
    }
}

/// A session of Superset's REST API, logged in as `admin`.
struct SupersetApi {
    agent: ureq::Agent,
    url: String,
    token: String,
}

impl SupersetApi {
    fn login(url: &str, password: &str) -> Self {
        let agent = agent();
        let body = serde_json::json!({
            "username": "admin", "password": password, "provider": "db", "refresh": true
        });
        let mut response = agent
            .post(format!("{url}/api/v1/security/login"))
            .header("content-type", "application/json")
            .send(serde_json::to_vec(&body).unwrap().as_slice())
            .unwrap();
        let text = response.body_mut().read_to_string().unwrap();
        assert_eq!(response.status(), 200, "login: {text}");
        let answer: Value = serde_json::from_str(&text).unwrap();
        Self {
            agent,
            url: url.to_owned(),
            token: answer["access_token"].as_str().unwrap().to_owned(),
        }
    }

    fn get(&self, path: &str) -> (u16, Value) {
        let mut response = self
            .agent
            .get(format!("{}{path}", self.url))
            .header("authorization", &format!("Bearer {}", self.token))
            .call()
            .unwrap();
        let text = response.body_mut().read_to_string().unwrap();
        (
            response.status().as_u16(),
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }
}

/// Splits `events` (a CSV in time order) into the first `num/den` of its
/// rows and the rest, each with the header.
fn split(events: &Path, num: usize, den: usize, first: &Path, rest: &Path) {
    let text = std::fs::read_to_string(events).unwrap();
    let mut lines = text.lines();
    let header = lines.next().unwrap();
    let rows: Vec<&str> = lines.collect();
    let cut = rows.len() * num / den;
    let write = |path: &Path, rows: &[&str]| {
        let mut out = String::with_capacity(rows.len() * 100);
        out.push_str(header);
        out.push('\n');
        for row in rows {
            out.push_str(row);
            out.push('\n');
        }
        std::fs::write(path, out).unwrap();
    };
    write(first, &rows[..cut]);
    write(rest, &rows[cut..]);
}

#[test]
fn superset_imports_the_dashboards_and_every_chart_answers_from_the_warehouse() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let warehouse = TestDatabase::new("superset");
    let path = |name: &str| dir.join(name).to_str().unwrap().to_owned();

    // Six days of a synthetic shop (with invalid rows, for the rejects
    // chart): the first four into the warehouse, the rest live.
    run_json(
        &trainer(),
        &[
            "synth",
            "--events",
            "80000",
            "--seed",
            "11",
            "--days",
            "6",
            "--invalid-rate",
            "0.01",
            "--out",
            &path("events.csv"),
        ],
    );
    split(
        &dir.join("events.csv"),
        4,
        6,
        &dir.join("history.csv"),
        &dir.join("live.csv"),
    );
    run_json(
        &trainer(),
        &[
            "load",
            "--input",
            &path("history.csv"),
            "--postgres",
            &warehouse.url,
        ],
    );
    for (version, iterations) in [("champion-1", "20"), ("challenger-1", "60")] {
        run_json(
            &trainer(),
            &[
                "train",
                "--source",
                &warehouse.url,
                "--out",
                &path(version),
                "--trials",
                "1",
                "--max-iterations",
                iterations,
                "--model-version",
                version,
            ],
        );
    }
    let models = dir.join("models");
    std::fs::create_dir_all(models.join("shadow")).unwrap();
    std::fs::copy(
        dir.join("champion-1/model.onnx"),
        models.join("champion-1.onnx"),
    )
    .unwrap();
    std::fs::copy(
        dir.join("challenger-1/model.onnx"),
        models.join("shadow/challenger-1.onnx"),
    )
    .unwrap();

    let app = Appliance::start(dir, &models, &Options::default());
    run_json(
        &producer_binary(),
        &[
            "http",
            "--appliance",
            &app.http,
            "--input",
            &path("history.csv"),
            "--batch",
            "2000",
        ],
    );
    let replay = run_json(
        &producer_binary(),
        &[
            "http",
            "--appliance",
            &app.http,
            "--input",
            &path("live.csv"),
            "--batch",
            "2000",
            "--score-carts",
        ],
    );
    assert!(replay["carts_scored"].as_u64().unwrap() > 100, "{replay}");

    // An event two days after the last one resolves every pending cart.
    resolve_all(&app, last_event_micros(&dir.join("live.csv")), "champion-1");
    let (_, model) = app.get("/v1/model");
    let comparison = model["comparison"][0].clone();
    assert!(comparison["count"].as_u64() > Some(0), "{model}");
    let copied = run_json(
        &trainer(),
        &[
            "outcomes",
            "--appliance",
            &app.http,
            "--postgres",
            &warehouse.url,
        ],
    );
    assert!(copied["added"].as_u64().unwrap() > 0, "{copied}");

    // The warehouse judges both models as the appliance did, on the same
    // carts: served is the champion, shadow the challenger.
    let mut client = warehouse.client();
    for (version, scored_as, quality) in [
        ("champion-1", "served", "champion_quality"),
        ("challenger-1", "shadow", "challenger_quality"),
    ] {
        let row = client
            .query_one(
                "SELECT outcomes, roc_auc::float8 FROM live.quality WHERE model_version = $1 AND scored_as = $2",
                &[&version, &scored_as],
            )
            .unwrap();
        assert_eq!(
            row.get::<_, i64>(0),
            comparison["count"].as_i64().unwrap(),
            "{version}: {comparison}"
        );
        let live = comparison[quality]["roc_auc"].as_f64().unwrap();
        let sql: f64 = row.get(1);
        assert!(
            (sql - live).abs() < 1e-9,
            "{version} {scored_as}: warehouse ROC-AUC {sql}, appliance {live}"
        );
    }

    // A fresh Superset with the dashboards imported, over this warehouse.
    let password = "superset-test-password";
    let home = dir.join("superset");
    superset_script(&["init", home.to_str().unwrap(), &warehouse.url], password);
    let superset = Superset::serve(&home);
    let api = SupersetApi::login(&superset.url, password);
    let (status, charts) = api.get("/api/v1/dashboard/cartscore/charts");
    assert_eq!(status, 200, "{charts}");
    let charts = charts["result"].as_array().unwrap();
    let shipped = std::fs::read_dir(repo_root().join("configs/superset/dashboards/charts"))
        .unwrap()
        .count();
    assert_eq!(charts.len(), shipped, "the dashboard holds every chart");
    let mut report = Vec::new();
    for chart in charts {
        let name = chart["slice_name"].as_str().unwrap();
        let (status, data) = api.get(&format!("/api/v1/chart/{}/data/", chart["id"]));
        assert_eq!(status, 200, "{name}: {data}");
        let result = &data["result"][0];
        assert!(result["error"].is_null(), "{name}: {result}");
        let rows = result["rowcount"].as_u64().unwrap_or(0);
        assert!(rows > 0, "{name}: no rows: {result}");
        report.push(format!("{name}: {rows}"));
    }
    println!("superset: every chart answers: {}", report.join(", "));
}

/// Epoch microseconds of the last row of `live` (in time order).
fn last_event_micros(live: &Path) -> i64 {
    let text = std::fs::read_to_string(live).unwrap();
    let time = text.lines().last().unwrap().split(',').next().unwrap();
    Timestamp::parse(time).unwrap().micros()
}
