-- When each periodic job last ran on each worker: `autopay status` shows it, since the daemon's
-- own memory of its ticks is not visible to another process.
CREATE TABLE job_runs (
    job      TEXT NOT NULL,
    worker   TEXT NOT NULL,
    last_run TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (job, worker)
);
