//! The operator's view, for real: Debian's Prometheus scraping a running
//! appliance with the shipped alert rules loaded, three of them provoked for
//! real (a bad bundle dropped in, the broker stopped, invalid events over
//! 5 %) and read as firing from Prometheus's HTTP API, then resolving.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{deliver, free_port, free_ports, repo_root};

/// The shipped rules with every `for:` and range window scaled down for a
/// test that cannot wait minutes: `1m` becomes 1 s, so `for: 2m` is 2 s and
/// `[15m]` is 15 s. The expressions are otherwise the shipped ones.
pub fn fast_rules(dir: &Path) -> std::path::PathBuf {
    let text = std::fs::read_to_string(repo_root().join("configs/prometheus/cartscore-alerts.yml"))
        .unwrap();
    let scale = |text: &str| -> String {
        let mut out = String::new();
        let mut rest = text;
        // `<digits>m` after `for: ` or inside `[...]`: minutes to seconds.
        while let Some(at) = rest.find(|c: char| c.is_ascii_digit()) {
            let (before, from) = rest.split_at(at);
            out.push_str(before);
            let digits: String = from.chars().take_while(char::is_ascii_digit).collect();
            let after = &from[digits.len()..];
            let minute = after.starts_with('m')
                && !after.starts_with("ms")
                && (before.ends_with("for: ") || before.ends_with('['));
            out.push_str(&digits);
            if minute {
                out.push('s');
                rest = &after[1..];
            } else {
                rest = after;
            }
        }
        out.push_str(rest);
        out
    };
    let path = dir.join("cartscore-alerts.fast.yml");
    std::fs::write(&path, scale(&text)).unwrap();
    path
}

/// Debian's `prometheus` on a free port, scraping `targets` every second
/// with `rules`; killed on drop.
pub struct Prometheus {
    child: Child,
    pub url: String,
    agent: ureq::Agent,
}

impl Prometheus {
    pub fn start(dir: &Path, targets: &[&str], rules: &Path) -> Self {
        let port = free_port();
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: cartscore\n    static_configs:\n      - targets: [{}]\n",
            rules.display(),
            targets.join(", ")
        );
        let file = dir.join("prometheus.yml");
        std::fs::write(&file, config).unwrap();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("Debian's prometheus (scripts/test.sh installs it)");
        let prometheus = Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            agent: crate::common::agent(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while prometheus.get("/-/ready").is_none() {
            assert!(
                Instant::now() < deadline,
                "prometheus did not start: {}",
                std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        prometheus
    }

    fn get(&self, path: &str) -> Option<String> {
        let mut response = self.agent.get(format!("{}{path}", self.url)).call().ok()?;
        (response.status() == 200).then(|| response.body_mut().read_to_string().unwrap_or_default())
    }

    /// The names of the alerts firing now (`/api/v1/alerts`).
    pub fn firing(&self) -> Vec<String> {
        let Some(text) = self.get("/api/v1/alerts") else {
            return Vec::new();
        };
        let body: Value = serde_json::from_str(&text).unwrap();
        body["data"]["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["state"] == "firing")
            .map(|a| a["labels"]["alertname"].as_str().unwrap().to_owned())
            .collect()
    }

    /// Waits until `alert` is firing (`true`) or not (`false`).
    pub fn wait(&self, alert: &str, firing: bool, timeout: Duration) -> Duration {
        let started = Instant::now();
        loop {
            let now = self.firing();
            if now.iter().any(|a| a == alert) == firing {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < timeout,
                "{alert} did not {} within {timeout:?}; firing: {now:?}",
                if firing { "fire" } else { "resolve" }
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The value of an instant query's first series.
    pub fn query(&self, expr: &str) -> Option<f64> {
        let mut response = self
            .agent
            .get(format!("{}/api/v1/query", self.url))
            .query("query", expr)
            .call()
            .ok()?;
        let body: Value = serde_json::from_str(&response.body_mut().read_to_string().ok()?).ok()?;
        body["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn prometheus_fires_the_shipped_alerts_on_real_faults_and_resolves_them() {
    let work = tempfile::tempdir().unwrap();
    let (mut broker, topics, app) = crate::stream::private_broker_with_500_applied(
        work.path(),
        "operator",
        &[("CARTSCORE_KAFKA__STALE_AFTER_MS", "1500")],
    );
    let rules = fast_rules(work.path());
    let prometheus = Prometheus::start(
        work.path(),
        &[app.http.trim_start_matches("http://")],
        &rules,
    );
    let timeout = Duration::from_secs(90);
    // Healthy first: scraped, nothing firing.
    let deadline = Instant::now() + timeout;
    while prometheus.query("up{job=\"cartscore\"}") != Some(1.0) {
        assert!(
            Instant::now() < deadline,
            "prometheus never scraped the appliance"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    std::thread::sleep(Duration::from_secs(3));
    let provoked = [
        "CartscoreModelReloadFailed",
        "CartscoreStreamStale",
        "CartscoreInvalidEventRateHigh",
    ];
    let before = prometheus.firing();
    assert!(
        !before.iter().any(|a| provoked.contains(&a.as_str())),
        "firing before any fault: {before:?}"
    );

    // 1. A bad bundle dropped into the model folder.
    deliver(&app.model_dir, "broken.onnx", b"not a bundle");
    let fired = prometheus.wait("CartscoreModelReloadFailed", true, timeout);
    println!("CartscoreModelReloadFailed fired {fired:?} after a bad bundle");
    // `increase(...[15m])`, scaled to 15 s: it resolves once the window passes.
    let resolved = prometheus.wait("CartscoreModelReloadFailed", false, timeout);
    println!("  and resolved {resolved:?} later");

    // 2. The broker stopped: the stream goes stale.
    broker.kill();
    let fired = prometheus.wait("CartscoreStreamStale", true, timeout);
    println!("CartscoreStreamStale fired {fired:?} after the broker stopped");
    broker.restart();
    let resolved = prometheus.wait("CartscoreStreamStale", false, timeout);
    println!("  and resolved {resolved:?} after it came back");

    // 3. Invalid events over 5 % of what arrives.
    let brokers = broker.addr();
    let bad = std::thread::spawn({
        let (brokers, topic) = (brokers.clone(), topics.raw.clone());
        move || {
            crate::stream::replay(
                &brokers,
                &topic,
                &[
                    "--limit",
                    "6000",
                    "--rate",
                    "400",
                    "--corrupt",
                    "0.3",
                    "--session-prefix",
                    "bad-",
                ],
            )
        }
    });
    let fired = prometheus.wait("CartscoreInvalidEventRateHigh", true, timeout);
    println!(
        "CartscoreInvalidEventRateHigh fired {fired:?} into a stream with 30 % invalid events"
    );
    bad.join().unwrap();
    // Clean events only from here: the share falls under 5 %.
    crate::stream::replay(
        &brokers,
        &topics.raw,
        &[
            "--limit",
            "17000",
            "--rate",
            "2000",
            "--session-prefix",
            "good-",
        ],
    );
    let resolved = prometheus.wait(
        "CartscoreInvalidEventRateHigh",
        false,
        Duration::from_secs(180),
    );
    println!("  and resolved {resolved:?} once the stream was clean");
    let (status, log) = app.stop();
    assert!(status.success(), "{log}");
}

/// Debian's nginx running `conf` (a main file of its own), killed on drop.
struct Nginx(Child);

impl Nginx {
    fn start(dir: &Path, conf: &Path) -> Self {
        let child = Command::new("nginx")
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(conf)
            .args(["-g", "daemon off;"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("nginx.stderr")).unwrap())
            .spawn()
            .expect("Debian's nginx (scripts/test.sh installs nginx-light)");
        Self(child)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// curl over HTTPS trusting `ca`: (status, body).
fn curl(
    ca: &Path,
    method: &str,
    url: &str,
    body: Option<&str>,
    token: Option<&str>,
) -> (u16, String) {
    let mut command = Command::new("curl");
    command
        .args([
            "-s",
            "--max-time",
            "20",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            "-X",
            method,
        ])
        .arg("--cacert")
        .arg(ca)
        .arg(url);
    // The body from a file: a large one would not fit on a command line.
    let file = tempfile::NamedTempFile::new().unwrap();
    if let Some(body) = body {
        std::fs::write(file.path(), body).unwrap();
        command
            .args(["-H", "content-type: application/json", "--data-binary"])
            .arg(format!("@{}", file.path().display()));
    }
    if let Some(token) = token {
        command.args(["-H", &format!("Authorization: Bearer {token}")]);
    }
    let output = command.output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// The shipped `configs/nginx/cartscore.conf` made to run here: the
/// appliance's and MLflow's addresses, a certificate made on the spot,
/// free ports, and the admin allow-list `allow`.
fn render_nginx(
    dir: &Path,
    http: &str,
    mlflow: &str,
    allow_local: bool,
) -> (std::path::PathBuf, u16, u16) {
    let shipped =
        std::fs::read_to_string(repo_root().join("configs/nginx/cartscore.conf")).unwrap();
    let [api, mlflow_port] = free_ports();
    let mut conf = shipped
        .replace("server 127.0.0.1:8080;", &format!("server {http};"))
        .replace("server 127.0.0.1:5000;", &format!("server {mlflow};"))
        .replace("listen 443 ssl;", &format!("listen 127.0.0.1:{api} ssl;"))
        .replace(
            "listen 8443 ssl;",
            &format!("listen 127.0.0.1:{mlflow_port} ssl;"),
        )
        .replace("/etc/ssl/cartscore/", &format!("{}/", dir.display()));
    if !allow_local {
        // This test's client comes from 127.0.0.1: outside the list.
        conf = conf.replace("allow 127.0.0.1;            # this host\n", "");
    }
    let main = format!(
        "pid {dir}/nginx.pid;\nerror_log {dir}/error.log;\nevents {{}}\nhttp {{\n  access_log {dir}/access.log;\n  client_body_temp_path {dir}/body;\n  proxy_temp_path {dir}/proxy;\n  include {dir}/cartscore.conf;\n}}\n",
        dir = dir.display()
    );
    std::fs::write(dir.join("cartscore.conf"), conf).unwrap();
    let path = dir.join("nginx.conf");
    std::fs::write(&path, main).unwrap();
    (path, api, mlflow_port)
}

#[test]
fn the_tls_front_scores_over_https_keeps_admin_to_its_list_and_the_token_still_guards() {
    let work = tempfile::tempdir().unwrap();
    let models = crate::common::model_dir_with_demo(work.path());
    let app = crate::common::Appliance::start(
        work.path(),
        &models,
        &crate::common::Options {
            env: vec![("CARTSCORE_HTTP__ADMIN_TOKEN".into(), "s3cret".into())],
            ..crate::common::Options::default()
        },
    );
    let http = app.http.trim_start_matches("http://").to_owned();
    let mlflow = std::env::var("CARTSCORE_TEST_MLFLOW").ok().map(|u| {
        u.trim_start_matches("http://")
            .trim_end_matches('/')
            .to_owned()
    });
    let tls = work.path().join("tls");
    std::fs::create_dir_all(&tls).unwrap();
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
        ])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        .arg("-keyout")
        .arg(tls.join("key.pem"))
        .arg("-out")
        .arg(tls.join("cert.pem"))
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(made.success(), "openssl could not make a certificate");
    let ca = tls.join("cert.pem");
    for allow_local in [false, true] {
        let dir = tls.join(if allow_local { "allowed" } else { "outside" });
        std::fs::create_dir_all(&dir).unwrap();
        for file in ["cert.pem", "key.pem"] {
            std::fs::copy(tls.join(file), dir.join(file)).unwrap();
        }
        let (conf, api, mlflow_port) = render_nginx(
            &dir,
            &http,
            mlflow.as_deref().unwrap_or("127.0.0.1:9"),
            allow_local,
        );
        let _nginx = Nginx::start(&dir, &conf);
        let base = format!("https://127.0.0.1:{api}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while curl(&ca, "GET", &format!("{base}/healthz"), None, None).0 != 200 {
            assert!(
                Instant::now() < deadline,
                "nginx did not start: {}",
                std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        // A score over HTTPS, the client's address passed on.
        let cart = crate::common::cart_json("tls", 10, 7, 10.0);
        let (status, body) = curl(&ca, "POST", &format!("{base}/v1/score"), Some(&cart), None);
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("\"probability\""), "{body}");
        // Over the size limit: nginx answers before the appliance.
        let big = format!("[{}]", vec![cart.as_str(); 20_000].join(","));
        let (status, _) = curl(&ca, "POST", &format!("{base}/v1/events"), Some(&big), None);
        assert_eq!(status, 413);
        let (status, body) = curl(
            &ca,
            "POST",
            &format!("{base}/admin/reload"),
            None,
            Some("s3cret"),
        );
        if allow_local {
            // Inside the list: the appliance's token still guards it.
            assert_eq!(status, 200, "{body}");
            let (status, body) = curl(&ca, "POST", &format!("{base}/admin/reload"), None, None);
            assert_eq!(status, 401, "{body}");
            assert!(body.contains("unauthorized"), "{body}");
            if mlflow.is_some() {
                let (status, body) = curl(
                    &ca,
                    "GET",
                    &format!(
                        "https://127.0.0.1:{mlflow_port}/api/2.0/mlflow/experiments/search?max_results=1"
                    ),
                    None,
                    None,
                );
                assert_eq!(status, 200, "MLflow through TLS: {body}");
            }
        } else {
            assert_eq!(
                status, 403,
                "outside the allow-list, with the token: {body}"
            );
        }
    }
    let log = std::fs::read_to_string(tls.join("allowed/access.log")).unwrap_or_default();
    assert!(log.contains("POST /v1/score"), "{log}");
    let (status, log) = app.stop();
    assert!(status.success(), "{log}");
}
