//! `[email.smtp]`: the mail server autopay hands emails to when `email.transport = "smtp"`.

use secrecy::SecretString;
use serde::Serialize;

use super::super::checker::Checker;
use super::super::duration::Dur;
use super::super::raw::section;
use super::EmailTransport;

section!(Smtp {
    host: String,
    port: String,
    tls: String,
    username: String,
    password: String,
    password_file: String,
    timeout: String,
    ca_file: String,
    pool_size: String,
});

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SmtpTls {
    Required,
    Wrapper,
    None,
}

#[derive(Debug, Clone, Serialize)]
pub struct SmtpSettings {
    pub host: String,
    pub port: u16,
    pub tls: SmtpTls,
    pub username: String,
    #[serde(serialize_with = "super::super::secrets::ser_secret")]
    pub password: Option<SecretString>,
    pub timeout: Dur,
    pub ca_file: String,
    /// Connections to the server at once, and so messages in flight, 1 to 32.
    pub pool_size: u32,
}

/// `transport` is the chosen `email.transport`: unencrypted SMTP is refused only when SMTP is
/// what sends.
pub(super) fn parse(sm: &Smtp, c: &mut Checker, transport: EmailTransport) -> SmtpSettings {
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
    let pool_size = c.int("email.smtp.pool_size", &sm.pool_size, 1, 32);
    SmtpSettings {
        host,
        port,
        tls,
        username: sm.username.clone(),
        password: smtp_password,
        timeout: smtp_timeout,
        ca_file: sm.ca_file.trim().to_string(),
        pool_size,
    }
}
