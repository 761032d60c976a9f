//! `cartscore-trainer`: synthetic data, training and offline scoring.

use anyhow::Result;
use clap::Parser;

mod cli;
mod export;
mod gbdt;
mod lake;
mod metrics;
mod mlflow;
mod parallel;
mod predict;
mod replay;
mod report;
mod source;
mod synth;
mod train;
mod warehouse;

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CARTSCORE_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    cli::Cli::parse().run()
}
