//! The `procpool` command: many commands in parallel (`run`), persistent workers in any
//! language (`map`), benchmarks and facts about this machine, over the procpool facade.
#![forbid(unsafe_code)]

mod bench;
mod common;
mod map;
mod proc;
mod reference;
mod run;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};

/// A process pool for Rust: command-line tools.
#[derive(Debug, Parser)]
#[command(name = "procpool", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs a command once per input line, many at once (as xargs -P and GNU parallel).
    Run(run::Args),
    /// Keeps N worker commands (any language) running and feeds them one line per task.
    Map(map::Args),
    /// Runs procpool's standard workloads and prints one JSON line per run.
    Bench(bench::Args),
    /// Prints what procpool would use on this machine (without starting a pool).
    Info,
    /// Prints a shell completion script: `procpool completions bash > /etc/bash_completion.d/procpool`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// How the pool starts its workers (see `procpool::StartMethod`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub(crate) enum Method {
    /// A fork server (forked from the seed init() made, or started fresh) forks each worker.
    #[default]
    Forkserver,
    /// Each worker is a fresh run of this program.
    Spawn,
    /// Workers are forks of this process.
    Fork,
}

impl Method {
    /// Its name, as `--start-method` and `bench --method` take it (and results say it).
    pub(crate) fn name(self) -> &'static str {
        match self {
            Method::Forkserver => "forkserver",
            Method::Spawn => "spawn",
            Method::Fork => "fork",
        }
    }
}

impl From<Method> for procpool::StartMethod {
    fn from(m: Method) -> Self {
        match m {
            Method::Forkserver => procpool::StartMethod::Forkserver,
            Method::Spawn => procpool::StartMethod::Spawn,
            Method::Fork => procpool::StartMethod::Fork,
        }
    }
}

fn main() -> ExitCode {
    procpool::init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(common::EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match cli.command {
        Command::Run(args) => run::run(args),
        Command::Map(args) => map::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Info => info(),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "procpool",
                &mut std::io::stdout(),
            );
            ExitCode::SUCCESS
        }
    }
}

/// `procpool info`: the defaults on this machine, without starting a pool.
fn info() -> ExitCode {
    let method = procpool::StartMethod::default();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("usable CPUs (default processes, default -j): {cpus}");
    println!("default start method: {method:?}");
    println!("worker names: {}-N", method.worker_name_prefix());
    println!("max tasks per child: unlimited");
    println!("procpool {}", env!("CARGO_PKG_VERSION"));
    ExitCode::SUCCESS
}
