//! `autopay bench --scenario mail`: receipts per second through the dispatcher, against a plain
//! SMTP client's rate to the same server in the same run.
//!
//! The run starts a local SMTP server that accepts and discards every message (aiosmtpd's
//! `Sink`, on 127.0.0.1 and a free port), queues `--payments` receipts in a throwaway database,
//! and times `Dispatcher::drain` delivering them over `email.smtp.pool_size` connections with
//! `email.max_per_second` raised out of the way. Then a plain client (Python's `smtplib`, one
//! connection, one message after the other) sends as many copies of the same message, byte for
//! byte, to the same server: the ceiling a single connection reaches.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::bench::{backend_name, peak_rss_kib, progress, round};
use super::output::{self, Table, say};
use super::{CliError, Context, exit, operator};
use crate::clock::{Clock, SystemClock};
use crate::config::{Backend, DatabaseUrl, EmailTransport, SmtpTls};
use crate::domain::member::{AccountNumber, AccountType, EmailAddress, MemberName};
use crate::notify::dispatcher::Dispatcher;
use crate::notify::mailer::SmtpMailer;
use crate::notify::templates::Templates;
use crate::store::{self, Audit, NewMember, NewNotification, Notification};

/// Receipts per member: a member's receipts share its address, as on the 1st.
const RECEIPTS_PER_MEMBER: u32 = 10;
/// How long the SMTP server may take to start listening.
const SERVER_START: Duration = Duration::from_secs(15);

/// One backend's mail figures.
#[derive(Debug, Clone, Serialize)]
pub struct MailResult {
    pub backend: Backend,
    pub receipts: u32,
    /// `email.smtp.pool_size`: connections, and so messages in flight.
    pub pool_size: u32,
    /// The size of one receipt on the wire, headers included.
    pub message_bytes: usize,
    /// Queueing the receipts: not counted in the rate.
    pub load_seconds: f64,
    /// `Dispatcher::drain`: claim, render, send and record every receipt.
    pub deliver_seconds: f64,
    pub receipts_per_second: f64,
    /// The plain one-connection client's rate to the same server, with the same message.
    pub plain_client_per_second: f64,
    /// `receipts_per_second / plain_client_per_second`.
    pub share_of_plain_client: f64,
    /// The process-wide high-water mark of resident memory (VmHWM) after this backend, in MiB.
    pub peak_rss_mib: Option<f64>,
}

/// The local SMTP server that accepts and discards, stopped when dropped.
pub(super) struct SinkServer {
    child: Child,
    pub port: u16,
}

impl SinkServer {
    /// Starts aiosmtpd's `Sink` handler on 127.0.0.1 and waits until it accepts connections.
    pub(super) fn start() -> Result<SinkServer, CliError> {
        let port = free_port()?;
        let missing = || {
            CliError::new(
                exit::UNAVAILABLE,
                "the mail scenario needs python3 with aiosmtpd for its local SMTP server; install it with `python3 -m pip install aiosmtpd`",
            )
        };
        let child = Command::new("python3")
            .args(["-m", "aiosmtpd", "-n", "-l"])
            .arg(format!("127.0.0.1:{port}"))
            .args(["-c", "aiosmtpd.handlers.Sink"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|_| missing())?;
        let mut server = SinkServer { child, port };
        let deadline = Instant::now() + SERVER_START;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(server);
            }
            if let Ok(Some(_)) = server.child.try_wait() {
                return Err(missing());
            }
            if Instant::now() > deadline {
                return Err(CliError::new(
                    exit::UNAVAILABLE,
                    format!(
                        "the local SMTP server (aiosmtpd) did not listen on 127.0.0.1:{port} within {}s",
                        SERVER_START.as_secs()
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for SinkServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port nobody listens on now (the kernel's choice, released at once).
fn free_port() -> Result<u16, CliError> {
    TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| {
            CliError::new(
                exit::UNAVAILABLE,
                format!("cannot find a free port on 127.0.0.1 for the SMTP server: {e}"),
            )
        })
}

/// Queues `n` receipts in the fresh database at `url`, delivers them to the server on `port`,
/// then has the plain client send as many to it.
pub(super) async fn measure(
    ctx: &Context,
    url: DatabaseUrl,
    n: u32,
    port: u16,
    scratch: &Path,
) -> Result<MailResult, CliError> {
    let backend = url.backend();
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let store = store::open(&url, ctx.settings.database.max_connections).await?;
    let started = Instant::now();
    store.migrate(clock.now()).await?;
    queue_receipts(store.as_ref(), clock.as_ref(), n).await?;
    let load_seconds = started.elapsed().as_secs_f64();

    let mut settings = ctx.settings.clone();
    settings.database.url = url;
    settings.email.transport = EmailTransport::Smtp;
    settings.email.smtp.host = "127.0.0.1".into();
    settings.email.smtp.port = port;
    settings.email.smtp.tls = SmtpTls::None;
    settings.email.smtp.username = String::new();
    settings.email.smtp.password = None;
    settings.email.smtp.ca_file = String::new();
    // The highest the setting takes: the limit must not be what is measured.
    settings.email.max_per_second = 10_000;
    let pool_size = settings.email.smtp.pool_size;
    let mailer = SmtpMailer::new(&settings.email)
        .map_err(|e| CliError::internal(format!("the benchmark's SMTP settings: {e}")))?;
    let dispatcher = Dispatcher::new(
        &settings,
        store.clone(),
        Arc::new(mailer),
        Arc::new(Templates::builtin()),
        clock.clone(),
        format!("bench-{}", operator()),
    )
    .map_err(|e| CliError::internal(format!("the benchmark's dispatcher: {e}")))?;
    let message = dispatcher
        .wire_bytes(&sample_receipt(clock.now()))
        .map_err(|e| CliError::internal(format!("the benchmark's sample receipt: {e}")))?;
    progress(format!(
        "queued {n} receipts in {load_seconds:.1}s; delivering them to 127.0.0.1:{port} over {pool_size} connection(s)..."
    ));
    let started = Instant::now();
    let report = dispatcher.drain().await?;
    let deliver_seconds = started.elapsed().as_secs_f64();
    if report.sent < u64::from(n) || report.failed > 0 || report.paused {
        return Err(CliError::internal(format!(
            "the dispatcher sent {} of {n} receipts ({} failed, {} to retry{}); the local SMTP server refused some",
            report.sent,
            report.failed,
            report.retrying,
            if report.paused { ", mail paused" } else { "" }
        )));
    }
    let receipts_per_second = report.sent as f64 / deliver_seconds;
    progress(format!(
        "delivered {} receipts from {} in {deliver_seconds:.2}s: {receipts_per_second:.0}/s; now the plain client...",
        report.sent,
        backend_name(backend)
    ));
    let plain = plain_client(port, n, &message, scratch)?;
    progress(format!(
        "plain client, one connection: {n} messages in {:.2}s: {:.0}/s",
        f64::from(n) / plain,
        plain
    ));
    Ok(MailResult {
        backend,
        receipts: n,
        pool_size,
        message_bytes: message.len(),
        load_seconds: round(load_seconds, 3),
        deliver_seconds: round(deliver_seconds, 3),
        receipts_per_second: round(receipts_per_second, 1),
        plain_client_per_second: round(plain, 1),
        share_of_plain_client: round(receipts_per_second / plain, 3),
        peak_rss_mib: peak_rss_kib().map(|kib| round(kib as f64 / 1024.0, 1)),
    })
}

/// A receipt like the ones queued, for the plain client's copy.
fn sample_receipt(now: jiff::Timestamp) -> Notification {
    Notification {
        id: uuid::Uuid::new_v4(),
        kind: "receipt".into(),
        dedupe_key: "receipt:bench:sample".into(),
        member_id: None,
        recipient: "bench-0@example.org".into(),
        payload: Templates::sample_payload("receipt"),
        state: "pending".into(),
        attempts: 0,
        created_at: now,
    }
}

/// One member per [`RECEIPTS_PER_MEMBER`] receipts, each receipt the sample one under a key
/// of its own.
async fn queue_receipts(
    store: &dyn store::Store,
    clock: &dyn Clock,
    n: u32,
) -> Result<(), CliError> {
    let audit = Audit {
        actor: operator(),
        at: clock.now(),
    };
    let invalid = |e: String| CliError::internal(format!("the benchmark's sample member: {e}"));
    let payload = Templates::sample_payload("receipt");
    for m in 0..n.div_ceil(RECEIPTS_PER_MEMBER) {
        let member = store
            .add_member(
                &NewMember {
                    account_number: AccountNumber::parse(&format!("MAIL-{m:06}"))
                        .map_err(|e| invalid(e.to_string()))?,
                    account_type: AccountType::IndividualFamily,
                    name: MemberName::parse("Benchmark Member")
                        .map_err(|e| invalid(e.to_string()))?,
                    email: EmailAddress::parse(&format!("bench-{m}@example.org"))
                        .map_err(|e| invalid(e.to_string()))?,
                    time_zone: "UTC".into(),
                },
                &audit,
            )
            .await?;
        let first = m * RECEIPTS_PER_MEMBER;
        for i in first..n.min(first + RECEIPTS_PER_MEMBER) {
            store
                .enqueue(
                    &NewNotification {
                        kind: "receipt".into(),
                        dedupe_key: format!("receipt:bench:{i}"),
                        member_id: member.id,
                        payload: payload.clone(),
                        expires_at: None,
                    },
                    audit.at,
                )
                .await?;
        }
    }
    Ok(())
}

/// Python's `smtplib` on one connection, `n` copies of `message` one after the other; returns
/// messages per second.
fn plain_client(port: u16, n: u32, message: &[u8], scratch: &Path) -> Result<f64, CliError> {
    const CLIENT: &str = r#"
import smtplib, sys, time
port, n, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
message = open(path, "rb").read()
s = smtplib.SMTP("127.0.0.1", port)
started = time.perf_counter()
for _ in range(n):
    s.sendmail("billing@example.org", ["bench-0@example.org"], message)
elapsed = time.perf_counter() - started
s.quit()
print(elapsed)
"#;
    let path = scratch.join("receipt.eml");
    std::fs::write(&path, message).map_err(|e| {
        CliError::new(
            exit::CANT_CREATE,
            format!("cannot write the sample message to {}: {e}", path.display()),
        )
    })?;
    let out = Command::new("python3")
        .args(["-c", CLIENT])
        .arg(port.to_string())
        .arg(n.to_string())
        .arg(&path)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            CliError::new(
                exit::UNAVAILABLE,
                format!("cannot run python3 for the plain SMTP client: {e}"),
            )
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    match text.trim().parse::<f64>() {
        Ok(seconds) if out.status.success() && seconds > 0.0 => Ok(f64::from(n) / seconds),
        _ => Err(CliError::internal(format!(
            "the plain SMTP client failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))),
    }
}

pub(super) fn print(ctx: &Context, results: &[MailResult]) -> Result<(), CliError> {
    if ctx.json {
        return output::json(results);
    }
    let mut t = Table::new(vec![
        "BACKEND",
        "RECEIPTS",
        "POOL",
        "BYTES",
        "LOAD S",
        "DELIVER S",
        "RECEIPTS/S",
        "PLAIN CLIENT/S",
        "OF PLAIN",
        "PEAK RSS MIB",
    ]);
    for r in results {
        t.row(vec![
            backend_name(r.backend).to_string(),
            r.receipts.to_string(),
            r.pool_size.to_string(),
            r.message_bytes.to_string(),
            format!("{:.2}", r.load_seconds),
            format!("{:.2}", r.deliver_seconds),
            format!("{:.0}", r.receipts_per_second),
            format!("{:.0}", r.plain_client_per_second),
            format!("{:.0} %", r.share_of_plain_client * 100.0),
            r.peak_rss_mib
                .map_or_else(|| "n/a".to_string(), |m| format!("{m:.1}")),
        ]);
    }
    say(t.render());
    say(
        "both rates to one local aiosmtpd that discards what it gets; the plain client is Python's smtplib on one connection, sending the same message",
    );
    Ok(())
}
