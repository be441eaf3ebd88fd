-- autopay schema, SQLite dialect. Ids are UUID strings, instants RFC 3339 UTC text with six
-- fraction digits (so text order is time order), dates YYYY-MM-DD, money integer minor units.

CREATE TABLE control (
    id                       INTEGER PRIMARY KEY CHECK (id = 1),
    installation_id          TEXT NOT NULL,
    min_binary_schema        INTEGER NOT NULL,
    charging_paused_at       TEXT,
    charging_paused_by       TEXT,
    charging_paused_reason   TEXT,
    mail_paused_at           TEXT,
    mail_paused_reason       TEXT,
    reconcile_required_since TEXT,
    created_at               TEXT NOT NULL
);

CREATE TABLE members (
    id                    TEXT PRIMARY KEY,
    account_number        TEXT NOT NULL UNIQUE,
    account_type          TEXT NOT NULL CHECK (account_type IN ('individual-family', 'employer-group')),
    name                  TEXT NOT NULL,
    email                 TEXT NOT NULL,
    time_zone             TEXT NOT NULL,
    reminders             INTEGER NOT NULL DEFAULT 1 CHECK (reminders IN (0, 1)),
    email_bouncing        INTEGER NOT NULL DEFAULT 0 CHECK (email_bouncing IN (0, 1)),
    processor_customer_id TEXT,
    status                TEXT NOT NULL CHECK (status IN ('active', 'closed')),
    created_at            TEXT NOT NULL,
    updated_at            TEXT NOT NULL
);

CREATE TABLE payment_methods (
    id              TEXT PRIMARY KEY,
    member_id       TEXT NOT NULL REFERENCES members (id),
    processor       TEXT NOT NULL,
    processor_token TEXT NOT NULL,
    brand           TEXT NOT NULL CHECK (brand IN ('visa', 'mastercard', 'discover', 'amex', 'other')),
    last4           TEXT NOT NULL CHECK (length(last4) = 4),
    exp_month       INTEGER NOT NULL CHECK (exp_month BETWEEN 1 AND 12),
    exp_year        INTEGER NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('active', 'disabled', 'removed')),
    status_reason   TEXT,
    created_at      TEXT NOT NULL,
    updated_at      TEXT NOT NULL,
    UNIQUE (member_id, processor, processor_token)
);
CREATE INDEX payment_methods_member ON payment_methods (member_id);

CREATE TABLE bills (
    id          TEXT PRIMARY KEY,
    member_id   TEXT NOT NULL REFERENCES members (id),
    reference   TEXT NOT NULL,
    amount_due  INTEGER NOT NULL CHECK (amount_due >= 0),
    amount_paid INTEGER NOT NULL DEFAULT 0,
    currency    TEXT NOT NULL,
    due_date    TEXT NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('open', 'paid', 'void')),
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL,
    UNIQUE (member_id, reference)
);
CREATE INDEX bills_open ON bills (member_id, status, due_date);

-- Payments made outside autopay (phone, portal), recorded by `bill pay --external`.
CREATE TABLE external_payments (
    id          TEXT PRIMARY KEY,
    bill_id     TEXT NOT NULL REFERENCES bills (id),
    amount      INTEGER NOT NULL,
    currency    TEXT NOT NULL,
    reference   TEXT NOT NULL,
    recorded_by TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    UNIQUE (bill_id, reference)
);

-- Money a member paid beyond what was owed; `remaining` falls as later charges use it.
CREATE TABLE credits (
    id         TEXT PRIMARY KEY,
    member_id  TEXT NOT NULL REFERENCES members (id),
    amount     INTEGER NOT NULL,
    remaining  INTEGER NOT NULL,
    currency   TEXT NOT NULL,
    source     TEXT NOT NULL,
    source_id  TEXT,
    reason     TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX credits_member ON credits (member_id);

CREATE TABLE schedules (
    id                TEXT PRIMARY KEY,
    member_id         TEXT NOT NULL REFERENCES members (id),
    payment_method_id TEXT NOT NULL REFERENCES payment_methods (id),
    kind              TEXT NOT NULL CHECK (kind IN ('one_time', 'recurring')),
    recurrence        TEXT NOT NULL,
    amount_rule       TEXT NOT NULL CHECK (amount_rule IN ('fixed', 'balance')),
    fixed_amount      INTEGER CHECK (fixed_amount IS NULL OR fixed_amount > 0),
    currency          TEXT NOT NULL,
    time_zone         TEXT NOT NULL,
    next_run_at       TEXT,
    next_occurrence   TEXT,
    status            TEXT NOT NULL CHECK (status IN ('active', 'paused', 'cancelled', 'completed', 'suspended')),
    status_reason     TEXT,
    consecutive_failures INTEGER NOT NULL DEFAULT 0,
    version           INTEGER NOT NULL DEFAULT 1,
    authorized_at     TEXT NOT NULL,
    authorized_via    TEXT NOT NULL CHECK (authorized_via IN ('cli', 'api')),
    authorized_by     TEXT NOT NULL,
    terms_version     TEXT NOT NULL,
    cancelled_at      TEXT,
    cancelled_by      TEXT,
    created_at        TEXT NOT NULL,
    updated_at        TEXT NOT NULL,
    CHECK ((amount_rule = 'fixed') = (fixed_amount IS NOT NULL))
);
CREATE INDEX schedules_member ON schedules (member_id);
CREATE INDEX schedules_due ON schedules (status, next_run_at);
CREATE UNIQUE INDEX schedules_one_balance_per_member ON schedules (member_id)
    WHERE amount_rule = 'balance' AND status IN ('active', 'paused', 'suspended');

-- One row per occurrence. No CHECK here may refuse recording a charge that already happened.
CREATE TABLE payments (
    id                  TEXT PRIMARY KEY,
    schedule_id         TEXT NOT NULL REFERENCES schedules (id),
    member_id           TEXT NOT NULL REFERENCES members (id),
    occurrence          TEXT NOT NULL,
    due_at              TEXT NOT NULL,
    amount              INTEGER,
    currency            TEXT NOT NULL,
    state               TEXT NOT NULL CHECK (state IN ('scheduled', 'processing', 'retry_wait', 'unknown',
                            'succeeded', 'failed', 'skipped', 'cancelled', 'needs_review', 'missed')),
    attempt             INTEGER NOT NULL DEFAULT 1,
    payment_method_id   TEXT NOT NULL REFERENCES payment_methods (id),
    schedule_version    INTEGER NOT NULL,
    lease_owner         TEXT,
    lease_token         TEXT,
    lease_expires_at    TEXT,
    next_attempt_at     TEXT,
    processor_reference TEXT,
    decline_code        TEXT,
    reason              TEXT,
    -- Credit this attempt uses; consumed when the charge succeeds.
    credit_applied      INTEGER NOT NULL DEFAULT 0,
    -- When the outcome first became unknown: lookups stop after processor.lookup_window.
    unknown_since       TEXT,
    created_at          TEXT NOT NULL,
    updated_at          TEXT NOT NULL,
    UNIQUE (schedule_id, occurrence)
);
CREATE INDEX payments_due ON payments (state, next_attempt_at);
CREATE INDEX payments_member ON payments (member_id);
CREATE INDEX payments_method ON payments (payment_method_id, created_at);

-- One row per call to the processor: the 15-attempts-per-card rule, the circuit breaker and
-- the audit read it.
CREATE TABLE payment_attempts (
    id                  TEXT PRIMARY KEY,
    payment_id          TEXT NOT NULL REFERENCES payments (id),
    attempt             INTEGER NOT NULL,
    payment_method_id   TEXT NOT NULL REFERENCES payment_methods (id),
    idempotency_key     TEXT NOT NULL UNIQUE,
    amount              INTEGER NOT NULL,
    currency            TEXT NOT NULL,
    started_at          TEXT NOT NULL,
    outcome             TEXT,
    decline_code        TEXT,
    processor_reference TEXT,
    finished_at         TEXT,
    UNIQUE (payment_id, attempt)
);
CREATE INDEX payment_attempts_card ON payment_attempts (payment_method_id, started_at);
CREATE INDEX payment_attempts_started ON payment_attempts (started_at);

CREATE TABLE payment_allocations (
    id         TEXT PRIMARY KEY,
    payment_id TEXT NOT NULL REFERENCES payments (id),
    bill_id    TEXT REFERENCES bills (id),
    credit_id  TEXT REFERENCES credits (id),
    amount     INTEGER NOT NULL,
    currency   TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX payment_allocations_payment ON payment_allocations (payment_id);
CREATE INDEX payment_allocations_bill ON payment_allocations (bill_id);

-- The outbox: rendered and sent after the transaction that wrote the row.
CREATE TABLE notifications (
    id               TEXT PRIMARY KEY,
    kind             TEXT NOT NULL,
    dedupe_key       TEXT NOT NULL UNIQUE,
    member_id        TEXT REFERENCES members (id),
    recipient        TEXT NOT NULL,
    payload          TEXT NOT NULL,
    state            TEXT NOT NULL CHECK (state IN ('pending', 'sending', 'sent', 'failed', 'expired')),
    lease_owner      TEXT,
    lease_token      TEXT,
    lease_expires_at TEXT,
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  TEXT NOT NULL,
    expires_at       TEXT,
    last_error       TEXT,
    created_at       TEXT NOT NULL,
    sent_at          TEXT
);
CREATE INDEX notifications_due ON notifications (state, next_attempt_at);

-- Append-only audit of every state change.
CREATE TABLE events (
    id          TEXT PRIMARY KEY,
    at          TEXT NOT NULL,
    actor       TEXT NOT NULL,
    entity      TEXT NOT NULL,
    entity_id   TEXT NOT NULL,
    action      TEXT NOT NULL,
    detail      TEXT NOT NULL
);
CREATE INDEX events_entity ON events (entity, entity_id);
