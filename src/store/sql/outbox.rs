//! The outbox: notifications written in the transaction of the change they report, and claimed,
//! delivered and recorded by the dispatcher.

use jiff::Timestamp;

use crate::domain::notice::Notice;
use crate::sqltypes::{DbId, DbTime};
use crate::store::sql::{Backend, db_err, new_id, query};
use crate::store::{Member, Result, WriteTx};

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
        .bind(DbId(member.id))
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
