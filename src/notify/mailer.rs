//! The transports: one [`Mailer`] trait; SMTP (lettre's async transport), a folder of `.eml`
//! files (the embedded default, so the quick start shows real mail), and the log.
//!
//! Send errors are sorted the way a dispatcher must act on them: [`SendError::Transient`]
//! (4xx, connection failures: retry later), [`SendError::Recipient`] (550/551/553: this address
//! is undeliverable), [`SendError::Rejected`] (another 5xx for this message), and
//! [`SendError::Session`] (authentication, relay denied, TLS: nothing is wrong with the message;
//! mail pauses until the operator fixes the settings).

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use lettre::transport::smtp::PoolConfig;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use secrecy::ExposeSecret;
use uuid::Uuid;

use crate::config::{EmailSettings, EmailTransport, SmtpTls};

/// One message ready to go.
pub struct Mail {
    pub notification_id: Uuid,
    pub kind: String,
    pub message: Message,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("temporary failure: {0}")]
    Transient(String),
    #[error("the recipient's address was refused: {0}")]
    Recipient(String),
    #[error("the message was refused: {0}")]
    Rejected(String),
    #[error("the mail server refused the session: {0}")]
    Session(String),
}

#[async_trait]
pub trait Mailer: Send + Sync {
    fn name(&self) -> &'static str;
    async fn send(&self, mail: &Mail) -> Result<(), SendError>;
}

/// Why a transport could not be built from the settings (exit 78).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TransportError(pub String);

/// The transport `email.transport` names.
pub fn from_settings(email: &EmailSettings) -> Result<Box<dyn Mailer>, TransportError> {
    Ok(match email.transport {
        EmailTransport::File => Box::new(FileMailer {
            folder: email.folder.clone(),
        }),
        EmailTransport::Log => Box::new(LogMailer),
        EmailTransport::Smtp => Box::new(SmtpMailer::new(email)?),
    })
}

/// Writes each message as `{notification id}-{kind}.eml` in a folder. A message written again
/// (a resend after a crash) replaces the file: one file per notification.
pub struct FileMailer {
    pub folder: PathBuf,
}

#[async_trait]
impl Mailer for FileMailer {
    fn name(&self) -> &'static str {
        "file"
    }

    async fn send(&self, mail: &Mail) -> Result<(), SendError> {
        let folder = self.folder.clone();
        let name = format!("{}-{}.eml", mail.notification_id, mail.kind);
        let bytes = mail.message.formatted();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            use std::io::Write;
            use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
            // Messages hold members' names and payments: private to autopay's user, whatever
            // the umask (an existing folder keeps the mode its owner gave it).
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&folder)?;
            // Write aside, then rename: a reader never sees half a message.
            let tmp = folder.join(format!(".{name}.tmp"));
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            // A leftover file from a crash keeps its old mode through open: set it again.
            file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            file.write_all(&bytes)?;
            drop(file);
            std::fs::rename(&tmp, folder.join(&name))
        })
        .await
        .map_err(|e| SendError::Transient(format!("the file writer stopped: {e}")))?
        .map_err(|e| {
            SendError::Session(format!(
                "cannot write to email.folder {}: {e}; check that it exists and is writable",
                self.folder.display()
            ))
        })
    }
}

/// Logs that a message would go, with its id and kind only (never its content).
pub struct LogMailer;

#[async_trait]
impl Mailer for LogMailer {
    fn name(&self) -> &'static str {
        "log"
    }

    async fn send(&self, mail: &Mail) -> Result<(), SendError> {
        tracing::info!(notification_id = %mail.notification_id, kind = %mail.kind, "email (log transport: not sent)");
        Ok(())
    }
}

/// The operator's SMTP server, through a pool of connections.
pub struct SmtpMailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
}

impl SmtpMailer {
    pub fn new(email: &EmailSettings) -> Result<SmtpMailer, TransportError> {
        let smtp = &email.smtp;
        let mut tls = TlsParameters::builder(smtp.host.clone());
        if !smtp.ca_file.is_empty() {
            let pem = std::fs::read(&smtp.ca_file).map_err(|e| {
                TransportError(format!(
                    "email.smtp.ca_file {}: {e}; give a readable PEM file",
                    smtp.ca_file
                ))
            })?;
            let cert = Certificate::from_pem(&pem).map_err(|e| {
                TransportError(format!(
                    "email.smtp.ca_file {} is not a PEM certificate: {e}",
                    smtp.ca_file
                ))
            })?;
            tls = tls.add_root_certificate(cert);
        }
        let params = || {
            tls.clone().build_rustls().map_err(|e| {
                TransportError(format!(
                    "cannot set up TLS for email.smtp.host {}: {e}",
                    smtp.host
                ))
            })
        };
        let mode = match smtp.tls {
            SmtpTls::Required => Tls::Required(params()?),
            SmtpTls::Wrapper => Tls::Wrapper(params()?),
            SmtpTls::None => Tls::None,
        };
        let mut builder =
            AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(smtp.host.clone())
                .port(smtp.port)
                .tls(mode)
                .timeout(Some(smtp.timeout.as_std()))
                .pool_config(
                    PoolConfig::new()
                        .max_size(4)
                        .idle_timeout(Duration::from_secs(60)),
                );
        if !smtp.username.is_empty() {
            let password = smtp
                .password
                .as_ref()
                .map(|p| p.expose_secret().to_string())
                .unwrap_or_default();
            builder = builder.credentials(Credentials::new(smtp.username.clone(), password));
        }
        Ok(SmtpMailer {
            transport: builder.build(),
        })
    }
}

/// Sorts an SMTP error by what the dispatcher must do. Messages keep the server's words but
/// never a password.
pub fn classify(e: &lettre::transport::smtp::Error) -> SendError {
    let text = scrub_addresses(&e.to_string());
    let code = e.status().map(|c| c.to_string());
    let lower = text.to_lowercase();
    if let Some(tls) = tls_failure(e) {
        return SendError::Session(format!(
            "the mail server's certificate was refused ({tls}); check email.smtp.host (it must match the certificate) and email.smtp.ca_file"
        ));
    }
    if e.is_tls() {
        return SendError::Session(format!(
            "TLS with the mail server failed: {text}; check email.smtp.tls, email.smtp.port and the server's certificate"
        ));
    }
    match code.as_deref() {
        Some("530" | "534" | "535" | "538") => {
            return SendError::Session(format!(
                "authentication refused ({text}); check email.smtp.username and the password"
            ));
        }
        Some(c) if c.starts_with('5') && (lower.contains("relay") || lower.contains("5.7.1")) => {
            return SendError::Session(format!(
                "relaying refused ({text}); the server does not accept mail from autopay for this domain: check the account's sending rights"
            ));
        }
        _ => {}
    }
    if e.is_permanent() {
        return match code.as_deref() {
            Some("550" | "551" | "553") => SendError::Recipient(text),
            _ => SendError::Rejected(text),
        };
    }
    SendError::Transient(text)
}

/// Replaces email addresses in a server's reply ("550 5.1.1 <ana@example.org>: unknown") with
/// `<address>`: replies end up in logs and in `status`, which carry no member data.
pub fn scrub_addresses(text: &str) -> String {
    text.split_inclusive(|c: char| {
        c.is_whitespace() || matches!(c, '<' | '>' | ',' | ';' | '(' | ')' | '"' | '\'')
    })
    .map(|piece| {
        let (word, tail) = match piece.char_indices().last() {
            Some((i, c))
                if c.is_whitespace()
                    || matches!(c, '<' | '>' | ',' | ';' | '(' | ')' | '"' | '\'') =>
            {
                piece.split_at(i)
            }
            _ => (piece, ""),
        };
        match word.split_once('@') {
            Some((local, domain)) if !local.is_empty() && domain.contains('.') => {
                format!("address{tail}")
            }
            _ => piece.to_string(),
        }
    })
    .collect()
}

/// A certificate or handshake failure, which lettre reports as a connection error with the
/// rustls error inside: found by walking the error's sources.
fn tls_failure(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = current {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return Some(tls.to_string());
        }
        if let Some(tls) = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(tls.to_string());
        }
        current = err.source();
    }
    None
}

#[async_trait]
impl Mailer for SmtpMailer {
    fn name(&self) -> &'static str {
        "smtp"
    }

    async fn send(&self, mail: &Mail) -> Result<(), SendError> {
        self.transport
            .send(mail.message.clone())
            .await
            .map(|_| ())
            .map_err(|e| classify(&e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_in_server_replies_are_scrubbed() {
        assert_eq!(
            scrub_addresses("550 5.1.1 <ana.diaz@example.org>: mailbox unavailable"),
            "550 5.1.1 <address>: mailbox unavailable"
        );
        assert_eq!(
            scrub_addresses("451 4.3.0 try again later"),
            "451 4.3.0 try again later"
        );
        assert_eq!(
            scrub_addresses("rcpt x@y.org refused"),
            "rcpt address refused"
        );
    }
}
