//! The one [`Store`] implementation, for either backend: each method is a call into the
//! aggregate that holds it, so that this list reads as the store's table of contents.

use async_trait::async_trait;
use jiff::Timestamp;
use uuid::Uuid;

use crate::domain::attempt::{Answer, LookupAnswer, ProcessorAttempt};
use crate::domain::ids::{CardId, MemberId, PaymentId, ScheduleId};
use crate::domain::member::AccountNumber;
use crate::domain::money::Money;
use crate::domain::payment::PaymentState;
use crate::store::sql::{
    Backend, SqlStore, bills, cards, control, members, outbox, payments, reconcile, schedules,
};
use crate::store::{
    Activity, Allocation, AttemptStats, Audit, Bill, BillChange, BillImport, Call, Card,
    CardProcessor, ChargeStep, ClaimRules, ClosedMember, Control, Credit, Delivered, Event,
    Finding, Lease, Member, MemberChange, MigrationReport, NewBill, NewCard, NewMember,
    NewNotification, NewSchedule, Next, Notification, OutcomePolicy, Outgoing, Payment, PlanStep,
    Reconciled, Resolve, Result, Schedule, ScheduleChange, ScheduleResume, SchemaState, SentFacts,
    Settler, StatusReport, Store, Taken, Work,
};

#[async_trait]
impl<B: Backend> Store for SqlStore<B> {
    fn backend(&self) -> crate::config::Backend {
        B::KIND
    }

    async fn migrate(&self, now: Timestamp) -> Result<MigrationReport> {
        control::migrate(self, now).await
    }

    async fn schema_state(&self) -> Result<SchemaState> {
        control::schema_state(self).await
    }

    async fn control(&self) -> Result<Control> {
        control::control(self).await
    }

    async fn status(&self) -> Result<StatusReport> {
        control::status(self).await
    }

    async fn add_member(&self, new: &NewMember, audit: &Audit) -> Result<Member> {
        members::add_member(self, new, audit).await
    }

    async fn member(&self, account: &AccountNumber) -> Result<Member> {
        members::member(self, account).await
    }

    async fn member_by_id(&self, member_id: MemberId) -> Result<Member> {
        members::member_by_id(self, member_id).await
    }

    async fn list_members(&self) -> Result<Vec<Member>> {
        members::list_members(self).await
    }

    async fn update_member(
        &self,
        account: &AccountNumber,
        change: &MemberChange,
        audit: &Audit,
    ) -> Result<Member> {
        members::update_member(self, account, change, audit).await
    }

    async fn close_member(&self, account: &AccountNumber, audit: &Audit) -> Result<ClosedMember> {
        members::close_member(self, account, audit).await
    }

    async fn add_card(&self, new: &NewCard, audit: &Audit) -> Result<Card> {
        cards::add_card(self, new, audit).await
    }

    async fn card(&self, card_id: CardId) -> Result<Card> {
        cards::card(self, card_id).await
    }

    async fn list_cards(&self, member_id: MemberId) -> Result<Vec<Card>> {
        cards::list_cards(self, member_id).await
    }

    async fn remove_card(&self, card_id: CardId, audit: &Audit) -> Result<Card> {
        cards::remove_card(self, card_id, audit).await
    }

    async fn add_bills(&self, bills: &[NewBill], audit: &Audit) -> Result<BillImport> {
        bills::add_bills(self, bills, audit).await
    }

    async fn bill(&self, bill_id: Uuid) -> Result<Bill> {
        bills::bill(self, bill_id).await
    }

    async fn list_bills(&self, member_id: Option<MemberId>) -> Result<Vec<Bill>> {
        bills::list_bills(self, member_id).await
    }

    async fn void_bill(&self, bill_id: Uuid, reason: &str, audit: &Audit) -> Result<BillChange> {
        bills::void_bill(self, bill_id, reason, audit).await
    }

    async fn adjust_bill(
        &self,
        bill_id: Uuid,
        amount_due: Money,
        reason: &str,
        audit: &Audit,
    ) -> Result<BillChange> {
        bills::adjust_bill(self, bill_id, amount_due, reason, audit).await
    }

    async fn pay_bill_external(
        &self,
        bill_id: Uuid,
        amount: Money,
        reference: &str,
        audit: &Audit,
    ) -> Result<BillChange> {
        bills::pay_bill_external(self, bill_id, amount, reference, audit).await
    }

    async fn list_credits(&self, member_id: MemberId) -> Result<Vec<Credit>> {
        bills::list_credits(self, member_id).await
    }

    async fn add_schedule(&self, new: &NewSchedule, audit: &Audit) -> Result<Schedule> {
        schedules::add_schedule(self, new, audit).await
    }

    async fn schedule(&self, schedule_id: ScheduleId) -> Result<Schedule> {
        schedules::schedule(self, schedule_id).await
    }

    async fn list_schedules(&self, member_id: Option<MemberId>) -> Result<Vec<Schedule>> {
        schedules::list_schedules(self, member_id).await
    }

    async fn update_schedule(&self, change: &ScheduleChange, audit: &Audit) -> Result<Schedule> {
        schedules::update_schedule(self, change, audit).await
    }

    async fn pause_schedule(&self, schedule_id: ScheduleId, audit: &Audit) -> Result<Schedule> {
        schedules::pause_schedule(self, schedule_id, audit).await
    }

    async fn resume_schedule(&self, resume: &ScheduleResume, audit: &Audit) -> Result<Schedule> {
        schedules::resume_schedule(self, resume, audit).await
    }

    async fn cancel_schedule(&self, schedule_id: ScheduleId, audit: &Audit) -> Result<Schedule> {
        schedules::cancel_schedule(self, schedule_id, audit).await
    }

    async fn payment(&self, payment_id: PaymentId) -> Result<Payment> {
        payments::payment(self, payment_id).await
    }

    async fn list_payments(
        &self,
        member_id: Option<MemberId>,
        state: Option<PaymentState>,
    ) -> Result<Vec<Payment>> {
        payments::list_payments(self, member_id, state).await
    }

    async fn events(&self, entity_id: &str) -> Result<Vec<Event>> {
        control::events(self, entity_id).await
    }

    async fn allocations(&self, payment_id: PaymentId) -> Result<Vec<Allocation>> {
        payments::allocations(self, payment_id).await
    }

    async fn calls(&self, payment_id: PaymentId) -> Result<Vec<Call>> {
        payments::calls(self, payment_id).await
    }

    async fn notifications(&self, member_id: Option<MemberId>) -> Result<Vec<Notification>> {
        outbox::notifications(self, member_id).await
    }

    async fn due_schedules(&self, now: Timestamp, limit: u32) -> Result<Vec<Schedule>> {
        schedules::plan::due_schedules(self, now, limit).await
    }

    async fn apply_plan(&self, step: &PlanStep, audit: &Audit) -> Result<bool> {
        schedules::plan::apply_plan(self, step, audit).await
    }

    async fn apply_plans(&self, steps: &[PlanStep], audit: &Audit) -> Result<Vec<bool>> {
        schedules::plan::apply_plans(self, steps, audit).await
    }

    async fn claim_work(
        &self,
        owner: &str,
        now: Timestamp,
        rules: &ClaimRules,
    ) -> Result<Vec<Work>> {
        payments::claim::claim_work(self, owner, now, rules).await
    }

    async fn renew_leases(&self, leases: &[Lease], until: Timestamp) -> Result<u64> {
        payments::claim::renew_leases(self, leases, until).await
    }

    async fn begin_attempt(
        &self,
        lease: &Lease,
        policy: &OutcomePolicy,
        audit: &Audit,
    ) -> Result<Next> {
        payments::attempt::begin_attempt(self, lease, policy, audit).await
    }

    async fn sent_attempt(&self, lease: &Lease) -> Result<Option<SentFacts>> {
        payments::attempt::sent_attempt(self, lease).await
    }

    async fn begin_resend(
        &self,
        lease: &Lease,
        by: Settler,
        policy: &OutcomePolicy,
        audit: &Audit,
    ) -> Result<Next> {
        payments::attempt::begin_resend(self, lease, by, policy, audit).await
    }

    async fn record_charge(
        &self,
        lease: &Lease,
        call: Option<Uuid>,
        answer: &Answer,
        policy: &OutcomePolicy,
        audit: &Audit,
    ) -> Result<Next> {
        payments::attempt::record_charge(self, lease, call, answer, policy, audit).await
    }

    async fn charge_steps(
        &self,
        steps: &[ChargeStep],
        policy: &OutcomePolicy,
    ) -> Result<Vec<Next>> {
        payments::group::charge_steps(self, steps, policy).await
    }

    async fn record_lookup(
        &self,
        lease: &Lease,
        answer: &LookupAnswer,
        by: Settler,
        policy: &OutcomePolicy,
        audit: &Audit,
    ) -> Result<Next> {
        payments::operator::record_lookup(self, lease, answer, by, policy, audit).await
    }

    async fn next_wakeup(&self) -> Result<Option<Timestamp>> {
        payments::claim::next_wakeup(self).await
    }

    async fn attempt_stats(&self, since: Timestamp) -> Result<AttemptStats> {
        control::attempt_stats(self, since).await
    }

    async fn set_charging_pause(&self, reason: Option<&str>, audit: &Audit) -> Result<Control> {
        control::set_charging_pause(self, reason, audit).await
    }

    async fn retry_payment(
        &self,
        payment_id: PaymentId,
        force: bool,
        audit: &Audit,
    ) -> Result<Payment> {
        payments::operator::retry_payment(self, payment_id, force, audit).await
    }

    async fn take_for_operator(
        &self,
        payment_id: PaymentId,
        lease: std::time::Duration,
        audit: &Audit,
    ) -> Result<Taken> {
        payments::operator::take_for_operator(self, payment_id, lease, audit).await
    }

    async fn give_back(&self, lease: &Lease) -> Result<bool> {
        payments::operator::give_back(self, lease).await
    }

    async fn resolve_payment(&self, resolve: &Resolve, audit: &Audit) -> Result<Payment> {
        payments::operator::resolve_payment(self, resolve, audit).await
    }

    async fn enqueue(&self, n: &NewNotification, at: Timestamp) -> Result<bool> {
        outbox::enqueue(self, n, at).await
    }

    async fn claim_notifications(
        &self,
        owner: &str,
        now: Timestamp,
        lease: std::time::Duration,
        limit: u32,
    ) -> Result<Vec<Outgoing>> {
        outbox::claim_notifications(self, owner, now, lease, limit).await
    }

    async fn finish_notifications(&self, done: &[Delivered], now: Timestamp) -> Result<Vec<bool>> {
        outbox::finish_notifications(self, done, now).await
    }

    async fn set_mail_pause(&self, reason: Option<&str>, now: Timestamp) -> Result<()> {
        outbox::set_mail_pause(self, reason, now).await
    }

    async fn schedules_due_between(
        &self,
        after: Timestamp,
        until: Timestamp,
    ) -> Result<Vec<Schedule>> {
        schedules::plan::schedules_due_between(self, after, until).await
    }

    async fn prune_notifications(&self, before: Timestamp) -> Result<u64> {
        outbox::prune_notifications(self, before).await
    }

    async fn prune_job_runs(&self, before: Timestamp) -> Result<u64> {
        control::prune_job_runs(self, before).await
    }

    async fn watch(
        &self,
        changed: &(dyn Fn() + Send + Sync),
        stop: &crate::shutdown::Shutdown,
    ) -> Result<()> {
        B::watch(self, changed, stop).await
    }

    async fn record_job_run(&self, job: &str, worker: &str, at: Timestamp) -> Result<()> {
        control::record_job_run(self, job, worker, at).await
    }

    async fn activity(&self, now: Timestamp, since: Timestamp) -> Result<Activity> {
        control::activity(self, now, since).await
    }

    async fn database_clock(&self) -> Result<Option<Timestamp>> {
        control::database_clock(self).await
    }

    async fn due_backlog(&self, now: Timestamp) -> Result<(i64, Option<Timestamp>)> {
        payments::claim::due_backlog(self, now).await
    }

    async fn next_mail_due(&self) -> Result<Option<Timestamp>> {
        outbox::next_mail_due(self).await
    }

    async fn cards_expiring(&self, by: jiff::civil::Date) -> Result<Vec<(Card, Member)>> {
        cards::cards_expiring(self, by).await
    }

    async fn backup_into(&self, path: &std::path::Path, at: Timestamp) -> Result<()> {
        B::backup_into(self, path, at).await
    }

    async fn set_reconcile_mark(&self, since: Option<Timestamp>, audit: &Audit) -> Result<()> {
        control::set_reconcile_mark(self, since, audit).await
    }

    async fn newest_attempt(&self) -> Result<Option<Timestamp>> {
        reconcile::newest_attempt(self).await
    }

    async fn known_keys(&self, keys: &[String]) -> Result<std::collections::HashSet<String>> {
        reconcile::known_keys(self, keys).await
    }

    async fn reconcile_attempt(
        &self,
        found: &ProcessorAttempt,
        last_try: bool,
        audit: &Audit,
    ) -> Result<Reconciled> {
        reconcile::reconcile_attempt(self, found, last_try, audit).await
    }

    async fn findings(&self, open_only: bool) -> Result<Vec<Finding>> {
        reconcile::findings(self, open_only).await
    }

    async fn acknowledge_finding(&self, id: Uuid, note: &str, audit: &Audit) -> Result<Finding> {
        reconcile::acknowledge_finding(self, id, note, audit).await
    }

    async fn card_processors(&self) -> Result<Vec<CardProcessor>> {
        cards::card_processors(self).await
    }

    async fn webhook_seen(&self, id: &str) -> Result<bool> {
        control::webhook_seen(self, id).await
    }

    async fn record_webhook(
        &self,
        id: &str,
        kind: &str,
        outcome: &str,
        at: Timestamp,
    ) -> Result<bool> {
        control::record_webhook(self, id, kind, outcome, at).await
    }

    async fn settle_soon(
        &self,
        payment_id: PaymentId,
        attempt: i64,
        at: Timestamp,
    ) -> Result<bool> {
        payments::operator::settle_soon(self, payment_id, attempt, at).await
    }

    async fn refresh_card(
        &self,
        processor: &str,
        token: &str,
        details: &crate::processor::CardDetails,
        reenable_reason: Option<&str>,
        audit: &Audit,
    ) -> Result<Vec<Card>> {
        cards::refresh_card(self, processor, token, details, reenable_reason, audit).await
    }

    async fn card_checked(&self, processor: &str, token: &str, at: Timestamp) -> Result<()> {
        cards::card_checked(self, processor, token, at).await
    }

    async fn cards_to_refresh(
        &self,
        processor: &str,
        by: jiff::civil::Date,
        checked_before: Timestamp,
        limit: u32,
    ) -> Result<Vec<String>> {
        cards::cards_to_refresh(self, processor, by, checked_before, limit).await
    }

    async fn record_processor_event(
        &self,
        payment_id: PaymentId,
        what: &str,
        detail: &serde_json::Value,
        action: crate::domain::dispute::DisputeAction,
        audit: &Audit,
    ) -> Result<()> {
        payments::operator::record_processor_event(self, payment_id, what, detail, action, audit)
            .await
    }
}
