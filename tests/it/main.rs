//! Integration tests: one binary, one module per feature (zero-to-production's layout).

mod cli;
mod helpers;
mod secrets;
mod store_conformance;
