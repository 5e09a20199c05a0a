//! The `hexveil` binary: parse the command line and run it.

use clap::Parser;

fn main() -> std::process::ExitCode {
    hexveil::cli::run(hexveil::cli::Cli::parse())
}
