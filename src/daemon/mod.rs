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

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use serde::Serialize;
use tokio::sync::Notify;

use crate::clock::Clock;
use crate::config::Settings;
use crate::domain::attempt::KeyPolicy;
use crate::domain::decline::RetryPolicy;
use crate::engine::{Engine, EngineConfig, EngineError, PassReport};
use crate::health::Health;
use crate::notify::dispatcher::{DeliveryReport, Dispatcher};
use crate::notify::templates::Templates;
use crate::notify::{housekeeping, mailer, reminders};
use crate::processor::ProcessorError;
use crate::shutdown::Shutdown;
use crate::store::{self, OutcomePolicy, Store, StoreError};
use systemd::Notifier;

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
}

/// The mail loop's name in [`Health`].
pub const MAIL: &str = "mail";

impl Daemon {
    /// Opens the database (refusing a schema this binary does not match), the processor, the
    /// templates and the mail transport, and wires the engine and the dispatcher.
    pub async fn build(settings: Settings, clock: Arc<dyn Clock>) -> Result<Daemon, DaemonError> {
        let store = open_store(&settings, clock.now()).await?;
        let processor =
            crate::processor::open(&settings.processor, &settings.database.url, clock.clone())
                .await?;
        let health = Arc::new(Health::new());
        let engine = Engine::new(
            store.clone(),
            processor,
            clock.clone(),
            engine_config(&settings),
            outcome_policy(&settings),
        )
        .with_health(health.clone());
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
        let reminders = reminders::scan(self.store.as_ref(), &self.settings, now).await?;
        housekeeping::prune(self.store.as_ref(), &self.settings, now).await?;
        let mail = self.dispatcher.drain().await?;
        Ok(RunSummary {
            pass,
            reminders,
            mail,
        })
    }

    /// Runs until `stop` resolves; then stops claiming, lets what is in flight finish within
    /// `daemon.shutdown_grace`, and returns what the run did. Work still in flight when the
    /// grace runs out is left to its lease (settled by lookup) and reported as
    /// [`DaemonError::Grace`].
    pub async fn run_until_stopped(
        self,
        stop: impl Future<Output = ()> + Send,
    ) -> Result<RunSummary, DaemonError> {
        let shutdown = Shutdown::new();
        let wake = Arc::new(Notify::new());
        let grace = self.settings.daemon.shutdown_grace.as_std();
        tracing::info!(worker_id = self.worker_id(), backend = ?self.settings.database.url.backend(), "autopay starting");
        let _watchdog = watchdog::started(
            &self.notifier,
            &self.health,
            &self.settings,
            self.worker_id(),
            &[crate::engine::WORKER, MAIL],
        );
        let running = self.engine.run(shutdown.clone(), wake);
        let mailing = self.mail_loop(shutdown.clone());
        let both = async { tokio::join!(running, mailing) };
        tokio::pin!(both);
        let stopping = async {
            stop.await;
            tracing::info!("stop requested; finishing what is in flight");
            self.health.set_stopping();
            watchdog::stopping(&self.notifier, grace);
            shutdown.trigger();
            tokio::time::sleep(grace).await;
        };
        let (pass, (reminders, mail)) = tokio::select! {
            (pass, mail) = &mut both => (pass?, mail?),
            () = stopping => {
                tracing::error!("work still in flight after daemon.shutdown_grace; exiting, leases will be settled by lookup");
                return Err(DaemonError::Grace(format!(
                    "stopped with work in flight after daemon.shutdown_grace ({grace:?}); its leases expire and are settled by lookup"
                )));
            }
        };
        Ok(RunSummary {
            pass,
            reminders,
            mail,
        })
    }

    /// Delivers the outbox while the daemon runs: a pass every second while there is mail, the
    /// reminder scans once a minute, the outbox housekeeping once an hour.
    async fn mail_loop(&self, shutdown: Shutdown) -> Result<(u64, DeliveryReport), DaemonError> {
        let store = self.store.as_ref();
        let mut total = DeliveryReport::default();
        let mut written = 0;
        let mut last_scan: Option<Timestamp> = None;
        let mut last_prune: Option<Timestamp> = None;
        while !shutdown.is_triggered() {
            let now = self.clock.now();
            if last_prune.is_none_or(|t| now.duration_since(t) >= SignedDuration::from_hours(1)) {
                if let Err(e) = housekeeping::prune(store, &self.settings, now).await {
                    tracing::error!(error.message = %e, "outbox housekeeping failed; trying again in an hour");
                }
                last_prune = Some(now);
            }
            if last_scan.is_none_or(|t| now.duration_since(t) >= SignedDuration::from_mins(1)) {
                match reminders::scan(store, &self.settings, now).await {
                    Ok(n) => written += n,
                    Err(e) => {
                        tracing::error!(error.message = %e, "reminder scan failed; trying again")
                    }
                }
                last_scan = Some(now);
            }
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
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    () = shutdown.wait() => {}
                }
            }
        }
        Ok((written, total))
    }
}
