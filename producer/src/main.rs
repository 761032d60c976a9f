//! `cartscore-producer`: the event producer of the original stack, done
//! properly. `replay` sends the data set's CSV rows to a Kafka topic;
//! `freshness` produces at a fixed rate with probe events mixed in and
//! measures how soon each is visible in an appliance's state; `drain` reads
//! a topic's backlog as fast as the broker serves it; `http` replays events
//! into an appliance over HTTP, scoring each cart before it is ingested.

mod drain;
mod freshness;
mod http;
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
    /// Produce to Kafka at a fixed rate; measure applied events/s and produce-to-visible.
    #[command(visible_alias = "ingest")]
    Freshness(freshness::FreshnessArgs),
    /// Read a topic from its start to its current end; report events/s.
    Drain(drain::DrainArgs),
    /// Replay CSV events into an appliance over HTTP, scoring every cart first.
    Http(http::HttpArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Replay(args) => replay::run(&args),
        Command::Freshness(args) => freshness::run(&args),
        Command::Drain(args) => drain::run(&args),
        Command::Http(args) => http::run(&args),
    }
}
