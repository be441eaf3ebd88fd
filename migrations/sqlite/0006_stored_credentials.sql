-- Stored credentials and the Stripe adapter. Additive only, so the release before this one
-- still runs against a database migrated by this one.
--
-- A card keeps what the card networks' stored-credential framework asks of a merchant that
-- charges a saved card without the cardholder present: the network transaction id of the
-- card's first successful charge, and the consent it was saved under (when, through what, and
-- the version of the terms shown). Cards saved before this migration have no consent recorded.
-- `processor_mode` is `test` or `live` for a processor whose keys have modes (Stripe).
ALTER TABLE payment_methods ADD COLUMN network_transaction_id TEXT;
ALTER TABLE payment_methods ADD COLUMN consent_at TEXT;
ALTER TABLE payment_methods ADD COLUMN consent_via TEXT;
ALTER TABLE payment_methods ADD COLUMN consent_terms_version TEXT;
ALTER TABLE payment_methods ADD COLUMN processor_mode TEXT CHECK (processor_mode IN ('test', 'live'));
-- When the processor's copy of the card's details was last read (before an expiry notice: the
-- networks' card updater may have renewed it).
ALTER TABLE payment_methods ADD COLUMN details_checked_at TEXT;

-- A declined attempt keeps the advice that came with its decline code.
ALTER TABLE payment_attempts ADD COLUMN advice_code TEXT;
ALTER TABLE payment_attempts ADD COLUMN network_advice_code TEXT;
ALTER TABLE payment_attempts ADD COLUMN network_decline_code TEXT;

-- Processor webhook events already handled: a redelivered event is answered and counted, not
-- acted on twice.
CREATE TABLE webhook_events (
    id          TEXT PRIMARY KEY,
    type        TEXT NOT NULL,
    received_at TEXT NOT NULL,
    outcome     TEXT NOT NULL
);
CREATE INDEX webhook_events_received ON webhook_events (received_at);
