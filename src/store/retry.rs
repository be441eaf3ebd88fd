//! Every store call is one transaction. PostgreSQL may abort one that deadlocked or could not be
//! serialized (SQLSTATE 40P01, 40001) although autopay takes its row locks in one order
//! (docs/architecture.md): such a call is run again from its start, a few times, before its
//! caller hears of it, and then as "unavailable, try again", never as a bug.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use jiff::Timestamp;
use uuid::Uuid;

use super::*;
use crate::config::Backend;
use crate::domain::ids::{CardId, MemberId, PaymentId, ScheduleId};
use crate::domain::member::AccountNumber;
use crate::domain::money::Money;
use crate::domain::payment::PaymentState;

/// How many times one call runs before its caller hears of the contention.
const TRIES: u32 = 5;
/// The wait before the second run; doubled before each next one.
const FIRST_WAIT: Duration = Duration::from_millis(10);

/// Runs `call` until it does not fail with [`StoreError::Contention`], at most [`TRIES`] times.
pub async fn again<T, F, Fut>(mut call: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut wait = FIRST_WAIT;
    let mut tries = 1;
    loop {
        match call().await {
            Err(StoreError::Contention(why)) if tries < TRIES => {
                tracing::debug!(tries, reason = %why, "a transaction met another; running it again");
                // A little spread, so that the two transactions do not meet again in step.
                let spread =
                    Duration::from_micros(u64::from(uuid::Uuid::new_v4().as_u128() as u16));
                tokio::time::sleep(wait + spread).await;
                wait *= 2;
                tries += 1;
            }
            Err(StoreError::Contention(why)) => {
                return Err(StoreError::Unavailable(format!(
                    "{why}; it happened {TRIES} times in a row, so the database is very busy: try again"
                )));
            }
            done => return done,
        }
    }
}

/// A store whose every call is retried on contention.
pub struct Retrying {
    inner: Arc<dyn Store>,
}

impl Retrying {
    pub fn new(inner: Arc<dyn Store>) -> Retrying {
        Retrying { inner }
    }
}

macro_rules! retried {
    ($(fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty;)*) => {
        #[async_trait]
        impl Store for Retrying {
            fn backend(&self) -> Backend {
                self.inner.backend()
            }
            async fn watch(
                &self,
                changed: &(dyn Fn() + Send + Sync),
                stop: &crate::shutdown::Shutdown,
            ) -> Result<()> {
                // A watch runs for the whole life of the daemon; its caller restarts it.
                self.inner.watch(changed, stop).await
            }
            $(
                async fn $name(&self $(, $arg: $ty)*) -> Result<$ret> {
                    again(|| self.inner.$name($($arg),*)).await
                }
            )*
        }
    };
}

retried! {
    fn migrate(now: Timestamp) -> MigrationReport;
    fn schema_state() -> SchemaState;
    fn control() -> Control;
    fn status() -> StatusReport;
    fn add_member(new: &NewMember, audit: &Audit) -> Member;
    fn member(account: &AccountNumber) -> Member;
    fn member_by_id(id: MemberId) -> Member;
    fn list_members() -> Vec<Member>;
    fn update_member(account: &AccountNumber, change: &MemberChange, audit: &Audit) -> Member;
    fn close_member(account: &AccountNumber, audit: &Audit) -> ClosedMember;
    fn add_card(new: &NewCard, audit: &Audit) -> Card;
    fn card(id: CardId) -> Card;
    fn list_cards(member_id: MemberId) -> Vec<Card>;
    fn remove_card(id: CardId, audit: &Audit) -> Card;
    fn add_bills(bills: &[NewBill], audit: &Audit) -> BillImport;
    fn bill(id: Uuid) -> Bill;
    fn list_bills(member_id: Option<MemberId>) -> Vec<Bill>;
    fn void_bill(id: Uuid, reason: &str, audit: &Audit) -> BillChange;
    fn adjust_bill(id: Uuid, amount_due: Money, reason: &str, audit: &Audit) -> BillChange;
    fn pay_bill_external(id: Uuid, amount: Money, reference: &str, audit: &Audit) -> BillChange;
    fn list_credits(member_id: MemberId) -> Vec<Credit>;
    fn add_schedule(new: &NewSchedule, audit: &Audit) -> Schedule;
    fn schedule(id: ScheduleId) -> Schedule;
    fn list_schedules(member_id: Option<MemberId>) -> Vec<Schedule>;
    fn update_schedule(change: &ScheduleChange, audit: &Audit) -> Schedule;
    fn pause_schedule(id: ScheduleId, audit: &Audit) -> Schedule;
    fn resume_schedule(resume: &ScheduleResume, audit: &Audit) -> Schedule;
    fn cancel_schedule(id: ScheduleId, audit: &Audit) -> Schedule;
    fn payment(id: PaymentId) -> Payment;
    fn list_payments(member_id: Option<MemberId>, state: Option<PaymentState>) -> Vec<Payment>;
    fn events(entity_id: &str) -> Vec<Event>;
    fn allocations(payment_id: PaymentId) -> Vec<Allocation>;
    fn calls(payment_id: PaymentId) -> Vec<Call>;
    fn notifications(member_id: Option<MemberId>) -> Vec<Notification>;
    fn due_schedules(now: Timestamp, limit: u32) -> Vec<Schedule>;
    fn apply_plan(step: &PlanStep, audit: &Audit) -> bool;
    fn apply_plans(steps: &[PlanStep], audit: &Audit) -> Vec<bool>;
    fn claim_work(owner: &str, now: Timestamp, rules: &ClaimRules) -> Vec<Work>;
    fn renew_leases(leases: &[Lease], until: Timestamp) -> u64;
    fn begin_attempt(lease: &Lease, policy: &OutcomePolicy, audit: &Audit) -> Next;
    fn sent_attempt(lease: &Lease) -> Option<SentFacts>;
    fn begin_resend(lease: &Lease, by: Settler, policy: &OutcomePolicy, audit: &Audit) -> Next;
    fn record_charge(lease: &Lease, call: Option<Uuid>, answer: &Answer, policy: &OutcomePolicy, audit: &Audit) -> Next;
    fn charge_steps(steps: &[ChargeStep], policy: &OutcomePolicy) -> Vec<Next>;
    fn record_lookup(lease: &Lease, answer: &LookupAnswer, by: Settler, policy: &OutcomePolicy, audit: &Audit) -> Next;
    fn next_wakeup() -> Option<Timestamp>;
    fn attempt_stats(since: Timestamp) -> AttemptStats;
    fn set_charging_pause(reason: Option<&str>, audit: &Audit) -> Control;
    fn retry_payment(id: PaymentId, force: bool, audit: &Audit) -> Payment;
    fn take_for_operator(id: PaymentId, lease: std::time::Duration, audit: &Audit) -> Taken;
    fn give_back(lease: &Lease) -> bool;
    fn resolve_payment(resolve: &Resolve, audit: &Audit) -> Payment;
    fn enqueue(notification: &NewNotification, at: Timestamp) -> bool;
    fn claim_notifications(owner: &str, now: Timestamp, lease: std::time::Duration, limit: u32) -> Vec<Outgoing>;
    fn finish_notifications(done: &[Delivered], now: Timestamp) -> Vec<bool>;
    fn set_mail_pause(reason: Option<&str>, now: Timestamp) -> ();
    fn schedules_due_between(after: Timestamp, until: Timestamp) -> Vec<Schedule>;
    fn prune_notifications(before: Timestamp) -> u64;
    fn prune_job_runs(before: Timestamp) -> u64;
    fn next_mail_due() -> Option<Timestamp>;
    fn due_backlog(now: Timestamp) -> (i64, Option<Timestamp>);
    fn database_clock() -> Option<Timestamp>;
    fn record_job_run(job: &str, worker: &str, at: Timestamp) -> ();
    fn activity(now: Timestamp, since: Timestamp) -> Activity;
    fn cards_expiring(by: jiff::civil::Date) -> Vec<(Card, Member)>;
    fn backup_into(path: &std::path::Path, at: Timestamp) -> ();
    fn set_reconcile_mark(since: Option<Timestamp>, audit: &Audit) -> ();
    fn newest_attempt() -> Option<Timestamp>;
    fn known_keys(keys: &[String]) -> std::collections::HashSet<String>;
    fn reconcile_attempt(found: &crate::domain::attempt::ProcessorAttempt, last_try: bool, audit: &Audit) -> Reconciled;
    fn findings(open_only: bool) -> Vec<Finding>;
    fn acknowledge_finding(id: Uuid, note: &str, audit: &Audit) -> Finding;
    fn card_processors() -> Vec<CardProcessor>;
    fn webhook_seen(id: &str) -> bool;
    fn record_webhook(id: &str, kind: &str, outcome: &str, at: Timestamp) -> bool;
    fn settle_soon(payment_id: PaymentId, attempt: i64, at: Timestamp) -> bool;
    fn refresh_card(processor: &str, token: &str, details: &crate::processor::CardDetails, reenable_reason: Option<&str>, audit: &Audit) -> Vec<Card>;
    fn card_checked(processor: &str, token: &str, at: Timestamp) -> ();
    fn cards_to_refresh(processor: &str, by: jiff::civil::Date, checked_before: Timestamp, limit: u32) -> Vec<String>;
    fn record_processor_event(payment_id: PaymentId, what: &str, detail: &serde_json::Value, action: crate::domain::dispute::DisputeAction, audit: &Audit) -> ();
}
