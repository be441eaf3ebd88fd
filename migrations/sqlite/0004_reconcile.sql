-- Charges the processor made that a restored database could not place on a payment
-- (`autopay reconcile`). Each stays in `autopay status` until an operator acknowledges it; its
-- key counts as known, so `autopay run` accepts the database once it is listed here.
CREATE TABLE reconcile_findings (
    id               TEXT PRIMARY KEY,
    idempotency_key  TEXT NOT NULL UNIQUE,
    kind             TEXT NOT NULL CHECK (kind IN ('no_payment', 'second_charge', 'ended_payment', 'other_attempt_open')),
    reference        TEXT NOT NULL,
    payment_id       TEXT REFERENCES payments (id),
    schedule_id      TEXT NOT NULL,
    occurrence       TEXT NOT NULL,
    attempt          INTEGER NOT NULL,
    amount           INTEGER NOT NULL,
    currency         TEXT NOT NULL,
    charged_at       TEXT NOT NULL,
    found_at         TEXT NOT NULL,
    acknowledged_at  TEXT,
    acknowledged_by  TEXT,
    note             TEXT
);
CREATE INDEX reconcile_findings_open ON reconcile_findings (acknowledged_at);
