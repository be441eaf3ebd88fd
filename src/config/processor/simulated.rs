//! `[processor.simulated]`: the in-tree fake processor's latency, ledger and injected faults.

use std::time::Duration;

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

/// How long each simulated call takes: `"300ms"` (always), or `"300ms p99 2s"`: a log-normal
/// spread with that median and that 99th percentile, a heavy tail like a real processor's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Latency {
    Fixed(Duration),
    Tail { median: Duration, p99: Duration },
}

/// The 99th percentile of the standard normal distribution.
const Z_99: f64 = 2.326_347_874;

impl Latency {
    pub fn parse(s: &str) -> Result<Latency, String> {
        const EXPECTED: &str = "a duration such as \"300ms\", or a median and a 99th percentile such as \"300ms p99 2s\"";
        let words: Vec<&str> = s.split_whitespace().collect();
        match words.as_slice() {
            [fixed] => Ok(Latency::Fixed(Dur::parse(fixed)?.as_std())),
            [median, "p99", p99] => {
                let median = Dur::parse(median)?.as_std();
                let p99 = Dur::parse(p99)?.as_std();
                if median.is_zero() || p99 <= median {
                    return Err(format!(
                        "{EXPECTED}, with a median above zero and a 99th percentile above the median"
                    ));
                }
                Ok(Latency::Tail { median, p99 })
            }
            _ => Err(EXPECTED.to_string()),
        }
    }

    /// The wait for one call, given `z`, a draw from the standard normal distribution.
    pub fn at(&self, z: f64) -> Duration {
        match *self {
            Latency::Fixed(d) => d,
            Latency::Tail { median, .. } => {
                let secs = median.as_secs_f64() * (self.sigma() * z).exp();
                Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX)
            }
        }
    }

    /// The average wait: what a concurrency of N turns into N / mean calls a second.
    pub fn mean(&self) -> Duration {
        match *self {
            Latency::Fixed(d) => d,
            Latency::Tail { median, .. } => {
                let sigma = self.sigma();
                median.mul_f64((sigma * sigma / 2.0).exp())
            }
        }
    }

    pub fn is_zero(&self) -> bool {
        matches!(self, Latency::Fixed(d) if d.is_zero())
    }

    /// The log-normal's shape: ln(p99 / median) over the normal's 99th percentile.
    fn sigma(&self) -> f64 {
        match *self {
            Latency::Fixed(_) => 0.0,
            Latency::Tail { median, p99 } => (p99.as_secs_f64() / median.as_secs_f64()).ln() / Z_99,
        }
    }
}

impl std::fmt::Display for Latency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Latency::Fixed(d) => write!(f, "{}", Dur(d)),
            Latency::Tail { median, p99 } => write!(f, "{} p99 {}", Dur(median), Dur(p99)),
        }
    }
}

impl Serialize for Latency {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SimulatedSettings {
    pub latency: Latency,
    pub ledger: Ledger,
    pub drop_after_charge: f64,
    pub timeout_before_charge: f64,
}

pub(super) fn parse(sim: &Simulated, c: &mut Checker) -> SimulatedSettings {
    let latency = c.parse(
        "processor.simulated.latency",
        &sim.latency,
        Latency::Fixed(Duration::ZERO),
        Latency::parse,
    );
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_latency_is_one_duration_or_a_median_and_a_99th_percentile() {
        assert_eq!(
            Latency::parse("300ms").unwrap(),
            Latency::Fixed(Duration::from_millis(300))
        );
        let tail = Latency::parse(" 300ms  p99 2s ").unwrap();
        assert_eq!(
            tail,
            Latency::Tail {
                median: Duration::from_millis(300),
                p99: Duration::from_secs(2)
            }
        );
        assert_eq!(tail.to_string(), "300ms p99 2s");
        for bad in [
            "",
            "fast",
            "300ms p95 2s",
            "2s p99 300ms",
            "0s p99 1s",
            "300ms p99",
        ] {
            assert!(Latency::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_tail_s_median_and_99th_percentile_are_where_they_were_asked() {
        let tail = Latency::parse("300ms p99 2s").unwrap();
        assert_eq!(tail.at(0.0), Duration::from_millis(300));
        let p99 = tail.at(Z_99).as_secs_f64();
        assert!((p99 - 2.0).abs() < 1e-6, "{p99}");
        // exp(sigma^2 / 2) with sigma = ln(2 / 0.3) / 2.326: about 0.419 s.
        let mean = tail.mean().as_secs_f64();
        assert!((mean - 0.419).abs() < 0.001, "{mean}");
        let fixed = Latency::parse("300ms").unwrap();
        assert_eq!(fixed.at(3.0), Duration::from_millis(300));
        assert_eq!(fixed.mean(), Duration::from_millis(300));
    }
}
