//! `[log]`: what autopay logs, and in which format.

use serde::Serialize;

use super::checker::Checker;
use super::raw::section;

section!(Log {
    level: String,
    format: String
});

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone, Serialize)]
pub struct LogSettings {
    pub level: String,
    pub format: LogFormat,
}

pub(super) fn parse(r: &Log, c: &mut Checker) -> LogSettings {
    let level = r.level.trim().to_string();
    if tracing_subscriber::EnvFilter::try_new(&level).is_err() {
        c.problem(
            "log.level",
            &level,
            "trace, debug, info, warn, error, or a filter such as \"autopay=debug,sqlx=warn\"",
        );
    }
    let format = c.choice(
        "log.format",
        &r.format,
        &[("pretty", LogFormat::Pretty), ("json", LogFormat::Json)],
    );
    LogSettings { level, format }
}
