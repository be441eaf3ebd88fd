//! The [`Store`](super::Store) implementation both backends share, split by aggregate. The SQL
//! is one text for both dialects (`$N` placeholders, which SQLite also reads; columns typed
//! through [`crate::sqltypes`]); what differs between them ([`Backend`]) is implemented for
//! `sqlx::Sqlite` in `store/sqlite.rs` and `sqlx::Postgres` in `store/postgres.rs`.
//!
//! This file holds [`SqlStore`], the row helpers every aggregate reads with, and the audit
//! events every transaction writes when it commits.

pub mod backend;
pub(crate) mod bills;
pub(crate) mod cards;
pub(crate) mod control;
pub(crate) mod members;
pub(crate) mod outbox;
pub(crate) mod payments;
pub(crate) mod reconcile;
pub(crate) mod schedules;
mod store;

use std::collections::HashMap;

use jiff::Timestamp;
use uuid::Uuid;

use crate::domain::money::Currency;
use crate::domain::payment::{PaymentState, Transition};
use crate::sqltypes::{DbId, DbTime, IdParam};
use crate::store::{Audit, Event, Result, StoreError, WriteTx};

pub use backend::{Backend, Column, Conn, Param, Record};
pub(crate) use backend::{execute_script, query, query_as, query_scalar};

/// Autopay's data in a SQL database: a pool, and what the backend keeps besides
/// ([`Backend::WriteTurn`]). `store::sqlite::SqliteStore` and `store::postgres::PgStore` name
/// its two kinds.
pub struct SqlStore<B: Backend> {
    pub(crate) pool: sqlx::Pool<B>,
    pub(crate) turn: B::WriteTurn,
}

impl<B: Backend> Clone for SqlStore<B> {
    fn clone(&self) -> Self {
        SqlStore {
            pool: self.pool.clone(),
            turn: self.turn.clone(),
        }
    }
}

impl<B: Backend> std::fmt::Debug for SqlStore<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlStore")
            .field("pool", &self.pool)
            .field("turn", &self.turn)
            .finish()
    }
}

impl<B: Backend> SqlStore<B> {
    pub fn pool(&self) -> &sqlx::Pool<B> {
        &self.pool
    }

    pub(crate) async fn begin_write(&self) -> Result<WriteTx<B>> {
        B::begin_write(self).await
    }
}

pub(crate) fn db_err(doing: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |e| StoreError::from_sqlx(e, doing)
}

pub(crate) fn corrupt(table: &str, column: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Internal(format!(
        "a stored {table} row has an unreadable {column} ({e}); the database was changed outside autopay"
    ))
}

pub(crate) fn get<T: Column>(row: &impl Record, table: &str, col: &str) -> Result<T> {
    row.column::<T>(col).map_err(|e| corrupt(table, col, e))
}

pub(crate) fn parsed<T, E: std::fmt::Display>(
    table: &str,
    col: &str,
    r: std::result::Result<T, E>,
) -> Result<T> {
    r.map_err(|e| corrupt(table, col, e))
}

pub(crate) fn id(row: &impl Record, table: &str, col: &str) -> Result<Uuid> {
    Ok(get::<DbId>(row, table, col)?.0)
}

pub(crate) fn time(row: &impl Record, table: &str, col: &str) -> Result<Timestamp> {
    Ok(get::<DbTime>(row, table, col)?.0)
}

pub(crate) fn opt_time(row: &impl Record, table: &str, col: &str) -> Result<Option<Timestamp>> {
    Ok(get::<Option<DbTime>>(row, table, col)?.map(|t| t.0))
}

pub(crate) fn currency(row: &impl Record, table: &str) -> Result<Currency> {
    parsed(
        table,
        "currency",
        Currency::parse(&get::<String>(row, table, "currency")?),
    )
}

/// `$first, $first+1, …`: `n` placeholders in a row, for an `IN (…)` list or a `VALUES` row.
pub(crate) fn placeholders(first: usize, n: usize) -> String {
    (first..first + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Ids per `IN (…)` list or rows per multi-row statement: well under both backends' limits
/// on bound values (32,766 in SQLite, 65,535 in PostgreSQL) at a dozen values a row.
pub(crate) const ROWS_PER_STATEMENT: usize = 1000;

/// The ids, sorted, each once.
pub(crate) fn sorted<I: Ord>(ids: impl Iterator<Item = I>) -> Vec<I> {
    let mut ids: Vec<I> = ids.collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Reads (and on PostgreSQL locks, in id order) the rows of `table` with these `ids`, each
/// made into a `T` by `from`, by id.
pub(crate) async fn locked_rows<B: Backend, I: IdParam + Column + Eq + std::hash::Hash, T>(
    tx: &mut WriteTx<B>,
    table: &'static str,
    cols: &str,
    ids: Vec<I>,
    from: impl Fn(&B::Row) -> Result<T>,
) -> Result<HashMap<I, T>> {
    let mut rows = HashMap::with_capacity(ids.len());
    for chunk in ids.chunks(ROWS_PER_STATEMENT) {
        let mut read = query(sqlx::AssertSqlSafe(format!(
            "SELECT {cols} FROM {table} WHERE id IN ({}) ORDER BY id{}",
            placeholders(1, chunk.len()),
            B::FOR_UPDATE
        )));
        for id in chunk {
            read = read.bind(*id);
        }
        for row in read
            .fetch_all(tx.conn())
            .await
            .map_err(db_err("reading rows to change"))?
        {
            let id = get::<I>(&row, table, "id")?;
            rows.insert(id, from(&row)?);
        }
    }
    Ok(rows)
}

pub(crate) fn new_id() -> Uuid {
    Uuid::now_v7()
}

pub(crate) fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.is_unique_violation())
}

/// The state `transition` leads to from `from`; a move the state machine forbids is an
/// error, never a write.
pub(crate) fn step(from: PaymentState, transition: Transition) -> Result<PaymentState> {
    crate::domain::payment::moved(from, transition).map_err(|e| {
        StoreError::Internal(format!(
            "{e}; the payment was changed outside autopay, or this is a bug"
        ))
    })
}

pub(crate) fn money_err(e: crate::domain::money::MoneyError) -> StoreError {
    StoreError::Internal(format!("{e}; a stored amount was changed outside autopay"))
}

/// Processor text kept in the history: one line, bounded.
pub(crate) fn short(detail: &str) -> String {
    detail
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(300)
        .collect()
}

/// `'a', 'b'`: a SQL list of state spellings (fixed words, never input).
pub(crate) fn state_list(states: &[PaymentState]) -> String {
    states
        .iter()
        .map(|s| format!("'{}'", s.as_str()))
        .collect::<Vec<_>>()
        .join(", ")
}

pub(crate) async fn event<B: Backend>(
    tx: &mut WriteTx<B>,
    audit: &Audit,
    entity: &str,
    entity_id: impl std::fmt::Display,
    action: &str,
    detail: serde_json::Value,
) -> Result<()> {
    // Written with the transaction's other events when it commits.
    tx.events.push(Event {
        id: new_id(),
        at: audit.at,
        actor: audit.actor.clone(),
        entity: entity.to_string(),
        entity_id: entity_id.to_string(),
        action: action.to_string(),
        detail,
    });
    Ok(())
}

/// Events per INSERT statement: 7 values each, well under both backends' limit on
/// bound values (32,766 in SQLite, 65,535 in PostgreSQL).
const EVENTS_PER_INSERT: usize = 500;

/// Inserts the transaction's audit events, wakes the other processes if any write
/// asked, and commits.
pub(crate) async fn commit<B: Backend>(mut tx: WriteTx<B>) -> Result<()> {
    let events = std::mem::take(&mut tx.events);
    for chunk in events.chunks(EVENTS_PER_INSERT) {
        let mut sql = String::from(
            "INSERT INTO events (id, at, actor, entity, entity_id, action, detail) VALUES ",
        );
        for i in 0..chunk.len() {
            let b = i * 7;
            if i > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&format!("({})", placeholders(b + 1, 7)));
        }
        let mut q = query::<B>(sqlx::AssertSqlSafe(sql));
        for e in chunk {
            q = q
                .bind(DbId(e.id))
                .bind(DbTime(e.at))
                .bind(&e.actor)
                .bind(&e.entity)
                .bind(&e.entity_id)
                .bind(&e.action)
                .bind(sqlx::types::Json(&e.detail));
        }
        q.execute(tx.conn())
            .await
            .map_err(db_err("recording the audit events"))?;
    }
    if tx.wake {
        B::wake_now(&mut tx).await?;
    }
    tx.commit().await.map_err(db_err("committing"))
}
