//! `[reminders]`: how many days ahead members are told of a coming charge or an expiring card.

use serde::Serialize;

use super::checker::Checker;
use super::raw::section;

section!(Reminders {
    days_before: String,
    card_expiry_days: String
});

#[derive(Debug, Clone, Serialize)]
pub struct ReminderSettings {
    pub days_before: u32,
    pub card_expiry_days: u32,
}

pub(super) fn parse(r: &Reminders, c: &mut Checker) -> ReminderSettings {
    let days_before = c.int("reminders.days_before", &r.days_before, 0, 30);
    let card_expiry_days = c.int("reminders.card_expiry_days", &r.card_expiry_days, 0, 120);
    ReminderSettings {
        days_before,
        card_expiry_days,
    }
}
