//! SQL column codecs, shared by the store and the simulated processor's ledger so that one SQL
//! text and one set of binds serve SQLite and PostgreSQL: ids are `uuid` in PostgreSQL and text
//! in SQLite, instants `timestamptz` and fixed-width RFC 3339 text (whose text order is time
//! order), dates `date` and `YYYY-MM-DD`. The typed ids of [`crate::domain::ids`] bind and read
//! as [`DbId`] does.

use jiff::Timestamp;
use jiff::civil::Date;
use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgArgumentBuffer, PgTypeInfo, PgValueFormat, PgValueRef};
use sqlx::sqlite::{SqliteArgumentsBuffer, SqliteTypeInfo, SqliteValueRef};
use sqlx::{Decode, Encode, Postgres, Sqlite, Type};
use uuid::Uuid;

use crate::domain::ids::{CardId, MemberId, PaymentId, ScheduleId};

/// An id column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DbId(pub Uuid);

/// An instant column (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DbTime(pub Timestamp);

/// A calendar date column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DbDate(pub Date);

/// Microseconds between the Unix epoch and PostgreSQL's, 2000-01-01.
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;
/// Days between 1970-01-01 and 2000-01-01.
const PG_EPOCH_DAYS: i32 = 10_957;

/// The SQLite text form of an instant: always six fraction digits, so comparing text compares
/// time.
pub fn sqlite_time_text(t: Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

fn parse_time_text(s: &str) -> Result<Timestamp, BoxDynError> {
    // PostgreSQL's text output is "2026-11-30 05:09:40.123+00"; RFC 3339 otherwise.
    if let Ok(t) = s.parse::<Timestamp>() {
        return Ok(t);
    }
    let fixed = s.replacen(' ', "T", 1);
    let fixed = if fixed.ends_with("+00") {
        format!("{fixed}:00")
    } else {
        fixed
    };
    Ok(fixed.parse::<Timestamp>()?)
}

impl Type<Sqlite> for DbId {
    fn type_info() -> SqliteTypeInfo {
        <String as Type<Sqlite>>::type_info()
    }
}
impl<'q> Encode<'q, Sqlite> for DbId {
    fn encode_by_ref(&self, buf: &mut SqliteArgumentsBuffer) -> Result<IsNull, BoxDynError> {
        <String as Encode<Sqlite>>::encode(self.0.hyphenated().to_string(), buf)
    }
}
impl<'r> Decode<'r, Sqlite> for DbId {
    fn decode(value: SqliteValueRef<'r>) -> Result<Self, BoxDynError> {
        let s = <&str as Decode<Sqlite>>::decode(value)?;
        Ok(DbId(Uuid::parse_str(s)?))
    }
}
impl Type<Postgres> for DbId {
    fn type_info() -> PgTypeInfo {
        <Uuid as Type<Postgres>>::type_info()
    }
}
impl Encode<'_, Postgres> for DbId {
    fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
        <Uuid as Encode<Postgres>>::encode_by_ref(&self.0, buf)
    }
}
impl<'r> Decode<'r, Postgres> for DbId {
    fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
        Ok(DbId(<Uuid as Decode<Postgres>>::decode(value)?))
    }
}

/// A value that binds as an id column: a [`DbId`] or a typed id. A bare [`Uuid`] is not one:
/// sqlx would bind it as a blob in SQLite, which matches no stored id.
pub trait IdParam:
    Copy
    + Send
    + Sync
    + 'static
    + Encode<'static, Sqlite>
    + Type<Sqlite>
    + Encode<'static, Postgres>
    + Type<Postgres>
{
}

impl IdParam for DbId {}

/// Binds and reads a typed id exactly as [`DbId`] binds and reads its UUID.
macro_rules! id_column {
    ($($name:ident),+) => {$(
        impl Type<Sqlite> for $name {
            fn type_info() -> SqliteTypeInfo {
                <DbId as Type<Sqlite>>::type_info()
            }
        }
        impl<'q> Encode<'q, Sqlite> for $name {
            fn encode_by_ref(
                &self,
                buf: &mut SqliteArgumentsBuffer,
            ) -> Result<IsNull, BoxDynError> {
                <DbId as Encode<Sqlite>>::encode(DbId(self.as_uuid()), buf)
            }
        }
        impl<'r> Decode<'r, Sqlite> for $name {
            fn decode(value: SqliteValueRef<'r>) -> Result<Self, BoxDynError> {
                Ok($name::from_uuid(<DbId as Decode<Sqlite>>::decode(value)?.0))
            }
        }
        impl Type<Postgres> for $name {
            fn type_info() -> PgTypeInfo {
                <DbId as Type<Postgres>>::type_info()
            }
        }
        impl Encode<'_, Postgres> for $name {
            fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
                <DbId as Encode<Postgres>>::encode(DbId(self.as_uuid()), buf)
            }
        }
        impl<'r> Decode<'r, Postgres> for $name {
            fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
                Ok($name::from_uuid(<DbId as Decode<Postgres>>::decode(value)?.0))
            }
        }
        impl IdParam for $name {}
    )+};
}

id_column!(MemberId, CardId, ScheduleId, PaymentId);

impl Type<Sqlite> for DbTime {
    fn type_info() -> SqliteTypeInfo {
        <String as Type<Sqlite>>::type_info()
    }
}
impl<'q> Encode<'q, Sqlite> for DbTime {
    fn encode_by_ref(&self, buf: &mut SqliteArgumentsBuffer) -> Result<IsNull, BoxDynError> {
        <String as Encode<Sqlite>>::encode(sqlite_time_text(self.0), buf)
    }
}
impl<'r> Decode<'r, Sqlite> for DbTime {
    fn decode(value: SqliteValueRef<'r>) -> Result<Self, BoxDynError> {
        Ok(DbTime(parse_time_text(<&str as Decode<Sqlite>>::decode(
            value,
        )?)?))
    }
}
impl Type<Postgres> for DbTime {
    fn type_info() -> PgTypeInfo {
        PgTypeInfo::with_name("timestamptz")
    }
}
impl Encode<'_, Postgres> for DbTime {
    fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
        let micros = self.0.as_microsecond() - PG_EPOCH_MICROS;
        <i64 as Encode<Postgres>>::encode(micros, buf)
    }
}
impl<'r> Decode<'r, Postgres> for DbTime {
    fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
        match value.format() {
            PgValueFormat::Binary => {
                let micros = <i64 as Decode<Postgres>>::decode(value)?;
                Ok(DbTime(Timestamp::from_microsecond(
                    micros + PG_EPOCH_MICROS,
                )?))
            }
            PgValueFormat::Text => Ok(DbTime(parse_time_text(value.as_str()?)?)),
        }
    }
}

impl Type<Sqlite> for DbDate {
    fn type_info() -> SqliteTypeInfo {
        <String as Type<Sqlite>>::type_info()
    }
}
impl<'q> Encode<'q, Sqlite> for DbDate {
    fn encode_by_ref(&self, buf: &mut SqliteArgumentsBuffer) -> Result<IsNull, BoxDynError> {
        <String as Encode<Sqlite>>::encode(self.0.to_string(), buf)
    }
}
impl<'r> Decode<'r, Sqlite> for DbDate {
    fn decode(value: SqliteValueRef<'r>) -> Result<Self, BoxDynError> {
        Ok(DbDate(<&str as Decode<Sqlite>>::decode(value)?.parse()?))
    }
}
impl Type<Postgres> for DbDate {
    fn type_info() -> PgTypeInfo {
        PgTypeInfo::with_name("date")
    }
}
impl Encode<'_, Postgres> for DbDate {
    fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
        let epoch = Date::constant(2000, 1, 1);
        let days = (self.0 - epoch).get_days();
        <i32 as Encode<Postgres>>::encode(days, buf)
    }
}
impl<'r> Decode<'r, Postgres> for DbDate {
    fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
        match value.format() {
            PgValueFormat::Binary => {
                let days = <i32 as Decode<Postgres>>::decode(value)?;
                let unix_days = i64::from(days) + i64::from(PG_EPOCH_DAYS);
                let ts = Timestamp::from_second(unix_days * 86_400)?;
                Ok(DbDate(ts.to_zoned_datetime(jiff::tz::TimeZone::UTC).date()))
            }
            PgValueFormat::Text => Ok(DbDate(value.as_str()?.parse()?)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_instants_sort_as_text_in_time_order() {
        let a: Timestamp = "2026-11-30T05:09:40Z".parse().unwrap();
        let b: Timestamp = "2026-11-30T05:09:40.5Z".parse().unwrap();
        let c: Timestamp = "2026-11-30T05:09:41Z".parse().unwrap();
        let (ta, tb, tc) = (
            sqlite_time_text(a),
            sqlite_time_text(b),
            sqlite_time_text(c),
        );
        assert!(ta < tb && tb < tc, "{ta} {tb} {tc}");
        assert_eq!(parse_time_text(&tb).unwrap(), b);
    }

    #[test]
    fn postgres_text_instants_parse() {
        let t = parse_time_text("2026-11-30 05:09:40.123+00").unwrap();
        assert_eq!(t, "2026-11-30T05:09:40.123Z".parse::<Timestamp>().unwrap());
    }
}
