//! Persistence: one [`Store`] trait, implemented by [`sqlite::SqliteStore`] and
//! [`postgres::PgStore`], chosen by the database URL's scheme.
//!
//! Each method is one transaction that keeps the invariants of docs/architecture.md: it writes the change
//! and its audit event together, binds "now" from the caller's clock, and refuses (with a
//! [`StoreError`] that says what to do) anything the schema's rules forbid.

pub mod postgres;
mod records;
pub mod retry;
pub mod sql;
pub mod sqlite;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use jiff::Timestamp;
use uuid::Uuid;

pub use records::*;

use crate::config::{Backend, DatabaseUrl};
use crate::domain::ids::{CardId, MemberId, PaymentId, ScheduleId};
use crate::domain::member::AccountNumber;
use crate::domain::money::Money;
use crate::domain::payment::PaymentState;

pub use crate::domain::attempt::{Answer, LookupAnswer};

/// The schema version this binary needs (the highest migration it knows).
pub const SCHEMA_VERSION: i64 = 7;
/// The schema version a database records as the oldest binary that may run against it.
/// Migrations are additive for one release, so the release before this one (schema 1) still
/// runs against a database this one migrated.
pub const MIN_BINARY_SCHEMA: i64 = 1;
/// The schema version that brought the "reconcile required" mark: a marked database requires a
/// binary at least this new.
pub const RECONCILE_SCHEMA: i64 = 4;

/// The longest one wait on the database may take: a connection from the pool (connecting
/// included), a PostgreSQL statement (`statement_timeout`, lock waits included), a SQLite lock
/// (`busy_timeout`) or this process's turn at SQLite's single writer. A database that is down or
/// stuck shows up as an error the loops handle and report, never as a loop that waits for ever:
/// the systemd watchdog (docs/operations.md) would take that for a hung daemon. `autopay
/// migrate` alone has no statement limit, since a migration may rightly take long.
pub const WAIT_LIMIT: Duration = Duration::from_secs(10);

/// What went wrong in the store, sorted by what the caller should do about it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No such member, card, bill, schedule or payment (exit 66).
    #[error("{0}")]
    NotFound(String),
    /// The change breaks a rule: a duplicate, a card in use, a state that does not allow it
    /// (exit 65).
    #[error("{0}")]
    Conflict(String),
    /// The database cannot be reached (exit 69).
    #[error("{0}")]
    Unavailable(String),
    /// The database's schema does not match this binary (exit 78).
    #[error("{0}")]
    Schema(String),
    /// The database cannot be used as configured, such as a SQLite file another user owns
    /// (exit 78).
    #[error("{0}")]
    Config(String),
    /// Anything else: a bug or a corrupt row (exit 70).
    #[error("{0}")]
    Internal(String),
    /// PostgreSQL aborted the transaction because it met another (a deadlock or a serialization
    /// failure); nothing was written. [`retry::Retrying`] runs it again.
    #[error("{0}")]
    Contention(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

impl StoreError {
    /// Sorts a database error by what the caller should do; `doing` says what failed.
    pub fn from_sqlx(e: sqlx::Error, doing: &str) -> StoreError {
        match &e {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => StoreError::Unavailable(format!(
                "cannot reach the database while {doing}: {e}; check that it is running and that database.url is right"
            )),
            sqlx::Error::Database(db)
                if db.message().contains("no such table")
                    || db.code().as_deref() == Some("42P01") =>
            {
                StoreError::Schema(format!(
                    "the database has no autopay tables ({}); run `autopay migrate` first",
                    db.message()
                ))
            }
            sqlx::Error::Database(db)
                if matches!(db.code().as_deref(), Some("40001") | Some("40P01")) =>
            {
                StoreError::Contention(format!(
                    "the database aborted a transaction while {doing} because it met another ({})",
                    db.message()
                ))
            }
            // query_canceled: statement_timeout ([`WAIT_LIMIT`]) ran out.
            sqlx::Error::Database(db) if db.code().as_deref() == Some("57014") => {
                StoreError::Unavailable(format!(
                    "the database did not answer within {}s while {doing}; it is overloaded or a lock is held too long, try again",
                    WAIT_LIMIT.as_secs()
                ))
            }
            sqlx::Error::Database(db)
                if db.message().contains("database is locked") || db.message().contains("busy") =>
            {
                StoreError::Unavailable(format!(
                    "the database stayed busy while {doing}; another process holds a long write, try again"
                ))
            }
            _ => StoreError::Internal(format!("database error while {doing}: {e}")),
        }
    }
}

/// A writing transaction, holding (on SQLite) this process's turn at the single writer.
///
/// SQLite lets one transaction write at a time, and a writer that finds the lock taken sleeps
/// in steps before trying again; with several workers in one process those sleeps, not the
/// work, set the pace. Taking turns in process first means each waiting writer starts the
/// moment the previous one commits, and none waits out the busy timeout.
pub struct WriteTx<DB: sqlx::Database> {
    tx: sqlx::Transaction<'static, DB>,
    _turn: Option<tokio::sync::OwnedMutexGuard<()>>,
    /// Audit events written by this transaction, inserted together just before it commits
    /// (one statement for all, not one each).
    pub(crate) events: Vec<Event>,
    /// Whether other processes are to be woken when this transaction commits (once, however
    /// many of its writes asked).
    pub(crate) wake: bool,
}

impl<DB: sqlx::Database> WriteTx<DB> {
    pub(crate) fn new(
        tx: sqlx::Transaction<'static, DB>,
        turn: Option<tokio::sync::OwnedMutexGuard<()>>,
    ) -> WriteTx<DB> {
        WriteTx {
            tx,
            _turn: turn,
            events: Vec::new(),
            wake: false,
        }
    }

    /// Where the shared SQL runs its statements ([`sql::Query`](sql::backend::Query)).
    pub(crate) fn conn(&mut self) -> sql::Conn<'_, DB> {
        sql::Conn::Tx(&mut *self.tx)
    }

    /// The connection itself, for a backend's own sqlx calls.
    pub(crate) fn connection(&mut self) -> &mut DB::Connection {
        &mut self.tx
    }

    pub(crate) async fn commit(self) -> std::result::Result<(), sqlx::Error> {
        self.tx.commit().await
    }
}

/// One step of an attempt that a group commit writes with others ([`Store::charge_steps`]).
#[derive(Debug, Clone)]
pub enum ChargeStep {
    /// [`Store::begin_attempt`].
    Begin { lease: Lease, audit: Audit },
    /// [`Store::record_charge`].
    Record {
        lease: Lease,
        call: Option<Uuid>,
        answer: crate::domain::attempt::Answer,
        audit: Audit,
    },
}

/// Who made a change and when: written into the audit event of every change.
#[derive(Debug, Clone)]
pub struct Audit {
    /// The operating-system user of a command-line action, or the worker id.
    pub actor: String,
    /// "Now", from the caller's clock.
    pub at: Timestamp,
}

/// Where the schema stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaState {
    /// Highest migration applied, 0 when none.
    pub applied: i64,
    /// The oldest binary schema version the database allows.
    pub min_binary: i64,
}

/// What `migrate` did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MigrationReport {
    pub applied: Vec<String>,
    pub schema_version: i64,
    pub installation_id: Uuid,
}

/// The persistence boundary. The engine and the CLI talk only to this.
#[async_trait]
pub trait Store: Send + Sync {
    fn backend(&self) -> Backend;

    /// Applies missing migrations and records the installation id on the first run.
    async fn migrate(&self, now: Timestamp) -> Result<MigrationReport>;
    /// The schema's state, without changing anything.
    async fn schema_state(&self) -> Result<SchemaState>;
    async fn control(&self) -> Result<Control>;
    async fn status(&self) -> Result<StatusReport>;

    async fn add_member(&self, new: &NewMember, audit: &Audit) -> Result<Member>;
    async fn member(&self, account: &AccountNumber) -> Result<Member>;
    async fn member_by_id(&self, id: MemberId) -> Result<Member>;
    async fn list_members(&self) -> Result<Vec<Member>>;
    async fn update_member(
        &self,
        account: &AccountNumber,
        change: &MemberChange,
        audit: &Audit,
    ) -> Result<Member>;
    /// Closes the member and cancels every live schedule and its unclaimed payments.
    async fn close_member(&self, account: &AccountNumber, audit: &Audit) -> Result<ClosedMember>;

    async fn add_card(&self, new: &NewCard, audit: &Audit) -> Result<Card>;
    async fn card(&self, id: CardId) -> Result<Card>;
    async fn list_cards(&self, member_id: MemberId) -> Result<Vec<Card>>;
    /// Refuses (Conflict) while a live schedule uses the card.
    async fn remove_card(&self, id: CardId, audit: &Audit) -> Result<Card>;

    /// Adds bills all together or not at all; a bill already stored with the same member,
    /// reference, amount and due date counts as unchanged, one with other values is a Conflict.
    async fn add_bills(&self, bills: &[NewBill], audit: &Audit) -> Result<BillImport>;
    async fn bill(&self, id: Uuid) -> Result<Bill>;
    async fn list_bills(&self, member_id: Option<MemberId>) -> Result<Vec<Bill>>;
    async fn void_bill(&self, id: Uuid, reason: &str, audit: &Audit) -> Result<BillChange>;
    async fn adjust_bill(
        &self,
        id: Uuid,
        amount_due: Money,
        reason: &str,
        audit: &Audit,
    ) -> Result<BillChange>;
    async fn pay_bill_external(
        &self,
        id: Uuid,
        amount: Money,
        reference: &str,
        audit: &Audit,
    ) -> Result<BillChange>;
    async fn list_credits(&self, member_id: MemberId) -> Result<Vec<Credit>>;

    async fn add_schedule(&self, new: &NewSchedule, audit: &Audit) -> Result<Schedule>;
    async fn schedule(&self, id: ScheduleId) -> Result<Schedule>;
    async fn list_schedules(&self, member_id: Option<MemberId>) -> Result<Vec<Schedule>>;
    /// Applies a change made against `change.expected_version`, bumps the version and re-plans
    /// the schedule's unclaimed payments with the new card and amount.
    async fn update_schedule(&self, change: &ScheduleChange, audit: &Audit) -> Result<Schedule>;
    async fn pause_schedule(&self, id: ScheduleId, audit: &Audit) -> Result<Schedule>;
    async fn resume_schedule(&self, resume: &ScheduleResume, audit: &Audit) -> Result<Schedule>;
    async fn cancel_schedule(&self, id: ScheduleId, audit: &Audit) -> Result<Schedule>;

    async fn payment(&self, id: PaymentId) -> Result<Payment>;
    async fn list_payments(
        &self,
        member_id: Option<MemberId>,
        state: Option<PaymentState>,
    ) -> Result<Vec<Payment>>;
    async fn events(&self, entity_id: &str) -> Result<Vec<Event>>;
    async fn allocations(&self, payment_id: PaymentId) -> Result<Vec<Allocation>>;
    /// Every request made to the processor for a payment, oldest first.
    async fn calls(&self, payment_id: PaymentId) -> Result<Vec<Call>>;
    async fn notifications(&self, member_id: Option<MemberId>) -> Result<Vec<Notification>>;

    // The engine. Each call is one transaction; every write that finishes a payment names its
    // lease, so a worker whose lease was taken over records nothing.

    /// Active schedules whose next occurrence is due.
    async fn due_schedules(&self, now: Timestamp, limit: u32) -> Result<Vec<Schedule>>;
    /// Writes a schedule's due occurrences and moves its cursor; false when the schedule changed
    /// since it was read (another planner got there first, or an operator changed it).
    async fn apply_plan(&self, step: &PlanStep, audit: &Audit) -> Result<bool>;
    /// [`Store::apply_plan`] for several schedules in one transaction, in order: all are
    /// written together or none is.
    async fn apply_plans(&self, steps: &[PlanStep], audit: &Audit) -> Result<Vec<bool>>;
    /// Claims up to `rules.limit` payments: due charges (unless charging is paused; a payment
    /// too late or coalesced is recorded as missed instead), and attempts to settle (unknown
    /// outcomes due for a lookup, claims that expired mid-call).
    async fn claim_work(
        &self,
        owner: &str,
        now: Timestamp,
        rules: &ClaimRules,
    ) -> Result<Vec<Work>>;
    /// Extends leases this worker still holds; returns how many it still holds.
    async fn renew_leases(&self, leases: &[Lease], until: Timestamp) -> Result<u64>;
    /// Starts the attempt of a claimed payment that has none sent: freezes the amount (or ends
    /// the payment: nothing owed, covered by credit, over the limit, card gone, card at its
    /// limit), re-checks the charging pause, and stores the exact request, `first_sent_at` and
    /// the call's row, all in one transaction committed before the request is written.
    async fn begin_attempt(
        &self,
        lease: &Lease,
        policy: &OutcomePolicy,
        audit: &Audit,
    ) -> Result<Next>;
    /// The sent attempt of a claimed (or operator-taken) payment, if its attempt was sent.
    async fn sent_attempt(&self, lease: &Lease) -> Result<Option<SentFacts>>;
    /// Sends the stored request of a sent attempt again: checks the lease, the key window, the
    /// card's limits and the charging pause immediately before, in the transaction that opens
    /// the call's row.
    async fn begin_resend(
        &self,
        lease: &Lease,
        by: Settler,
        policy: &OutcomePolicy,
        audit: &Audit,
    ) -> Result<Next>;
    /// Records a charge request's answer (`call`: its row; None when the wait for a busy
    /// processor ran out) and what follows from it, with the allocations, balances, outbox row
    /// and audit event, in one transaction that names the lease.
    async fn record_charge(
        &self,
        lease: &Lease,
        call: Option<Uuid>,
        answer: &crate::domain::attempt::Answer,
        policy: &OutcomePolicy,
        audit: &Audit,
    ) -> Result<Next>;
    /// Several attempts' steps ([`Store::begin_attempt`], [`Store::record_charge`]) in one
    /// transaction, in order: a group commit. All are committed together or none is: an error
    /// in any step rolls every one back, and the caller runs each on its own.
    async fn charge_steps(&self, steps: &[ChargeStep], policy: &OutcomePolicy)
    -> Result<Vec<Next>>;
    /// Records a lookup's answer and what follows: a definite outcome, a resend of the same
    /// request (whose call row it opens), another lookup later, or an operator's decision.
    async fn record_lookup(
        &self,
        lease: &Lease,
        answer: &crate::domain::attempt::LookupAnswer,
        by: Settler,
        policy: &OutcomePolicy,
        audit: &Audit,
    ) -> Result<Next>;
    /// The earliest moment any work falls due (charges only while charging runs).
    async fn next_wakeup(&self) -> Result<Option<Timestamp>>;
    async fn attempt_stats(&self, since: Timestamp) -> Result<AttemptStats>;
    /// Pauses charging with a reason (`None` resumes it).
    async fn set_charging_pause(&self, reason: Option<&str>, audit: &Audit) -> Result<Control>;
    /// Operator: a `failed` or `missed` payment goes again with a new key.
    async fn retry_payment(&self, id: PaymentId, force: bool, audit: &Audit) -> Result<Payment>;
    /// Operator: takes an `unknown` or `needs_review` payment under a lease of its own, so
    /// that no worker settles it while the operator asks the processor and decides.
    async fn take_for_operator(
        &self,
        id: PaymentId,
        lease: std::time::Duration,
        audit: &Audit,
    ) -> Result<Taken>;
    /// Operator: gives a taken payment back untouched.
    async fn give_back(&self, lease: &Lease) -> Result<bool>;
    /// Operator: settles a taken `unknown` or `needs_review` payment, recording the attempt's
    /// outcome.
    async fn resolve_payment(&self, resolve: &Resolve, audit: &Audit) -> Result<Payment>;

    // The outbox.

    /// Writes an outbox row unless one with its dedupe key exists; true when written.
    async fn enqueue(&self, notification: &NewNotification, at: Timestamp) -> Result<bool>;
    /// Expires stale rows, then claims up to `limit` due ones as leases.
    async fn claim_notifications(
        &self,
        owner: &str,
        now: Timestamp,
        lease: std::time::Duration,
        limit: u32,
    ) -> Result<Vec<Outgoing>>;
    /// Records delivery attempts in one transaction (a grouped commit); for each, false when
    /// its lease was lost (nothing recorded for it).
    async fn finish_notifications(&self, done: &[Delivered], now: Timestamp) -> Result<Vec<bool>>;
    /// Records one delivery attempt; false when the lease was lost (nothing recorded).
    async fn finish_notification(
        &self,
        lease: &NotificationLease,
        outcome: &DeliveryOutcome,
        now: Timestamp,
    ) -> Result<bool> {
        let done = [Delivered {
            lease: *lease,
            outcome: outcome.clone(),
        }];
        Ok(self.finish_notifications(&done, now).await?.first() == Some(&true))
    }
    /// Records (or, with `None`, clears) "mail paused" after a session-level refusal.
    async fn set_mail_pause(&self, reason: Option<&str>, now: Timestamp) -> Result<()>;
    /// Active schedules due in (`after`, `until`] whose member wants reminders.
    async fn schedules_due_between(
        &self,
        after: Timestamp,
        until: Timestamp,
    ) -> Result<Vec<Schedule>>;
    /// Deletes outbox rows that are done (sent, failed or expired) since before `before`: they
    /// hold names and addresses, and `email.keep_sent` says how long they are kept.
    async fn prune_notifications(&self, before: Timestamp) -> Result<u64>;
    /// Deletes the periodic-job rows of workers that last ran before `before`: every process
    /// has a worker id of its own, so each restart adds rows.
    async fn prune_job_runs(&self, before: Timestamp) -> Result<u64>;
    /// Calls `changed` whenever the database may hold new work written by another process or
    /// host (a payment added by the command line, a notification queued elsewhere), until
    /// `stop` fires: PostgreSQL LISTEN/NOTIFY, or SQLite's `data_version` checked every 200 ms.
    /// A wake-up that finds nothing costs one look; a missed one costs at most
    /// `daemon.poll_interval`.
    async fn watch(
        &self,
        changed: &(dyn Fn() + Send + Sync),
        stop: &crate::shutdown::Shutdown,
    ) -> Result<()>;
    /// Records that periodic job `job` ran on `worker` at `at`.
    async fn record_job_run(&self, job: &str, worker: &str, at: Timestamp) -> Result<()>;
    /// What is happening now, for `autopay status`: the backlog, the next due work, the last
    /// run of each periodic job (any worker), and what went wrong since `since`.
    async fn activity(&self, now: Timestamp, since: Timestamp) -> Result<Activity>;
    /// The database server's own clock, where it has one of its own (PostgreSQL; None for
    /// SQLite, which reads this host's), so that `run` can warn about clock skew.
    async fn database_clock(&self) -> Result<Option<Timestamp>>;
    /// Payments due by `now` and not yet claimed: how many, and since when the oldest waits.
    async fn due_backlog(&self, now: Timestamp) -> Result<(i64, Option<Timestamp>)>;
    /// The earliest moment a notification is due to be sent (or its claim expires).
    async fn next_mail_due(&self) -> Result<Option<Timestamp>>;
    /// Active cards expiring by `by` that a live schedule uses, with their member.
    async fn cards_expiring(&self, by: jiff::civil::Date) -> Result<Vec<(Card, Member)>>;

    /// Writes an online copy of the database to `path` (SQLite's `VACUUM INTO`) and marks the
    /// copy "reconcile required" as of `at`. PostgreSQL answers `Unsupported`: pg_dump is its
    /// route.
    async fn backup_into(&self, path: &std::path::Path, at: Timestamp) -> Result<()>;
    /// Sets (or, with `None`, clears) the "reconcile required" mark. A mark already set is never
    /// moved later. While it is set, the database requires a binary that knows the mark
    /// ([`RECONCILE_SCHEMA`]), so that rolling back to an older release cannot run it.
    async fn set_reconcile_mark(&self, since: Option<Timestamp>, audit: &Audit) -> Result<()>;
    /// When the newest charge request the database records was made: a restored database is
    /// complete up to about then. Audit events are not counted: commands run after a restore
    /// write them too.
    async fn newest_attempt(&self) -> Result<Option<Timestamp>>;
    /// Which of `keys` the database knows, as an attempt or as a finding.
    async fn known_keys(&self, keys: &[String]) -> Result<std::collections::HashSet<String>>;
    /// Records what the processor says about one attempt that a restored database may not
    /// know ([`crate::domain::reconcile::decide`]), in one transaction. With `last_try`, an
    /// approval whose occurrence has no payment becomes a finding; without it, the caller is
    /// told it is `Unplanned` so that it can plan the schedule first.
    async fn reconcile_attempt(
        &self,
        found: &crate::domain::attempt::ProcessorAttempt,
        last_try: bool,
        audit: &Audit,
    ) -> Result<Reconciled>;
    /// Findings, oldest first; only those not yet acknowledged with `open_only`.
    async fn findings(&self, open_only: bool) -> Result<Vec<Finding>>;
    /// An operator's acknowledgement of a finding, with what was done about it.
    async fn acknowledge_finding(&self, id: Uuid, note: &str, audit: &Audit) -> Result<Finding>;
    /// How many active cards each processor (and mode) holds: the daemon refuses to start
    /// with cards it cannot charge.
    async fn card_processors(&self) -> Result<Vec<CardProcessor>>;
    /// Whether a processor webhook event was handled already.
    async fn webhook_seen(&self, id: &str) -> Result<bool>;
    /// Records a handled webhook event; false when it was recorded before.
    async fn record_webhook(
        &self,
        id: &str,
        kind: &str,
        outcome: &str,
        at: Timestamp,
    ) -> Result<bool>;
    /// Brings the lookup of an `unknown` payment's attempt forward to `at` (the processor said
    /// it has an answer), and wakes the workers. False when the payment is no longer waiting
    /// on that attempt.
    async fn settle_soon(&self, payment_id: PaymentId, attempt: i64, at: Timestamp)
    -> Result<bool>;
    /// Writes the processor's details onto every card with this token (and when they were
    /// read), and re-enables one that was disabled with `reenable_reason` (expiry) only; an
    /// audit event when anything changed. Returns the cards after.
    async fn refresh_card(
        &self,
        processor: &str,
        token: &str,
        details: &crate::processor::CardDetails,
        reenable_reason: Option<&str>,
        audit: &Audit,
    ) -> Result<Vec<Card>>;
    /// Marks the cards with this token as read back at `at`, when the processor could not
    /// answer (so the next batch moves on).
    async fn card_checked(&self, processor: &str, token: &str, at: Timestamp) -> Result<()>;
    /// Tokens of `processor`'s active cards that expire by `by`, pay an active schedule, and
    /// whose details were not read since `checked_before`; at most `limit`.
    async fn cards_to_refresh(
        &self,
        processor: &str,
        by: jiff::civil::Date,
        checked_before: Timestamp,
        limit: u32,
    ) -> Result<Vec<String>>;
    /// Records a refund or dispute (`what`) of a payment's charge as an audit event, and does
    /// what a dispute's `action` asks to the payment's card and its schedules. No payment state
    /// or balance changes.
    async fn record_processor_event(
        &self,
        payment_id: PaymentId,
        what: &str,
        detail: &serde_json::Value,
        action: crate::domain::dispute::DisputeAction,
        audit: &Audit,
    ) -> Result<()>;
}

/// Opens the store a URL names, every call retried on contention. SQLite files are created when
/// missing; nothing is migrated.
pub async fn open(url: &DatabaseUrl, max_connections: u32) -> Result<Arc<dyn Store>> {
    let store: Arc<dyn Store> = match url.backend() {
        Backend::Sqlite => Arc::new(sqlite::SqliteStore::open(url, max_connections).await?),
        Backend::Postgres => Arc::new(postgres::PgStore::open(url, max_connections).await?),
    };
    Ok(Arc::new(retry::Retrying::new(store)))
}

/// Refuses a database whose schema this binary does not match (docs/architecture.md: exit 78).
pub async fn require_current_schema(store: &dyn Store) -> Result<()> {
    let state = store.schema_state().await?;
    if state.applied < SCHEMA_VERSION {
        return Err(StoreError::Schema(format!(
            "the database is at schema version {} and this autopay needs {SCHEMA_VERSION}; run `autopay migrate`",
            state.applied
        )));
    }
    if state.min_binary > SCHEMA_VERSION {
        return Err(StoreError::Schema(format!(
            "the database requires an autopay that knows schema version {} or later, and this one knows {SCHEMA_VERSION}; upgrade autopay",
            state.min_binary
        )));
    }
    Ok(())
}
