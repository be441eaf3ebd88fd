//! `[processor]`: which card processor charges, and the timings that keep a charge from being
//! sent twice. Each processor's own table is a module beside it.

use serde::Serialize;

use super::checker::Checker;
use super::duration::Dur;
use super::raw::section;

mod simulated;
mod stripe;

pub use simulated::{Latency, Ledger, Simulated, SimulatedSettings};
pub use stripe::{MIN_API_VERSION, Stripe, StripeMode, StripeSettings};

section!(Processor {
    kind: String,
    timeout: String,
    settle_delay: String,
    lookup_window: String,
    key_retention: String,
    max_unknown_cycles: String,
    max_requests_per_second: String,
    simulated: Simulated,
    stripe: Stripe,
});

/// How long Stripe keeps an idempotency key.
pub const STRIPE_KEY_RETENTION: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProcessorKind {
    Simulated,
    Stripe,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProcessorSettings {
    pub kind: ProcessorKind,
    pub timeout: Dur,
    pub settle_delay: Dur,
    pub lookup_window: Dur,
    pub key_retention: Dur,
    pub max_unknown_cycles: u32,
    pub max_requests_per_second: u32,
    pub simulated: SimulatedSettings,
    pub stripe: StripeSettings,
}

/// How the timings relate to `daemon.*` and to each other is checked across sections, once
/// every section is parsed.
pub(super) fn parse(pr: &Processor, c: &mut Checker) -> ProcessorSettings {
    let kind = c.choice(
        "processor.kind",
        &pr.kind,
        &[
            ("simulated", ProcessorKind::Simulated),
            ("stripe", ProcessorKind::Stripe),
        ],
    );
    let timeout = c.dur("processor.timeout", &pr.timeout);
    let settle_delay = c.dur("processor.settle_delay", &pr.settle_delay);
    let lookup_window = c.dur("processor.lookup_window", &pr.lookup_window);
    let key_retention = c.dur("processor.key_retention", &pr.key_retention);
    let max_unknown_cycles = c.int(
        "processor.max_unknown_cycles",
        &pr.max_unknown_cycles,
        1,
        100,
    );
    let max_rps = c.int(
        "processor.max_requests_per_second",
        &pr.max_requests_per_second,
        1,
        100_000,
    );
    if kind == ProcessorKind::Stripe && key_retention.0 > STRIPE_KEY_RETENTION {
        c.problem(
            "processor.key_retention",
            &key_retention.to_string(),
            "at most 24h with processor.kind = \"stripe\": Stripe keeps an idempotency key for 24 hours, and a key resent after it forgot would charge again",
        );
    }
    let simulated = simulated::parse(&pr.simulated, c);
    let stripe = stripe::parse(&pr.stripe, c, kind);
    ProcessorSettings {
        kind,
        timeout,
        settle_delay,
        lookup_window,
        key_retention,
        max_unknown_cycles,
        max_requests_per_second: max_rps,
        simulated,
        stripe,
    }
}
