-- autopay schema, PostgreSQL dialect: the same tables as migrations/sqlite, with native uuid,
-- timestamptz, date, boolean and jsonb types. Money is bigint minor units.

CREATE TABLE control (
    id                       SMALLINT PRIMARY KEY CHECK (id = 1),
    installation_id          UUID NOT NULL,
    min_binary_schema        BIGINT NOT NULL,
    charging_paused_at       TIMESTAMPTZ,
    charging_paused_by       TEXT,
    charging_paused_reason   TEXT,
    mail_paused_at           TIMESTAMPTZ,
    mail_paused_reason       TEXT,
    reconcile_required_since TIMESTAMPTZ,
    created_at               TIMESTAMPTZ NOT NULL
);

CREATE TABLE members (
    id                    UUID PRIMARY KEY,
    account_number        TEXT NOT NULL UNIQUE,
    account_type          TEXT NOT NULL CHECK (account_type IN ('individual-family', 'employer-group')),
    name                  TEXT NOT NULL,
    email                 TEXT NOT NULL,
    time_zone             TEXT NOT NULL,
    reminders             BOOLEAN NOT NULL DEFAULT TRUE,
    email_bouncing        BOOLEAN NOT NULL DEFAULT FALSE,
    processor_customer_id TEXT,
    status                TEXT NOT NULL CHECK (status IN ('active', 'closed')),
    created_at            TIMESTAMPTZ NOT NULL,
    updated_at            TIMESTAMPTZ NOT NULL
);

CREATE TABLE payment_methods (
    id              UUID PRIMARY KEY,
    member_id       UUID NOT NULL REFERENCES members (id),
    processor       TEXT NOT NULL,
    processor_token TEXT NOT NULL,
    brand           TEXT NOT NULL CHECK (brand IN ('visa', 'mastercard', 'discover', 'amex', 'other')),
    last4           TEXT NOT NULL CHECK (length(last4) = 4),
    exp_month       BIGINT NOT NULL CHECK (exp_month BETWEEN 1 AND 12),
    exp_year        BIGINT NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('active', 'disabled', 'removed')),
    status_reason   TEXT,
    created_at      TIMESTAMPTZ NOT NULL,
    updated_at      TIMESTAMPTZ NOT NULL,
    UNIQUE (member_id, processor, processor_token)
);
CREATE INDEX payment_methods_member ON payment_methods (member_id);

CREATE TABLE bills (
    id          UUID PRIMARY KEY,
    member_id   UUID NOT NULL REFERENCES members (id),
    reference   TEXT NOT NULL,
    amount_due  BIGINT NOT NULL CHECK (amount_due >= 0),
    amount_paid BIGINT NOT NULL DEFAULT 0,
    currency    TEXT NOT NULL,
    due_date    DATE NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('open', 'paid', 'void')),
    created_at  TIMESTAMPTZ NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL,
    UNIQUE (member_id, reference)
);
CREATE INDEX bills_open ON bills (member_id, status, due_date);

-- Payments made outside autopay (phone, portal), recorded by `bill pay --external`.
CREATE TABLE external_payments (
    id          UUID PRIMARY KEY,
    bill_id     UUID NOT NULL REFERENCES bills (id),
    amount      BIGINT NOT NULL,
    currency    TEXT NOT NULL,
    reference   TEXT NOT NULL,
    recorded_by TEXT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL,
    UNIQUE (bill_id, reference)
);

-- Money a member paid beyond what was owed; `remaining` falls as later charges use it.
CREATE TABLE credits (
    id         UUID PRIMARY KEY,
    member_id  UUID NOT NULL REFERENCES members (id),
    amount     BIGINT NOT NULL,
    remaining  BIGINT NOT NULL,
    currency   TEXT NOT NULL,
    source     TEXT NOT NULL,
    source_id  TEXT,
    reason     TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX credits_member ON credits (member_id);

CREATE TABLE schedules (
    id                UUID PRIMARY KEY,
    member_id         UUID NOT NULL REFERENCES members (id),
    payment_method_id UUID NOT NULL REFERENCES payment_methods (id),
    kind              TEXT NOT NULL CHECK (kind IN ('one_time', 'recurring')),
    recurrence        TEXT NOT NULL,
    amount_rule       TEXT NOT NULL CHECK (amount_rule IN ('fixed', 'balance')),
    fixed_amount      BIGINT CHECK (fixed_amount IS NULL OR fixed_amount > 0),
    currency          TEXT NOT NULL,
    time_zone         TEXT NOT NULL,
    next_run_at       TIMESTAMPTZ,
    next_occurrence   TEXT,
    status            TEXT NOT NULL CHECK (status IN ('active', 'paused', 'cancelled', 'completed', 'suspended')),
    status_reason     TEXT,
    consecutive_failures BIGINT NOT NULL DEFAULT 0,
    version           BIGINT NOT NULL DEFAULT 1,
    authorized_at     TIMESTAMPTZ NOT NULL,
    authorized_via    TEXT NOT NULL CHECK (authorized_via IN ('cli', 'api')),
    authorized_by     TEXT NOT NULL,
    terms_version     TEXT NOT NULL,
    cancelled_at      TIMESTAMPTZ,
    cancelled_by      TEXT,
    created_at        TIMESTAMPTZ NOT NULL,
    updated_at        TIMESTAMPTZ NOT NULL,
    CHECK ((amount_rule = 'fixed') = (fixed_amount IS NOT NULL))
);
CREATE INDEX schedules_member ON schedules (member_id);
CREATE INDEX schedules_due ON schedules (status, next_run_at);
CREATE UNIQUE INDEX schedules_one_balance_per_member ON schedules (member_id)
    WHERE amount_rule = 'balance' AND status IN ('active', 'paused', 'suspended');

-- One row per occurrence. No CHECK here may refuse recording a charge that already happened.
CREATE TABLE payments (
    id                  UUID PRIMARY KEY,
    schedule_id         UUID NOT NULL REFERENCES schedules (id),
    member_id           UUID NOT NULL REFERENCES members (id),
    occurrence          TEXT NOT NULL,
    due_at              TIMESTAMPTZ NOT NULL,
    amount              BIGINT,
    currency            TEXT NOT NULL,
    state               TEXT NOT NULL CHECK (state IN ('scheduled', 'processing', 'retry_wait', 'unknown',
                            'succeeded', 'failed', 'skipped', 'cancelled', 'needs_review', 'missed')),
    attempt             BIGINT NOT NULL DEFAULT 1,
    payment_method_id   UUID NOT NULL REFERENCES payment_methods (id),
    schedule_version    BIGINT NOT NULL,
    lease_owner         TEXT,
    lease_token         TEXT,
    lease_expires_at    TIMESTAMPTZ,
    next_attempt_at     TIMESTAMPTZ,
    processor_reference TEXT,
    decline_code        TEXT,
    reason              TEXT,
    -- Credit this attempt uses; consumed when the charge succeeds.
    credit_applied      BIGINT NOT NULL DEFAULT 0,
    -- When the outcome first became unknown: lookups stop after processor.lookup_window.
    unknown_since       TIMESTAMPTZ,
    created_at          TIMESTAMPTZ NOT NULL,
    updated_at          TIMESTAMPTZ NOT NULL,
    UNIQUE (schedule_id, occurrence)
);
CREATE INDEX payments_due ON payments (state, next_attempt_at);
CREATE INDEX payments_member ON payments (member_id);
CREATE INDEX payments_method ON payments (payment_method_id, created_at);

-- One row per call to the processor: the 15-attempts-per-card rule, the circuit breaker and
-- the audit read it.
CREATE TABLE payment_attempts (
    id                  UUID PRIMARY KEY,
    payment_id          UUID NOT NULL REFERENCES payments (id),
    attempt             BIGINT NOT NULL,
    payment_method_id   UUID NOT NULL REFERENCES payment_methods (id),
    idempotency_key     TEXT NOT NULL UNIQUE,
    amount              BIGINT NOT NULL,
    currency            TEXT NOT NULL,
    started_at          TIMESTAMPTZ NOT NULL,
    outcome             TEXT,
    decline_code        TEXT,
    processor_reference TEXT,
    finished_at         TIMESTAMPTZ,
    UNIQUE (payment_id, attempt)
);
CREATE INDEX payment_attempts_card ON payment_attempts (payment_method_id, started_at);
CREATE INDEX payment_attempts_started ON payment_attempts (started_at);

CREATE TABLE payment_allocations (
    id         UUID PRIMARY KEY,
    payment_id UUID NOT NULL REFERENCES payments (id),
    bill_id    UUID REFERENCES bills (id),
    credit_id  UUID REFERENCES credits (id),
    amount     BIGINT NOT NULL,
    currency   TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX payment_allocations_payment ON payment_allocations (payment_id);
CREATE INDEX payment_allocations_bill ON payment_allocations (bill_id);

-- The outbox: rendered and sent after the transaction that wrote the row.
CREATE TABLE notifications (
    id               UUID PRIMARY KEY,
    kind             TEXT NOT NULL,
    dedupe_key       TEXT NOT NULL UNIQUE,
    member_id        UUID REFERENCES members (id),
    recipient        TEXT NOT NULL,
    payload          JSONB NOT NULL,
    state            TEXT NOT NULL CHECK (state IN ('pending', 'sending', 'sent', 'failed', 'expired')),
    lease_owner      TEXT,
    lease_token      TEXT,
    lease_expires_at TIMESTAMPTZ,
    attempts         BIGINT NOT NULL DEFAULT 0,
    next_attempt_at  TIMESTAMPTZ NOT NULL,
    expires_at       TIMESTAMPTZ,
    last_error       TEXT,
    created_at       TIMESTAMPTZ NOT NULL,
    sent_at          TIMESTAMPTZ
);
CREATE INDEX notifications_due ON notifications (state, next_attempt_at);

-- Append-only audit of every state change.
CREATE TABLE events (
    id          UUID PRIMARY KEY,
    at          TIMESTAMPTZ NOT NULL,
    actor       TEXT NOT NULL,
    entity      TEXT NOT NULL,
    entity_id   TEXT NOT NULL,
    action      TEXT NOT NULL,
    detail      JSONB NOT NULL
);
CREATE INDEX events_entity ON events (entity, entity_id);
