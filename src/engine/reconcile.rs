//! Restores: the check `run` makes at start, and `autopay reconcile`, which teaches a restored
//! database what the processor did after its backup (the rules are in
//! [`crate::domain::reconcile`]).

use jiff::Timestamp;

use super::{Engine, planner::plan_if_due};
use crate::domain::reconcile::{self as rules, ReconcileReport, SinceTooLate};
use crate::processor::ProcessorError;
use crate::store::{Reconciled, StoreError};

/// What `run` finds when it compares the database with the processor at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestoreCheck {
    /// Nothing suggests a restore.
    Clean,
    /// The database carries the "reconcile required" mark (a backup copy, or `restore-mark`).
    Marked { since: Timestamp },
    /// The processor knows attempts of this installation that the database does not.
    Unknown { count: usize, newest: Timestamp },
    /// The processor could not be asked; the check was skipped.
    Unchecked { why: String },
}

impl RestoreCheck {
    /// The refusal `run` gives, when it refuses.
    pub fn refusal(&self) -> Option<String> {
        match self {
            RestoreCheck::Clean | RestoreCheck::Unchecked { .. } => None,
            RestoreCheck::Marked { since } => Some(format!(
                "this database is a backup or a restore, complete only up to {since}; run `autopay reconcile` before `autopay run`, so that nothing charged after that is charged again"
            )),
            RestoreCheck::Unknown { count, newest } => Some(format!(
                "this database looks restored: the processor made {count} charge(s) for this installation that this database does not know, the newest at {newest}; run `autopay reconcile` before `autopay run`"
            )),
        }
    }
}

/// Why `reconcile` stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot list the processor's attempts: {0}; try again when it answers")]
    Processor(#[from] ProcessorError),
    #[error(transparent)]
    Since(#[from] SinceTooLate),
}

impl Engine {
    /// Compares the processor's charges with the database's, from within the key retention or
    /// just before the newest attempt the database knows, whichever is earlier: run at start,
    /// so that a database restored without the mark is refused too. The processor gets
    /// `processor.timeout` to answer.
    pub async fn restore_check(&self) -> Result<RestoreCheck, StoreError> {
        let control = self.store.control().await?;
        if let Some(since) = control.reconcile_required_since {
            return Ok(RestoreCheck::Marked { since });
        }
        let since = rules::check_since(
            self.clock.now(),
            self.store.newest_attempt().await?,
            self.policy.keys.key_retention,
            self.config.lease,
        );
        let listed = tokio::time::timeout(self.config.processor_timeout, async {
            self.limiter.acquire().await;
            self.processor.list_attempts(since).await
        })
        .await;
        let found = match listed {
            Ok(Ok(found)) => rules::ours(found, control.installation_id),
            Ok(Err(e)) => return Ok(RestoreCheck::Unchecked { why: e.to_string() }),
            Err(_) => {
                return Ok(RestoreCheck::Unchecked {
                    why: format!(
                        "no answer within processor.timeout ({:?})",
                        self.config.processor_timeout
                    ),
                });
            }
        };
        let keys: Vec<String> = found.iter().map(|a| a.idempotency_key.clone()).collect();
        let known = self.store.known_keys(&keys).await?;
        let unknown = rules::unknown_to_us(&found, &known);
        Ok(match unknown.iter().map(|a| a.created_at).max() {
            None => RestoreCheck::Clean,
            Some(newest) => RestoreCheck::Unknown {
                count: unknown.len(),
                newest,
            },
        })
    }

    /// Records onto the database every attempt of this installation the processor made since
    /// `requested` (default, and latest allowed: the backup's time less the key retention and
    /// the lease), lists the charges it cannot place as findings, and clears the mark.
    pub async fn reconcile(
        &self,
        requested: Option<Timestamp>,
    ) -> Result<ReconcileReport, ReconcileError> {
        let control = self.store.control().await?;
        if control.reconcile_required_since.is_none() {
            // Unmarked: reconcile only what the start check would refuse, never a database a
            // daemon may be charging from.
            match self.restore_check().await? {
                RestoreCheck::Unknown { .. } | RestoreCheck::Marked { .. } => {}
                RestoreCheck::Clean => {
                    return Ok(ReconcileReport {
                        nothing_to_do: true,
                        ..ReconcileReport::default()
                    });
                }
                RestoreCheck::Unchecked { why } => {
                    return Err(ProcessorError::Unavailable(why).into());
                }
            }
        }
        let backup_at = match control.reconcile_required_since {
            Some(t) => t,
            None => self
                .store
                .newest_attempt()
                .await?
                .unwrap_or_else(|| self.clock.now()),
        };
        let latest =
            rules::latest_since(backup_at, self.policy.keys.key_retention, self.config.lease);
        let since = rules::since(requested, latest)?;
        self.limiter.acquire().await;
        let mut found = rules::ours(
            self.processor.list_attempts(since).await?,
            control.installation_id,
        );
        found.sort_by_key(|a| (a.created_at, a.attempt));
        let mut report = ReconcileReport {
            since: Some(since),
            listed: found.len() as u64,
            ..ReconcileReport::default()
        };
        for attempt in &found {
            let audit = self.audit();
            let mut done = self.store.reconcile_attempt(attempt, false, &audit).await?;
            if done == Reconciled::Unplanned {
                // The occurrence was planned after the backup: plan it as it was then, so the
                // attempt lands on its payment and the planner never charges it again.
                if plan_if_due(
                    self.store.as_ref(),
                    attempt.schedule_id,
                    attempt.created_at,
                    self.config.misfire,
                    self.config.max_lateness,
                    &audit,
                )
                .await?
                {
                    report.planned += 1;
                }
                done = self.store.reconcile_attempt(attempt, true, &audit).await?;
            }
            match done {
                Reconciled::Known => report.known += 1,
                Reconciled::Ignored => report.ignored += 1,
                Reconciled::Finding => report.findings += 1,
                Reconciled::Recorded { payment_id, state } => {
                    report.recorded += 1;
                    match state {
                        crate::domain::payment::PaymentState::Succeeded => report.succeeded += 1,
                        crate::domain::payment::PaymentState::NeedsReview => {
                            report.needs_review += 1
                        }
                        _ => {}
                    }
                    tracing::info!(%payment_id, attempt = attempt.attempt, state = %state, "reconciled an attempt the database did not know");
                }
                Reconciled::Unplanned => {
                    return Err(StoreError::Internal(
                        "reconcile was told an occurrence is unplanned on its last try".into(),
                    )
                    .into());
                }
            }
        }
        if control.reconcile_required_since.is_some() {
            self.store.set_reconcile_mark(None, &self.audit()).await?;
        }
        Ok(report)
    }
}
