//! `[processor.simulated]`: the in-tree fake processor's latency, ledger and injected faults.

use serde::Serialize;

use super::super::checker::Checker;
use super::super::duration::Dur;
use super::super::raw::section;
use super::super::url::redact_url;

section!(Simulated {
    latency: String,
    ledger: String,
    drop_after_charge: String,
    timeout_before_charge: String
});

/// Where the simulated processor keeps its ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ledger {
    /// In memory: benchmarks only, forgotten at exit.
    Memory,
    /// A database URL of its own.
    Url(String),
    /// `simulated-processor.db` beside autopay's SQLite file (or in the working directory).
    Beside,
}

impl Serialize for Ledger {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Ledger::Memory => s.serialize_str("memory"),
            Ledger::Url(u) => s.serialize_str(&redact_url(u)),
            Ledger::Beside => s.serialize_str(""),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SimulatedSettings {
    pub latency: Dur,
    pub ledger: Ledger,
    pub drop_after_charge: f64,
    pub timeout_before_charge: f64,
}

pub(super) fn parse(sim: &Simulated, c: &mut Checker) -> SimulatedSettings {
    let latency = c.dur("processor.simulated.latency", &sim.latency);
    let ledger = match sim.ledger.trim() {
        "" => Ledger::Beside,
        "memory" => Ledger::Memory,
        u if u.starts_with("sqlite:") || u.starts_with("postgres") => Ledger::Url(u.to_string()),
        u => {
            c.problem(
                "processor.simulated.ledger",
                &redact_url(u),
                "empty (a file beside autopay's), \"memory\", or a sqlite:// or postgres:// URL",
            );
            Ledger::Beside
        }
    };
    let drop_after_charge = c.share(
        "processor.simulated.drop_after_charge",
        &sim.drop_after_charge,
    );
    let timeout_before_charge = c.share(
        "processor.simulated.timeout_before_charge",
        &sim.timeout_before_charge,
    );
    SimulatedSettings {
        latency,
        ledger,
        drop_after_charge,
        timeout_before_charge,
    }
}
