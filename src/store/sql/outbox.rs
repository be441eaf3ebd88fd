//! The outbox: notifications written in the transaction of the change they report, and claimed,
//! delivered and recorded by the dispatcher.

use jiff::Timestamp;
use std::collections::BTreeMap;
use uuid::Uuid;

use crate::domain::ids::MemberId;
use crate::domain::notice::Notice;
use crate::sqltypes::{DbId, DbTime};
use crate::store::sql::control::delete_before;
use crate::store::sql::members::member_by_id_in;
use crate::store::sql::{
    Backend, Record, SqlStore, commit, db_err, event, get, id, new_id, placeholders, query,
    query_scalar, time,
};
use crate::store::{
    Audit, Delivered, DeliveryOutcome, Member, NewNotification, Notification, NotificationLease,
    Outgoing, Result, StoreError, WriteTx,
};

/// Writes an outbox row in the caller's transaction; a second row with the same dedupe
/// key is a no-op (the member hears once).
pub(crate) async fn notify<B: Backend>(
    tx: &mut WriteTx<B>,
    kind: &str,
    dedupe_key: &str,
    member: &Member,
    payload: serde_json::Value,
    at: Timestamp,
) -> Result<()> {
    query("INSERT INTO notifications (id, kind, dedupe_key, member_id, recipient, payload, state, attempts, next_attempt_at, created_at) VALUES ($1, $2, $3, $4, $5, $6, 'pending', 0, $7, $7) ON CONFLICT (dedupe_key) DO NOTHING")
        .bind(DbId(new_id()))
        .bind(kind)
        .bind(dedupe_key)
        .bind(member.id)
        .bind(member.email.as_str())
        .bind(sqlx::types::Json(payload))
        .bind(DbTime(at))
        .execute(tx.conn())
        .await
        .map_err(db_err("writing a notification"))?;
    B::wake_others(tx).await
}

/// Writes a domain notice into the outbox in the caller's transaction.
pub(crate) async fn notify_notice<B: Backend>(
    tx: &mut WriteTx<B>,
    n: &Notice,
    member: &Member,
    at: Timestamp,
) -> Result<()> {
    notify(tx, n.kind, &n.dedupe_key, member, n.payload.clone(), at).await
}

pub(crate) const NOTIFICATION_COLS: &str =
    "id, kind, dedupe_key, member_id, recipient, payload, state, attempts, created_at";

pub(crate) fn notification_from(row: &impl Record) -> Result<Notification> {
    const T: &str = "notifications";
    Ok(Notification {
        id: id(row, T, "id")?,
        kind: get(row, T, "kind")?,
        dedupe_key: get(row, T, "dedupe_key")?,
        member_id: get(row, T, "member_id")?,
        recipient: get(row, T, "recipient")?,
        payload: get::<sqlx::types::Json<serde_json::Value>>(row, T, "payload")?.0,
        state: get(row, T, "state")?,
        attempts: get(row, T, "attempts")?,
        created_at: time(row, T, "created_at")?,
    })
}

pub(crate) async fn notifications<B: Backend>(
    db: &SqlStore<B>,
    member_id: Option<MemberId>,
) -> Result<Vec<Notification>> {
    query(sqlx::AssertSqlSafe(format!("SELECT {NOTIFICATION_COLS} FROM notifications WHERE ($1 IS NULL OR member_id = $1) ORDER BY created_at, id")))
        .bind(member_id)
        .fetch_all(&db.pool)
        .await
        .map_err(db_err("listing notifications"))?
        .iter()
        .map(notification_from)
        .collect()
}

pub(crate) async fn enqueue<B: Backend>(
    db: &SqlStore<B>,
    n: &NewNotification,
    at: Timestamp,
) -> Result<bool> {
    // The reminder scans ask every minute about rows that mostly exist already: a
    // read answers those without taking the writer's lock.
    let exists: Option<DbId> = query_scalar("SELECT id FROM notifications WHERE dedupe_key = $1")
        .bind(&n.dedupe_key)
        .fetch_optional(&db.pool)
        .await
        .map_err(db_err("reading a notification"))?;
    if exists.is_some() {
        return Ok(false);
    }
    let mut tx = db.begin_write().await?;
    let member = member_by_id_in(&mut tx, n.member_id).await?;
    let done = query("INSERT INTO notifications (id, kind, dedupe_key, member_id, recipient, payload, state, attempts, next_attempt_at, expires_at, created_at) VALUES ($1, $2, $3, $4, $5, $6, 'pending', 0, $7, $8, $7) ON CONFLICT (dedupe_key) DO NOTHING")
        .bind(DbId(new_id()))
        .bind(&n.kind)
        .bind(&n.dedupe_key)
        .bind(member.id)
        .bind(member.email.as_str())
        .bind(sqlx::types::Json(&n.payload))
        .bind(DbTime(at))
        .bind(n.expires_at.map(DbTime))
        .execute(tx.conn())
        .await
        .map_err(db_err("writing a notification"))?
        .rows_affected();
    B::wake_others(&mut tx).await?;
    commit(tx).await?;
    Ok(done > 0)
}

pub(crate) async fn claim_notifications<B: Backend>(
    db: &SqlStore<B>,
    owner: &str,
    now: Timestamp,
    lease: std::time::Duration,
    limit: u32,
) -> Result<Vec<Outgoing>> {
    let until = now
        .checked_add(
            jiff::SignedDuration::try_from(lease)
                .map_err(|e| StoreError::Internal(e.to_string()))?,
        )
        .map_err(|e| StoreError::Internal(e.to_string()))?;
    let mut tx = db.begin_write().await?;
    // A reminder whose moment has passed is not worth sending.
    query("UPDATE notifications SET state = 'expired', last_error = 'its moment passed before it could be sent' WHERE state IN ('pending', 'sending') AND expires_at IS NOT NULL AND expires_at <= $1 AND (lease_expires_at IS NULL OR lease_expires_at < $1)")
        .bind(DbTime(now))
        .execute(tx.conn())
        .await
        .map_err(db_err("expiring notifications"))?;
    let ids: Vec<DbId> = query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT id FROM notifications WHERE (state = 'pending' AND next_attempt_at <= $1) OR (state = 'sending' AND lease_expires_at < $1) ORDER BY next_attempt_at, id LIMIT $2{}", B::SKIP_LOCKED
    )))
    .bind(DbTime(now))
    .bind(i64::from(limit))
    .fetch_all(tx.conn())
    .await
    .map_err(db_err("finding due notifications"))?;
    if ids.is_empty() {
        commit(tx).await?;
        return Ok(Vec::new());
    }
    // One lease token for the whole claim: a lease is this claim of this row, and a
    // later claim of any of them (after this one expired) gets a token of its own.
    let token = Uuid::new_v4();
    // The recipient is the member's address now, not when the row was queued: an
    // address changed in between must not send the message to the old one. The
    // column then records where this attempt went.
    let placeholders = placeholders(4, ids.len());
    let mut update = query(sqlx::AssertSqlSafe(format!(
        "UPDATE notifications SET state = 'sending', lease_owner = $1, lease_token = $2, lease_expires_at = $3, attempts = attempts + 1, \
         recipient = COALESCE((SELECT m.email FROM members m WHERE m.id = notifications.member_id), recipient) WHERE id IN ({placeholders}) RETURNING {NOTIFICATION_COLS}"
    )))
    .bind(owner)
    .bind(token.to_string())
    .bind(DbTime(until));
    for nid in &ids {
        update = update.bind(*nid);
    }
    let rows = update
        .fetch_all(tx.conn())
        .await
        .map_err(db_err("claiming notifications"))?;
    let mut claimed = BTreeMap::new();
    for row in &rows {
        let notification = notification_from(row)?;
        claimed.insert(notification.id, notification);
    }
    // In the order they fell due (RETURNING promises none).
    let out = ids
        .iter()
        .filter_map(|nid| claimed.remove(&nid.0))
        .map(|notification| Outgoing {
            lease: NotificationLease {
                id: notification.id,
                token,
            },
            notification,
        })
        .collect();
    commit(tx).await?;
    Ok(out)
}

pub(crate) async fn finish_notifications<B: Backend>(
    db: &SqlStore<B>,
    done: &[Delivered],
    now: Timestamp,
) -> Result<Vec<bool>> {
    if done.is_empty() {
        return Ok(Vec::new());
    }
    // Rows are written in id order, whatever order the answers came in: two
    // dispatchers finishing overlapping groups then lock in one order.
    let mut order: Vec<usize> = (0..done.len()).collect();
    order.sort_by_key(|&i| done[i].lease.id);
    let mut recorded = vec![false; done.len()];
    let mut tx = db.begin_write().await?;
    for i in order {
        let Delivered { lease, outcome } = &done[i];
        // Each update holds only while this claim still holds the row: a lease that
        // expired and was claimed again belongs to its new holder.
        const HELD: &str = "lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL WHERE id = $2 AND lease_token = $3 AND state = 'sending' RETURNING member_id";
        let update = match outcome {
            DeliveryOutcome::Sent => query(sqlx::AssertSqlSafe(format!(
                "UPDATE notifications SET state = 'sent', sent_at = $1, last_error = NULL, {HELD}"
            )))
            .bind(DbTime(now)),
            DeliveryOutcome::Retry { at, .. } => query(sqlx::AssertSqlSafe(format!(
                "UPDATE notifications SET state = 'pending', next_attempt_at = $1, last_error = $4, {HELD}"
            )))
            .bind(DbTime(*at)),
            DeliveryOutcome::Failed { error, .. } => query(sqlx::AssertSqlSafe(format!(
                "UPDATE notifications SET state = 'failed', last_error = $1, {HELD}"
            )))
            .bind(error.as_str()),
        };
        let update = update.bind(DbId(lease.id)).bind(lease.token.to_string());
        let update = match outcome {
            DeliveryOutcome::Retry { error, .. } => update.bind(error.as_str()),
            _ => update,
        };
        let row = update
            .fetch_optional(tx.conn())
            .await
            .map_err(db_err("recording a delivery"))?;
        let Some(row) = row else {
            continue;
        };
        recorded[i] = true;
        let member_id: Option<MemberId> = get(&row, "notifications", "member_id")?;
        if let (DeliveryOutcome::Failed { bounce: true, .. }, Some(member_id)) =
            (outcome, member_id)
        {
            query("UPDATE members SET email_bouncing = TRUE, updated_at = $1 WHERE id = $2")
                .bind(DbTime(now))
                .bind(member_id)
                .execute(tx.conn())
                .await
                .map_err(db_err("flagging a bouncing address"))?;
            event(
                &mut tx,
                &Audit {
                    actor: "dispatcher".into(),
                    at: now,
                },
                "member",
                member_id,
                "email_bouncing",
                serde_json::json!({ "notification_id": lease.id }),
            )
            .await?;
        }
    }
    commit(tx).await?;
    Ok(recorded)
}

pub(crate) async fn set_mail_pause<B: Backend>(
    db: &SqlStore<B>,
    reason: Option<&str>,
    now: Timestamp,
) -> Result<()> {
    match reason {
        Some(reason) => query("UPDATE control SET mail_paused_at = COALESCE(mail_paused_at, $1), mail_paused_reason = $2 WHERE id = 1")
            .bind(DbTime(now))
            .bind(reason)
            .execute(&db.pool)
            .await,
        None => {
            let mut tx = db.begin_write().await?;
            let lifted = query("UPDATE control SET mail_paused_at = NULL, mail_paused_reason = NULL WHERE id = 1 AND mail_paused_at IS NOT NULL")
                .execute(tx.conn())
                .await
                .map_err(db_err("recording the mail pause"))?
                .rows_affected();
            if lifted > 0 {
                // What waited through the pause backed off message by message; the
                // server answers again, so it all goes now.
                query("UPDATE notifications SET next_attempt_at = $1 WHERE state = 'pending' AND next_attempt_at > $1")
                    .bind(DbTime(now))
                    .execute(tx.conn())
                    .await
                    .map_err(db_err("resuming the waiting mail"))?;
                B::wake_others(&mut tx).await?;
            }
            commit(tx).await?;
            return Ok(());
        }
    }
    .map_err(db_err("recording the mail pause"))?;
    Ok(())
}

pub(crate) async fn next_mail_due<B: Backend>(db: &SqlStore<B>) -> Result<Option<Timestamp>> {
    let t: Option<DbTime> = query_scalar("SELECT MIN(CASE WHEN state = 'pending' THEN next_attempt_at ELSE lease_expires_at END) FROM notifications WHERE state IN ('pending', 'sending')")
        .fetch_one(&db.pool)
        .await
        .map_err(db_err("finding the next mail due"))?;
    Ok(t.map(|t| t.0))
}

pub(crate) async fn prune_notifications<B: Backend>(
    db: &SqlStore<B>,
    before: Timestamp,
) -> Result<u64> {
    let mut tx = db.begin_write().await?;
    let done = delete_before(&mut tx, "DELETE FROM notifications WHERE (state = 'sent' AND sent_at < $1) OR (state IN ('failed', 'expired') AND created_at < $1)", before, "deleting old notifications").await?;
    commit(tx).await?;
    Ok(done)
}
