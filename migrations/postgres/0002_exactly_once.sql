-- Exactly-once on every path. Additive only, so the release before this one still runs against
-- a database migrated by this one.
--
-- Each attempt keeps the exact request it sends and when it was first sent: every resend of it
-- is that request, and only inside processor.key_retention. Attempts from before this migration
-- have no stored request: they are settled by lookup only, never resent.
ALTER TABLE payment_attempts ADD COLUMN request JSONB;
ALTER TABLE payment_attempts ADD COLUMN first_sent_at TIMESTAMPTZ;
ALTER TABLE payment_attempts ADD COLUMN sends BIGINT NOT NULL DEFAULT 0;
ALTER TABLE payment_attempts ADD COLUMN unknown_cycles BIGINT NOT NULL DEFAULT 0;
ALTER TABLE payment_attempts ADD COLUMN resend_stopped BOOLEAN NOT NULL DEFAULT FALSE;
UPDATE payment_attempts SET first_sent_at = started_at, sends = 1, resend_stopped = TRUE;

-- The processor's fingerprint of a card's number, when it gives one: the card networks' limits
-- count per card, whichever stored card it was added as.
ALTER TABLE payment_methods ADD COLUMN fingerprint TEXT;

-- Every request to the processor, with its own outcome (approved, declined, unknown, busy,
-- mismatch; found, not_found, lookup_failed for lookups). The card limits and the circuit
-- breaker read it. A row is written before its request and finished after the answer; an
-- unfinished row is a request whose answer never came.
CREATE TABLE processor_calls (
    id                UUID PRIMARY KEY,
    payment_id        UUID NOT NULL REFERENCES payments (id),
    attempt           BIGINT NOT NULL,
    payment_method_id UUID NOT NULL REFERENCES payment_methods (id),
    fingerprint       TEXT,
    kind              TEXT NOT NULL CHECK (kind IN ('charge', 'lookup')),
    actor             TEXT NOT NULL,
    started_at        TIMESTAMPTZ NOT NULL,
    outcome           TEXT,
    detail            TEXT,
    finished_at       TIMESTAMPTZ
);
CREATE INDEX processor_calls_card ON processor_calls (payment_method_id, started_at);
CREATE INDEX processor_calls_fingerprint ON processor_calls (fingerprint, started_at);
CREATE INDEX processor_calls_started ON processor_calls (started_at);
CREATE INDEX processor_calls_payment ON processor_calls (payment_id, attempt);
INSERT INTO processor_calls (id, payment_id, attempt, payment_method_id, kind, actor, started_at, outcome, finished_at)
    SELECT id, payment_id, attempt, payment_method_id, 'charge', 'migration', started_at,
           CASE WHEN outcome IN ('approved', 'declined') THEN outcome WHEN outcome IS NULL THEN NULL ELSE 'unknown' END,
           finished_at
    FROM payment_attempts;

-- The card-expiry scan joins schedules by card; `payment show` reads events by id alone.
CREATE INDEX schedules_method ON schedules (payment_method_id);
CREATE INDEX events_entity_id ON events (entity_id);
