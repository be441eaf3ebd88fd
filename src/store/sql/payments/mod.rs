//! Payments: one occurrence of a schedule, claimed, charged and settled.

use crate::domain::money::Money;
use crate::domain::payment::PaymentState;
use crate::store::sql::{Record, currency, get, id, opt_time, parsed, time};
use crate::store::{Payment, Result};

pub(crate) const PAYMENT_COLS: &str = "id, schedule_id, member_id, occurrence, due_at, amount, currency, state, attempt, payment_method_id, schedule_version, next_attempt_at, processor_reference, decline_code, reason, created_at, updated_at";

pub(crate) fn payment_from(row: &impl Record) -> Result<Payment> {
    const T: &str = "payments";
    let cur = currency(row, T)?;
    Ok(Payment {
        id: id(row, T, "id")?,
        schedule_id: id(row, T, "schedule_id")?,
        member_id: id(row, T, "member_id")?,
        occurrence: get(row, T, "occurrence")?,
        due_at: time(row, T, "due_at")?,
        amount: get::<Option<i64>>(row, T, "amount")?.map(|m| Money::from_minor(m, cur)),
        currency: cur,
        state: parsed(
            T,
            "state",
            get::<String>(row, T, "state")?.parse::<PaymentState>(),
        )?,
        attempt: get(row, T, "attempt")?,
        card_id: id(row, T, "payment_method_id")?,
        schedule_version: get(row, T, "schedule_version")?,
        next_attempt_at: opt_time(row, T, "next_attempt_at")?,
        processor_reference: get(row, T, "processor_reference")?,
        decline_code: get(row, T, "decline_code")?,
        reason: get(row, T, "reason")?,
        created_at: time(row, T, "created_at")?,
        updated_at: time(row, T, "updated_at")?,
    })
}

/// The earliest due charges, read in their order from the `payments_claimable` index
/// (its cost does not grow with how many are due): the text of [`Backend::claim_due_sql`]
/// (`crate::store::sql::Backend`), with the backend's index hint and row-lock suffix.
pub(crate) fn claim_due_sql(claim_index: &str, skip_locked: &str) -> String {
    format!(
        "SELECT id, state, schedule_id, due_at, next_attempt_at FROM payments{claim_index} WHERE state IN ('scheduled', 'retry_wait') AND COALESCE(next_attempt_at, due_at) <= $1 ORDER BY COALESCE(next_attempt_at, due_at), id LIMIT $2{skip_locked}"
    )
}

/// The misfire check: a later first payment of the same recurring schedule, due by now,
/// read among that schedule's payments (by `schedule_id`). `q.state || ''` keeps
/// `payments_due` out of the planner's choice: on the 1st of the month its statistics
/// still say few payments are scheduled, and PostgreSQL read every scheduled payment
/// for each check.
pub(crate) const LATER_PAYMENT_SQL: &str = "SELECT q.id FROM payments q JOIN schedules s ON s.id = q.schedule_id WHERE q.schedule_id = $1 AND s.kind = 'recurring' \
     AND q.state || '' = 'scheduled' AND q.next_attempt_at IS NULL AND q.due_at > $2 AND q.due_at <= $3 LIMIT 1";

/// The states whose payment no worker holds and whose attempt was never sent.
pub(crate) const UNCLAIMED: [PaymentState; 2] = [PaymentState::Scheduled, PaymentState::RetryWait];

/// The states whose payment keeps its amount and credit reserved.
pub(crate) const RESERVING: [PaymentState; 3] = [
    PaymentState::Processing,
    PaymentState::Unknown,
    PaymentState::NeedsReview,
];

#[cfg(test)]
mod tests {
    /// The claim's text per backend is the one the SQL had before it was built per backend.
    #[test]
    fn the_claim_reads_as_before_in_each_dialect() {
        let before = |index: &str, skip: &str| {
            [
                "SELECT id, state, schedule_id, due_at, next_attempt_at FROM payments",
                index,
                " WHERE state IN ('scheduled', 'retry_wait') AND COALESCE(next_attempt_at, due_at) <= $1",
                " ORDER BY COALESCE(next_attempt_at, due_at), id LIMIT $2",
                skip,
            ]
            .concat()
        };
        use crate::store::sql::Backend;
        assert_eq!(
            <sqlx::Sqlite as Backend>::claim_due_sql(),
            before(" INDEXED BY payments_claimable", "")
        );
        assert_eq!(
            <sqlx::Postgres as Backend>::claim_due_sql(),
            before("", " FOR UPDATE SKIP LOCKED")
        );
    }
}
