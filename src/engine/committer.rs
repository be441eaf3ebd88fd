//! The group committer: the attempts' store steps (store the request before it is sent, record
//! the answer after) from every charge in flight, written many to a transaction.
//!
//! Each charge hands in its step and waits. Whoever takes the writer's turn next writes every
//! step queued by then (at most [`MAX_GROUP`]) in one transaction, and hands each charge its own
//! result once the transaction is committed: no charge hears of its step before that. At low
//! load a group is one step, with no added wait; under load, steps queue while a group is
//! written, and the next group takes them all. When a group fails, nothing of it was written,
//! and each step is run again on its own, so one bad step fails only itself.

use std::sync::Mutex;

use tokio::sync::{Semaphore, oneshot};

use crate::domain::ids::MemberId;
use crate::store::{ChargeStep, Next, OutcomePolicy, Store, StoreError};

/// The most steps one transaction writes.
pub const MAX_GROUP: usize = 64;

/// A step, the member whose rows it locks, and where its result goes.
type Waiting = (
    ChargeStep,
    MemberId,
    oneshot::Sender<Result<Next, StoreError>>,
);

pub struct Committer {
    queue: Mutex<Vec<Waiting>>,
    /// Groups written at once: one on SQLite (one writer), several on PostgreSQL, whose round
    /// trips overlap.
    lanes: Semaphore,
}

impl Committer {
    pub fn new(lanes: usize) -> Committer {
        Committer {
            queue: Mutex::new(Vec::new()),
            lanes: Semaphore::new(lanes.max(1)),
        }
    }

    /// Writes `step` (which locks `member`'s rows) in the next group, and returns its result
    /// once that group is committed.
    pub async fn write(
        &self,
        store: &dyn Store,
        policy: &OutcomePolicy,
        step: ChargeStep,
        member: MemberId,
    ) -> Result<Next, StoreError> {
        let (done, result) = oneshot::channel();
        self.queue().push((step, member, done));
        {
            // Every step queued has a charge still to take a lane, so each is written by that
            // turn or an earlier one.
            let _lane =
                self.lanes.acquire().await.map_err(|_| {
                    StoreError::Internal("the group commit's lanes are closed".into())
                })?;
            let mut group: Vec<Waiting> = {
                let mut queue = self.queue();
                let n = queue.len().min(MAX_GROUP);
                queue.drain(..n).collect()
            };
            // Groups written at once lock members in one order, so they never deadlock.
            group.sort_by_key(|(_, member, _)| *member);
            if !group.is_empty() {
                write_group(store, policy, group).await;
            }
        }
        result.await.unwrap_or_else(|_| {
            Err(StoreError::Internal(
                "the group commit carrying this step stopped before it answered".into(),
            ))
        })
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Vec<Waiting>> {
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

async fn write_group(store: &dyn Store, policy: &OutcomePolicy, group: Vec<Waiting>) {
    metrics::histogram!(crate::metrics::GROUP_COMMIT_STEPS).record(group.len() as f64);
    let (steps, waiting): (Vec<ChargeStep>, Vec<_>) = group
        .into_iter()
        .map(|(step, _, tell)| (step, tell))
        .unzip();
    match store.charge_steps(&steps, policy).await {
        Ok(done) if done.len() == steps.len() => {
            for (next, tell) in done.into_iter().zip(waiting) {
                let _ = tell.send(Ok(next));
            }
        }
        Ok(done) => {
            let e = format!(
                "a group commit of {} steps answered {}",
                steps.len(),
                done.len()
            );
            for tell in waiting {
                let _ = tell.send(Err(StoreError::Internal(e.clone())));
            }
        }
        Err(e) if steps.len() == 1 => {
            if let Some(tell) = waiting.into_iter().next() {
                let _ = tell.send(Err(e));
            }
        }
        Err(e) => {
            // Nothing of the group was written: each step again, alone.
            tracing::warn!(error.message = %e, steps = steps.len(), "a group commit failed; writing its steps one by one");
            for (step, tell) in steps.into_iter().zip(waiting) {
                let _ = tell.send(alone(store, policy, step).await);
            }
        }
    }
}

async fn alone(
    store: &dyn Store,
    policy: &OutcomePolicy,
    step: ChargeStep,
) -> Result<Next, StoreError> {
    match step {
        ChargeStep::Begin { lease, audit } => store.begin_attempt(&lease, policy, &audit).await,
        ChargeStep::Record {
            lease,
            call,
            answer,
            audit,
        } => {
            store
                .record_charge(&lease, call, &answer, policy, &audit)
                .await
        }
    }
}
