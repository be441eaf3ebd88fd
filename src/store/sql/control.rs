//! Control: the schema and its migrations, the installation's pauses and marks, status and
//! activity, periodic jobs, audit events, and the processor's webhook events.

use jiff::Timestamp;

use crate::store::sql::{Backend, SqlStore, db_err, get, id, opt_time, query};
use crate::store::{Control, Pause, Result, StoreError};

pub(crate) fn pause_from(
    at: Option<Timestamp>,
    by: Option<String>,
    reason: Option<String>,
) -> Option<Pause> {
    at.map(|since| Pause {
        since,
        by,
        reason: reason.unwrap_or_default(),
    })
}

pub(crate) async fn control<B: Backend>(db: &SqlStore<B>) -> Result<Control> {
    let row = query("SELECT installation_id, min_binary_schema, charging_paused_at, charging_paused_by, charging_paused_reason, mail_paused_at, mail_paused_reason, reconcile_required_since FROM control WHERE id = 1")
        .fetch_optional(&db.pool)
        .await
        .map_err(db_err("reading control"))?
        .ok_or_else(|| StoreError::Schema("the database has no installation id; run `autopay migrate`".into()))?;
    const T: &str = "control";
    Ok(Control {
        installation_id: id(&row, T, "installation_id")?,
        min_binary_schema: get(&row, T, "min_binary_schema")?,
        charging_paused: pause_from(
            opt_time(&row, T, "charging_paused_at")?,
            get(&row, T, "charging_paused_by")?,
            get(&row, T, "charging_paused_reason")?,
        ),
        mail_paused: pause_from(
            opt_time(&row, T, "mail_paused_at")?,
            None,
            get(&row, T, "mail_paused_reason")?,
        ),
        reconcile_required_since: opt_time(&row, T, "reconcile_required_since")?,
    })
}
