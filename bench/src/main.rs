//! `cartscore-bench`: load tools for the appliance. `replay` produces the
//! data set's events to Kafka; `freshness` measures how soon a produced event
//! is readable over HTTP.

mod freshness;
mod kafka;
mod replay;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Produce CSV events (the data set or trainer synth output) to a topic.
    Replay(replay::ReplayArgs),
    /// Produce at a fixed rate and time produce-to-visible in GET /v1/sessions/{id}.
    Freshness(freshness::FreshnessArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Replay(args) => replay::run(&args),
        Command::Freshness(args) => freshness::run(&args),
    }
}
