//! The metrics autopay exports at `/metrics` (Prometheus text format), named in one place.
//!
//! Counters and the histogram count what this process did since it started; the gauges marked
//! "from the database" are read at each scrape and are the same on every host, so alert rules
//! take their `max()`, not their `sum()`. docs/operations.md describes each one.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Payments this process moved, by the state they reached (`outcome`).
pub const PAYMENTS: &str = "autopay_payments_total";
/// Declines this process recorded, by class (`retry`, `fail`, `disable_card`).
pub const DECLINES: &str = "autopay_declines_total";
/// How long each charge request took, rate-limit wait included.
pub const CHARGE_SECONDS: &str = "autopay_charge_request_seconds";
/// Charge requests that came back without an answer, by kind (`unknown`, `busy`, `mismatch`,
/// `refused`: the processor refused autopay's credentials).
pub const PROCESSOR_ERRORS: &str = "autopay_processor_errors_total";
/// How long each request waited for the processor's rate limit.
pub const RATE_LIMIT_WAIT: &str = "autopay_rate_limit_wait_seconds";
/// How many attempt steps each group commit wrote in one transaction.
pub const GROUP_COMMIT_STEPS: &str = "autopay_group_commit_steps";
/// Payments this process claimed after another worker's lease expired.
pub const LEASES_TAKEN_OVER: &str = "autopay_leases_taken_over_total";
/// Delivery attempts, by outcome (`sent`, `retry`, `failed`, `paused`).
pub const MAIL: &str = "autopay_mail_total";
/// How many delivery outcomes each grouped commit of the dispatcher recorded.
pub const MAIL_GROUP_COMMIT: &str = "autopay_mail_group_commit_size";

/// From the database: payments by state (`state`).
pub const PAYMENTS_BY_STATE: &str = "autopay_payments";
/// From the database: payments due now and not yet claimed.
pub const DUE_BACKLOG: &str = "autopay_due_backlog";
/// From the database: how long the oldest unclaimed due payment has waited.
pub const OLDEST_DUE_SECONDS: &str = "autopay_oldest_due_age_seconds";
/// From the database: notifications by state (`state`).
pub const OUTBOX: &str = "autopay_outbox";
/// From the database: 1 while charging is paused (`by`: `operator`, `breaker`, or `processor`
/// when the processor refused autopay's credentials).
pub const CHARGING_PAUSED: &str = "autopay_charging_paused";
/// From the database: 1 while mail is paused after a session refusal.
pub const MAIL_PAUSED: &str = "autopay_mail_paused";
/// From the database: members whose address the mail server refused.
pub const BOUNCING: &str = "autopay_members_bouncing";
/// From the database: charges `autopay reconcile` could not place that no operator has
/// acknowledged.
pub const FINDINGS: &str = "autopay_reconcile_findings";
/// Seconds since each periodic job last ran in this process (`job`).
pub const TICK_AGE: &str = "autopay_tick_age_seconds";
/// Seconds since this process's worker last completed a pass.
pub const PASS_AGE: &str = "autopay_worker_pass_age_seconds";
/// 1 while this process's readiness check (`check`: `database`, `charging`, `mail`, `worker`,
/// `ticks`, `stopping`) passes, 0 while it fails: `/readyz` as numbers, for alert rules.
pub const READY_CHECK: &str = "autopay_ready_check";

/// The histogram's buckets, in seconds: a charge takes tens of milliseconds to the timeout.
const CHARGE_BUCKETS: &[f64] = &[0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// The group commit's buckets: steps per transaction, one up to the largest group.
const GROUP_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0];
/// The rate-limit wait's buckets, in seconds: none at all, up to the timeout.
const WAIT_BUCKETS: &[f64] = &[0.001, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process's recorder once and returns its handle (None if another recorder was
/// installed first, as in a test harness: the metrics are then not exported).
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Full(CHARGE_SECONDS.into()),
                    CHARGE_BUCKETS,
                )
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        metrics_exporter_prometheus::Matcher::Full(RATE_LIMIT_WAIT.into()),
                        WAIT_BUCKETS,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        metrics_exporter_prometheus::Matcher::Full(GROUP_COMMIT_STEPS.into()),
                        GROUP_BUCKETS,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        metrics_exporter_prometheus::Matcher::Full(MAIL_GROUP_COMMIT.into()),
                        GROUP_BUCKETS,
                    )
                })
                .ok()?;
            match builder.install_recorder() {
                Ok(handle) => Some(handle),
                Err(e) => {
                    tracing::warn!(error = %e, "metrics are not exported: another recorder is installed");
                    None
                }
            }
        })
        .clone()
}
