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
    // Do not wait for background tasks (e.g. a lingering long-poll).
    runtime.shutdown_background();
    code
}
