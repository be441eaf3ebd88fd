//! Bulk loading for `autopay bench`: a million schedules in seconds, not one transaction each.
//!
//! The first member, card, bill and schedule go through the store like any others (so every
//! rule and every column's encoding is the store's own). The rest are copies of those rows
//! under new ids: one `INSERT … SELECT` per [`ROWS_PER_STATEMENT`] copies, reading every column
//! the copy does not replace from the template row, so a column a later migration adds is
//! copied too. The columns come from the database's own catalogue; the SQL text is the same on
//! both backends (`$N` placeholders, and `VALUES` rows named `column1`, `column2`, … by both).

use sqlx::{PgPool, SqlitePool};
use uuid::Uuid;

use super::CliError;
use super::exit;
use crate::config::{Backend, DatabaseUrl};
use crate::sqltypes::DbId;

/// Copies per statement: well under both backends' limits on bound values (SQLite 32,766,
/// PostgreSQL 65,535) with three or four replaced columns a copy.
const ROWS_PER_STATEMENT: usize = 1000;

/// A value a copy takes instead of the template's.
#[derive(Debug, Clone)]
pub(super) enum Value {
    Id(Uuid),
    Text(String),
}

/// A connection pool of its own to the benchmark's throwaway database.
pub(super) enum BulkLoader {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

fn failed(doing: &str, e: sqlx::Error) -> CliError {
    CliError::new(
        exit::UNAVAILABLE,
        format!("the benchmark's bulk load failed while {doing}: {e}"),
    )
}

impl BulkLoader {
    pub(super) async fn open(url: &DatabaseUrl) -> Result<BulkLoader, CliError> {
        Ok(match url.backend() {
            Backend::Sqlite => BulkLoader::Sqlite(
                SqlitePool::connect(url.expose())
                    .await
                    .map_err(|e| failed("connecting", e))?,
            ),
            Backend::Postgres => BulkLoader::Postgres(
                PgPool::connect(url.expose())
                    .await
                    .map_err(|e| failed("connecting", e))?,
            ),
        })
    }

    /// The table's columns, in their order.
    async fn columns(&self, table: &str) -> Result<Vec<String>, CliError> {
        let doing = "reading the table's columns";
        let columns: Vec<String> = match self {
            BulkLoader::Sqlite(pool) => {
                sqlx::query_scalar("SELECT name FROM pragma_table_info($1) ORDER BY cid")
                    .bind(table)
                    .fetch_all(pool)
                    .await
            }
            BulkLoader::Postgres(pool) => sqlx::query_scalar(
                "SELECT column_name::text FROM information_schema.columns WHERE table_schema = current_schema() AND table_name = $1 ORDER BY ordinal_position",
            )
            .bind(table)
            .fetch_all(pool)
            .await,
        }
        .map_err(|e| failed(doing, e))?;
        if columns.is_empty() {
            return Err(CliError::internal(format!(
                "the benchmark's bulk load found no table {table}"
            )));
        }
        Ok(columns)
    }

    /// Copies the row of `table` whose id is `template` once per item of `copies`, each copy
    /// taking its item's values for the columns `replaced` (in that order) and the template's
    /// for every other column.
    pub(super) async fn replicate(
        &self,
        table: &str,
        template: Uuid,
        replaced: &[&str],
        copies: impl Iterator<Item = Vec<Value>>,
    ) -> Result<u64, CliError> {
        let columns = self.columns(table).await?;
        if let Some(unknown) = replaced.iter().find(|c| !columns.iter().any(|k| k == *c)) {
            return Err(CliError::internal(format!(
                "the benchmark's bulk load: {table} has no column {unknown}"
            )));
        }
        let selected = columns
            .iter()
            .map(|c| match replaced.iter().position(|r| r == c) {
                Some(i) => format!("v.column{}", i + 1),
                None => format!("t.{c}"),
            })
            .collect::<Vec<_>>()
            .join(", ");
        let mut written = 0;
        let mut chunk: Vec<Vec<Value>> = Vec::with_capacity(ROWS_PER_STATEMENT);
        let mut copies = copies.peekable();
        while copies.peek().is_some() {
            chunk.clear();
            chunk.extend(copies.by_ref().take(ROWS_PER_STATEMENT));
            // $1 is the template's id; each copy's values follow in turn.
            let mut next = 2;
            let rows = chunk
                .iter()
                .map(|values| {
                    let cells = values
                        .iter()
                        .map(|_| {
                            next += 1;
                            format!("${}", next - 1)
                        })
                        .collect::<Vec<_>>()
                        .join(", ");
                    format!("({cells})")
                })
                .collect::<Vec<_>>()
                .join(", ");
            let sql = format!(
                "INSERT INTO {table} ({}) SELECT {selected} FROM (VALUES {rows}) AS v CROSS JOIN {table} t WHERE t.id = $1",
                columns.join(", ")
            );
            written += match self {
                BulkLoader::Sqlite(pool) => {
                    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(DbId(template));
                    for value in chunk.iter().flatten() {
                        q = match value {
                            Value::Id(id) => q.bind(DbId(*id)),
                            Value::Text(text) => q.bind(text.clone()),
                        };
                    }
                    q.execute(pool).await.map(|r| r.rows_affected())
                }
                BulkLoader::Postgres(pool) => {
                    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(DbId(template));
                    for value in chunk.iter().flatten() {
                        q = match value {
                            Value::Id(id) => q.bind(DbId(*id)),
                            Value::Text(text) => q.bind(text.clone()),
                        };
                    }
                    q.execute(pool).await.map(|r| r.rows_affected())
                }
            }
            .map_err(|e| failed(&format!("copying {table} rows"), e))?;
        }
        Ok(written)
    }

    /// Receipts in the outbox, whatever their state.
    pub(super) async fn receipts(&self) -> Result<i64, CliError> {
        const SQL: &str = "SELECT COUNT(*) FROM notifications WHERE kind = 'receipt'";
        match self {
            BulkLoader::Sqlite(pool) => sqlx::query_scalar(SQL).fetch_one(pool).await,
            BulkLoader::Postgres(pool) => sqlx::query_scalar(SQL).fetch_one(pool).await,
        }
        .map_err(|e| failed("counting receipts", e))
    }

    pub(super) async fn close(self) {
        match self {
            BulkLoader::Sqlite(pool) => pool.close().await,
            BulkLoader::Postgres(pool) => pool.close().await,
        }
    }
}
