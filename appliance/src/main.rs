//! `cartscore`: the serving daemon's entry point. Everything it does is in
//! the library (`cli` parses, `app` builds, serves and drains); this file
//! picks the allocator and turns an error into exit status 1.

use clap::Parser;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = cartscore_appliance::cli::Cli::parse();
    match cli.run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("cartscore: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
