//! The transports: one [`Mailer`] trait; SMTP (lettre's async SMTP connection, driven one
//! command at a time), a folder of `.eml` files (the embedded default, so the quick start shows
//! real mail), and the log.
//!
//! Send errors are sorted the way a dispatcher must act on them, by the step of the SMTP
//! conversation a reply came at ([`Stage`]) and its code ([`classify`], the table in
//! docs/emails.md): [`SendError::Transient`] (4xx, connection failures, timeouts: retry later),
//! [`SendError::Recipient`] (an address refused at RCPT: this address is undeliverable),
//! [`SendError::Rejected`] (another 5xx about this one message, such as "554 5.7.1 rejected as
//! spam" after its data), and [`SendError::Session`] (the greeting, TLS, authentication, the
//! sender at MAIL FROM, relaying denied: nothing is wrong with the message; mail pauses until
//! the operator fixes the settings).

use std::path::PathBuf;
use std::time::Duration;

use std::error::Error as _;
use std::time::Instant;

use async_trait::async_trait;
use lettre::Message;
use lettre::address::Envelope;
use lettre::transport::smtp::authentication::{Credentials, DEFAULT_MECHANISMS};
use lettre::transport::smtp::client::{AsyncSmtpConnection, Certificate, Tls, TlsParameters};
use lettre::transport::smtp::commands::{Data, Mail as MailFrom, Rcpt};
use lettre::transport::smtp::extension::{ClientId, Extension, MailBodyParameter, MailParameter};
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
    /// How many messages may be sent at once (the SMTP mailer: `email.smtp.pool_size`).
    fn in_flight(&self) -> usize {
        1
    }
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

/// How long an idle SMTP connection is kept before it is dropped rather than reused.
const SMTP_IDLE: Duration = Duration::from_secs(60);

/// The operator's SMTP server. Each message is one transaction, sent command by command so
/// that a refusal is known by the step it came at; connections are reused (up to
/// `email.smtp.pool_size` idle ones, each checked with NOOP) and dropped after any refusal.
pub struct SmtpMailer {
    host: String,
    port: u16,
    tls: Tls,
    /// The name given in EHLO: this host's name, as lettre's transport would give.
    hello: ClientId,
    credentials: Option<Credentials>,
    /// Each step (connect, STARTTLS, AUTH, each command, the data) must answer within this.
    timeout: Duration,
    /// Connections that finished a message cleanly, with when they did.
    idle: tokio::sync::Mutex<Vec<(AsyncSmtpConnection, Instant)>>,
    /// `email.smtp.pool_size`: the most idle connections kept.
    pool_size: usize,
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
        let credentials = (!smtp.username.is_empty()).then(|| {
            let password = smtp
                .password
                .as_ref()
                .map(|p| p.expose_secret().to_string())
                .unwrap_or_default();
            Credentials::new(smtp.username.clone(), password)
        });
        Ok(SmtpMailer {
            host: smtp.host.clone(),
            port: smtp.port,
            tls: mode,
            hello: ClientId::default(),
            credentials,
            timeout: smtp.timeout.as_std(),
            idle: tokio::sync::Mutex::new(Vec::new()),
            pool_size: usize::try_from(smtp.pool_size).unwrap_or(1).max(1),
        })
    }

    /// Runs one step of the conversation within the timeout, classifying its failure by stage.
    async fn step<T>(
        &self,
        stage: Stage,
        fut: impl std::future::Future<Output = Result<T, lettre::transport::smtp::Error>>,
    ) -> Result<T, SendError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(result) => result.map_err(|e| classify(stage, &Failure::from_lettre(&e))),
            Err(_) => Err(classify(stage, &Failure::Timeout)),
        }
    }

    /// An idle connection that still answers NOOP, or a new one: connected (greeting, EHLO),
    /// encrypted as `email.smtp.tls` says, and authenticated when a user name is set.
    async fn connection(&self) -> Result<AsyncSmtpConnection, SendError> {
        loop {
            let parked = self.idle.lock().await.pop();
            let Some((mut conn, since)) = parked else {
                break;
            };
            let alive = since.elapsed() < SMTP_IDLE
                && tokio::time::timeout(self.timeout, conn.test_connected())
                    .await
                    .unwrap_or(false);
            if alive {
                return Ok(conn);
            }
            conn.abort().await;
        }
        let mut conn = match &self.tls {
            Tls::Wrapper(params) => {
                self.step(
                    Stage::Connect,
                    AsyncSmtpConnection::connect_tokio1(
                        (self.host.as_str(), self.port),
                        Some(self.timeout),
                        &self.hello,
                        Some(params.clone()),
                        None,
                    ),
                )
                .await?
            }
            _ => {
                // Our own socket, with Nagle's algorithm off: lettre writes a message's body and
                // its final dot in two writes, and with Nagle on the second waits for the
                // server's delayed ACK, about 40 ms a message.
                let tcp = match tokio::time::timeout(
                    self.timeout,
                    tokio::net::TcpStream::connect((self.host.as_str(), self.port)),
                )
                .await
                {
                    Ok(Ok(tcp)) => tcp,
                    Ok(Err(e)) => {
                        return Err(classify(
                            Stage::Connect,
                            &Failure::Network(scrub_addresses(&e.to_string())),
                        ));
                    }
                    Err(_) => return Err(classify(Stage::Connect, &Failure::Timeout)),
                };
                // Only a latency setting: a socket that refuses it still works.
                let _ = tcp.set_nodelay(true);
                self.step(
                    Stage::Connect,
                    AsyncSmtpConnection::connect_with_transport(Box::new(tcp), &self.hello),
                )
                .await?
            }
        };
        if let Tls::Required(params) = &self.tls {
            let upgraded = self
                .step(Stage::Tls, conn.starttls(params.clone(), &self.hello))
                .await;
            // A failed upgrade leaves the connection without a stream: drop it, no QUIT.
            upgraded?;
        }
        if let Some(credentials) = &self.credentials {
            let authed = self
                .step(Stage::Auth, conn.auth(DEFAULT_MECHANISMS, credentials))
                .await;
            if let Err(e) = authed {
                conn.abort().await;
                return Err(e);
            }
        }
        Ok(conn)
    }

    /// MAIL FROM, RCPT TO for each recipient, DATA, the message.
    async fn transaction(
        &self,
        conn: &mut AsyncSmtpConnection,
        envelope: &Envelope,
        message: &[u8],
    ) -> Result<(), SendError> {
        let mut options = Vec::new();
        let non_ascii_address = envelope
            .from()
            .is_some_and(|a| !AsRef::<str>::as_ref(a).is_ascii())
            || envelope
                .to()
                .iter()
                .any(|a| !AsRef::<str>::as_ref(a).is_ascii());
        if non_ascii_address {
            if !conn.server_info().supports_feature(Extension::SmtpUtfEight) {
                return Err(SendError::Session(
                    "the mail server does not take non-ASCII addresses (no SMTPUTF8); write email.from with an ASCII address".into(),
                ));
            }
            options.push(MailParameter::SmtpUtfEight);
        }
        if !message.is_ascii() {
            if !conn.server_info().supports_feature(Extension::EightBitMime) {
                return Err(SendError::Rejected(
                    "the message has 8-bit content and the mail server does not take it (no 8BITMIME)".into(),
                ));
            }
            options.push(MailParameter::Body(MailBodyParameter::EightBitMime));
        }
        self.step(
            Stage::MailFrom,
            conn.command(MailFrom::new(envelope.from().cloned(), options)),
        )
        .await?;
        for to in envelope.to() {
            self.step(Stage::RcptTo, conn.command(Rcpt::new(to.clone(), vec![])))
                .await?;
        }
        self.step(Stage::Data, conn.command(Data)).await?;
        self.step(Stage::EndOfData, conn.message(message)).await?;
        Ok(())
    }
}

/// The step of the SMTP conversation a reply (or a failure) came at: what the reply is about
/// depends on it as much as on its code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Connecting, the server's greeting and EHLO (and, for `wrapper`, the TLS handshake).
    Connect,
    /// STARTTLS and its handshake.
    Tls,
    /// AUTH.
    Auth,
    /// MAIL FROM: the server's answer about autopay as a sender.
    MailFrom,
    /// RCPT TO: the answer about one recipient (autopay sends each message to one).
    RcptTo,
    /// The DATA command.
    Data,
    /// The end of the message's data: the answer about the message itself.
    EndOfData,
}

impl Stage {
    fn as_str(self) -> &'static str {
        match self {
            Stage::Connect => "connecting (greeting, EHLO)",
            Stage::Tls => "STARTTLS",
            Stage::Auth => "AUTH",
            Stage::MailFrom => "MAIL FROM",
            Stage::RcptTo => "RCPT TO",
            Stage::Data => "DATA",
            Stage::EndOfData => "the end of the message data",
        }
    }
}

/// What a failed step came back with, as far as sorting it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// A negative reply: its code (421, 550, ...) and its text ("5.7.1 rejected as spam").
    Reply { code: u16, text: String },
    /// TLS failed: the certificate, the handshake, or the server not offering STARTTLS.
    Tls(String),
    /// autopay and the server have nothing in common to go on (no AUTH mechanism both know).
    Unsupported(String),
    /// The connection failed or dropped, or the reply could not be read.
    Network(String),
    /// No answer within `email.smtp.timeout`.
    Timeout,
}

impl Failure {
    /// Reads lettre's error: the reply's code and text when there was a reply, else what failed.
    pub fn from_lettre(e: &lettre::transport::smtp::Error) -> Failure {
        let text = scrub_addresses(&e.source().map(ToString::to_string).unwrap_or_default());
        if let Some(tls) = tls_failure(e) {
            return Failure::Tls(format!("the certificate or handshake was refused: {tls}"));
        }
        if e.is_tls() {
            return Failure::Tls(scrub_addresses(&e.to_string()));
        }
        if let Some(code) = e.status().and_then(|c| c.to_string().parse::<u16>().ok()) {
            return Failure::Reply { code, text };
        }
        if e.is_client() {
            return if text.contains("STARTTLS") {
                Failure::Tls(text)
            } else {
                Failure::Unsupported(text)
            };
        }
        if e.is_timeout() {
            return Failure::Timeout;
        }
        Failure::Network(scrub_addresses(&e.to_string()))
    }
}

/// The enhanced status code at the start of a reply's text (RFC 3463: "5.7.1", "4.2.2"), if any.
fn enhanced_code(text: &str) -> Option<(u8, u16, u16)> {
    let word = text.split_whitespace().next()?;
    let mut parts = word.split('.');
    let class = parts.next()?.parse::<u8>().ok()?;
    let subject = parts.next()?.parse::<u16>().ok()?;
    let detail = parts.next()?.parse::<u16>().ok()?;
    (parts.next().is_none() && matches!(class, 2 | 4 | 5)).then_some((class, subject, detail))
}

/// Sorts a failed step by what the dispatcher must do (the table in docs/emails.md):
///
/// - no answer, a dropped connection, any 4xx: retry later ([`SendError::Transient`]);
/// - TLS failures, and any 5xx while connecting (greeting, EHLO), at STARTTLS, at AUTH or at
///   MAIL FROM: the server refuses autopay, not a message: pause mail ([`SendError::Session`]);
/// - at RCPT TO, a 5xx that says relaying is denied: autopay may not send through this server
///   at all (and each message has one recipient, so every recipient was refused): pause;
/// - at RCPT TO, a bad address (enhanced code 5.1.x, or 550/551/553 without an enhanced code):
///   the address is undeliverable ([`SendError::Recipient`]: fail and flag it as bouncing);
/// - any other 5xx at RCPT TO, DATA or the end of the data ("554 5.7.1 rejected as spam", a
///   policy refusal, a message too large): that one message fails, nothing else
///   ([`SendError::Rejected`]).
///
/// The reply's text is kept (addresses scrubbed) and never holds a password.
pub fn classify(stage: Stage, failure: &Failure) -> SendError {
    let at = stage.as_str();
    let (code, text) = match failure {
        // A server that cannot be reached refuses autopay as a whole, like a refused
        // session: mail pauses (and says why) until it answers again.
        Failure::Timeout if stage == Stage::Connect => {
            return SendError::Session(
                "the mail server did not answer within email.smtp.timeout; check that it runs, and email.smtp.host and email.smtp.port".into(),
            );
        }
        Failure::Network(text) if stage == Stage::Connect => {
            return SendError::Session(format!(
                "cannot reach the mail server ({text}); check that it runs, and email.smtp.host and email.smtp.port"
            ));
        }
        Failure::Timeout => {
            return SendError::Transient(format!(
                "no answer from the mail server within email.smtp.timeout at {at}"
            ));
        }
        Failure::Network(text) => {
            return SendError::Transient(format!("the connection failed at {at}: {text}"));
        }
        Failure::Tls(text) => {
            return SendError::Session(format!(
                "TLS with the mail server failed ({text}); check email.smtp.tls, email.smtp.port, email.smtp.host (it must match the certificate) and email.smtp.ca_file"
            ));
        }
        Failure::Unsupported(text) => {
            return SendError::Session(format!(
                "the mail server and autopay cannot agree at {at} ({text}); check email.smtp.tls, email.smtp.port and email.smtp.username"
            ));
        }
        Failure::Reply { code, text } => (*code, text.as_str()),
    };
    let reply = format!("{code} {text}");
    if (400..500).contains(&code) {
        return SendError::Transient(format!("temporary refusal at {at}: {reply}"));
    }
    if !(500..600).contains(&code) {
        return SendError::Transient(format!("unexpected reply at {at}: {reply}"));
    }
    match stage {
        Stage::Connect => SendError::Session(format!(
            "the mail server refused the session at {at} ({reply}); check email.smtp.host and email.smtp.port"
        )),
        Stage::Tls => SendError::Session(format!(
            "the mail server refused STARTTLS ({reply}); check email.smtp.tls and email.smtp.port"
        )),
        Stage::Auth => SendError::Session(format!(
            "authentication refused ({reply}); check email.smtp.username and the password"
        )),
        Stage::MailFrom if matches!(code, 530 | 534 | 535 | 538) => SendError::Session(format!(
            "the mail server wants authentication before MAIL FROM ({reply}); set email.smtp.username and the password"
        )),
        Stage::MailFrom => SendError::Session(format!(
            "the mail server refused autopay as the sender at MAIL FROM ({reply}); check email.from and the account's sending rights"
        )),
        Stage::RcptTo if text.to_lowercase().contains("relay") => SendError::Session(format!(
            "relaying refused at RCPT TO ({reply}); the server does not accept mail from autopay for this domain: check the account's sending rights and email.smtp.username"
        )),
        Stage::RcptTo => match enhanced_code(text) {
            Some((5, 1, _)) => SendError::Recipient(reply),
            None if matches!(code, 550 | 551 | 553) => SendError::Recipient(reply),
            _ => SendError::Rejected(format!("the recipient was refused at {at}: {reply}")),
        },
        Stage::Data | Stage::EndOfData => {
            SendError::Rejected(format!("the message was refused at {at}: {reply}"))
        }
    }
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

    fn in_flight(&self) -> usize {
        self.pool_size
    }

    async fn send(&self, mail: &Mail) -> Result<(), SendError> {
        let mut conn = self.connection().await?;
        let sent = self
            .transaction(
                &mut conn,
                mail.message.envelope(),
                &mail.message.formatted(),
            )
            .await;
        match sent {
            Ok(()) => {
                let mut idle = self.idle.lock().await;
                if idle.len() < self.pool_size {
                    idle.push((conn, Instant::now()));
                    return Ok(());
                }
                drop(idle);
                conn.abort().await;
                Ok(())
            }
            Err(e) => {
                // After a refusal or a timeout the conversation's state is unknown: start the
                // next message on a fresh connection.
                conn.abort().await;
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(code: u16, text: &str) -> Failure {
        Failure::Reply {
            code,
            text: text.into(),
        }
    }

    fn kind(e: &SendError) -> &'static str {
        match e {
            SendError::Transient(_) => "retry",
            SendError::Recipient(_) => "bounce",
            SendError::Rejected(_) => "fail",
            SendError::Session(_) => "pause",
        }
    }

    #[test]
    fn replies_are_sorted_by_the_step_they_came_at_and_their_code() {
        use Stage::*;
        let cases: &[(Stage, u16, &str, &str)] = &[
            (Connect, 421, "4.3.2 service not available", "retry"),
            (Connect, 554, "5.7.1 no SMTP service for you", "pause"),
            (Connect, 550, "EHLO refused", "pause"),
            (Tls, 454, "4.7.0 TLS not available now", "retry"),
            (Tls, 554, "5.7.0 no TLS for you", "pause"),
            (Auth, 535, "5.7.8 authentication failed", "pause"),
            (Auth, 454, "4.7.0 temporary authentication failure", "retry"),
            (MailFrom, 553, "5.7.1 sender address not permitted", "pause"),
            (MailFrom, 530, "5.7.0 authentication required", "pause"),
            (MailFrom, 451, "4.3.0 try again", "retry"),
            (RcptTo, 550, "5.1.1 mailbox unavailable", "bounce"),
            (RcptTo, 553, "5.1.3 bad address syntax", "bounce"),
            (RcptTo, 550, "mailbox unavailable", "bounce"),
            (RcptTo, 551, "user not local", "bounce"),
            (RcptTo, 554, "5.7.1 relay access denied", "pause"),
            (RcptTo, 550, "5.7.1 Relaying denied", "pause"),
            (
                RcptTo,
                550,
                "5.7.1 recipient refuses mail from this sender",
                "fail",
            ),
            (RcptTo, 552, "5.2.2 mailbox full", "fail"),
            (RcptTo, 451, "4.3.0 try again later", "retry"),
            (RcptTo, 450, "4.2.0 greylisted", "retry"),
            (Data, 554, "5.5.1 no valid recipients", "fail"),
            (Data, 451, "4.3.0 try again", "retry"),
            (EndOfData, 554, "5.7.1 message rejected as spam", "fail"),
            (EndOfData, 552, "5.3.4 message too big", "fail"),
            (EndOfData, 550, "5.7.1 content refused", "fail"),
            (EndOfData, 451, "4.7.1 greylisted, try again", "retry"),
        ];
        for (stage, code, text, want) in cases {
            let got = classify(*stage, &reply(*code, text));
            assert_eq!(kind(&got), *want, "{stage:?} {code} {text}: {got}");
        }
    }

    #[test]
    fn failures_without_a_reply_retry_mid_session_and_pause_when_the_server_cannot_be_reached() {
        for stage in [Stage::RcptTo, Stage::EndOfData] {
            assert_eq!(kind(&classify(stage, &Failure::Timeout)), "retry");
            let dropped = Failure::Network("connection reset".into());
            assert_eq!(kind(&classify(stage, &dropped)), "retry");
        }
        // A server that cannot be reached at all pauses mail until it answers.
        let refused = Failure::Network("connection refused".into());
        assert_eq!(kind(&classify(Stage::Connect, &refused)), "pause");
        assert_eq!(kind(&classify(Stage::Connect, &Failure::Timeout)), "pause");
        let tls = Failure::Tls("the certificate or handshake was refused: UnknownIssuer".into());
        assert_eq!(kind(&classify(Stage::Connect, &tls)), "pause");
        let no_auth = Failure::Unsupported("No compatible authentication mechanism".into());
        assert_eq!(kind(&classify(Stage::Auth, &no_auth)), "pause");
    }

    #[test]
    fn enhanced_codes_are_read_from_the_start_of_the_reply() {
        assert_eq!(enhanced_code("5.7.1 rejected as spam"), Some((5, 7, 1)));
        assert_eq!(enhanced_code("4.2.2 mailbox full"), Some((4, 2, 2)));
        assert_eq!(enhanced_code("mailbox 5.1.1 unavailable"), None);
        assert_eq!(enhanced_code("5.7 half"), None);
        assert_eq!(enhanced_code(""), None);
    }

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
