//! `[payments]`: what a charge may be (currency, card brands, the most per account type), when
//! it runs and is retried, and when the circuit breaker stops charging.

use std::fmt;

use jiff::civil::{Date, Time};
use serde::Serialize;

use super::checker::Checker;
use super::duration::Dur;
use super::raw::{List, section};
use crate::domain::card::AcceptedBrands;
use crate::domain::member::AccountType;
use crate::domain::money::{Currency, Money};

section!(Payments {
    currency: String,
    accepted_brands: List,
    default_time: String,
    max_amount_individual_family: String,
    max_amount_employer_group: String,
    retry_delays: List,
    suspend_after: String,
    misfire: String,
    max_lateness: String,
    business_days: String,
    holidays: List,
    breaker_window: String,
    breaker_min_attempts: String,
    breaker_decline_share: String,
    breaker_error_share: String,
});

pub use crate::domain::schedule::Misfire;

#[derive(Debug, Clone, Serialize)]
pub struct PaymentSettings {
    #[serde(serialize_with = "ser_display")]
    pub currency: Currency,
    #[serde(serialize_with = "ser_brands")]
    pub accepted_brands: AcceptedBrands,
    #[serde(serialize_with = "ser_time")]
    pub default_time: Time,
    #[serde(serialize_with = "ser_display")]
    pub max_amount_individual_family: Money,
    #[serde(serialize_with = "ser_display")]
    pub max_amount_employer_group: Money,
    pub retry_delays: Vec<Dur>,
    pub suspend_after: u32,
    pub misfire: Misfire,
    pub max_lateness: Dur,
    pub business_days: bool,
    pub holidays: Vec<Date>,
    pub breaker_window: Dur,
    pub breaker_min_attempts: u32,
    pub breaker_decline_share: f64,
    pub breaker_error_share: f64,
}

impl PaymentSettings {
    /// The most one charge may be for an account type.
    pub fn max_amount(&self, account_type: AccountType) -> Money {
        match account_type {
            AccountType::IndividualFamily => self.max_amount_individual_family,
            AccountType::EmployerGroup => self.max_amount_employer_group,
        }
    }
}

fn ser_display<T: fmt::Display, S: serde::Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

fn ser_time<S: serde::Serializer>(v: &Time, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&v.strftime("%H:%M"))
}

fn ser_brands<S: serde::Serializer>(v: &AcceptedBrands, s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(|b| b.as_str()))
}

/// The maximum amounts are checked against `payments.currency` here rather than across
/// sections: both are payments keys, and their problems are reported in this section's place.
pub(super) fn parse(p: &Payments, c: &mut Checker) -> PaymentSettings {
    let currency = c.parse("payments.currency", &p.currency, Currency::USD, |s| {
        Currency::parse(s).map_err(|e| e.to_string())
    });
    let accepted_brands = c.parse(
        "payments.accepted_brands",
        &p.accepted_brands.shown(),
        AcceptedBrands::default(),
        |_| AcceptedBrands::parse_list(&p.accepted_brands.items()).map_err(|e| e.to_string()),
    );
    let default_time = c.parse(
        "payments.default_time",
        &p.default_time,
        Time::midnight(),
        |s| crate::domain::schedule::parse_time_of_day(s).map_err(|e| e.to_string()),
    );
    let amount = |c: &mut Checker, key: &str, v: &str| {
        c.parse(key, v, Money::zero(currency), |s| {
            Money::parse(s, currency)
                .map_err(|e| e.to_string())
                .and_then(|m| {
                    if !m.is_positive() {
                        Err("an amount above 0.00, such as 5000.00".into())
                    } else if m.minor() > currency.max_charge().minor() {
                        Err(format!(
                            "at most {}, the most one card charge can be",
                            currency.max_charge()
                        ))
                    } else {
                        Ok(m)
                    }
                })
        })
    };
    let max_if = amount(
        c,
        "payments.max_amount_individual_family",
        &p.max_amount_individual_family,
    );
    let max_eg = amount(
        c,
        "payments.max_amount_employer_group",
        &p.max_amount_employer_group,
    );
    let retry_delays = c.durs("payments.retry_delays", &p.retry_delays);
    if retry_delays.len() > 14 {
        c.problem(
            "payments.retry_delays",
            &p.retry_delays.shown(),
            "at most 14 retries (a card is never tried more than 15 times in 30 days)",
        );
    }
    let suspend_after = c.int("payments.suspend_after", &p.suspend_after, 1, 100);
    let misfire = c.choice(
        "payments.misfire",
        &p.misfire,
        &[("coalesce", Misfire::Coalesce), ("each", Misfire::Each)],
    );
    let max_lateness = c.dur("payments.max_lateness", &p.max_lateness);
    let business_days = c.boolean("payments.business_days", &p.business_days);
    let mut holidays = Vec::new();
    for h in p.holidays.items() {
        match crate::domain::schedule::parse_date(&h) {
            Ok(d) => holidays.push(d),
            Err(_) => c.problem("payments.holidays", &h, "dates written YYYY-MM-DD"),
        }
    }
    holidays.sort();
    holidays.dedup();
    let breaker_window = c.dur("payments.breaker_window", &p.breaker_window);
    let breaker_min_attempts = c.int(
        "payments.breaker_min_attempts",
        &p.breaker_min_attempts,
        1,
        1_000_000,
    );
    let breaker_decline_share = c.share("payments.breaker_decline_share", &p.breaker_decline_share);
    let breaker_error_share = c.share("payments.breaker_error_share", &p.breaker_error_share);
    PaymentSettings {
        currency,
        accepted_brands,
        default_time,
        max_amount_individual_family: max_if,
        max_amount_employer_group: max_eg,
        retry_delays,
        suspend_after,
        misfire,
        max_lateness,
        business_days,
        holidays,
        breaker_window,
        breaker_min_attempts,
        breaker_decline_share,
        breaker_error_share,
    }
}
