//! The planner: due schedules become `payments` rows, once per occurrence, and each schedule's
//! cursor moves to its next occurrence, recomputed from the local rule.
//!
//! After downtime each missed occurrence is created at most once: `payments.misfire =
//! coalesce` charges one payment for a recurring schedule's missed occurrences and records the
//! others as `missed`; `each` charges them all. Occurrences older than `payments.max_lateness`
//! are `missed`, never charged. Two planners on two hosts create each occurrence once: the
//! step is applied against the cursor it read, and (schedule, occurrence) is unique.

use jiff::{SignedDuration, Timestamp};
use serde::Serialize;

use super::{Engine, EngineError};
use crate::domain::ids::ScheduleId;
use crate::domain::schedule::Misfire;
use crate::domain::schedule::{Occurrence, OccurrenceKey, Recurrence};
use crate::store::{Audit, PlanStep, PlannedPayment, Schedule, Store, StoreError};

/// What one planning pass did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PlanReport {
    /// Schedules whose cursor moved.
    pub schedules: u64,
    /// Payments created to be charged.
    pub planned: u64,
    /// Occurrences recorded as missed.
    pub missed: u64,
    /// Schedules another planner or an operator changed first.
    pub raced: u64,
}

impl PlanReport {
    pub fn add(&mut self, other: &PlanReport) {
        self.schedules += other.schedules;
        self.planned += other.planned;
        self.missed += other.missed;
        self.raced += other.raced;
    }
}

/// The occurrence a stored cursor names, found near where it was due.
fn occurrence_at(
    recurrence: &Recurrence,
    key: &OccurrenceKey,
    near: Option<Timestamp>,
) -> Option<Occurrence> {
    let from = near
        .and_then(|t| t.checked_sub(SignedDuration::from_hours(24 * 40)).ok())
        .unwrap_or(Timestamp::MIN);
    recurrence
        .occurrences_from(from)
        .take_while(|o| o.key <= *key)
        .find(|o| o.key == *key)
        .or_else(|| recurrence.occurrences().find(|o| o.key >= *key))
}

/// Decides which due occurrences are charged and which are missed.
pub fn plan_occurrences(
    due: &[Occurrence],
    now: Timestamp,
    misfire: Misfire,
    max_lateness: std::time::Duration,
) -> Vec<PlannedPayment> {
    let late = SignedDuration::try_from(max_lateness).unwrap_or(SignedDuration::MAX);
    let mut planned: Vec<PlannedPayment> = due
        .iter()
        .map(|o| PlannedPayment {
            occurrence: o.key,
            due_at: o.due_at,
            missed: (now.duration_since(o.due_at) > late)
                .then(|| "older than payments.max_lateness after downtime".to_string()),
        })
        .collect();
    if misfire == Misfire::Coalesce {
        let chargeable: Vec<usize> = planned
            .iter()
            .enumerate()
            .filter(|(_, p)| p.missed.is_none())
            .map(|(i, _)| i)
            .collect();
        if let Some((_, earlier)) = chargeable.split_last() {
            for i in earlier {
                planned[*i].missed = Some("coalesced into one payment after downtime".to_string());
            }
        }
    }
    planned
}

impl Engine {
    /// Plans every due schedule until none is due.
    pub async fn plan_due(&self) -> Result<PlanReport, EngineError> {
        let mut report = PlanReport::default();
        loop {
            let now = self.clock.now();
            let due = self
                .store
                .due_schedules(now, self.config.batch_size)
                .await?;
            if due.is_empty() {
                return Ok(report);
            }
            // A long planning run (the 1st of the month) is still a loop that is alive.
            self.health.beat(super::worker::WORKER);
            let steps: Vec<PlanStep> = due
                .iter()
                .map(|schedule| self.plan_schedule(schedule, now))
                .collect();
            let applied = self.apply_plans(&steps).await?;
            let mut moved = 0;
            for (step, applied) in steps.iter().zip(applied) {
                let charged = step.payments.iter().filter(|p| p.missed.is_none()).count() as u64;
                let missed = step.payments.len() as u64 - charged;
                if applied {
                    moved += 1;
                    report.schedules += 1;
                    report.planned += charged;
                    report.missed += missed;
                    tracing::info!(schedule_id = %step.schedule_id, planned = charged, missed, next_run_at = ?step.next_run_at, "planned");
                } else {
                    report.raced += 1;
                }
            }
            if moved == 0 {
                // Everything due was taken by someone else; the next pass sees their work.
                return Ok(report);
            }
        }
    }

    /// Writes one batch of plans in one transaction, set-based (a statement for every
    /// schedule's row, one for every payment, one per cursor position): one commit instead of
    /// one per schedule. Should that fail, each schedule is written on its own, so one bad
    /// schedule fails only itself.
    async fn apply_plans(&self, steps: &[PlanStep]) -> Result<Vec<bool>, EngineError> {
        let audit = self.audit();
        match self.store.apply_plans(steps, &audit).await {
            Ok(applied) => Ok(applied),
            Err(e) if steps.len() > 1 => {
                tracing::warn!(error.message = %e, schedules = steps.len(), "planning a batch in one transaction failed; planning its schedules one by one");
                let mut applied = Vec::with_capacity(steps.len());
                for step in steps {
                    applied.push(self.store.apply_plan(step, &audit).await?);
                }
                Ok(applied)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn plan_schedule(&self, schedule: &Schedule, now: Timestamp) -> PlanStep {
        plan_step(schedule, now, self.config.misfire, self.config.max_lateness)
    }
}

/// What planning one schedule at `now` writes: its due occurrences (charged or missed) and its
/// next cursor.
pub fn plan_step(
    schedule: &Schedule,
    now: Timestamp,
    misfire: Misfire,
    max_lateness: std::time::Duration,
) -> PlanStep {
    let recurrence = &schedule.recurrence;
    let mut due = Vec::new();
    let mut next = schedule
        .next_occurrence
        .as_ref()
        .and_then(|k| occurrence_at(recurrence, k, schedule.next_run_at));
    while let Some(o) = next.take() {
        if o.due_at > now {
            next = Some(o);
            break;
        }
        next = recurrence.next_after(&o.key);
        due.push(o);
    }
    let misfire = if schedule.kind == crate::domain::status::ScheduleKind::OneTime {
        Misfire::Each
    } else {
        misfire
    };
    PlanStep {
        schedule_id: schedule.id,
        expected_version: schedule.version,
        expected_next: schedule.next_occurrence.unwrap_or(OccurrenceKey {
            kind: crate::domain::schedule::OccurrenceKind::Regular,
            nominal: jiff::civil::Date::MIN,
        }),
        payments: plan_occurrences(&due, now, misfire, max_lateness),
        next_run_at: next.as_ref().map(|o| o.due_at),
        next_occurrence: next.map(|o| o.key),
    }
}

/// Plans one schedule now if an occurrence of it is due, as the planner would: an operator's
/// change to a schedule (update, pause, cancel) first records what was already due, so that a
/// change made while the daemon was down never drops an occurrence. True when it planned.
pub async fn plan_if_due(
    store: &dyn Store,
    schedule_id: ScheduleId,
    now: Timestamp,
    misfire: Misfire,
    max_lateness: std::time::Duration,
    audit: &Audit,
) -> Result<bool, StoreError> {
    let schedule = store.schedule(schedule_id).await?;
    let due = schedule.status == crate::domain::status::ScheduleStatus::Active
        && schedule.next_run_at.is_some_and(|t| t <= now);
    if !due {
        return Ok(false);
    }
    store
        .apply_plan(&plan_step(&schedule, now, misfire, max_lateness), audit)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::schedule::{End, RecurrenceSpec, Rule};
    use std::time::Duration;

    fn monthly() -> Recurrence {
        Recurrence::new(RecurrenceSpec {
            rule: Rule::Monthly { day: 1 },
            at: jiff::civil::time(9, 0, 0, 0),
            time_zone: "America/New_York".into(),
            start: jiff::civil::date(2026, 1, 1),
            first_payment: None,
            end: End::Never,
            business_days: false,
            holidays: vec![],
        })
        .unwrap()
    }

    fn due_until(now: Timestamp) -> Vec<Occurrence> {
        monthly()
            .occurrences()
            .take_while(|o| o.due_at <= now)
            .collect()
    }

    #[test]
    fn coalesce_charges_the_latest_missed_occurrence_and_records_the_rest_as_missed() {
        let now: Timestamp = "2026-04-02T12:00:00Z".parse().unwrap();
        let planned = plan_occurrences(
            &due_until(now),
            now,
            Misfire::Coalesce,
            Duration::from_secs(365 * 86_400),
        );
        let charged: Vec<String> = planned
            .iter()
            .filter(|p| p.missed.is_none())
            .map(|p| p.occurrence.to_string())
            .collect();
        assert_eq!(charged, vec!["2026-04-01"]);
        assert_eq!(planned.len(), 4);
    }

    #[test]
    fn each_charges_every_missed_occurrence_within_the_lateness_limit() {
        let now: Timestamp = "2026-04-02T12:00:00Z".parse().unwrap();
        let planned = plan_occurrences(
            &due_until(now),
            now,
            Misfire::Each,
            Duration::from_secs(45 * 86_400),
        );
        let charged: Vec<String> = planned
            .iter()
            .filter(|p| p.missed.is_none())
            .map(|p| p.occurrence.to_string())
            .collect();
        assert_eq!(charged, vec!["2026-03-01", "2026-04-01"]);
    }

    #[test]
    fn occurrences_older_than_max_lateness_are_never_charged() {
        let now: Timestamp = "2026-04-20T12:00:00Z".parse().unwrap();
        let planned = plan_occurrences(
            &due_until(now),
            now,
            Misfire::Coalesce,
            Duration::from_secs(3 * 86_400),
        );
        assert!(planned.iter().all(|p| p.missed.is_some()));
    }

    #[test]
    fn a_cursor_is_found_near_its_due_time() {
        let r = monthly();
        let key: OccurrenceKey = "2030-07-01".parse().unwrap();
        let found = occurrence_at(&r, &key, Some("2030-07-01T13:00:00Z".parse().unwrap())).unwrap();
        assert_eq!(found.key, key);
    }
}
