//! `cartscore [serve]`, `cartscore validate` and `cartscore inspect`.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use serde::Serialize;

use crate::config::{ApplianceConfig, LogFormat, Overrides};
use crate::store::{Store, StoreDigest, StoreStats, StreamOffset};

#[derive(Debug, Parser)]
#[command(
    name = "cartscore",
    version,
    about = "Scores add-to-cart events from live session state (run without arguments for the embedded defaults)"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    settings: Settings,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the appliance (the default).
    Serve,
    /// Check the configuration and the model folder, then exit: 0 when both
    /// are good. systemd runs this before a start and a reload.
    Validate,
    /// Print the store's counts, stream offsets and a digest of all live
    /// state as JSON (two stores with the same digest hold the same state).
    /// Safe while the appliance runs: it reads a snapshot.
    Inspect {
        /// Digest what is live at this event time (µs since the epoch)
        /// instead of at the store's watermark: shards each have their own
        /// watermark, and their digests add up only at a common one.
        #[arg(long)]
        as_of_micros: Option<i64>,
    },
}

/// Global: accepted before or after the subcommand.
#[derive(Debug, Clone, Default, Args)]
struct Settings {
    /// TOML config file; without it the embedded defaults apply.
    #[arg(long, env = "CARTSCORE_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(flatten)]
    overrides: Overrides,
}

impl Settings {
    fn load(&self) -> Result<ApplianceConfig> {
        Ok(ApplianceConfig::load(
            self.config.as_deref(),
            &self.overrides,
        )?)
    }
}

/// Colour only for a person at a terminal: not in a file or the journal,
/// and never with `NO_COLOR` set (no-color.org).
pub fn colour_logs() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

fn init_logging(config: &ApplianceConfig) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log.filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour_logs())
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

impl Cli {
    pub fn run(self) -> Result<()> {
        let config = self.settings.load()?;
        match self.command.unwrap_or(Command::Serve) {
            Command::Serve => serve(config),
            Command::Validate => validate(&config),
            Command::Inspect { as_of_micros } => inspect(&config, as_of_micros),
        }
    }
}

fn serve(config: ApplianceConfig) -> Result<()> {
    init_logging(&config);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.http.workers.get())
        .thread_name("http")
        .enable_all()
        .build()
        .context("failed to start the async runtime")?
        .block_on(crate::app::run(config))
}

fn validate(config: &ApplianceConfig) -> Result<()> {
    println!("configuration is valid");
    let (model, file) = crate::app::newest_valid_model(config).with_context(|| {
        format!(
            "model folder {} has no servable bundle",
            config.model.dir.display()
        )
    })?;
    println!(
        "model folder {}: {} would serve version {} ({} evaluator, {} trees, verified on {} rows, max diff {:e})",
        config.model.dir.display(),
        file.path.display(),
        model.version(),
        model.evaluator_name(),
        model.trees,
        model.verified_rows,
        model.verified_max_diff
    );
    Ok(())
}

/// What `cartscore inspect` prints.
#[derive(Debug, Serialize)]
struct Inspection<'a> {
    path: &'a std::path::Path,
    stats: StoreStats,
    digest: StoreDigest,
    offsets: Vec<StreamOffset>,
}

fn inspect(config: &ApplianceConfig, as_of_micros: Option<i64>) -> Result<()> {
    let store = Store::open_existing(&config.store).context("failed to open the store")?;
    let inspection = Inspection {
        path: &config.store.path,
        stats: store.stats().context("failed to read store statistics")?,
        digest: store
            .digest_at(as_of_micros)
            .context("failed to digest the store")?,
        offsets: store.offsets().context("failed to read stream offsets")?,
    };
    println!("{}", serde_json::to_string(&inspection)?);
    Ok(())
}
