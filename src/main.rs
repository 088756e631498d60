use std::process::ExitCode;

use clap::Parser;
use txrelay::cli::{self, Cli};

// glibc's malloc and free were about 15 % of the relay's CPU under load
// (perf, 32 connections); mimalloc cut the relay's CPU per request by ~16 %.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    // Every TLS client (PostgreSQL, SQS, Kubernetes) shares this provider;
    // rustls refuses to guess when more than one is compiled in.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    // Installed as `kubectl-txr`, the same binary is a kubectl plugin.
    let cli = Cli::parse_from(cli::plugin_args(std::env::args_os().collect()));
    // Flushes the exported trace spans, if any, when main returns.
    let _telemetry = txrelay::telemetry::init(cli.global.log_format);
    match cli::run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}
