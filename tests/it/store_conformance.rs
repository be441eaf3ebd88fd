//! One Store conformance suite, run unchanged against SQLite and PostgreSQL: each story gets a
//! fresh database on each backend.

use std::sync::Arc;

use autopay::domain::card::{CardBrand, Expiry, Last4};
use autopay::domain::ids::{CardId, PaymentId};
use autopay::domain::member::{AccountNumber, AccountType, EmailAddress, MemberName};
use autopay::domain::money::{Currency, Money};
use autopay::domain::payment::{AmountRule, PaymentState};
use autopay::domain::schedule::{End, Recurrence, RecurrenceSpec, Rule};
use autopay::domain::status::{
    AuthorizedVia, BillStatus, CardStatus, MemberStatus, ScheduleKind, ScheduleStatus,
};
use autopay::sqltypes::DbTime;
use autopay::store::{
    self, Audit, Card, Member, MemberChange, NewBill, NewCard, NewMember, NewSchedule, Schedule,
    ScheduleChange, ScheduleResume, Store, StoreError,
};
use jiff::Timestamp;

use crate::helpers::{Kind, TestDb};

fn audit() -> Audit {
    Audit {
        actor: "cli:tester".into(),
        at: "2026-11-30T14:00:00Z".parse().unwrap(),
    }
}

fn usd(s: &str) -> Money {
    Money::parse(s, Currency::USD).unwrap()
}

async fn member(store: &dyn Store, account: &str) -> Member {
    store
        .add_member(
            &NewMember {
                account_number: AccountNumber::parse(account).unwrap(),
                account_type: AccountType::IndividualFamily,
                name: MemberName::parse("Ana Díaz").unwrap(),
                email: EmailAddress::parse("ana@example.org").unwrap(),
                time_zone: "America/New_York".into(),
            },
            &audit(),
        )
        .await
        .unwrap()
}

async fn card(store: &dyn Store, member: &Member, token: &str) -> Card {
    store
        .add_card(
            &NewCard {
                member_id: member.id,
                processor: "simulated".into(),
                processor_token: token.into(),
                brand: CardBrand::Visa,
                last4: Last4::parse("4242").unwrap(),
                expiry: Expiry::new(12, 2030).unwrap(),
                fingerprint: None,
                customer: None,
                processor_mode: None,
                consent: autopay::store::Consent {
                    at: audit().at,
                    via: "cli".into(),
                    terms_version: None,
                },
            },
            &audit(),
        )
        .await
        .unwrap()
}

fn monthly(day: u8) -> Recurrence {
    Recurrence::new(RecurrenceSpec {
        rule: Rule::Monthly { day },
        at: jiff::civil::time(9, 0, 0, 0),
        time_zone: "America/New_York".into(),
        start: jiff::civil::date(2026, 12, 1),
        first_payment: None,
        end: End::Never,
        business_days: false,
        holidays: vec![],
    })
    .unwrap()
}

fn new_schedule(member: &Member, card: &Card, amount: AmountRule) -> NewSchedule {
    let recurrence = monthly(1);
    let first = recurrence.occurrences().next().unwrap();
    NewSchedule {
        member_id: member.id,
        card_id: card.id,
        kind: ScheduleKind::Recurring,
        recurrence,
        amount,
        currency: Currency::USD,
        next_run_at: Some(first.due_at),
        next_occurrence: Some(first.key),
        authorized_via: AuthorizedVia::Cli,
        terms_version: "2026-01".into(),
    }
}

fn bill(member: &Member, reference: &str, amount: &str, due: &str) -> NewBill {
    NewBill {
        member_id: member.id,
        reference: reference.into(),
        amount_due: usd(amount),
        due_date: due.parse().unwrap(),
        origin: format!("bill {reference}"),
    }
}

/// Writes a payment row directly, as the engine's planner will.
async fn insert_payment(
    db: &TestDb,
    kind: Kind,
    schedule: &Schedule,
    occurrence: &str,
    state: PaymentState,
) -> PaymentId {
    let id = PaymentId::new();
    let now: Timestamp = "2026-11-30T14:00:00Z".parse().unwrap();
    let sql = "INSERT INTO payments (id, schedule_id, member_id, occurrence, due_at, amount, currency, state, attempt, payment_method_id, schedule_version, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, 12500, 'USD', $6, 1, $7, $8, $5, $5)";
    macro_rules! run {
        ($pool:expr) => {
            sqlx::query(sql)
                .bind(id)
                .bind(schedule.id)
                .bind(schedule.member_id)
                .bind(occurrence)
                .bind(DbTime(now))
                .bind(state.as_str())
                .bind(schedule.card_id)
                .bind(schedule.version)
                .execute(&$pool)
                .await
                .unwrap()
        };
    }
    match kind {
        Kind::Sqlite => {
            let pool = sqlx::SqlitePool::connect(&db.url).await.unwrap();
            run!(pool);
        }
        Kind::Postgres => {
            let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
            run!(pool);
        }
    }
    id
}

/// Disables a card directly in the database with `reason`, as a decline would have.
async fn disable_card_as(db: &TestDb, kind: Kind, card_id: CardId, reason: &str) {
    let sql = "UPDATE payment_methods SET status = 'disabled', status_reason = $1 WHERE id = $2";
    match kind {
        Kind::Sqlite => {
            let pool = sqlx::SqlitePool::connect(&db.url).await.unwrap();
            let q = sqlx::query(sql).bind(reason).bind(card_id);
            q.execute(&pool).await.unwrap();
        }
        Kind::Postgres => {
            let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
            let q = sqlx::query(sql).bind(reason).bind(card_id);
            q.execute(&pool).await.unwrap();
        }
    }
}

/// A member with a card and a live statement-balance schedule.
async fn member_card_schedule(store: &dyn Store) -> (Member, Card, Schedule) {
    let m = member(store, "A-100200").await;
    let c = card(store, &m, "tok_visa").await;
    let s = store
        .add_schedule(&new_schedule(&m, &c, AmountRule::Balance), &audit())
        .await
        .unwrap();
    (m, c, s)
}

async fn setup(kind: Kind) -> (TestDb, Arc<dyn Store>) {
    let db = TestDb::new(kind).await;
    let store = db.store().await;
    (db, store)
}

async fn migrating_twice_changes_nothing_and_keeps_one_installation_id(kind: Kind) {
    let (_db, store) = setup(kind).await;
    let first = store.control().await.unwrap().installation_id;
    let again = store.migrate(Timestamp::now()).await.unwrap();
    assert!(again.applied.is_empty());
    assert_eq!(again.installation_id, first);
    store::require_current_schema(store.as_ref()).await.unwrap();
}

async fn an_unmigrated_database_is_refused_with_a_hint_to_migrate(kind: Kind) {
    let db = TestDb::new(kind).await;
    let store = store::open(&db.database_url(), 2).await.unwrap();
    let err = store::require_current_schema(store.as_ref())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Schema(_)), "{err:?}");
    assert!(err.to_string().contains("autopay migrate"));
}

async fn a_member_is_added_found_listed_and_never_duplicated(kind: Kind) {
    let (_db, store) = setup(kind).await;
    let m = member(store.as_ref(), "A-100200").await;
    assert_eq!(m.status, MemberStatus::Active);
    assert!(m.reminders);
    let found = store
        .member(&AccountNumber::parse("a-100200").unwrap())
        .await
        .unwrap();
    assert_eq!(found.id, m.id);
    assert_eq!(store.list_members().await.unwrap().len(), 1);
    let dup = store
        .add_member(
            &NewMember {
                account_number: AccountNumber::parse("A-100200").unwrap(),
                account_type: AccountType::EmployerGroup,
                name: MemberName::parse("Other").unwrap(),
                email: EmailAddress::parse("o@example.org").unwrap(),
                time_zone: "UTC".into(),
            },
            &audit(),
        )
        .await
        .unwrap_err();
    assert!(matches!(dup, StoreError::Conflict(_)), "{dup:?}");
    assert!(
        !dup.to_string().contains("A-100200"),
        "errors carry masked account numbers: {dup}"
    );
    let missing = store
        .member(&AccountNumber::parse("Z-999999").unwrap())
        .await
        .unwrap_err();
    assert!(matches!(missing, StoreError::NotFound(_)));
}

async fn updating_a_member_changes_only_what_is_given_and_is_audited(kind: Kind) {
    let (_db, store) = setup(kind).await;
    let m = member(store.as_ref(), "A-100200").await;
    let change = MemberChange {
        email: Some(EmailAddress::parse("new@example.org").unwrap()),
        reminders: Some(false),
        ..MemberChange::default()
    };
    let updated = store
        .update_member(&m.account_number, &change, &audit())
        .await
        .unwrap();
    assert_eq!(updated.email.as_str(), "new@example.org");
    assert!(!updated.reminders);
    assert_eq!(updated.name, m.name);
    let events = store.events(&m.id.to_string()).await.unwrap();
    assert_eq!(
        events.iter().map(|e| e.action.as_str()).collect::<Vec<_>>(),
        vec!["added", "updated"]
    );
    assert_eq!(events[1].actor, "cli:tester");
}

async fn a_card_in_use_cannot_be_removed_and_the_error_names_the_schedule(kind: Kind) {
    let (_db, store) = setup(kind).await;
    let m = member(store.as_ref(), "A-100200").await;
    let c = card(store.as_ref(), &m, "sim_approve_visa_4242_122030_a").await;
    let s = store
        .add_schedule(&new_schedule(&m, &c, AmountRule::Balance), &audit())
        .await
        .unwrap();
    let err = store.remove_card(c.id, &audit()).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)));
    assert!(err.to_string().contains(&s.id.to_string()), "{err}");
    store.cancel_schedule(s.id, &audit()).await.unwrap();
    let removed = store.remove_card(c.id, &audit()).await.unwrap();
    assert_eq!(removed.status, CardStatus::Removed);
    assert!(matches!(
        store.remove_card(c.id, &audit()).await,
        Err(StoreError::Conflict(_))
    ));
}

async fn a_member_has_at_most_one_live_balance_schedule(kind: Kind) {
    let (_db, store) = setup(kind).await;
    let m = member(store.as_ref(), "A-100200").await;
    let c = card(store.as_ref(), &m, "tok_visa").await;
    let first = store
        .add_schedule(&new_schedule(&m, &c, AmountRule::Balance), &audit())
        .await
        .unwrap();
    let err = store
        .add_schedule(&new_schedule(&m, &c, AmountRule::Balance), &audit())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    // A fixed-amount schedule beside it is fine, and so is a new balance one after cancelling.
    store
        .add_schedule(
            &new_schedule(
                &m,
                &c,
                AmountRule::Fixed {
                    amount: usd("25.00"),
                },
            ),
            &audit(),
        )
        .await
        .unwrap();
    store.cancel_schedule(first.id, &audit()).await.unwrap();
    store
        .add_schedule(&new_schedule(&m, &c, AmountRule::Balance), &audit())
        .await
        .unwrap();
}

async fn a_schedule_refuses_another_members_card(kind: Kind) {
    let (_db, store) = setup(kind).await;
    let a = member(store.as_ref(), "A-100200").await;
    let b = member(store.as_ref(), "B-100300").await;
    let b_card = card(store.as_ref(), &b, "tok_visa").await;
    let err = store
        .add_schedule(&new_schedule(&a, &b_card, AmountRule::Balance), &audit())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)));
    assert!(store.list_schedules(None).await.unwrap().is_empty());
}

async fn importing_bills_is_all_or_nothing_and_idempotent(kind: Kind) {
    let (_db, store) = setup(kind).await;
    let m = member(store.as_ref(), "A-100200").await;
    let rows = vec![
        bill(&m, "INV-1", "100.00", "2026-12-01"),
        bill(&m, "INV-2", "50.00", "2026-12-15"),
    ];
    let first = store.add_bills(&rows, &audit()).await.unwrap();
    assert_eq!((first.added.len(), first.unchanged), (2, 0));
    let again = store.add_bills(&rows, &audit()).await.unwrap();
    assert_eq!((again.added.len(), again.unchanged), (0, 2));
    // A new bill beside a conflicting one: nothing is stored.
    let bad = vec![
        bill(&m, "INV-3", "10.00", "2026-12-20"),
        bill(&m, "INV-1", "999.00", "2026-12-01"),
    ];
    let err = store.add_bills(&bad, &audit()).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)));
    assert!(err.to_string().contains("bill INV-1"), "{err}");
    assert_eq!(store.list_bills(Some(m.id)).await.unwrap().len(), 2);
}

async fn paying_outside_autopay_pays_the_bill_and_an_overpayment_becomes_credit(kind: Kind) {
    let (_db, store) = setup(kind).await;
    let m = member(store.as_ref(), "A-100200").await;
    let b = store
        .add_bills(&[bill(&m, "INV-1", "100.00", "2026-12-01")], &audit())
        .await
        .unwrap()
        .added[0]
        .clone();
    let part = store
        .pay_bill_external(b.id, usd("40.00"), "PHONE-1", &audit())
        .await
        .unwrap();
    assert_eq!(part.bill.amount_paid, usd("40.00"));
    assert_eq!(part.bill.status, BillStatus::Open);
    assert!(part.credit.is_none());
    let dup = store
        .pay_bill_external(b.id, usd("40.00"), "PHONE-1", &audit())
        .await
        .unwrap_err();
    assert!(matches!(dup, StoreError::Conflict(_)));
    let rest = store
        .pay_bill_external(b.id, usd("90.00"), "PORTAL-9", &audit())
        .await
        .unwrap();
    assert_eq!(rest.bill.status, BillStatus::Paid);
    assert_eq!(rest.bill.amount_paid, usd("100.00"));
    assert_eq!(rest.credit.as_ref().unwrap().amount, usd("30.00"));
    let credits = store.list_credits(m.id).await.unwrap();
    assert_eq!(credits.len(), 1);
    assert_eq!(credits[0].remaining, usd("30.00"));
}

async fn adjusting_below_what_was_paid_and_voiding_turn_payments_into_credit(kind: Kind) {
    let (_db, store) = setup(kind).await;
    let m = member(store.as_ref(), "A-100200").await;
    let added = store
        .add_bills(
            &[
                bill(&m, "INV-1", "100.00", "2026-12-01"),
                bill(&m, "INV-2", "80.00", "2026-12-02"),
            ],
            &audit(),
        )
        .await
        .unwrap()
        .added;
    store
        .pay_bill_external(added[0].id, usd("60.00"), "P1", &audit())
        .await
        .unwrap();
    let adjusted = store
        .adjust_bill(added[0].id, usd("45.00"), "plan change", &audit())
        .await
        .unwrap();
    assert_eq!(adjusted.bill.amount_due, usd("45.00"));
    assert_eq!(adjusted.bill.status, BillStatus::Paid);
    assert_eq!(adjusted.credit.unwrap().amount, usd("15.00"));
    store
        .pay_bill_external(added[1].id, usd("20.00"), "P2", &audit())
        .await
        .unwrap();
    let voided = store
        .void_bill(added[1].id, "billed in error", &audit())
        .await
        .unwrap();
    assert_eq!(voided.bill.status, BillStatus::Void);
    assert_eq!(voided.credit.unwrap().amount, usd("20.00"));
    assert!(matches!(
        store.void_bill(added[1].id, "again", &audit()).await,
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        store
            .adjust_bill(added[1].id, usd("1.00"), "x", &audit())
            .await,
        Err(StoreError::Conflict(_))
    ));
    let total: i64 = store
        .list_credits(m.id)
        .await
        .unwrap()
        .iter()
        .map(|c| c.remaining.minor())
        .sum();
    assert_eq!(total, 3500);
}

async fn pausing_cancels_unclaimed_payments_and_resuming_starts_from_now(kind: Kind) {
    let (db, store) = setup(kind).await;
    let (_, _, s) = member_card_schedule(store.as_ref()).await;
    let waiting = insert_payment(&db, kind, &s, "2026-12-01", PaymentState::RetryWait).await;
    let unknown = insert_payment(&db, kind, &s, "2026-11-01", PaymentState::Unknown).await;
    let paused = store.pause_schedule(s.id, &audit()).await.unwrap();
    assert_eq!(paused.status, ScheduleStatus::Paused);
    assert_eq!(paused.next_run_at, None);
    assert!(paused.version > s.version);
    assert_eq!(
        store.payment(waiting).await.unwrap().state,
        PaymentState::Cancelled
    );
    assert_eq!(
        store.payment(unknown).await.unwrap().state,
        PaymentState::Unknown,
        "unknown is settled, never cancelled"
    );
    assert!(matches!(
        store.pause_schedule(s.id, &audit()).await,
        Err(StoreError::Conflict(_))
    ));
    let resume_at: Timestamp = "2027-02-15T00:00:00Z".parse().unwrap();
    let next = paused
        .recurrence
        .occurrences_from(resume_at)
        .next()
        .unwrap();
    let resumed = store
        .resume_schedule(
            &ScheduleResume {
                id: s.id,
                expected_version: paused.version,
                next_run_at: Some(next.due_at),
                next_occurrence: Some(next.key),
            },
            &audit(),
        )
        .await
        .unwrap();
    assert_eq!(resumed.status, ScheduleStatus::Active);
    assert_eq!(resumed.next_occurrence.unwrap().to_string(), "2027-03-01");
}

async fn updating_a_schedule_bumps_its_version_and_replans_unclaimed_payments(kind: Kind) {
    let (db, store) = setup(kind).await;
    let m = member(store.as_ref(), "A-100200").await;
    let old = card(store.as_ref(), &m, "tok_visa").await;
    let new = card(store.as_ref(), &m, "tok_mastercard").await;
    let s = store
        .add_schedule(&new_schedule(&m, &old, AmountRule::Balance), &audit())
        .await
        .unwrap();
    let waiting = insert_payment(&db, kind, &s, "2026-12-01", PaymentState::RetryWait).await;
    let done = insert_payment(&db, kind, &s, "2026-11-01", PaymentState::Succeeded).await;
    let change = ScheduleChange {
        id: s.id,
        expected_version: s.version,
        card_id: new.id,
        recurrence: monthly(15),
        amount: AmountRule::Fixed {
            amount: usd("75.00"),
        },
        next_run_at: s.next_run_at,
        next_occurrence: s.next_occurrence,
        lift_suspension: true,
        summary: "card, amount, day".into(),
    };
    let updated = store.update_schedule(&change, &audit()).await.unwrap();
    assert_eq!(updated.version, s.version + 1);
    assert_eq!(updated.card_id, new.id);
    assert_eq!(
        updated.amount,
        AmountRule::Fixed {
            amount: usd("75.00")
        }
    );
    let replanned = store.payment(waiting).await.unwrap();
    assert_eq!(
        (
            replanned.card_id,
            replanned.schedule_version,
            replanned.amount
        ),
        (new.id, updated.version, None)
    );
    assert_eq!(
        store.payment(done).await.unwrap().card_id,
        old.id,
        "history is never rewritten"
    );
    let stale = store.update_schedule(&change, &audit()).await.unwrap_err();
    assert!(
        matches!(stale, StoreError::Conflict(_)),
        "a change prepared against an old version is refused"
    );
}

async fn closing_a_member_cancels_every_live_schedule(kind: Kind) {
    let (db, store) = setup(kind).await;
    let m = member(store.as_ref(), "A-100200").await;
    let c = card(store.as_ref(), &m, "tok_visa").await;
    let s1 = store
        .add_schedule(&new_schedule(&m, &c, AmountRule::Balance), &audit())
        .await
        .unwrap();
    let s2 = store
        .add_schedule(
            &new_schedule(
                &m,
                &c,
                AmountRule::Fixed {
                    amount: usd("10.00"),
                },
            ),
            &audit(),
        )
        .await
        .unwrap();
    store.pause_schedule(s2.id, &audit()).await.unwrap();
    let p = insert_payment(&db, kind, &s1, "2026-12-01", PaymentState::Scheduled).await;
    let closed = store
        .close_member(&m.account_number, &audit())
        .await
        .unwrap();
    assert_eq!(closed.member.status, MemberStatus::Closed);
    assert_eq!(closed.cancelled_schedules.len(), 2);
    assert_eq!(closed.cancelled_payments, 1);
    for s in store.list_schedules(Some(m.id)).await.unwrap() {
        assert_eq!(s.status, ScheduleStatus::Cancelled);
        assert_eq!(s.cancelled_by.as_deref(), Some("cli:tester"));
    }
    assert_eq!(
        store.payment(p).await.unwrap().state,
        PaymentState::Cancelled
    );
    assert!(matches!(
        store
            .add_schedule(&new_schedule(&m, &c, AmountRule::Balance), &audit())
            .await,
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        store.close_member(&m.account_number, &audit()).await,
        Err(StoreError::Conflict(_))
    ));
}

async fn payments_are_listed_by_member_and_state(kind: Kind) {
    let (db, store) = setup(kind).await;
    let (m, _, s) = member_card_schedule(store.as_ref()).await;
    insert_payment(&db, kind, &s, "2026-12-01", PaymentState::Succeeded).await;
    insert_payment(&db, kind, &s, "2027-01-01", PaymentState::Failed).await;
    assert_eq!(
        store.list_payments(Some(m.id), None).await.unwrap().len(),
        2
    );
    let failed = store
        .list_payments(None, Some(PaymentState::Failed))
        .await
        .unwrap();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].amount, Some(usd("125.00")));
    let status = store.status().await.unwrap();
    assert_eq!(status.payments.get("succeeded"), Some(&1));
    assert_eq!(status.members.get("active"), Some(&1));
    assert!(store.payment(PaymentId::new()).await.is_err());
}

async fn queued_mail_goes_to_the_address_the_member_has_when_it_is_sent(kind: Kind) {
    let (_db, store) = setup(kind).await;
    let m = member(store.as_ref(), "A-100200").await;
    let queued = autopay::store::NewNotification {
        kind: "setup".into(),
        dedupe_key: "setup:test".into(),
        member_id: m.id,
        payload: serde_json::json!({}),
        expires_at: None,
    };
    assert!(store.enqueue(&queued, audit().at).await.unwrap());
    store
        .update_member(
            &m.account_number,
            &MemberChange {
                name: None,
                email: Some(EmailAddress::parse("ana.new@example.org").unwrap()),
                time_zone: None,
                reminders: None,
            },
            &audit(),
        )
        .await
        .unwrap();
    let claimed = store
        .claim_notifications("test", audit().at, std::time::Duration::from_secs(60), 10)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].notification.recipient, "ana.new@example.org");
    assert!(
        store
            .finish_notification(
                &claimed[0].lease,
                &autopay::store::DeliveryOutcome::Sent,
                audit().at
            )
            .await
            .unwrap()
    );
    // The row records where the message went.
    let rows = store.notifications(Some(m.id)).await.unwrap();
    assert_eq!(
        (rows[0].recipient.as_str(), rows[0].state.as_str()),
        ("ana.new@example.org", "sent")
    );
}

crate::helpers::on_both!(
    migrating_twice_changes_nothing_and_keeps_one_installation_id,
    an_unmigrated_database_is_refused_with_a_hint_to_migrate,
    a_member_is_added_found_listed_and_never_duplicated,
    updating_a_member_changes_only_what_is_given_and_is_audited,
    a_card_in_use_cannot_be_removed_and_the_error_names_the_schedule,
    a_member_has_at_most_one_live_balance_schedule,
    a_schedule_refuses_another_members_card,
    importing_bills_is_all_or_nothing_and_idempotent,
    paying_outside_autopay_pays_the_bill_and_an_overpayment_becomes_credit,
    adjusting_below_what_was_paid_and_voiding_turn_payments_into_credit,
    pausing_cancels_unclaimed_payments_and_resuming_starts_from_now,
    updating_a_schedule_bumps_its_version_and_replans_unclaimed_payments,
    closing_a_member_cancels_every_live_schedule,
    payments_are_listed_by_member_and_state,
    queued_mail_goes_to_the_address_the_member_has_when_it_is_sent,
    housekeeping_deletes_the_job_runs_of_workers_gone_for_a_week,
    a_refreshed_card_takes_its_new_details_and_only_an_expired_one_comes_back,
    a_card_disabled_for_expiry_then_disputed_as_fraud_never_comes_back,
);

/// A card disabled because it expired, then disputed as fraud: the harder reason replaces the
/// expiry, so renewed details from the card updater never enable it again.
async fn a_card_disabled_for_expiry_then_disputed_as_fraud_never_comes_back(kind: Kind) {
    let (db, store) = setup(kind).await;
    let (_, card, schedule) = member_card_schedule(store.as_ref()).await;
    let payment = insert_payment(&db, kind, &schedule, "2026-12-01", PaymentState::Succeeded).await;
    let expired_reason = autopay::domain::decline::classify_code("expired_card").member_reason;
    disable_card_as(&db, kind, card.id, expired_reason).await;
    store
        .record_processor_event(
            payment,
            "disputed",
            &serde_json::json!({ "reason": "fraudulent" }),
            autopay::domain::dispute::DisputeAction::DisableCard,
            &audit(),
        )
        .await
        .unwrap();
    let details = autopay::processor::CardDetails {
        brand: CardBrand::Visa,
        last4: Last4::parse("4242").unwrap(),
        expiry: Expiry::new(4, 2032).unwrap(),
    };
    let after = store
        .refresh_card(
            "simulated",
            &card.processor_token,
            &details,
            Some(expired_reason),
            &audit(),
        )
        .await
        .unwrap();
    assert_eq!(after[0].status, CardStatus::Disabled);
    assert_ne!(after[0].status_reason.as_deref(), Some(expired_reason));
}

/// The card networks' updater (Stripe's `payment_method.automatically_updated`): the new
/// details land on the card; a card disabled because it expired is enabled again, one disabled
/// as lost is not.
async fn a_refreshed_card_takes_its_new_details_and_only_an_expired_one_comes_back(kind: Kind) {
    let (db, store) = setup(kind).await;
    let m = member(store.as_ref(), "A-100200").await;
    let expired = card(store.as_ref(), &m, "sim_expired").await;
    let lost = card(store.as_ref(), &m, "sim_lost").await;
    let expired_reason = autopay::domain::decline::classify_code("expired_card").member_reason;
    let lost_reason = autopay::domain::decline::classify_code("lost_card").member_reason;
    for (c, reason) in [(&expired, expired_reason), (&lost, lost_reason)] {
        disable_card_as(&db, kind, c.id, reason).await;
    }
    let details = autopay::processor::CardDetails {
        brand: CardBrand::Visa,
        last4: Last4::parse("1881").unwrap(),
        expiry: Expiry::new(4, 2032).unwrap(),
    };
    let after = store
        .refresh_card(
            "simulated",
            "sim_expired",
            &details,
            Some(expired_reason),
            &audit(),
        )
        .await
        .unwrap();
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].status, CardStatus::Active);
    assert_eq!(
        (
            after[0].last4.as_str(),
            after[0].exp_month,
            after[0].exp_year
        ),
        ("1881", 4, 2032)
    );
    let after = store
        .refresh_card(
            "simulated",
            "sim_lost",
            &details,
            Some(expired_reason),
            &audit(),
        )
        .await
        .unwrap();
    assert_eq!(
        after[0].status,
        CardStatus::Disabled,
        "a lost card stays disabled"
    );
    assert_eq!(after[0].exp_year, 2032);
    assert!(
        store
            .refresh_card(
                "simulated",
                "sim_nobody",
                &details,
                Some(expired_reason),
                &audit()
            )
            .await
            .unwrap()
            .is_empty()
    );
}

/// Every process is a worker of its own, so each restart adds job rows: housekeeping deletes
/// those of workers gone for a week, and status still shows each job's last run.
async fn housekeeping_deletes_the_job_runs_of_workers_gone_for_a_week(kind: Kind) {
    let db = TestDb::new(kind).await;
    let store = db.store().await;
    let t0: jiff::Timestamp = "2026-12-01T00:00:00Z".parse().unwrap();
    let later = t0 + jiff::SignedDuration::from_hours(24 * 8);
    store
        .record_job_run("planner", "old-host-1", t0)
        .await
        .unwrap();
    store
        .record_job_run("planner", "new-host-2", later)
        .await
        .unwrap();
    let settings = crate::engine::settings(&[]);
    autopay::notify::housekeeping::prune(store.as_ref(), &settings, later)
        .await
        .unwrap();
    assert_eq!(
        store.prune_job_runs(t0).await.unwrap(),
        0,
        "already deleted"
    );
    let activity = store.activity(later, t0).await.unwrap();
    assert_eq!(activity.jobs.get("planner"), Some(&later));
    // One row was left: the live worker's.
    assert_eq!(
        store
            .prune_job_runs(later + jiff::SignedDuration::from_secs(1))
            .await
            .unwrap(),
        1
    );
}
