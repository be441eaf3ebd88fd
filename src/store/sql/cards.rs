//! Cards (`payment_methods`): adding, reading, removing, and refreshing them from the processor.

use jiff::Timestamp;

use crate::domain::card::{CardBrand, Last4};
use crate::domain::ids::{CardId, MemberId, ScheduleId};
use crate::domain::notice::CardDisabled;
use crate::domain::status::{CardStatus, MemberStatus};
use crate::sqltypes::DbTime;
use crate::store::sql::members::lock_owner;
use crate::store::sql::outbox::notify_notice;
use crate::store::sql::schedules::suspend_schedule;
use crate::store::sql::{
    Backend, Record, SqlStore, commit, db_err, event, get, is_unique_violation, parsed, query,
    query_as, query_scalar, time,
};
use crate::store::{
    Audit, Card, CardProcessor, Consent, Member, NewCard, Result, StoreError, WriteTx,
};

pub(crate) const CARD_COLS: &str = "id, member_id, processor, processor_token, fingerprint, brand, last4, exp_month, exp_year, status, status_reason, created_at, network_transaction_id, consent_at, consent_via, consent_terms_version, processor_mode";

pub(crate) fn card_from(row: &impl Record) -> Result<Card> {
    const T: &str = "payment_methods";
    let month: i64 = get(row, T, "exp_month")?;
    let year: i64 = get(row, T, "exp_year")?;
    Ok(Card {
        id: get(row, T, "id")?,
        member_id: get(row, T, "member_id")?,
        processor: get(row, T, "processor")?,
        processor_token: get(row, T, "processor_token")?,
        fingerprint: get(row, T, "fingerprint")?,
        brand: parsed(
            T,
            "brand",
            get::<String>(row, T, "brand")?.parse::<CardBrand>(),
        )?,
        last4: parsed(T, "last4", Last4::parse(&get::<String>(row, T, "last4")?))?,
        exp_month: parsed(T, "exp_month", u8::try_from(month))?,
        exp_year: parsed(T, "exp_year", u16::try_from(year))?,
        status: parsed(
            T,
            "status",
            get::<String>(row, T, "status")?.parse::<CardStatus>(),
        )?,
        status_reason: get(row, T, "status_reason")?,
        created_at: time(row, T, "created_at")?,
        network_transaction_id: get(row, T, "network_transaction_id")?,
        consent: match get::<Option<DbTime>>(row, T, "consent_at")? {
            None => None,
            Some(at) => Some(Consent {
                at: at.0,
                via: get::<Option<String>>(row, T, "consent_via")?.unwrap_or_default(),
                terms_version: get(row, T, "consent_terms_version")?,
            }),
        },
        processor_mode: get(row, T, "processor_mode")?,
    })
}

pub(crate) async fn card_in<B: Backend>(tx: &mut WriteTx<B>, card_id: CardId) -> Result<Card> {
    let row = query(sqlx::AssertSqlSafe(format!(
        "SELECT {CARD_COLS} FROM payment_methods WHERE id = $1{}",
        B::FOR_UPDATE
    )))
    .bind(card_id)
    .fetch_optional(tx.conn())
    .await
    .map_err(db_err("reading a card"))?;
    match row {
        Some(row) => card_from(&row),
        None => Err(card_not_found(card_id)),
    }
}

/// A schedule cannot stay on, or go back to, a card that cannot be charged.
pub(crate) fn card_unusable(card: &Card, schedule_id: ScheduleId) -> StoreError {
    StoreError::Conflict(format!(
        "card {} is {}, so schedule {schedule_id} cannot charge it; add a new card (`autopay card add`) and move the schedule to it with `autopay schedule update {schedule_id} --card NEW_CARD`",
        card.id, card.status
    ))
}

pub(crate) fn card_not_found(id: CardId) -> StoreError {
    StoreError::NotFound(format!(
        "no card has id {id}; list a member's cards with `autopay card list --account N`"
    ))
}

/// A card that must not be tried again: disabled, every schedule using it suspended,
/// the member told.
pub(crate) async fn disable_card<B: Backend>(
    tx: &mut WriteTx<B>,
    card: &Card,
    reason: &str,
    member: &Member,
    audit: &Audit,
) -> Result<()> {
    let changed = query("UPDATE payment_methods SET status = 'disabled', status_reason = $1, updated_at = $2 WHERE id = $3 AND status = 'active'")
        .bind(reason)
        .bind(DbTime(audit.at))
        .bind(card.id)
        .execute(tx.conn())
        .await
        .map_err(db_err("disabling a card"))?
        .rows_affected();
    if changed == 0 {
        // Already disabled. A card disabled only because it expired, which the card
        // updater could bring back, takes the harder reason, so it never comes back.
        let expired = crate::domain::decline::classify_code("expired_card").member_reason;
        if reason != expired {
            let hardened = query("UPDATE payment_methods SET status_reason = $1, updated_at = $2 WHERE id = $3 AND status = 'disabled' AND status_reason = $4")
                .bind(reason)
                .bind(DbTime(audit.at))
                .bind(card.id)
                .bind(expired)
                .execute(tx.conn())
                .await
                .map_err(db_err("disabling a card"))?
                .rows_affected();
            if hardened > 0 {
                event(
                    tx,
                    audit,
                    "card",
                    card.id,
                    "disabled",
                    serde_json::json!({ "reason": reason }),
                )
                .await?;
            }
        }
        return Ok(());
    }
    event(
        tx,
        audit,
        "card",
        card.id,
        "disabled",
        serde_json::json!({ "reason": reason }),
    )
    .await?;
    let schedules: Vec<ScheduleId> = query_scalar("SELECT id FROM schedules WHERE payment_method_id = $1 AND status IN ('active', 'paused') ORDER BY id")
        .bind(card.id)
        .fetch_all(tx.conn())
        .await
        .map_err(db_err("reading the card's schedules"))?;
    for s in &schedules {
        suspend_schedule(tx, *s, "the card can no longer be charged", member, audit).await?;
    }
    let notice = CardDisabled {
        card_id: card.id,
        card: card.label(),
        to: member.addressee(),
        reason: reason.to_string(),
        suspended_schedules: schedules,
    }
    .notice();
    notify_notice(tx, &notice, member, audit.at).await
}

pub(crate) async fn add_card<B: Backend>(
    db: &SqlStore<B>,
    new: &NewCard,
    audit: &Audit,
) -> Result<Card> {
    let mut tx = db.begin_write().await?;
    let status: Option<String> = query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT status FROM members WHERE id = $1{}",
        B::FOR_UPDATE
    )))
    .bind(new.member_id)
    .fetch_optional(tx.conn())
    .await
    .map_err(db_err("reading a member"))?;
    match status.as_deref() {
        None => {
            return Err(StoreError::NotFound(format!(
                "no member has id {}",
                new.member_id
            )));
        }
        Some("active") => {}
        Some(_) => {
            return Err(StoreError::Conflict(format!(
                "member {} is closed; a closed member cannot add cards",
                new.member_id
            )));
        }
    }
    if let Some(customer) = &new.customer {
        // A member's first card at a processor that keeps customers makes theirs.
        query("UPDATE members SET processor_customer_id = $1, updated_at = $2 WHERE id = $3 AND processor_customer_id IS NULL")
            .bind(customer)
            .bind(DbTime(audit.at))
            .bind(new.member_id)
            .execute(tx.conn())
            .await
            .map_err(db_err("keeping the member's processor customer"))?;
    }
    let row = query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO payment_methods (id, member_id, processor, processor_token, brand, last4, exp_month, exp_year, status, created_at, updated_at, fingerprint, processor_mode, consent_at, consent_via, consent_terms_version) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'active', $9, $9, $10, $11, $12, $13, $14) RETURNING {CARD_COLS}"
    )))
    .bind(CardId::new())
    .bind(new.member_id)
    .bind(&new.processor)
    .bind(&new.processor_token)
    .bind(new.brand.as_str())
    .bind(new.last4.as_str())
    .bind(i64::from(new.expiry.month()))
    .bind(i64::from(new.expiry.year()))
    .bind(DbTime(audit.at))
    .bind(new.fingerprint.as_deref())
    .bind(new.processor_mode.as_deref())
    .bind(DbTime(new.consent.at))
    .bind(&new.consent.via)
    .bind(new.consent.terms_version.as_deref())
    .fetch_one(tx.conn())
    .await
    .map_err(|e| {
        if is_unique_violation(&e) {
            StoreError::Conflict("this member already has this card; see `autopay card list`".into())
        } else {
            StoreError::from_sqlx(e, "adding a card")
        }
    })?;
    let card = card_from(&row)?;
    event(
        &mut tx,
        audit,
        "card",
        card.id,
        "added",
        serde_json::json!({
            "member_id": new.member_id, "brand": new.brand.as_str(), "last4": new.last4.as_str(),
        }),
    )
    .await?;
    commit(tx).await?;
    Ok(card)
}

pub(crate) async fn card<B: Backend>(db: &SqlStore<B>, card_id: CardId) -> Result<Card> {
    let row = query(sqlx::AssertSqlSafe(format!(
        "SELECT {CARD_COLS} FROM payment_methods WHERE id = $1"
    )))
    .bind(card_id)
    .fetch_optional(&db.pool)
    .await
    .map_err(db_err("reading a card"))?;
    match row {
        Some(row) => card_from(&row),
        None => Err(card_not_found(card_id)),
    }
}

pub(crate) async fn list_cards<B: Backend>(
    db: &SqlStore<B>,
    member_id: MemberId,
) -> Result<Vec<Card>> {
    query(sqlx::AssertSqlSafe(format!(
        "SELECT {CARD_COLS} FROM payment_methods WHERE member_id = $1 ORDER BY created_at, id"
    )))
    .bind(member_id)
    .fetch_all(&db.pool)
    .await
    .map_err(db_err("listing cards"))?
    .iter()
    .map(card_from)
    .collect()
}

pub(crate) async fn remove_card<B: Backend>(
    db: &SqlStore<B>,
    card_id: CardId,
    audit: &Audit,
) -> Result<Card> {
    let mut tx = db.begin_write().await?;
    lock_owner(&mut tx, "payment_methods", card_id).await?;
    let card = card_in(&mut tx, card_id).await?;
    if card.status == CardStatus::Removed {
        return Err(StoreError::Conflict(format!(
            "card {card_id} is already removed"
        )));
    }
    let user: Option<(ScheduleId, String)> = query_as("SELECT id, status FROM schedules WHERE payment_method_id = $1 AND status IN ('active', 'paused', 'suspended') ORDER BY id LIMIT 1")
        .bind(card_id)
        .fetch_optional(tx.conn())
        .await
        .map_err(db_err("checking the card's schedules"))?;
    if let Some((schedule_id, status)) = user {
        return Err(StoreError::Conflict(format!(
            "card {card_id} is used by schedule {} ({status}); move that schedule to another card with `autopay schedule update {} --card NEW_CARD` or cancel it, then remove this card",
            schedule_id, schedule_id
        )));
    }
    let row = query(sqlx::AssertSqlSafe(format!("UPDATE payment_methods SET status = 'removed', status_reason = 'removed by operator', updated_at = $1 WHERE id = $2 RETURNING {CARD_COLS}")))
        .bind(DbTime(audit.at))
        .bind(card_id)
        .fetch_one(tx.conn())
        .await
        .map_err(db_err("removing a card"))?;
    let removed = card_from(&row)?;
    event(
        &mut tx,
        audit,
        "card",
        card_id,
        "removed",
        serde_json::json!({}),
    )
    .await?;
    commit(tx).await?;
    Ok(removed)
}

pub(crate) async fn refresh_card<B: Backend>(
    db: &SqlStore<B>,
    processor: &str,
    token: &str,
    details: &crate::processor::CardDetails,
    reenable_reason: Option<&str>,
    audit: &Audit,
) -> Result<Vec<Card>> {
    let mut tx = db.begin_write().await?;
    let ids: Vec<CardId> = query_scalar("SELECT id FROM payment_methods WHERE processor = $1 AND processor_token = $2 AND status IN ('active', 'disabled') ORDER BY id")
        .bind(processor)
        .bind(token)
        .fetch_all(tx.conn())
        .await
        .map_err(db_err("finding a card by its token"))?;
    let mut cards = Vec::new();
    for id in ids {
        let card = card_in(&mut tx, id).await?;
        // Only a card disabled because it expired comes back: never one disabled as
        // lost, stolen or revoked.
        let reenable = card.status == CardStatus::Disabled
            && reenable_reason.is_some()
            && card.status_reason.as_deref() == reenable_reason;
        let changed = card.brand != details.brand
            || card.last4 != details.last4
            || card.exp_month != details.expiry.month()
            || card.exp_year != details.expiry.year();
        query("UPDATE payment_methods SET brand = $1, last4 = $2, exp_month = $3, exp_year = $4, status = CASE WHEN $5 THEN 'active' ELSE status END, status_reason = CASE WHEN $5 THEN NULL ELSE status_reason END, details_checked_at = $6, updated_at = CASE WHEN $7 THEN $6 ELSE updated_at END WHERE id = $8")
            .bind(details.brand.as_str())
            .bind(details.last4.as_str())
            .bind(i64::from(details.expiry.month()))
            .bind(i64::from(details.expiry.year()))
            .bind(reenable)
            .bind(DbTime(audit.at))
            .bind(changed || reenable)
            .bind(id)
            .execute(tx.conn())
            .await
            .map_err(db_err("refreshing a card"))?;
        if changed || reenable {
            event(&mut tx, audit, "card", card.id, "refreshed", serde_json::json!({
                "brand": details.brand.as_str(), "last4": details.last4.as_str(),
                "exp_month": details.expiry.month(), "exp_year": details.expiry.year(), "reenabled": reenable,
            })).await?;
        }
        cards.push(card_in(&mut tx, id).await?);
    }
    commit(tx).await?;
    Ok(cards)
}

pub(crate) async fn card_checked<B: Backend>(
    db: &SqlStore<B>,
    processor: &str,
    token: &str,
    at: Timestamp,
) -> Result<()> {
    let mut tx = db.begin_write().await?;
    query("UPDATE payment_methods SET details_checked_at = $1 WHERE processor = $2 AND processor_token = $3")
        .bind(DbTime(at))
        .bind(processor)
        .bind(token)
        .execute(tx.conn())
        .await
        .map_err(db_err("marking a card read"))?;
    commit(tx).await
}

pub(crate) async fn cards_to_refresh<B: Backend>(
    db: &SqlStore<B>,
    processor: &str,
    by: jiff::civil::Date,
    checked_before: Timestamp,
    limit: u32,
) -> Result<Vec<String>> {
    query_scalar("SELECT DISTINCT p.processor_token FROM payment_methods p WHERE p.processor = $1 AND p.status = 'active' AND p.exp_year <= $2 AND (p.exp_year < $2 OR p.exp_month <= $3) \
         AND (p.details_checked_at IS NULL OR p.details_checked_at < $4) \
         AND EXISTS (SELECT 1 FROM schedules s WHERE s.payment_method_id = p.id AND s.status = 'active') ORDER BY p.processor_token LIMIT $5")
        .bind(processor)
        .bind(i64::from(by.year()))
        .bind(i64::from(by.month()))
        .bind(DbTime(checked_before))
        .bind(i64::from(limit))
        .fetch_all(&db.pool)
        .await
        .map_err(db_err("finding cards to refresh"))
}

pub(crate) async fn cards_expiring<B: Backend>(
    db: &SqlStore<B>,
    by: jiff::civil::Date,
) -> Result<Vec<(Card, Member)>> {
    let rows = query(sqlx::AssertSqlSafe(format!(
        "SELECT {} FROM payment_methods p WHERE p.status = 'active' AND p.exp_year <= $1 AND (p.exp_year < $1 OR p.exp_month <= $2) \
         AND EXISTS (SELECT 1 FROM schedules s WHERE s.payment_method_id = p.id AND s.status = 'active') ORDER BY p.id",
        CARD_COLS.split(", ").map(|c| format!("p.{c}")).collect::<Vec<_>>().join(", ")
    )))
    .bind(i64::from(by.year()))
    .bind(i64::from(by.month()))
    .fetch_all(&db.pool)
    .await
    .map_err(db_err("finding expiring cards"))?;
    let mut out = Vec::new();
    for row in rows {
        let card = card_from(&row)?;
        let member = super::members::member_by_id(db, card.member_id).await?;
        if member.reminders && member.status == MemberStatus::Active {
            out.push((card, member));
        }
    }
    Ok(out)
}

pub(crate) async fn card_processors<B: Backend>(db: &SqlStore<B>) -> Result<Vec<CardProcessor>> {
    let rows: Vec<(String, Option<String>, i64)> = query_as("SELECT processor, processor_mode, COUNT(*) FROM payment_methods WHERE status = 'active' GROUP BY processor, processor_mode ORDER BY processor, processor_mode")
        .fetch_all(&db.pool)
        .await
        .map_err(db_err("counting cards by processor"))?;
    Ok(rows
        .into_iter()
        .map(|(processor, mode, cards)| CardProcessor {
            processor,
            mode,
            cards,
        })
        .collect())
}
