//! A group commit's steps ([`crate::store::Store::charge_steps`]): many charges' steps in one
//! transaction, their rows read and locked together.
//!
//! One step alone reads and locks its member, schedule, card and payment in five statements.
//! A group reads them for all its steps in five statements, whatever its size: the payments'
//! owners, then every member, every schedule, every card and every payment, each table in id
//! order (so two groups, or a group and a single step, lock rows in one order and never wait
//! on each other in a circle). A step whose member an earlier step of the same group changed
//! reads its rows again on its own, so every step sees what the steps before it wrote.

use std::collections::{HashMap, HashSet};

use crate::domain::ids::{CardId, MemberId, PaymentId, ScheduleId};
use crate::domain::payment::PaymentState;
use crate::store::sql::cards::{CARD_COLS, card_from};
use crate::store::sql::members::{MEMBER_COLS, member_from};
use crate::store::sql::payments::attempt::{begin_locked, record_locked};
use crate::store::sql::payments::{Locked, PAYMENT_COLS, held_from, lock_leased};
use crate::store::sql::schedules::{SCHEDULE_COLS, schedule_from};
use crate::store::sql::{
    Backend, ROWS_PER_STATEMENT, SqlStore, commit, db_err, get, locked_rows, placeholders,
    query_as, sorted,
};
use crate::store::{ChargeStep, Lease, Next, OutcomePolicy, Result, WriteTx};

/// Writes `steps` in one transaction, in order; each step's result, once committed.
pub(crate) async fn charge_steps<B: Backend>(
    db: &SqlStore<B>,
    steps: &[ChargeStep],
    policy: &OutcomePolicy,
) -> Result<Vec<Next>> {
    let mut tx = db.begin_write().await?;
    let leases: Vec<Lease> = steps.iter().map(lease_of).collect();
    let mut locked = lock_group(&mut tx, &leases).await?;
    // Members an earlier step of this group wrote to: their rows are read again.
    let mut changed: HashSet<MemberId> = HashSet::new();
    let mut done = Vec::with_capacity(steps.len());
    for step in steps {
        let lease = lease_of(step);
        let rows = match locked.remove(&lease.payment_id) {
            Some(l) if !changed.contains(&l.member.id) => Some(l),
            _ => lock_leased(&mut tx, &lease, &[PaymentState::Processing]).await?,
        };
        if let Some(l) = &rows {
            changed.insert(l.member.id);
        }
        done.push(match step {
            ChargeStep::Begin { audit, .. } => begin_locked(&mut tx, rows, policy, audit).await?,
            ChargeStep::Record {
                call,
                answer,
                audit,
                ..
            } => record_locked(&mut tx, rows, *call, answer, policy, audit).await?,
        });
    }
    commit(tx).await?;
    Ok(done)
}

fn lease_of(step: &ChargeStep) -> Lease {
    match step {
        ChargeStep::Begin { lease, .. } | ChargeStep::Record { lease, .. } => *lease,
    }
}

/// Reads and locks the rows of every payment `leases` still hold `processing`, by payment:
/// a payment whose lease is gone (or that moved to another card since it was claimed) is
/// absent.
async fn lock_group<B: Backend>(
    tx: &mut WriteTx<B>,
    leases: &[Lease],
) -> Result<HashMap<PaymentId, Locked>> {
    let payment_ids: Vec<PaymentId> = sorted(leases.iter().map(|l| l.payment_id));
    // Read without a lock only to learn which rows to lock first.
    let mut owners: HashMap<PaymentId, (MemberId, ScheduleId, CardId)> = HashMap::new();
    for chunk in payment_ids.chunks(ROWS_PER_STATEMENT) {
        let mut read = query_as::<B, (PaymentId, MemberId, ScheduleId, CardId)>(
            sqlx::AssertSqlSafe(format!(
                "SELECT id, member_id, schedule_id, payment_method_id FROM payments WHERE id IN ({})",
                placeholders(1, chunk.len())
            )),
        );
        for id in chunk {
            read = read.bind(*id);
        }
        for (p, m, s, c) in read
            .fetch_all(tx.conn())
            .await
            .map_err(db_err("reading payments"))?
        {
            owners.insert(p, (m, s, c));
        }
    }
    let members = locked_rows(
        tx,
        "members",
        MEMBER_COLS,
        sorted(owners.values().map(|o| o.0)),
        member_from,
    )
    .await?;
    let schedules = locked_rows(
        tx,
        "schedules",
        SCHEDULE_COLS,
        sorted(owners.values().map(|o| o.1)),
        schedule_from,
    )
    .await?;
    let cards = locked_rows(
        tx,
        "payment_methods",
        CARD_COLS,
        sorted(owners.values().map(|o| o.2)),
        card_from,
    )
    .await?;
    let cols =
        format!("{PAYMENT_COLS}, credit_applied, unknown_since, lease_expires_at, lease_token");
    let mut held = locked_rows(tx, "payments", &cols, payment_ids, |row| {
        Ok((
            held_from(row)?,
            get::<Option<String>>(row, "payments", "lease_token")?,
        ))
    })
    .await?;

    let mut locked = HashMap::with_capacity(leases.len());
    for lease in leases {
        let Some((held, token)) = held.remove(&lease.payment_id) else {
            continue;
        };
        let Some((member_id, schedule_id, card_id)) = owners.get(&lease.payment_id) else {
            continue;
        };
        // What `leased_payment` asks of one payment: this lease's token, still processing.
        if token.as_deref() != Some(lease.token.to_string().as_str())
            || held.payment.state != PaymentState::Processing
            // Only an unclaimed payment is moved to another card, so the lease is gone.
            || held.payment.card_id != *card_id
        {
            continue;
        }
        let (Some(member), Some(schedule), Some(card)) = (
            members.get(member_id),
            schedules.get(schedule_id),
            cards.get(card_id),
        ) else {
            continue;
        };
        locked.insert(
            lease.payment_id,
            Locked {
                lease: *lease,
                member: member.clone(),
                schedule: schedule.clone(),
                card: card.clone(),
                held,
            },
        );
    }
    Ok(locked)
}
