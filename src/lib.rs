//! autopay: charges members' automatic bill payments on schedule and tells them about it.
//! The module tree follows the layers of docs/architecture.md; nothing else lives here.

pub mod cli;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod domain;
pub mod engine;
pub mod health;
pub mod http;
pub mod limiter;
pub mod metrics;
pub mod notify;
pub mod processor;
pub mod shutdown;
pub mod sqltypes;
pub mod store;
pub mod telemetry;
pub mod users;
