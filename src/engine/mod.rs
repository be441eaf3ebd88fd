//! The work: the planner turns due schedules into payments, the charger claims due payments
//! and charges them exactly once, and the worker loop runs both until told to stop.
//!
//! The engine talks only to the [`Store`], [`Processor`] and [`Clock`] traits. Each step is a
//! plain async function that reports what it did, so tests (and `run --drain`) call it until it
//! says nothing is left, instead of sleeping.

mod charger;
mod committer;
mod operator;
mod planner;
mod reconcile;
mod worker;

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

pub use charger::ChargeReport;
pub use operator::RetryOutcome;
pub use planner::{PlanReport, plan_if_due, plan_step};
pub use reconcile::{ReconcileError, RestoreCheck};
pub use worker::WORKER;

use crate::clock::Clock;
use crate::domain::schedule::Misfire;
use crate::health::Health;
use crate::limiter::RateLimiter;
use crate::processor::Processor;
use crate::shutdown::Shutdown;
use crate::store::{Audit, OutcomePolicy, Store, StoreError};

/// Why an engine step stopped.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A test hook stopped the worker between the processor's answer and the record, as a
    /// crash would.
    #[error("crash injected after the processor answered")]
    InjectedCrash,
}

/// The settings the engine works by.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub concurrency: u32,
    pub batch_size: u32,
    pub lease: Duration,
    pub processor_timeout: Duration,
    pub poll_interval: Duration,
    pub misfire: Misfire,
    pub max_lateness: Duration,
    pub breaker_window: Duration,
    pub breaker_min_attempts: u32,
    pub breaker_decline_share: f64,
    pub breaker_error_share: f64,
    pub max_requests_per_second: u32,
    pub shutdown_grace: Duration,
}

/// A hook deciding, after each processor answer, whether to "crash" before recording it.
pub type CrashHook = Arc<dyn Fn() -> bool + Send + Sync>;

/// One worker: plans and charges against one store and one processor. Cloning shares
/// everything (the spawned charge tasks hold clones).
#[derive(Clone)]
pub struct Engine {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) processor: Arc<dyn Processor>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) config: EngineConfig,
    pub(crate) policy: OutcomePolicy,
    pub(crate) worker_id: String,
    pub(crate) limiter: Arc<RateLimiter>,
    pub(crate) crash_hook: Option<CrashHook>,
    /// Where the loop reports that it is alive (the watchdog and readiness read it).
    pub(crate) health: Arc<Health>,
    /// Once triggered, the charge pipeline claims nothing more (what is in flight finishes).
    pub(crate) stop: Shutdown,
    /// Writes the attempts' steps of every charge in flight, many to a transaction, in as
    /// many transactions at once as the database writes: 1 on SQLite, `daemon.concurrency` on
    /// PostgreSQL.
    pub(crate) committer: Arc<committer::Committer>,
}

/// What one pass of planning and charging did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PassReport {
    pub plan: PlanReport,
    pub charge: ChargeReport,
}

impl Engine {
    pub fn new(
        store: Arc<dyn Store>,
        processor: Arc<dyn Processor>,
        clock: Arc<dyn Clock>,
        config: EngineConfig,
        policy: OutcomePolicy,
    ) -> Engine {
        let limiter = Arc::new(RateLimiter::new(config.max_requests_per_second));
        // A processor whose one call may be several requests (Stripe's paged lists) counts
        // each request after the first against the same limit.
        processor.share_limiter(limiter.clone());
        // SQLite has one writer: one write at a time, as large as it can be. PostgreSQL
        // overlaps the round trips of several.
        let writers = match store.backend() {
            crate::config::Backend::Sqlite => 1,
            crate::config::Backend::Postgres => config.concurrency.max(1) as usize,
        };
        Engine {
            store,
            processor,
            clock,
            config,
            policy,
            worker_id: worker_id(),
            limiter,
            crash_hook: None,
            health: Arc::new(Health::new()),
            stop: Shutdown::new(),
            committer: Arc::new(committer::Committer::new(writers)),
        }
    }

    /// Reports the loop's liveness and passes to `health` (shared with the daemon).
    pub fn with_health(mut self, health: Arc<Health>) -> Engine {
        self.health = health;
        self
    }

    /// Shares one rate limiter between engines of one process (docs/architecture.md: per process).
    pub fn with_limiter(mut self, limiter: Arc<RateLimiter>) -> Engine {
        self.limiter = limiter;
        self
    }

    pub fn with_worker_id(mut self, id: impl Into<String>) -> Engine {
        self.worker_id = id.into();
        self
    }

    /// Test hook: "crash" between the processor's answer and its record when `hook` says so.
    pub fn with_crash_hook(mut self, hook: CrashHook) -> Engine {
        self.crash_hook = Some(hook);
        self
    }

    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub(crate) fn audit(&self) -> Audit {
        Audit {
            actor: self.worker_id.clone(),
            at: self.clock.now(),
        }
    }

    /// Plans what is due and charges what is due, once.
    pub async fn pass(&self) -> Result<PassReport, EngineError> {
        let plan = self.plan_due().await?;
        let charge = self.charge_due().await?;
        Ok(PassReport { plan, charge })
    }

    /// Does all work due now: passes until one finds nothing to plan and nothing to claim.
    pub async fn drain(&self) -> Result<PassReport, EngineError> {
        let mut total = PassReport::default();
        loop {
            let pass = self.pass().await?;
            let did_nothing = pass.plan.planned == 0
                && pass.plan.missed == 0
                && pass.plan.raced == 0
                && pass.charge.claimed == 0;
            total.plan.add(&pass.plan);
            total.charge.add(&pass.charge);
            if did_nothing {
                // Work may still be due that another worker holds locked for a moment.
                let now = self.clock.now();
                match self.store.next_wakeup().await? {
                    Some(at) if at <= now && !self.charging_paused().await? => {
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    }
                    _ => return Ok(total),
                }
            }
        }
    }
}

impl Engine {
    async fn charging_paused(&self) -> Result<bool, EngineError> {
        Ok(self.store.control().await?.charging_paused.is_some())
    }
}

/// "host-pid-suffix": names every lease and event this process writes.
pub fn worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".to_string());
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}-{}", std::process::id(), &suffix[..6])
}
