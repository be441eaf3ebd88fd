//! Emails: what each kind says (templates), how it travels (mailer), the outbox dispatcher
//! that delivers rows written by the engine and the management commands, and the scans that
//! write reminders.

pub mod dispatcher;
pub mod mailer;
pub mod reminders;
pub mod templates;
