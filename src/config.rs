//! Settings: embedded defaults (config/default.toml) < the settings file < `AUTOPAY__*`
//! environment variables, parsed once at start-up into typed values.
//!
//! Loading happens in two steps. The `config` crate merges the layers into [`raw`] structs whose
//! fields are plain strings and lists, so that merging itself can only fail on an unknown key or a
//! malformed file. [`Settings::from_raw`] then parses every field, collecting every problem (key,
//! bad value, what is expected) so an operator fixes them all in one go. Secrets are
//! [`SecretString`]s: redacted in `Debug`, in `check-config`, and inside `database.url`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use jiff::civil::{Date, Time};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;

use crate::domain::card::AcceptedBrands;
use crate::domain::member::AccountType;
use crate::domain::money::{Currency, Money};

/// The embedded defaults; every key is documented there.
pub const DEFAULTS: &str = include_str!("../config/default.toml");

/// What replaces a secret wherever settings are shown.
pub const REDACTED: &str = "[redacted]";

/// One thing wrong with the settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// The dotted key, e.g. `payments.retry_delays`.
    pub key: String,
    /// The value as given (never a secret's value).
    pub value: String,
    /// What is expected instead.
    pub expected: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} = {:?}: {}", self.key, self.value, self.expected)
    }
}

/// Why the settings could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "cannot read the settings file {}: {reason}; check the path given to --config or AUTOPAY_CONFIG",
        redact_secrets(&path.display().to_string())
    )]
    File { path: PathBuf, reason: String },
    #[error("the settings cannot be read: {0}")]
    Layers(String),
    #[error("{} problem(s) in the settings:\n{}", .0.len(), .0.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Problem>),
}

/// A duration written "30s", "5m", "4h", "3d" or "500ms".
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

impl Dur {
    pub fn parse(s: &str) -> Result<Dur, String> {
        let s = s.trim();
        let split = s
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(|| "a number with a unit: 500ms, 30s, 5m, 4h or 3d".to_string())?;
        let (digits, unit) = s.split_at(split);
        let n: u64 = digits
            .parse()
            .map_err(|_| "a whole number with a unit: 500ms, 30s, 5m, 4h or 3d".to_string())?;
        let secs = match unit {
            "ms" => return Ok(Dur(Duration::from_millis(n))),
            "s" => Some(n),
            "m" => n.checked_mul(60),
            "h" => n.checked_mul(3600),
            "d" => n.checked_mul(86_400),
            _ => None,
        };
        secs.map(|s| Dur(Duration::from_secs(s)))
            .ok_or_else(|| "a duration with unit ms, s, m, h or d, such as 30s or 3d".to_string())
    }

    pub fn as_std(self) -> Duration {
        self.0
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        let (n, unit) = if !ms.is_multiple_of(1000) {
            (ms, "ms")
        } else {
            let s = self.0.as_secs();
            match s {
                _ if s != 0 && s.is_multiple_of(86_400) => (u128::from(s / 86_400), "d"),
                _ if s != 0 && s.is_multiple_of(3600) => (u128::from(s / 3600), "h"),
                _ if s != 0 && s.is_multiple_of(60) => (u128::from(s / 60), "m"),
                _ => (u128::from(s), "s"),
            }
        };
        write!(f, "{n}{unit}")
    }
}

impl fmt::Debug for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for Dur {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

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

/// Whether a settings key (`email.smtp.password`, `AUTOPAY__PROCESSOR__STRIPE__SECRET_KEY`,
/// `api_token`) names a secret: its last part holds "password", "passwd", "secret" or "token",
/// or ends in "key". A `..._file` key names a file, not a secret.
pub fn is_secret_key(key: &str) -> bool {
    let key = key.trim_matches(|c: char| c == '"' || c == '\'' || c == '`');
    let last = key
        .rsplit(['.', ' '])
        .next()
        .unwrap_or(key)
        .rsplit("__")
        .next()
        .unwrap_or(key)
        .to_ascii_lowercase();
    !last.ends_with("_file")
        && (["password", "passwd", "secret", "token"]
            .iter()
            .any(|w| last.contains(w))
            || last.ends_with("key"))
}

/// Text about to be shown in an error, with what must never be shown taken out: the value of
/// any `KEY = value` whose key names a secret ([`is_secret_key`]: the rest of that line), the
/// password inside any URL ([`redact_url`]), and anything that could be a card number. Run on
/// every error the command line prints.
pub fn redact_secrets(text: &str) -> String {
    let lines: Vec<String> = text.split('\n').map(redact_assignment).collect();
    let joined = lines.join("\n");
    let urls: String = joined
        .split_inclusive(char::is_whitespace)
        .map(|word| {
            if word.contains("://") {
                redact_url(word)
            } else {
                word.to_string()
            }
        })
        .collect();
    crate::domain::card::redact_card_numbers(&urls)
}

/// One line with the value of a secret's `KEY = value` (or `KEY=value`) replaced, up to the end
/// of the line.
fn redact_assignment(line: &str) -> String {
    let mut search = 0;
    while let Some(eq) = line[search..].find('=').map(|i| search + i) {
        let before = line[..eq].trim_end();
        let key_start = before
            .char_indices()
            .rev()
            .find(|(_, c)| !(c.is_ascii_alphanumeric() || "_.-\"'`".contains(*c)))
            .map_or(0, |(i, c)| i + c.len_utf8());
        let key = &before[key_start..];
        if !key.is_empty() && is_secret_key(key) {
            return format!("{} {REDACTED}", &line[..=eq]);
        }
        search = eq + 1;
    }
    line.to_string()
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Misfire {
    Coalesce,
    Each,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProcessorKind {
    Simulated,
    Stripe,
}

/// Where the simulated processor keeps its ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ledger {
    /// In memory: benchmarks only, forgotten at exit.
    Memory,
    /// A database URL of its own.
    Url(String),
    /// `simulated-processor.db` beside autopay's SQLite file (or in the working directory).
    Beside,
}

impl Serialize for Ledger {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Ledger::Memory => s.serialize_str("memory"),
            Ledger::Url(u) => s.serialize_str(&redact_url(u)),
            Ledger::Beside => s.serialize_str(""),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EmailTransport {
    File,
    Smtp,
    Log,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SmtpTls {
    Required,
    Wrapper,
    None,
}

fn ser_secret<S: serde::Serializer>(v: &Option<SecretString>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(_) => s.serialize_str(REDACTED),
        None => s.serialize_str(""),
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

#[derive(Debug, Clone, Serialize)]
pub struct DatabaseSettings {
    pub url: DatabaseUrl,
    /// Shown only as whether it is set; its content is already inside `url`.
    pub password_file: String,
    pub max_connections: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct LogSettings {
    pub level: String,
    pub format: LogFormat,
}

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

#[derive(Debug, Clone, Serialize)]
pub struct SimulatedSettings {
    pub latency: Dur,
    pub ledger: Ledger,
    pub drop_after_charge: f64,
    pub timeout_before_charge: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct StripeSettings {
    pub api_base: String,
    pub api_version: String,
    #[serde(serialize_with = "ser_secret")]
    pub secret_key: Option<SecretString>,
    pub statement_descriptor_suffix: String,
    pub list_filters: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProcessorSettings {
    pub kind: ProcessorKind,
    pub timeout: Dur,
    pub settle_delay: Dur,
    pub lookup_window: Dur,
    pub key_retention: Dur,
    pub max_unknown_cycles: u32,
    pub max_requests_per_second: u32,
    pub simulated: SimulatedSettings,
    pub stripe: StripeSettings,
}

#[derive(Debug, Clone, Serialize)]
pub struct SmtpSettings {
    pub host: String,
    pub port: u16,
    pub tls: SmtpTls,
    pub username: String,
    #[serde(serialize_with = "ser_secret")]
    pub password: Option<SecretString>,
    pub timeout: Dur,
    pub ca_file: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct EmailSettings {
    pub transport: EmailTransport,
    pub folder: PathBuf,
    pub from: String,
    pub reply_to: String,
    pub max_age: Dur,
    pub retry_delays: Vec<Dur>,
    pub max_per_second: u32,
    pub templates: String,
    pub keep_sent: Dur,
    pub smtp: SmtpSettings,
}

#[derive(Debug, Clone, Serialize)]
pub struct OrgSettings {
    pub name: String,
    pub support_phone: String,
    pub portal_url: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReminderSettings {
    pub days_before: u32,
    pub card_expiry_days: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct DaemonSettings {
    pub poll_interval: Dur,
    pub concurrency: u32,
    pub batch_size: u32,
    pub lease: Dur,
    pub shutdown_grace: Dur,
}

/// Every setting, parsed and checked.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub database: DatabaseSettings,
    pub log: LogSettings,
    pub payments: PaymentSettings,
    pub processor: ProcessorSettings,
    pub email: EmailSettings,
    pub org: OrgSettings,
    pub reminders: ReminderSettings,
    pub daemon: DaemonSettings,
}

/// The merged layers before parsing: strings and lists, so that only parsing reports problems.
pub mod raw {
    use serde::Deserialize;

    /// A list given as a TOML array or as one comma-separated string (environment variables).
    #[derive(Debug, Clone, Deserialize)]
    #[serde(untagged)]
    pub enum List {
        Items(Vec<String>),
        Joined(String),
    }

    impl List {
        pub fn items(&self) -> Vec<String> {
            match self {
                List::Items(v) => v.iter().map(|s| s.trim().to_string()).collect(),
                List::Joined(s) => s
                    .split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect(),
            }
        }

        pub fn shown(&self) -> String {
            self.items().join(",")
        }
    }

    macro_rules! section {
        ($name:ident { $($field:ident : $ty:ty),* $(,)? }) => {
            #[derive(Debug, Clone, Deserialize)]
            #[serde(deny_unknown_fields)]
            pub struct $name { $(pub $field: $ty),* }
        };
    }

    section!(Database {
        url: String,
        password_file: String,
        max_connections: String
    });
    section!(Log {
        level: String,
        format: String
    });
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
    section!(Simulated {
        latency: String,
        ledger: String,
        drop_after_charge: String,
        timeout_before_charge: String
    });
    section!(Stripe {
        api_base: String,
        api_version: String,
        secret_key: String,
        secret_key_file: String,
        statement_descriptor_suffix: String,
        list_filters: String,
    });
    section!(Processor {
        kind: String,
        timeout: String,
        settle_delay: String,
        lookup_window: String,
        key_retention: String,
        max_unknown_cycles: String,
        max_requests_per_second: String,
        simulated: Simulated,
        stripe: Stripe,
    });
    section!(Smtp {
        host: String,
        port: String,
        tls: String,
        username: String,
        password: String,
        password_file: String,
        timeout: String,
        ca_file: String,
    });
    section!(Email {
        transport: String,
        folder: String,
        from: String,
        reply_to: String,
        max_age: String,
        retry_delays: List,
        max_per_second: String,
        templates: String,
        keep_sent: String,
        smtp: Smtp,
    });
    section!(Org {
        name: String,
        support_phone: String,
        portal_url: String
    });
    section!(Reminders {
        days_before: String,
        card_expiry_days: String
    });
    section!(Daemon {
        poll_interval: String,
        concurrency: String,
        batch_size: String,
        lease: String,
        shutdown_grace: String,
    });
    section!(Settings {
        database: Database,
        log: Log,
        payments: Payments,
        processor: Processor,
        email: Email,
        org: Org,
        reminders: Reminders,
        daemon: Daemon,
    });
}

/// Collects problems while fields are parsed, so that every problem is reported at once.
struct Checker {
    problems: Vec<Problem>,
}

impl Checker {
    /// Records a problem. Its value is shown (by `check-config` and every error), so a secret's
    /// value is replaced, and passwords in URLs and card numbers are taken out of any other.
    fn problem(&mut self, key: &str, value: &str, expected: impl Into<String>) {
        let value = if is_secret_key(key) {
            REDACTED.to_string()
        } else {
            redact_secrets(value)
        };
        self.problems.push(Problem {
            key: key.to_string(),
            value,
            expected: redact_secrets(&expected.into()),
        });
    }

    /// Parses one value; on failure records the problem and returns `fallback` so that checking
    /// can go on.
    fn parse<T>(
        &mut self,
        key: &str,
        value: &str,
        fallback: T,
        f: impl FnOnce(&str) -> Result<T, String>,
    ) -> T {
        match f(value) {
            Ok(v) => v,
            Err(expected) => {
                self.problem(key, value, expected);
                fallback
            }
        }
    }

    fn dur(&mut self, key: &str, value: &str) -> Dur {
        self.parse(key, value, Dur(Duration::from_secs(1)), Dur::parse)
    }

    fn int(&mut self, key: &str, value: &str, min: u32, max: u32) -> u32 {
        self.parse(key, value, min, |s| {
            s.trim()
                .parse::<u32>()
                .ok()
                .filter(|n| (min..=max).contains(n))
                .ok_or_else(|| format!("a whole number from {min} to {max}"))
        })
    }

    fn share(&mut self, key: &str, value: &str) -> f64 {
        self.parse(key, value, 0.0, |s| {
            s.trim()
                .parse::<f64>()
                .ok()
                .filter(|f| (0.0..=1.0).contains(f))
                .ok_or_else(|| "a fraction from 0.0 to 1.0".to_string())
        })
    }

    fn boolean(&mut self, key: &str, value: &str) -> bool {
        self.parse(key, value, false, |s| match s.trim() {
            "true" => Ok(true),
            "false" => Ok(false),
            _ => Err("true or false".into()),
        })
    }

    fn choice<T: Copy>(&mut self, key: &str, value: &str, options: &[(&str, T)]) -> T {
        let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
        let fallback = options[0].1;
        self.parse(key, value, fallback, |s| {
            options
                .iter()
                .find(|(n, _)| *n == s.trim())
                .map(|(_, v)| *v)
                .ok_or_else(|| format!("one of: {}", names.join(", ")))
        })
    }

    fn durs(&mut self, key: &str, list: &raw::List) -> Vec<Dur> {
        let mut out = Vec::new();
        for item in list.items() {
            match Dur::parse(&item) {
                Ok(d) => out.push(d),
                Err(e) => self.problem(key, &list.shown(), format!("a list of durations: {e}")),
            }
        }
        out
    }

    /// A secret given inline or in a file (the file wins, for systemd credentials).
    fn secret(&mut self, inline: &str, file_key: &str, file: &str) -> Option<SecretString> {
        if !file.trim().is_empty() {
            match std::fs::read_to_string(file.trim()) {
                Ok(content) => {
                    let first = content.lines().next().unwrap_or("").trim_end().to_string();
                    if first.is_empty() {
                        self.problem(
                            file_key,
                            file,
                            "a file whose first line is the secret; this one is empty",
                        );
                        None
                    } else {
                        Some(SecretString::from(first))
                    }
                }
                Err(e) => {
                    self.problem(file_key, file, format!("a readable file ({e})"));
                    None
                }
            }
        } else if inline.is_empty() {
            None
        } else {
            Some(SecretString::from(inline.to_string()))
        }
    }
}

impl Settings {
    /// Loads and checks the settings: embedded defaults, then `file` (if any), then the
    /// `AUTOPAY__*` variables of `env`.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, ConfigError> {
        use config::{Config, File, FileFormat, Map};

        let mut builder = Config::builder().add_source(File::from_str(DEFAULTS, FileFormat::Toml));
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
            builder = builder.add_source(File::from_str(&text, FileFormat::Toml));
        }
        let vars: Map<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("AUTOPAY__"))
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix("AUTOPAY")
                .prefix_separator("__")
                .separator("__")
                .source(Some(vars)),
        );
        let merged = builder
            .build()
            .map_err(|e| ConfigError::Layers(explain_layer_error(&e.to_string())))?;
        let raw: raw::Settings = merged
            .try_deserialize()
            .map_err(|e| ConfigError::Layers(explain_layer_error(&e.to_string())))?;
        Settings::from_raw(&raw)
    }

    /// Parses merged raw settings, reporting every problem at once.
    pub fn from_raw(r: &raw::Settings) -> Result<Settings, ConfigError> {
        let mut c = Checker {
            problems: Vec::new(),
        };

        // database
        let db_password = c.secret("", "database.password_file", &r.database.password_file);
        let url = match DatabaseUrl::parse(&r.database.url, db_password.as_ref()) {
            Ok(u) => Some(u),
            Err(e) => {
                c.problem("database.url", &redact_url(&r.database.url), e);
                None
            }
        };
        let max_connections = c.int(
            "database.max_connections",
            &r.database.max_connections,
            1,
            1000,
        );

        // log
        let level = r.log.level.trim().to_string();
        if tracing_subscriber::EnvFilter::try_new(&level).is_err() {
            c.problem(
                "log.level",
                &level,
                "trace, debug, info, warn, error, or a filter such as \"autopay=debug,sqlx=warn\"",
            );
        }
        let format = c.choice(
            "log.format",
            &r.log.format,
            &[("pretty", LogFormat::Pretty), ("json", LogFormat::Json)],
        );

        // payments
        let p = &r.payments;
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
            &mut c,
            "payments.max_amount_individual_family",
            &p.max_amount_individual_family,
        );
        let max_eg = amount(
            &mut c,
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
        let breaker_decline_share =
            c.share("payments.breaker_decline_share", &p.breaker_decline_share);
        let breaker_error_share = c.share("payments.breaker_error_share", &p.breaker_error_share);

        // processor
        let pr = &r.processor;
        let kind = c.choice(
            "processor.kind",
            &pr.kind,
            &[
                ("simulated", ProcessorKind::Simulated),
                ("stripe", ProcessorKind::Stripe),
            ],
        );
        let timeout = c.dur("processor.timeout", &pr.timeout);
        let settle_delay = c.dur("processor.settle_delay", &pr.settle_delay);
        let lookup_window = c.dur("processor.lookup_window", &pr.lookup_window);
        let key_retention = c.dur("processor.key_retention", &pr.key_retention);
        let max_unknown_cycles = c.int(
            "processor.max_unknown_cycles",
            &pr.max_unknown_cycles,
            1,
            100,
        );
        let max_rps = c.int(
            "processor.max_requests_per_second",
            &pr.max_requests_per_second,
            1,
            100_000,
        );
        let sim = &pr.simulated;
        let latency = c.dur("processor.simulated.latency", &sim.latency);
        let ledger = match sim.ledger.trim() {
            "" => Ledger::Beside,
            "memory" => Ledger::Memory,
            u if u.starts_with("sqlite:") || u.starts_with("postgres") => {
                Ledger::Url(u.to_string())
            }
            u => {
                c.problem(
                    "processor.simulated.ledger",
                    &redact_url(u),
                    "empty (a file beside autopay's), \"memory\", or a sqlite:// or postgres:// URL",
                );
                Ledger::Beside
            }
        };
        let drop_after_charge = c.share(
            "processor.simulated.drop_after_charge",
            &sim.drop_after_charge,
        );
        let timeout_before_charge = c.share(
            "processor.simulated.timeout_before_charge",
            &sim.timeout_before_charge,
        );
        let st = &pr.stripe;
        let secret_key = c.secret(
            &st.secret_key,
            "processor.stripe.secret_key_file",
            &st.secret_key_file,
        );
        if kind == ProcessorKind::Stripe {
            // The Stripe adapter is not in this release: accepting the setting would leave
            // autopay unable to charge. Its processor.stripe.* keys are read and checked so a
            // settings file written for the next release needs no change.
            c.problem(
                "processor.kind",
                "stripe",
                "simulated: the Stripe adapter is not in this release of autopay",
            );
        }
        if kind == ProcessorKind::Stripe && secret_key.is_none() {
            c.problem(
                "processor.stripe.secret_key",
                "",
                "a Stripe secret key (set processor.stripe.secret_key_file or AUTOPAY__PROCESSOR__STRIPE__SECRET_KEY) when processor.kind = \"stripe\"",
            );
        }
        if !(st.api_base.starts_with("https://")
            || st.api_base.starts_with("http://127.0.0.1")
            || st.api_base.starts_with("http://localhost"))
        {
            c.problem(
                "processor.stripe.api_base",
                &st.api_base,
                "an https:// URL (plain http only to 127.0.0.1 or localhost, for tests)",
            );
        }
        let suffix = st.statement_descriptor_suffix.trim().to_string();
        if suffix.len() > 22
            || !suffix
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || ch == ' ')
        {
            c.problem(
                "processor.stripe.statement_descriptor_suffix",
                &suffix,
                "up to 22 letters, digits and spaces",
            );
        }
        let list_filters = c.boolean("processor.stripe.list_filters", &st.list_filters);

        // email
        let e = &r.email;
        let transport = c.choice(
            "email.transport",
            &e.transport,
            &[
                ("file", EmailTransport::File),
                ("smtp", EmailTransport::Smtp),
                ("log", EmailTransport::Log),
            ],
        );
        if transport == EmailTransport::File && e.folder.trim().is_empty() {
            c.problem(
                "email.folder",
                "",
                "a folder for .eml files when email.transport = \"file\"",
            );
        }
        if !e.from.contains('@') || e.from.chars().any(char::is_control) {
            c.problem(
                "email.from",
                &e.from,
                "a mailbox such as \"Member Billing <billing@example.org>\"",
            );
        }
        if !e.reply_to.is_empty()
            && (!e.reply_to.contains('@') || e.reply_to.chars().any(char::is_control))
        {
            c.problem(
                "email.reply_to",
                &e.reply_to,
                "empty, or a mailbox such as \"help@example.org\"",
            );
        }
        let max_age = c.dur("email.max_age", &e.max_age);
        let email_retry = c.durs("email.retry_delays", &e.retry_delays);
        let max_per_second = c.int("email.max_per_second", &e.max_per_second, 1, 10_000);
        let keep_sent = c.dur("email.keep_sent", &e.keep_sent);
        let sm = &e.smtp;
        let port = c.parse("email.smtp.port", &sm.port, 587u16, |s| {
            s.trim()
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| "a port from 1 to 65535".to_string())
        });
        let tls = c.choice(
            "email.smtp.tls",
            &sm.tls,
            &[
                ("required", SmtpTls::Required),
                ("wrapper", SmtpTls::Wrapper),
                ("none", SmtpTls::None),
            ],
        );
        let host = sm.host.trim().to_string();
        let loopback = host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if transport == EmailTransport::Smtp && tls == SmtpTls::None && !loopback {
            c.problem(
                "email.smtp.tls",
                "none",
                format!("required or wrapper: mail to {host} would cross the network unencrypted (none is allowed only for a loopback host)"),
            );
        }
        let smtp_password = c.secret(&sm.password, "email.smtp.password_file", &sm.password_file);
        let smtp_timeout = c.dur("email.smtp.timeout", &sm.timeout);

        // org
        for (key, v) in [
            ("org.name", &r.org.name),
            ("org.support_phone", &r.org.support_phone),
            ("org.portal_url", &r.org.portal_url),
        ] {
            if v.trim().is_empty() || v.chars().any(char::is_control) {
                c.problem(
                    key,
                    v,
                    "a non-empty value without control characters (it is shown in every email)",
                );
            }
        }

        // reminders
        let days_before = c.int("reminders.days_before", &r.reminders.days_before, 0, 30);
        let card_expiry_days = c.int(
            "reminders.card_expiry_days",
            &r.reminders.card_expiry_days,
            0,
            120,
        );

        // daemon
        let d = &r.daemon;
        let poll_interval = c.dur("daemon.poll_interval", &d.poll_interval);
        let concurrency = c.int("daemon.concurrency", &d.concurrency, 1, 1024);
        let batch_size = c.int("daemon.batch_size", &d.batch_size, 1, 10_000);
        let lease = c.dur("daemon.lease", &d.lease);
        let shutdown_grace = c.dur("daemon.shutdown_grace", &d.shutdown_grace);

        // Timing rules that keep a charge from being sent twice (docs/architecture.md): a lease must outlive
        // any call by a wide margin, and shutdown must wait for a call in flight.
        let margin = Duration::from_secs(30);
        if lease.0 < timeout.0 * 2 + margin {
            c.problem(
                "daemon.lease",
                &lease.to_string(),
                format!("at least twice processor.timeout plus 30s ({}), so that a claim never expires while a charge is in flight", Dur(timeout.0 * 2 + margin)),
            );
        }
        if shutdown_grace < timeout {
            c.problem(
                "daemon.shutdown_grace",
                &shutdown_grace.to_string(),
                format!("at least processor.timeout ({timeout}), so that charges in flight finish before exit"),
            );
        }
        let keys = crate::domain::attempt::KeyPolicy {
            key_retention: key_retention.0,
            timeout: timeout.0,
            lease: lease.0,
            settle_delay: settle_delay.0,
            lookup_window: lookup_window.0,
            max_unknown_cycles,
        };
        if let Err(why) = keys.check() {
            c.problem(
                "processor.lookup_window",
                &lookup_window.to_string(),
                format!("{why} (processor.key_retention is {key_retention})"),
            );
        }
        if settle_delay <= timeout {
            c.problem(
                "processor.settle_delay",
                &settle_delay.to_string(),
                format!("longer than processor.timeout ({timeout}), so a lookup never races the charge it asks about"),
            );
        }

        if !c.problems.is_empty() {
            return Err(ConfigError::Invalid(c.problems));
        }
        let Some(url) = url else {
            return Err(ConfigError::Invalid(c.problems));
        };
        Ok(Settings {
            database: DatabaseSettings {
                url,
                password_file: r.database.password_file.clone(),
                max_connections,
            },
            log: LogSettings { level, format },
            payments: PaymentSettings {
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
            },
            processor: ProcessorSettings {
                kind,
                timeout,
                settle_delay,
                lookup_window,
                key_retention,
                max_unknown_cycles,
                max_requests_per_second: max_rps,
                simulated: SimulatedSettings {
                    latency,
                    ledger,
                    drop_after_charge,
                    timeout_before_charge,
                },
                stripe: StripeSettings {
                    api_base: st.api_base.trim_end_matches('/').to_string(),
                    api_version: st.api_version.clone(),
                    secret_key,
                    statement_descriptor_suffix: suffix,
                    list_filters,
                },
            },
            email: EmailSettings {
                transport,
                folder: PathBuf::from(e.folder.trim()),
                from: e.from.trim().to_string(),
                reply_to: e.reply_to.trim().to_string(),
                max_age,
                retry_delays: email_retry,
                max_per_second,
                templates: e.templates.trim().to_string(),
                keep_sent,
                smtp: SmtpSettings {
                    host,
                    port,
                    tls,
                    username: sm.username.clone(),
                    password: smtp_password,
                    timeout: smtp_timeout,
                    ca_file: sm.ca_file.trim().to_string(),
                },
            },
            org: OrgSettings {
                name: r.org.name.trim().to_string(),
                support_phone: r.org.support_phone.trim().to_string(),
                portal_url: r.org.portal_url.trim().to_string(),
            },
            reminders: ReminderSettings {
                days_before,
                card_expiry_days,
            },
            daemon: DaemonSettings {
                poll_interval,
                concurrency,
                batch_size,
                lease,
                shutdown_grace,
            },
        })
    }

    /// The effective settings as JSON, secrets redacted.
    pub fn redacted_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }

    /// The effective settings as `section.key = value` lines, secrets redacted.
    pub fn redacted_lines(&self) -> Vec<String> {
        fn walk(prefix: &str, v: &serde_json::Value, out: &mut Vec<String>) {
            match v {
                serde_json::Value::Object(map) => {
                    for (k, v) in map {
                        let key = if prefix.is_empty() {
                            k.clone()
                        } else {
                            format!("{prefix}.{k}")
                        };
                        walk(&key, v, out);
                    }
                }
                other => out.push(format!("{prefix} = {other}")),
            }
        }
        let mut out = Vec::new();
        walk("", &self.redacted_json(), &mut out);
        out
    }
}

/// Turns the `config` crate's wording into something that names the key and the fix, and never
/// shows a line of the settings file: a TOML error quotes the offending line, which may be a
/// password (inside a multi-line string it is not even next to its key). The line and column
/// stay, so the operator finds it.
fn explain_layer_error(msg: &str) -> String {
    if let Some(rest) = msg.split("unknown field `").nth(1) {
        let field = rest.split('`').next().unwrap_or(rest);
        return redact_secrets(&format!(
            "unknown setting '{field}' ({msg}); check its spelling against config/default.toml, which lists every key"
        ));
    }
    let kept: Vec<&str> = msg
        .lines()
        .filter(|line| {
            let t = line
                .trim_start()
                .trim_start_matches(|c: char| c.is_ascii_digit());
            !t.trim_start().starts_with('|')
        })
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect();
    let mut text = kept.join(": ");
    let quoted_line = kept.len() != msg.lines().filter(|l| !l.trim().is_empty()).count();
    // "invalid type: integer `12345`, expected a string for key `email.smtp.password`": the
    // value of a secret is never quoted back.
    let names_a_secret = text.split('`').skip(1).step_by(2).any(is_secret_key);
    if names_a_secret {
        text = text
            .split('`')
            .enumerate()
            .map(|(i, part)| {
                if i % 2 == 1 && !is_secret_key(part) {
                    REDACTED
                } else {
                    part
                }
            })
            .collect::<Vec<_>>()
            .join("`");
    }
    let hidden = if quoted_line {
        " (the line itself is not shown: settings files hold passwords)"
    } else {
        ""
    };
    redact_secrets(&format!(
        "{text}{hidden}; check the settings file's TOML syntax and key names against config/default.toml"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(file: Option<&str>, env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("autopay.toml");
        if let Some(text) = file {
            std::fs::write(&path, text).unwrap();
        }
        Settings::load(
            file.map(|_| path.as_path()),
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    fn problems(r: Result<Settings, ConfigError>) -> Vec<Problem> {
        match r {
            Err(ConfigError::Invalid(p)) => p,
            other => panic!("expected problems, got {other:?}"),
        }
    }

    #[test]
    fn the_embedded_defaults_are_valid_and_name_the_quick_start_setup() {
        let s = load(None, &[]).unwrap();
        assert_eq!(s.database.url.backend(), Backend::Sqlite);
        assert_eq!(s.processor.kind, ProcessorKind::Simulated);
        assert_eq!(s.email.transport, EmailTransport::File);
        assert_eq!(s.payments.retry_delays.len(), 3);
        assert_eq!(
            s.payments.accepted_brands.describe(),
            "Visa, MasterCard and Discover"
        );
    }

    #[test]
    fn a_file_overrides_defaults_and_the_environment_overrides_the_file() {
        let s = load(
            Some("[payments]\nsuspend_after = 5\nretry_delays = [\"2d\"]\n[processor.simulated]\nlatency = \"0s\"\n"),
            &[
                ("AUTOPAY__PAYMENTS__SUSPEND_AFTER", "7"),
                ("AUTOPAY__PAYMENTS__RETRY_DELAYS", "1h, 2h,4h"),
                ("OTHER", "ignored"),
            ],
        )
        .unwrap();
        assert_eq!(s.payments.suspend_after, 7);
        assert_eq!(
            s.payments.retry_delays,
            vec![
                Dur(Duration::from_secs(3600)),
                Dur(Duration::from_secs(7200)),
                Dur(Duration::from_secs(14400))
            ]
        );
        assert_eq!(s.processor.simulated.latency, Dur(Duration::ZERO));
    }

    #[test]
    fn every_problem_is_listed_at_once_with_key_value_and_expectation() {
        let p = problems(load(
            None,
            &[
                ("AUTOPAY__PAYMENTS__SUSPEND_AFTER", "lots"),
                ("AUTOPAY__PAYMENTS__MISFIRE", "sometimes"),
                ("AUTOPAY__DATABASE__URL", "mysql://x"),
                ("AUTOPAY__PROCESSOR__TIMEOUT", "30 parsecs"),
            ],
        ));
        let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
        assert!(keys.contains(&"payments.suspend_after"), "{keys:?}");
        assert!(keys.contains(&"payments.misfire"));
        assert!(keys.contains(&"database.url"));
        assert!(keys.contains(&"processor.timeout"));
        let misfire = p.iter().find(|p| p.key == "payments.misfire").unwrap();
        assert_eq!(misfire.value, "sometimes");
        assert!(misfire.expected.contains("coalesce"));
    }

    #[test]
    fn the_production_example_is_valid_once_its_secret_files_exist() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "secret\n").unwrap();
        let pw = pw.display().to_string();
        let example = include_str!("../config/production.example.toml");
        let s = load(
            Some(example),
            &[
                ("AUTOPAY__DATABASE__PASSWORD_FILE", pw.as_str()),
                ("AUTOPAY__EMAIL__SMTP__PASSWORD_FILE", pw.as_str()),
            ],
        )
        .unwrap();
        assert_eq!(s.database.url.backend(), Backend::Postgres);
        assert_eq!(s.log.format, LogFormat::Json);
        assert_eq!(s.payments.holidays.len(), 7);
    }

    #[test]
    fn an_unknown_key_is_named() {
        let err = load(Some("[payments]\ncurency = \"USD\"\n"), &[]).unwrap_err();
        assert!(err.to_string().contains("curency"), "{err}");
    }

    #[test]
    fn unsafe_timing_is_refused() {
        let p = problems(load(
            None,
            &[
                ("AUTOPAY__DAEMON__LEASE", "40s"),
                ("AUTOPAY__DAEMON__SHUTDOWN_GRACE", "5s"),
            ],
        ));
        assert!(p.iter().any(|p| p.key == "daemon.lease"));
        assert!(p.iter().any(|p| p.key == "daemon.shutdown_grace"));
    }

    #[test]
    fn passwords_never_appear_in_output_and_a_password_file_replaces_the_url_password() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "s3cr3t/pw\n").unwrap();
        let s = Settings::load(
            None,
            [
                (
                    "AUTOPAY__DATABASE__URL".to_string(),
                    "postgres://app:old@db:5432/autopay".to_string(),
                ),
                (
                    "AUTOPAY__DATABASE__PASSWORD_FILE".to_string(),
                    pw.display().to_string(),
                ),
                (
                    "AUTOPAY__EMAIL__SMTP__PASSWORD".to_string(),
                    "mailpass".to_string(),
                ),
            ],
        )
        .unwrap();
        assert_eq!(
            s.database.url.expose(),
            "postgres://app:s3cr3t%2Fpw@db:5432/autopay"
        );
        let shown = format!("{:?}\n{}", s, s.redacted_lines().join("\n"));
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(!shown.contains("old@"));
        assert!(!shown.contains("mailpass"));
        assert!(shown.contains(REDACTED));
    }

    #[test]
    fn durations_parse_and_print_in_their_largest_unit() {
        for (s, d) in [("30s", 30), ("5m", 300), ("4h", 14_400), ("3d", 259_200)] {
            assert_eq!(Dur::parse(s).unwrap(), Dur(Duration::from_secs(d)));
            assert_eq!(Dur::parse(s).unwrap().to_string(), s);
        }
        assert_eq!(Dur::parse("250ms").unwrap().to_string(), "250ms");
        assert!(Dur::parse("5").is_err());
        assert!(Dur::parse("5w").is_err());
        assert!(Dur::parse("-5s").is_err());
    }

    #[test]
    fn a_syntax_error_names_the_line_but_never_shows_it() {
        for (text, line) in [
            ("[email.smtp]\npassword = \"hunter2\n", "line 2"),
            ("[email.smtp]\npassword = \"\"\"\nhunter2\n", "line 3"),
            (
                "[email.smtp]\npassword = [\"hunter2\"]\n",
                "email.smtp.password",
            ),
        ] {
            let err = load(Some(text), &[]).unwrap_err().to_string();
            assert!(err.contains(line), "{err}");
            assert!(!err.contains("hunter2"), "{err}");
        }
    }

    #[test]
    fn secrets_urls_and_card_numbers_are_taken_out_of_any_error_text() {
        for (text, secret) in [
            ("2 | password = \"hunter2", "hunter2"),
            ("AUTOPAY__EMAIL__SMTP__PASSWORD=hunter2 is wrong", "hunter2"),
            ("smtp = { password = 'hunter2', host = 'h' }", "hunter2"),
            ("processor.stripe.secret_key = sk_live_hunter2", "hunter2"),
            ("api_token=hunter2", "hunter2"),
            (
                "cannot reach postgres://app:hunter2@db/autopay: refused",
                "hunter2",
            ),
            ("a path 4242424242424242 or ref4242-4242-4242-4242", "4242"),
        ] {
            let shown = redact_secrets(text);
            assert!(!shown.contains(secret), "{text} -> {shown}");
        }
        for kept in [
            "processor.key_retention = 24h",
            "database.password_file = /run/credentials/db",
            "--token: this is not a processor token",
            "payment 0193a5b2-7c1e-7d3f-9a41-212345678900 is failed",
        ] {
            assert_eq!(redact_secrets(kept), kept);
        }
    }

    #[test]
    fn a_problem_never_shows_a_secret_or_a_card_number() {
        let p = problems(load(
            None,
            &[
                ("AUTOPAY__DATABASE__MAX_CONNECTIONS", "4242424242424242"),
                (
                    "AUTOPAY__PROCESSOR__SIMULATED__LEDGER",
                    "postgresx://u:hunter2@h/db",
                ),
            ],
        ));
        let shown = format!("{p:?}");
        assert!(!shown.contains("4242424242424242"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(p.iter().any(|p| p.key == "database.max_connections"));
    }

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
