-- Indexes that keep the charge path's work independent of how many payments are due, measured
-- by `autopay bench` (docs/performance.md): at 50,000 due payments a claim sorted every one of
-- them, and a planning batch every due schedule of the same time.

-- Claims take the earliest due charges in order (COALESCE(next_attempt_at, due_at), id): read
-- in that order from this index, not sorted.
CREATE INDEX payments_claimable ON payments (COALESCE(next_attempt_at, due_at), id)
    WHERE state IN ('scheduled', 'retry_wait');

-- Planning reads due schedules in order (next_run_at, id), many of them due at one time.
-- (schedules_due, a prefix of it, stays: migrations only add.)
CREATE INDEX schedules_due_order ON schedules (status, next_run_at, id);
