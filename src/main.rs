//! The `autopay` binary: everything lives in the library; this only hands it the arguments.

use std::process::ExitCode;

fn main() -> ExitCode {
    // One TLS stack for every client (sqlx, later lettre and reqwest): ring, installed once.
    let _ = rustls::crypto::ring::default_provider().install_default();
    autopay::cli::main_with(std::env::args_os())
}
