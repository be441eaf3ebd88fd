//! What the shared SQL needs of a backend, checked by the compiler: [`Backend`] (implemented for
//! `sqlx::Sqlite` in `store/sqlite.rs` and `sqlx::Postgres` in `store/postgres.rs`) carries the
//! dialect's differences and runs statements; [`Param`] and [`Column`] name the values both
//! backends can bind and read; [`Query`] is a statement being built, with sqlx's method names.
//!
//! The shared code is generic over `B: Backend` and needs no other bound: every operation that
//! would need sqlx's per-database bounds (binding a value, running a statement on a
//! transaction or on the pool, decoding a column) goes through the trait, whose two
//! implementations name a concrete database.

use std::future::Future;
use std::marker::PhantomData;
use std::path::Path;

use jiff::Timestamp;
use sqlx::{Decode, Encode, Postgres, Sqlite, Type};

use crate::store::{Result, WriteTx};

use super::SqlStore;

/// A statement as sqlx holds it, with its arguments.
pub type RawQuery<B> = sqlx::query::Query<'static, B, <B as sqlx::Database>::Arguments>;

/// A database autopay runs on: the dialect's differences and the few operations that need to
/// know which database it is.
pub trait Backend: sqlx::Database<Row: Record> {
    /// Which backend this is, as configured.
    const KIND: crate::config::Backend;
    /// The row-lock suffix of a `SELECT` whose rows the transaction then changes: `" FOR
    /// UPDATE"` in PostgreSQL, nothing in SQLite, whose writer holds the whole database.
    const FOR_UPDATE: &'static str;
    /// The claim's suffix: `" FOR UPDATE SKIP LOCKED"` in PostgreSQL, nothing in SQLite.
    const SKIP_LOCKED: &'static str;
    /// The due charges' index hint: SQLite, without statistics, would sort every due payment
    /// by another index (`" INDEXED BY payments_claimable"`); PostgreSQL's planner picks it by
    /// itself.
    const CLAIM_INDEX: &'static str;
    /// The server's own clock, where it has one (PostgreSQL), for the skew warning at start.
    const CLOCK_QUERY: Option<&'static str>;
    /// Creates the migrations table.
    const BOOTSTRAP: &'static str;
    /// Every migration: version, name, SQL.
    const MIGRATIONS: &'static [(i64, &'static str, &'static str)];

    /// What a store of this backend keeps besides its pool: SQLite's in-process write turn
    /// (see [`WriteTx`]); nothing for PostgreSQL.
    type WriteTurn: Clone + std::fmt::Debug + Send + Sync;

    /// The due-charges claim (`sql::payments::claim::claim_due_sql`) in this dialect, built
    /// once.
    fn claim_due_sql() -> &'static str;

    /// Adds a value to a statement's arguments.
    fn bind<'t, P: Param<'t>>(query: RawQuery<Self>, value: P) -> RawQuery<Self>;
    /// Runs a statement; returns how many rows it changed.
    fn execute(
        query: RawQuery<Self>,
        on: Conn<'_, Self>,
    ) -> impl Future<Output = std::result::Result<u64, sqlx::Error>> + Send;
    /// Runs SQL text of one or more statements, without arguments (migrations).
    fn execute_script(
        sql: &'static str,
        on: Conn<'_, Self>,
    ) -> impl Future<Output = std::result::Result<u64, sqlx::Error>> + Send;
    /// Runs a statement; returns every row.
    fn fetch_all(
        query: RawQuery<Self>,
        on: Conn<'_, Self>,
    ) -> impl Future<Output = std::result::Result<Vec<Self::Row>, sqlx::Error>> + Send;
    /// Runs a statement; returns its first row, if any.
    fn fetch_optional(
        query: RawQuery<Self>,
        on: Conn<'_, Self>,
    ) -> impl Future<Output = std::result::Result<Option<Self::Row>, sqlx::Error>> + Send;

    /// Opens a writing transaction (SQLite: this process's turn, then `BEGIN IMMEDIATE`).
    fn begin_write(store: &SqlStore<Self>) -> impl Future<Output = Result<WriteTx<Self>>> + Send;
    /// Serializes concurrent `migrate` runs, in the migration's transaction.
    fn lock_for_migration(tx: &mut WriteTx<Self>) -> impl Future<Output = Result<()>> + Send;
    /// Asks for the other processes to be woken when `tx` commits.
    fn wake_others(tx: &mut WriteTx<Self>) -> impl Future<Output = Result<()>> + Send;
    /// Sends the wake-up a transaction asked for, just before it commits.
    fn wake_now(tx: &mut WriteTx<Self>) -> impl Future<Output = Result<()>> + Send;
    /// [`crate::store::Store::watch`].
    fn watch(
        store: &SqlStore<Self>,
        changed: &(dyn Fn() + Send + Sync),
        stop: &crate::shutdown::Shutdown,
    ) -> impl Future<Output = Result<()>> + Send;
    /// [`crate::store::Store::backup_into`].
    fn backup_into(
        store: &SqlStore<Self>,
        path: &Path,
        at: Timestamp,
    ) -> impl Future<Output = Result<()>> + Send;
}

/// A value both backends can bind.
pub trait Param<'t>:
    Encode<'t, Sqlite> + Type<Sqlite> + Encode<'t, Postgres> + Type<Postgres>
{
}

impl<'t, T> Param<'t> for T where
    T: Encode<'t, Sqlite> + Type<Sqlite> + Encode<'t, Postgres> + Type<Postgres>
{
}

/// A value both backends can read from a column.
pub trait Column:
    for<'r> Decode<'r, Sqlite> + Type<Sqlite> + for<'r> Decode<'r, Postgres> + Type<Postgres> + Send
{
}

impl<T> Column for T where
    T: for<'r> Decode<'r, Sqlite>
        + Type<Sqlite>
        + for<'r> Decode<'r, Postgres>
        + Type<Postgres>
        + Send
{
}

/// A row of either backend, read by column.
pub trait Record: Send + Sync {
    /// The column named `name`.
    fn column<T: Column>(&self, name: &str) -> std::result::Result<T, sqlx::Error>;
    /// The column at `index`, from 0.
    fn column_at<T: Column>(&self, index: usize) -> std::result::Result<T, sqlx::Error>;
}

/// A row read as a tuple of its columns, in order (sqlx's `query_as`).
pub trait Columns: Sized + Send {
    fn from_record(row: &impl Record) -> std::result::Result<Self, sqlx::Error>;
}

impl<A: Column, B: Column> Columns for (A, B) {
    fn from_record(row: &impl Record) -> std::result::Result<Self, sqlx::Error> {
        Ok((row.column_at(0)?, row.column_at(1)?))
    }
}

impl<A: Column, B: Column, C: Column> Columns for (A, B, C) {
    fn from_record(row: &impl Record) -> std::result::Result<Self, sqlx::Error> {
        Ok((row.column_at(0)?, row.column_at(1)?, row.column_at(2)?))
    }
}

impl<A: Column, B: Column, C: Column, D: Column> Columns for (A, B, C, D) {
    fn from_record(row: &impl Record) -> std::result::Result<Self, sqlx::Error> {
        Ok((
            row.column_at(0)?,
            row.column_at(1)?,
            row.column_at(2)?,
            row.column_at(3)?,
        ))
    }
}

impl<A: Column, B: Column, C: Column, D: Column, E: Column> Columns for (A, B, C, D, E) {
    fn from_record(row: &impl Record) -> std::result::Result<Self, sqlx::Error> {
        Ok((
            row.column_at(0)?,
            row.column_at(1)?,
            row.column_at(2)?,
            row.column_at(3)?,
            row.column_at(4)?,
        ))
    }
}

/// Where a statement runs: a writing transaction's connection, or the pool.
pub enum Conn<'c, B: sqlx::Database> {
    Tx(&'c mut B::Connection),
    Pool(&'c sqlx::Pool<B>),
}

/// What a statement can run on ([`Conn`], or `&Pool`).
pub trait On<'c, B: sqlx::Database> {
    fn conn(self) -> Conn<'c, B>;
}

impl<'c, B: sqlx::Database> On<'c, B> for Conn<'c, B> {
    fn conn(self) -> Conn<'c, B> {
        self
    }
}

impl<'c, B: sqlx::Database> On<'c, B> for &'c sqlx::Pool<B> {
    fn conn(self) -> Conn<'c, B> {
        Conn::Pool(self)
    }
}

/// What a statement's rows are read as.
pub trait Output<B: Backend> {
    type Item: Send;
    fn decode(row: B::Row) -> std::result::Result<Self::Item, sqlx::Error>;
}

/// Rows as they are ([`query`]).
pub struct Rows;

impl<B: Backend> Output<B> for Rows {
    type Item = B::Row;
    fn decode(row: B::Row) -> std::result::Result<B::Row, sqlx::Error> {
        Ok(row)
    }
}

/// The first column of each row ([`query_scalar`]).
pub struct Scalar<T>(PhantomData<fn() -> T>);

impl<B: Backend, T: Column> Output<B> for Scalar<T> {
    type Item = T;
    fn decode(row: B::Row) -> std::result::Result<T, sqlx::Error> {
        row.column_at(0)
    }
}

/// Each row as a tuple ([`query_as`]).
pub struct Tuple<T>(PhantomData<fn() -> T>);

impl<B: Backend, T: Columns> Output<B> for Tuple<T> {
    type Item = T;
    fn decode(row: B::Row) -> std::result::Result<T, sqlx::Error> {
        T::from_record(&row)
    }
}

/// How many rows a statement changed.
#[derive(Debug, Clone, Copy)]
pub struct Done(u64);

impl Done {
    pub fn rows_affected(&self) -> u64 {
        self.0
    }
}

/// A statement being built, for backend `B`, whose rows are read as `O`.
#[must_use = "a query does nothing until it is run"]
pub struct Query<B: Backend, O = Rows> {
    inner: RawQuery<B>,
    out: PhantomData<fn() -> O>,
}

/// A statement whose rows are read as they are.
pub fn query<B: Backend>(sql: impl sqlx::SqlSafeStr) -> Query<B, Rows> {
    Query {
        inner: sqlx::query(sql),
        out: PhantomData,
    }
}

/// A statement whose rows are read by their first column.
pub fn query_scalar<B: Backend, T: Column>(sql: impl sqlx::SqlSafeStr) -> Query<B, Scalar<T>> {
    Query {
        inner: sqlx::query(sql),
        out: PhantomData,
    }
}

/// A statement whose rows are read as tuples.
pub fn query_as<B: Backend, T: Columns>(sql: impl sqlx::SqlSafeStr) -> Query<B, Tuple<T>> {
    Query {
        inner: sqlx::query(sql),
        out: PhantomData,
    }
}

/// Runs SQL text of one or more statements without arguments.
pub async fn execute_script<'c, B: Backend>(
    sql: &'static str,
    on: impl On<'c, B>,
) -> std::result::Result<Done, sqlx::Error> {
    B::execute_script(sql, on.conn()).await.map(Done)
}

impl<B: Backend, O: Output<B>> Query<B, O> {
    /// Adds the next `$N` argument.
    pub fn bind<'t>(self, value: impl Param<'t>) -> Self {
        Query {
            inner: B::bind(self.inner, value),
            out: PhantomData,
        }
    }

    pub async fn execute<'c>(self, on: impl On<'c, B>) -> std::result::Result<Done, sqlx::Error> {
        B::execute(self.inner, on.conn()).await.map(Done)
    }

    pub async fn fetch_all<'c>(
        self,
        on: impl On<'c, B>,
    ) -> std::result::Result<Vec<O::Item>, sqlx::Error> {
        B::fetch_all(self.inner, on.conn())
            .await?
            .into_iter()
            .map(O::decode)
            .collect()
    }

    pub async fn fetch_optional<'c>(
        self,
        on: impl On<'c, B>,
    ) -> std::result::Result<Option<O::Item>, sqlx::Error> {
        B::fetch_optional(self.inner, on.conn())
            .await?
            .map(O::decode)
            .transpose()
    }

    /// The first row; `RowNotFound` when there is none (as sqlx's `fetch_one`).
    pub async fn fetch_one<'c>(
        self,
        on: impl On<'c, B>,
    ) -> std::result::Result<O::Item, sqlx::Error> {
        self.fetch_optional(on)
            .await?
            .ok_or(sqlx::Error::RowNotFound)
    }
}
