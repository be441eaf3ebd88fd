//! The lifecycle words of members, cards, bills and schedules, each with the one spelling that
//! the database, the output and the command line share.

use super::spelled_enum;

spelled_enum! {
    /// Whether a member's account still takes payments.
    pub enum MemberStatus ("member status") {
        Active => "active",
        /// Closed by `member close`: every schedule cancelled, nothing new accepted.
        Closed => "closed",
    }
}

spelled_enum! {
    /// Whether a stored card may be charged.
    pub enum CardStatus ("card status") {
        Active => "active",
        /// Disabled after a decline that says never to try it again (lost, stolen, closed...).
        Disabled => "disabled",
        /// Removed by `card remove`; kept for the history of the payments it made.
        Removed => "removed",
    }
}

spelled_enum! {
    pub enum BillStatus ("bill status") {
        Open => "open",
        Paid => "paid",
        Void => "void",
    }
}

spelled_enum! {
    pub enum ScheduleKind ("schedule kind") {
        OneTime => "one_time",
        Recurring => "recurring",
    }
}

spelled_enum! {
    pub enum ScheduleStatus ("schedule status") {
        Active => "active",
        Paused => "paused",
        Cancelled => "cancelled",
        /// A one-time schedule whose payment happened, or a recurring one past its end.
        Completed => "completed",
        /// Stopped by autopay after repeated failures or a card that must not be tried again.
        Suspended => "suspended",
    }
}

impl ScheduleStatus {
    /// Whether the schedule may still charge, now or after a resume.
    pub fn is_live(self) -> bool {
        matches!(
            self,
            ScheduleStatus::Active | ScheduleStatus::Paused | ScheduleStatus::Suspended
        )
    }
}

spelled_enum! {
    /// Through which interface a member authorized a schedule.
    pub enum AuthorizedVia ("authorization channel") {
        Cli => "cli",
        Api => "api",
    }
}
