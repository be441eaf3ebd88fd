//! Bills and credits: what members owe, what they paid outside autopay, and what is left over.

use jiff::Timestamp;
use uuid::Uuid;

use crate::domain::ids::MemberId;
use crate::domain::money::Money;
use crate::domain::notice::BillPaid;
use crate::domain::status::BillStatus;
use crate::sqltypes::{DbDate, DbId, DbTime};
use crate::store::sql::members::lock_owner;
use crate::store::sql::{
    Backend, Record, SqlStore, commit, currency, db_err, event, get, id, is_unique_violation,
    money_err, new_id, parsed, query, query_as, time,
};
use crate::store::{
    Audit, Bill, BillChange, BillImport, Credit, NewBill, Payment, Result, StoreError, WriteTx,
};

pub(crate) const BILL_COLS: &str = "id, member_id, reference, amount_due, amount_paid, currency, due_date, status, created_at, updated_at";

pub(crate) const CREDIT_COLS: &str =
    "id, member_id, amount, remaining, currency, source, reason, created_at";

pub(crate) fn bill_from(row: &impl Record) -> Result<Bill> {
    const T: &str = "bills";
    let cur = currency(row, T)?;
    Ok(Bill {
        id: id(row, T, "id")?,
        member_id: get(row, T, "member_id")?,
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
        member_id: get(row, T, "member_id")?,
        amount: Money::from_minor(get(row, T, "amount")?, cur),
        remaining: Money::from_minor(get(row, T, "remaining")?, cur),
        currency: cur,
        source: get(row, T, "source")?,
        reason: get(row, T, "reason")?,
        created_at: time(row, T, "created_at")?,
    })
}

pub(crate) async fn bill_in<B: Backend>(tx: &mut WriteTx<B>, bill_id: Uuid) -> Result<Bill> {
    let row = query(sqlx::AssertSqlSafe(format!(
        "SELECT {BILL_COLS} FROM bills WHERE id = $1{}",
        B::FOR_UPDATE
    )))
    .bind(DbId(bill_id))
    .fetch_optional(tx.conn())
    .await
    .map_err(db_err("reading a bill"))?;
    match row {
        Some(row) => bill_from(&row),
        None => Err(StoreError::NotFound(format!(
            "no bill has id {bill_id}; list bills with `autopay bill list`"
        ))),
    }
}

pub(crate) async fn insert_credit<B: Backend>(
    tx: &mut WriteTx<B>,
    member_id: MemberId,
    amount: Money,
    source: &str,
    source_id: impl std::fmt::Display + Send,
    reason: &str,
    audit: &Audit,
) -> Result<Credit> {
    let row = query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO credits (id, member_id, amount, remaining, currency, source, source_id, reason, created_at, updated_at) VALUES ($1, $2, $3, $3, $4, $5, $6, $7, $8, $8) RETURNING {CREDIT_COLS}"
    )))
    .bind(DbId(new_id()))
    .bind(member_id)
    .bind(amount.minor())
    .bind(amount.currency().code())
    .bind(source)
    .bind(source_id.to_string())
    .bind(reason)
    .bind(DbTime(audit.at))
    .fetch_one(tx.conn())
    .await
    .map_err(db_err("recording a credit"))?;
    let credit = credit_from(&row)?;
    event(tx, audit, "credit", credit.id, "created", serde_json::json!({
        "amount": amount.amount_string(), "currency": amount.currency().code(), "source": source, "source_id": source_id.to_string(),
    })).await?;
    Ok(credit)
}

pub(crate) async fn update_bill_amounts<B: Backend>(
    tx: &mut WriteTx<B>,
    bill: &Bill,
    amount_due: i64,
    amount_paid: i64,
    status: BillStatus,
    at: Timestamp,
) -> Result<Bill> {
    let row = query(sqlx::AssertSqlSafe(format!(
        "UPDATE bills SET amount_due = $1, amount_paid = $2, status = $3, updated_at = $4 WHERE id = $5 RETURNING {BILL_COLS}"
    )))
    .bind(amount_due)
    .bind(amount_paid)
    .bind(status.as_str())
    .bind(DbTime(at))
    .bind(DbId(bill.id))
    .fetch_one(tx.conn())
    .await
    .map_err(db_err("updating a bill"))?;
    bill_from(&row)
}

/// Uses `amount` of the member's credits, oldest first, recording each use as an
/// allocation of this payment.
pub(crate) async fn consume_credits<B: Backend>(
    tx: &mut WriteTx<B>,
    payment: &Payment,
    amount: Money,
    at: Timestamp,
) -> Result<()> {
    if !amount.is_positive() {
        return Ok(());
    }
    let rows: Vec<(DbId, i64)> = query_as(sqlx::AssertSqlSafe(format!(
        "SELECT id, remaining FROM credits WHERE member_id = $1 AND remaining > 0 ORDER BY created_at, id{}", B::FOR_UPDATE
    )))
    .bind(payment.member_id)
    .fetch_all(tx.conn())
    .await
    .map_err(db_err("reading credits"))?;
    let remaining: Vec<Money> = rows
        .iter()
        .map(|(_, r)| Money::from_minor(*r, payment.currency))
        .collect();
    let used = crate::domain::charge::draw_credits(&remaining, amount).map_err(money_err)?;
    for ((credit_id, _), used) in rows.iter().zip(used) {
        if !used.is_positive() {
            continue;
        }
        query("UPDATE credits SET remaining = remaining - $1, updated_at = $2 WHERE id = $3")
            .bind(used.minor())
            .bind(DbTime(at))
            .bind(*credit_id)
            .execute(tx.conn())
            .await
            .map_err(db_err("using a credit"))?;
        query("INSERT INTO payment_allocations (id, payment_id, bill_id, credit_id, amount, currency, created_at) VALUES ($1, $2, NULL, $3, $4, $5, $6)")
            .bind(DbId(new_id()))
            .bind(payment.id)
            .bind(*credit_id)
            .bind(used.minor())
            .bind(payment.currency.code())
            .bind(DbTime(at))
            .execute(tx.conn())
            .await
            .map_err(db_err("recording a credit's use"))?;
    }
    Ok(())
}

/// Pays open bills oldest first with `value`; returns what each bill got and what was
/// left over. Never refuses: an overpayment is returned for the caller to credit.
pub(crate) async fn pay_bills<B: Backend>(
    tx: &mut WriteTx<B>,
    payment: &Payment,
    value: Money,
    at: Timestamp,
) -> Result<(Vec<BillPaid>, Money)> {
    let rows = query(sqlx::AssertSqlSafe(format!(
        "SELECT {BILL_COLS} FROM bills WHERE member_id = $1 AND status = 'open' ORDER BY due_date, created_at, id{}", B::FOR_UPDATE
    )))
    .bind(payment.member_id)
    .fetch_all(tx.conn())
    .await
    .map_err(db_err("reading open bills"))?;
    let bills = rows.iter().map(bill_from).collect::<Result<Vec<Bill>>>()?;
    let outstanding: Vec<Money> = bills.iter().map(Bill::outstanding).collect();
    let (applied, left) =
        crate::domain::charge::allocate(&outstanding, value).map_err(money_err)?;
    let mut paid = Vec::new();
    for (bill, part) in bills.iter().zip(applied) {
        if !part.is_positive() {
            continue;
        }
        let after = crate::domain::charge::pay_bill(bill.amount_due, bill.amount_paid, part)
            .map_err(money_err)?;
        let status = if after.is_paid() {
            BillStatus::Paid
        } else {
            BillStatus::Open
        };
        update_bill_amounts(
            tx,
            bill,
            after.amount_due.minor(),
            after.amount_paid.minor(),
            status,
            at,
        )
        .await?;
        query("INSERT INTO payment_allocations (id, payment_id, bill_id, credit_id, amount, currency, created_at) VALUES ($1, $2, $3, NULL, $4, $5, $6)")
            .bind(DbId(new_id()))
            .bind(payment.id)
            .bind(DbId(bill.id))
            .bind(part.minor())
            .bind(payment.currency.code())
            .bind(DbTime(at))
            .execute(tx.conn())
            .await
            .map_err(db_err("recording an allocation"))?;
        paid.push(BillPaid {
            bill_id: bill.id,
            reference: bill.reference.clone(),
            amount: part,
        });
    }
    Ok((paid, left))
}

pub(crate) async fn add_bills<B: Backend>(
    db: &SqlStore<B>,
    bills: &[NewBill],
    audit: &Audit,
) -> Result<BillImport> {
    let mut tx = db.begin_write().await?;
    let mut added = Vec::new();
    let mut unchanged = 0;
    for bill in bills {
        let row = query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO bills (id, member_id, reference, amount_due, amount_paid, currency, due_date, status, created_at, updated_at) VALUES ($1, $2, $3, $4, 0, $5, $6, 'open', $7, $7) ON CONFLICT (member_id, reference) DO NOTHING RETURNING {BILL_COLS}"
        )))
        .bind(DbId(new_id()))
        .bind(bill.member_id)
        .bind(&bill.reference)
        .bind(bill.amount_due.minor())
        .bind(bill.amount_due.currency().code())
        .bind(DbDate(bill.due_date))
        .bind(DbTime(audit.at))
        .fetch_optional(tx.conn())
        .await
        .map_err(db_err("adding a bill"))?;
        match row {
            Some(row) => {
                let stored = bill_from(&row)?;
                event(&mut tx, audit, "bill", stored.id, "added", serde_json::json!({
                    "member_id": stored.member_id, "reference": stored.reference,
                    "amount_due": stored.amount_due.amount_string(), "currency": stored.currency.code(),
                    "due_date": stored.due_date.to_string(),
                })).await?;
                added.push(stored);
            }
            None => {
                let row = query(sqlx::AssertSqlSafe(format!(
                    "SELECT {BILL_COLS} FROM bills WHERE member_id = $1 AND reference = $2"
                )))
                .bind(bill.member_id)
                .bind(&bill.reference)
                .fetch_one(tx.conn())
                .await
                .map_err(db_err("reading a bill"))?;
                let existing = bill_from(&row)?;
                if existing.amount_due != bill.amount_due || existing.due_date != bill.due_date {
                    return Err(StoreError::Conflict(format!(
                        "{}: bill '{}' is already stored with amount {} due {} (id {}); change a stored bill with `autopay bill adjust`, or give this one its own reference. Nothing was added",
                        bill.origin,
                        bill.reference,
                        existing.amount_due.amount_string(),
                        existing.due_date,
                        existing.id
                    )));
                }
                unchanged += 1;
            }
        }
    }
    commit(tx).await?;
    Ok(BillImport { added, unchanged })
}

pub(crate) async fn bill<B: Backend>(db: &SqlStore<B>, bill_id: Uuid) -> Result<Bill> {
    let row = query(sqlx::AssertSqlSafe(format!(
        "SELECT {BILL_COLS} FROM bills WHERE id = $1"
    )))
    .bind(DbId(bill_id))
    .fetch_optional(&db.pool)
    .await
    .map_err(db_err("reading a bill"))?;
    match row {
        Some(row) => bill_from(&row),
        None => Err(StoreError::NotFound(format!(
            "no bill has id {bill_id}; list bills with `autopay bill list`"
        ))),
    }
}

pub(crate) async fn list_bills<B: Backend>(
    db: &SqlStore<B>,
    member_id: Option<MemberId>,
) -> Result<Vec<Bill>> {
    query(sqlx::AssertSqlSafe(format!("SELECT {BILL_COLS} FROM bills WHERE ($1 IS NULL OR member_id = $1) ORDER BY due_date, reference")))
        .bind(member_id)
        .fetch_all(&db.pool)
        .await
        .map_err(db_err("listing bills"))?
        .iter()
        .map(bill_from)
        .collect()
}

pub(crate) async fn void_bill<B: Backend>(
    db: &SqlStore<B>,
    bill_id: Uuid,
    reason: &str,
    audit: &Audit,
) -> Result<BillChange> {
    let mut tx = db.begin_write().await?;
    lock_owner(&mut tx, "bills", DbId(bill_id)).await?;
    let bill = bill_in(&mut tx, bill_id).await?;
    if bill.status == BillStatus::Void {
        return Err(StoreError::Conflict(format!(
            "bill {bill_id} is already void"
        )));
    }
    let updated = update_bill_amounts(
        &mut tx,
        &bill,
        bill.amount_due.minor(),
        bill.amount_paid.minor(),
        BillStatus::Void,
        audit.at,
    )
    .await?;
    event(
        &mut tx,
        audit,
        "bill",
        bill_id,
        "voided",
        serde_json::json!({ "reason": reason }),
    )
    .await?;
    // Voiding a partly paid bill turns its paid part into a credit (docs/engine.md).
    let credit = if bill.amount_paid.is_positive() {
        Some(
            insert_credit(
                &mut tx,
                bill.member_id,
                bill.amount_paid,
                "void",
                bill_id,
                reason,
                audit,
            )
            .await?,
        )
    } else {
        None
    };
    commit(tx).await?;
    Ok(BillChange {
        bill: updated,
        credit,
    })
}

pub(crate) async fn adjust_bill<B: Backend>(
    db: &SqlStore<B>,
    bill_id: Uuid,
    amount_due: Money,
    reason: &str,
    audit: &Audit,
) -> Result<BillChange> {
    let mut tx = db.begin_write().await?;
    lock_owner(&mut tx, "bills", DbId(bill_id)).await?;
    let bill = bill_in(&mut tx, bill_id).await?;
    if bill.status == BillStatus::Void {
        return Err(StoreError::Conflict(format!(
            "bill {bill_id} is void; a void bill cannot be adjusted"
        )));
    }
    if amount_due.currency() != bill.currency || amount_due.minor() < 0 {
        return Err(StoreError::Conflict(format!(
            "a bill's amount must be 0.00 or more in {}",
            bill.currency
        )));
    }
    let after = crate::domain::charge::readjust(amount_due, bill.amount_paid).map_err(money_err)?;
    let status = if after.is_paid() {
        BillStatus::Paid
    } else {
        BillStatus::Open
    };
    let updated = update_bill_amounts(
        &mut tx,
        &bill,
        after.amount_due.minor(),
        after.amount_paid.minor(),
        status,
        audit.at,
    )
    .await?;
    event(&mut tx, audit, "bill", bill_id, "adjusted", serde_json::json!({
        "from": bill.amount_due.amount_string(), "to": amount_due.amount_string(), "reason": reason,
    })).await?;
    let credit = if after.credit.is_positive() {
        Some(
            insert_credit(
                &mut tx,
                bill.member_id,
                after.credit,
                "adjustment",
                bill_id,
                reason,
                audit,
            )
            .await?,
        )
    } else {
        None
    };
    commit(tx).await?;
    Ok(BillChange {
        bill: updated,
        credit,
    })
}

pub(crate) async fn pay_bill_external<B: Backend>(
    db: &SqlStore<B>,
    bill_id: Uuid,
    amount: Money,
    reference: &str,
    audit: &Audit,
) -> Result<BillChange> {
    let mut tx = db.begin_write().await?;
    lock_owner(&mut tx, "bills", DbId(bill_id)).await?;
    let bill = bill_in(&mut tx, bill_id).await?;
    if bill.status == BillStatus::Void {
        return Err(StoreError::Conflict(format!(
            "bill {bill_id} is void; nothing is owed on it"
        )));
    }
    if amount.currency() != bill.currency || !amount.is_positive() {
        return Err(StoreError::Conflict(format!(
            "a payment must be more than 0.00 in {}",
            bill.currency
        )));
    }
    query("INSERT INTO external_payments (id, bill_id, amount, currency, reference, recorded_by, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)")
        .bind(DbId(new_id()))
        .bind(DbId(bill_id))
        .bind(amount.minor())
        .bind(amount.currency().code())
        .bind(reference)
        .bind(&audit.actor)
        .bind(DbTime(audit.at))
        .execute(tx.conn())
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                StoreError::Conflict(format!("payment '{reference}' is already recorded on bill {bill_id}; nothing was changed"))
            } else {
                StoreError::from_sqlx(e, "recording an external payment")
            }
        })?;
    let after = crate::domain::charge::pay_bill(bill.amount_due, bill.amount_paid, amount)
        .map_err(money_err)?;
    let status = if after.is_paid() {
        BillStatus::Paid
    } else {
        BillStatus::Open
    };
    let updated = update_bill_amounts(
        &mut tx,
        &bill,
        after.amount_due.minor(),
        after.amount_paid.minor(),
        status,
        audit.at,
    )
    .await?;
    event(
        &mut tx,
        audit,
        "bill",
        bill_id,
        "paid_externally",
        serde_json::json!({
            "amount": amount.amount_string(), "reference": reference,
        }),
    )
    .await?;
    let credit = if after.credit.is_positive() {
        Some(
            insert_credit(
                &mut tx,
                bill.member_id,
                after.credit,
                "overpayment",
                bill_id,
                reference,
                audit,
            )
            .await?,
        )
    } else {
        None
    };
    commit(tx).await?;
    Ok(BillChange {
        bill: updated,
        credit,
    })
}

pub(crate) async fn list_credits<B: Backend>(
    db: &SqlStore<B>,
    member_id: MemberId,
) -> Result<Vec<Credit>> {
    query(sqlx::AssertSqlSafe(format!(
        "SELECT {CREDIT_COLS} FROM credits WHERE member_id = $1 ORDER BY created_at, id"
    )))
    .bind(member_id)
    .fetch_all(&db.pool)
    .await
    .map_err(db_err("listing credits"))?
    .iter()
    .map(credit_from)
    .collect()
}
