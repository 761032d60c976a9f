//! `cartscore [serve]`, `cartscore validate` and `cartscore inspect`.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::config::{ApplianceConfig, CliOverrides, LogFormat};

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
    Serve(Settings),
    /// Check the configuration and the model folder, then exit: 0 when both
    /// are good. systemd runs this before a start and a reload.
    Validate(Settings),
    /// Print the store's counts, stream offsets and a digest of all live
    /// state as JSON (two stores with the same digest hold the same state).
    /// Safe while the appliance runs: it reads a snapshot.
    Inspect(Settings),
}

#[derive(Debug, Clone, Default, Args)]
struct Settings {
    /// TOML config file; without it the embedded defaults apply.
    #[arg(long, env = "CARTSCORE_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Override http.listen.
    #[arg(long, global = true)]
    http_listen: Option<SocketAddr>,
    /// Override tcp.listen.
    #[arg(long, global = true)]
    tcp_listen: Option<SocketAddr>,
    /// Override store.path.
    #[arg(long, global = true)]
    store_path: Option<PathBuf>,
    /// Override model.dir.
    #[arg(long, global = true)]
    model_dir: Option<PathBuf>,
}

impl Settings {
    fn load(&self) -> Result<ApplianceConfig> {
        let overrides = CliOverrides {
            http_listen: self.http_listen,
            tcp_listen: self.tcp_listen,
            store_path: self.store_path.clone(),
            model_dir: self.model_dir.clone(),
        };
        Ok(ApplianceConfig::load(self.config.as_deref(), &overrides)?)
    }

    /// Subcommand flags win over the ones given before the subcommand.
    fn or(self, outer: Settings) -> Settings {
        Settings {
            config: self.config.or(outer.config),
            http_listen: self.http_listen.or(outer.http_listen),
            tcp_listen: self.tcp_listen.or(outer.tcp_listen),
            store_path: self.store_path.or(outer.store_path),
            model_dir: self.model_dir.or(outer.model_dir),
        }
    }
}

fn init_logging(config: &ApplianceConfig) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log.filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

impl Cli {
    pub fn run(self) -> Result<()> {
        match self.command {
            None => serve(self.settings),
            Some(Command::Serve(settings)) => serve(settings.or(self.settings)),
            Some(Command::Validate(settings)) => validate(settings.or(self.settings)),
            Some(Command::Inspect(settings)) => inspect(settings.or(self.settings)),
        }
    }
}

fn serve(settings: Settings) -> Result<()> {
    let config = settings.load()?;
    init_logging(&config);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.http.workers)
        .thread_name("http")
        .enable_all()
        .build()
        .context("failed to start the async runtime")?
        .block_on(crate::app::run(config))
}

fn validate(settings: Settings) -> Result<()> {
    let config = settings.load()?;
    println!("configuration is valid");
    let model = crate::app::newest_valid_model(&config).with_context(|| {
        format!(
            "model folder {} has no servable bundle",
            config.model.dir.display()
        )
    })?;
    println!(
        "model folder {}: {} would serve version {} ({} evaluator, {} trees, verified on {} rows, max diff {:e})",
        config.model.dir.display(),
        model.file.path.display(),
        model.version(),
        model.evaluator_name(),
        model.trees,
        model.verified_rows,
        model.verified_max_diff
    );
    Ok(())
}

fn inspect(settings: Settings) -> Result<()> {
    let config = settings.load()?;
    let store = crate::store::Store::open(&config.store).context("failed to open the store")?;
    let stats = store.stats().context("failed to read store statistics")?;
    let digest = store.digest().context("failed to digest the store")?;
    let offsets = store.offsets().context("failed to read stream offsets")?;
    println!(
        "{}",
        serde_json::json!({
            "path": config.store.path,
            "stats": stats,
            "digest": digest,
            "offsets": offsets,
        })
    );
    Ok(())
}
