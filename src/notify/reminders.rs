//! Scans that write reminders into the outbox: an upcoming charge `reminders.days_before` days
//! ahead (one per occurrence, never after the charge), and a card that expires within
//! `reminders.card_expiry_days` while an active schedule uses it. Both respect the member's
//! reminder preference, and both expire once their moment has passed or after `email.max_age`.

use jiff::{SignedDuration, Timestamp};

use crate::config::Settings;
use crate::domain::notice::{CardExpiring, Reminder};
use crate::limiter::RateLimiter;
use crate::processor::Processor;
use crate::store::{Audit, NewNotification, Store, StoreError};

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
        let notice = Reminder {
            schedule_id: s.id,
            to: member.addressee(),
            due_at,
            amount: s.amount.fixed_amount(),
            currency: s.currency.code(),
            card: card.label(),
            time_zone: s.time_zone.clone(),
            occurrence: occurrence.to_string(),
        }
        .notice();
        let notification = NewNotification {
            kind: notice.kind.into(),
            dedupe_key: notice.dedupe_key,
            member_id: member.id,
            payload: notice.payload,
            // Never after the charge, and never staler than email.max_age.
            expires_at: Some(earliest(due_at, now.checked_add(max_age).ok())),
        };
        if store.enqueue(&notification, now).await? {
            written += 1;
        }
    }
    Ok(written)
}

/// Today (UTC) and the last day a card may expire to be reminded about now
/// (`reminders.card_expiry_days` ahead); `None` when those reminders are off.
fn expiry_horizon(
    settings: &Settings,
    now: Timestamp,
) -> Option<(jiff::civil::Date, jiff::civil::Date)> {
    let days = settings.reminders.card_expiry_days;
    if days == 0 {
        return None;
    }
    let today = now.to_zoned_datetime(jiff::tz::TimeZone::UTC).date();
    let by = today
        .checked_add(jiff::Span::new().days(i64::from(days)))
        .unwrap_or(today);
    Some((today, by))
}

/// Writes card-expiring notices; returns how many were new.
pub async fn scan_card_expiry(
    store: &dyn Store,
    settings: &Settings,
    now: Timestamp,
) -> Result<u64, StoreError> {
    let Some((_, by)) = expiry_horizon(settings, now) else {
        return Ok(0);
    };
    let max_age =
        SignedDuration::try_from(settings.email.max_age.as_std()).unwrap_or(SignedDuration::ZERO);
    let mut written = 0;
    for (card, member) in store.cards_expiring(by).await? {
        let notice = CardExpiring::new(
            card.id,
            card.label(),
            member.addressee(),
            card.exp_month,
            card.exp_year,
        )
        .notice();
        let notification = NewNotification {
            kind: notice.kind.into(),
            dedupe_key: notice.dedupe_key,
            member_id: member.id,
            payload: notice.payload,
            expires_at: now.checked_add(max_age).ok(),
        };
        if store.enqueue(&notification, now).await? {
            written += 1;
        }
    }
    Ok(written)
}

/// How many cards are read back from the processor per batch.
const REFRESH_BATCH: u32 = 200;

/// Before card-expiring notices are written: reads back from the processor each card that is
/// about to be reminded about (at most once a day per card), since the networks' card updater
/// may have renewed it there. A renewed card takes its new expiry and needs no notice. A card
/// the processor cannot answer about now keeps its details (the notice goes as before). Each
/// read takes a turn of the process's rate limit.
/// Returns how many cards were read.
pub async fn refresh_expiring(
    store: &dyn Store,
    processor: &dyn Processor,
    limiter: &RateLimiter,
    settings: &Settings,
    now: Timestamp,
) -> Result<u64, StoreError> {
    let Some((today, by)) = expiry_horizon(settings, now) else {
        return Ok(0);
    };
    let day_ago = now
        .checked_sub(SignedDuration::from_hours(24))
        .unwrap_or(now);
    let expired = crate::domain::decline::classify_code("expired_card").member_reason;
    let audit = Audit {
        actor: "card-updater".into(),
        at: now,
    };
    let mut read = 0;
    // Batch by batch until every card due a notice was read (a card that cannot be read now
    // is marked read all the same, so one bad card never holds the others back).
    loop {
        let tokens = store
            .cards_to_refresh(processor.name(), by, day_ago, REFRESH_BATCH)
            .await?;
        if tokens.is_empty() {
            return Ok(read);
        }
        for token in tokens {
            limiter.acquire().await;
            let answer = tokio::time::timeout(
                settings.processor.timeout.as_std(),
                processor.card_details(&token),
            )
            .await;
            let details = match answer {
                Ok(Ok(d)) => d,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "could not read a card back from the processor before its expiry notice; the notice goes as before");
                    store.card_checked(processor.name(), &token, now).await?;
                    continue;
                }
                Err(_) => {
                    tracing::warn!(
                        "the processor did not answer about a card before its expiry notice; the notice goes as before"
                    );
                    store.card_checked(processor.name(), &token, now).await?;
                    continue;
                }
            };
            let reenable = details
                .expiry
                .check_not_expired(today)
                .is_ok()
                .then_some(expired);
            store
                .refresh_card(processor.name(), &token, &details, reenable, &audit)
                .await?;
            read += 1;
        }
    }
}

/// Both scans; returns how many reminders were new.
pub async fn scan(
    store: &dyn Store,
    settings: &Settings,
    now: Timestamp,
) -> Result<u64, StoreError> {
    Ok(scan_upcoming(store, settings, now).await? + scan_card_expiry(store, settings, now).await?)
}
