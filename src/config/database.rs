//! `[database]`: which database autopay keeps its records in, and how many connections it opens.

use serde::Serialize;

use super::checker::Checker;
use super::raw::section;
use super::url::{DatabaseUrl, redact_url};

section!(Database {
    url: String,
    password_file: String,
    max_connections: String
});

#[derive(Debug, Clone, Serialize)]
pub struct DatabaseSettings {
    pub url: DatabaseUrl,
    /// Shown only as whether it is set; its content is already inside `url`.
    pub password_file: String,
    pub max_connections: u32,
}

/// `None` when the URL is unusable: there is no database to fall back on, and the problem is
/// already recorded.
pub(super) fn parse(r: &Database, c: &mut Checker) -> Option<DatabaseSettings> {
    let db_password = c.secret("", "database.password_file", &r.password_file);
    let url = match DatabaseUrl::parse(&r.url, db_password.as_ref()) {
        Ok(u) => Some(u),
        Err(e) => {
            c.problem("database.url", &redact_url(&r.url), e);
            None
        }
    };
    let max_connections = c.int("database.max_connections", &r.max_connections, 1, 1000);
    Some(DatabaseSettings {
        url: url?,
        password_file: r.password_file.clone(),
        max_connections,
    })
}
