-- Indexes that keep two reads of the charge path independent of how many payments have been
-- charged before them, measured by `autopay bench --scenario month-start` (docs/performance.md).
-- Both reads used to go through payments_due (state, next_attempt_at), where every payment
-- leaves an entry under 'processing' as it passes through: on PostgreSQL, until a vacuum removes
-- them, each read visited every such entry (52,000 one minute into 50,000 payments, 20 ms).

-- A claim first looks for attempts to settle (unknown outcomes due for a lookup, claims that
-- expired mid-call), in claim order: only rows in those two states are in this index.
CREATE INDEX payments_settle ON payments (COALESCE(next_attempt_at, due_at), id)
    WHERE state IN ('unknown', 'processing');

-- Freezing an amount reads what the member's other payments in flight have reserved.
CREATE INDEX payments_reserving ON payments (member_id)
    WHERE state IN ('processing', 'unknown', 'needs_review');
