//! The worker loop: plans and charges, then sleeps until the earliest due work, a wake-up, or
//! at most `daemon.poll_interval`, so a payment that falls due is claimed promptly whatever
//! the periodic ticks do. Stopping stops claiming at once, even inside a long charge pipeline;
//! what is in flight finishes first.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use super::{Engine, EngineError, PassReport};
use crate::shutdown::Shutdown;

/// The worker loop's name in [`crate::health::Health`].
pub const WORKER: &str = "worker";

impl Engine {
    /// Runs until `shutdown` fires. A pass in flight (claimed payments included) finishes
    /// before the loop returns, within `daemon.shutdown_grace`.
    pub async fn run(
        &self,
        shutdown: Shutdown,
        wake: Arc<Notify>,
    ) -> Result<PassReport, EngineError> {
        let mut total = PassReport::default();
        let mut failures = 0u32;
        // The charge pipeline watches the same signal: a stop ends claiming at once.
        let this = Engine {
            stop: shutdown.clone(),
            ..self.clone()
        };
        while !shutdown.is_triggered() {
            let outcome = this.pass().await;
            // Alive, whatever the pass came to: a handled database error counts too.
            self.health.beat(WORKER);
            match outcome {
                Ok(pass) => {
                    self.health.pass_completed(self.clock.now());
                    failures = 0;
                    total.plan.add(&pass.plan);
                    total.charge.add(&pass.charge);
                    if pass.charge.claimed > 0 || pass.plan.planned > 0 {
                        // More may be due right away.
                        continue;
                    }
                }
                Err(e) => {
                    failures += 1;
                    tracing::error!(error.message = %e, error.cause_chain = ?e, failures, "worker pass failed; trying again");
                }
            }
            let sleep = this.until_next_work(failures).await;
            tokio::select! {
                () = tokio::time::sleep(sleep) => {}
                () = wake.notified() => {}
                () = shutdown.wait() => {}
            }
        }
        tracing::info!("worker stopped");
        Ok(total)
    }

    /// How long to sleep: until the earliest due work, at most the poll interval; longer after
    /// repeated failures (the database may be down).
    async fn until_next_work(&self, failures: u32) -> Duration {
        let poll = self.config.poll_interval;
        if failures > 0 {
            return (Duration::from_secs(1) * 2u32.saturating_pow(failures.min(6)))
                .min(poll.max(Duration::from_secs(1)));
        }
        match self.store.next_wakeup().await {
            Ok(Some(at)) => {
                let now = self.clock.now();
                if at <= now {
                    Duration::from_millis(50)
                } else {
                    Duration::try_from(at.duration_since(now))
                        .unwrap_or(poll)
                        .min(poll)
                }
            }
            Ok(None) => poll,
            Err(_) => poll,
        }
    }
}
