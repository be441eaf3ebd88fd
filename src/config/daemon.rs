//! `[daemon]`: how often the daemon looks for due payments, how many it charges at once, and
//! how long it holds a claim on one.

use serde::Serialize;

use super::checker::Checker;
use super::duration::Dur;
use super::raw::section;

section!(Daemon {
    poll_interval: String,
    concurrency: String,
    batch_size: String,
    lease: String,
    shutdown_grace: String,
});

#[derive(Debug, Clone, Serialize)]
pub struct DaemonSettings {
    pub poll_interval: Dur,
    pub concurrency: u32,
    pub batch_size: u32,
    pub lease: Dur,
    pub shutdown_grace: Dur,
}

/// `lease` and `shutdown_grace` must fit `processor.timeout`; that is checked across sections.
pub(super) fn parse(d: &Daemon, c: &mut Checker) -> DaemonSettings {
    let poll_interval = c.dur("daemon.poll_interval", &d.poll_interval);
    let concurrency = c.int("daemon.concurrency", &d.concurrency, 1, 1024);
    let batch_size = c.int("daemon.batch_size", &d.batch_size, 1, 10_000);
    let lease = c.dur("daemon.lease", &d.lease);
    let shutdown_grace = c.dur("daemon.shutdown_grace", &d.shutdown_grace);
    DaemonSettings {
        poll_interval,
        concurrency,
        batch_size,
        lease,
        shutdown_grace,
    }
}
