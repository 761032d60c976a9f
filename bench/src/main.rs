//! `cartscore-bench`: the appliance's load and latency harness. Latency
//! modes are open loop with coordinated-omission correction; `replay` and
//! `ingest` drive the Kafka side.

mod http;
mod ingest;
mod kafka;
mod load;
mod modes;
mod replay;
mod report;
mod requests;
mod tcp;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Score over the binary protocol at a fixed rate.
    Tcp(modes::TcpArgs),
    /// Drive any HTTP endpoint at a fixed rate with a request template.
    Http(modes::HttpArgs),
    /// Find the highest rate whose p99 stays within a bound.
    Sweep(modes::SweepArgs),
    /// Keep a TCP load running while new bundles are dropped into the model folder.
    Reload(modes::ReloadArgs),
    /// Produce to Kafka at a fixed rate; measure applied events/s and produce-to-visible.
    #[command(visible_alias = "freshness")]
    Ingest(ingest::IngestArgs),
    /// Produce CSV events (the data set or trainer synth output) to a topic.
    Replay(replay::ReplayArgs),
}

/// A name for this run (hex microseconds), so sessions and bundles of two
/// runs never collide.
fn run_id() -> String {
    let micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    format!("{micros:x}")
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Tcp(args) => modes::tcp(&args),
        Command::Http(args) => modes::http(&args),
        Command::Sweep(args) => modes::sweep(&args),
        Command::Reload(args) => modes::reload(&args),
        Command::Ingest(args) => ingest::run(&args),
        Command::Replay(args) => replay::run(&args),
    }
}
