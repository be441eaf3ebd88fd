//! Emails: what each kind says (templates), how it travels (mailer), the outbox dispatcher
//! that delivers rows written by the engine and the management commands, the scans that write
//! reminders, and the housekeeping that deletes old notifications.

pub mod dispatcher;
pub mod housekeeping;
pub mod mailer;
pub mod reminders;
pub mod templates;
