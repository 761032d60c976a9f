//! `cartscore-trainer`: synthetic data, training and offline scoring, the
//! warehouse and lake loaders, and model publishing. By the data: [`synth`]
//! makes events; [`files`], [`warehouse`] and [`lake`] hold them, and
//! [`source`] reads any of them in time order; [`replay`] folds them through
//! `core` into cart examples; [`train`] ([`gbdt`], [`metrics`], [`export`])
//! turns those into a bundle and a [`report`]; [`predict`] scores offline;
//! [`mlflow`] and the lake's registry record and publish the result.

use anyhow::Result;
use clap::Parser;

mod cli;
mod export;
mod files;
mod gbdt;
mod lake;
mod metrics;
mod mlflow;
mod outcomes;
mod parallel;
mod predict;
mod replay;
mod report;
mod source;
mod synth;
mod train;
mod warehouse;

fn main() -> Result<()> {
    use std::io::IsTerminal;
    // Colour only for a person at a terminal, never with NO_COLOR set.
    let colour = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CARTSCORE_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(colour)
        .with_writer(std::io::stderr)
        .init();
    cli::Cli::parse().run()
}
