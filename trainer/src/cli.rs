//! Command-line interface. Settings come from defaults < `--config` TOML <
//! `CARTSCORE_TRAINER_*` environment < flags.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::lake::{Lake, LakeLoadOptions};
use crate::report::TrainReport;
use crate::source::SourceSpec;
use crate::synth::SynthConfig;
use crate::train::{TrainConfig, TrainRequest};

#[derive(Debug, Parser)]
#[command(
    name = "cartscore-trainer",
    version,
    about = "Offline trainer for the cartscore appliance"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write deterministic synthetic events in the data set's CSV form.
    Synth(SynthArgs),
    /// Replay events, train and tune a model, export the ONNX bundle and reports.
    Train(Box<TrainArgs>),
    /// Score every cart event of the input point-in-time with a bundle.
    Predict(PredictArgs),
    /// Apply the warehouse's SQL migrations (schemas bronze, …) to PostgreSQL.
    Migrate(MigrateArgs),
    /// Load CSV files of the data set into the warehouse (bronze, silver,
    /// dimensions) and/or the S3 lake (hourly Parquet); a file already
    /// loaded, by checksum, adds nothing, and an interrupted lake load resumes.
    Load(LoadArgs),
    /// Copy a bundle from the S3 model registry into an appliance model
    /// folder, atomically.
    Publish(PublishArgs),
    /// Copy the appliance's resolved outcomes (`GET /v1/outcomes`) into the
    /// warehouse's live.outcomes, each exactly once; --follow keeps copying.
    Outcomes(OutcomesArgs),
}

#[derive(Debug, Args)]
struct OutcomesArgs {
    /// The appliance's HTTP API.
    #[arg(
        long,
        env = "CARTSCORE_APPLIANCE_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    appliance: String,
    /// PostgreSQL connection string; the migrations are applied first.
    #[arg(long, env = "CARTSCORE_POSTGRES")]
    postgres: String,
    /// Name of this appliance in live.outcomes (default: its URL).
    #[arg(long)]
    source: Option<String>,
    /// Copy again every N seconds until stopped (0: copy once).
    #[arg(long, default_value_t = 0)]
    follow: u64,
}

#[derive(Debug, Args)]
struct PublishArgs {
    /// The registry: s3://bucket[/prefix] (bundles under models/<version>/).
    #[arg(long, env = "CARTSCORE_REGISTRY")]
    registry: String,
    /// The model version to deliver, or `latest`.
    #[arg(long, default_value = "latest")]
    version: String,
    /// The appliance's model folder.
    #[arg(long)]
    to: PathBuf,
}

#[derive(Debug, Args)]
struct MigrateArgs {
    /// PostgreSQL connection string, e.g. postgres://user:pass@host:5432/db.
    #[arg(long, env = "CARTSCORE_POSTGRES")]
    postgres: String,
}

#[derive(Debug, Args)]
struct LoadArgs {
    /// CSV files of the data set, or folders of them (repeatable).
    #[arg(long = "input", required = true)]
    inputs: Vec<PathBuf>,
    /// PostgreSQL connection string; the migrations are applied first.
    #[arg(long, env = "CARTSCORE_POSTGRES", required_unless_present = "s3")]
    postgres: Option<String>,
    /// The lake: s3://bucket[/prefix]; Parquet goes under events/.
    #[arg(long, env = "CARTSCORE_LAKE")]
    s3: Option<String>,
    /// Rows read between two lake checkpoints.
    #[arg(long, default_value_t = 1_000_000)]
    rows_per_flush: u64,
    /// Test hook: die after N lake flushes, before the next checkpoint.
    #[arg(long, hide = true)]
    interrupt_after_flushes: Option<usize>,
}

#[derive(Debug, Args)]
struct SynthArgs {
    /// Number of events (rows) to write.
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Output CSV file.
    #[arg(long)]
    out: PathBuf,
    /// Also write the oracle purchase probability of every cart event here.
    #[arg(long)]
    oracle: Option<PathBuf>,
    /// Fraction of rows to corrupt on purpose (0..1).
    #[arg(long, default_value_t = 0.0)]
    invalid_rate: f64,
    /// Days over which users first arrive (the data set's 7 months: 213).
    #[arg(long, default_value_t = crate::synth::SPAN_DAYS)]
    days: i64,
    /// A session step's chance to cart the product just viewed.
    #[arg(long, default_value_t = crate::synth::CART_RATE)]
    cart_rate: f64,
}

#[derive(Debug, Args)]
struct TrainArgs {
    /// Where the events come from: CSV or Parquet files or folders
    /// (repeatable), `postgres://…` (the warehouse's silver.events; the
    /// feature rows are written back to gold) or `s3://bucket/events/…`
    /// (the lake's Parquet).
    #[arg(long = "source", visible_alias = "input", required = true)]
    sources: Vec<String>,
    /// Output folder for model.onnx, report.json and report.txt.
    #[arg(long)]
    out: PathBuf,
    /// TOML file with any TrainConfig field.
    #[arg(long, env = "CARTSCORE_TRAINER_CONFIG")]
    config: Option<PathBuf>,
    /// Oracle probabilities written by `synth --oracle`, to report the best reachable AUC.
    #[arg(long)]
    oracle: Option<PathBuf>,
    /// Version string for the bundle; default: derived from the data and the model.
    #[arg(long)]
    model_version: Option<String>,
    /// Also write the test window's rows and probabilities to test_rows.csv.
    #[arg(long)]
    write_test_rows: bool,
    /// Deliver the bundle into this model folder (the appliance's
    /// `model.dir`) as `model-<version>.onnx`, atomically: written under a
    /// hidden temporary name in the same folder, then renamed.
    #[arg(long)]
    publish: Option<PathBuf>,
    /// Also publish the bundle and reports to the S3 registry
    /// s3://bucket[/prefix], under models/<version>/.
    #[arg(long, env = "CARTSCORE_REGISTRY")]
    registry: Option<String>,
    /// Log the run to this MLflow tracking server and register the bundle
    /// (alias `champion`).
    #[arg(long, env = "CARTSCORE_MLFLOW_URL")]
    mlflow_url: Option<String>,
    #[arg(long, default_value = "cartscore")]
    mlflow_experiment: String,
    /// Registered model name in MLflow.
    #[arg(long, default_value = "cartscore")]
    mlflow_model: String,
    #[arg(long, env = "CARTSCORE_TRAINER_TRIALS")]
    trials: Option<usize>,
    #[arg(long, env = "CARTSCORE_TRAINER_THREADS")]
    threads: Option<usize>,
    #[arg(long, env = "CARTSCORE_TRAINER_SEED")]
    seed: Option<u64>,
    #[arg(long, env = "CARTSCORE_TRAINER_MAX_ITERATIONS")]
    max_iterations: Option<u32>,
    /// Most training rows a search trial trains on; a larger window is
    /// sampled for the search and the winner trained again on all of it
    /// (0: search on every row).
    #[arg(long, env = "CARTSCORE_TRAINER_TUNE_ROWS")]
    tune_rows: Option<usize>,
    /// Largest tolerated share of invalid input rows (0..1).
    #[arg(long, env = "CARTSCORE_TRAINER_ERROR_BUDGET")]
    error_budget: Option<f64>,
}

#[derive(Debug, Args)]
struct PredictArgs {
    #[arg(long = "input", required = true)]
    inputs: Vec<PathBuf>,
    /// The bundle (.onnx) to score with.
    #[arg(long)]
    model: PathBuf,
    /// Output CSV.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 0.05)]
    error_budget: f64,
    /// Write each feature's exact TreeSHAP contribution (log-odds) and the
    /// base value beside each score, as the appliance's `explain=true` does.
    #[arg(long)]
    explain: bool,
    /// With --explain: LightGBM's model text of the bundle (`lightgbm.txt`
    /// beside the trainer's `model.onnx`); every row's contributions must
    /// equal LightGBM's own within 1e-5.
    #[arg(long, requires = "explain")]
    lightgbm: Option<PathBuf>,
}

impl TrainArgs {
    fn config(&self) -> Result<TrainConfig> {
        let mut config = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("failed to read config {}", path.display()))?;
                toml::from_str(&text)
                    .with_context(|| format!("invalid config {}", path.display()))?
            }
            None => TrainConfig::default(),
        };
        if let Some(v) = self.trials {
            config.trials = v;
        }
        if let Some(v) = self.threads {
            config.threads = v;
        }
        if let Some(v) = self.seed {
            config.seed = v;
        }
        if let Some(v) = self.max_iterations {
            config.max_iterations = v;
        }
        if let Some(v) = self.error_budget {
            config.error_budget = v;
        }
        if let Some(v) = self.tune_rows {
            config.tune_rows = v;
        }
        config.validate()?;
        Ok(config)
    }
}

impl Cli {
    pub fn run(self) -> Result<()> {
        match self.command {
            Command::Synth(args) => {
                anyhow::ensure!(
                    (0.0..1.0).contains(&args.invalid_rate),
                    "--invalid-rate must be in [0, 1)"
                );
                let started = Instant::now();
                let summary = crate::synth::run(
                    SynthConfig {
                        events: args.events,
                        seed: args.seed,
                        invalid_rate: args.invalid_rate,
                        span_days: args.days,
                        cart_rate: args.cart_rate,
                    },
                    &args.out,
                    args.oracle.as_deref(),
                )?;
                let seconds = started.elapsed().as_secs_f64();
                eprintln!(
                    "wrote {} events to {} in {seconds:.2} s ({:.0} events/s): {} views, {} carts, {} removes, {} purchases, {} invalid; {} users, {} sessions",
                    summary.events,
                    args.out.display(),
                    summary.events as f64 / seconds,
                    summary.views,
                    summary.carts,
                    summary.removes,
                    summary.purchases,
                    summary.invalid,
                    summary.users,
                    summary.sessions
                );
            }
            Command::Train(args) => {
                let request = TrainRequest {
                    config: args.config()?,
                    source: SourceSpec::parse(&args.sources)?,
                    out: args.out.clone(),
                    oracle: args.oracle.clone(),
                    model_version: args.model_version.clone(),
                    write_test_rows: args.write_test_rows,
                };
                let report = crate::train::run(&request).context("training failed")?;
                print!("{}", report.text());
                deliver_trained(&args, &report)?;
            }
            Command::Migrate(args) => {
                let mut warehouse = crate::warehouse::Warehouse::connect(&args.postgres)?;
                let applied = warehouse.migrate().context("migration failed")?;
                println!(
                    "{}",
                    serde_json::json!({"applied": applied, "known": crate::warehouse::MIGRATIONS.len()})
                );
            }
            Command::Load(args) => println!("{}", load(&args)?),
            Command::Outcomes(args) => {
                let mut warehouse = crate::warehouse::Warehouse::connect(&args.postgres)?;
                warehouse.migrate().context("migration failed")?;
                let source = args.source.as_deref().unwrap_or(&args.appliance);
                loop {
                    let copied = crate::outcomes::copy(&mut warehouse, &args.appliance, source)
                        .with_context(|| {
                            format!("failed to copy the outcomes of {}", args.appliance)
                        });
                    match copied {
                        Ok(summary) => println!("{}", serde_json::to_string(&summary)?),
                        // Following, an appliance that restarts is waited for.
                        Err(e) if args.follow > 0 => {
                            eprintln!("{e:#}; retrying in {} s", args.follow)
                        }
                        Err(e) => return Err(e),
                    }
                    if args.follow == 0 {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_secs(args.follow));
                }
            }
            Command::Publish(args) => {
                let lake = Lake::open(&args.registry)?;
                let temp = incoming(&args.to);
                let version = lake.fetch_model(&args.version, &temp).with_context(|| {
                    format!("failed to fetch {} from {}", args.version, args.registry)
                })?;
                let published = deliver(&temp, &args.to)?;
                println!("published {version} as {}", published.display());
            }
            Command::Predict(args) => {
                let explain = crate::predict::Explain {
                    enabled: args.explain,
                    lightgbm: args.lightgbm.clone(),
                };
                let summary = crate::predict::run(
                    &args.inputs,
                    &args.model,
                    &args.out,
                    args.error_budget,
                    &explain,
                )
                .context("prediction failed")?;
                println!(
                    "scored {} cart events of {} events ({} invalid rows skipped) into {}",
                    summary.carts,
                    summary.events,
                    summary.invalid,
                    args.out.display()
                );
                if let Some(diff) = summary.lightgbm_max_diff {
                    println!(
                        "contributions equal LightGBM's predict_contrib on every row: max |diff| {diff:e}"
                    );
                }
            }
        }
        Ok(())
    }
}

/// `load`: into the warehouse and/or the lake; returns the JSON summary.
fn load(args: &LoadArgs) -> Result<serde_json::Value> {
    let files: Vec<PathBuf> = crate::files::list_inputs(&args.inputs)?
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "csv"))
        .collect();
    anyhow::ensure!(!files.is_empty(), "no CSV files in {:?}", args.inputs);
    let mut summary = serde_json::json!({});
    if let Some(url) = &args.postgres {
        let mut warehouse = crate::warehouse::Warehouse::connect(url)?;
        warehouse.migrate().context("migration failed")?;
        let started = Instant::now();
        let loads = warehouse
            .load(&files)
            .context("load into the warehouse failed")?;
        let rows = loads.iter().map(|l| l.rows).sum();
        let mut done = load_summary(&loads, rows, started);
        done["bronze_rows"] = warehouse.bronze_rows()?.into();
        for (key, table) in [
            ("silver_rows", "silver.events"),
            ("rejects", "silver.rejects"),
            ("duplicates", "silver.duplicates"),
        ] {
            let what = format!("counting {table}");
            done[key] = warehouse
                .count(&format!("SELECT count(*) FROM {table}"), &what)?
                .into();
        }
        summary["postgres"] = done;
    }
    if let Some(url) = &args.s3 {
        let lake = Lake::open(url)?;
        let started = Instant::now();
        let loads = lake
            .load(
                &files,
                &LakeLoadOptions {
                    rows_per_flush: args.rows_per_flush.max(1),
                    interrupt_after_flushes: args.interrupt_after_flushes,
                },
            )
            .with_context(|| format!("load into the lake {url} failed"))?;
        let rows = loads.iter().map(|l| l.rows).sum();
        summary["s3"] = load_summary(&loads, rows, started);
    }
    Ok(summary)
}

/// The files of a load with its rate.
fn load_summary(files: &impl serde::Serialize, rows: u64, started: Instant) -> serde_json::Value {
    let seconds = started.elapsed().as_secs_f64();
    serde_json::json!({
        "files": files,
        "rows_loaded": rows,
        "seconds": seconds,
        "rows_per_second": rows as f64 / seconds.max(1e-9),
    })
}

/// After training: the model folder, the S3 registry, MLflow.
fn deliver_trained(args: &TrainArgs, report: &TrainReport) -> Result<()> {
    let version = report.model_version.as_str();
    if let Some(dir) = &args.publish {
        let temp = incoming(dir);
        std::fs::copy(args.out.join("model.onnx"), &temp)
            .with_context(|| format!("failed to copy the bundle to {}", temp.display()))?;
        let published = deliver(&temp, dir)?;
        println!("published {}", published.display());
    }
    if let Some(url) = &args.registry {
        let keys = Lake::open(url)?
            .publish_model(version, &args.out)
            .with_context(|| format!("failed to publish {version} to the registry {url}"))?;
        println!("registry: {}", keys.join(" "));
    }
    if let Some(url) = &args.mlflow_url {
        let run = crate::mlflow::Mlflow::new(url)
            .log_training(
                &args.mlflow_experiment,
                &args.mlflow_model,
                report,
                &args.out,
            )
            .with_context(|| format!("failed to log the run to MLflow at {url}"))?;
        println!(
            "mlflow: run {} in experiment {}, registered {} version {} as @{}",
            run.run_id, run.experiment_id, run.registered_model, run.model_version, run.alias
        );
    }
    Ok(())
}

/// A hidden name in the model folder (the appliance ignores dot-files).
fn incoming(dir: &Path) -> PathBuf {
    dir.join(format!(".incoming-{}.onnx.tmp", std::process::id()))
}

/// Moves a bundle written under a hidden name in the model folder to its
/// final name, so a watcher never sees a partial file: it must be a bundle
/// of this contract, and it is synced before the rename.
fn deliver(temp: &Path, dir: &Path) -> Result<PathBuf> {
    let checked = cartscore_core::BundleMetadata::read_file(temp)
        .map_err(anyhow::Error::from)
        .and_then(|(_, metadata)| {
            metadata.check_contract()?;
            Ok(metadata)
        });
    let metadata = match checked {
        Ok(metadata) => metadata,
        Err(err) => {
            let _ = std::fs::remove_file(temp);
            return Err(err.context("refusing to publish: not a usable bundle"));
        }
    };
    let safe: String = metadata
        .model_version
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let target = dir.join(format!("model-{safe}.onnx"));
    std::fs::File::open(temp)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("failed to sync {}", temp.display()))?;
    std::fs::rename(temp, &target).with_context(|| {
        format!(
            "failed to rename {} to {}",
            temp.display(),
            target.display()
        )
    })?;
    Ok(target)
}
