//! Members: who pays, and the row every other change of theirs locks first.

use crate::domain::member::{AccountNumber, AccountType, EmailAddress, MemberName};
use crate::domain::status::MemberStatus;
use crate::store::sql::{Record, get, id, parsed, time};
use crate::store::{Member, Result};

pub(crate) const MEMBER_COLS: &str = "id, account_number, account_type, name, email, time_zone, reminders, email_bouncing, processor_customer_id, status, created_at, updated_at";

pub(crate) fn member_from(row: &impl Record) -> Result<Member> {
    const T: &str = "members";
    Ok(Member {
        id: id(row, T, "id")?,
        account_number: parsed(
            T,
            "account_number",
            AccountNumber::parse(&get::<String>(row, T, "account_number")?),
        )?,
        account_type: parsed(
            T,
            "account_type",
            get::<String>(row, T, "account_type")?.parse::<AccountType>(),
        )?,
        name: parsed(
            T,
            "name",
            MemberName::parse(&get::<String>(row, T, "name")?),
        )?,
        email: parsed(
            T,
            "email",
            EmailAddress::parse(&get::<String>(row, T, "email")?),
        )?,
        time_zone: get(row, T, "time_zone")?,
        reminders: get(row, T, "reminders")?,
        email_bouncing: get(row, T, "email_bouncing")?,
        processor_customer_id: get(row, T, "processor_customer_id")?,
        status: parsed(
            T,
            "status",
            get::<String>(row, T, "status")?.parse::<MemberStatus>(),
        )?,
        created_at: time(row, T, "created_at")?,
        updated_at: time(row, T, "updated_at")?,
    })
}
