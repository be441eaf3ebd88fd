//! Settings: embedded defaults (config/default.toml) < the settings file < `AUTOPAY__*`
//! environment variables, parsed once at start-up into typed values.
//!
//! Loading happens in two steps. The `config` crate merges the layers into [`raw`] structs whose
//! fields are plain strings and lists, so that merging itself can only fail on an unknown key or a
//! malformed file. [`Settings::from_raw`] then parses every field, collecting every problem (key,
//! bad value, what is expected) so an operator fixes them all in one go. Secrets are
//! [`SecretString`](secrecy::SecretString)s: redacted in `Debug`, in `check-config`, and inside
//! `database.url`.
//!
//! Each section of the settings file has a module here holding its raw struct, its typed
//! settings and its `parse`, which makes that section's checks. Checks that relate keys of
//! different sections run once every section is parsed, in `check_across_sections`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

mod checker;
mod daemon;
mod database;
mod duration;
mod email;
mod http;
mod log;
mod org;
mod payments;
mod processor;
pub mod raw;
mod reminders;
mod secrets;
mod url;

use checker::Checker;
pub use daemon::DaemonSettings;
pub use database::DatabaseSettings;
pub use duration::Dur;
pub use email::{EmailSettings, EmailTransport, SmtpSettings, SmtpTls};
pub use http::HttpSettings;
pub use log::{LogFormat, LogSettings};
pub use org::OrgSettings;
pub use payments::{Misfire, PaymentSettings};
pub use processor::{
    Latency, Ledger, MIN_API_VERSION, ProcessorKind, ProcessorSettings, SimulatedSettings,
    StripeMode, StripeSettings,
};
pub use reminders::ReminderSettings;
pub use secrets::{is_secret_key, redact_secrets};
pub use url::{Backend, DatabaseUrl, redact_url};

/// The embedded defaults; every key is documented there.
pub const DEFAULTS: &str = include_str!("../../config/default.toml");

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
    pub http: HttpSettings,
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
        let env: Vec<(String, String)> = env.into_iter().collect();
        let credentials = env
            .iter()
            .find(|(k, v)| k == "CREDENTIALS_DIRECTORY" && !v.is_empty())
            .map(|(_, v)| PathBuf::from(v));
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
        Settings::parse(&raw, credentials)
    }

    /// Parses merged raw settings, reporting every problem at once: each section in the order
    /// of the settings file, then the checks across sections.
    pub fn from_raw(r: &raw::Settings) -> Result<Settings, ConfigError> {
        Settings::parse(r, None)
    }

    /// [`Settings::from_raw`], reading relative `*_file` paths from `credentials` (systemd's
    /// `$CREDENTIALS_DIRECTORY`) when given.
    fn parse(r: &raw::Settings, credentials: Option<PathBuf>) -> Result<Settings, ConfigError> {
        let mut c = Checker {
            credentials,
            ..Checker::default()
        };
        let database = database::parse(&r.database, &mut c);
        let log = log::parse(&r.log, &mut c);
        let payments = payments::parse(&r.payments, &mut c);
        let processor = processor::parse(&r.processor, &mut c);
        let email = email::parse(&r.email, &mut c);
        let org = org::parse(&r.org, &mut c);
        let reminders = reminders::parse(&r.reminders, &mut c);
        let daemon = daemon::parse(&r.daemon, &mut c);
        let http = http::parse(&r.http, &mut c);
        check_across_sections(&mut c, &processor, &daemon);
        if http.ready_grace <= daemon.poll_interval {
            c.problem(
                "http.ready_grace",
                &http.ready_grace.to_string(),
                format!("longer than daemon.poll_interval ({}): an idle loop completes one pass per poll, and must not look stalled", daemon.poll_interval),
            );
        }

        if !c.problems.is_empty() {
            return Err(ConfigError::Invalid(c.problems));
        }
        let Some(database) = database else {
            return Err(ConfigError::Invalid(c.problems));
        };
        Ok(Settings {
            database,
            log,
            payments,
            processor,
            email,
            org,
            reminders,
            daemon,
            http,
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

/// Timing rules that keep a charge from being sent twice (docs/architecture.md): a lease must
/// outlive any call by a wide margin, shutdown must wait for a call in flight, a resend must
/// happen while the processor still knows its key, and a lookup must not race its charge. They
/// run on the parsed values (a fallback where a value was refused), after every section's own
/// checks.
fn check_across_sections(c: &mut Checker, processor: &ProcessorSettings, daemon: &DaemonSettings) {
    let timeout = processor.timeout;
    let settle_delay = processor.settle_delay;
    let lookup_window = processor.lookup_window;
    let key_retention = processor.key_retention;
    let lease = daemon.lease;
    let shutdown_grace = daemon.shutdown_grace;

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
        max_unknown_cycles: processor.max_unknown_cycles,
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
    fn a_relative_secret_file_is_read_from_the_credentials_directory() {
        use secrecy::ExposeSecret;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("smtp-password"), "from-systemd\n").unwrap();
        let credentials = dir.path().to_str().unwrap();
        let s = load(
            None,
            &[
                ("AUTOPAY__EMAIL__SMTP__PASSWORD_FILE", "smtp-password"),
                ("CREDENTIALS_DIRECTORY", credentials),
            ],
        )
        .unwrap();
        let password = s.email.smtp.password.unwrap();
        assert_eq!(password.expose_secret(), "from-systemd");
        // Without the directory, a relative path is relative to the working folder: missing.
        let problems = problems(load(
            None,
            &[("AUTOPAY__EMAIL__SMTP__PASSWORD_FILE", "smtp-password")],
        ));
        assert_eq!(problems[0].key, "email.smtp.password_file");
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
        assert_eq!(
            s.processor.simulated.latency,
            crate::config::Latency::Fixed(Duration::ZERO)
        );
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
        let example = include_str!("../../config/production.example.toml");
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
    fn an_empty_mail_retry_list_is_refused_rather_than_replaced() {
        let p = problems(load(Some("[email]\nretry_delays = []\n"), &[]));
        let p = p.iter().find(|p| p.key == "email.retry_delays").unwrap();
        assert!(p.expected.contains("at least one wait"), "{p:?}");
    }

    #[test]
    fn stripe_settings_are_checked_with_the_processor_s_own_rules() {
        let p = problems(load(
            Some(
                "[processor]\nkind = \"stripe\"\nkey_retention = \"48h\"\nlookup_window = \"1h\"\n[processor.stripe]\nsecret_key = \"sk_test_x\"\npublishable_key = \"pk_live_y\"\nwebhook_tolerance = \"2h\"\n",
            ),
            &[],
        ));
        let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
        for key in [
            "processor.key_retention",
            "processor.stripe.publishable_key",
            "processor.stripe.webhook_tolerance",
        ] {
            assert!(keys.contains(&key), "{key}: {p:?}");
        }
        // A good set passes, and the key is never shown.
        let s = load(
            Some(
                "[processor]\nkind = \"stripe\"\n[processor.stripe]\nsecret_key = \"rk_live_x\"\nwebhook_secret = [\"whsec_a\", \"whsec_b\"]\n",
            ),
            &[],
        )
        .unwrap();
        assert_eq!(s.processor.stripe.mode, Some(StripeMode::Live));
        assert_eq!(s.processor.stripe.webhook_secrets.len(), 2);
        let shown = serde_json::to_string(&s).unwrap();
        assert!(
            !shown.contains("rk_live_x") && !shown.contains("whsec_a"),
            "{shown}"
        );
    }

    #[test]
    fn unsafe_timing_is_refused() {
        let p = problems(load(
            None,
            &[
                ("AUTOPAY__DAEMON__LEASE", "40s"),
                ("AUTOPAY__DAEMON__SHUTDOWN_GRACE", "5s"),
                ("AUTOPAY__HTTP__READY_GRACE", "30s"),
            ],
        ));
        assert!(p.iter().any(|p| p.key == "http.ready_grace"));
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
}
