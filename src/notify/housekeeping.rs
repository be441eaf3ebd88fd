//! Housekeeping of the outbox: a notification that is done (sent, failed or expired) holds a
//! member's name and address in its payload, so it is deleted once it is older than
//! `email.keep_sent`. Deleting changes nothing else: every change it told about has its own
//! row and audit event.

use jiff::{SignedDuration, Timestamp};

use crate::config::Settings;
use crate::store::{Store, StoreError};

/// Deletes done notifications older than `email.keep_sent`; returns how many.
pub async fn prune(
    store: &dyn Store,
    settings: &Settings,
    now: Timestamp,
) -> Result<u64, StoreError> {
    let keep =
        SignedDuration::try_from(settings.email.keep_sent.as_std()).unwrap_or(SignedDuration::MAX);
    let before = now.checked_sub(keep).unwrap_or(Timestamp::MIN);
    let pruned = store.prune_notifications(before).await?;
    if pruned > 0 {
        tracing::info!(pruned, "deleted notifications older than email.keep_sent");
    }
    Ok(pruned)
}
