//! `cartscore-bench`: the appliance's latency harness. Every mode is open
//! loop with coordinated-omission correction.

use cartscore_bench::modes;
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
    /// Run scoring, streaming and reloads for a long time; fail if anything grows.
    Soak(cartscore_bench::soak::SoakArgs),
    /// Time the compiled evaluator alone on bundles and feature rows.
    Engine(cartscore_bench::engine::EngineArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Tcp(args) => modes::tcp(&args),
        Command::Http(args) => modes::http(&args),
        Command::Sweep(args) => modes::sweep(&args),
        Command::Reload(args) => modes::reload(&args),
        Command::Soak(args) => cartscore_bench::soak::soak(&args),
        Command::Engine(args) => cartscore_bench::engine::engine(&args),
    }
}
