//! The periodic jobs: the planner as a backstop, the reminder and card-expiry scans, and the
//! housekeeping, each run by tokio-cron-scheduler from a six-field UTC cron expression
//! (`daemon.planner_cron`, `daemon.reminders_cron`, `daemon.housekeeping_cron`).
//!
//! A job only calls one library function; the database is the truth, so a tick that fires twice
//! or not at all changes nothing. The crate's known limits shape how it is used here: UTC
//! expressions only (its time-zone jobs drift across DST changes), its in-memory store only (its
//! persisted stores do not resume after a restart, and every host sharing one would fire), our
//! own shutdown (its `shutdown()` does not wait for a job that is running), and an alarm when a
//! job stops firing (repeated jobs can stop under load): [`TickRecord::stale`] names a job whose
//! last run is older than its previous scheduled fire time plus `daemon.tick_alarm`.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::Timestamp;
use tokio_cron_scheduler::{Job, JobScheduler};

use crate::domain::cron::CronRule;

/// What the ticks remember: each job's rule and last run, and when they started, for the alarm.
#[derive(Debug)]
pub struct TickRecord {
    started: Timestamp,
    jobs: Mutex<BTreeMap<&'static str, (CronRule, Option<Timestamp>)>>,
}

/// One job that has not run when it should have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stale {
    pub job: &'static str,
    /// The fire time it missed.
    pub due: Timestamp,
    pub last_run: Option<Timestamp>,
}

impl TickRecord {
    pub fn new(started: Timestamp) -> TickRecord {
        TickRecord {
            started,
            jobs: Mutex::new(BTreeMap::new()),
        }
    }

    fn jobs(
        &self,
    ) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, (CronRule, Option<Timestamp>)>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn register(&self, name: &'static str, rule: CronRule) {
        self.jobs().insert(name, (rule, None));
    }

    /// Job `name` ran (completed, or failed and logged) at `at`.
    pub fn ran(&self, name: &'static str, at: Timestamp) {
        if let Some(job) = self.jobs().get_mut(name) {
            job.1 = Some(at);
        }
    }

    /// Each job's last run, by name.
    pub fn last_runs(&self) -> BTreeMap<&'static str, Option<Timestamp>> {
        self.jobs()
            .iter()
            .map(|(n, (_, last))| (*n, *last))
            .collect()
    }

    /// The jobs that missed a fire time by more than `alarm`: the previous fire time before
    /// `now - alarm` is later than their last run (or than the start, for a job that never ran).
    pub fn stale(&self, now: Timestamp, alarm: Duration) -> Vec<Stale> {
        let Ok(alarm) = jiff::SignedDuration::try_from(alarm) else {
            return Vec::new();
        };
        let Ok(horizon) = now.checked_sub(alarm) else {
            return Vec::new();
        };
        self.jobs()
            .iter()
            .filter_map(|(name, (rule, last))| {
                let due = rule.previous_at_or_before(horizon)?;
                let since = last.unwrap_or(self.started);
                (due > since).then_some(Stale {
                    job: name,
                    due,
                    last_run: *last,
                })
            })
            .collect()
    }
}

/// A job's body: one call into the library.
pub type Body = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// The running scheduler and what it runs.
pub struct Ticks {
    scheduler: JobScheduler,
    record: Arc<TickRecord>,
    /// Counts job runs in flight, so that stopping waits for them.
    running: Arc<tokio::sync::Semaphore>,
}

/// Permits in the in-flight counter: far more than jobs ever run at once.
const MAX_RUNS: u32 = 1024;

impl Ticks {
    /// Starts `jobs` (name, rule, body). Each run records itself in the [`TickRecord`].
    pub async fn start(
        jobs: Vec<(&'static str, CronRule, Body)>,
        clock: Arc<dyn crate::clock::Clock>,
    ) -> Result<Ticks, String> {
        let record = Arc::new(TickRecord::new(clock.now()));
        let running = Arc::new(tokio::sync::Semaphore::new(MAX_RUNS as usize));
        let scheduler = JobScheduler::new()
            .await
            .map_err(|e| format!("cannot start the periodic jobs: {e}"))?;
        for (name, rule, body) in jobs {
            record.register(name, rule.clone());
            let (record, running, clock) = (record.clone(), running.clone(), clock.clone());
            let job = Job::new_async(rule.expression(), move |_id, _scheduler| {
                let (record, running, clock, body) =
                    (record.clone(), running.clone(), clock.clone(), body.clone());
                Box::pin(async move {
                    // Stopping closes the semaphore: a run that starts after that does nothing.
                    let Ok(_permit) = running.acquire().await else {
                        return;
                    };
                    tracing::debug!(job = name, "periodic job starting");
                    body().await;
                    record.ran(name, clock.now());
                })
            })
            .map_err(|e| format!("daemon.{name}_cron: cannot schedule it: {e}"))?;
            scheduler
                .add(job)
                .await
                .map_err(|e| format!("daemon.{name}_cron: cannot schedule it: {e}"))?;
        }
        scheduler
            .start()
            .await
            .map_err(|e| format!("cannot start the periodic jobs: {e}"))?;
        Ok(Ticks {
            scheduler,
            record,
            running,
        })
    }

    pub fn record(&self) -> &Arc<TickRecord> {
        &self.record
    }

    /// Stops firing, and waits for the runs in flight to finish.
    pub async fn stop(mut self) {
        if let Err(e) = self.scheduler.shutdown().await {
            tracing::warn!(error = %e, "the job scheduler did not shut down cleanly");
        }
        // Every permit back means no run is in flight; then no new run may start.
        if let Ok(all) = self.running.acquire_many(MAX_RUNS).await {
            all.forget();
        }
        self.running.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn a_job_that_missed_its_fire_time_by_the_alarm_is_stale_and_named() {
        let record = TickRecord::new(at("2026-12-03T08:59:50Z"));
        record.register("planner", CronRule::parse("0 * * * * *").unwrap());
        record.register("housekeeping", CronRule::parse("0 30 3 * * *").unwrap());
        let alarm = Duration::from_secs(600);
        // Ten minutes in: the planner should have run at 09:00 and every minute since.
        let stale = record.stale(at("2026-12-03T09:10:30Z"), alarm);
        assert_eq!(stale.len(), 1);
        assert_eq!(stale[0].job, "planner");
        assert_eq!(stale[0].due, at("2026-12-03T09:00:00Z"));
        record.ran("planner", at("2026-12-03T09:10:00Z"));
        assert!(record.stale(at("2026-12-03T09:10:30Z"), alarm).is_empty());
        // The daily job is late only once 03:30 plus the alarm has passed without a run.
        assert!(
            record
                .stale(at("2026-12-04T03:39:59Z"), alarm)
                .iter()
                .all(|s| s.job != "housekeeping")
        );
        let late = record.stale(at("2026-12-04T03:40:01Z"), alarm);
        assert!(
            late.iter()
                .any(|s| s.job == "housekeeping" && s.due == at("2026-12-04T03:30:00Z"))
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn jobs_fire_record_their_runs_and_stopping_waits_for_a_run_in_flight() {
        use std::sync::atomic::{AtomicU32, Ordering};
        let runs = Arc::new(AtomicU32::new(0));
        let finished = Arc::new(AtomicU32::new(0));
        let (r, f) = (runs.clone(), finished.clone());
        let body: Body = Arc::new(move || {
            let (r, f) = (r.clone(), f.clone());
            Box::pin(async move {
                r.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(300)).await;
                f.fetch_add(1, Ordering::SeqCst);
            })
        });
        let clock: Arc<dyn crate::clock::Clock> = Arc::new(crate::clock::SystemClock);
        let ticks = Ticks::start(
            vec![("planner", CronRule::parse("* * * * * *").unwrap(), body)],
            clock,
        )
        .await
        .unwrap();
        while runs.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let record = ticks.record().clone();
        ticks.stop().await;
        assert_eq!(
            runs.load(Ordering::SeqCst),
            finished.load(Ordering::SeqCst),
            "stop waited for the run in flight"
        );
        assert!(record.last_runs()["planner"].is_some());
    }
}
