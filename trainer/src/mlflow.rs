//! Logging a training run to MLflow over its REST API (no Python client):
//! experiment, run, params, metrics, the bundle and reports as artifacts
//! (through the server's artifact proxy), a registered model version, and
//! the `champion` alias on it.

use std::path::Path;

use serde_json::{Value, json};

use crate::report::TrainReport;

#[derive(Debug, thiserror::Error)]
pub enum MlflowError {
    #[error("MLflow {what} at {url} failed: {reason}")]
    Request {
        what: &'static str,
        url: String,
        reason: String,
    },
    #[error("cannot read artifact {path}: {source}")]
    Artifact {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// What was recorded, for the report and the console.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MlflowRun {
    pub experiment_id: String,
    pub run_id: String,
    pub artifact_uri: String,
    pub registered_model: String,
    pub model_version: String,
    pub alias: &'static str,
}

#[derive(Debug)]
pub struct Mlflow {
    base: String,
    agent: ureq::Agent,
}

pub const CHAMPION: &str = "champion";

impl Mlflow {
    pub fn new(base: &str) -> Self {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(std::time::Duration::from_secs(60)))
            .http_status_as_error(false)
            .build()
            .new_agent();
        Self {
            base: base.trim_end_matches('/').to_owned(),
            agent,
        }
    }

    fn fail(&self, what: &'static str, path: &str, reason: impl ToString) -> MlflowError {
        MlflowError::Request {
            what,
            url: format!("{}{path}", self.base),
            reason: reason.to_string(),
        }
    }

    /// POSTs JSON; returns the status and the decoded body.
    fn post(
        &self,
        what: &'static str,
        path: &str,
        body: &Value,
    ) -> Result<(u16, Value), MlflowError> {
        let url = format!("{}{path}", self.base);
        self.answer(what, path, self.agent.post(&url).send_json(body))
    }

    /// The status and body of an answer: JSON, or the text when it is not.
    fn answer(
        &self,
        what: &'static str,
        path: &str,
        sent: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<(u16, Value), MlflowError> {
        let mut response = sent.map_err(|e| self.fail(what, path, e))?;
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .read_to_string()
            .map_err(|e| self.fail(what, path, e))?;
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok((status, value))
    }

    /// POSTs JSON and requires a 2xx answer.
    fn call(&self, what: &'static str, path: &str, body: &Value) -> Result<Value, MlflowError> {
        match self.post(what, path, body)? {
            (200..=299, value) => Ok(value),
            (status, value) => Err(self.fail(what, path, format!("HTTP {status}: {value}"))),
        }
    }

    fn experiment_id(&self, name: &str) -> Result<String, MlflowError> {
        let path = "/api/2.0/mlflow/experiments/get-by-name";
        let url = format!("{}{path}", self.base);
        let sent = self.agent.get(&url).query("experiment_name", name).call();
        match self.answer("experiment lookup", path, sent)? {
            (200, Value::String(text)) => {
                return Err(self.fail("experiment lookup", path, format!("not JSON: {text}")));
            }
            (200, value) => {
                if let Some(id) = value["experiment"]["experiment_id"].as_str() {
                    return Ok(id.to_owned());
                }
            }
            (404, _) => {}
            (status, value) => {
                return Err(self.fail(
                    "experiment lookup",
                    path,
                    format!("HTTP {status}: {value}"),
                ));
            }
        }
        let created = self.call(
            "experiment creation",
            "/api/2.0/mlflow/experiments/create",
            &json!({ "name": name }),
        )?;
        created["experiment_id"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| {
                self.fail(
                    "experiment creation",
                    "/api/2.0/mlflow/experiments/create",
                    created,
                )
            })
    }

    /// Uploads one file through the server's artifact proxy.
    fn upload(&self, artifact_uri: &str, name: &str, file: &Path) -> Result<(), MlflowError> {
        let bytes = std::fs::read(file).map_err(|source| MlflowError::Artifact {
            path: file.into(),
            source,
        })?;
        let relative = artifact_uri
            .strip_prefix("mlflow-artifacts:")
            .unwrap_or(artifact_uri)
            .trim_start_matches('/');
        let path = format!("/api/2.0/mlflow-artifacts/artifacts/{relative}/{name}");
        let url = format!("{}{path}", self.base);
        let response = self
            .agent
            .put(&url)
            .header("Content-Type", "application/octet-stream")
            .send(&bytes[..])
            .map_err(|e| self.fail("artifact upload", &path, e))?;
        let status = response.status().as_u16();
        if !(200..300).contains(&status) {
            return Err(self.fail("artifact upload", &path, format!("HTTP {status}")));
        }
        Ok(())
    }

    /// Records a finished training run whose bundle and reports are in `out`.
    pub fn log_training(
        &self,
        experiment: &str,
        registered_model: &str,
        report: &TrainReport,
        out: &Path,
    ) -> Result<MlflowRun, MlflowError> {
        let experiment_id = self.experiment_id(experiment)?;
        let now = chrono::Utc::now().timestamp_millis();
        let version = report.model_version.as_str();
        let created = self.call(
            "run creation",
            "/api/2.0/mlflow/runs/create",
            &json!({
                "experiment_id": experiment_id,
                "run_name": version,
                "start_time": now,
                "tags": [
                    { "key": "cartscore.model_version", "value": version },
                    { "key": "cartscore.data_fingerprint", "value": report.data_fingerprint },
                    { "key": "mlflow.source.name", "value": "cartscore-trainer" },
                ],
            }),
        )?;
        let info = &created["run"]["info"];
        let run_id = info["run_id"].as_str().unwrap_or_default().to_owned();
        let artifact_uri = info["artifact_uri"].as_str().unwrap_or_default().to_owned();
        if run_id.is_empty() || artifact_uri.is_empty() {
            return Err(self.fail("run creation", "/api/2.0/mlflow/runs/create", created));
        }

        let tuning = &report.tuning;
        let mut params = vec![
            param("contract_version", report.contract_version),
            param("data_fingerprint", &report.data_fingerprint),
            param("best_trial", tuning.best.index),
            // The whole search, as MLflow shows a long parameter: JSON text.
            param(
                "trials",
                serde_json::to_value(&tuning.trials).unwrap_or_default(),
            ),
        ];
        if let Value::Object(best) = serde_json::to_value(&tuning.best.params).unwrap_or_default() {
            for (key, value) in best {
                params.push(param(&key, value));
            }
        }
        let metric = |key: String, value: f64| Metric {
            key,
            value,
            timestamp: now,
            step: 0,
        };
        let mut metrics = Vec::new();
        for (window, evaluation) in [("test", &report.test), ("validation", &report.validation)] {
            let s = &evaluation.scores;
            for (name, value) in [
                ("roc_auc", s.roc_auc),
                ("pr_auc", s.pr_auc),
                ("log_loss", s.log_loss),
                ("brier", s.brier),
            ] {
                metrics.push(metric(format!("{window}_{name}"), value));
            }
        }
        for (name, baseline) in report.baselines.named() {
            metrics.push(metric(format!("baseline_{name}_roc_auc"), baseline.roc_auc));
        }
        for (key, value) in [
            ("train_rows", report.rows.train as f64),
            ("cart_examples", report.replay.cart_examples as f64),
            ("events", report.replay.events as f64),
            ("total_seconds", report.timings.total_seconds),
        ] {
            metrics.push(metric(key.to_owned(), value));
        }
        // MLflow takes only numbers; an undefined score (one class) is left out.
        metrics.retain(|m| m.value.is_finite());
        self.call(
            "logging params and metrics",
            "/api/2.0/mlflow/runs/log-batch",
            &json!({ "run_id": run_id, "params": params, "metrics": metrics }),
        )?;

        self.upload(&artifact_uri, "model/model.onnx", &out.join("model.onnx"))?;
        self.upload(&artifact_uri, "report.json", &out.join("report.json"))?;
        self.upload(&artifact_uri, "report.txt", &out.join("report.txt"))?;
        self.call(
            "run completion",
            "/api/2.0/mlflow/runs/update",
            &json!({ "run_id": run_id, "status": "FINISHED", "end_time": chrono::Utc::now().timestamp_millis() }),
        )?;

        match self.post(
            "model registration",
            "/api/2.0/mlflow/registered-models/create",
            &json!({ "name": registered_model }),
        )? {
            (200..=299, _) => {}
            (_, value) if value["error_code"] == "RESOURCE_ALREADY_EXISTS" => {}
            (status, value) => {
                return Err(self.fail(
                    "model registration",
                    "/api/2.0/mlflow/registered-models/create",
                    format!("HTTP {status}: {value}"),
                ));
            }
        }
        let registered = self.call(
            "model version creation",
            "/api/2.0/mlflow/model-versions/create",
            &json!({
                "name": registered_model,
                "source": format!("{artifact_uri}/model"),
                "run_id": run_id,
                "description": format!("cartscore bundle {version}"),
                "tags": [{ "key": "cartscore.model_version", "value": version }],
            }),
        )?;
        let model_version = registered["model_version"]["version"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| {
                self.fail(
                    "model version creation",
                    "/api/2.0/mlflow/model-versions/create",
                    &registered,
                )
            })?;
        self.call(
            "setting the champion alias",
            "/api/2.0/mlflow/registered-models/alias",
            &json!({ "name": registered_model, "alias": CHAMPION, "version": model_version }),
        )?;
        Ok(MlflowRun {
            experiment_id,
            run_id,
            artifact_uri,
            registered_model: registered_model.to_owned(),
            model_version,
            alias: CHAMPION,
        })
    }
}

/// A run parameter: MLflow takes every value as text.
#[derive(Debug, serde::Serialize)]
struct Param {
    key: String,
    value: String,
}

fn param(key: &str, value: impl std::fmt::Display) -> Param {
    Param {
        key: key.to_owned(),
        value: value.to_string(),
    }
}

#[derive(Debug, serde::Serialize)]
struct Metric {
    key: String,
    value: f64,
    timestamp: i64,
    step: i64,
}
