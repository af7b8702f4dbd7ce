//! The `procpool` command: benchmarks and facts about this machine, over the procpool facade.
#![forbid(unsafe_code)]

mod bench;
mod reference;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// A process pool for Rust: command-line tools.
#[derive(Debug, Parser)]
#[command(name = "procpool", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs procpool's standard workloads and prints one JSON line per run.
    Bench(bench::Args),
    /// Prints what procpool would use on this machine.
    Info,
}

fn main() -> ExitCode {
    procpool::init();
    let cli = Cli::parse();
    match cli.command {
        Command::Bench(args) => bench::run(args),
        Command::Info => {
            let pool = procpool::Pool::builder().build();
            match pool {
                Ok(pool) => {
                    println!("usable CPUs (default processes): {}", pool.processes());
                    println!("default start method: {:?}", pool.start_method());
                    for w in pool.workers() {
                        println!("  {} pid={}", w.name(), w.pid());
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("procpool: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
