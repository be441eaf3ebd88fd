//! The dispatcher: claims pending notifications as leases (like payments), renders each from
//! its payload, sends it, and records what happened. The claim resolves each row's recipient to
//! the member's address at that moment, so a message queued before `member update --email` goes
//! to the new address.
//!
//! Delivery is at least once with one Message-ID per notification, `<{id}@{From domain}>`: a
//! crash between sending and marking sends the same message again, and a mail client shows it
//! once. What a send error means is decided by the mailer (`mailer::classify`, by the SMTP step
//! and code): a temporary failure retries on `email.retry_delays`; a refused address fails that
//! notification and flags the address as bouncing; another refusal of one message fails it
//! alone; a session-level refusal (greeting, TLS, authentication, sender, relay denied) fails
//! nothing: it records "mail paused" with its reason and retries later.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jiff::{SignedDuration, Timestamp};
use lettre::Message;
use lettre::message::{Mailbox, MultiPart};
use serde::Serialize;

use super::mailer::{Mail, Mailer, SendError};
use super::templates::{Branding, Templates};
use crate::clock::Clock;
use crate::config::Settings;
use crate::health::Health;
use crate::limiter::RateLimiter;
use crate::store::{Delivered, DeliveryOutcome, Notification, Outgoing, Store, StoreError};

/// The most delivery outcomes one grouped commit records.
const MAX_GROUP: usize = 64;

/// One delivery's outcome and how the pass counts it (`sent`, `retry`, `paused`, `failed`).
struct Counted {
    outcome: DeliveryOutcome,
    label: &'static str,
}

/// What one delivery pass did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DeliveryReport {
    pub claimed: u64,
    pub sent: u64,
    pub retrying: u64,
    pub failed: u64,
    /// Whether a session-level refusal paused mail during the pass.
    pub paused: bool,
}

impl DeliveryReport {
    pub fn add(&mut self, o: &DeliveryReport) {
        self.claimed += o.claimed;
        self.sent += o.sent;
        self.retrying += o.retrying;
        self.failed += o.failed;
        self.paused |= o.paused;
    }
}

/// Why the dispatcher could not be set up (exit 78).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DispatcherError(pub String);

pub struct Dispatcher {
    store: Arc<dyn Store>,
    mailer: Arc<dyn Mailer>,
    templates: Arc<Templates>,
    branding: Branding,
    clock: Arc<dyn Clock>,
    worker_id: String,
    from: Mailbox,
    reply_to: Option<Mailbox>,
    domain: String,
    retry_delays: Vec<Duration>,
    lease: Duration,
    batch: u32,
    limiter: RateLimiter,
    /// Where a pass reports after each message that its loop is alive (and under which name):
    /// a batch against a mail server that times out takes one `email.smtp.timeout` per
    /// message, far longer than the watchdog allows between two reports.
    health: Option<(Arc<Health>, &'static str)>,
}

impl Dispatcher {
    pub fn new(
        settings: &Settings,
        store: Arc<dyn Store>,
        mailer: Arc<dyn Mailer>,
        templates: Arc<Templates>,
        clock: Arc<dyn Clock>,
        worker_id: String,
    ) -> Result<Dispatcher, DispatcherError> {
        let from: Mailbox = settings.email.from.parse().map_err(|e| {
            DispatcherError(format!(
                "email.from {:?} is not a mailbox ({e}); write it like \"Member Billing <billing@example.org>\"",
                settings.email.from
            ))
        })?;
        let reply_to = if settings.email.reply_to.is_empty() {
            None
        } else {
            Some(settings.email.reply_to.parse::<Mailbox>().map_err(|e| {
                DispatcherError(format!(
                    "email.reply_to {:?} is not a mailbox ({e})",
                    settings.email.reply_to
                ))
            })?)
        };
        let domain = from.email.domain().to_string();
        let mut retry_delays: Vec<Duration> = settings
            .email
            .retry_delays
            .iter()
            .map(|d| d.as_std())
            .collect();
        if retry_delays.is_empty() {
            retry_delays.push(Duration::from_secs(300));
        }
        Ok(Dispatcher {
            store,
            mailer,
            templates,
            branding: Branding::from_settings(settings),
            clock,
            worker_id,
            from,
            reply_to,
            domain,
            retry_delays,
            lease: settings.daemon.lease.as_std(),
            batch: settings.daemon.batch_size,
            limiter: RateLimiter::new(settings.email.max_per_second),
            health: None,
        })
    }

    /// Reports to `health`, as loop `name`, after each message a pass handles.
    pub fn with_health(mut self, health: Arc<Health>, name: &'static str) -> Dispatcher {
        self.health = Some((health, name));
        self
    }

    /// The delay before attempt `attempts + 1`: the configured ones in turn, then the last one
    /// for ever (receipts and notices never expire).
    fn retry_at(&self, attempts: i64) -> Timestamp {
        let i = usize::try_from(attempts.max(1) - 1)
            .unwrap_or(usize::MAX)
            .min(self.retry_delays.len() - 1);
        let delay =
            SignedDuration::try_from(self.retry_delays[i]).unwrap_or(SignedDuration::from_hours(1));
        let now = self.clock.now();
        now.checked_add(delay).unwrap_or(now)
    }

    /// The message as it goes on the wire, headers and body: what `autopay bench` gives its
    /// plain SMTP client to send, so both rates move the same bytes.
    pub fn wire_bytes(&self, n: &Notification) -> Result<Vec<u8>, String> {
        Ok(self.build(n)?.message.formatted())
    }

    fn build(&self, n: &Notification) -> Result<Mail, String> {
        let rendered = self
            .templates
            .render(&n.kind, &n.payload, &self.branding)
            .map_err(|e| format!("cannot render: {e}"))?;
        let to: Mailbox = n
            .recipient
            .parse()
            .map_err(|e| format!("the recipient's address is not valid ({e})"))?;
        let now = self.clock.now();
        let date =
            UNIX_EPOCH + Duration::from_micros(u64::try_from(now.as_microsecond()).unwrap_or(0));
        let mut builder = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(rendered.subject)
            .message_id(Some(format!("<{}@{}>", n.id, self.domain)))
            .date(date.max(SystemTime::UNIX_EPOCH));
        if let Some(reply_to) = &self.reply_to {
            builder = builder.reply_to(reply_to.clone());
        }
        let message = builder
            .multipart(MultiPart::alternative_plain_html(
                rendered.text,
                rendered.html,
            ))
            .map_err(|e| format!("cannot build the message: {e}"))?;
        Ok(Mail {
            notification_id: n.id,
            kind: n.kind.clone(),
            message,
        })
    }

    /// Claims one batch and delivers it, up to the mailer's `in_flight` messages at once (over
    /// as many SMTP connections). Outcomes are recorded in grouped commits: what came back
    /// while the previous group was being written goes in the next one, so a slow commit does
    /// not hold the sends up and a fast one does not wait for company.
    pub async fn deliver_due(&self) -> Result<DeliveryReport, StoreError> {
        use futures_util::stream::{self, StreamExt, TryStreamExt};
        let mut report = DeliveryReport::default();
        let now = self.clock.now();
        let claimed = self
            .store
            .claim_notifications(&self.worker_id, now, self.lease, self.batch)
            .await?;
        report.claimed = claimed.len() as u64;
        // After a session-level refusal the rest of the batch waits too: the next send would be
        // refused the same way. Messages already in flight come back with their own answers.
        let session_refused: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);
        let (answered, mut to_record) = tokio::sync::mpsc::unbounded_channel::<(usize, Counted)>();
        // By index: a stream of borrowed items trips the compiler's lifetime inference.
        let sending = async {
            stream::iter(0..claimed.len())
                .map(|i| {
                    let answered = answered.clone();
                    let session_refused = &session_refused;
                    let claimed = &claimed;
                    async move {
                        let counted = self.outcome_of(&claimed[i], session_refused).await?;
                        // The recorder outlives every send; a closed channel means it failed,
                        // and its error is the one reported.
                        let _ = answered.send((i, counted));
                        Ok::<(), StoreError>(())
                    }
                })
                .buffer_unordered(self.mailer.in_flight().max(1))
                .try_collect::<()>()
                .await?;
            drop(answered);
            Ok::<(), StoreError>(())
        };
        let recording = async {
            let mut tally = DeliveryReport::default();
            let mut group: Vec<(usize, Counted)> = Vec::new();
            while let Some(first) = to_record.recv().await {
                group.push(first);
                while group.len() < MAX_GROUP {
                    match to_record.try_recv() {
                        Ok(next) => group.push(next),
                        Err(_) => break,
                    }
                }
                let done: Vec<Delivered> = group
                    .iter()
                    .map(|(i, c)| Delivered {
                        lease: claimed[*i].lease,
                        outcome: c.outcome.clone(),
                    })
                    .collect();
                let recorded = self
                    .store
                    .finish_notifications(&done, self.clock.now())
                    .await?;
                metrics::histogram!(crate::metrics::MAIL_GROUP_COMMIT).record(done.len() as f64);
                for ((i, counted), recorded) in group.drain(..).zip(recorded) {
                    if !recorded {
                        tracing::warn!(notification_id = %claimed[i].notification.id, "notification lease taken over; its new holder records it");
                    }
                    match counted.label {
                        "sent" => tally.sent += 1,
                        "failed" => tally.failed += 1,
                        _ => tally.retrying += 1,
                    }
                }
                if let Some((health, name)) = &self.health {
                    health.beat(name);
                }
            }
            Ok::<DeliveryReport, StoreError>(tally)
        };
        let ((), tally) = tokio::try_join!(sending, recording)?;
        report.add(&tally);
        let refused = session_refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some();
        report.paused = refused;
        if report.sent > 0 && !refused {
            self.store.set_mail_pause(None, self.clock.now()).await?;
        }
        Ok(report)
    }

    /// Delivers one claimed notification and says what came of it (recorded by the caller).
    async fn outcome_of(
        &self,
        item: &Outgoing,
        session_refused: &std::sync::Mutex<Option<String>>,
    ) -> Result<Counted, StoreError> {
        let id = item.notification.id;
        let refused_before = || {
            session_refused
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
        };
        let outcome = if let Some(reason) = refused_before() {
            DeliveryOutcome::Retry {
                error: reason,
                at: self.retry_at(item.notification.attempts),
            }
        } else {
            match self.build(&item.notification) {
                Err(error) => {
                    tracing::error!(notification_id = %id, kind = %item.notification.kind, error = %error, "notification cannot be sent");
                    DeliveryOutcome::Failed {
                        error,
                        bounce: false,
                    }
                }
                Ok(mail) => {
                    self.limiter.acquire().await;
                    // Refused while this one waited for its turn: it waits too.
                    match refused_before() {
                        Some(reason) => DeliveryOutcome::Retry {
                            error: reason,
                            at: self.retry_at(item.notification.attempts),
                        },
                        None => self.send(item, &mail, session_refused).await?,
                    }
                }
            }
        };
        let label = match &outcome {
            DeliveryOutcome::Sent => "sent",
            DeliveryOutcome::Retry { .. } if refused_before().is_some() => "paused",
            DeliveryOutcome::Retry { .. } => "retry",
            DeliveryOutcome::Failed { .. } => "failed",
        };
        metrics::counter!(crate::metrics::MAIL, "outcome" => label).increment(1);
        Ok(Counted { outcome, label })
    }

    /// Sends one built message and says what its answer means.
    async fn send(
        &self,
        item: &Outgoing,
        mail: &Mail,
        session_refused: &std::sync::Mutex<Option<String>>,
    ) -> Result<DeliveryOutcome, StoreError> {
        let id = item.notification.id;
        Ok(match self.mailer.send(mail).await {
            Ok(()) => DeliveryOutcome::Sent,
            Err(SendError::Transient(e)) => {
                tracing::warn!(notification_id = %id, error = %e, "temporary mail failure; will retry");
                DeliveryOutcome::Retry {
                    error: e,
                    at: self.retry_at(item.notification.attempts),
                }
            }
            Err(SendError::Recipient(e)) => {
                tracing::warn!(notification_id = %id, error = %e, "recipient refused; the address is flagged as bouncing");
                DeliveryOutcome::Failed {
                    error: e,
                    bounce: true,
                }
            }
            Err(SendError::Rejected(e)) => {
                tracing::error!(notification_id = %id, error = %e, "message refused by the mail server");
                DeliveryOutcome::Failed {
                    error: e,
                    bounce: false,
                }
            }
            Err(SendError::Session(e)) => {
                let first = {
                    let mut refused = session_refused.lock().unwrap_or_else(|p| p.into_inner());
                    let first = refused.is_none();
                    refused.get_or_insert_with(|| e.clone());
                    first
                };
                if first {
                    tracing::error!(error = %e, "mail paused: the mail server refused the session; fix the email settings, nothing is lost");
                    self.store
                        .set_mail_pause(Some(&e), self.clock.now())
                        .await?;
                }
                DeliveryOutcome::Retry {
                    error: e,
                    at: self.retry_at(item.notification.attempts),
                }
            }
        })
    }

    /// Delivers until a pass claims nothing (what waits for a retry stays pending).
    pub async fn drain(&self) -> Result<DeliveryReport, StoreError> {
        let mut total = DeliveryReport::default();
        loop {
            let pass = self.deliver_due().await?;
            total.add(&pass);
            if pass.claimed == 0 || pass.paused {
                return Ok(total);
            }
        }
    }
}
