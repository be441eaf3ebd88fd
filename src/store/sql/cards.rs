//! Cards (`payment_methods`): adding, reading, removing, and refreshing them from the processor.

use crate::domain::card::{CardBrand, Last4};
use crate::domain::status::CardStatus;
use crate::sqltypes::DbTime;
use crate::store::sql::{Record, get, id, parsed, time};
use crate::store::{Card, Consent, Result};

pub(crate) const CARD_COLS: &str = "id, member_id, processor, processor_token, fingerprint, brand, last4, exp_month, exp_year, status, status_reason, created_at, network_transaction_id, consent_at, consent_via, consent_terms_version, processor_mode";

pub(crate) fn card_from(row: &impl Record) -> Result<Card> {
    const T: &str = "payment_methods";
    let month: i64 = get(row, T, "exp_month")?;
    let year: i64 = get(row, T, "exp_year")?;
    Ok(Card {
        id: id(row, T, "id")?,
        member_id: id(row, T, "member_id")?,
        processor: get(row, T, "processor")?,
        processor_token: get(row, T, "processor_token")?,
        fingerprint: get(row, T, "fingerprint")?,
        brand: parsed(
            T,
            "brand",
            get::<String>(row, T, "brand")?.parse::<CardBrand>(),
        )?,
        last4: parsed(T, "last4", Last4::parse(&get::<String>(row, T, "last4")?))?,
        exp_month: parsed(T, "exp_month", u8::try_from(month))?,
        exp_year: parsed(T, "exp_year", u16::try_from(year))?,
        status: parsed(
            T,
            "status",
            get::<String>(row, T, "status")?.parse::<CardStatus>(),
        )?,
        status_reason: get(row, T, "status_reason")?,
        created_at: time(row, T, "created_at")?,
        network_transaction_id: get(row, T, "network_transaction_id")?,
        consent: match get::<Option<DbTime>>(row, T, "consent_at")? {
            None => None,
            Some(at) => Some(Consent {
                at: at.0,
                via: get::<Option<String>>(row, T, "consent_via")?.unwrap_or_default(),
                terms_version: get(row, T, "consent_terms_version")?,
            }),
        },
        processor_mode: get(row, T, "processor_mode")?,
    })
}
