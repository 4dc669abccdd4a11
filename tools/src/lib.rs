//! The `petrel` command-line tool: administration, produce/consume from the
//! shell, and `petrel dev` (an embedded local cluster).
//!
//! ```text
//!  main.rs ──parse──▶ cli::Cli ──▶ cli::run ──▶ petrel_sdk::Client ──▶ proxy
//!                                     └──────▶ dev::run (embedded cluster)
//! ```
//!
//! # Output contract
//! - Human output: aligned plain-text tables on stdout.
//! - `--json`: one JSON object per line on stdout, for scripts.
//! - Failure: exit code 1 (2 for usage errors) and one `error: ...` line on
//!   stderr (plus a `{"error":{...}}` line with `--json`); never a panic.
//! - A closed stdout (broken pipe) ends the command quietly with exit 0.

pub mod cli;
#[cfg(feature = "dev")]
pub mod dev;
mod output;
pub mod users;
