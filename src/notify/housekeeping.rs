//! Housekeeping: a notification that is done (sent, failed or expired) holds a member's name
//! and address in its payload, so it is deleted once it is older than `email.keep_sent`.
//! Deleting changes nothing else: every change it told about has its own row and audit event.
//! The periodic jobs' last runs of workers gone for [`JOB_RUNS_KEPT`] are deleted too (each
//! process is a worker of its own). Payments, attempts, processor calls and audit events are
//! financial records and are kept.

use jiff::{SignedDuration, Timestamp};

use crate::config::Settings;
use crate::store::{Store, StoreError};

/// How long the last run of a worker that stopped is kept.
pub const JOB_RUNS_KEPT: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// Deletes done notifications older than `email.keep_sent`, and job runs of workers gone for
/// [`JOB_RUNS_KEPT`]; returns how many notifications.
pub async fn prune(
    store: &dyn Store,
    settings: &Settings,
    now: Timestamp,
) -> Result<u64, StoreError> {
    let keep =
        SignedDuration::try_from(settings.email.keep_sent.as_std()).unwrap_or(SignedDuration::MAX);
    let before = now.checked_sub(keep).unwrap_or(Timestamp::MIN);
    let pruned = store.prune_notifications(before).await?;
    let kept = SignedDuration::try_from(JOB_RUNS_KEPT).unwrap_or(SignedDuration::MAX);
    store
        .prune_job_runs(now.checked_sub(kept).unwrap_or(Timestamp::MIN))
        .await?;
    if pruned > 0 {
        tracing::info!(pruned, "deleted notifications older than email.keep_sent");
    }
    Ok(pruned)
}
