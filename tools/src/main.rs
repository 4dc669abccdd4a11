//! `petrel`: admin, produce/consume and dev CLI. All logic lives in
//! [`petrel_tools::cli`].

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = petrel_tools::cli::Cli::parse();
    petrel_tools::cli::init_tracing(&cli);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let code = runtime.block_on(petrel_tools::cli::run(cli));
    // Drop every task (e.g. a lingering long-poll) rather than wait for it,
    // but give the workers a moment to do so: `petrel dev`'s brokers close
    // RocksDB when the last task holding a store handle is dropped, and a
    // process that exits while RocksDB's threads still run aborts in its
    // static destructors ("pthread lock: Invalid argument").
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    code
}
