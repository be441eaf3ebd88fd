//! `[daemon]`: when the periodic jobs run, how often the daemon looks for due payments, how
//! many it charges at once, and how long it holds a claim on one.

use serde::Serialize;

use super::checker::Checker;
use super::duration::Dur;
use super::raw::section;
use crate::domain::cron::CronRule;

/// Every minute: what a refused cron expression falls back to while checking goes on.
fn every_minute() -> CronRule {
    CronRule::every_minute()
}

section!(Daemon {
    planner_cron: String,
    reminders_cron: String,
    housekeeping_cron: String,
    tick_alarm: String,
    poll_interval: String,
    concurrency: String,
    batch_size: String,
    lease: String,
    shutdown_grace: String,
});

#[derive(Debug, Clone, Serialize)]
pub struct DaemonSettings {
    /// The planner's backstop tick (the worker loop plans on every pass anyway).
    #[serde(serialize_with = "ser_cron")]
    pub planner_cron: CronRule,
    /// The reminder and card-expiry scans.
    #[serde(serialize_with = "ser_cron")]
    pub reminders_cron: CronRule,
    /// Housekeeping: pruning old notifications.
    #[serde(serialize_with = "ser_cron")]
    pub housekeeping_cron: CronRule,
    /// How late a periodic job may be before it is an alarm (an error, readiness fails).
    pub tick_alarm: Dur,
    pub poll_interval: Dur,
    pub concurrency: u32,
    pub batch_size: u32,
    pub lease: Dur,
    pub shutdown_grace: Dur,
}

/// `lease` and `shutdown_grace` must fit `processor.timeout`; that is checked across sections.
fn ser_cron<S: serde::Serializer>(rule: &CronRule, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(rule.expression())
}

pub(super) fn parse(d: &Daemon, c: &mut Checker) -> DaemonSettings {
    let mut cron = |key: &str, value: &str| c.parse(key, value, every_minute(), CronRule::parse);
    let planner_cron = cron("daemon.planner_cron", &d.planner_cron);
    let reminders_cron = cron("daemon.reminders_cron", &d.reminders_cron);
    let housekeeping_cron = cron("daemon.housekeeping_cron", &d.housekeeping_cron);
    let tick_alarm = c.dur("daemon.tick_alarm", &d.tick_alarm);
    let poll_interval = c.dur("daemon.poll_interval", &d.poll_interval);
    let concurrency = c.int("daemon.concurrency", &d.concurrency, 1, 1024);
    let batch_size = c.int("daemon.batch_size", &d.batch_size, 1, 10_000);
    let lease = c.dur("daemon.lease", &d.lease);
    let shutdown_grace = c.dur("daemon.shutdown_grace", &d.shutdown_grace);
    DaemonSettings {
        planner_cron,
        reminders_cron,
        housekeeping_cron,
        tick_alarm,
        poll_interval,
        concurrency,
        batch_size,
        lease,
        shutdown_grace,
    }
}
