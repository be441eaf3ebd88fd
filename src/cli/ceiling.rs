//! The ceiling `autopay bench` compares itself with: how many transactions a second the same
//! PostgreSQL database commits when each one does only one charge's minimal writes, measured by
//! `pgbench` (PostgreSQL's own load tool) on the benchmark's throwaway database.
//!
//! Each transaction updates a payment and its bill and inserts an allocation, an outbox row and
//! an audit event, into autopay's own tables with their indexes, constraints and foreign keys,
//! picking a random payment of the run. It runs after autopay has charged and its result has been
//! checked, so the rows it adds disturb nothing; the database is dropped afterwards. pgbench runs
//! with prepared statements and as many connections as autopay used. The connection reaches it
//! through the PG* environment variables, never its command line.

use std::process::Stdio;

use super::bench::progress;
use super::{CliError, exit};
use crate::config::{DatabaseUrl, redact_url};

/// One charge's minimal writes, as one transaction. `:k` picks a row of `bench_ceiling`, which
/// maps a number to a payment of the run, its member and its bill.
const SCRIPT: &str = r#"\set k random(1, :rows)
BEGIN;
UPDATE payments SET state = 'succeeded', updated_at = now() WHERE id = (SELECT payment_id FROM bench_ceiling WHERE k = :k);
UPDATE bills SET amount_paid = amount_paid + 0, updated_at = now() WHERE id = (SELECT bill_id FROM bench_ceiling WHERE k = :k);
INSERT INTO payment_allocations (id, payment_id, bill_id, amount, currency, created_at) SELECT gen_random_uuid(), payment_id, bill_id, 100, 'USD', now() FROM bench_ceiling WHERE k = :k;
INSERT INTO notifications (id, kind, dedupe_key, member_id, recipient, payload, state, next_attempt_at, created_at) SELECT gen_random_uuid(), 'receipt', gen_random_uuid()::text, member_id, 'bench@example.org', '{"amount": "1.00", "currency": "USD", "card": "Visa ending 4242", "account": "ending 0001", "reference": "sim_0000000000000000"}', 'pending', now(), now() FROM bench_ceiling WHERE k = :k;
INSERT INTO events (id, at, actor, entity, entity_id, action, detail) SELECT gen_random_uuid(), now(), 'pgbench', 'payment', payment_id::text, 'succeeded', '{"attempt": 1, "reference": "sim_0000000000000000"}' FROM bench_ceiling WHERE k = :k;
END;
"#;

/// What pgbench measured.
#[derive(Debug, Clone, Copy)]
pub struct Ceiling {
    pub transactions_per_second: f64,
    pub clients: u32,
    pub seconds: u32,
}

/// Runs the ceiling script for `seconds` with `clients` connections on the database `url`,
/// whose payments have all been charged.
pub(super) async fn measure(
    url: &DatabaseUrl,
    clients: u32,
    seconds: u32,
) -> Result<Ceiling, CliError> {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(url.expose())
        .await
        .map_err(|e| unavailable(format!("cannot connect for the ceiling: {e}")))?;
    let rows: i64 = {
        sqlx::query(
            "CREATE TABLE bench_ceiling AS SELECT (row_number() OVER (ORDER BY p.id))::int AS k, \
             p.id AS payment_id, p.member_id, b.bill_id \
             FROM payments p JOIN (SELECT DISTINCT ON (member_id) member_id, id AS bill_id FROM bills ORDER BY member_id, id) b \
             ON b.member_id = p.member_id",
        )
        .execute(&mut conn)
        .await
        .map_err(|e| CliError::internal(format!("preparing the ceiling's rows: {e}")))?;
        sqlx::query("ALTER TABLE bench_ceiling ADD PRIMARY KEY (k)")
            .execute(&mut conn)
            .await
            .map_err(|e| CliError::internal(format!("preparing the ceiling's rows: {e}")))?;
        sqlx::query_scalar("SELECT COUNT(*) FROM bench_ceiling")
            .fetch_one(&mut conn)
            .await
            .map_err(|e| CliError::internal(format!("counting the ceiling's rows: {e}")))?
    };
    drop(conn);
    if rows == 0 {
        return Err(CliError::internal("the ceiling has no payments to write"));
    }
    let dir =
        std::env::temp_dir().join(format!("autopay-ceiling-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir(&dir).map_err(|e| {
        unavailable(format!(
            "cannot create {}: {e}; set TMPDIR to a writable folder",
            dir.display()
        ))
    })?;
    let script = dir.join("charge.sql");
    let outcome = async {
        std::fs::write(&script, SCRIPT)
            .map_err(|e| unavailable(format!("cannot write {}: {e}", script.display())))?;
        progress(format!(
            "measuring the ceiling: pgbench, {clients} connections, {seconds}s..."
        ));
        run_pgbench(url, &script, clients, seconds, rows).await
    }
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    let tps = outcome?;
    Ok(Ceiling {
        transactions_per_second: tps,
        clients,
        seconds,
    })
}

async fn run_pgbench(
    url: &DatabaseUrl,
    script: &std::path::Path,
    clients: u32,
    seconds: u32,
    rows: i64,
) -> Result<f64, CliError> {
    let env = pg_env(url.expose())?;
    let mut command = std::process::Command::new("pgbench");
    command
        .arg("--no-vacuum")
        .arg("--protocol=prepared")
        .arg(format!("--client={clients}"))
        .arg(format!("--jobs={}", clients.clamp(1, 2)))
        .arg(format!("--time={seconds}"))
        .arg(format!("--define=rows={rows}"))
        .arg(format!("--file={}", script.display()))
        .env_remove("PGSERVICE")
        .envs(env)
        .stdin(Stdio::null());
    let out = tokio::task::spawn_blocking(move || command.output())
        .await
        .map_err(|e| CliError::internal(format!("the pgbench task stopped: {e}")))?
        .map_err(|e| {
            unavailable(format!(
                "cannot run pgbench: {e}; install PostgreSQL's client tools (Debian: apt-get install postgresql-client), or measure without the ceiling with --backend sqlite"
            ))
        })?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(CliError::internal(format!(
            "pgbench failed ({}): {}",
            out.status,
            redact_url(stderr.trim())
        )));
    }
    parse_tps(&stdout).ok_or_else(|| {
        CliError::internal(format!(
            "pgbench printed no \"tps = \" line: {}",
            stdout.trim()
        ))
    })
}

/// The PG* variables that name the database `url` for pgbench: host, port, user, password,
/// database and TLS mode.
fn pg_env(url: &str) -> Result<Vec<(&'static str, String)>, CliError> {
    let bad = || CliError::internal(format!("cannot read {} as a URL", redact_url(url)));
    let parsed = reqwest::Url::parse(url).map_err(|_| bad())?;
    let decode = |s: &str| {
        form_urlencoded::parse(format!("v={}", s.replace('+', "%2B")).as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default()
    };
    let mut env = vec![
        (
            "PGHOST",
            parsed.host_str().unwrap_or("localhost").to_string(),
        ),
        ("PGPORT", parsed.port().unwrap_or(5432).to_string()),
        ("PGDATABASE", decode(parsed.path().trim_start_matches('/'))),
    ];
    if !parsed.username().is_empty() {
        env.push(("PGUSER", decode(parsed.username())));
    }
    if let Some(password) = parsed.password() {
        env.push(("PGPASSWORD", decode(password)));
    }
    for (key, value) in parsed.query_pairs() {
        if key == "sslmode" {
            env.push(("PGSSLMODE", value.into_owned()));
        }
    }
    Ok(env)
}

/// The rate from pgbench's `tps = 2612.34 (without initial connection time)` line.
fn parse_tps(stdout: &str) -> Option<f64> {
    stdout
        .lines()
        .filter_map(|line| line.trim().strip_prefix("tps = "))
        .filter_map(|rest| rest.split_whitespace().next())
        .find_map(|n| n.parse().ok())
}

fn unavailable(message: String) -> CliError {
    CliError::new(exit::UNAVAILABLE, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_is_read_from_pgbench_s_summary() {
        let out = "transaction type: charge.sql\nnumber of clients: 8\n\
                   latency average = 3.061 ms\n\
                   initial connection time = 12.508 ms\n\
                   tps = 2613.418330 (without initial connection time)\n";
        assert_eq!(parse_tps(out), Some(2613.418330));
        assert_eq!(parse_tps("no summary"), None);
    }

    #[test]
    fn the_connection_goes_to_pgbench_as_environment_variables() {
        let env =
            pg_env("postgres://bench:p%40ss+word@db.internal:6543/autopay_bench_1?sslmode=require")
                .unwrap();
        let get = |k: &str| {
            env.iter()
                .find(|(key, _)| *key == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("PGHOST"), Some("db.internal"));
        assert_eq!(get("PGPORT"), Some("6543"));
        assert_eq!(get("PGUSER"), Some("bench"));
        assert_eq!(get("PGPASSWORD"), Some("p@ss+word"));
        assert_eq!(get("PGDATABASE"), Some("autopay_bench_1"));
        assert_eq!(get("PGSSLMODE"), Some("require"));
        let plain = pg_env("postgres://postgres@127.0.0.1/test").unwrap();
        assert!(plain.iter().all(|(k, _)| *k != "PGPASSWORD"));
    }
}
