//! `petrel`: admin, produce/consume and dev CLI. All logic lives in
//! [`petrel_tools::cli`].

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = match petrel_tools::cli::Cli::try_parse() {
        Ok(c) => c,
        Err(e) => return usage_error(e),
    };
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

/// Help and version print as clap prints them; a usage error is one stderr
/// line like every other failure, exit 2: what is wrong (every missing or
/// invalid argument clap names, its tips) and the usage line, as
/// `error: ... Usage: petrel ... (see --help)`, or with `--json` the JSON
/// error object with code `usage` and the usage line apart.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        e.exit();
    }
    let (message, usage) = petrel_tools::cli::one_line_usage_error(&e.to_string());
    if std::env::args().any(|a| a == "--json") {
        let v = serde_json::json!({"error": {
            "code": "usage",
            "message": message,
            "usage": usage,
        }});
        eprintln!("{v}");
    } else if usage.is_empty() {
        eprintln!("error: {message} (see --help)");
    } else {
        eprintln!("error: {message}. {usage} (see --help)");
    }
    ExitCode::from(2)
}
