//! Integration tests: one binary, one module per feature (zero-to-production's layout).

mod cli;
mod crash;
mod engine;
mod exactly_once;
mod faults;
mod helpers;
mod hostile;
mod notify;
mod pipeline;
mod restore;
mod secrets;
mod service;
mod simulation;
mod smtp_peer;
mod store_conformance;
mod stripe;
mod stripe_peer;
mod systemd;
