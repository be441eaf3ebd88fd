//! [`Checker`]: parses one field at a time and collects every problem, so that an operator
//! fixes them all in one go instead of one per start.

use std::time::Duration;

use secrecy::SecretString;

use super::duration::Dur;
use super::raw;
use super::secrets::{is_secret_key, redact_secrets};
use super::{Problem, REDACTED};

/// Collects problems while fields are parsed, so that every problem is reported at once.
#[derive(Default)]
pub(super) struct Checker {
    /// In the order they were found, which is the order they are reported in.
    pub(super) problems: Vec<Problem>,
    /// `$CREDENTIALS_DIRECTORY` (systemd's `LoadCredential=`): a relative `*_file` path is read
    /// from there.
    pub(super) credentials: Option<std::path::PathBuf>,
}

impl Checker {
    /// Records a problem. Its value is shown (by `check-config` and every error), so a secret's
    /// value is replaced, and passwords in URLs and card numbers are taken out of any other.
    pub(super) fn problem(&mut self, key: &str, value: &str, expected: impl Into<String>) {
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
    pub(super) fn parse<T>(
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

    pub(super) fn dur(&mut self, key: &str, value: &str) -> Dur {
        self.parse(key, value, Dur(Duration::from_secs(1)), Dur::parse)
    }

    pub(super) fn int(&mut self, key: &str, value: &str, min: u32, max: u32) -> u32 {
        self.parse(key, value, min, |s| {
            s.trim()
                .parse::<u32>()
                .ok()
                .filter(|n| (min..=max).contains(n))
                .ok_or_else(|| format!("a whole number from {min} to {max}"))
        })
    }

    pub(super) fn share(&mut self, key: &str, value: &str) -> f64 {
        self.parse(key, value, 0.0, |s| {
            s.trim()
                .parse::<f64>()
                .ok()
                .filter(|f| (0.0..=1.0).contains(f))
                .ok_or_else(|| "a fraction from 0.0 to 1.0".to_string())
        })
    }

    pub(super) fn boolean(&mut self, key: &str, value: &str) -> bool {
        self.parse(key, value, false, |s| match s.trim() {
            "true" => Ok(true),
            "false" => Ok(false),
            _ => Err("true or false".into()),
        })
    }

    pub(super) fn choice<T: Copy>(&mut self, key: &str, value: &str, options: &[(&str, T)]) -> T {
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

    pub(super) fn durs(&mut self, key: &str, list: &raw::List) -> Vec<Dur> {
        let mut out = Vec::new();
        for item in list.items() {
            match Dur::parse(&item) {
                Ok(d) => out.push(d),
                Err(e) => self.problem(key, &list.shown(), format!("a list of durations: {e}")),
            }
        }
        out
    }

    /// The text of a credential file (a relative path is under systemd's credentials folder,
    /// when there is one), or the problem recorded.
    pub(super) fn read_credential(&mut self, file_key: &str, file: &str) -> Option<String> {
        let path = std::path::Path::new(file.trim());
        let path = match &self.credentials {
            Some(dir) if path.is_relative() => dir.join(path),
            _ => path.to_path_buf(),
        };
        match std::fs::read_to_string(&path) {
            Ok(content) => Some(content),
            Err(e) => {
                self.problem(file_key, file, format!("a readable file ({e})"));
                None
            }
        }
    }

    /// A secret given inline or in a file (the file wins, for systemd credentials).
    pub(super) fn secret(
        &mut self,
        inline: &str,
        file_key: &str,
        file: &str,
    ) -> Option<SecretString> {
        if !file.trim().is_empty() {
            match self.read_credential(file_key, file) {
                Some(content) => {
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
                None => None,
            }
        } else if inline.is_empty() {
            None
        } else {
            Some(SecretString::from(inline.to_string()))
        }
    }
}
