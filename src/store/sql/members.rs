//! Members: who pays, and the row every other change of theirs locks first.

use crate::domain::ids::{MemberId, ScheduleId};
use crate::domain::member::{AccountNumber, AccountType, EmailAddress, MemberName};
use crate::domain::notice::ScheduleChange as ScheduleChangeNotice;
use crate::domain::status::MemberStatus;
use crate::sqltypes::{DbTime, IdParam};
use crate::store::sql::schedules::{cancel_unclaimed, confirm_schedule, schedule_in};
use crate::store::sql::{
    Backend, Record, SqlStore, commit, db_err, event, get, is_unique_violation, parsed, query,
    query_scalar, time,
};
use crate::store::{
    Audit, ClosedMember, Member, MemberChange, NewMember, Result, StoreError, WriteTx,
};

pub(crate) const MEMBER_COLS: &str = "id, account_number, account_type, name, email, time_zone, reminders, email_bouncing, processor_customer_id, status, created_at, updated_at";

pub(crate) fn member_from(row: &impl Record) -> Result<Member> {
    const T: &str = "members";
    Ok(Member {
        id: get(row, T, "id")?,
        account_number: parsed(
            T,
            "account_number",
            AccountNumber::parse(&get::<String>(row, T, "account_number")?),
        )?,
        account_type: parsed(
            T,
            "account_type",
            get::<String>(row, T, "account_type")?.parse::<AccountType>(),
        )?,
        name: parsed(
            T,
            "name",
            MemberName::parse(&get::<String>(row, T, "name")?),
        )?,
        email: parsed(
            T,
            "email",
            EmailAddress::parse(&get::<String>(row, T, "email")?),
        )?,
        time_zone: get(row, T, "time_zone")?,
        reminders: get(row, T, "reminders")?,
        email_bouncing: get(row, T, "email_bouncing")?,
        processor_customer_id: get(row, T, "processor_customer_id")?,
        status: parsed(
            T,
            "status",
            get::<String>(row, T, "status")?.parse::<MemberStatus>(),
        )?,
        created_at: time(row, T, "created_at")?,
        updated_at: time(row, T, "updated_at")?,
    })
}

pub(crate) async fn member_in<B: Backend>(
    tx: &mut WriteTx<B>,
    account: &AccountNumber,
) -> Result<Member> {
    let row = query(sqlx::AssertSqlSafe(format!(
        "SELECT {MEMBER_COLS} FROM members WHERE account_number = $1{}",
        B::FOR_UPDATE
    )))
    .bind(account.as_str())
    .fetch_optional(tx.conn())
    .await
    .map_err(db_err("reading a member"))?;
    match row {
        Some(row) => member_from(&row),
        None => Err(member_not_found(account)),
    }
}

pub(crate) fn member_not_found(account: &AccountNumber) -> StoreError {
    StoreError::NotFound(format!(
        "no member has account number {}; check it with `autopay member list`",
        account.masked()
    ))
}

pub(crate) async fn member_by_id_in<B: Backend>(
    tx: &mut WriteTx<B>,
    member_id: MemberId,
) -> Result<Member> {
    let row = query(sqlx::AssertSqlSafe(format!(
        "SELECT {MEMBER_COLS} FROM members WHERE id = $1{}",
        B::FOR_UPDATE
    )))
    .bind(member_id)
    .fetch_one(tx.conn())
    .await
    .map_err(db_err("reading a member"))?;
    member_from(&row)
}

/// Locks the member that owns a row of `table` (read without a lock first), so that a
/// change to the row follows the one lock order: member first.
pub(crate) async fn lock_owner<B: Backend>(
    tx: &mut WriteTx<B>,
    table: &'static str,
    id: impl IdParam,
) -> Result<Option<Member>> {
    let owner: Option<MemberId> = query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT member_id FROM {table} WHERE id = $1"
    )))
    .bind(id)
    .fetch_optional(tx.conn())
    .await
    .map_err(db_err("reading an owner"))?;
    match owner {
        Some(member_id) => Ok(Some(member_by_id_in(tx, member_id).await?)),
        None => Ok(None),
    }
}

pub(crate) async fn add_member<B: Backend>(
    db: &SqlStore<B>,
    new: &NewMember,
    audit: &Audit,
) -> Result<Member> {
    let mut tx = db.begin_write().await?;
    let member_id = MemberId::new();
    let row = query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO members (id, account_number, account_type, name, email, time_zone, reminders, email_bouncing, status, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, TRUE, FALSE, 'active', $7, $7) RETURNING {MEMBER_COLS}"
    )))
    .bind(member_id)
    .bind(new.account_number.as_str())
    .bind(new.account_type.as_str())
    .bind(new.name.as_str())
    .bind(new.email.as_str())
    .bind(&new.time_zone)
    .bind(DbTime(audit.at))
    .fetch_one(tx.conn())
    .await
    .map_err(|e| {
        if is_unique_violation(&e) {
            StoreError::Conflict(format!(
                "a member with account number {} already exists; change it with `autopay member update`",
                new.account_number.masked()
            ))
        } else {
            StoreError::from_sqlx(e, "adding a member")
        }
    })?;
    let member = member_from(&row)?;
    event(
        &mut tx,
        audit,
        "member",
        member.id,
        "added",
        serde_json::json!({
            "account_type": new.account_type.as_str(), "time_zone": new.time_zone,
        }),
    )
    .await?;
    commit(tx).await?;
    Ok(member)
}

pub(crate) async fn member<B: Backend>(
    db: &SqlStore<B>,
    account: &AccountNumber,
) -> Result<Member> {
    let row = query(sqlx::AssertSqlSafe(format!(
        "SELECT {MEMBER_COLS} FROM members WHERE account_number = $1"
    )))
    .bind(account.as_str())
    .fetch_optional(&db.pool)
    .await
    .map_err(db_err("reading a member"))?;
    match row {
        Some(row) => member_from(&row),
        None => Err(member_not_found(account)),
    }
}

pub(crate) async fn member_by_id<B: Backend>(
    db: &SqlStore<B>,
    member_id: MemberId,
) -> Result<Member> {
    let row = query(sqlx::AssertSqlSafe(format!(
        "SELECT {MEMBER_COLS} FROM members WHERE id = $1"
    )))
    .bind(member_id)
    .fetch_optional(&db.pool)
    .await
    .map_err(db_err("reading a member"))?;
    match row {
        Some(row) => member_from(&row),
        None => Err(StoreError::NotFound(format!(
            "no member has id {member_id}"
        ))),
    }
}

pub(crate) async fn list_members<B: Backend>(db: &SqlStore<B>) -> Result<Vec<Member>> {
    query(sqlx::AssertSqlSafe(format!(
        "SELECT {MEMBER_COLS} FROM members ORDER BY account_number"
    )))
    .fetch_all(&db.pool)
    .await
    .map_err(db_err("listing members"))?
    .iter()
    .map(member_from)
    .collect()
}

pub(crate) async fn update_member<B: Backend>(
    db: &SqlStore<B>,
    account: &AccountNumber,
    change: &MemberChange,
    audit: &Audit,
) -> Result<Member> {
    let mut tx = db.begin_write().await?;
    let member = member_in(&mut tx, account).await?;
    if member.status == MemberStatus::Closed {
        return Err(StoreError::Conflict(format!(
            "member {} is closed; a closed member cannot be changed",
            member.id
        )));
    }
    let row = query(sqlx::AssertSqlSafe(format!(
        "UPDATE members SET name = $1, email = $2, time_zone = $3, reminders = $4, email_bouncing = $5, updated_at = $6 WHERE id = $7 RETURNING {MEMBER_COLS}"
    )))
    .bind(change.name.as_ref().unwrap_or(&member.name).as_str())
    .bind(change.email.as_ref().unwrap_or(&member.email).as_str())
    .bind(change.time_zone.as_ref().unwrap_or(&member.time_zone))
    .bind(change.reminders.unwrap_or(member.reminders))
    // A new address is a fresh chance to deliver.
    .bind(if change.email.is_some() { false } else { member.email_bouncing })
    .bind(DbTime(audit.at))
    .bind(member.id)
    .fetch_one(tx.conn())
    .await
    .map_err(db_err("updating a member"))?;
    let updated = member_from(&row)?;
    let mut changed = Vec::new();
    if change.name.is_some() {
        changed.push("name");
    }
    if change.email.is_some() {
        changed.push("email");
    }
    if change.time_zone.is_some() {
        changed.push("time_zone");
    }
    if change.reminders.is_some() {
        changed.push("reminders");
    }
    event(
        &mut tx,
        audit,
        "member",
        member.id,
        "updated",
        serde_json::json!({ "fields": changed }),
    )
    .await?;
    commit(tx).await?;
    Ok(updated)
}

pub(crate) async fn close_member<B: Backend>(
    db: &SqlStore<B>,
    account: &AccountNumber,
    audit: &Audit,
) -> Result<ClosedMember> {
    let mut tx = db.begin_write().await?;
    let member = member_in(&mut tx, account).await?;
    if member.status == MemberStatus::Closed {
        return Err(StoreError::Conflict(format!(
            "member {} is already closed",
            member.id
        )));
    }
    let live: Vec<ScheduleId> = query_scalar("SELECT id FROM schedules WHERE member_id = $1 AND status IN ('active', 'paused', 'suspended') ORDER BY id")
        .bind(member.id)
        .fetch_all(tx.conn())
        .await
        .map_err(db_err("reading the member's schedules"))?;
    let mut cancelled_payments = 0;
    for schedule_id in &live {
        query("UPDATE schedules SET status = 'cancelled', status_reason = 'member closed', cancelled_at = $1, cancelled_by = $2, next_run_at = NULL, next_occurrence = NULL, version = version + 1, updated_at = $1 WHERE id = $3")
            .bind(DbTime(audit.at))
            .bind(&audit.actor)
            .bind(*schedule_id)
            .execute(tx.conn())
            .await
            .map_err(db_err("cancelling a schedule"))?;
        cancelled_payments +=
            cancel_unclaimed(&mut tx, *schedule_id, "member closed", audit.at).await?;
        let ended = schedule_in(&mut tx, *schedule_id).await?;
        confirm_schedule(&mut tx, &ScheduleChangeNotice::Cancelled, &ended, audit.at).await?;
        event(
            &mut tx,
            audit,
            "schedule",
            schedule_id,
            "cancelled",
            serde_json::json!({ "reason": "member closed" }),
        )
        .await?;
    }
    let row = query(sqlx::AssertSqlSafe(format!("UPDATE members SET status = 'closed', updated_at = $1 WHERE id = $2 RETURNING {MEMBER_COLS}")))
        .bind(DbTime(audit.at))
        .bind(member.id)
        .fetch_one(tx.conn())
        .await
        .map_err(db_err("closing a member"))?;
    let closed = member_from(&row)?;
    let cancelled_schedules = live;
    event(
        &mut tx,
        audit,
        "member",
        member.id,
        "closed",
        serde_json::json!({
            "cancelled_schedules": cancelled_schedules, "cancelled_payments": cancelled_payments,
        }),
    )
    .await?;
    commit(tx).await?;
    Ok(ClosedMember {
        member: closed,
        cancelled_schedules,
        cancelled_payments,
    })
}
