//! Bills and credits: what members owe, what they paid outside autopay, and what is left over.

use crate::domain::money::Money;
use crate::domain::status::BillStatus;
use crate::sqltypes::DbDate;
use crate::store::sql::{Record, currency, get, id, parsed, time};
use crate::store::{Bill, Credit, Result};

pub(crate) const BILL_COLS: &str = "id, member_id, reference, amount_due, amount_paid, currency, due_date, status, created_at, updated_at";

pub(crate) const CREDIT_COLS: &str =
    "id, member_id, amount, remaining, currency, source, reason, created_at";

pub(crate) fn bill_from(row: &impl Record) -> Result<Bill> {
    const T: &str = "bills";
    let cur = currency(row, T)?;
    Ok(Bill {
        id: id(row, T, "id")?,
        member_id: id(row, T, "member_id")?,
        reference: get(row, T, "reference")?,
        amount_due: Money::from_minor(get(row, T, "amount_due")?, cur),
        amount_paid: Money::from_minor(get(row, T, "amount_paid")?, cur),
        currency: cur,
        due_date: get::<DbDate>(row, T, "due_date")?.0,
        status: parsed(
            T,
            "status",
            get::<String>(row, T, "status")?.parse::<BillStatus>(),
        )?,
        created_at: time(row, T, "created_at")?,
        updated_at: time(row, T, "updated_at")?,
    })
}

pub(crate) fn credit_from(row: &impl Record) -> Result<Credit> {
    const T: &str = "credits";
    let cur = currency(row, T)?;
    Ok(Credit {
        id: id(row, T, "id")?,
        member_id: id(row, T, "member_id")?,
        amount: Money::from_minor(get(row, T, "amount")?, cur),
        remaining: Money::from_minor(get(row, T, "remaining")?, cur),
        currency: cur,
        source: get(row, T, "source")?,
        reason: get(row, T, "reason")?,
        created_at: time(row, T, "created_at")?,
    })
}
