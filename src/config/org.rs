//! `[org]`: who sends the bills, as members see it in every email.

use serde::Serialize;

use super::checker::Checker;
use super::raw::section;

section!(Org {
    name: String,
    support_phone: String,
    portal_url: String
});

#[derive(Debug, Clone, Serialize)]
pub struct OrgSettings {
    pub name: String,
    pub support_phone: String,
    pub portal_url: String,
}

pub(super) fn parse(r: &Org, c: &mut Checker) -> OrgSettings {
    for (key, v) in [
        ("org.name", &r.name),
        ("org.support_phone", &r.support_phone),
        ("org.portal_url", &r.portal_url),
    ] {
        if v.trim().is_empty() || v.chars().any(char::is_control) {
            c.problem(
                key,
                v,
                "a non-empty value without control characters (it is shown in every email)",
            );
        }
    }
    OrgSettings {
        name: r.name.trim().to_string(),
        support_phone: r.support_phone.trim().to_string(),
        portal_url: r.portal_url.trim().to_string(),
    }
}
