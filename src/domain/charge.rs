//! What one attempt charges, and where the money goes.
//!
//! - [`plan_charge`]: the amount of an attempt: the schedule's fixed amount, or the open balance
//!   less what the member's other unsettled payments already hold; less the member's free credit;
//!   refused above the account type's limit.
//! - [`allocate`]: what a succeeded payment pays: open bills oldest first; any excess becomes a
//!   credit, never a refusal (the money has moved).
//! - [`draw_credits`]: which credits a payment uses, oldest first.
//! - [`after_decline`]: what a decline leads to: a retry, a failure, or a disabled card.
//!
//! Every sum is checked: amounts are capped where they enter (see [`super::money`]), so an
//! overflow here means a row was changed outside autopay, and it is an error, never a wrap.

use std::time::Duration;

use jiff::Timestamp;

use super::decline::{Decline, DeclineAction, RetryPolicy};
use super::money::{ChargeAmount, Currency, Money, MoneyError};
use super::payment::AmountRule;

/// What another unsettled payment of the same member holds: its frozen amount and the credit it
/// applies. A payment in `processing`, `unknown` or `needs_review` keeps both until it is
/// settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
    pub amount: Money,
    pub credit: Money,
}

/// The facts an attempt's amount depends on, read in the attempt's transaction.
#[derive(Debug, Clone)]
pub struct ChargeFacts<'a> {
    pub currency: Currency,
    pub rule: AmountRule,
    /// What is still owed on each open bill.
    pub outstanding: &'a [Money],
    /// What is left of each credit.
    pub credits: &'a [Money],
    /// The member's other unsettled payments.
    pub reserved: &'a [Reservation],
    /// `payments.max_amount_*` for the member's account type.
    pub max_amount: Money,
    /// The smallest charge the processor makes in this currency (Stripe: 0.50 USD).
    pub min_charge: Money,
}

/// What an attempt does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChargePlan {
    /// Charge `amount`; `credit_used` pays bills beside it once the charge succeeds.
    Charge {
        amount: ChargeAmount,
        credit_used: Money,
    },
    /// Nothing is owed: skipped.
    NothingOwed,
    /// Credit covers all of it: skipped, and the credit pays the bills now.
    CoveredByCredit { credit_used: Money },
    /// More than one charge may be: failed with `over_limit`, and the member told.
    OverLimit { amount: Money, max: Money },
    /// Less than the processor's smallest charge: not sent; skipped with `below_minimum`, the
    /// bills stay owed, and the member told.
    BelowMinimum { amount: Money, min: Money },
}

/// Decides what an attempt charges.
pub fn plan_charge(f: &ChargeFacts<'_>) -> Result<ChargePlan, MoneyError> {
    let c = f.currency;
    let gross = match f.rule {
        AmountRule::Fixed { amount } => amount,
        AmountRule::Balance => {
            let owed = Money::checked_sum(c, f.outstanding.iter().map(|m| m.at_least_zero()))?;
            let held = Money::checked_sum(
                c,
                f.reserved
                    .iter()
                    .map(|r| r.amount.checked_add(r.credit))
                    .collect::<Result<Vec<_>, _>>()?,
            )?;
            owed.checked_sub(held)?.at_least_zero()
        }
    };
    if !gross.is_positive() {
        return Ok(ChargePlan::NothingOwed);
    }
    let credit = Money::checked_sum(c, f.credits.iter().copied())?;
    let credit_held = Money::checked_sum(c, f.reserved.iter().map(|r| r.credit))?;
    let credit_used = credit.checked_sub(credit_held)?.at_least_zero().min(gross);
    let charge = gross.checked_sub(credit_used)?;
    if !charge.is_positive() {
        return Ok(ChargePlan::CoveredByCredit { credit_used });
    }
    if charge.minor() < f.min_charge.minor() {
        return Ok(ChargePlan::BelowMinimum {
            amount: charge,
            min: f.min_charge,
        });
    }
    let max = f.max_amount.min(c.max_charge());
    if charge.minor() > max.minor() {
        return Ok(ChargePlan::OverLimit {
            amount: charge,
            max,
        });
    }
    Ok(ChargePlan::Charge {
        amount: ChargeAmount::new(charge, max)?,
        credit_used,
    })
}

/// What `value` pays, bill by bill (in the order given: oldest first), and what is left over.
pub fn allocate(outstanding: &[Money], value: Money) -> Result<(Vec<Money>, Money), MoneyError> {
    let mut left = value;
    let mut applied = Vec::with_capacity(outstanding.len());
    for owed in outstanding {
        let part = owed.at_least_zero().min(left.at_least_zero());
        left = left.checked_sub(part)?;
        applied.push(part);
    }
    Ok((applied, left))
}

/// How much of each credit (in the order given: oldest first) pays `amount`.
pub fn draw_credits(remaining: &[Money], amount: Money) -> Result<Vec<Money>, MoneyError> {
    // The same arithmetic as paying bills: credits are paid out oldest first.
    Ok(allocate(remaining, amount)?.0)
}

/// A bill after money is applied to it or its amount changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BillBalance {
    pub amount_due: Money,
    pub amount_paid: Money,
    /// Money beyond what the bill asks for: it becomes the member's credit (any refund happens
    /// at the processor).
    pub credit: Money,
}

impl BillBalance {
    /// Whether nothing more is owed on the bill.
    pub fn is_paid(&self) -> bool {
        self.amount_paid.minor() >= self.amount_due.minor()
    }
}

/// A payment made outside autopay (phone, portal) on a bill: it pays what is owed, and anything
/// beyond becomes a credit.
pub fn pay_bill(
    amount_due: Money,
    amount_paid: Money,
    payment: Money,
) -> Result<BillBalance, MoneyError> {
    let owed = amount_due.checked_sub(amount_paid)?.at_least_zero();
    let (applied, credit) = allocate(&[owed], payment)?;
    Ok(BillBalance {
        amount_due,
        amount_paid: amount_paid.checked_add(applied[0])?,
        credit,
    })
}

/// A bill's amount due changed (`bill adjust`): below what was already paid, the difference
/// becomes a credit.
pub fn readjust(amount_due: Money, amount_paid: Money) -> Result<BillBalance, MoneyError> {
    let credit = amount_paid.checked_sub(amount_due)?.at_least_zero();
    Ok(BillBalance {
        amount_due,
        amount_paid: amount_paid.checked_sub(credit)?,
        credit,
    })
}

/// What a decline leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeclineStep {
    /// A soft decline with tries left: a new attempt (new key) at this moment.
    RetryAt(Timestamp),
    /// The payment fails; the schedule counts a failure.
    Fail,
    /// The payment fails and the card is never tried again: disabled, its schedules suspended.
    DisableCard,
}

/// Decides what a decline of attempt `attempt` leads to: a soft decline retries after the next
/// of the policy's delays, or after the network's wait when that is longer. `requests_on_card` counts the card's
/// requests in the last 30 days, this one included.
pub fn after_decline(
    decline: &Decline,
    attempt: u32,
    requests_on_card: u32,
    policy: &RetryPolicy,
    now: Timestamp,
) -> DeclineStep {
    match decline.action {
        DeclineAction::DisableCard => DeclineStep::DisableCard,
        DeclineAction::RetryLater => policy
            .next_attempt_at(attempt, requests_on_card, now)
            .map(|at| {
                // The network's own wait (Mastercard 24 to 30), when it is the longer one.
                let network = decline
                    .wait_at_least
                    .and_then(|w| now.checked_add(w).ok())
                    .unwrap_or(at);
                at.max(network)
            })
            .map_or(DeclineStep::Fail, DeclineStep::RetryAt),
        _ => DeclineStep::Fail,
    }
}

/// Why a claimed payment is not charged at all, if it is not: its card, member or schedule
/// stopped after it was planned.
pub fn blocked(
    card_active: bool,
    member_active: bool,
    schedule_stopped: Option<&str>,
) -> Option<String> {
    if !card_active {
        Some("the card can no longer be charged".into())
    } else if !member_active {
        Some("member closed".into())
    } else {
        schedule_stopped.map(|status| format!("schedule {status}"))
    }
}

/// The oldest moment a payment claimed at `now` may have been due and still be charged
/// (`payments.max_lateness`).
pub fn lateness_cutoff(now: Timestamp, max_lateness: Duration) -> Timestamp {
    jiff::SignedDuration::try_from(max_lateness)
        .ok()
        .and_then(|d| now.checked_sub(d).ok())
        .unwrap_or(Timestamp::MIN)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const USD: Currency = Currency::USD;

    fn usd(s: &str) -> Money {
        Money::parse(s, USD).unwrap()
    }

    fn facts<'a>(
        rule: AmountRule,
        outstanding: &'a [Money],
        credits: &'a [Money],
        reserved: &'a [Reservation],
    ) -> ChargeFacts<'a> {
        ChargeFacts {
            currency: USD,
            rule,
            outstanding,
            credits,
            reserved,
            max_amount: usd("5000"),
            min_charge: Money::from_minor(1, USD),
        }
    }

    #[test]
    fn a_balance_schedule_charges_what_is_owed_less_free_credit() {
        let plan = plan_charge(&facts(
            AmountRule::Balance,
            &[usd("120"), usd("80")],
            &[usd("50")],
            &[],
        ))
        .unwrap();
        assert_eq!(
            plan,
            ChargePlan::Charge {
                amount: ChargeAmount::new_unbounded(usd("150")).unwrap(),
                credit_used: usd("50")
            }
        );
    }

    #[test]
    fn credit_and_amounts_held_by_an_unsettled_payment_are_not_spent_again() {
        // Bill 200, credit 50; one payment (150 + 50 credit) is unsettled: nothing is left.
        let held = [Reservation {
            amount: usd("150"),
            credit: usd("50"),
        }];
        let plan = plan_charge(&facts(
            AmountRule::Balance,
            &[usd("200")],
            &[usd("50")],
            &held,
        ))
        .unwrap();
        assert_eq!(plan, ChargePlan::NothingOwed);
        // A fixed schedule still charges its amount, but without the held credit.
        let fixed = AmountRule::Fixed { amount: usd("30") };
        let plan = plan_charge(&facts(fixed, &[usd("200")], &[usd("50")], &held)).unwrap();
        assert_eq!(
            plan,
            ChargePlan::Charge {
                amount: ChargeAmount::new_unbounded(usd("30")).unwrap(),
                credit_used: usd("0")
            }
        );
    }

    #[test]
    fn credit_covering_the_whole_amount_charges_nothing() {
        let fixed = AmountRule::Fixed { amount: usd("30") };
        assert_eq!(
            plan_charge(&facts(fixed, &[], &[usd("40")], &[])).unwrap(),
            ChargePlan::CoveredByCredit {
                credit_used: usd("30")
            }
        );
    }

    #[test]
    fn over_the_account_limit_or_the_eight_digit_cap_is_refused_not_charged() {
        let plan = plan_charge(&facts(AmountRule::Balance, &[usd("5000.01")], &[], &[])).unwrap();
        assert_eq!(
            plan,
            ChargePlan::OverLimit {
                amount: usd("5000.01"),
                max: usd("5000")
            }
        );
        let mut f = facts(AmountRule::Balance, &[], &[], &[]);
        let big = [usd("99999999.99"), usd("99999999.99")];
        f.outstanding = &big;
        f.max_amount = usd("99999999.99");
        assert!(matches!(
            plan_charge(&f).unwrap(),
            ChargePlan::OverLimit { max, .. } if max == usd("999999.99")
        ));
    }

    #[test]
    fn corrupt_sums_are_an_error_not_a_wrapped_amount() {
        let huge = [Money::from_minor(i64::MAX, USD), Money::from_minor(1, USD)];
        assert!(plan_charge(&facts(AmountRule::Balance, &huge, &[], &[])).is_err());
    }

    #[test]
    fn a_payment_pays_bills_oldest_first_and_returns_the_excess() {
        let (applied, left) = allocate(&[usd("100"), usd("50")], usd("120")).unwrap();
        assert_eq!(applied, vec![usd("100"), usd("20")]);
        assert_eq!(left, usd("0"));
        let (applied, left) = allocate(&[usd("10")], usd("25")).unwrap();
        assert_eq!((applied, left), (vec![usd("10")], usd("15")));
    }

    #[test]
    fn money_paid_outside_autopay_pays_the_bill_and_the_excess_becomes_credit() {
        let b = pay_bill(usd("100"), usd("30"), usd("90")).unwrap();
        assert_eq!((b.amount_paid, b.credit), (usd("100"), usd("20")));
        assert!(b.is_paid());
        let b = pay_bill(usd("100"), usd("0"), usd("40")).unwrap();
        assert_eq!(
            (b.amount_paid, b.credit, b.is_paid()),
            (usd("40"), usd("0"), false)
        );
    }

    #[test]
    fn a_bill_adjusted_below_what_was_paid_turns_the_difference_into_credit() {
        let b = readjust(usd("60"), usd("100")).unwrap();
        assert_eq!(
            (b.amount_due, b.amount_paid, b.credit),
            (usd("60"), usd("60"), usd("40"))
        );
        assert!(b.is_paid());
        let b = readjust(usd("150"), usd("100")).unwrap();
        assert_eq!(
            (b.amount_paid, b.credit, b.is_paid()),
            (usd("100"), usd("0"), false)
        );
    }

    #[test]
    fn credits_are_drawn_oldest_first() {
        assert_eq!(
            draw_credits(&[usd("5"), usd("20")], usd("12")).unwrap(),
            vec![usd("5"), usd("7")]
        );
    }

    #[test]
    fn an_amount_under_the_processor_s_minimum_is_not_charged() {
        let mut f = facts(
            AmountRule::Fixed {
                amount: usd("0.30"),
            },
            &[],
            &[],
            &[],
        );
        f.min_charge = usd("0.50");
        assert_eq!(
            plan_charge(&f).unwrap(),
            ChargePlan::BelowMinimum {
                amount: usd("0.30"),
                min: usd("0.50")
            }
        );
        f.rule = AmountRule::Fixed {
            amount: usd("0.50"),
        };
        assert!(matches!(
            plan_charge(&f).unwrap(),
            ChargePlan::Charge { .. }
        ));
    }

    #[test]
    fn a_soft_decline_retries_until_the_delays_or_the_card_limit_run_out() {
        let policy = RetryPolicy::new(vec![Duration::from_secs(86_400)]);
        let now: Timestamp = "2026-12-01T09:00:00Z".parse().unwrap();
        let soft = super::super::decline::classify_code("insufficient_funds");
        assert!(matches!(
            after_decline(&soft, 1, 1, &policy, now),
            DeclineStep::RetryAt(_)
        ));
        assert_eq!(after_decline(&soft, 2, 2, &policy, now), DeclineStep::Fail);
        assert_eq!(after_decline(&soft, 1, 15, &policy, now), DeclineStep::Fail);
        let lost = super::super::decline::classify_code("lost_card");
        assert_eq!(
            after_decline(&lost, 1, 1, &policy, now),
            DeclineStep::DisableCard
        );
    }

    #[test]
    fn a_network_wait_longer_than_the_delay_sets_the_retry() {
        use super::super::card::CardBrand;
        use super::super::decline::{DeclineSignal, classify};
        let policy = RetryPolicy::new(vec![Duration::from_secs(86_400)]);
        let now: Timestamp = "2026-12-01T09:00:00Z".parse().unwrap();
        let advised = |advice: &str| {
            classify(&DeclineSignal {
                network_advice_code: Some(advice.into()),
                brand: Some(CardBrand::MasterCard),
                ..DeclineSignal::code("insufficient_funds")
            })
        };
        // 24: one hour, shorter than the day's delay, which stands.
        assert_eq!(
            after_decline(&advised("24"), 1, 1, &policy, now),
            DeclineStep::RetryAt("2026-12-02T09:00:00Z".parse().unwrap())
        );
        // 30: ten days.
        assert_eq!(
            after_decline(&advised("30"), 1, 1, &policy, now),
            DeclineStep::RetryAt("2026-12-11T09:00:00Z".parse().unwrap())
        );
        // No delay left: the payment fails, whatever the network's wait.
        assert_eq!(
            after_decline(&advised("30"), 2, 2, &policy, now),
            DeclineStep::Fail
        );
    }

    #[test]
    fn a_stopped_card_member_or_schedule_blocks_the_charge_with_its_reason() {
        assert_eq!(blocked(true, true, None), None);
        assert_eq!(
            blocked(false, true, None).as_deref(),
            Some("the card can no longer be charged")
        );
        assert_eq!(blocked(true, false, None).as_deref(), Some("member closed"));
        assert_eq!(
            blocked(true, true, Some("paused")).as_deref(),
            Some("schedule paused")
        );
    }

    proptest! {
        #[test]
        fn no_plan_spends_money_that_is_not_there(
            bills in proptest::collection::vec(0i64..10_000_000, 0..6),
            credits in proptest::collection::vec(0i64..1_000_000, 0..4),
            held in proptest::collection::vec((0i64..1_000_000, 0i64..100_000), 0..3),
            fixed in proptest::option::of(1i64..1_000_000),
        ) {
            let outstanding: Vec<Money> = bills.iter().map(|m| Money::from_minor(*m, USD)).collect();
            let credits: Vec<Money> = credits.iter().map(|m| Money::from_minor(*m, USD)).collect();
            let reserved: Vec<Reservation> = held.iter().map(|(a, c)| Reservation { amount: Money::from_minor(*a, USD), credit: Money::from_minor(*c, USD) }).collect();
            let rule = fixed.map_or(AmountRule::Balance, |m| AmountRule::Fixed { amount: Money::from_minor(m, USD) });
            let f = ChargeFacts { currency: USD, rule, outstanding: &outstanding, credits: &credits, reserved: &reserved, max_amount: usd("5000"), min_charge: Money::from_minor(1, USD) };
            let free_credit = (credits.iter().map(|m| m.minor()).sum::<i64>() - reserved.iter().map(|r| r.credit.minor()).sum::<i64>()).max(0);
            match plan_charge(&f).unwrap() {
                ChargePlan::Charge { amount, credit_used } => {
                    prop_assert!(amount.money().is_positive());
                    prop_assert!(amount.money().minor() <= 500_000);
                    prop_assert!(credit_used.minor() >= 0 && credit_used.minor() <= free_credit);
                    if fixed.is_none() {
                        let owed: i64 = bills.iter().sum();
                        let held_total: i64 = held.iter().map(|(a, c)| a + c).sum();
                        prop_assert!(amount.money().minor() + credit_used.minor() <= owed - held_total);
                    }
                }
                ChargePlan::CoveredByCredit { credit_used } => {
                    prop_assert!(credit_used.is_positive() && credit_used.minor() <= free_credit);
                }
                ChargePlan::NothingOwed | ChargePlan::OverLimit { .. } | ChargePlan::BelowMinimum { .. } => {}
            }
        }

        #[test]
        fn allocation_conserves_the_money(
            bills in proptest::collection::vec(0i64..1_000_000, 0..8),
            value in 0i64..5_000_000,
        ) {
            let outstanding: Vec<Money> = bills.iter().map(|m| Money::from_minor(*m, USD)).collect();
            let (applied, left) = allocate(&outstanding, Money::from_minor(value, USD)).unwrap();
            let paid: i64 = applied.iter().map(|m| m.minor()).sum();
            prop_assert_eq!(paid + left.minor(), value);
            for (a, owed) in applied.iter().zip(&bills) {
                prop_assert!(a.minor() >= 0 && a.minor() <= *owed);
            }
        }
    }
}
