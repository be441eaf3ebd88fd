//! URLs in settings: [`DatabaseUrl`] (which database, with its password kept secret) and
//! [`redact_url`], which takes the password out of any URL before it is shown.

use std::fmt;
use std::path::PathBuf;

use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;

use super::REDACTED;

/// Which database a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// `database.url`, with any password kept secret.
#[derive(Clone)]
pub struct DatabaseUrl {
    backend: Backend,
    url: SecretString,
}

impl DatabaseUrl {
    /// Parses a URL, replacing its password with the one from `password` when given.
    pub fn parse(url: &str, password: Option<&SecretString>) -> Result<DatabaseUrl, String> {
        let url = url.trim();
        let Some((scheme, rest)) = url.split_once(':') else {
            return Err("a URL starting with sqlite:// or postgres://".into());
        };
        let backend = match scheme {
            "sqlite" => Backend::Sqlite,
            "postgres" | "postgresql" => Backend::Postgres,
            _ => {
                return Err(format!(
                    "a URL starting with sqlite:// or postgres:// (not {scheme}:)"
                ));
            }
        };
        let url = match (backend, password) {
            (Backend::Sqlite, _) => {
                if rest.trim_start_matches('/').is_empty() {
                    return Err("a SQLite file path, such as sqlite://autopay.db".into());
                }
                url.to_string()
            }
            (Backend::Postgres, None) => url.to_string(),
            (Backend::Postgres, Some(pw)) => with_password(url, pw.expose_secret())?,
        };
        Ok(DatabaseUrl {
            backend,
            url: SecretString::from(url),
        })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The full URL, password included: hand it to the driver and nothing else.
    pub fn expose(&self) -> &str {
        self.url.expose_secret()
    }

    /// The SQLite file this URL names (None for PostgreSQL or an in-memory SQLite database).
    pub fn sqlite_path(&self) -> Option<PathBuf> {
        if self.backend != Backend::Sqlite {
            return None;
        }
        let rest = self.expose().strip_prefix("sqlite:")?;
        let rest = rest.strip_prefix("//").unwrap_or(rest);
        let path = rest.split('?').next().unwrap_or(rest);
        if path.is_empty() || path == ":memory:" {
            return None;
        }
        Some(PathBuf::from(path))
    }

    /// The URL with any password replaced, safe for output and logs.
    pub fn redacted(&self) -> String {
        redact_url(self.expose())
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatabaseUrl({})", self.redacted())
    }
}

impl Serialize for DatabaseUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.redacted())
    }
}

/// The user-info part of `scheme://user:password@host/...`, as (start, end) byte offsets.
fn userinfo_span(url: &str) -> Option<(usize, usize)> {
    let start = url.find("://")? + 3;
    let authority_end = url[start..]
        .find(['/', '?'])
        .map_or(url.len(), |i| start + i);
    let at = url[start..authority_end].rfind('@')? + start;
    Some((start, at))
}

/// Replaces the password inside a URL with [`REDACTED`].
pub fn redact_url(url: &str) -> String {
    let mut out = match userinfo_span(url) {
        Some((start, at)) => match url[start..at].find(':') {
            Some(colon) => format!("{}{}{}", &url[..start + colon + 1], REDACTED, &url[at..]),
            None => url.to_string(),
        },
        None => url.to_string(),
    };
    // A password may also travel as a query parameter.
    if let Some(q) = out.find("password=") {
        let end = out[q..].find('&').map_or(out.len(), |i| q + i);
        out.replace_range(q + "password=".len()..end, REDACTED);
    }
    out
}

fn with_password(url: &str, password: &str) -> Result<String, String> {
    let encoded: String = password
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    match userinfo_span(url) {
        Some((start, at)) => {
            let user = url[start..at].split(':').next().unwrap_or("");
            Ok(format!("{}{user}:{encoded}{}", &url[..start], &url[at..]))
        }
        None => Err(
            "a postgres URL with a user name (postgres://USER@HOST/DB) when password_file is set"
                .into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_redaction_hides_passwords_in_userinfo_and_query() {
        assert_eq!(
            redact_url("postgres://u:p@h/db"),
            format!("postgres://u:{REDACTED}@h/db")
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(
            redact_url("postgres://h/db?user=u&password=p&x=1"),
            format!("postgres://h/db?user=u&password={REDACTED}&x=1")
        );
    }
}
