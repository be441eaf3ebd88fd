//! Scans that write reminders into the outbox: an upcoming charge `reminders.days_before` days
//! ahead (one per occurrence, never after the charge), and a card that expires within
//! `reminders.card_expiry_days` while an active schedule uses it. Both respect the member's
//! reminder preference, and both expire once their moment has passed or after `email.max_age`.

use jiff::{SignedDuration, Timestamp};

use crate::config::Settings;
use crate::domain::payment::AmountRule;
use crate::store::{NewNotification, Store, StoreError};

fn earliest(a: Timestamp, b: Option<Timestamp>) -> Timestamp {
    b.map_or(a, |b| a.min(b))
}

/// Writes upcoming-charge reminders; returns how many were new.
pub async fn scan_upcoming(
    store: &dyn Store,
    settings: &Settings,
    now: Timestamp,
) -> Result<u64, StoreError> {
    let days = settings.reminders.days_before;
    if days == 0 {
        return Ok(0);
    }
    let until = now
        .checked_add(SignedDuration::from_hours(24 * i64::from(days)))
        .unwrap_or(now);
    let max_age =
        SignedDuration::try_from(settings.email.max_age.as_std()).unwrap_or(SignedDuration::ZERO);
    let mut written = 0;
    for s in store.schedules_due_between(now, until).await? {
        let (Some(due_at), Some(occurrence)) = (s.next_run_at, s.next_occurrence) else {
            continue;
        };
        let member = store.member_by_id(s.member_id).await?;
        let card = store.card(s.card_id).await?;
        let amount = match s.amount {
            AmountRule::Fixed { amount } => serde_json::Value::String(amount.amount_string()),
            AmountRule::Balance => serde_json::Value::Null,
        };
        let notification = NewNotification {
            kind: "reminder".into(),
            dedupe_key: format!("reminder:{}:{occurrence}", s.id),
            member_id: member.id,
            payload: serde_json::json!({
                "schedule_id": s.id, "member_name": member.name.as_str(), "account_type": member.account_type.as_str(),
                "due_at": due_at, "amount": amount, "currency": s.currency.code(), "card": card.label(), "time_zone": s.time_zone,
            }),
            // Never after the charge, and never staler than email.max_age.
            expires_at: Some(earliest(due_at, now.checked_add(max_age).ok())),
        };
        if store.enqueue(&notification, now).await? {
            written += 1;
        }
    }
    Ok(written)
}

/// Writes card-expiring notices; returns how many were new.
pub async fn scan_card_expiry(
    store: &dyn Store,
    settings: &Settings,
    now: Timestamp,
) -> Result<u64, StoreError> {
    let days = settings.reminders.card_expiry_days;
    if days == 0 {
        return Ok(0);
    }
    let today = now.to_zoned_datetime(jiff::tz::TimeZone::UTC).date();
    let by = today
        .checked_add(jiff::Span::new().days(i64::from(days)))
        .unwrap_or(today);
    let max_age =
        SignedDuration::try_from(settings.email.max_age.as_std()).unwrap_or(SignedDuration::ZERO);
    let mut written = 0;
    for (card, member) in store.cards_expiring(by).await? {
        let expiry = format!("{:02}/{}", card.exp_month, card.exp_year);
        let notification = NewNotification {
            kind: "card_expiring".into(),
            dedupe_key: format!(
                "card_expiring:{}:{:02}{}",
                card.id, card.exp_month, card.exp_year
            ),
            member_id: member.id,
            payload: serde_json::json!({
                "card_id": card.id, "card": card.label(), "member_name": member.name.as_str(),
                "account_type": member.account_type.as_str(), "expiry": expiry,
            }),
            expires_at: now.checked_add(max_age).ok(),
        };
        if store.enqueue(&notification, now).await? {
            written += 1;
        }
    }
    Ok(written)
}

/// Both scans; returns how many reminders were new.
pub async fn scan(
    store: &dyn Store,
    settings: &Settings,
    now: Timestamp,
) -> Result<u64, StoreError> {
    Ok(scan_upcoming(store, settings, now).await? + scan_card_expiry(store, settings, now).await?)
}
