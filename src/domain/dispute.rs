//! What autopay does when the processor reports a refund or a dispute of a charge it made.
//!
//! Neither changes a payment's state or a member's balance: the money question is settled
//! between the plan, the member and the bank, and corrections stay with `bill adjust`. Both are
//! recorded (an audit event, a log line, a metric, a line in `autopay status`). A dispute also
//! says something about the card or the member's consent, which autopay acts on.

use super::spelled_enum;

spelled_enum! {
    /// What a dispute's reason leads to.
    pub enum DisputeAction ("dispute action") {
        /// Recorded only.
        Record => "record",
        /// The cardholder says the charge was fraud: the card is never charged again (disabled,
        /// its schedules suspended, the member told).
        DisableCard => "disable_card",
        /// The cardholder says the recurring charge was cancelled or is not recognised: the
        /// schedules on the card are suspended and the member told, until they authorize again.
        SuspendSchedules => "suspend_schedules",
    }
}

/// The action for a dispute's reason (Stripe's spellings).
pub fn dispute_action(reason: &str) -> DisputeAction {
    match reason.trim() {
        "fraudulent" => DisputeAction::DisableCard,
        "subscription_canceled" | "unrecognized" => DisputeAction::SuspendSchedules,
        _ => DisputeAction::Record,
    }
}

/// Why a card or schedule was stopped after a dispute, for the member's notice: plain words,
/// never the word fraud (whoever reads the email may be the one holding the card).
pub fn member_reason(action: DisputeAction) -> &'static str {
    match action {
        DisputeAction::DisableCard => "your bank told us a payment on this card was disputed",
        DisputeAction::SuspendSchedules => {
            "your bank told us you disputed an automatic payment; set it up again if you want it to continue"
        }
        DisputeAction::Record => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fraud_disables_cancelled_or_unrecognised_suspends_the_rest_is_recorded() {
        assert_eq!(dispute_action("fraudulent"), DisputeAction::DisableCard);
        assert_eq!(
            dispute_action("subscription_canceled"),
            DisputeAction::SuspendSchedules
        );
        assert_eq!(
            dispute_action("unrecognized"),
            DisputeAction::SuspendSchedules
        );
        for other in [
            "duplicate",
            "general",
            "product_not_received",
            "",
            "new_reason",
        ] {
            assert_eq!(dispute_action(other), DisputeAction::Record, "{other}");
        }
        for a in DisputeAction::ALL {
            assert!(!member_reason(*a).contains("fraud"));
        }
    }
}
