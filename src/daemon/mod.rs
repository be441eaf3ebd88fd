//! The daemon: the one place that wires a running autopay (the store, the processor, the charge
//! engine, the mail dispatcher) from the settings, and runs it until it is told to stop.
//!
//! [`Daemon::build`] opens everything and checks it can work; [`Daemon::run_until_stopped`]
//! runs the worker loop and the mail loop until the stop future resolves, then lets what is in
//! flight finish within `daemon.shutdown_grace`; [`Daemon::drain`] does all work due now and
//! returns (`autopay run --drain`). Signals are the caller's: the stop is a future, so tests stop
//! a daemon the way a SIGTERM does. Under systemd it says READY, STATUS, WATCHDOG and STOPPING
//! ([`systemd`], [`watchdog`]).

pub mod systemd;
pub mod watchdog;
pub mod webhooks;

pub mod ticks;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use jiff::Timestamp;
use serde::Serialize;
use tokio::sync::Notify;

use crate::clock::Clock;
use crate::config::Settings;
use crate::domain::attempt::KeyPolicy;
use crate::domain::cron::CronRule;
use crate::domain::decline::RetryPolicy;
use crate::engine::{Engine, EngineConfig, EngineError, PassReport};
use crate::health::Health;
use crate::http::HttpState;
use crate::notify::dispatcher::{DeliveryReport, Dispatcher};
use crate::notify::templates::Templates;
use crate::notify::{housekeeping, mailer, reminders};
use crate::processor::ProcessorError;
use crate::shutdown::Shutdown;
use crate::store::{self, OutcomePolicy, Store, StoreError};
use systemd::Notifier;
use ticks::{Body, TickRecord, Ticks};

/// Why the daemon could not start, or how it stopped badly.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Processor(#[from] ProcessorError),
    /// Settings or templates that cannot work (exit 78).
    #[error("{0}")]
    Config(String),
    /// Work was still in flight when `daemon.shutdown_grace` ran out (exit 70).
    #[error("{0}")]
    Grace(String),
}

/// Refuses to start when active cards were saved with another processor, or in the other mode
/// of this one (a Stripe test card under a live key): none of them could be charged, and each
/// payment on them would fail for a reason the member cannot fix.
pub async fn refuse_foreign_cards(
    store: &dyn Store,
    processor: &dyn crate::processor::Processor,
) -> Result<(), DaemonError> {
    let foreign: Vec<String> = store
        .card_processors()
        .await?
        .into_iter()
        .filter(|g| {
            g.processor != processor.name()
                || (g.mode.is_some() && g.mode.as_deref() != processor.mode())
        })
        .map(|g| match g.mode {
            Some(mode) => format!("{} {} ({mode} mode)", g.cards, g.processor),
            None => format!("{} {}", g.cards, g.processor),
        })
        .collect();
    if foreign.is_empty() {
        return Ok(());
    }
    Err(DaemonError::Config(format!(
        "the database holds active cards this processor cannot charge: {} card(s), and processor.kind is {}{}; set processor.kind (and the key's mode) back to the one those cards were saved with, or have those members add their cards again and remove the old ones (`autopay card remove`)",
        foreign.join(", "),
        processor.name(),
        processor
            .mode()
            .map(|m| format!(" ({m} mode)"))
            .unwrap_or_default()
    )))
}

/// What a run did: its passes, the reminders it wrote and the mail it delivered.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunSummary {
    #[serde(flatten)]
    pub pass: PassReport,
    pub reminders: u64,
    pub mail: DeliveryReport,
}

/// The engine's settings.
pub fn engine_config(s: &Settings) -> EngineConfig {
    EngineConfig {
        concurrency: s.daemon.concurrency,
        batch_size: s.daemon.batch_size,
        lease: s.daemon.lease.as_std(),
        processor_timeout: s.processor.timeout.as_std(),
        poll_interval: s.daemon.poll_interval.as_std(),
        misfire: s.payments.misfire,
        max_lateness: s.payments.max_lateness.as_std(),
        breaker_window: s.payments.breaker_window.as_std(),
        breaker_min_attempts: s.payments.breaker_min_attempts,
        breaker_decline_share: s.payments.breaker_decline_share,
        breaker_error_share: s.payments.breaker_error_share,
        max_requests_per_second: s.processor.max_requests_per_second,
        shutdown_grace: s.daemon.shutdown_grace.as_std(),
    }
}

/// How outcomes move a payment on (retries, suspension, the key window, limits).
pub fn outcome_policy(s: &Settings) -> OutcomePolicy {
    OutcomePolicy {
        retry: RetryPolicy::new(s.payments.retry_delays.iter().map(|d| d.as_std()).collect()),
        suspend_after: s.payments.suspend_after,
        keys: key_policy(s),
        max_amount_individual_family: s.payments.max_amount_individual_family,
        max_amount_employer_group: s.payments.max_amount_employer_group,
        min_charge: match s.processor.kind {
            crate::config::ProcessorKind::Simulated => |_| None,
            crate::config::ProcessorKind::Stripe => crate::processor::stripe::minimum_charge,
        },
        statement_descriptor_suffix: (s.processor.kind == crate::config::ProcessorKind::Stripe
            && !s.processor.stripe.statement_descriptor_suffix.is_empty())
        .then(|| s.processor.stripe.statement_descriptor_suffix.clone()),
    }
}

/// The timings of the unknown-outcome rule.
pub fn key_policy(s: &Settings) -> KeyPolicy {
    KeyPolicy {
        key_retention: s.processor.key_retention.as_std(),
        timeout: s.processor.timeout.as_std(),
        lease: s.daemon.lease.as_std(),
        settle_delay: s.processor.settle_delay.as_std(),
        lookup_window: s.processor.lookup_window.as_std(),
        max_unknown_cycles: s.processor.max_unknown_cycles,
    }
}

/// Opens the database a run works on. A default SQLite file that did not exist is created and
/// migrated (the quick start); any other database must be migrated with `autopay migrate`, and
/// one whose schema this binary does not match is refused (78).
pub async fn open_store(settings: &Settings, now: Timestamp) -> Result<Arc<dyn Store>, StoreError> {
    let url = &settings.database.url;
    let fresh = url.sqlite_path().is_some_and(|p| !p.exists());
    let store = store::open(url, settings.database.max_connections).await?;
    if fresh {
        let report = store.migrate(now).await?;
        tracing::info!(
            schema_version = report.schema_version,
            "created and migrated a new SQLite database"
        );
    }
    store::require_current_schema(store.as_ref()).await?;
    Ok(store)
}

/// The outbox side of a run: the dispatcher over the configured transport and templates.
fn dispatcher(
    settings: &Settings,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    worker_id: &str,
) -> Result<Dispatcher, DaemonError> {
    let dir = (!settings.email.templates.is_empty())
        .then(|| std::path::PathBuf::from(&settings.email.templates));
    let templates = Templates::load(dir.as_deref())
        .map_err(|e| DaemonError::Config(format!("email.templates: {e}")))?;
    let mailer =
        mailer::from_settings(&settings.email).map_err(|e| DaemonError::Config(e.to_string()))?;
    Dispatcher::new(
        settings,
        store,
        Arc::from(mailer),
        Arc::new(templates),
        clock,
        worker_id.to_string(),
    )
    .map_err(|e| DaemonError::Config(e.to_string()))
}

/// A running autopay's parts, wired.
pub struct Daemon {
    settings: Settings,
    clock: Arc<dyn Clock>,
    store: Arc<dyn Store>,
    engine: Engine,
    dispatcher: Dispatcher,
    /// Every loop reports here; the watchdog and readiness read it.
    health: Arc<Health>,
    /// Tells systemd how the run goes (does nothing outside systemd).
    notifier: Arc<Notifier>,
    /// The Stripe adapter, for `POST /webhooks/stripe`, when processor.kind = "stripe".
    stripe: Option<Arc<crate::processor::stripe::StripeProcessor>>,
}

/// The mail loop's name in [`Health`].
pub const MAIL: &str = "mail";
/// The periodic jobs' names (in logs, `/readyz` and `autopay status`).
pub const PLANNER: &str = "planner";
pub const REMINDERS: &str = "reminders";
pub const HOUSEKEEPING: &str = "housekeeping";
/// How far this host's clock may be from the database's before `run` warns.
pub const MAX_SKEW: Duration = Duration::from_secs(5);

impl Daemon {
    /// Opens the database (refusing a schema this binary does not match), the processor, the
    /// templates and the mail transport, and wires the engine and the dispatcher.
    pub async fn build(settings: Settings, clock: Arc<dyn Clock>) -> Result<Daemon, DaemonError> {
        let store = open_store(&settings, clock.now()).await?;
        let installation = store
            .control()
            .await
            .map_err(DaemonError::from)?
            .installation_id;
        // Stripe's webhooks need the adapter itself, beside the engine's view of it.
        let (processor, stripe) = match settings.processor.kind {
            crate::config::ProcessorKind::Stripe => {
                let stripe = crate::processor::open_stripe(&settings.processor, installation)?;
                (
                    stripe.clone() as Arc<dyn crate::processor::Processor>,
                    Some(stripe),
                )
            }
            crate::config::ProcessorKind::Simulated => (
                crate::processor::open(
                    &settings.processor,
                    &settings.database.url,
                    clock.clone(),
                    installation,
                )
                .await?,
                None,
            ),
        };
        refuse_foreign_cards(store.as_ref(), processor.as_ref()).await?;
        let health = Arc::new(Health::new());
        let engine = Engine::new(
            store.clone(),
            processor,
            clock.clone(),
            engine_config(&settings),
            outcome_policy(&settings),
        )
        .with_health(health.clone());
        // A restored database would charge again what the processor charged after its
        // backup: refuse it until `autopay reconcile` has run.
        let check = engine.restore_check().await?;
        if let Some(refusal) = check.refusal() {
            return Err(DaemonError::Config(refusal));
        }
        if let crate::engine::RestoreCheck::Unchecked { why } = check {
            return Err(DaemonError::Processor(ProcessorError::Unavailable(
                format!(
                    "cannot compare this database with the processor's recent charges ({why}); autopay does not charge from a database it cannot check, so it starts once the processor answers"
                ),
            )));
        }
        let dispatcher = dispatcher(&settings, store.clone(), clock.clone(), engine.worker_id())?
            .with_health(health.clone(), MAIL);
        Ok(Daemon {
            settings,
            clock,
            store,
            engine,
            dispatcher,
            health,
            notifier: Arc::new(Notifier::from_env()),
            stripe,
        })
    }

    /// Notifies `notifier` instead of the service manager named by the environment.
    pub fn with_notifier(mut self, notifier: Notifier) -> Daemon {
        self.notifier = Arc::new(notifier);
        self
    }

    /// What the loops report about themselves.
    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The id every lease and event of this process carries.
    pub fn worker_id(&self) -> &str {
        self.engine.worker_id()
    }

    /// Does all work due now (plans, charges, settles, scans, delivers), then returns.
    pub async fn drain(&self) -> Result<RunSummary, DaemonError> {
        let pass = self.engine.drain().await?;
        let now = self.clock.now();
        reminders::refresh_expiring(
            self.store.as_ref(),
            self.engine.processor.as_ref(),
            &self.engine.limiter,
            &self.settings,
            now,
        )
        .await?;
        let reminders = reminders::scan(self.store.as_ref(), &self.settings, now).await?;
        housekeeping::prune(self.store.as_ref(), &self.settings, now).await?;
        let mail = self.dispatcher.drain().await?;
        Ok(RunSummary {
            pass,
            reminders,
            mail,
        })
    }

    /// Runs until `stop` resolves: the worker loop, the mail loop, the periodic jobs, the
    /// wake-ups and the health and metrics server. Then it stops claiming, lets what is in
    /// flight finish within `daemon.shutdown_grace`, and returns what the run did. Work still in
    /// flight when the grace runs out is left to its lease (settled by lookup) and reported as
    /// [`DaemonError::Grace`].
    pub async fn run_until_stopped(
        self,
        stop: impl Future<Output = ()> + Send,
    ) -> Result<RunSummary, DaemonError> {
        let shutdown = Shutdown::new();
        // One wake-up each, so that a change noticed while a loop is busy is kept for it.
        let work_wake = Arc::new(Notify::new());
        let mail_wake = Arc::new(Notify::new());
        let grace = self.settings.daemon.shutdown_grace.as_std();
        let listener = crate::http::bind(self.settings.http.listen)
            .await
            .map_err(DaemonError::Config)?;
        if let Ok(address) = listener.local_addr() {
            tracing::info!(%address, "serving /healthz, /readyz and /metrics");
        }
        self.check_clock().await;
        let written = Arc::new(AtomicU64::new(0));
        let ticks = Ticks::start(
            self.jobs(work_wake.clone(), written.clone()),
            self.clock.clone(),
        )
        .await
        .map_err(DaemonError::Config)?;
        let http = Arc::new(HttpState {
            store: self.store.clone(),
            health: self.health.clone(),
            ticks: Some(ticks.record().clone()),
            clock: self.clock.clone(),
            ready_grace: self.settings.http.ready_grace.as_std(),
            tick_alarm: self.settings.daemon.tick_alarm.as_std(),
            metrics: crate::metrics::install(),
            webhooks: self.stripe.clone().map(|processor| {
                Arc::new(webhooks::Webhooks {
                    store: self.store.clone(),
                    processor,
                    clock: self.clock.clone(),
                    policy: outcome_policy(&self.settings),
                    lease: self.settings.daemon.lease.as_std(),
                    wake: work_wake.clone(),
                })
            }),
        });
        tracing::info!(worker_id = self.worker_id(), backend = ?self.settings.database.url.backend(), "autopay starting");
        let _watchdog = watchdog::started(
            &self.notifier,
            &self.health,
            &self.settings,
            self.worker_id(),
            &[crate::engine::WORKER, MAIL],
        );
        let record = ticks.record().clone();
        let serving = crate::http::serve(listener, http, shutdown.clone());
        let alarms = self.tick_alarms(record, shutdown.clone());
        let watching = self.watch(work_wake.clone(), mail_wake.clone(), shutdown.clone());
        let running = self.engine.run(shutdown.clone(), work_wake.clone());
        let mailing = self.mail_loop(shutdown.clone(), mail_wake.clone());
        let all = async {
            let (pass, mail, (), (), ()) =
                tokio::join!(running, mailing, watching, serving, alarms);
            // The scheduler does not wait for a job that is running; Ticks::stop does.
            ticks.stop().await;
            (pass, mail)
        };
        tokio::pin!(all);
        let stopping = async {
            stop.await;
            tracing::info!("stop requested; finishing what is in flight");
            self.health.set_stopping();
            watchdog::stopping(&self.notifier, grace);
            shutdown.trigger();
            tokio::time::sleep(grace).await;
        };
        let (pass, mail) = tokio::select! {
            (pass, mail) = &mut all => (pass?, mail?),
            () = stopping => {
                tracing::error!("work still in flight after daemon.shutdown_grace; exiting, leases will be settled by lookup");
                return Err(DaemonError::Grace(format!(
                    "stopped with work in flight after daemon.shutdown_grace ({grace:?}); its leases expire and are settled by lookup"
                )));
            }
        };
        Ok(RunSummary {
            pass,
            reminders: written.load(Ordering::Relaxed),
            mail,
        })
    }

    /// The periodic jobs: the planner as a backstop (the worker loop plans on every pass), the
    /// reminder and card-expiry scans, and the housekeeping. Each calls one library function
    /// and logs what fails; the next run tries again.
    fn jobs(
        &self,
        work_wake: Arc<Notify>,
        written: Arc<AtomicU64>,
    ) -> Vec<(&'static str, CronRule, Body)> {
        let d = &self.settings.daemon;
        let engine = self.engine.clone();
        let planner: Body = Arc::new(move || {
            let (engine, wake) = (engine.clone(), work_wake.clone());
            Box::pin(async move {
                match engine.plan_due().await {
                    Ok(report) if report.planned > 0 => wake.notify_one(),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::error!(error.message = %e, job = PLANNER, "periodic job failed; it runs again at its next time")
                    }
                }
            })
        });
        let (store, settings, clock, processor, limiter) = (
            self.store.clone(),
            Arc::new(self.settings.clone()),
            self.clock.clone(),
            self.engine.processor.clone(),
            self.engine.limiter.clone(),
        );
        let scans: Body = Arc::new(move || {
            let (store, settings, clock, written, processor, limiter) = (
                store.clone(),
                settings.clone(),
                clock.clone(),
                written.clone(),
                processor.clone(),
                limiter.clone(),
            );
            Box::pin(async move {
                if let Err(e) = reminders::refresh_expiring(
                    store.as_ref(),
                    processor.as_ref(),
                    &limiter,
                    &settings,
                    clock.now(),
                )
                .await
                {
                    tracing::error!(error.message = %e, job = REMINDERS, "reading expiring cards back from the processor failed; their notices go as before");
                }
                match reminders::scan(store.as_ref(), &settings, clock.now()).await {
                    Ok(n) => {
                        written.fetch_add(n, Ordering::Relaxed);
                    }
                    Err(e) => {
                        tracing::error!(error.message = %e, job = REMINDERS, "periodic job failed; it runs again at its next time")
                    }
                }
            })
        });
        let (store, settings, clock) = (
            self.store.clone(),
            Arc::new(self.settings.clone()),
            self.clock.clone(),
        );
        let housekeeping: Body = Arc::new(move || {
            let (store, settings, clock) = (store.clone(), settings.clone(), clock.clone());
            Box::pin(async move {
                if let Err(e) = housekeeping::prune(store.as_ref(), &settings, clock.now()).await {
                    tracing::error!(error.message = %e, job = HOUSEKEEPING, "periodic job failed; it runs again at its next time");
                }
            })
        });
        vec![
            (
                PLANNER,
                d.planner_cron.clone(),
                self.on_record(PLANNER, planner),
            ),
            (
                REMINDERS,
                d.reminders_cron.clone(),
                self.on_record(REMINDERS, scans),
            ),
            (
                HOUSEKEEPING,
                d.housekeeping_cron.clone(),
                self.on_record(HOUSEKEEPING, housekeeping),
            ),
        ]
    }

    /// A job's body that also records its run in the database, where `autopay status` (another
    /// process) reads it.
    fn on_record(&self, name: &'static str, body: Body) -> Body {
        let (store, clock, worker) = (
            self.store.clone(),
            self.clock.clone(),
            self.worker_id().to_string(),
        );
        Arc::new(move || {
            let (store, clock, worker, body) =
                (store.clone(), clock.clone(), worker.clone(), body.clone());
            Box::pin(async move {
                body().await;
                if let Err(e) = store.record_job_run(name, &worker, clock.now()).await {
                    tracing::warn!(error.message = %e, job = name, "cannot record the periodic job's run");
                }
            })
        })
    }

    /// Logs an error, once per missed fire time, when a periodic job has not run for
    /// `daemon.tick_alarm` after it should have (readiness fails meanwhile, naming it).
    async fn tick_alarms(&self, record: Arc<TickRecord>, shutdown: Shutdown) {
        let alarm = self.settings.daemon.tick_alarm.as_std();
        let every = (alarm / 4).clamp(Duration::from_secs(1), Duration::from_secs(30));
        let mut told: std::collections::BTreeSet<(&'static str, jiff::Timestamp)> =
            Default::default();
        while !shutdown.is_triggered() {
            for stale in record.stale(self.clock.now(), alarm) {
                if told.insert((stale.job, stale.due)) {
                    tracing::error!(job = stale.job, due = %stale.due, last_run = ?stale.last_run, "a periodic job missed its run by more than daemon.tick_alarm; /readyz fails until it runs");
                }
            }
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = shutdown.wait() => {}
            }
        }
    }

    /// Warns when this host's clock and the database's differ by more than [`MAX_SKEW`]: every
    /// lease and due time is stamped by the host, and hosts must agree.
    async fn check_clock(&self) {
        match self.store.database_clock().await {
            Ok(Some(theirs)) => {
                let ours = self.clock.now();
                let skew = ours.duration_since(theirs).abs();
                if skew
                    > jiff::SignedDuration::try_from(MAX_SKEW).unwrap_or(jiff::SignedDuration::MAX)
                {
                    tracing::warn!(host = %ours, database = %theirs, skew_seconds = skew.as_secs(), "this host's clock and the database's differ by more than 5s; keep every host in sync (NTP): leases and due times are stamped by each host");
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error.message = %e, "cannot read the database's clock to compare it with this host's")
            }
        }
    }

    /// How long the mail loop may sleep: until the next notification is due, at most
    /// `daemon.poll_interval` (and a second after an error, the database may be down).
    async fn until_next_mail(&self) -> Duration {
        let poll = self.settings.daemon.poll_interval.as_std();
        match self.store.next_mail_due().await {
            Ok(Some(at)) => {
                let now = self.clock.now();
                if at <= now {
                    Duration::from_millis(100)
                } else {
                    Duration::try_from(at.duration_since(now))
                        .unwrap_or(poll)
                        .min(poll)
                }
            }
            Ok(None) => poll,
            Err(_) => poll.min(Duration::from_secs(1)),
        }
    }

    /// Wakes the loops when another process or host writes, until `shutdown`: a payment added
    /// by the command line is claimed within a second, not at the next poll. A lost connection
    /// to the database is retried every second; meanwhile the loops still poll.
    async fn watch(&self, work: Arc<Notify>, mail: Arc<Notify>, shutdown: Shutdown) {
        let changed = move || {
            work.notify_one();
            mail.notify_one();
        };
        while !shutdown.is_triggered() {
            match self.store.watch(&changed, &shutdown).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(error.message = %e, "cannot watch the database for new work; polling meanwhile");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        () = shutdown.wait() => return,
                    }
                }
            }
        }
    }

    /// Delivers the outbox while the daemon runs: passes while there is mail, then a sleep until
    /// the next notification is due or a wake-up (a change written by this process or another),
    /// at most `daemon.poll_interval`.
    async fn mail_loop(
        &self,
        shutdown: Shutdown,
        wake: Arc<Notify>,
    ) -> Result<DeliveryReport, DaemonError> {
        let mut total = DeliveryReport::default();
        while !shutdown.is_triggered() {
            let idle = match self.dispatcher.deliver_due().await {
                Ok(pass) => {
                    total.add(&pass);
                    pass.claimed == 0
                }
                Err(e) => {
                    tracing::error!(error.message = %e, "mail pass failed; trying again");
                    true
                }
            };
            self.health.beat(MAIL);
            if idle {
                let sleep = self.until_next_mail().await;
                tokio::select! {
                    () = tokio::time::sleep(sleep) => {}
                    () = wake.notified() => {}
                    () = shutdown.wait() => {}
                }
            }
        }
        Ok(total)
    }
}
