//! Command-line interface. Settings come from defaults < `--config` TOML <
//! `CARTSCORE_TRAINER_*` environment < flags.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

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
    Train(TrainArgs),
    /// Score every cart event of the input point-in-time with a bundle.
    Predict(PredictArgs),
    /// Apply the warehouse's SQL migrations (schemas bronze, …) to PostgreSQL.
    Migrate(MigrateArgs),
    /// Load CSV files of the data set into the warehouse's bronze.events
    /// (COPY; a file already loaded, by checksum, adds nothing).
    Load(LoadArgs),
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
    #[arg(long, env = "CARTSCORE_POSTGRES")]
    postgres: String,
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
}

#[derive(Debug, Args)]
struct TrainArgs {
    /// CSV or Parquet files, or folders of them (repeatable).
    #[arg(long = "input", required = true)]
    inputs: Vec<PathBuf>,
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
    #[arg(long, env = "CARTSCORE_TRAINER_TRIALS")]
    trials: Option<usize>,
    #[arg(long, env = "CARTSCORE_TRAINER_THREADS")]
    threads: Option<usize>,
    #[arg(long, env = "CARTSCORE_TRAINER_SEED")]
    seed: Option<u64>,
    #[arg(long, env = "CARTSCORE_TRAINER_MAX_ITERATIONS")]
    max_iterations: Option<u32>,
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
                    },
                    &args.out,
                    args.oracle.as_deref(),
                )?;
                let seconds = started.elapsed().as_secs_f64();
                println!(
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
                let publish = args.publish.clone();
                let request = TrainRequest {
                    config: args.config()?,
                    inputs: args.inputs,
                    out: args.out.clone(),
                    oracle: args.oracle,
                    model_version: args.model_version,
                    write_test_rows: args.write_test_rows,
                };
                let report = crate::train::run(&request).context("training failed")?;
                print!("{}", crate::report::text(&report));
                if let Some(dir) = publish {
                    let published = publish_bundle(&args.out.join("model.onnx"), &dir)?;
                    println!("published {}", published.display());
                }
            }
            Command::Migrate(args) => {
                let mut warehouse = crate::warehouse::Warehouse::connect(&args.postgres)?;
                let applied = warehouse.migrate().context("migration failed")?;
                println!(
                    "{}",
                    serde_json::json!({"applied": applied, "known": crate::warehouse::MIGRATIONS.len()})
                );
            }
            Command::Load(args) => {
                let files: Vec<PathBuf> = crate::source::list_inputs(&args.inputs)?
                    .into_iter()
                    .filter(|p| p.extension().is_some_and(|e| e == "csv"))
                    .collect();
                anyhow::ensure!(!files.is_empty(), "no CSV files in {:?}", args.inputs);
                let mut warehouse = crate::warehouse::Warehouse::connect(&args.postgres)?;
                warehouse.migrate().context("migration failed")?;
                let started = Instant::now();
                let loads = warehouse
                    .load_bronze(&files)
                    .context("load into bronze.events failed")?;
                let rows: u64 = loads.iter().map(|l| l.rows).sum();
                let seconds = started.elapsed().as_secs_f64();
                println!(
                    "{}",
                    serde_json::json!({
                        "files": loads,
                        "rows_loaded": rows,
                        "seconds": seconds,
                        "rows_per_second": rows as f64 / seconds.max(1e-9),
                        "bronze_rows": warehouse.bronze_rows()?,
                    })
                );
            }
            Command::Predict(args) => {
                let summary =
                    crate::predict::run(&args.inputs, &args.model, &args.out, args.error_budget)
                        .context("prediction failed")?;
                println!(
                    "scored {} cart events of {} events ({} invalid rows skipped) into {}",
                    summary.carts,
                    summary.events,
                    summary.invalid,
                    args.out.display()
                );
            }
        }
        Ok(())
    }
}

/// Copies a bundle into a model folder so that a watcher never sees a
/// partial file: a dot-name (ignored by the appliance) in the same folder,
/// synced, then renamed to its final name.
fn publish_bundle(bundle: &std::path::Path, dir: &std::path::Path) -> Result<PathBuf> {
    let (_, metadata) = cartscore_core::BundleMetadata::read_file(bundle)
        .with_context(|| format!("failed to read the bundle {}", bundle.display()))?;
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
    let temp = dir.join(format!(".model-{safe}.onnx.tmp"));
    std::fs::copy(bundle, &temp)
        .with_context(|| format!("failed to copy {} to {}", bundle.display(), temp.display()))?;
    std::fs::File::open(&temp)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("failed to sync {}", temp.display()))?;
    std::fs::rename(&temp, &target).with_context(|| {
        format!(
            "failed to rename {} to {}",
            temp.display(),
            target.display()
        )
    })?;
    Ok(target)
}
